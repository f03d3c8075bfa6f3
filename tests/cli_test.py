"""The command line: flagfiles, start-up, help and console output."""

import dataclasses
import json
import os
import pathlib
import re
import sys

from absl import logging
import pytest

import conftest
from supcon_tf import cli
from supcon_tf import report_table

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
      {p.name for p in CIFAR_RESNET50} | {
          "imagenet_supcon_resnet50.cfg",
          "imagenet_supcon_momentum_resnet50.cfg"})


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


def test_momentum_recipes_add_only_the_queue(monkeypatch):
  """Memory recipes = their base recipe + batch, queue and key encoder.

  The CPU-budget ones also keep the half-epoch warm-up they were measured
  with (the default's longer warm-up came later).
  """
  pairs = [("imagenet_supcon_momentum_resnet50", "imagenet_supcon_resnet50",
            None),
           ("cifar10_supcon_b64_queue_cpu30", "cifar10_supcon_cpu30", 0.5),
           ("cifar10_supcon_b128_queue_cpu30", "cifar10_supcon_cpu30", 0.5)]
  for name, base, warmup in pairs:
    train, linear, _ = resolve(EXPERIMENTS / f"{name}.cfg", monkeypatch)
    want, want_linear, _ = resolve(EXPERIMENTS / f"{base}.cfg", monkeypatch)
    if warmup is not None:
      want = dataclasses.replace(want, optimizer=dataclasses.replace(
          want.optimizer, warmup_epochs=warmup))
    assert train.queue_size >= train.batch_size * train.data.num_views * 8
    assert 0.9 <= train.key_encoder_momentum < 1.0
    assert train == dataclasses.replace(
        want, batch_size=train.batch_size, queue_size=train.queue_size,
        key_encoder_momentum=train.key_encoder_momentum), name
    assert linear == want_linear


def test_flags_are_parsed_and_checked_without_tensorflow(tmp_path):
  """A bad flag answers at once: TensorFlow is imported after the checks."""
  code = f"""
import sys
from supcon_tf import cli
from supcon_tf import tf_startup
cli.FLAGS(["supcon-tf", "--workdir={tmp_path}", "--steps=30"])
cli.train_config(), cli.linear_config(), cli.data_config()
cli.FLAGS.unparse_flags()
for argv in (["--batch_size=0"], ["--method=supcom"]):
  sys.argv = ["supcon-tf", "--workdir={tmp_path / 'bad'}", *argv]
  try:
    cli.run()
  except SystemExit as e:
    assert e.code == 1, e.code
  cli.FLAGS.unparse_flags()
print(sorted(m for m in sys.modules if m.split(".")[0] in
             ("tensorflow", "keras", "tensorflow_datasets")))
"""
  result = conftest.python("-c", code)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[-1] == "[]", result.stdout[-3000:]
  assert "batch_size must be > 0, got 0" in result.stderr
  assert "--method=supcom" in result.stderr
  assert not (tmp_path / "bad").exists()


