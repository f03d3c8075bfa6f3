"""Tests of SupConModel: `model.fit` trains SupCon like the custom loop.

The central property: one `fit` step gives the weights of one step of
`train_lib.Trainer`, and under a MirroredStrategy the gathered loss gives the
weights and the loss of the same global batch on one device.
"""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import config as config_lib
from supcon_tf import distributed
from supcon_tf import keras_model
from supcon_tf import losses
from supcon_tf import models
from supcon_tf import train_lib

IMAGE = 8
BATCH = 8
VIEWS = 2
DIM = 8
LEARNING_RATE = 0.1


def global_batch(seed=0, classes=3):
  rng = np.random.default_rng(seed)
  views = rng.uniform(size=(BATCH, VIEWS, IMAGE, IMAGE, 3))
  labels = rng.integers(0, classes, size=BATCH)
  return views.astype(np.float32), labels.astype(np.int32)


def dataset(*arrays):
  """Exactly one global batch."""
  return tf.data.Dataset.from_tensor_slices(arrays).batch(BATCH)


def tiny_encoder():
  # Synchronised BN: identical to plain BN on one replica, and what makes
  # replicas match one device.
  return models.resnet(18, width=0.0625, input_shape=(IMAGE, IMAGE, 3),
                       sync_batch_norm=True)


def make_model(strategy=None, initial=None, loss=None, **memory):
  strategy = strategy or tf.distribute.get_strategy()
  with strategy.scope():
    model = keras_model.SupConModel(tiny_encoder(),
                                    models.ProjectionHead(output_dim=DIM),
                                    **memory)
    model.build((None, VIEWS, IMAGE, IMAGE, 3))
    if initial is not None:
      for var, value in zip(model.weights, initial):
        var.assign(value)
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=0.0),
        loss=loss or losses.SupConLoss(temperature=0.1))
  return model


def weights(model):
  return [v.numpy() for v in model.weights]


def fit_one_step(model, *arrays):
  history = model.fit(dataset(*arrays), epochs=1, steps_per_epoch=1,
                      shuffle=False, verbose=0)
  return history.history["loss"][0]


def assert_weights_close(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def one_device():
  """One fit step on one device: initial weights, loss, final weights."""
  model = make_model()
  initial = weights(model)
  views, labels = global_batch()
  loss = fit_one_step(model, views, labels)
  return initial, loss, weights(model)


def test_fit_reports_the_forward_loss(one_device):
  initial, fit_loss, _ = one_device
  model = make_model(initial=initial)
  views, labels = global_batch()
  embeddings = model(views, training=True)
  want = np.mean(losses.supcon_loss(embeddings, labels, temperature=0.1))
  np.testing.assert_allclose(fit_loss, want, rtol=1e-5)


def test_fit_builds_an_unbuilt_model_and_trains_every_weight():
  # As in the README: no build() before fit, so the head is built inside the
  # first traced step and must still be among the updated variables.
  model = keras_model.SupConModel(tiny_encoder(),
                                  models.ProjectionHead(output_dim=DIM))
  model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE),
                loss=losses.SupConLoss(temperature=0.1))
  views, labels = global_batch()
  model.fit(dataset(views, labels).repeat(), epochs=1, steps_per_epoch=2,
            verbose=0)
  after_one = {v.path: v.numpy() for v in model.trainable_variables}
  model.fit(dataset(views, labels), epochs=1, steps_per_epoch=1, verbose=0)
  head = [v for v in model.trainable_variables if "projection_head" in v.path]
  assert len(head) == 4
  for v in head:
    assert not np.array_equal(v.numpy(), after_one[v.path]), v.path


def loop_trainer(**memory):
  """`train_lib.Trainer` with the settings `make_model` compiles."""
  config = config_lib.TrainConfig(
      method="supcon", batch_size=BATCH, steps=1, **memory,
      loss=config_lib.LossConfig(temperature=0.1),
      model=config_lib.ModelConfig(encoder="resnet18", width=0.0625,
                                   projection_dim=DIM),
      optimizer=config_lib.OptimizerConfig(
          name="sgd", learning_rate=LEARNING_RATE, scale_by_batch=False,
          momentum=0.0, weight_decay=0.0, schedule="constant"))
  return train_lib.Trainer(
      config, tf.distribute.get_strategy(), num_classes=3,
      input_shape=(IMAGE, IMAGE, 3), steps_per_epoch=1,
      encoder=tiny_encoder())


