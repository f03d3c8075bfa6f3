"""Shared test set-up: runs before any test module touches TensorFlow."""

import contextlib
import math
import os
import resource
import signal
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from supcon_tf import config as config_lib  # pylint: disable=g-import-not-at-top
from supcon_tf import distributed  # pylint: disable=g-import-not-at-top
from supcon_tf import models  # pylint: disable=g-import-not-at-top

# Four logical CPUs let MirroredStrategy tests run 2- and 4-replica
# training on a CPU-only machine. Must happen before TF initialises devices.
LOGICAL_CPUS = 4
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * LOGICAL_CPUS)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes more than ~20 s; excluded by -m 'not slow'.")
  config.addinivalue_line(
      "markers", "long: multi-process runs of minutes each (distributed "
      "kill -9 recovery, the two-worker command line); run by -m long.")


_strategies_made = [0]


def make_mirrored(replicas):
  """A MirroredStrategy over `replicas` logical CPUs.

  Each strategy gets its own collective-key range: strategies of different
  sizes in one process would otherwise share group keys and abort.
  """
  _strategies_made[0] += 1
  devices = [d.name for d in tf.config.list_logical_devices("CPU")]
  return distributed.make_strategy(
      "mirrored", devices[:replicas],
      collective_key_base=10_000 * _strategies_made[0])


@contextlib.contextmanager
def mock_tfds(tmp_path, name="cifar10", num_examples=12, num_train=20,
              num_test=10):
  """Mocks TFDS `name` with `num_examples` random records per split.

  The split sizes recorded in the metadata (`num_train`, `num_test`) are what
  `dataset_info` reports; the mocked reader yields `num_examples` records for
  any split.
  """
  metadata_dir = tmp_path / "tfds_metadata"
  builder = tfds.builder(name, data_dir=str(metadata_dir))
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name="train", shard_lengths=[num_train],
                          num_bytes=0, filename_template=None),
      tfds.core.SplitInfo(name="test", shard_lengths=[num_test],
                          num_bytes=0, filename_template=None),
  ]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(num_examples=num_examples,
                              data_dir=str(metadata_dir)):
    yield


class InfGradientOnReplica(keras.layers.Layer):
  """Identity whose backward pass sends inf on one replica while `active`.

  Injects an overflow into one replica's gradients only (the layers below
  it), as float16 loss scaling produces when one replica's batch overflows.

  Args:
    replica: the replica id whose gradients become inf.
    active: a boolean `tf.Variable`; set it False for clean steps.
  """

  def __init__(self, replica, active, **kwargs):
    super().__init__(**kwargs)
    self.replica = replica
    # A closure: Keras would track a variable attribute as a weight.
    self._active = active.read_value

  def call(self, x):
    @tf.custom_gradient
    def identity(x):
      def grad(dy):
        ctx = tf.distribute.get_replica_context()
        here = tf.equal(ctx.replica_id_in_sync_group, self.replica)
        return tf.where(here & self._active(),
                        tf.constant(float("inf"), dy.dtype), dy)
      return tf.identity(x), grad
    return identity(x)


def overflow_encoder(image_size, overflow):
  """Flatten -> Dense -> `InfGradientOnReplica(1, overflow)`; build in scope."""
  return keras.Sequential([
      keras.Input((image_size, image_size, 3)), keras.layers.Flatten(),
      keras.layers.Dense(16), InfGradientOnReplica(1, overflow)])


@contextlib.contextmanager
def file_size_limit(limit_bytes):
  """Writes past `limit_bytes` in any file fail (EFBIG), as on a full disk."""
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, old_limit[1]))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


def logsumexp(values):
  """float64 log-sum-exp of a list of numbers (reference losses)."""
  values = np.asarray(values, np.float64)
  top = values.max()
  return float(top + np.log(np.sum(np.exp(values - top))))


def reference_anchor_loss(positives, negatives, *, denominator, summation,
                          temperature, scale_by_temperature):
  """One anchor's SupCon loss from its positive and negative logits.

  The NumPy reference of `supcon_tf.supcon_loss` per anchor, shared by the
  loss tests with and without a queue.

  Returns:
    The loss, or None when the anchor has no term (no positive, or no
    negative with `denominator="only_negatives"`).
  """
  if not positives or (denominator == "only_negatives" and not negatives):
    return None
  log_negatives = logsumexp(negatives) if negatives else -np.inf
  log_all = logsumexp(positives + negatives)
  log_probs = []
  for logit in positives:
    if denominator == "all":
      log_den = log_all
    elif denominator == "one_positive":
      log_den = float(np.logaddexp(logit, log_negatives))
    else:
      log_den = log_negatives
    log_probs.append(logit - log_den)
  if summation == "out":
    loss = -np.mean(log_probs)
  else:
    loss = math.log(len(log_probs)) - logsumexp(log_probs)
  return loss * temperature if scale_by_temperature else loss


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
  assert os.path.isfile(path), path
  assert os.path.getsize(path) > 1000, os.path.getsize(path)
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC


def write_scalars(event_dir, steps, method="supcon"):
  """TF2 summaries like a pretraining run's, at `steps`."""
  writer = tf.summary.create_file_writer(str(event_dir))
  with writer.as_default():
    for step in steps:
      tf.summary.scalar("loss", 5.0 - 0.1 * step, step=step)
      tf.summary.scalar("learning_rate", 0.01 * step, step=step)
      tf.summary.scalar("nn_top1" if method != "ce" else "accuracy",
                        0.1 * step, step=step)
      tf.summary.scalar("images_per_second", 100.0 + step, step=step)
  writer.close()


def queue_state(memory):
  """`(queue, labels, pointer)` of a `memory.KeyMemory`, as NumPy / int."""
  return (memory.queue.numpy(), memory.queue_labels.numpy(),
          int(memory.queue_pointer.numpy()))


# Colour images for the evaluation tests: the class is the mean colour, so a
# random tiny encoder already separates them.
COLOUR_IMAGE = 8
# Class colours: corners of the RGB cube, pulled towards grey by `spread`.
_CORNERS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1],
                     [0, 1, 1]], np.float32)


def colour_data(n, num_classes, seed, *, noise=0.01, spread=0.8):
  """`n` images `[n, 8, 8, 3]` whose mean colour is their class's, + noise."""
  palette = 0.5 + spread * (_CORNERS[:num_classes] - 0.5)
  rng = np.random.RandomState(seed)
  labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
  images = (palette[labels][:, None, None, :] +
            noise * rng.normal(size=(n, COLOUR_IMAGE, COLOUR_IMAGE, 3)))
  return np.clip(images, 0, 1).astype(np.float32), labels


def tiny_encoder(seed=0):
  """A ResNet-18 at 1/16 width for `colour_data` images, seeded."""
  keras.utils.set_random_seed(seed)
  return models.resnet(18, width=0.0625,
                       input_shape=(COLOUR_IMAGE, COLOUR_IMAGE, 3))


def snapshot(model):
  """`[(path, value)]` of every weight, copied."""
  return [(w.path, np.array(w.numpy())) for w in model.weights]


def assert_unchanged(before, model):
  """Every weight of `model` is bit-identical to the `snapshot` `before`."""
  after = snapshot(model)
  assert [p for p, _ in before] == [p for p, _ in after]
  for (path, old), (_, new) in zip(before, after):
    assert old.tobytes() == new.tobytes(), f"{path} changed"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(*args, env=None, timeout=120, cwd=None):
  """Runs `python *args` with `supcon_tf` importable; returns the result."""
  env = dict(os.environ if env is None else env, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                if p]))
  return subprocess.run([sys.executable, *args], capture_output=True,
                        text=True, env=env, timeout=timeout, check=False,
                        cwd=cwd)


def tiny_train(method):
  """A two-step pretraining of a width-1/16 ResNet-18 on (mock) CIFAR-10."""
  return config_lib.TrainConfig(
      method=method, batch_size=8, steps=2, steps_per_loop=1,
      checkpoint_every=2,
      data=config_lib.DataConfig(dataset="cifar10", validation_fraction=0.2),
      model=config_lib.ModelConfig(width=0.0625, projection_dim=8),
      optimizer=config_lib.OptimizerConfig(name="sgd", learning_rate=0.1,
                                           warmup_epochs=0.0))


@contextlib.contextmanager
def global_policy(name):
  """Runs the block under Keras dtype policy `name`, then restores the old."""
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(name)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


@pytest.fixture
def mixed_bfloat16():
  """The test runs under the mixed_bfloat16 Keras policy."""
  with global_policy("mixed_bfloat16"):
    yield


def layers_of(model, cls):
  """The layers of `model` (not nested ones) that are `cls` instances."""
  return [layer for layer in model.layers if isinstance(layer, cls)]


def random_images(batch, size, seed=0):
  """`[batch, size, size, 3]` float32 uniform in [0, 1)."""
  return np.random.default_rng(seed).random(
      (batch, size, size, 3), dtype=np.float32)
