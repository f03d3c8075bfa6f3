"""Tests of the distributed pretraining loop.

The central property: training on R replicas, with the loss contrasting each
replica's anchors against the globally gathered batch, gives the same loss
and the same weights as training on one device with the global batch.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import config as config_lib
from supcon_tf import distributed
from supcon_tf import plots
from supcon_tf import pretrained
from supcon_tf import rundir
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


def make_trainer(replicas, config, initial=None, encoder=None):
  """A Trainer on `replicas` logical CPUs (or on a given strategy)."""
  strategy = (replicas if isinstance(replicas, tf.distribute.Strategy)
              else strategy_for(replicas))
  trainer = train_lib.Trainer(
      config, strategy, num_classes=3,
      input_shape=(IMAGE, IMAGE, 3), steps_per_epoch=10, encoder=encoder)
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
  step_fn = tf.function(trainer.distributed_step)  # traced once, not per step
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
    metrics = step_fn(*inputs)
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


@pytest.mark.parametrize("method", ["simclr", "npairs", "ce"])
def test_other_methods_replicas_match_single_device(method):
  single = make_trainer(1, tiny_config(method))
  initial = weights(single)
  want = train(single, 2)
  double = make_trainer(2, tiny_config(method), initial)
  np.testing.assert_allclose(train(double, 2), want, rtol=1e-5, atol=1e-6)
  for got, ref in zip(weights(double), weights(single)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def one_step_float32():
  """Seeded initial weights and the float32 weights after one step."""
  keras.utils.set_random_seed(0)
  trainer = make_trainer(1, tiny_config())
  initial = weights(trainer)
  train(trainer, 1)
  return initial, weights(trainer)


# Relative error of a mixed run's first weight update against float32's; a
# run that does not train has error 1, one with a 1.5x update 0.5. Measured
# with this seed: 0.036 (bfloat16), 0.0043 (float16). The tiny ResNet's
# error depends on the initial weights (up to 0.21 and 0.11 over seeds 0-3),
# and compounds over several steps, hence one seeded step.
@pytest.mark.parametrize("precision,tolerance", [("mixed_bfloat16", 0.15),
                                                 ("mixed_float16", 0.05)])
def test_mixed_precision_tracks_float32(one_step_float32, precision,
                                        tolerance):
  initial, final = one_step_float32
  trainer = make_trainer(1, tiny_config(precision=precision), initial)
  assert np.all(np.isfinite(train(trainer, 1)))
  # The weight update, not the loss: a run whose updates are tiny or wrong
  # still has losses close to the float32 run's after a few steps.
  trainable = [v.trainable for v in trainer.encoder.weights +
               trainer.head.weights]

  def update(values):
    return np.concatenate([(w - w0).ravel() for w, w0, t in
                           zip(values, initial, trainable) if t])

  got, want = update(weights(trainer)), update(final)
  error = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert error < tolerance, error


def replica_values(variables, strategy):
  """`[variable][replica]` numpy values of each replica's copy."""
  # A Keras variable's `value` is the tf.distribute (mirrored) variable.
  return [[c.numpy() for c in strategy.experimental_local_results(v.value)]
          for v in variables]


def test_float16_overflow_on_one_replica_skips_the_step_everywhere():
  strategy = conftest.make_mirrored(2)
  overflow = tf.Variable(True, trainable=False)
  with strategy.scope():
    encoder = conftest.overflow_encoder(IMAGE, overflow)
  trainer = make_trainer(strategy, tiny_config(precision="mixed_float16"),
                         encoder=encoder)
  variables = trainer.encoder.weights + trainer.head.weights
  scale = trainer.optimizer.dynamic_scale
  start_scale = float(scale.numpy())
  before = replica_values(variables, strategy)

  train(trainer, 1)  # inf gradients on replica 1 only: skipped everywhere
  for copies, initial in zip(replica_values(variables, strategy), before):
    for copy in copies:
      np.testing.assert_array_equal(copy, initial[0])
  assert replica_values([scale], strategy) == [[start_scale / 2] * 2]

  overflow.assign(False)
  train(trainer, 1)  # a clean step is applied, identically on both replicas
  after = replica_values(variables, strategy)
  for copies in after:
    assert np.all(np.isfinite(copies[0]))
    np.testing.assert_array_equal(copies[1], copies[0])
  assert not all(np.array_equal(a[0], b[0]) for a, b in zip(after, before))
  assert replica_values([scale], strategy) == [[start_scale / 2] * 2]


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
  a = pretrained.restore_encoder(str(straight), config, (IMAGE, IMAGE, 3))
  b = pretrained.restore_encoder(str(resumed), config, (IMAGE, IMAGE, 3))
  for x, y in zip(a.weights, b.weights):
    np.testing.assert_array_equal(x.numpy(), y.numpy())
  assert tf.io.gfile.glob(str(straight / "train" / "events.*"))