def test_stage_error_on_an_empty_workdir_is_one_line(tmp_path):
  """TensorFlow is imported (the error is a stage's) and prints nothing."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  result = conftest.python("-m", "supcon_tf", "--mode=linear_eval",
                           f"--workdir={tmp_path}", env=env)
  assert result.returncode == 1, result.stderr[-3000:]
  assert len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
  assert result.stderr.startswith(
      "supcon-tf: error: no pretraining checkpoint in "), result.stderr
  assert result.stdout == ""
  assert not list(tmp_path.iterdir())  # Left as it was.


def _our_flags():
  names = {f.name for f in cli.FLAGS.flags_by_module_dict()[cli.__name__]}
  return names - {"help", "helpshort"}


def test_every_flag_is_in_one_help_group():
  grouped = [name for _, names in cli.FLAG_GROUPS for name in names]
  assert len(grouped) == len(set(grouped)), "a flag in two groups"
  assert set(grouped) == _our_flags()


@pytest.mark.parametrize("flag", ["--help", "-?", "--helpshort"])
def test_help_lists_our_flags_by_stage_on_a_screen(flag):
  result = conftest.python("-m", "supcon_tf", flag)
  assert result.returncode == 0, result.stderr[-3000:]
  text = result.stdout
  assert text == cli.grouped_help() + "\n"
  lines = text.splitlines()
  assert max(len(line) for line in lines) <= 80
  titles = [title for title, _ in cli.FLAG_GROUPS]
  assert titles[1:] == ["data", "model", "loss", "optimisation",
                        "distribution", "linear evaluation",
                        "export / report", "any other setting"]
  starts = [lines.index(f"{title}:") for title in titles]
  assert starts == sorted(starts)
  for begin, end in zip(starts, starts[1:] + [len(lines)]):
    assert end - begin <= 40, f"group at line {begin} is {end - begin} lines"
  shown = re.findall(r"^  --(\w+)", text, re.MULTILINE)
  assert sorted(shown) == sorted(_our_flags())  # Each once; absl's hidden.
  for default in ("--batch_size=256", "--method=supcon", "--blur=false",
                  "--linear_learning_rates=0.3,1.0,3.0", "--steps (unset)"):
    assert re.search(rf"^  {re.escape(default)}\s", text, re.MULTILINE)
  assert "--helpfull" in text  # Where the rest is.


def test_helpfull_still_lists_everything():
  result = conftest.python("-m", "supcon_tf", "--helpfull")
  assert result.returncode == 1, result.stderr[-3000:]  # absl's exit status.
  assert "--batch_size" in result.stdout and "--verbosity" in result.stdout


def test_help_fits_a_screen():
  lines = cli.grouped_help().splitlines()
  # A three-line header, the group titles, a line a flag, a footer line.
  assert len(lines) == 3 + len(cli.FLAG_GROUPS) + len(_our_flags()) + 1
  assert len(lines) <= 68, len(lines)
  assert "--helpfull" in lines[-1]  # Says where the descriptions are.


def test_helpfull_describes_our_flags_by_stage():
  result = conftest.python("-m", "supcon_tf", "--helpfull")
  text = result.stdout
  assert text == cli.full_help() + "\n"
  lines = text.splitlines()
  assert max(len(line) for line in lines) <= 80
  starts = [lines.index(f"{title}:") for title, _ in cli.FLAG_GROUPS]
  assert starts == sorted(starts)
  # Our flags, each once; absl's (--helpxml, --pdb, --undefok ...) not.
  shown = re.findall(r"^  -+[\w?]+", text, re.MULTILINE)
  assert sorted(shown) == sorted(f"  --{name}" for name in _our_flags())
  assert "absl." not in text and "(default:" not in text
  # --set reads as our sentence, without absl's "; repeat this option".
  assert "repeat this option" not in text
  entry = lines[lines.index("any other setting:") + 1:]
  entry = " ".join(" ".join(entry[:entry.index("")]).split())
  assert entry.startswith("--set= Set any configuration field, dotted; "
                          "repeatable. ")
  assert entry.endswith(" --set=linear.epochs=20"), entry


REPORT = {
    "pretrain": {"method": "supcon", "steps": 1400, "final_loss": 4.56789,
                 "images_per_second": 1234.5, "seconds_this_run": 10.0},
    "linear_eval": {"test_top1": 0.6834, "test_top5": 0.9712, "top5_k": 5,
                    "learning_rate": 1.0, "epochs": 9,
                    "selected_on": "validation", "history": []},
    "export": "/runs/first/export/1",
    "evaluation": {"knn_top1": 0.652, "knn_k": 200,
                   "knn_train_examples": 10000, "test_examples": 2000,
                   "retrieval": {
                       "encoder": {"recall@1": 0.612, "map@r": 0.283},
                       "projection": {"recall@1": 0.598, "map@r": 0.371}},
                   "robustness": {"clean_top1": 0.68,
                                  "mean_corrupted_top1": 0.451},
                   "plots": [], "notes": []},
}


def test_summary_table_is_short_and_readable():
  table = report_table.summary_table(REPORT, "/runs/first")
  assert table.splitlines() == [
      "pretraining             supcon, 1,400 steps, final loss 4.5679, "
      "1,234 images/s",
      "linear eval top-1       68.3 % test, top-5 97.1 % (learning rate 1, 9 "
      "epochs, chosen on validation)",
      "k-NN top-1              65.2 % (k=200, 10,000 neighbours)",
      "retrieval (encoder)     recall@1 61.2 %, mAP@R 28.3 % "
      "(retrieval.json)",
      "retrieval (projection)  recall@1 59.8 %, mAP@R 37.1 % "
      "(retrieval.json)",
      "corrupted top-1         45.1 % mean, clean 68.0 %",
      "SavedModel              /runs/first/export/1",
      "report                  /runs/first/report.json",
  ]
  with_head = report_table.summary_table({"ce_head": {"test_top1": 0.7514}}, "/r")
  assert with_head.splitlines()[0] == (
      "CE head top-1  75.1 % test (the network CE trained, beside the linear "
      "probe on its frozen encoder)")
  only_pretrain = report_table.summary_table({"pretrain": REPORT["pretrain"]}, "/r")
  assert len(only_pretrain.splitlines()) == 2


@pytest.mark.parametrize("as_json", [False, True])
def test_report_goes_to_stdout_as_a_table_or_json(tmp_path, monkeypatch,
                                                  capsys, as_json):
  from supcon_tf import pipeline  # pylint: disable=g-import-not-at-top

  def fake_run(mode, workdir, **configs):
    del mode, workdir, configs
    print("pretraining 1,400 steps (progress)")
    return REPORT

  monkeypatch.setattr(pipeline, "run", fake_run)
  monkeypatch.setattr(logging.get_absl_handler(), "use_absl_log_file",
                      lambda *args, **kwargs: None)
  cli.FLAGS(["supcon-tf", f"--workdir={tmp_path}"] +
            (["--json"] if as_json else []))
  try:
    cli.main(["supcon-tf"])
  finally:
    cli.FLAGS.unparse_flags()
  out, err = capsys.readouterr()
  if as_json:
    assert json.loads(out) == REPORT  # Nothing else on stdout.
    assert "(progress)" in err
  else:
    assert out.startswith("pretraining 1,400 steps (progress)\n")
    assert out.endswith(report_table.summary_table(REPORT, str(tmp_path)) + "\n")
    assert "{" not in out


def test_train_examples_flag_reaches_the_data_config(monkeypatch):
  monkeypatch.chdir(EXPERIMENTS.parent)
  cli.FLAGS(["supcon-tf", "--workdir=unused", "--train_examples=64"])
  try:
    assert cli.data_config().train_examples == 64
    assert cli.train_config().data.train_examples == 64
  finally:
    cli.FLAGS.unparse_flags()
  assert resolve(None, monkeypatch)[0].data.train_examples is None

def _configs_of(argv):
  cli.FLAGS(["supcon-tf", "--workdir=unused", *argv])
  try:
    return cli.train_config(), cli.linear_config()
  finally:
    cli.FLAGS.unparse_flags()


def test_set_overrides_any_field():
  train, linear = _configs_of([
      "--temperature=0.2", "--set=loss.block_size=512",
      "--set=loss.scale_by_temperature=false",
      "--set=linear.learning_rates=[0.1]", "--set=linear.epochs=2"])
  assert train.loss.block_size == 512
  assert train.loss.scale_by_temperature is False
  assert train.loss.temperature == 0.2  # Flags still apply.
  assert list(linear.learning_rates) == [0.1] and linear.epochs == 2
  with pytest.raises(ValueError, match="loss has no 'tau'"):
    _configs_of(["--set=loss.tau=1"])


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
