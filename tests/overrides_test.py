"""Tests for supcon_tf.overrides: dotted field=value assignments."""

import sys

import pytest

from supcon_tf import config as config_lib
from supcon_tf import overrides


def test_override_replaces_nested_and_top_level_fields():
  base = config_lib.TrainConfig()
  got = overrides.override(base, [
      "loss.block_size=512", "loss.scale_by_temperature=false", "steps=10",
      "data.dataset=folder:/images", "optimizer.learning_rate=1e-3",
      "loss.positives_cap=none"])
  assert got.loss.block_size == 512
  assert got.loss.scale_by_temperature is False
  assert got.steps == 10
  assert got.data.dataset == "folder:/images"
  assert got.optimizer.learning_rate == pytest.approx(1e-3)
  assert got.loss.positives_cap is None
  assert got.model == base.model  # Untouched sections stay equal.
  assert base.loss.block_size is None  # The input is not modified.


def test_override_of_a_linear_config_takes_lists():
  got = overrides.override(config_lib.LinearEvalConfig(),
                            ["learning_rates=[0.1, 1.0]", "epochs=3"])
  assert list(got.learning_rates) == [0.1, 1.0] and got.epochs == 3


@pytest.mark.parametrize("item,message", [
    ("loss.tau=1", "loss has no 'tau'; it has ['block_size'"),
    ("foo.bar=1", "TrainConfig has no 'foo'"),
    ("loss=3", "TrainConfig.loss is a section: set one of its fields"),
    ("steps.x=1", "TrainConfig.steps is a value, not a section"),
    ("steps", "is not field=value"),
    ("loss.temperature=-1", "temperature must be > 0, got -1"),
])
def test_override_errors_name_the_field(item, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[")):
    overrides.override(config_lib.TrainConfig(), [item])


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
