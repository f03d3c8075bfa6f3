"""One tiny pipeline stage in its own process, for `reliability_test.py`.

The test kills this process with SIGKILL (from outside, or from inside at a
chosen instant) and runs the same command again:

  python reliability_driver.py pretrain WORKDIR [--sleep=S] [--die_in_save=N]
      [--replicas=R | --multi_worker] [--queue_size=K [--momentum=M]]
  python reliability_driver.py linear WORKDIR [--sleep=S]
  python reliability_driver.py export BASE [--die_in_export]

`pretrain` prints `step N` after every step, `linear` prints `epoch N`
after every recorded epoch, each followed by a pause of `--sleep` seconds
so that the test can kill the process between them. `--replicas=R` trains
under a MirroredStrategy over R logical CPUs, `--multi_worker` under a
MultiWorkerMirroredStrategy (one worker of the cluster in `TF_CONFIG`).
`--queue_size=K` adds a memory queue of K keys, `--momentum=M` its momentum
key encoder (`tiny_config(queue_size=K, key_encoder_momentum=M)`). The
test module imports this one for the shared tiny configurations.
"""

import argparse
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from supcon_tf import classifier as classifier_lib
from supcon_tf import config as config_lib
from supcon_tf import export
from supcon_tf import linear_backup
from supcon_tf import linear_eval
from supcon_tf import models
from supcon_tf import train_lib

IMAGE = 8
BATCH = 8
VIEWS = 2
STEPS = 12
EPOCHS = 5
CLASSES = 3


def tiny_config(**train) -> config_lib.TrainConfig:
  """ResNet-18 at width 1/16 on 8x8 images, 12 deterministic steps."""
  train = {
      "method": "supcon", "batch_size": BATCH, "precision": "float32",
      "steps": STEPS, "steps_per_loop": 1, "checkpoint_every": 2,
      "keep_checkpoints": 3, "deterministic": True,
      "data": config_lib.DataConfig(image_size=IMAGE, num_views=VIEWS),
      "model": config_lib.ModelConfig(encoder="resnet18", width=0.0625,
                                      projection_dim=8),
      "optimizer": config_lib.OptimizerConfig(name="sgd", learning_rate=0.5,
                                              weight_decay=0.0),
      **train}
  return config_lib.TrainConfig(**train)


def dataset_fn(context, nan_from_step=None):
  """Deterministic per-replica `(views, labels)` batches.

  Args:
    context: a `tf.distribute.InputContext`.
    nan_from_step: if set, batches of 1-based steps >= this one hold NaN
      images (for one replica, batch i feeds step i + 1).

  Returns:
    A repeating dataset of `(views [batch, 2, 8, 8, 3], labels [batch])`.
  """
  def example(i):
    seed = tf.stack([tf.cast(i, tf.int32), 7])
    views = tf.random.stateless_uniform([VIEWS, IMAGE, IMAGE, 3], seed)
    return views, tf.cast(i % CLASSES, tf.int32)

  batch = context.get_per_replica_batch_size(BATCH)
  ds = (tf.data.Dataset.range(64).shard(context.num_input_pipelines,
                                        context.input_pipeline_id)
        .shuffle(16, seed=1).repeat().map(example)
        .batch(batch, drop_remainder=True))
  if nan_from_step is not None:
    ds = ds.enumerate(start=1).map(lambda step, batch: (
        tf.where(step >= nan_from_step, np.nan, batch[0]), batch[1]))
  return ds


def colour_datasets():
  """Linear-evaluation splits whose mean colour gives the class."""
  palette = np.eye(3, dtype=np.float32) * 0.6 + 0.2
  splits = {}
  for seed, (name, n) in enumerate((("train", 48), ("validation", 24),
                                    ("test", 24))):
    rng = np.random.RandomState(seed)
    labels = rng.permutation(np.arange(n) % CLASSES).astype(np.int32)
    images = np.clip(palette[labels][:, None, None, :] +
                     0.1 * rng.normal(size=(n, IMAGE, IMAGE, 3)), 0, 1)
    splits[name] = tf.data.Dataset.from_tensor_slices(
        (images.astype(np.float32), labels)).batch(8)
  return splits


