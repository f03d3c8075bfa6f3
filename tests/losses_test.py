"""Tests for supcon_tf.losses: SupCon / SimCLR / N-pairs losses and wrappers."""

import itertools
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import losses
from supcon_tf import npairs as npairs_lib

LN3 = math.log(3.0)

# The hand-checked case of the official google-research supcon losses_test.py.
OFFICIAL_FEATURES = np.array(
    [[[0.01, 0.02, 0.14], [0.38, 0.61, 0.50]],
     [[0.86, 0.97, 0.33], [0.26, 0.68, 0.45]],
     [[0.32, 0.64, 0.28], [0.45, 0.74, 0.73]]], np.float32)
OFFICIAL_LABELS = np.array([0, 0, 1])

# Four vertices of a regular tetrahedron: every pair has dot product -1/3.
_S2, _S6 = math.sqrt(2.0), math.sqrt(6.0)
TETRAHEDRON = np.array(
    [[[0.0, 0.0, 1.0], [0.0, 2 * _S2 / 3, -1 / 3]],
     [[_S6 / 3, -_S2 / 3, -1 / 3], [-_S6 / 3, -_S2 / 3, -1 / 3]]],
    np.float32)


# ---------------------------------------------------------------------------
# Float64 reference, written from the definitions one anchor at a time.



def _same_sample_or_label(i, j, labels, mask):
  """Whether sample `j` is a positive candidate for sample `i`."""
  if i == j:
    return True
  if mask is not None:
    return bool(np.asarray(mask)[i, j] != 0)
  if labels is None:
    return False
  labels = np.asarray(labels)
  if labels.ndim == 2 and labels.shape[1] > 1:  # Multi-hot.
    return bool(np.any((labels[i] != 0) & (labels[j] != 0)))
  labels = labels.reshape(-1)
  return bool(labels[i] == labels[j])


