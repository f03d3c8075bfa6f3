"""Every flagfile in experiments/ resolves to valid configurations."""

import pathlib
import sys

import pytest

from supcon_tf import cli

# Not resolve(): under Bazel the flagfiles are runfiles beside this file.
EXPERIMENTS = pathlib.Path(__file__).absolute().parent.parent / "experiments"
FLAGFILES = sorted(EXPERIMENTS.glob("*.cfg"))


def resolve(flagfile, monkeypatch):
  """`(train, linear, mode)` that `supcon-tf --flagfile=<flagfile>` runs.

  With `flagfile=None`: what plain `supcon-tf --workdir=...` runs.
  """
  # Nested --flagfile paths are relative to the repository root.
  monkeypatch.chdir(EXPERIMENTS.parent)
  extra = [f"--flagfile={flagfile}"] if flagfile else []
  cli.FLAGS(["supcon-tf", *extra, "--workdir=unused"])
  try:
    return cli.train_config(), cli.linear_config(), cli.FLAGS.mode
  finally:
    cli.FLAGS.unparse_flags()


def test_there_are_flagfiles():
  assert len(FLAGFILES) >= 10


@pytest.mark.parametrize("flagfile", FLAGFILES, ids=lambda p: p.stem)
def test_flagfile_resolves(flagfile, monkeypatch):
  train, linear, mode = resolve(flagfile, monkeypatch)
  assert mode in cli.MODES
  assert train.method == flagfile.stem.split("_")[1]  # <dataset>_<method>_
  assert linear.learning_rates
  first_line = flagfile.read_text().splitlines()[0]
  assert first_line.startswith("# "), "each flagfile opens with what it is"


def test_defaults_are_the_measured_budget_configuration(monkeypatch):
  # README and RESULTS.md report one run for both.
  budget = resolve(EXPERIMENTS / "cifar10_supcon_cpu30.cfg", monkeypatch)
  assert resolve(None, monkeypatch) == budget


def test_queue_flags_reach_the_train_config(monkeypatch):
  monkeypatch.chdir(EXPERIMENTS.parent)
  cli.FLAGS(["supcon-tf", "--workdir=unused", "--batch_size=64",
             "--queue_size=8192", "--key_encoder_momentum=0.99"])
  try:
    train = cli.train_config()
  finally:
    cli.FLAGS.unparse_flags()
  assert (train.queue_size, train.key_encoder_momentum) == (8192, 0.99)


# The official PyTorch SupContrast commands (README; main_supcon.py and
# main_ce.py defaults otherwise): SGD, momentum 0.9, weight decay 1e-4 coupled
# into the gradient, batch 1024. Its SupCon / SimCLR loss is times
# tau / 0.07; its cross-entropy is unscaled.
OFFICIAL = {
    "supcon": dict(learning_rate=0.5, temperature=0.1, epochs=1000),
    "simclr": dict(learning_rate=0.5, temperature=0.5, epochs=1000),
    "ce": dict(learning_rate=0.8, temperature=None, epochs=500),
}
OFFICIAL_DECAY, OFFICIAL_MOMENTUM = 1e-4, 0.9
CIFAR_RESNET50 = sorted(EXPERIMENTS.glob("cifar*_resnet50.cfg"))


def test_every_resnet50_recipe_is_checked():
  assert len(CIFAR_RESNET50) == 6
  assert {p.name for p in EXPERIMENTS.glob("*_resnet50.cfg")} == (
      {p.name for p in CIFAR_RESNET50} | {"imagenet_supcon_resnet50.cfg"})


@pytest.mark.parametrize("flagfile", CIFAR_RESNET50, ids=lambda p: p.stem)
def test_paper_recipe_updates_match_the_official_code(flagfile, monkeypatch):
  """Same gradient and decay steps as the official PyTorch code.

  SupCon / SimCLR: SGD on tau * L at lr 7.14 == SGD on (tau / 0.07) * L at
  lr 0.5. Decay: PyTorch's coupled decay wd at lr eta under momentum mu
  shrinks weights like Keras's decoupled decay with lr * wd = eta * wd /
  (1 - mu).
  """
  train, _, _ = resolve(flagfile, monkeypatch)
  official = OFFICIAL[train.method]
  assert train.batch_size == 1024 and train.epochs == official["epochs"]
  assert train.optimizer.name == "sgd" and not train.optimizer.scale_by_batch
  assert train.optimizer.momentum == OFFICIAL_MOMENTUM
  # The official code crops with torchvision's RandomResizedCrop.
  assert train.data.crop_sampling == "torchvision"
  if train.method == "ce":
    ours_scale, official_scale = 1.0, 1.0
  else:
    assert train.loss.temperature == official["temperature"]
    assert train.loss.scale_by_temperature
    ours_scale = train.loss.temperature
    official_scale = official["temperature"] / 0.07
  gradient_step = train.optimizer.learning_rate * ours_scale
  assert gradient_step == pytest.approx(
      official["learning_rate"] * official_scale, rel=1e-3)
  decay_step = train.optimizer.learning_rate * train.optimizer.weight_decay
  assert decay_step == pytest.approx(
      official["learning_rate"] * OFFICIAL_DECAY / (1 - OFFICIAL_MOMENTUM),
      rel=2e-2)


def test_imagenet_recipe_is_the_simclr_lars_rule(monkeypatch):
  """LARS at 0.3 x batch / 256 with decay 1e-6 inside LARS (no conversion)."""
  train, _, _ = resolve(EXPERIMENTS / "imagenet_supcon_resnet50.cfg",
                        monkeypatch)
  assert train.optimizer.name == "lars" and train.optimizer.scale_by_batch
  assert train.optimizer.learning_rate == 0.3
  assert train.optimizer.weight_decay == 1e-6
  assert train.data.image_size == 224 and train.model.stem == "imagenet"


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
