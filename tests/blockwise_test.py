"""Tests for supcon_tf.blockwise: the block path equals the dense path."""

import itertools
import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
import supcon_reference as ref
from supcon_tf import blockwise
from supcon_tf import losses

TOL = 1e-5
SUMMATIONS = ("out", "in")
DENOMINATORS = ("all", "one_positive", "only_negatives")


def _features(batch, views, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, views, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _labels(batch, classes, seed=1):
  return np.random.default_rng(seed).integers(0, classes, batch).astype(
      np.int32)


def _loss_and_grad(features, labels, weights=None, **kwargs):
  """Per-sample loss, valid, and d(sum(weights * loss))/d features."""
  features = tf.convert_to_tensor(features)
  with tf.GradientTape() as tape:
    tape.watch(features)
    loss, valid = losses.supcon_terms(features, labels, **kwargs)
    total = tf.reduce_mean(loss) if weights is None else tf.reduce_sum(
        loss * weights)
  return loss.numpy(), valid.numpy(), tape.gradient(total, features).numpy()


def _assert_same(got, want, context=""):
  for name, g, w in zip(("loss", "valid", "grad"), got, want):
    if name == "valid":
      np.testing.assert_array_equal(g, w, err_msg=f"{name} {context}")
    else:
      np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL,
                                 err_msg=f"{name} {context}")


def _assert_grad_close(got, want, tol=1e-4):
  """Gradients equal up to `tol` relative to the largest entry of `want`."""
  scale = np.abs(want).max()
  assert scale > 0, "a zero gradient cannot tell right from wrong"
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("summation,denominator",
                         list(itertools.product(SUMMATIONS, DENOMINATORS)))
def test_matches_dense_every_mode(summation, denominator):
  batch = 11  # not a multiple of any block below
  rng = np.random.default_rng(7)
  weights = tf.constant(rng.uniform(0.5, 1.5, batch).astype(np.float32))
  cases = [(views, mode, cap, True, i % 2 == 1) for i, (views, mode, cap) in
           enumerate(itertools.product((1, 2, 3), ("all", "one"),
                                       (None, 0, "views")))]
  # SimCLR: each sample its own class.
  cases += [(views, "all", None, False, views == 2) for views in (1, 2, 3)]
  for views, contrast_mode, cap, supervised, weighted in cases:
    cap = views if cap == "views" else cap
    features = _features(batch, views, seed=views)
    labels = _labels(batch, 3) if supervised else None
    kwargs = dict(summation=summation, denominator=denominator,
                  contrast_mode=contrast_mode, positives_cap=cap,
                  temperature=0.1)
    w = weights if weighted else None
    want = _loss_and_grad(features, labels, w, block_size=0, **kwargs)
    got = _loss_and_grad(features, labels, w, block_size=4, **kwargs)
    _assert_same(got, want, f"views={views} {kwargs} labels={supervised} "
                 f"weighted={weighted}")


@pytest.mark.parametrize("contrast_mode,cap,weighted", [
    ("all", None, False), ("all", None, True), ("one", None, True),
    ("all", 2, True)])
def test_every_kernel_matches_dense(contrast_mode, cap, weighted):
  # The default mode has two kernels (fused class sums and the masked one),
  # each with anchors that are the contrast tensor itself or a copy.
  features = tf.constant(_features(9, 2))
  labels = tf.constant(_labels(9, 3))
  weights = tf.constant(np.linspace(0.2, 1.0, 9, dtype=np.float32))
  results = []
  for class_sums, same_tensor in ((True, True), (True, False),
                                  (False, True)):
    with tf.GradientTape() as tape:
      tape.watch(features)
      a = features[:, :1] if contrast_mode == "one" else features
      c = features if same_tensor else tf.identity(features)
      loss, _ = blockwise._terms(
          a, c, labels, offset=0, temperature=0.2, summation="out",
          denominator="all", positives_cap=cap, scale_by_temperature=True,
          block_size=2, class_sums=class_sums)
      total = tf.reduce_sum(loss * weights) if weighted else tf.reduce_sum(
          loss)
    results.append((loss.numpy(), tape.gradient(total, features).numpy()))
  want = _loss_and_grad(features, labels, weights if weighted else None,
                        temperature=0.2, contrast_mode=contrast_mode,
                        positives_cap=cap, block_size=0)
  if not weighted:  # _loss_and_grad takes the mean
    want = (want[0], want[1], want[2] * 9)
  for loss, grad in results:
    np.testing.assert_allclose(loss, want[0], rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grad, want[2], rtol=TOL, atol=TOL)


