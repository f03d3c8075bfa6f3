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


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