def test_pretrain_says_what_it_runs_and_where_it_resumes(tmp_path, capsys):
  config = tiny_config(steps=2, steps_per_loop=1, checkpoint_every=1)
  for stop in (1, None):
    train_lib.pretrain(config, str(tmp_path), dataset_fn=synthetic_dataset_fn,
                       stop_at_step=stop)
  lines = [line for line in capsys.readouterr().out.splitlines()
           if line.startswith("pretraining")]
  assert lines == ["pretraining 2 steps (batch 8, supcon, float32)",
                   "pretraining: resumed from step 1 of 2"]
  assert train_lib._stage_line(config, 2, 2, 2, epochs_known=False) == (
      "pretraining: already done (2 steps)")


def test_pretrain_line_counts_epochs_and_a_shortened_warmup():
  config = dataclasses.replace(tiny_config(steps=30), optimizer=(
      config_lib.OptimizerConfig(warmup_epochs=0.5)))
  assert train_lib._stage_line(config, 30, 1406, None, epochs_known=True) == (
      "pretraining 30 steps (0.0213 epochs of 1,406 steps, batch 8, supcon, float32); "
      "warm-up shortened from 703 to 3 steps to fit the run")
  config = tiny_config(steps=None, epochs=8)
  assert train_lib._stage_line(config, 1400, 175, None, epochs_known=True) == (
      "pretraining 1,400 steps (8 epochs of 175 steps, batch 8, supcon, "
      "float32)")


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


def _paired_labels_dataset_fn(context):
  """Batches of 8 samples labelled [0, 0, 1, 1, 2, 2, 3, 3], 2 views each.

  Each anchor has 3 positives under supcon (the other view of its sample and
  both views of the other sample of its label) and 1 under simclr.
  """
  batch = context.get_per_replica_batch_size(GLOBAL_BATCH)
  labels = tf.constant([0, 0, 1, 1, 2, 2, 3, 3][:batch], tf.int32)
  return tf.data.Dataset.range(1000).map(lambda i: (
      tf.random.stateless_uniform([batch, VIEWS, IMAGE, IMAGE, 3],
                                  tf.stack([tf.cast(i, tf.int32), 3])),
      labels))


@pytest.mark.parametrize("method,positives", [
    ("supcon", 3.0), pytest.param("simclr", 1.0, marks=pytest.mark.slow)])
def test_pretrain_writes_the_health_metrics_the_plots_read(
    tmp_path, method, positives):
  workdir = rundir.pretrain_dir(str(tmp_path))  # Where the command line trains.
  train_lib.pretrain(tiny_config(method=method, steps=2, steps_per_loop=1),
                     workdir, dataset_fn=_paired_labels_dataset_fn,
                     verbose=False)
  # Read as the report reads them: a renamed tag fails here.
  scalars = plots.read_scalars(rundir.events_dir(str(tmp_path)))
  assert sorted(scalars) == ["images_per_second", "learning_rate", "loss",
                             "nn_top1", "positives"]
  for title, tags in plots.TRAINING_PANELS:
    assert tags[0] in scalars, f"panel {title!r} would show 'not recorded'"
  for tag, (steps, values) in scalars.items():
    assert steps.tolist() == [1, 2] and np.isfinite(values).all(), tag
  assert scalars["positives"][1].tolist() == [positives, positives]
  assert ((scalars["nn_top1"][1] >= 0) & (scalars["nn_top1"][1] <= 1)).all()