LABELS = np.array([0, 1, 0, 2, 1, 0, 3])  # Samples 3 and 6: no class mates.


def _fused(x, weights, *, block, **kwargs):
  """Fused kernel, anchors = contrast: loss and d(sum(weights * loss))/dx."""
  features = tf.constant(x, tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(features)
    loss, _ = blockwise._terms(
        features, features, tf.constant(LABELS, tf.int32), offset=0,
        summation="out", denominator="all", positives_cap=None,
        block_size=block, class_sums=True, **kwargs)
    total = tf.reduce_sum(loss * tf.constant(weights, tf.float32))
  return loss.numpy(), tape.gradient(total, features).numpy()


@pytest.mark.parametrize("views,block,scale_by_temperature", [
    (2, 1, True), (2, 3, False), (2, 64, True), (1, 2, True), (3, 4, True)])
def test_fused_kernel_matches_float64_reference(views, block,
                                                scale_by_temperature):
  x = _features(len(LABELS), views, dim=4, seed=views).astype(np.float64)
  weights = np.random.default_rng(block).uniform(0.5, 1.5, len(LABELS))
  kwargs = dict(temperature=0.3, scale_by_temperature=scale_by_temperature)
  loss, grad = _fused(x, weights, block=block, **kwargs)
  want, valid = ref.reference_loss(x, LABELS, **kwargs)
  np.testing.assert_allclose(loss, want, rtol=TOL, atol=1e-6)
  assert valid.all() == (views > 1)  # One view: 3 and 6 have no positive.
  want_grad = ref.numeric_gradient(lambda z: float(np.sum(
      weights * ref.reference_loss(z, LABELS, **kwargs)[0])), x)
  ref.assert_close_to_scale(grad, want_grad)


def test_fused_kernel_takes_negative_and_tiny_weights():
  # Upstream gradients may be negative (a loss subtracted) or tiny: the
  # weighted backward pass scales rows after the softmax.
  x = _features(len(LABELS), 2, dim=4, seed=5).astype(np.float64)
  weights = np.random.default_rng(5).normal(size=len(LABELS))
  weights[::3] *= 1e-30
  kwargs = dict(temperature=0.3, scale_by_temperature=True)
  _, grad = _fused(x, weights, block=3, **kwargs)
  assert np.isfinite(grad).all()
  want_grad = ref.numeric_gradient(lambda z: float(np.sum(
      weights * ref.reference_loss(z, LABELS, **kwargs)[0])), x)
  ref.assert_close_to_scale(grad, want_grad)


def test_fused_kernel_extreme_logits_stay_finite_and_exact():
  # |logits| up to 9 / 0.01 = 900: exp() of them overflows float32.
  x = 3.0 * _features(len(LABELS), 2, dim=4, seed=8).astype(np.float64)
  kwargs = dict(temperature=0.01, scale_by_temperature=False)
  loss, grad = _fused(x, np.ones(len(LABELS)), block=2, **kwargs)
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
  ref.assert_close_to_scale(loss, ref.reference_loss(x, LABELS, **kwargs)[0],
                            tol=1e-5)
  want_grad = ref.numeric_gradient(lambda z: float(np.sum(
      ref.reference_loss(z, LABELS, **kwargs)[0])), x)
  ref.assert_close_to_scale(grad, want_grad, tol=1e-3)


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 8, 64])
def test_block_sizes(block_size):
  features = _features(10, 2, seed=3)
  labels = _labels(10, 4)
  want = _loss_and_grad(features, labels, block_size=0)
  got = _loss_and_grad(features, labels, block_size=block_size)
  _assert_same(got, want, f"block_size={block_size}")