def test_fit_step_matches_custom_loop(one_device):
  initial, fit_loss, fit_weights = one_device
  trainer = loop_trainer()
  trainer_vars = trainer.encoder.weights + trainer.head.weights
  for var, value in zip(trainer_vars, initial):
    var.assign(value)
  views, labels = global_batch()
  metrics = trainer.distributed_step(tf.constant(views), tf.constant(labels))
  np.testing.assert_allclose(fit_loss, float(metrics["loss"]), rtol=1e-5)
  assert_weights_close(fit_weights, [v.numpy() for v in trainer_vars])
  # The step moved the weights: the comparison is not of initial values.
  assert not all(np.allclose(a, b) for a, b in zip(initial, fit_weights))


def fit_steps(model, steps):
  """One `fit` call per step, on batches of seeds 0..steps-1; the losses."""
  return [fit_one_step(model, *global_batch(seed)) for seed in range(steps)]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fit_with_queue_matches_custom_loop(momentum):
  # Three steps: the third contrasts against a queue holding two steps'
  # keys (the queue wraps: 24 rows, 16 keys a step).
  memory = dict(queue_size=24, key_encoder_momentum=momentum)
  model = make_model(**memory)
  online = model.encoder.weights + model.head.weights
  initial = [v.numpy() for v in online]
  fit_losses = fit_steps(model, 3)
  trainer = loop_trainer(**memory)
  trainer_online = trainer.encoder.weights + trainer.head.weights
  for var, value in zip(trainer_online, initial):
    var.assign(value)
  if momentum:  # the key encoder starts as a copy, in both
    for key, var in trainer.memory.key_pairs(trainer.encoder, trainer.head):
      key.assign(var)
  loop_losses = [
      float(trainer.distributed_step(*map(tf.constant, global_batch(seed)))
            ["loss"]) for seed in range(3)]
  np.testing.assert_allclose(fit_losses, loop_losses, rtol=1e-5)
  assert_weights_close([v.numpy() for v in online],
                       [v.numpy() for v in trainer_online])
  assert_weights_close(conftest.queue_state(model.memory),
                       conftest.queue_state(trainer.memory))
  if momentum:
    assert_weights_close(
        [k.numpy() for k, _ in model.memory.key_pairs(model.encoder,
                                                      model.head)],
        [k.numpy() for k, _ in trainer.memory.key_pairs(trainer.encoder,
                                                        trainer.head)])
  # The queue took part: without it the third step's loss differs.
  plain = make_model()
  for var, value in zip(plain.encoder.weights + plain.head.weights, initial):
    var.assign(value)
  assert abs(fit_steps(plain, 3)[2] - fit_losses[2]) > 1e-4
  # Key weights are not trained by the optimizer, and are saved.
  trainable = {id(v) for v in model.trainable_weights}
  assert trainable == {id(v) for v in online if v.trainable}


def test_queue_is_saved_with_the_model(tmp_path):
  model = make_model(queue_size=24, key_encoder_momentum=0.9)
  fit_steps(model, 2)
  path = os.path.join(tmp_path, "model.keras")
  model.save(path)
  restored = keras.saving.load_model(path)
  assert restored.queue_size == 24 and restored.key_encoder_momentum == 0.9
  assert_weights_close(conftest.queue_state(restored.memory),
                       conftest.queue_state(model.memory))
  assert_weights_close(weights(restored), weights(model))
  assert int(restored.memory.queue_pointer.numpy()) == (2 * BATCH * VIEWS) % 24


def test_queue_needs_a_supcon_loss():
  model = make_model(loss=keras.losses.MeanSquaredError(), queue_size=24)
  views, _ = global_batch()
  targets = np.zeros((BATCH, VIEWS, DIM), np.float32)
  with pytest.raises(ValueError, match="queue_size=24 needs a compiled"):
    model.fit(dataset(views, targets), verbose=0)


@pytest.mark.parametrize("memory,expected", [
    (dict(queue_size=-1), "must be an int >= 0"),
    (dict(queue_size=24, key_encoder_momentum=1.0), r"in \[0, 1\)"),
    (dict(key_encoder_momentum=0.9), "needs a queue"),
])
def test_bad_queue_settings_raise(memory, expected):
  with pytest.raises(ValueError, match=expected):
    keras_model.SupConModel(tiny_encoder(),
                            models.ProjectionHead(output_dim=DIM), **memory)