def test_run_rate_is_the_mean_of_the_loops_after_the_first(tmp_path):
  """The reported rate: samples over seconds of every loop but the tracing one.

  Not the last loop's rate, which one slow loop (a checkpoint's disk flush,
  a neighbour on the machine) would make the whole run's figure.
  """
  workdir = rundir.pretrain_dir(str(tmp_path))
  result = train_lib.pretrain(
      tiny_config(steps=4, steps_per_loop=1), workdir,
      dataset_fn=synthetic_dataset_fn, verbose=False)
  rates = plots.read_scalars(
      rundir.events_dir(str(tmp_path)))["images_per_second"][1]
  seconds = (GLOBAL_BATCH / rates[1:]).sum()  # Loops 2-4, one step each.
  assert result.images_per_second == pytest.approx(
      3 * GLOBAL_BATCH / seconds, rel=1e-4)


def test_resume_with_changed_config_is_refused(tmp_path):
  train_lib.pretrain(tiny_config(steps=2), str(tmp_path),
                     dataset_fn=synthetic_dataset_fn, verbose=False)
  with pytest.raises(rundir.TrainingError, match="temperature"):
    train_lib.pretrain(
        tiny_config(steps=2, loss=config_lib.LossConfig(temperature=0.5)),
        str(tmp_path), dataset_fn=synthetic_dataset_fn, verbose=False)


def _weights(workdir, config):
  encoder = pretrained.restore_encoder(str(workdir), config,
                                       (IMAGE, IMAGE, 3))
  return [w.numpy() for w in encoder.weights]


def test_a_finished_run_extended_continues_as_the_longer_run(tmp_path,
                                                             capsys):
  # Constant learning rate: the extended run must equal a run planned
  # 4 steps long from the start, bit for bit (same state, same stream).
  short = tiny_config(steps=2, deterministic=True, schedule="constant")
  long = tiny_config(steps=4, deterministic=True, schedule="constant")
  straight, extended = tmp_path / "straight", tmp_path / "extended"
  train_lib.pretrain(long, str(straight), dataset_fn=synthetic_dataset_fn,
                     verbose=False)
  train_lib.pretrain(short, str(extended), dataset_fn=synthetic_dataset_fn,
                     verbose=False)
  capsys.readouterr()
  result = train_lib.pretrain(long, str(extended),
                              dataset_fn=synthetic_dataset_fn)
  assert (result.step, result.extended_from) == (4, 2)
  assert "pretraining: the 2-step run is now 4 steps, continued from step 2" \
      in capsys.readouterr().out
  for x, y in zip(_weights(straight, long), _weights(extended, long)):
    np.testing.assert_array_equal(x, y)
  assert rundir.load_config(str(extended)) == long
  # Rerun at the new length: nothing to extend, nothing trained.
  again = train_lib.pretrain(long, str(extended),
                             dataset_fn=synthetic_dataset_fn, verbose=False)
  assert (again.step, again.extended_from) == (4, None)
  # Shorter than what is trained: refused, the stored run untouched.
  stored = (extended / "config.json").read_bytes()
  with pytest.raises(rundir.TrainingError,
                     match="already trained 4 steps, more than the 3"):
    train_lib.pretrain(tiny_config(steps=3, deterministic=True,
                                   schedule="constant"),
                       str(extended), dataset_fn=synthetic_dataset_fn,
                       verbose=False)
  assert (extended / "config.json").read_bytes() == stored


def test_an_extended_cosine_run_follows_the_longer_schedule(tmp_path):
  straight, extended = tmp_path / "straight", tmp_path / "extended"
  config = tiny_config(steps=4, steps_per_loop=1)
  train_lib.pretrain(config, str(straight), dataset_fn=synthetic_dataset_fn,
                     verbose=False)
  for steps in (2, 4):
    train_lib.pretrain(tiny_config(steps=steps, steps_per_loop=1),
                       str(extended), dataset_fn=synthetic_dataset_fn,
                       verbose=False)
  want = plots.read_scalars(str(straight / "train"))["learning_rate"]
  got = plots.read_scalars(str(extended / "train"))["learning_rate"]
  # Steps 1-2 followed the 2-step cosine (0 at its end); 3-4 the 4-step one.
  assert got[0].tolist() == [1, 2, 3, 4]
  assert got[1][1] == 0.0 and want[1][1] > 0.0
  np.testing.assert_allclose(got[1][2:], want[1][2:], rtol=1e-6)


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


def test_jit_compile_with_cpu_replicas_is_refused():
  config = tiny_config(jit_compile=True)
  with pytest.raises(ValueError, match=r"jit_compile=True.*MirroredStrategy "
                     r"\(--strategy\) over 2 replicas.*Drop --jit_compile"):
    make_trainer(2, config)
  train_lib.check_jit_compile(True, tf.distribute.get_strategy())
  train_lib.check_jit_compile(False, conftest.make_mirrored(2))


