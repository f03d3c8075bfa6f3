"""Shared test set-up: runs before any test module touches TensorFlow."""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from supcon_tf import distributed  # pylint: disable=g-import-not-at-top

# Four logical CPUs let MirroredStrategy tests run 2- and 4-replica
# training on a CPU-only machine. Must happen before TF initialises devices.
LOGICAL_CPUS = 4
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * LOGICAL_CPUS)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes more than ~20 s; excluded by -m 'not slow'.")


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
