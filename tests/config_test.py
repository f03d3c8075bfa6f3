"""Tests for supcon_tf.config: the settings objects, their checks and JSON."""

import dataclasses
import json
import math
import sys

import pytest

from supcon_tf import config as config_lib


def test_json_round_trip_rebuilds_nested_configs():
  config = dataclasses.replace(
      config_lib.BUDGET_TRAIN, seed=7,
      loss=config_lib.LossConfig(temperature=0.2, positives_cap=3))
  again = config_lib.from_dict(config_lib.TrainConfig,
                               json.loads(config_lib.to_json(config)))
  assert again == config
  assert isinstance(again.loss, config_lib.LossConfig)


def test_from_dict_refuses_unknown_keys():
  values = config_lib.to_dict(config_lib.TrainConfig())
  values["model"]["depth"] = 18
  with pytest.raises(ValueError, match=r"Unknown ModelConfig keys: \['depth'\]"):
    config_lib.from_dict(config_lib.TrainConfig, values)


@pytest.mark.parametrize("bad", [0, -0.1, math.nan, None])
def test_every_temperature_check_refuses_what_is_not_positive(bad):
  with pytest.raises(ValueError, match="temperature must be > 0"):
    config_lib.check_temperature(bad)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    config_lib.LossConfig(temperature=bad)
  with pytest.raises(ValueError, match="EvalConfig.temperature must be > 0"):
    config_lib.EvalConfig(temperature=bad)
  config_lib.check_temperature(0.07)


def test_choices_name_the_value_and_the_valid_ones():
  with pytest.raises(ValueError, match="head.*'mlp_xl'.*mlp_bn"):
    config_lib.ModelConfig(head="mlp_xl")
  with pytest.raises(ValueError, match="corruptions"):
    config_lib.EvalConfig(corruptions="imagenet_c")


def test_encoder_names_outside_the_known_sources_fail_early():
  config_lib.ModelConfig(encoder="keras_applications:MobileNetV3Small")
  with pytest.raises(ValueError, match="keras_apps:X"):
    config_lib.ModelConfig(encoder="keras_apps:X")


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
