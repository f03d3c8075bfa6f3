"""Every ```python block of README.md runs as written, on mocked CIFAR-10.

The blocks run in README order in one namespace per block, in a scratch
directory, with TFDS mocked (random images; the metadata's split sizes are
those below). The SavedModel block reads the quickstart's
`runs/first/export/1`; here that is the export of the notebook block's run.
Blocks that show a signature rather than code are fenced without a
language.
"""

import os
import pathlib
import re
import shutil
import sys

import pytest

import conftest
# What the README blocks import, named so that Bazel's runfiles hold it
# (deps mirror imports); the blocks import it themselves.
import supcon_tf  # pylint: disable=unused-import
from supcon_tf import keras_model  # pylint: disable=unused-import
from supcon_tf import pipeline  # pylint: disable=unused-import

README = pathlib.Path(__file__).absolute().parent.parent / "README.md"


def python_blocks():
  """`[(line number, source)]` of the ```python blocks, in order."""
  text = README.read_text()
  return [(text[:m.start()].count("\n") + 2, m.group(1))
          for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def test_readme_has_python_blocks():
  blocks = python_blocks()
  assert len(blocks) >= 3
  for line, source in blocks:  # Each parses on its own.
    compile(source, f"README.md:{line}", "exec")


@pytest.mark.slow
def test_every_python_block_runs(tmp_path, monkeypatch):
  blocks = python_blocks()
  monkeypatch.chdir(tmp_path)
  # 300 records per split; 512 training images in the metadata, so that a
  # batch of 256 makes two steps per epoch.
  with conftest.mock_tfds(tmp_path, num_examples=300, num_train=512,
                          num_test=300):
    for line, source in sorted(blocks, key=_reads_the_quickstart_run):
      if _reads_the_quickstart_run((line, source)):
        shutil.copytree("runs/nb", "runs/first")
      namespace = {"__name__": f"readme_block_{line}"}
      try:
        exec(compile(source, f"README.md:{line}", "exec"), namespace)  # pylint: disable=exec-used
      except Exception as e:
        raise AssertionError(f"README.md block at line {line} failed: "
                             f"{type(e).__name__}: {e}") from e
  assert os.path.exists("runs/first/export/1/saved_model.pb")


def _reads_the_quickstart_run(block) -> bool:
  """Sort key: blocks that read `runs/first` run after the others."""
  return "runs/first" in block[1]


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
