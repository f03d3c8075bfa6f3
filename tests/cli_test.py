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


def test_paper_recipe_updates_match_the_official_code(monkeypatch):
  """SGD on tau * L at lr 7.14 == SGD on (tau / 0.07) * L at lr 0.5."""
  train, _, _ = resolve(EXPERIMENTS / "cifar10_supcon_resnet50.cfg",
                        monkeypatch)
  assert train.batch_size == 1024 and train.epochs == 1000
  assert train.loss.temperature == 0.1 and train.loss.scale_by_temperature
  assert not train.optimizer.scale_by_batch
  official_lr, official_decay, momentum = 0.5, 1e-4, 0.9
  gradient_step = train.optimizer.learning_rate * train.loss.temperature
  assert gradient_step == pytest.approx(
      official_lr * train.loss.temperature / 0.07, rel=1e-3)
  decay_step = train.optimizer.learning_rate * train.optimizer.weight_decay
  assert decay_step == pytest.approx(
      official_lr * official_decay / (1 - momentum), rel=1e-2)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