def reference_supcon(features, labels=None, mask=None, temperature=0.1,
                     contrast_mode="all", summation="out", denominator="all",
                     positives_cap=None, scale_by_temperature=True):
  """Per-sample loss and validity, float64, explicit loops.

  Args:
    features: `[batch, views, dim]` array.
    labels: `[batch]` ids, `[batch, classes]` multi-hot, or None.
    mask: `[batch, batch]` explicit positives, or None.
    temperature, contrast_mode, summation, denominator, positives_cap,
      scale_by_temperature: as in `losses.supcon_loss`.

  Returns:
    `([batch] float64 loss, [batch] bool valid)`.
  """
  feats = np.asarray(features, np.float64)
  batch, views, _ = feats.shape
  loss = np.zeros(batch)
  valid = np.zeros(batch, bool)
  for i in range(batch):
    partners = [j for j in range(batch)
                if j != i and _same_sample_or_label(i, j, labels, mask)]
    kept = (partners if positives_cap is None
            else partners[:positives_cap // views])
    anchor_losses = []
    for v in ([0] if contrast_mode == "one" else range(views)):
      positives, negatives = [], []
      for j in range(batch):
        for w in range(views):
          if (j, w) == (i, v):
            continue
          logit = float(feats[i, v] @ feats[j, w]) / temperature
          if j == i or j in kept:
            positives.append(logit)
          elif j not in partners:  # Capped-away positives go nowhere.
            negatives.append(logit)
      anchor_loss = conftest.reference_anchor_loss(
          positives, negatives, denominator=denominator, summation=summation,
          temperature=temperature, scale_by_temperature=scale_by_temperature)
      if anchor_loss is not None:
        anchor_losses.append(anchor_loss)
    if anchor_losses:
      loss[i] = np.mean(anchor_losses)
      valid[i] = True
  return loss, valid


def _normalised(rng, shape, dtype=np.float32):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)


def _np(x):
  return np.asarray(x)


# ---------------------------------------------------------------------------
# 1. Hand-checked values of the official implementation.

OFFICIAL_CASES = [
    # (summation, denominator, cap, labels, expected)
    ("out", "all", None, None, [1.6755852, 1.7973773, 1.58471]),
    ("out", "one_positive", None, None, [1.1782627, 1.3435497, 1.58471]),
    ("out", "only_negatives", None, None,
     [0.79652834, 1.0154991, 1.3529458]),
    ("out", "all", 4, None, [1.6755852, 1.7973773, 1.58471]),
    ("out", "all", 2, [0, 0, 0], [1.1385298, 1.1824025, 1.1557417]),
    ("out", "all", 0, None, [1.3769293, 1.0785717, 1.58471]),
    ("in", "all", None, None, [1.6356678, 1.7135872, 1.58471]),
    ("in", "one_positive", None, None, [1.1571673, 1.2941568, 1.58471]),
    ("in", "only_negatives", None, None, [0.756611, 0.93170905, 1.3529458]),
    ("in", "all", 4, None, [1.6356678, 1.7135872, 1.58471]),
    ("in", "all", 2, [0, 0, 0], [1.0986123] * 3),
    ("in", "all", 0, None, [1.3769293, 1.0785717, 1.58471]),
]


@pytest.mark.parametrize("summation,denominator,cap,labels,expected",
                         OFFICIAL_CASES)
def test_official_reference_values(summation, denominator, cap, labels,
                                   expected):
  labels = OFFICIAL_LABELS if labels is None else np.array(labels)
  kwargs = dict(temperature=1.0, summation=summation, denominator=denominator,
                positives_cap=cap, scale_by_temperature=True)
  got = losses.supcon_loss(OFFICIAL_FEATURES, labels, **kwargs)
  assert got.dtype == tf.float32
  assert tuple(got.shape) == (3,)
  np.testing.assert_allclose(_np(got), expected, rtol=0, atol=1e-5)
  # The float64 reference of this file agrees with the official numbers too.
  ref, _ = reference_supcon(OFFICIAL_FEATURES, labels, **kwargs)
  np.testing.assert_allclose(ref, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("labels", [None, np.eye(2)], ids=["simclr", "eye"])
def test_tetrahedron_loss_is_ln3(labels):
  got = losses.supcon_loss(TETRAHEDRON, labels, temperature=1.0)
  np.testing.assert_allclose(_np(got), [LN3, LN3], atol=1e-5)


def test_tetrahedron_loss_scales_with_temperature():
  scaled = losses.supcon_loss(TETRAHEDRON, temperature=0.1)
  np.testing.assert_allclose(np.mean(_np(scaled)), 0.1 * LN3, atol=1e-5)
  unscaled = losses.supcon_loss(TETRAHEDRON, temperature=0.1,
                                scale_by_temperature=False)
  np.testing.assert_allclose(np.mean(_np(unscaled)), LN3, atol=1e-5)


def test_contrast_mode_one_uses_first_view_only():
  feats = np.array([[[0, 0, 1], [0, 1, 0]], [[1, 0, 0], [0, -1, 0]]],
                   np.float32)
  one = losses.supcon_loss(feats, temperature=1.0, contrast_mode="one")
  np.testing.assert_allclose(np.mean(_np(one)), LN3, atol=1e-5)
  every = losses.supcon_loss(feats, temperature=1.0, contrast_mode="all")
  assert abs(float(np.mean(_np(every))) - LN3) > 1e-2


def test_one_hot_features_three_samples():
  feats = np.array([[[0, 0, 1], [0, 0, 1]], [[0, 1, 0], [0, 1, 0]],
                    [[1, 0, 0], [1, 0, 0]]], np.float32)
  got = losses.supcon_loss(feats, [0, 0, 1], temperature=1.0)
  np.testing.assert_allclose(_np(got), [1.57149910, 1.57149910, 0.90483244],
                             atol=1e-5)


# ---------------------------------------------------------------------------
# 2. Random inputs against the float64 reference.

LABEL_KINDS = ("int", "multi_hot", "mask", "none")
CAP_KINDS = ("none", "zero", "views", "two_views")
RANDOM_CASES = list(itertools.product(LABEL_KINDS, losses.CONTRAST_MODES,
                                      losses.SUMMATIONS, losses.DENOMINATORS,
                                      CAP_KINDS))


def _random_case(index, label_kind, cap_kind):
  """Features, labels/mask and cap for one reference case."""
  rng = np.random.default_rng(1000 + index)
  batch = int(rng.choice([1, 2, 7, 16]))
  views = int(rng.integers(1, 5))
  classes = int(rng.choice([2, 3, 10, 100]))
  temperature = float(rng.uniform(0.07, 1.0))
  features = _normalised(rng, (batch, views, int(rng.integers(2, 9))))
  labels = mask = None
  if label_kind == "int":
    dtype = rng.choice([np.int32, np.int64, np.float32])
    labels = rng.integers(0, classes, batch).astype(dtype)
  elif label_kind == "multi_hot":
    # Sparse enough that some samples share nothing and some have no label.
    labels = (rng.random((batch, min(classes, 5))) < 0.3).astype(np.float32)
  elif label_kind == "mask":
    # Asymmetric, any nonzero value, random diagonal (ignored).
    mask = ((rng.random((batch, batch)) < 0.3) *
            rng.choice([1.0, 2.5], (batch, batch))).astype(np.float32)
  cap = {"none": None, "zero": 0, "views": views,
         "two_views": 2 * views}[cap_kind]
  return features, labels, mask, temperature, cap


@pytest.mark.parametrize("index,case", list(enumerate(RANDOM_CASES)),
                         ids=["-".join(c) for c in RANDOM_CASES])
def test_matches_reference_on_random_inputs(index, case):
  label_kind, contrast_mode, summation, denominator, cap_kind = case
  features, labels, mask, temperature, cap = _random_case(
      index, label_kind, cap_kind)
  kwargs = dict(temperature=temperature, contrast_mode=contrast_mode,
                summation=summation, denominator=denominator,
                positives_cap=cap)
  want, want_valid = reference_supcon(features, labels, mask, **kwargs)
  got, got_valid = losses.supcon_terms(features, labels, mask=mask, **kwargs)
  np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(_np(got_valid), want_valid)


def test_random_cases_cover_every_size():
  seen = set()
  for index, (label_kind, *_, cap_kind) in enumerate(RANDOM_CASES):
    features = _random_case(index, label_kind, cap_kind)[0]
    seen.add(features.shape[:2])
  assert {b for b, _ in seen} == {1, 2, 7, 16}
  assert {v for _, v in seen} == {1, 2, 3, 4}


# ---------------------------------------------------------------------------
# 3. Gradients.


@pytest.mark.parametrize("summation", losses.SUMMATIONS)
def test_gradient_matches_finite_differences(summation):
  features = _normalised(np.random.default_rng(3), (3, 2, 4))
  labels = tf.constant([0, 0, 1])

  def loss_fn(x):
    return losses.supcon_loss(x, labels, temperature=0.5, summation=summation)

  theoretical, numerical = tf.test.compute_gradient(
      loss_fn, [tf.constant(features)])
  np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-3)
  assert np.abs(theoretical[0]).max() > 1e-2  # Not trivially zero.


@pytest.mark.parametrize("summation,denominator,cap", [
    ("out", "all", None), ("in", "all", None), ("out", "one_positive", None),
    ("in", "only_negatives", None), ("out", "all", 2), ("in", "all", 0)])
def test_gradient_matches_float64_reference(summation, denominator, cap):
  rng = np.random.default_rng(4)
  features = _normalised(rng, (4, 2, 3)).astype(np.float64)
  labels = np.array([0, 1, 0, 0])
  kwargs = dict(temperature=0.5, summation=summation, denominator=denominator,
                positives_cap=cap)
  weights = rng.normal(size=4)  # A random projection of the per-sample loss.
  x = tf.Variable(features.astype(np.float32))
  with tf.GradientTape() as tape:
    value = tf.reduce_sum(losses.supcon_loss(x, labels, **kwargs) * weights)
  got = _np(tape.gradient(value, x))
  want = np.zeros_like(features)
  eps = 1e-6
  for idx in np.ndindex(features.shape):
    up, down = features.copy(), features.copy()
    up[idx] += eps
    down[idx] -= eps
    want[idx] = (reference_supcon(up, labels, **kwargs)[0] @ weights -
                 reference_supcon(down, labels, **kwargs)[0] @ weights) / (
                     2 * eps)
  np.testing.assert_allclose(got, want, atol=1e-4)


# ---------------------------------------------------------------------------
# 4. Invariances.


def _invariance_inputs(seed=5, batch=8, views=3):
  rng = np.random.default_rng(seed)
  return rng, _normalised(rng, (batch, views, 5)), rng.integers(0, 3, batch)


@pytest.mark.parametrize("summation,denominator", [
    ("out", "all"), ("in", "one_positive"), ("out", "only_negatives")])
def test_batch_permutation_permutes_losses(summation, denominator):
  rng, features, labels = _invariance_inputs()
  perm = rng.permutation(len(labels))
  kwargs = dict(temperature=0.2, summation=summation, denominator=denominator)
  base = _np(losses.supcon_loss(features, labels, **kwargs))
  permuted = _np(losses.supcon_loss(features[perm], labels[perm], **kwargs))
  np.testing.assert_allclose(permuted, base[perm], rtol=1e-5, atol=1e-6)


def test_relabelling_classes_changes_nothing():
  rng, features, labels = _invariance_inputs()
  relabel = np.array([7, 0, 2])[labels]  # Injective map of class ids.
  np.testing.assert_allclose(
      _np(losses.supcon_loss(features, relabel)),
      _np(losses.supcon_loss(features, labels)), rtol=1e-6)


def test_simclr_equals_supcon_with_distinct_labels():
  _, features, labels = _invariance_inputs()
  np.testing.assert_allclose(
      _np(losses.supcon_loss(features, None)),
      _np(losses.supcon_loss(features, np.arange(len(labels)) * 3)),
      rtol=1e-6)


def test_one_hot_multi_hot_equals_int_labels():
  _, features, labels = _invariance_inputs()
  np.testing.assert_allclose(
      _np(losses.supcon_loss(features, np.eye(4)[labels])),
      _np(losses.supcon_loss(features, labels)), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.bool_, np.int32, np.float32])
