"""Tests of the run directory: layout, atomic writes, the same-run check."""

import json
import os
import sys

import pytest

from supcon_tf import config as config_lib
from supcon_tf import rundir


def test_layout_paths():
  assert rundir.pretrain_dir("w") == os.path.join("w", "pretrain")
  assert rundir.report_path("w") == os.path.join("w", "report.json")
  assert rundir.classifier_path("w") == os.path.join(
      "w", "linear_eval", "classifier.keras")
  assert rundir.export_dir("w") == os.path.join("w", "export")
  assert rundir.events_dir("w") == os.path.join("w", "pretrain", "train")
  assert rundir.checkpoints_dir("p") == os.path.join("p", "checkpoints")


def test_stage_file_paths():
  assert rundir.config_path("p") == os.path.join("p", "config.json")
  assert rundir.run_events_dir("p") == os.path.join("p", "train")
  assert rundir.checkpoint_prefix("c", 7) == os.path.join("c", "ckpt-7")
  assert rundir.checkpoint_index_path("c/ckpt-7") == "c/ckpt-7.index"
  assert rundir.linear_result_path("l") == os.path.join(
      "l", "linear_eval.json")
  assert rundir.linear_backup_dir("l") == os.path.join("l", "linear_backup")
  assert rundir.learning_rate_backup_dir("b", 2) == os.path.join("b", "lr2")
  assert rundir.plot_path("w", rundir.EMBEDDINGS_PLOT) == os.path.join(
      "w", "plots", "embeddings.png")
  assert rundir.robustness_path("w") == os.path.join("w", "robustness.json")
  assert rundir.retrieval_path("w") == os.path.join("w", "retrieval.json")


def test_atomic_write_text_and_bytes(tmp_path):
  path = str(tmp_path / "f")
  rundir.atomic_write(path, "old")
  rundir.atomic_write(path, b"\x00new")
  assert open(path, "rb").read() == b"\x00new"
  assert os.listdir(tmp_path) == ["f"]  # No temporary file left behind.


def test_changed_settings_names_dotted_fields(tmp_path):
  path = str(tmp_path / "s.json")
  assert rundir.changed_settings(path, {"a": 1}) == {}  # Nothing stored.
  rundir.atomic_write(path, json.dumps({"a": 1, "b": {"c": [1, 2]}, "d": 0}))
  assert rundir.changed_settings(path, {"a": 1, "b": {"c": (1, 2)}, "d": 0}) == {}
  assert rundir.changed_settings(path, {"a": 2, "b": {"c": [1]}, "d": 0},
                                 ignore=("a",)) == {"b.c": ([1, 2], [1])}


def test_config_round_trip_and_resume_check(tmp_path):
  config = config_lib.TrainConfig()
  rundir.check_resumable(str(tmp_path), config)
  assert rundir.load_config(str(tmp_path)) == config
  changed = config_lib.TrainConfig(
      loss=config_lib.LossConfig(temperature=0.5))
  with pytest.raises(rundir.TrainingError, match=r"loss\.temperature"):
    rundir.check_resumable(str(tmp_path), changed)


def test_resume_of_a_run_stored_before_a_field_existed(tmp_path):
  # A config.json without a newer field resumes when the field is at its
  # default, and is refused when the field is set to something else.
  config = config_lib.TrainConfig(steps=10)
  stored = config_lib.to_dict(config)
  del stored["data"]["crop_sampling"]
  (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(stored))
  rundir.check_resumable(str(tmp_path), config)
  other = config_lib.TrainConfig(
      steps=10, data=config_lib.DataConfig(crop_sampling="torchvision"))
  with pytest.raises(rundir.TrainingError,
                     match="data.crop_sampling: 'simclr' -> 'torchvision'"):
    rundir.check_resumable(str(tmp_path), other)


def test_store_config_changes_only_the_length(tmp_path):
  def length(config):
    return config.steps

  workdir = str(tmp_path)
  short = config_lib.TrainConfig(steps=4)
  assert rundir.store_config(workdir, short, step=0, length=length) is None
  assert rundir.load_config(workdir) == short
  assert rundir.store_config(workdir, short, step=4, length=length) is None
  longer = config_lib.TrainConfig(steps=6)
  assert rundir.store_config(workdir, longer, step=4, length=length) == 4
  assert rundir.load_config(workdir) == longer
  with pytest.raises(rundir.TrainingError, match="already trained 6 steps"):
    rundir.store_config(workdir, short, step=6, length=length)
  other = config_lib.TrainConfig(
      steps=6, loss=config_lib.LossConfig(temperature=0.5))
  with pytest.raises(rundir.TrainingError, match=r"loss\.temperature"):
    rundir.store_config(workdir, other, step=6, length=length)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
