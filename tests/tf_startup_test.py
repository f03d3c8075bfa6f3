"""Tests for supcon_tf.tf_startup: importing TensorFlow quietly."""

import os
import sys

import pytest

import conftest
from supcon_tf import tf_startup


def test_startup_noise_is_dropped_and_other_lines_kept():
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  code = """
import sys
from supcon_tf import tf_startup
tf = tf_startup.import_tensorflow()
assert tf.constant(2) + 2 == 4
print("after import", file=sys.stderr)
"""
  result = conftest.python("-c", code, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "after import" in result.stderr
  for noise in ("cuInit", "absl::InitializeLog", "Could not find cuda",
                "cpu_feature_guard"):
    assert noise not in result.stderr, result.stderr[-3000:]
  noise = ("WARNING: All log messages before absl::InitializeLog() is called"
           " are written to STDERR\n"
           "I0000 00:00:1.2 3 cudart_stub.cc:31] Could not find cuda drivers "
           "on your machine, GPU will not be used.\n"
           "E0000 00:00:1.2 3 cuda_platform.cc:52] failed call to cuInit: "
           "INTERNAL: CUDA error\n")
  real = "W0000 00:00:1.2 3 cache_dataset_ops.cc:912] The calling iterator\n"
  assert [l for l in (noise + real).splitlines(True)
          if not tf_startup.STARTUP_NOISE.search(l)] == [real]


def test_tensorflow_notices_are_startup_noise():
  # TensorFlow 2.21 prints the oneDNN notice twice while it is imported,
  # even at TF_CPP_MIN_LOG_LEVEL=1; other builds print the CPU notice.
  noise = ("I0000 00:00:1796585920.885242   11139 port.cc:153] oneDNN custom "
           "operations are on. You may see slightly different numerical "
           "results due to floating-point round-off errors from different "
           "computation orders. To turn them off, set the environment "
           "variable `TF_ENABLE_ONEDNN_OPTS=0`.\n"
           "I0000 00:00:1.2 3 cpu_feature_guard.cc:210] This TensorFlow binary"
           " is optimized to use available CPU instructions in "
           "performance-critical operations.\n"
           "To enable the following instructions: AVX2 AVX512F FMA, in other "
           "operations, rebuild TensorFlow with the appropriate compiler "
           "flags.\n")
  real = ("W0000 00:00:1.2 3 port.cc:160] oneDNN custom operations failed\n"
          "E0000 00:00:1.2 3 cpu_feature_guard.cc:80] This TensorFlow binary "
          "was compiled to use AVX, which this CPU lacks\n"
          "To enable the GPU, install its drivers\n")
  assert [l for l in (noise + real).splitlines(True)
          if not tf_startup.STARTUP_NOISE.search(l)] == real.splitlines(True)


def test_module_does_not_import_tensorflow():
  result = conftest.python(
      "-c", "import sys\nfrom supcon_tf import tf_startup\n"
      "print(sorted(m for m in sys.modules if m.split('.')[0] in "
      "('tensorflow', 'keras')))")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.slow  # A fresh process imports TensorFlow: ~15 s on 2 cores.
def test_split_cpu_makes_logical_devices_at_warning_level():
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  code = """
import os
from supcon_tf import tf_startup
tf_startup.split_cpu(3)
import tensorflow as tf
print(len(tf.config.list_logical_devices("CPU")),
      os.environ["TF_CPP_MIN_LOG_LEVEL"])
"""
  result = conftest.python("-c", code, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["3", "1"], result.stdout


def test_a_log_level_the_user_set_is_kept(monkeypatch):
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
  tf = tf_startup.import_tensorflow()
  assert tf is sys.modules["tensorflow"]
  assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_one_device_leaves_the_devices_as_they_are():
  # TensorFlow is initialised here (conftest split the CPU in 4): a second
  # split would raise, so one device must not touch the configuration.
  tf = tf_startup.import_tensorflow()
  before = tf.config.list_logical_devices("CPU")
  tf_startup.split_cpu(1)
  assert tf.config.list_logical_devices("CPU") == before


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