def test_mask_from_labels_equals_labels(dtype):
  _, features, labels = _invariance_inputs()
  mask = (labels[:, None] == labels[None, :]).astype(dtype)
  np.testing.assert_allclose(
      _np(losses.supcon_loss(features, mask=mask, summation="in")),
      _np(losses.supcon_loss(features, labels, summation="in")), rtol=1e-6)


def test_mask_diagonal_is_ignored():
  _, features, labels = _invariance_inputs()
  mask = labels[:, None] == labels[None, :]
  np.fill_diagonal(mask, False)
  np.testing.assert_allclose(
      _np(losses.supcon_loss(features, mask=mask)),
      _np(losses.supcon_loss(features, labels)), rtol=1e-6)


def test_gather_is_a_no_op_on_one_replica():
  _, features, labels = _invariance_inputs()
  np.testing.assert_allclose(
      _np(losses.supcon_loss(features, labels, gather=True)),
      _np(losses.supcon_loss(features, labels)), rtol=1e-6)


# ---------------------------------------------------------------------------
# 5. Anchors without a positive.

SINGLETON_LABELS = np.array([0, 0, 1, 2, 2])  # Sample 2 is alone.


def _finite(x):
  return bool(np.all(np.isfinite(_np(x))))


@pytest.mark.parametrize("summation,denominator", list(itertools.product(
    losses.SUMMATIONS, losses.DENOMINATORS)))
