"""Starting TensorFlow for the command line: quietly, on the devices asked.

TensorFlow takes seconds to import, so the command line validates its flags
first and only then calls `split_cpu`; nothing here imports TensorFlow at
module load.
"""

import os
import re
import sys
import tempfile

# What TensorFlow's C++ runtime prints at start-up whatever the run does:
# absl's pre-init notice, the CUDA driver probes of a machine without a GPU,
# the oneDNN notice (INFO, yet printed twice during the import even at
# TF_CPP_MIN_LOG_LEVEL=1, TensorFlow 2.21) and the CPU-instruction notice
# (INFO, two lines). Noise for the user; warnings and errors are not in it.
STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|^To enable the following instructions: .*rebuild TensorFlow with")


def import_tensorflow():
  """Imports TensorFlow and finds its devices, without the start-up noise.

  Unless the user set TF_CPP_MIN_LOG_LEVEL (then TensorFlow prints what it
  prints), INFO lines are switched off (level 1: warnings and errors stay)
  and the lines of `STARTUP_NOISE` are dropped from what TensorFlow
  writes to stderr meanwhile; every other line is passed on.

  Returns:
    The `tensorflow` module.
  """
  # pylint: disable=g-import-not-at-top
  if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
    import tensorflow as tf
    tf.config.list_physical_devices()  # Where the CUDA probe happens.
    return tf
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)  # C++ writes to fd 2, not sys.stderr.
    try:
      import tensorflow as tf
      tf.config.list_physical_devices()
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(True)
      sys.stderr.write("".join(
          line for line in lines if not STARTUP_NOISE.search(line)))
      sys.stderr.flush()
  return tf


def split_cpu(devices: int) -> None:
  """Imports TensorFlow quietly; `devices` > 1 splits the CPU into that many
  logical devices (replicas for MirroredStrategy on one machine)."""
  tf = import_tensorflow()
  if devices > 1:
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * devices)
