"""`supcon-tf --help`: the command line's flags by stage, on one screen.

absl's own `--help` lists every flag of the main module in definition order
with absl's wording; this one lists the groups the command line names, each
flag as it would be typed with its default. `--helpfull` stays absl's.
Works on the flag objects the command line passes in; reads no values.
"""

from __future__ import annotations

import sys
import textwrap

from absl import app
from absl import flags

_HEADER = """\
supcon-tf: Supervised Contrastive Learning with TensorFlow and Keras.
Pretrains, evaluates (frozen-encoder linear classifier), exports a
SavedModel and writes a report, all in --workdir; rerun the same command
to resume.

  supcon-tf --workdir=runs/first
  supcon-tf --flagfile=experiments/cifar10_supcon_cpu30.cfg --workdir=runs/x
"""
_FOOTER = """\
--flagfile=FILE reads flags from FILE (one per line, # comments).
--helpfull lists every flag, absl's included."""
_COLUMN = 30  # Where the help text of a flag starts.


def _usage(flag: flags.Flag) -> str:
  """`--name=default`, as it would be typed."""
  if flag.default is None:
    return f"--{flag.name} (unset)"
  default = flag.default
  if isinstance(default, bool):
    default = "true" if default else "false"
  elif isinstance(default, (list, tuple)):
    default = ",".join(str(v) for v in default)
  return f"--{flag.name}={default}"


def _lines(flag: flags.Flag) -> list[str]:
  """The help of one flag: usage, then the wrapped description."""
  text = flag.help
  enum_values = getattr(flag.parser, "enum_values", None)
  if enum_values:  # absl's "<a|b>: " prefix, as a sentence at the end.
    text = text.split(">: ", 1)[-1] + f" One of: {', '.join(enum_values)}."
  usage = "  " + _usage(flag)
  body = textwrap.wrap(text, 80 - _COLUMN) or [""]
  if len(usage) >= _COLUMN - 1:
    lines = [usage]
  else:
    lines = [usage.ljust(_COLUMN) + body.pop(0)]
  return lines + [" " * _COLUMN + line for line in body]


def grouped_help(flag_values: flags.FlagValues, groups) -> str:
  """The help text.

  Args:
    flag_values: the defined flags (`absl.flags.FLAGS`).
    groups: `((title, (flag_name, ...)), ...)`, in the order shown.

  Returns:
    Lines of at most 80 characters, no trailing newline.
  """
  parts = [_HEADER]
  for title, names in groups:
    parts.append(f"{title}:")
    for name in names:
      parts.extend(_lines(flag_values[name]))
    parts.append("")
  parts.append(_FOOTER)
  return "\n".join(parts)


class _HelpFlag(flags.BooleanFlag):
  """`--help` / `-?` / `--helpshort`: prints the help text and exits 0."""

  def __init__(self, name, text, short_name=None):
    super().__init__(name, False, "show the flags of this program",
                     short_name=short_name, allow_hide_cpp=True)
    self._text = text

  def parse(self, argument):
    if self._parse(argument):
      print(self._text())
      sys.exit(0)


def install(flag_values: flags.FlagValues, text) -> None:
  """Replaces absl's `--help`, `-?` and `--helpshort` (idempotent).

  Args:
    flag_values: where absl defined its help flags (`absl.flags.FLAGS`).
    text: callable with no arguments returning the help text; called only
      when a help flag is given.
  """
  app.define_help_flags()  # Idempotent; defines --helpfull, --help, ...
  if isinstance(flag_values["help"], _HelpFlag):
    return
  for name in ("help", "?", "helpshort"):
    delattr(flag_values, name)
  flags.DEFINE_flag(_HelpFlag("help", text, "?"), flag_values=flag_values)
  flags.DEFINE_flag(_HelpFlag("helpshort", text), flag_values=flag_values)