def test_singleton_sample_gets_zero_loss_and_gradient(summation, denominator):
  features = tf.constant(_normalised(np.random.default_rng(6), (5, 1, 4)))
  kwargs = dict(temperature=0.1, summation=summation, denominator=denominator)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(features)
    loss, valid = losses.supcon_terms(features, SINGLETON_LABELS, **kwargs)
    total = tf.reduce_sum(loss)
    singleton = loss[2]
  assert float(loss[2]) == 0.0
  assert _finite(loss)
  np.testing.assert_array_equal(_np(valid), [True, True, False, True, True])
  assert np.all(_np(loss)[[0, 1, 3, 4]] != 0)
  grad = tape.gradient(total, features)
  assert _finite(grad)
  np.testing.assert_array_equal(_np(tape.gradient(singleton, features)), 0.0)
  np.testing.assert_allclose(
      _np(loss), reference_supcon(_np(features), SINGLETON_LABELS,
                                  **kwargs)[0], rtol=1e-5, atol=1e-6)


def test_keras_loss_averages_over_valid_samples_only():
  features = _normalised(np.random.default_rng(7), (5, 1, 4))
  per_sample = _np(losses.supcon_loss(features, SINGLETON_LABELS))
  got = float(losses.SupConLoss()(SINGLETON_LABELS, features))
  np.testing.assert_allclose(got, per_sample[[0, 1, 3, 4]].mean(), rtol=1e-5)
  assert got > per_sample.mean()  # The plain mean would be dragged down.


