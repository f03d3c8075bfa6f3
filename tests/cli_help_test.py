"""Tests of supcon_tf.cli_help: the grouped `--help` on its own flags."""

import sys

from absl import flags
import pytest

from supcon_tf import cli_help


@pytest.fixture
def flag_values():
  values = flags.FlagValues()
  flags.DEFINE_integer("batch_size", 256, "Global batch size.",
                       flag_values=values)
  flags.DEFINE_enum("method", "supcon", ["supcon", "ce"],
                    "Pretraining objective.", flag_values=values)
  flags.DEFINE_string("workdir", None, "Directory of the run. " * 8,
                      flag_values=values)
  flags.DEFINE_list("rates", ["0.1", "1"], "Rates.", flag_values=values)
  return values


def test_groups_in_order_with_defaults_as_typed(flag_values):
  text = cli_help.grouped_help(flag_values, (
      ("run", ("workdir",)), ("loss", ("method", "batch_size", "rates"))))
  lines = text.splitlines()
  assert lines.index("run:") < lines.index("loss:")
  assert max(len(line) for line in lines) <= 80
  assert "  --workdir (unset)" in text
  assert "  --batch_size=256" in text and "  --rates=0.1,1" in text
  # absl's "<supcon|ce>: " prefix becomes a sentence at the end.
  method = next(l for l in lines if l.startswith("  --method=supcon"))
  assert "<" not in method
  assert "One of: supcon, ce." in text
  # A long description wraps under the help column.
  workdir = lines.index("run:") + 1
  assert lines[workdir] == ("  --workdir (unset)".ljust(30) +
                            "Directory of the run. Directory of the run.")
  assert lines[workdir + 1].startswith(" " * 30 + "Directory")


def test_install_replaces_absl_help_once(flag_values, capsys):
  calls = []

  def text():
    calls.append(1)
    return "our help"

  flags.DEFINE_flag(flags.BooleanFlag("help", False, "absl's", short_name="?"),
                    flag_values=flag_values)
  flags.DEFINE_flag(flags.BooleanFlag("helpshort", False, "absl's"),
                    flag_values=flag_values)
  cli_help.install(flag_values, text)
  cli_help.install(flag_values, text)  # Idempotent.
  assert calls == []  # The text is made only when asked for.
  for argv in (["prog", "--help"], ["prog", "-?"], ["prog", "--helpshort"]):
    with pytest.raises(SystemExit) as exit_info:
      flag_values(argv)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == "our help\n"
    flag_values.unparse_flags()
  assert len(calls) == 3


def test_short_help_gives_each_flag_one_line(flag_values):
  flags.DEFINE_multi_string("set", [], "Set a field; repeatable.",
                            flag_values=flag_values)
  groups = (("run", ("workdir",)),
            ("loss", ("method", "batch_size", "rates", "set")))
  text = cli_help.short_help(flag_values, groups)
  lines = text.splitlines()
  assert max(len(line) for line in lines) <= 80
  flag_lines = [line for line in lines if line.startswith("  --")]
  assert [line.split()[0] for line in flag_lines] == [
      "--workdir", "--method=supcon", "--batch_size=256", "--rates=0.1,1",
      "--set="]
  assert lines.index("run:") < lines.index("loss:")
  # Too long for the line: the first sentence. An enum: its choices.
  assert flag_lines[0] == "  --workdir (unset)".ljust(30) + (
      "Directory of the run.")
  assert flag_lines[1] == "  --method=supcon".ljust(30) + (
      "Pretraining objective: supcon|ce")
  assert flag_lines[4] == "  --set=".ljust(30) + "Set a field; repeatable."
  assert "--helpfull" in lines[-1]
  # Header, titles, a line a flag, footer.
  assert len(lines) == 3 + len(groups) + 5 + 1


def test_repeatable_flag_help_has_no_absl_suffix(flag_values):
  flags.DEFINE_multi_string("set", [], "Set a field, dotted; repeatable: "
                            "--set=a.b=1 (TrainConfig).",
                            flag_values=flag_values)
  assert "repeat this option" in flag_values["set"].help  # absl's suffix.
  for text in (cli_help.grouped_help(flag_values, (("x", ("set",)),)),
               cli_help.short_help(flag_values, (("x", ("set",)),))):
    assert "repeat this option" not in text
    assert ";     " not in text
  lines = cli_help.grouped_help(flag_values, (("x", ("set",)),)).splitlines()
  entry = lines[lines.index("x:") + 1:]
  entry = " ".join(entry[:entry.index("")]).split()
  assert entry[0] == "--set=" and " ".join(entry[1:]) == (
      "Set a field, dotted; repeatable: --set=a.b=1 (TrainConfig).")


def test_install_replaces_helpfull_when_given(flag_values, capsys):
  flags.DEFINE_flag(flags.BooleanFlag("help", False, "absl's", short_name="?"),
                    flag_values=flag_values)
  flags.DEFINE_flag(flags.BooleanFlag("helpshort", False, "absl's"),
                    flag_values=flag_values)
  flags.DEFINE_flag(flags.BooleanFlag("helpfull", False, "absl's"),
                    flag_values=flag_values)
  cli_help.install(flag_values, lambda: "short", lambda: "full")
  cli_help.install(flag_values, lambda: "short", lambda: "full")
  with pytest.raises(SystemExit) as exit_info:
    flag_values(["prog", "--helpfull"])
  assert exit_info.value.code == 1  # As absl's --helpfull.
  assert capsys.readouterr().out == "full\n"
  flag_values.unparse_flags()
  with pytest.raises(SystemExit) as exit_info:
    flag_values(["prog", "--help"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out == "short\n"


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