@pytest.mark.slow
def test_mirrored_fit_with_queue_matches_one_device():
  memory = dict(queue_size=24, key_encoder_momentum=0.9)
  single = make_model(**memory)
  initial = weights(single)
  want = fit_steps(single, 3)
  double = make_model(conftest.make_mirrored(2), initial, **memory)
  np.testing.assert_allclose(fit_steps(double, 3), want, rtol=1e-5)
  assert_weights_close(weights(double), weights(single))
  for replica in range(2):  # every replica's copy of the queue
    got = [double.distribute_strategy.experimental_local_results(v.value)[
        replica].numpy() for v in (double.memory.queue,
                                   double.memory.queue_labels)]
    assert_weights_close(got, conftest.queue_state(single.memory)[:2])


@pytest.mark.slow
def test_mirrored_fit_matches_one_device(one_device):
  initial, loss, final = one_device
  model = make_model(conftest.make_mirrored(2), initial)
  got_loss = fit_one_step(model, *global_batch())
  np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
  assert_weights_close(weights(model), final)


@pytest.mark.slow
def test_mirrored_fit_without_gather_differs(one_device, monkeypatch):
  initial, loss, final = one_device
  monkeypatch.setattr(distributed, "all_gather", lambda x: x)
  monkeypatch.setattr(distributed, "replica_offset",
                      lambda b: tf.constant(0, tf.int32))
  model = make_model(conftest.make_mirrored(2), initial)
  got_loss = fit_one_step(model, *global_batch())
  assert not np.isclose(got_loss, loss, rtol=1e-3)
  assert not all(np.allclose(g, w, rtol=1e-3, atol=1e-4)
                 for g, w in zip(weights(model), final))


def test_supcon_loss_compiles_on_plain_model():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((VIEWS, 6))
  outputs = keras.layers.UnitNormalization(axis=-1)(
      keras.layers.Dense(DIM)(inputs))
  model = keras.Model(inputs, outputs)
  model.compile(optimizer=keras.optimizers.SGD(0.5),
                loss=losses.SupConLoss(temperature=0.5))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(BATCH, VIEWS, 6)).astype(np.float32)
  y = rng.integers(0, 3, size=BATCH).astype(np.int32)
  # The Keras path reports the plain SupCon mean of the batch.
  want = np.mean(losses.supcon_loss(model(x), y, temperature=0.5))
  np.testing.assert_allclose(model.evaluate(x, y, verbose=0), want,
                             rtol=1e-5)
  history = [float(model.train_on_batch(x, y)) for _ in range(8)]
  np.testing.assert_allclose(history[0], want, rtol=1e-5)
  assert np.all(np.isfinite(history))
  assert history[-1] < history[0] - 1e-3, history


def test_call_layout_and_rank4():
  model = make_model()
  views, _ = global_batch()
  out = model(views)
  assert out.shape == (BATCH, VIEWS, DIM) and out.dtype == tf.float32
  # View v of sample i is the embedding of image views[i, v].
  single = model(views[:, 1])
  assert single.shape == (BATCH, 1, DIM)
  np.testing.assert_allclose(single[:, 0], out[:, 1], atol=1e-5)
  with pytest.raises(ValueError, match="views"):
    model(views[:, 0, 0])


def test_save_and_load_round_trip(tmp_path):
  model = make_model(loss=losses.SupConLoss(temperature=0.2))
  views, _ = global_batch()
  path = os.path.join(tmp_path, "model.keras")
  model.save(path)
  restored = keras.saving.load_model(path)
  assert isinstance(restored, keras_model.SupConModel)
  assert isinstance(restored.head, models.ProjectionHead)
  assert isinstance(restored.loss, losses.SupConLoss)
  assert restored.loss.temperature == 0.2
  assert_weights_close(weights(restored), weights(model))
  np.testing.assert_array_equal(restored(views), model(views))


def test_evaluate_matches_manual_loss():
  model = make_model()
  views, labels = global_batch(seed=3)
  before = weights(model)
  got = model.evaluate(dataset(views, labels), verbose=0)
  assert_weights_close(weights(model), before)
  embeddings = model(views, training=False)
  want = np.mean(losses.supcon_loss(embeddings, labels, temperature=0.1))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size",
                                       "mean_with_sample_weight", "sum"])