def test_keras_loss_with_no_valid_sample_is_zero():
  features = tf.constant(_normalised(np.random.default_rng(8), (4, 1, 4)))
  labels = np.arange(4)
  with tf.GradientTape() as tape:
    tape.watch(features)
    value = losses.SupConLoss()(labels, features)
  assert float(value) == 0.0
  grad = tape.gradient(value, features)
  assert grad is None or _finite(grad)


@pytest.mark.parametrize("summation", losses.SUMMATIONS)
def test_only_negatives_without_negatives_is_finite(summation):
  features = tf.constant(_normalised(np.random.default_rng(9), (4, 2, 4)))
  with tf.GradientTape() as tape:
    tape.watch(features)
    loss, valid = losses.supcon_terms(features, [1, 1, 1, 1],
                                      summation=summation,
                                      denominator="only_negatives")
    total = tf.reduce_sum(loss)
  np.testing.assert_array_equal(_np(loss), 0.0)
  np.testing.assert_array_equal(_np(valid), False)
  assert _finite(tape.gradient(total, features))


def test_explicit_mask_row_without_positive_is_invalid():
  features = _normalised(np.random.default_rng(10), (3, 1, 4))
  mask = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]])
  loss, valid = losses.supcon_terms(features, mask=mask)
  np.testing.assert_array_equal(_np(valid), [True, True, False])
  assert float(loss[2]) == 0.0 and _finite(loss)


# ---------------------------------------------------------------------------
# 6. Precision and stability.


@pytest.mark.parametrize("dtype,atol", [(tf.bfloat16, 3e-2),
                                        (tf.float16, 3e-3)])
def test_low_precision_inputs_give_float32(dtype, atol):
  features = _normalised(np.random.default_rng(11), (6, 2, 16))
  labels = np.array([0, 1, 2, 0, 1, 2])
  low = tf.cast(features, dtype)
  got = losses.supcon_loss(low, labels, temperature=0.2)
  assert got.dtype == tf.float32
  # Exactly the float32 loss of the rounded inputs ...
  rounded = _np(tf.cast(low, tf.float32))
  np.testing.assert_allclose(
      _np(got), _np(losses.supcon_loss(rounded, labels, temperature=0.2)),
      rtol=1e-6)
  # ... and close to the float32 loss of the originals.
  np.testing.assert_allclose(
      _np(got), _np(losses.supcon_loss(features, labels, temperature=0.2)),
      atol=atol)


@pytest.mark.parametrize("summation,denominator", list(itertools.product(
    losses.SUMMATIONS, losses.DENOMINATORS)))
