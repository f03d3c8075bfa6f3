"""Tests of the distributed pretraining loop.

The central property: training on R replicas, with the loss contrasting each
replica's anchors against the globally gathered batch, gives the same loss
and the same weights as training on one device with the global batch.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import config as config_lib
from supcon_tf import distributed
from supcon_tf import train_lib

IMAGE = 8
GLOBAL_BATCH = 8
VIEWS = 2


def tiny_config(method="supcon", precision="float32", schedule="cosine",
                **train):
  train = {"steps": 4, "steps_per_loop": 2, "checkpoint_every": 2, **train}
  return config_lib.TrainConfig(
      method=method, batch_size=GLOBAL_BATCH, precision=precision,
      data=config_lib.DataConfig(image_size=IMAGE, num_views=VIEWS),
      model=config_lib.ModelConfig(encoder="resnet18", width=0.0625,
                                   projection_dim=8),
      optimizer=config_lib.OptimizerConfig(name="sgd", learning_rate=0.5,
                                           weight_decay=0.0,
                                           schedule=schedule),
      **train)


def global_batch(step, classes=3):
  rng = np.random.default_rng(step)
  views = rng.uniform(size=(GLOBAL_BATCH, VIEWS, IMAGE, IMAGE, 3))
  labels = rng.integers(0, classes, size=GLOBAL_BATCH)
  return views.astype(np.float32), labels.astype(np.int32)


def strategy_for(replicas):
  if replicas == 1:
    return tf.distribute.get_strategy()
  return conftest.make_mirrored(replicas)


def make_trainer(replicas, config, initial=None):
  """A Trainer on `replicas` logical CPUs (or on a given strategy)."""
  strategy = (replicas if isinstance(replicas, tf.distribute.Strategy)
              else strategy_for(replicas))
  trainer = train_lib.Trainer(
      config, strategy, num_classes=3,
      input_shape=(IMAGE, IMAGE, 3), steps_per_epoch=10)
  if initial is not None:
    for var, value in zip(trainer.encoder.weights + trainer.head.weights,
                          initial):
      var.assign(value)
  return trainer


def weights(trainer):
  return [v.numpy() for v in trainer.encoder.weights + trainer.head.weights]


def train(trainer, steps):
  """Feeds replica r rows [r*b, (r+1)*b) of each global batch."""
  strategy = trainer.strategy
  replicas = strategy.num_replicas_in_sync
  local = GLOBAL_BATCH // replicas
  losses = []
  for step in range(steps):
    views, labels = global_batch(step)

    def shard(replica, views=views, labels=labels):
      rows = slice(replica * local, (replica + 1) * local)
      return tf.constant(views[rows]), tf.constant(labels[rows])

    if replicas == 1:
      inputs = shard(0)
    else:
      inputs = strategy.experimental_distribute_values_from_function(
          lambda ctx: shard(ctx.replica_id_in_sync_group))
    metrics = tf.function(trainer.distributed_step)(*inputs)
    losses.append(float(metrics["loss"]))
  return losses


@pytest.fixture(scope="module")
def reference():
  """One-replica run: initial weights, losses and final weights."""
  trainer = make_trainer(1, tiny_config())
  initial = weights(trainer)
  losses = train(trainer, 3)
  return initial, losses, weights(trainer)


@pytest.mark.parametrize("replicas", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_replicas_match_single_device(reference, replicas):
  initial, losses, final = reference
  trainer = make_trainer(replicas, tiny_config(), initial)
  assert all(v.synchronized for v in trainer.encoder.layers
             if hasattr(v, "synchronized")), "sync BN expected on replicas"
  got_losses = train(trainer, 3)
  np.testing.assert_allclose(got_losses, losses, rtol=1e-5, atol=1e-6)
  for got, want in zip(weights(trainer), final):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_without_gather_differs(reference, monkeypatch):
  initial, losses, final = reference
  monkeypatch.setattr(distributed, "all_gather", lambda x: x)
  monkeypatch.setattr(distributed, "replica_offset",
                      lambda b: tf.constant(0, tf.int32))
  trainer = make_trainer(2, tiny_config(), initial)
  got_losses = train(trainer, 3)
  assert not np.allclose(got_losses, losses, rtol=1e-3)
  assert not all(np.allclose(g, w, rtol=1e-3, atol=1e-4)
                 for g, w in zip(weights(trainer), final))


@pytest.mark.parametrize("method", ["simclr", "ce"])
def test_other_methods_replicas_match_single_device(method):
  single = make_trainer(1, tiny_config(method))
  initial = weights(single)
  want = train(single, 2)
  double = make_trainer(2, tiny_config(method), initial)
  np.testing.assert_allclose(train(double, 2), want, rtol=1e-5, atol=1e-6)
  for got, ref in zip(weights(double), weights(single)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_tracks_float32(reference, precision):
  initial, losses, _ = reference
  trainer = make_trainer(1, tiny_config(precision=precision), initial)
  got = train(trainer, 3)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, losses, rtol=0.05, atol=0.05)


def synthetic_dataset_fn(context):
  """Deterministic per-replica `(views, labels)` batches."""
  def example(i):
    seed = tf.stack([tf.cast(i, tf.int32), 7])
    views = tf.random.stateless_uniform([VIEWS, IMAGE, IMAGE, 3], seed)
    return views, tf.cast(i % 3, tf.int32)
  batch = context.get_per_replica_batch_size(GLOBAL_BATCH)
  return (tf.data.Dataset.range(64).shard(context.num_input_pipelines,
                                          context.input_pipeline_id)
          .shuffle(16, seed=1).repeat().map(example).batch(batch,
                                                           drop_remainder=True))


@pytest.mark.parametrize(
    "replicas", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_pretrain_resume_gives_same_weights(tmp_path, replicas):
  # The resumed call builds a new input pipeline: it must start where the
  # checkpoint left the stream, also under MirroredStrategy (whose input
  # iterator cannot be checkpointed).
  config = tiny_config(deterministic=True)
  straight = tmp_path / "straight"
  train_lib.pretrain(config, str(straight), strategy_for(replicas),
                     dataset_fn=synthetic_dataset_fn, verbose=False)
  resumed = tmp_path / "resumed"
  first = train_lib.pretrain(config, str(resumed), strategy_for(replicas),
                             dataset_fn=synthetic_dataset_fn, stop_at_step=2,
                             verbose=False)
  assert first.step == 2
  second = train_lib.pretrain(config, str(resumed), strategy_for(replicas),
                              dataset_fn=synthetic_dataset_fn, verbose=False)
  assert second.step == 4
  a = train_lib.restore_encoder(str(straight), config, (IMAGE, IMAGE, 3))
  b = train_lib.restore_encoder(str(resumed), config, (IMAGE, IMAGE, 3))
  for x, y in zip(a.weights, b.weights):
    np.testing.assert_array_equal(x.numpy(), y.numpy())
  assert tf.io.gfile.glob(str(straight / "train" / "events.*"))


def test_pretrain_loss_goes_down(tmp_path):
  config = tiny_config(steps=30, steps_per_loop=10, checkpoint_every=30,
                       schedule="constant")
  metrics = []
  for stop in (10, 20, 30):
    result = train_lib.pretrain(config, str(tmp_path),
                                dataset_fn=synthetic_dataset_fn,
                                stop_at_step=stop, verbose=False)
    metrics.append(result.loss)
  assert metrics[-1] < metrics[0], metrics


def test_resume_with_changed_config_is_refused(tmp_path):
  train_lib.pretrain(tiny_config(steps=2), str(tmp_path),
                     dataset_fn=synthetic_dataset_fn, verbose=False)
  with pytest.raises(train_lib.TrainingError, match="temperature"):
    train_lib.pretrain(
        tiny_config(steps=2, loss=config_lib.LossConfig(temperature=0.5)),
        str(tmp_path), dataset_fn=synthetic_dataset_fn, verbose=False)


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def run_workers(mode, out_dir, workers=2, timeout=240):
  """Runs `multi_worker_worker.py MODE OUT_DIR` as a loopback cluster."""
  cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(workers)]}
  script = os.path.join(os.path.dirname(__file__), "multi_worker_worker.py")
  procs = []
  for index in range(workers):
    env = dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": index}}))
    procs.append(subprocess.Popen(
        [sys.executable, script, mode, str(out_dir)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_worker_processes_match_one_process(reference, tmp_path):
  initial, losses, final = reference
  np.savez(tmp_path / "initial.npz", *initial)
  run_workers("steps", tmp_path)
  for task in range(2):
    got = np.load(tmp_path / f"final-{task}.npz")
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5, atol=1e-6)
    for i, want in enumerate(final):
      np.testing.assert_allclose(got[f"arr_{i}"], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_worker_pretrain_writes_chief_checkpoint(tmp_path):
  run_workers("pretrain", tmp_path)
  assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
  losses = [float(np.load(tmp_path / f"loss-{t}.npy")) for t in range(2)]
  assert np.isfinite(losses).all() and losses[0] == pytest.approx(losses[1])


def test_batch_not_divisible_by_replicas():
  with pytest.raises(ValueError, match="not divisible by the 3 replicas"):
    train_lib.check_batch(8, 3)


# ---------------------------------------------------------------------------
# Memory queue and key encoder.


def queue_state(trainer):
  return (trainer.queue.numpy(), trainer.queue_labels.numpy(),
          int(trainer.queue_pointer.numpy()))


def test_queue_is_fifo_and_wraps_around():
  keys = GLOBAL_BATCH * VIEWS  # written per step
  trainer = make_trainer(1, tiny_config(queue_size=keys + keys // 2))
  assert np.all(trainer.queue_labels.numpy() == -1)
  train(trainer, 1)
  first, first_labels, pointer = queue_state(trainer)
  assert pointer == keys
  np.testing.assert_array_equal(first_labels[:keys],
                                np.repeat(global_batch(0)[1], VIEWS))
  assert np.all(first_labels[keys:] == -1)
  np.testing.assert_allclose(np.linalg.norm(first[:keys], axis=1), 1.0,
                             rtol=1e-5)
  train_more = make_trainer(1, tiny_config(queue_size=keys + keys // 2))
  train(train_more, 2)
  second, second_labels, pointer = queue_state(train_more)
  assert pointer == keys // 2
  step1 = np.repeat(global_batch(1)[1], VIEWS)
  # Step 1's keys fill the free half, then wrap onto step 0's oldest rows.
  np.testing.assert_array_equal(second_labels[keys:], step1[:keys // 2])
  np.testing.assert_array_equal(second_labels[:keys // 2], step1[keys // 2:])
  np.testing.assert_array_equal(second_labels[keys // 2:keys],
                                first_labels[keys // 2:keys])


def test_empty_queue_gives_the_loss_without_queue(reference):
  initial, losses, _ = reference
  trainer = make_trainer(1, tiny_config(queue_size=64), initial)
  got = train(trainer, 2)
  assert got[0] == pytest.approx(losses[0], rel=1e-6)  # all slots -1
  assert abs(got[1] - losses[1]) > 1e-4  # step 1 sees step 0's keys


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_queue_on_replicas_matches_single_device(momentum):
  config = tiny_config(queue_size=24, key_encoder_momentum=momentum)
  single = make_trainer(1, config)
  initial = weights(single)
  want = train(single, 3)
  double = make_trainer(2, config, initial)
  if momentum:
    for key, online in double._key_pairs():  # pylint: disable=protected-access
      key.assign(online)
  np.testing.assert_allclose(train(double, 3), want, rtol=1e-5, atol=1e-6)
  queue, labels, pointer = queue_state(single)
  for replica in range(2):  # every replica's copy
    np.testing.assert_allclose(
        double.strategy.experimental_local_results(double.queue)[
            replica].numpy(), queue, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(
        double.strategy.experimental_local_results(double.queue_labels)[
            replica].numpy(), labels)
  assert int(double.queue_pointer.numpy()) == pointer
  for got, ref in zip(weights(double), weights(single)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_key_encoder_is_a_moving_average():
  m = 0.75
  trainer = make_trainer(1, tiny_config(queue_size=32,
                                        key_encoder_momentum=m))
  start = weights(trainer)
  train(trainer, 1)
  after_one = weights(trainer)
  train(trainer, 1)  # the update before step 2 mixes in step 1's weights
  for (key, online), w0, w1 in zip(trainer._key_pairs(), start, after_one):  # pylint: disable=protected-access
    if key.trainable:
      np.testing.assert_allclose(key.numpy(), m * w0 + (1 - m) * w1,
                                 rtol=1e-5, atol=1e-6)
    del online


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_pretrain_resume_with_queue_is_bit_exact(tmp_path, momentum):
  config = tiny_config(deterministic=True, queue_size=24,
                       key_encoder_momentum=momentum)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train_lib.pretrain(config, str(straight), dataset_fn=synthetic_dataset_fn,
                     verbose=False)
  train_lib.pretrain(config, str(resumed), dataset_fn=synthetic_dataset_fn,
                     stop_at_step=2, verbose=False)
  train_lib.pretrain(config, str(resumed), dataset_fn=synthetic_dataset_fn,
                     verbose=False)
  a = tf.train.load_checkpoint(str(straight / "checkpoints"))
  b = tf.train.load_checkpoint(str(resumed / "checkpoints"))
  names = a.get_variable_to_shape_map()
  assert any(n.startswith("queue/") for n in names)
  assert any(n.startswith("queue_pointer/") for n in names)
  assert any(n.startswith("key_encoder/") for n in names) == bool(momentum)
  assert set(names) == set(b.get_variable_to_shape_map())
  for name in names:
    if not name.startswith(("save_counter", "_CHECKPOINTABLE")):
      np.testing.assert_array_equal(a.get_tensor(name), b.get_tensor(name),
                                    err_msg=name)
  assert int(a.get_tensor("queue_pointer/.ATTRIBUTES/VARIABLE_VALUE")) == (
      4 * GLOBAL_BATCH * VIEWS) % 24


@pytest.mark.parametrize("train,expected", [
    (dict(queue_size=8), "smaller than one step's keys"),
    (dict(queue_size=64, method="ce"), "needs method"),
    (dict(queue_size=64, key_encoder_momentum=1.0), r"in \[0, 1\)"),
    (dict(key_encoder_momentum=0.9), "needs a queue"),
])
def test_bad_queue_config_raises(train, expected):
  method = train.pop("method", "supcon")
  with pytest.raises(ValueError, match=expected):
    tiny_config(method, **train)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