def test_reference_values():
  # Hand-checked values of the official implementation's test.
  features = np.array([[[0.01, 0.02, 0.14], [0.38, 0.61, 0.50]],
                       [[0.86, 0.97, 0.33], [0.26, 0.68, 0.45]],
                       [[0.32, 0.64, 0.28], [0.45, 0.74, 0.73]]], np.float32)
  labels = np.array([0, 0, 1])
  expected = {("out", "all"): [1.6755852, 1.7973773, 1.58471],
              ("out", "one_positive"): [1.1782627, 1.3435497, 1.58471],
              ("out", "only_negatives"): [0.79652834, 1.0154991, 1.3529458],
              ("in", "all"): [1.6356678, 1.7135872, 1.58471]}
  for (summation, denominator), values in expected.items():
    loss = losses.supcon_loss(features, labels, temperature=1.0,
                              summation=summation, denominator=denominator,
                              block_size=2)
    np.testing.assert_allclose(loss, values, rtol=1e-5)


def test_labels_with_large_unsorted_ids():
  features = _features(8, 2, seed=5)
  labels = np.array([10**9, 7, 7, 3, 10**9, 0, 3, 7], np.int64)
  compact = np.unique(labels, return_inverse=True)[1]
  for cap in (None, 2):
    want = _loss_and_grad(features, compact, block_size=0, positives_cap=cap)
    got = _loss_and_grad(features, labels, block_size=3, positives_cap=cap)
    _assert_same(got, want, f"cap={cap}")


def test_anchor_without_positive_is_invalid_and_has_zero_grad():
  features = _features(5, 1)
  labels = np.array([0, 0, 1, 2, 2])  # sample 2 has no positive
  loss, valid, grad = _loss_and_grad(features, labels, block_size=2)
  assert not valid[2] and valid[[0, 1, 3, 4]].all()
  assert loss[2] == 0.0
  want = _loss_and_grad(features, labels, block_size=0)
  _assert_same((loss, valid, grad), want)


@pytest.mark.parametrize("jit_compile,kwargs", [
    (False, dict(positives_cap=2)),  # masked kernel
    (True, dict(positives_cap=2)),
    (True, dict()),  # fused kernel, anchors are the contrast
    (True, dict(contrast_mode="one")),  # fused kernel
])
def test_tf_function_and_xla(jit_compile, kwargs):
  features = tf.constant(_features(13, 2, dim=16))
  labels = tf.constant(_labels(13, 3))

  @tf.function(jit_compile=jit_compile)
  def step(x, y, weights):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = losses.supcon_loss(x, y, block_size=4, **kwargs)
      total = tf.reduce_sum(loss * weights)
    return loss, tape.gradient(total, x)

  # Equal weights take the fused gradient, unequal ones the recomputation.
  for weights in (np.full(13, 1 / 13, np.float32),
                  np.linspace(0.5, 2.0, 13, dtype=np.float32)):
    loss, grad = step(features, labels, tf.constant(weights))
    want = _loss_and_grad(features, labels, weights, block_size=0, **kwargs)
    np.testing.assert_allclose(loss, want[0], rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grad, want[2], rtol=TOL, atol=TOL)


@pytest.fixture
def block_calls(monkeypatch):
  """Block sizes passed to `blockwise_terms`, with a 20 x 20 threshold."""
  calls = []
  original = blockwise.blockwise_terms

  def spy(*args, **kwargs):
    calls.append(kwargs["block_size"])
    return original(*args, **kwargs)

  monkeypatch.setattr(blockwise, "blockwise_terms", spy)
  monkeypatch.setattr(blockwise, "AUTO_MIN_LOGITS", 20 * 20)
  return calls


