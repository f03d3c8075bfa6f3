"""Tests of supcon_tf.precision: what `auto` resolves to."""

import sys

import pytest
import tensorflow as tf

from supcon_tf import precision


@pytest.mark.parametrize("flags, expected", [
    ("fpu vme avx2 fma", False),              # AVX2 only: bf16 emulated
    ("avx512f avx512bw avx512_bf16", True),   # Cooper Lake, Zen 4
    ("avx512f amx_tile amx_bf16", True),      # Sapphire Rapids
    ("avx512f avx512_bf16x", False),          # a longer word, not the flag
])
def test_cpu_has_bfloat16_reads_the_cpu_flags(tmp_path, flags, expected):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
  assert precision.cpu_has_bfloat16(str(cpuinfo)) is expected
  assert not precision.cpu_has_bfloat16(str(tmp_path / "missing"))


def test_auto_precision_resolves_and_others_pass_through():
  for policy in ("float32", "mixed_bfloat16", "mixed_float16"):
    assert precision.resolve(policy) == policy
  if tf.config.list_physical_devices("GPU"):
    pytest.skip("auto follows the GPU's compute capability there")
  expected = ("mixed_bfloat16" if precision.cpu_has_bfloat16() else "float32")
  assert precision.resolve("auto") == expected


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