def test_sample_weights(reduction):
  model = make_model(loss=losses.SupConLoss(temperature=0.1,
                                            reduction=reduction))
  views, labels = global_batch(seed=5)
  weight = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], np.float32)
  got = model.evaluate(dataset(views, labels, weight), verbose=0)
  per_sample = losses.supcon_loss(model(views, training=False), labels,
                                  temperature=0.1).numpy()
  if reduction == "sum_over_batch_size":
    want = per_sample[:4].sum() / BATCH
  elif reduction == "mean_with_sample_weight":
    want = per_sample[:4].mean()
  else:
    want = per_sample[:4].sum()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The same value as Keras's own reduction of SupConLoss.
  keras_value = model.loss(labels, model(views, training=False),
                           sample_weight=weight)
  np.testing.assert_allclose(got, keras_value, rtol=1e-5)


def test_invalid_samples_are_masked():
  # One view and unique labels: no sample has a positive.
  model = make_model()
  views, _ = global_batch()
  got = model.evaluate(dataset(views[:, :1], np.arange(BATCH)), verbose=0)
  assert got == 0.0


def test_other_compiled_loss_uses_keras_path():
  model = make_model(loss=keras.losses.MeanSquaredError())
  views, _ = global_batch()
  targets = np.zeros((BATCH, VIEWS, DIM), np.float32)
  got = model.evaluate(dataset(views, targets), verbose=0)
  want = np.mean(np.square(model(views, training=False)))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_simclr_loss_ignores_labels():
  model = make_model(loss=losses.SimCLRLoss(temperature=0.5))
  views, labels = global_batch()
  got = model.evaluate(dataset(views, labels), verbose=0)
  want = np.mean(losses.supcon_loss(model(views, training=False), None,
                                    temperature=0.5))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_unsupported_reduction_raises():
  model = make_model(loss=losses.SupConLoss(reduction="none"))
  views, labels = global_batch()
  with pytest.raises(ValueError, match="reduction"):
    model.evaluate(dataset(views, labels), verbose=0)


@pytest.fixture
def mixed_float16():
  with conftest.global_policy("mixed_float16"):
    yield


@pytest.mark.slow
def test_mixed_precision(mixed_float16):
  del mixed_float16
  model = make_model()
  assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
  views, labels = global_batch()
  before = weights(model)
  loss = fit_one_step(model, views, labels)
  assert np.isfinite(loss) and loss > 0
  assert model(views).dtype == tf.float32
  assert not all(np.allclose(a, b) for a, b in zip(before, weights(model)))


def test_float16_overflow_on_one_replica_skips_the_step_everywhere(
    mixed_float16):
  del mixed_float16
  strategy = conftest.make_mirrored(2)
  overflow = tf.Variable(True, trainable=False)
  with strategy.scope():
    encoder = conftest.overflow_encoder(IMAGE, overflow)
    model = keras_model.SupConModel(encoder,
                                    models.ProjectionHead(output_dim=DIM))
    model.build((None, VIEWS, IMAGE, IMAGE, 3))
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE),
                  loss=losses.SupConLoss(temperature=0.1))
    model.optimizer.build(model.trainable_variables)
  assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)

  def replica_values(variables):
    # A Keras variable's `value` is the tf.distribute (mirrored) variable.
    return [[c.numpy() for c in strategy.experimental_local_results(v.value)]
            for v in variables]

  scale = model.optimizer.dynamic_scale
  start_scale = float(scale.numpy())
  before = replica_values(model.weights)
  fit_one_step(model, *global_batch())  # inf gradients on replica 1 only
  for copies, initial in zip(replica_values(model.weights), before):
    for copy in copies:
      np.testing.assert_array_equal(copy, initial[0])
  assert replica_values([scale]) == [[start_scale / 2] * 2]

  overflow.assign(False)
  fit_one_step(model, *global_batch())  # a clean step is applied everywhere
  after = replica_values(model.weights)
  for copies in after:
    assert np.all(np.isfinite(copies[0]))
    np.testing.assert_array_equal(copies[1], copies[0])
  assert not all(np.array_equal(a[0], b[0]) for a, b in zip(after, before))
  assert replica_values([scale]) == [[start_scale / 2] * 2]


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