def test_batch_not_divisible_by_replicas():
  with pytest.raises(ValueError, match="not divisible by the 3 replicas"):
    train_lib.check_batch(8, 3)


# ---------------------------------------------------------------------------
# Memory queue and key encoder.


def test_queue_is_fifo_and_wraps_around():
  keys = GLOBAL_BATCH * VIEWS  # written per step
  trainer = make_trainer(1, tiny_config(queue_size=keys + keys // 2))
  assert np.all(trainer.memory.queue_labels.numpy() == -1)
  train(trainer, 1)
  first, first_labels, pointer = conftest.queue_state(trainer.memory)
  assert pointer == keys
  np.testing.assert_array_equal(first_labels[:keys],
                                np.repeat(global_batch(0)[1], VIEWS))
  assert np.all(first_labels[keys:] == -1)
  np.testing.assert_allclose(np.linalg.norm(first[:keys], axis=1), 1.0,
                             rtol=1e-5)
  train_more = make_trainer(1, tiny_config(queue_size=keys + keys // 2))
  train(train_more, 2)
  second, second_labels, pointer = conftest.queue_state(train_more.memory)
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


@pytest.mark.parametrize("replicas",
                         [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_queue_on_replicas_matches_single_device(momentum, replicas):
  config = tiny_config(queue_size=24, key_encoder_momentum=momentum)
  single = make_trainer(1, config)
  initial = weights(single)
  want = train(single, 3)
  double = make_trainer(replicas, config, initial)
  if momentum:
    for key, online in double.memory.key_pairs(double.encoder, double.head):
      key.assign(online)
  np.testing.assert_allclose(train(double, 3), want, rtol=1e-5, atol=1e-6)
  queue, labels, pointer = conftest.queue_state(single.memory)
  assert double.strategy.num_replicas_in_sync == replicas
  for replica in range(replicas):  # every replica's copy
    np.testing.assert_allclose(
        double.strategy.experimental_local_results(double.memory.queue.value)[
            replica].numpy(), queue, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(
        double.strategy.experimental_local_results(
            double.memory.queue_labels.value)[
            replica].numpy(), labels)
  assert int(double.memory.queue_pointer.numpy()) == pointer
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
  pairs = trainer.memory.key_pairs(trainer.encoder, trainer.head)
  for (key, online), w0, w1 in zip(pairs, start, after_one):
    if online.trainable:
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


def test_restored_encoder_is_the_online_one_not_the_key_encoder(
    tmp_path, monkeypatch):
  # With a momentum key encoder the checkpoint holds two encoders; linear
  # evaluation, k-NN and export must get the online (trained) one.
  made = []

  class Recorded(train_lib.Trainer):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)

  monkeypatch.setattr(train_lib, "Trainer", Recorded)
  config = tiny_config(queue_size=24, key_encoder_momentum=0.9)
  train_lib.pretrain(config, str(tmp_path), dataset_fn=synthetic_dataset_fn,
                     verbose=False)
  (trainer,) = made
  assert int(trainer.step.numpy()) == config.steps
  online = trainer.encoder.weights
  key = trainer.memory.key_encoder.weights
  restored = pretrained.restore_encoder(str(tmp_path), config,
                                        (IMAGE, IMAGE, 3)).weights
  assert len(restored) == len(online) == len(key)
  for got, want in zip(restored, online):
    assert got.shape == want.shape, (got.path, want.path)
    np.testing.assert_array_equal(got.numpy(), want.numpy(),
                                  err_msg=f"{got.path} vs {want.path}")
  # Every trainable weight lags behind in the key encoder (its batch-norm
  # statistics come from its own forward passes, and differ too).
  trainable = [(got, k) for got, k, want in zip(restored, key, online)
               if want.trainable]
  assert trainable
  differ = [got.path for got, k in trainable
            if not np.array_equal(got.numpy(), k.numpy())]
  assert len(differ) == len(trainable), sorted(
      got.path for got, _ in trainable if got.path not in differ)
  assert any(not np.array_equal(got.numpy(), k.numpy())
             for got, k, want in zip(restored, key, online)
             if not want.trainable)


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