def test_small_temperature_unnormalised_inputs_are_finite(summation,
                                                          denominator):
  rng = np.random.default_rng(12)
  features = tf.constant(10.0 * _normalised(rng, (6, 2, 8)))
  labels = np.array([0, 0, 1, 1, 2, 2])
  kwargs = dict(temperature=0.01, summation=summation,
                denominator=denominator)
  with tf.GradientTape() as tape:
    tape.watch(features)
    loss = losses.supcon_loss(features, labels, **kwargs)
    total = tf.reduce_sum(loss)
  assert _finite(loss)
  assert _finite(tape.gradient(total, features))
  want, _ = reference_supcon(_np(features), labels, **kwargs)
  np.testing.assert_allclose(_np(loss), want, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------
# 7. Bad inputs.

_F = np.zeros((4, 2, 3), np.float32)

BAD_INPUTS = [
    ("features_rank2", dict(features=np.zeros((4, 3), np.float32)),
     "(4, 3)"),
    ("features_rank4", dict(features=np.zeros((4, 2, 3, 1), np.float32)),
     "(4, 2, 3, 1)"),
    ("zero_views", dict(features=np.zeros((4, 0, 8), np.float32)),
     "(4, 0, 8)"),
    ("integer_features", dict(features=np.zeros((4, 2, 3), np.int32)),
     "int32"),
    ("labels_batch", dict(labels=np.zeros(3, np.int32)), "(3,)"),
    ("labels_rank3", dict(labels=np.zeros((4, 1, 1), np.int32)),
     "(4, 1, 1)"),
    ("negative_labels", dict(labels=np.array([0, -1, 1, 2])), "-1"),
    ("fractional_labels", dict(labels=np.array([0.0, 1.5, 1.0, 2.0],
                                               np.float32)), "1.5"),
    ("multi_hot_two", dict(labels=np.array([[1, 0], [0, 2], [1, 1], [0, 0]])),
     "[0, 2]"),
    ("mask_shape", dict(mask=np.ones((3, 3))), "(3, 3)"),
    ("mask_rank", dict(mask=np.ones(4)), "(4,)"),
    ("labels_and_mask", dict(labels=np.zeros(4), mask=np.ones((4, 4))),
     "not both"),
    ("temperature_zero", dict(temperature=0), "0"),
    ("temperature_negative", dict(temperature=-1.0), "-1.0"),
    ("contrast_mode", dict(contrast_mode="bogus"), "'bogus'"),
    ("summation", dict(summation="outside"), "'outside'"),
    ("denominator", dict(denominator="negatives"), "'negatives'"),
    ("cap_negative", dict(positives_cap=-2), "positives_cap=-2"),
    ("cap_not_multiple", dict(positives_cap=3), "positives_cap=3"),
]


@pytest.mark.parametrize("kwargs,expected", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_value_error(kwargs, expected):
  kwargs = dict(kwargs)
  features = kwargs.pop("features", _F)
  with pytest.raises(ValueError) as error:
    losses.supcon_loss(features, **kwargs)
  assert expected in str(error.value)


@pytest.mark.parametrize("shape", [(4, 5), (4, 1)])
def test_mask_with_wrong_second_dimension_raises_value_error(shape):
  with pytest.raises(ValueError) as error:
    losses.supcon_loss(_F, mask=np.ones(shape))
  assert str(shape) in str(error.value)


@pytest.mark.parametrize("kwargs", [
    dict(contrast_mode="bogus"), dict(summation="bogus"),
    dict(denominator="bogus"), dict(temperature=0.0)])
@pytest.mark.parametrize("cls", [losses.SupConLoss, losses.SimCLRLoss])
def test_keras_loss_rejects_bad_options_at_construction(cls, kwargs):
  with pytest.raises(ValueError, match="bogus|temperature"):
    cls(**kwargs)


# ---------------------------------------------------------------------------
# 8. Keras wrappers.


def _keras_inputs(seed=13, batch=6, views=2):
  rng = np.random.default_rng(seed)
  features = _normalised(rng, (batch, views, 8))
  labels = np.array([0, 1, 2, 0, 1, 2])[:batch]
  return rng, features, labels


def test_supcon_keras_loss_is_mean_of_function():
  _, features, labels = _keras_inputs()
  want = np.mean(_np(losses.supcon_loss(features, labels)))
  got = losses.SupConLoss()(labels, features)
  assert got.dtype == "float32"
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


@pytest.mark.parametrize("labels_kind", ["float32", "column", "int64"])
def test_supcon_keras_loss_accepts_label_layouts(labels_kind):
  _, features, labels = _keras_inputs()
  y_true = {"float32": labels.astype(np.float32),
            "column": labels[:, None].astype(np.float32),
            "int64": labels.astype(np.int64)}[labels_kind]
  np.testing.assert_allclose(
      float(losses.SupConLoss()(y_true, features)),
      float(losses.SupConLoss()(labels.astype(np.int32), features)),
      rtol=1e-6)


def test_supcon_keras_loss_passes_options():
  _, features, labels = _keras_inputs()
  kwargs = dict(temperature=0.3, contrast_mode="one", summation="in",
                denominator="one_positive", positives_cap=2,
                scale_by_temperature=False)
  want = np.mean(_np(losses.supcon_loss(features, labels, **kwargs)))
  np.testing.assert_allclose(
      float(losses.SupConLoss(**kwargs)(labels, features)), want, rtol=1e-6)


def test_supcon_keras_loss_sample_weight_and_reductions():
  rng, features, labels = _keras_inputs()
  per_sample = _np(losses.supcon_loss(features, labels))
  weights = rng.uniform(0.1, 2.0, len(labels)).astype(np.float32)
  np.testing.assert_allclose(
      float(losses.SupConLoss()(labels, features, sample_weight=weights)),
      np.sum(per_sample * weights) / len(labels), rtol=1e-5)
  np.testing.assert_allclose(
      float(losses.SupConLoss(reduction="mean_with_sample_weight")(
          labels, features, sample_weight=weights)),
      np.sum(per_sample * weights) / np.sum(weights), rtol=1e-5)
  np.testing.assert_allclose(
      float(losses.SupConLoss(reduction="sum")(labels, features)),
      per_sample.sum(), rtol=1e-5)
  none = losses.SupConLoss(reduction="none")(labels, features)
  assert tuple(none.shape) == (len(labels),)
  np.testing.assert_allclose(_np(none), per_sample, rtol=1e-6)


def test_supcon_keras_loss_masks_invalid_samples_with_weights():
  rng = np.random.default_rng(14)
  features = _normalised(rng, (5, 1, 4))
  weights = rng.uniform(0.5, 2.0, 5).astype(np.float32)
  per_sample = _np(losses.supcon_loss(features, SINGLETON_LABELS))
  valid = np.array([True, True, False, True, True])
  got = losses.SupConLoss()(SINGLETON_LABELS, features, sample_weight=weights)
  np.testing.assert_allclose(
      float(got), np.sum((per_sample * weights)[valid]) / valid.sum(),
      rtol=1e-5)
  got = losses.SupConLoss(reduction="mean_with_sample_weight")(
      SINGLETON_LABELS, features, sample_weight=weights)
  np.testing.assert_allclose(
      float(got), np.sum((per_sample * weights)[valid]) /
      np.sum(weights[valid]), rtol=1e-5)


SUPCON_CONFIG = dict(temperature=0.3, contrast_mode="one", summation="in",
                     denominator="only_negatives", positives_cap=4,
                     scale_by_temperature=False, reduction="sum",
                     name="my_loss")


@pytest.mark.parametrize("cls,kwargs", [
    (losses.SupConLoss, SUPCON_CONFIG),
    (losses.SimCLRLoss, dict(temperature=0.7, summation="in",
                             reduction="none", name="sim")),
    (npairs_lib.NPairsLoss, dict(temperature=0.4, reduction="sum", name="np")),
])
def test_config_round_trip(cls, kwargs):
  loss = cls(**kwargs)
  config = loss.get_config()
  for key, value in kwargs.items():
    assert config[key] == value, key
  for restored in (cls.from_config(config),
                   keras.losses.deserialize(keras.losses.serialize(loss))):
    assert type(restored) is cls
    assert restored.get_config() == config


def test_deserialized_loss_computes_same_value():
  _, features, labels = _keras_inputs()
  loss = losses.SupConLoss(**SUPCON_CONFIG)
  restored = keras.losses.deserialize(keras.losses.serialize(loss))
  np.testing.assert_allclose(float(restored(labels, features)),
                             float(loss(labels, features)), rtol=1e-6)


def test_simclr_loss_ignores_y_true():
  _, features, labels = _keras_inputs()
  want = np.mean(_np(losses.supcon_loss(features, None, temperature=0.5)))
  simclr = losses.SimCLRLoss()
  for y_true in (labels, np.zeros_like(labels), np.full(6, -3.7)):
    np.testing.assert_allclose(float(simclr(y_true, features)), want,
                               rtol=1e-6)
  assert abs(float(losses.SupConLoss(temperature=0.5)(labels, features)) -
             want) > 1e-3


def test_model_fit_with_supcon_loss():
  rng = np.random.default_rng(15)
  x = rng.normal(size=(16, 4)).astype(np.float32)
  y = rng.integers(0, 3, 16)
  model = keras.Sequential([
      keras.Input((4,)), keras.layers.Dense(6), keras.layers.Reshape((2, 3)),
      keras.layers.UnitNormalization()])
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=losses.SupConLoss(temperature=0.5))
  before = model.evaluate(x, y, batch_size=16, verbose=0)
  history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
  assert all(np.isfinite(history.history["loss"]))
  np.testing.assert_allclose(history.history["loss"][0], before, rtol=1e-5)
  assert history.history["loss"][-1] < before


# ---------------------------------------------------------------------------
# 9. N-pairs baseline: tests/npairs_test.py.


# ---------------------------------------------------------------------------
# 10. Graph mode.


def test_tf_function_equals_eager():
  _, features, labels = _keras_inputs()

  @tf.function(input_signature=[
      tf.TensorSpec([None, 2, 8], tf.float32), tf.TensorSpec([None], tf.int32)])
  def graph_loss(x, y):
    return losses.supcon_loss(x, y, summation="in", positives_cap=2)

  eager = _np(losses.supcon_loss(features, labels, summation="in",
                                 positives_cap=2))
  np.testing.assert_allclose(_np(graph_loss(features, labels)), eager,
                             rtol=1e-6)
  # Same trace, another batch size.
  np.testing.assert_allclose(
      _np(graph_loss(features[:4], labels[:4])),
      _np(losses.supcon_loss(features[:4], labels[:4], summation="in",
                             positives_cap=2)), rtol=1e-6)


def test_keras_loss_in_tf_function_equals_eager():
  _, features, labels = _keras_inputs()
  loss = losses.SupConLoss()
  graph = tf.function(loss)(labels.astype(np.float32), features)
  np.testing.assert_allclose(float(graph), float(loss(labels, features)),
                             rtol=1e-6)


@pytest.mark.parametrize("labels", [[0.0, 1.5, 1.0, 2.0],
                                    [0.0, -1.0, 1.0, 2.0]],
                         ids=["fractional", "negative"])
def test_bad_labels_in_tf_function_fail_at_run_time(labels):

  @tf.function
  def graph_loss(x, y):
    return losses.supcon_loss(x, y)

  features = _normalised(np.random.default_rng(21), (4, 2, 3))
  good = graph_loss(features, tf.constant([0.0, 1.0, 1.0, 2.0]))
  assert _finite(good)
  with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
    graph_loss(features, tf.constant(labels))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