def test_unknown_batch_dispatches_at_run_time(block_calls):
  calls = block_calls

  @tf.function(input_signature=[tf.TensorSpec([None, 2, 8]),
                                tf.TensorSpec([None], tf.int32)])
  def step(x, y):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_mean(losses.supcon_loss(x, y))
    return loss, tape.gradient(loss, x)

  for batch in (6, 15):  # 12 and 30 rows: below and above the threshold
    features, labels = _features(batch, 2), _labels(batch, 3)
    loss, grad = step(features, labels)
    want = _loss_and_grad(features, labels, block_size=0)
    np.testing.assert_allclose(loss, want[0].mean(), rtol=TOL)
    np.testing.assert_allclose(grad, want[2], rtol=TOL, atol=TOL)
  assert calls == [None]  # traced once, as the cond's block branch


def test_automatic_dispatch(block_calls):
  calls = block_calls
  small, large = _features(6, 2), _features(15, 2)
  losses.supcon_loss(small, _labels(6, 3))
  assert calls == []
  losses.supcon_loss(large, _labels(15, 3))
  losses.supcon_loss(large)  # SimCLR
  assert calls == [None, None]
  multi_hot = np.eye(3, dtype=np.int32)[_labels(15, 3)]
  losses.supcon_loss(large, multi_hot)
  losses.supcon_loss(large, mask=np.eye(15))
  losses.supcon_loss(large, _labels(15, 3), block_size=0)
  assert calls == [None, None]
  losses.supcon_loss(small, _labels(6, 3), block_size=5)
  assert calls == [None, None, 5]


def test_bfloat16_input():
  features = _features(9, 2)
  labels = _labels(9, 3)
  bf16 = tf.cast(features, tf.bfloat16)
  got = _loss_and_grad(bf16, labels, block_size=4)
  want = _loss_and_grad(tf.cast(bf16, tf.float32), labels, block_size=0)
  assert got[2].dtype == tf.bfloat16.as_numpy_dtype
  np.testing.assert_allclose(got[0], want[0], rtol=TOL, atol=TOL)
  np.testing.assert_allclose(got[2].astype(np.float32),
                             want[2].astype(tf.bfloat16.as_numpy_dtype).astype(
                                 np.float32), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("contrast_mode,supervised,weighted", [
    ("all", True, False), ("one", True, True), ("all", False, True)])
def test_mirrored_gather_matches_full_batch(contrast_mode, supervised,
                                            weighted):
  strategy = conftest.make_mirrored(2)
  batch = 10
  features = _features(batch, 2, seed=11)
  labels = _labels(batch, 3)
  weights = np.linspace(0.5, 1.5, batch).astype(np.float32)

  def shard(x):
    half = batch // 2
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * half:
                                  (ctx.replica_id_in_sync_group + 1) * half]))

  @tf.function
  def step(x, y, w):
    def replica_fn(x, y, w):
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = losses.supcon_loss(
            x, y if supervised else None, contrast_mode=contrast_mode,
            gather=True, block_size=3)
        total = tf.reduce_sum(loss * (w if weighted else 1.0)) / batch
      return total, tape.gradient(total, x)
    return strategy.run(replica_fn, args=(x, y, w))

  total, grads = step(shard(features), shard(labels), shard(weights))
  total = sum(t.numpy() for t in strategy.experimental_local_results(total))
  grads = np.concatenate([g.numpy() for g in
                          strategy.experimental_local_results(grads)])

  x = tf.constant(features)
  with tf.GradientTape() as tape:
    tape.watch(x)
    loss = losses.supcon_loss(x, labels if supervised else None,
                              contrast_mode=contrast_mode, block_size=0)
    want = tf.reduce_sum(loss * (weights if weighted else 1.0)) / batch
  np.testing.assert_allclose(total, want.numpy(), rtol=TOL, atol=TOL)
  np.testing.assert_allclose(grads, tape.gradient(want, x).numpy(), rtol=TOL,
                             atol=TOL)