def linear_config() -> config_lib.LinearEvalConfig:
  return config_lib.LinearEvalConfig(epochs=EPOCHS, batch_size=8,
                                     learning_rates=(0.3, 1.0))


def tiny_encoder(seed=0) -> keras.Model:
  keras.utils.set_random_seed(seed)
  return models.resnet(18, width=0.0625, input_shape=(IMAGE, IMAGE, 3))


def _kill_self():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _strategy(replicas, multi_worker):
  if multi_worker:
    return tf.distribute.MultiWorkerMirroredStrategy()
  if replicas > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")])
  return None


def run_pretrain(workdir, sleep, die_in_save, strategy=None, **train):
  real_loop = train_lib.Trainer.train_loop

  def train_loop(self, iterator, steps):
    metrics = real_loop.__get__(self, type(self))(iterator, steps)
    print(f"step {int(self.step.numpy())}", flush=True)
    time.sleep(sleep)
    return metrics

  train_lib.Trainer.train_loop = train_loop
  if die_in_save:
    real_record = tf.train.CheckpointManager._record_state

    def record_state(manager):
      # Called once the checkpoint's files are complete, before the
      # `checkpoint` index file names it.
      if manager.latest_checkpoint.endswith(f"-{die_in_save}"):
        _kill_self()
      real_record(manager)

    tf.train.CheckpointManager._record_state = record_state
  train_lib.pretrain(tiny_config(**train), workdir, strategy,
                     dataset_fn=dataset_fn, verbose=False)


def run_linear(workdir, sleep):
  tf.config.experimental.enable_op_determinism()
  real_end = linear_backup.EpochRecorder.on_epoch_end

  def on_epoch_end(self, epoch, logs=None):
    real_end(self, epoch, logs)
    print(f"epoch {self.index * EPOCHS + epoch + 1}", flush=True)
    time.sleep(sleep)

  linear_backup.EpochRecorder.on_epoch_end = on_epoch_end
  classifier, _ = linear_eval.linear_eval(
      tiny_encoder(), config_lib.DataConfig(), linear_config(),
      datasets=colour_datasets(), workdir=workdir, verbose=False)
  np.savez(os.path.join(workdir, "linear.npz"),
           *classifier.get_layer("linear").get_weights())


def export_model(base, die_in_export):
  encoder = tiny_encoder()
  classifier = classifier_lib.build_classifier(encoder, CLASSES)
  if die_in_export:
    real_write = export._write_saved_model

    def write(module, path, signatures):
      real_write(module, path, signatures)
      _kill_self()  # The version is complete but not yet renamed into place.

    export._write_saved_model = write
  print(export.export_classifier(classifier, base, image_size=IMAGE,
                                 encoder=encoder), flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["pretrain", "linear", "export"])
  parser.add_argument("path")
  parser.add_argument("--sleep", type=float, default=0.0)
  parser.add_argument("--die_in_save", type=int, default=0)
  parser.add_argument("--die_in_export", action="store_true")
  parser.add_argument("--replicas", type=int, default=1)
  parser.add_argument("--multi_worker", action="store_true")
  parser.add_argument("--queue_size", type=int, default=0)
  parser.add_argument("--momentum", type=float, default=0.0)
  args = parser.parse_args()
  if args.mode == "pretrain":
    queue = {}
    if args.queue_size:
      queue = dict(queue_size=args.queue_size,
                   key_encoder_momentum=args.momentum)
    run_pretrain(args.path, args.sleep, args.die_in_save,
                 _strategy(args.replicas, args.multi_worker), **queue)
  elif args.mode == "linear":
    run_linear(args.path, args.sleep)
  else:
    export_model(args.path, args.die_in_export)


if __name__ == "__main__":
  main()