def _graph_shapes(graph):
  """Static shapes of every op output, descending into loops and conds."""
  shapes = []
  for op in graph.get_operations():
    shapes.extend(out.shape for out in op.outputs)
    for attr in ("_body_graph", "_cond_graph", "_true_graph", "_false_graph"):
      if hasattr(op, attr):
        shapes.extend(_graph_shapes(getattr(op, attr)))
    for branch in getattr(op, "_branch_graphs", None) or ():
      shapes.extend(_graph_shapes(branch))
  return shapes


def _largest_tensor(block_size, rows):
  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_mean(losses.supcon_loss(x, y, block_size=block_size))
    return tape.gradient(loss, x)

  graph = step.get_concrete_function(
      tf.TensorSpec([rows // 2, 2, 128]),
      tf.TensorSpec([rows // 2], tf.int32)).graph
  sizes = [s.num_elements() for s in _graph_shapes(graph)
           if s.is_fully_defined()]
  return max(sizes)


def test_graph_holds_no_rows_squared_tensor():
  rows = 8192
  assert _largest_tensor(0, rows) >= rows * rows  # the check can see it
  largest = _largest_tensor(None, rows)
  assert largest < rows * rows // 8, largest
  # Larger than any [rows, dim] tensor: the loop bodies were inspected.
  assert largest > rows * 128, largest


# Automatic (1,024-row) and 256-row blocks.
@pytest.mark.parametrize("block_size", [None, 256])
def test_4096_rows_completes_and_matches_dense(block_size):
  features = _features(2048, 2, dim=128, seed=2)
  labels = _labels(2048, 10)
  want = _loss_and_grad(features, labels, block_size=0)
  got = _loss_and_grad(features, labels, block_size=block_size)
  _assert_same(got[:2], want[:2])
  # The mean over 2,048 samples makes most gradient entries smaller than
  # TOL, so an absolute TOL would pass a wrong gradient: scale it.
  _assert_grad_close(got[2], want[2])


def test_keras_loss_config_round_trip():
  loss = losses.SupConLoss(block_size=64)
  restored = losses.SupConLoss.from_config(loss.get_config())
  assert restored.block_size == 64
  features, labels = _features(6, 2), _labels(6, 3)
  np.testing.assert_allclose(restored(labels, features),
                             losses.SupConLoss(block_size=0)(labels, features),
                             rtol=TOL)


@pytest.mark.parametrize("block_size", [-1, 2.5, True, "64"])
def test_bad_block_size(block_size):
  with pytest.raises(ValueError, match="block_size"):
    losses.supcon_loss(_features(4, 2), _labels(4, 2), block_size=block_size)
  with pytest.raises(ValueError, match="block_size"):
    losses.SupConLoss(block_size=block_size)


def test_block_size_needs_class_ids():
  with pytest.raises(ValueError, match="multi-hot"):
    losses.supcon_loss(_features(4, 2), np.eye(2)[[0, 1, 0, 1]],
                       block_size=8)
  with pytest.raises(ValueError, match="mask"):
    losses.supcon_loss(_features(4, 2), mask=np.eye(4), block_size=8)


def test_auto_block_size():
  assert blockwise.auto_block_size(None) == blockwise.DEFAULT_BLOCK_ROWS
  assert blockwise.auto_block_size(16384) * 16384 <= blockwise.BLOCK_LOGITS
  assert blockwise.auto_block_size(10) == 2048
  assert blockwise.auto_block_size(10**7) == 32


@pytest.mark.slow
@pytest.mark.parametrize("supervised", [True, False])
def test_8192_rows_matches_dense(supervised):
  # Automatic blocks (the fused kernel); the dense reference needs about
  # 5 GiB.
  features = _features(4096, 2, dim=128, seed=4)
  labels = _labels(4096, 100) if supervised else None
  want = _loss_and_grad(features, labels, block_size=0)
  got = _loss_and_grad(features, labels, block_size=None)
  _assert_same(got, want)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
