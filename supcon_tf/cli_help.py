"""`supcon-tf --help` and `--helpfull`: the command line's flags by stage.

absl's own help lists every flag of every module in definition order with
absl's wording. Here `--help` (`short_help`) gives each flag of the groups
the command line names one line, as it would be typed with its default and
a one-line summary; `--helpfull` (`grouped_help`) gives the same groups
with every description in full. absl's own flags are named in a footer.
Works on the flag objects the command line passes in; reads no values.
"""

from __future__ import annotations

import re
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
absl's flags also apply: --verbosity=N (-v; 1 logs debug lines),
--logtostderr, --alsologtostderr, --only_check_args, --pdb_post_mortem."""
_SHORT_HEADER = """\
supcon-tf: Supervised Contrastive Learning with TensorFlow and Keras: pretrains,
evaluates, exports and reports in --workdir; the same command resumes a run.
  supcon-tf --workdir=runs/first [--flagfile=experiments/<recipe>.cfg]"""
_SHORT_FOOTER = """\
--helpfull describes every flag in full. --flagfile=FILE: one flag a line."""
_COLUMN = 30  # Where the help text of a flag starts.
_WIDTH = 80
# What absl appends to the help of a repeatable flag (no sentence of ours).
_MULTI_SUFFIX = re.compile(r";\s*repeat this option to specify a list of "
                           r"values$")
# A sentence ends at a full stop before a capital, digit or flag ("e.g.
# for" goes on).
_SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z0-9-])")


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


def _description(flag: flags.Flag) -> tuple[str, str]:
  """`(text, choices)`: the flag's help without absl's additions.

  absl's "<a|b>: " prefix of an enum becomes `choices` ("" for other
  flags), a sentence for the end; the "; repeat this option ..." that absl
  appends to a repeatable flag is dropped (our help says "repeatable").
  """
  text = _MULTI_SUFFIX.sub("", flag.help)
  enum_values = getattr(flag.parser, "enum_values", None)
  if not enum_values:
    return text, ""
  return text.split(">: ", 1)[-1], f"One of: {', '.join(enum_values)}."


def _lines(flag: flags.Flag) -> list[str]:
  """The help of one flag: usage, then the wrapped description."""
  text, choices = _description(flag)
  if choices:
    text = f"{text} {choices}"
  usage = "  " + _usage(flag)
  body = textwrap.wrap(text, _WIDTH - _COLUMN) or [""]
  if len(usage) >= _COLUMN - 1:
    lines = [usage]
  else:
    lines = [usage.ljust(_COLUMN) + body.pop(0)]
  return lines + [" " * _COLUMN + line for line in body]


def _summary(flag: flags.Flag, width: int) -> str:
  """At most `width` characters saying what the flag is.

  An enum: "<first sentence>: a|b|c", else "a|b|c". Other flags: the whole
  description if it fits, else its first sentence. Else that sentence cut
  at a word, with "...".
  """
  text, _ = _description(flag)
  first = _SENTENCE_END.split(text, 1)[0]
  enum_values = getattr(flag.parser, "enum_values", None)
  if enum_values:
    choices = "|".join(enum_values)
    candidates = (f"{first.rstrip('.')}: {choices}", choices, first)
  else:
    candidates = (text, first)
  for candidate in candidates:
    if len(candidate) <= width:
      return candidate
  return textwrap.shorten(first, width, placeholder=" ...")


def _line(flag: flags.Flag) -> str:
  """One line of at most 80 characters: usage and summary."""
  usage = "  " + _usage(flag)
  if len(usage) < _COLUMN - 1:
    usage = usage.ljust(_COLUMN)
  else:
    usage += "  "
  return (usage + _summary(flag, _WIDTH - len(usage))).rstrip()


def short_help(flag_values: flags.FlagValues, groups) -> str:
  """The `--help` text: one line a flag, by group.

  Args:
    flag_values: the defined flags (`absl.flags.FLAGS`).
    groups: `((title, (flag_name, ...)), ...)`, in the order shown.

  Returns:
    Lines of at most 80 characters, no trailing newline: a three-line
    header, each group's title and one line per flag, a one-line footer.
  """
  parts = [_SHORT_HEADER]
  for title, names in groups:
    parts.append(f"{title}:")
    parts.extend(_line(flag_values[name]) for name in names)
  parts.append(_SHORT_FOOTER)
  return "\n".join(parts)


def grouped_help(flag_values: flags.FlagValues, groups) -> str:
  """The `--helpfull` text: every description in full, by group.

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
  """A help flag: prints its text and exits (0; 1 for `--helpfull`, as
  absl's)."""

  def __init__(self, name, text, short_name=None, *,
               help_string="show the flags of this program", exit_code=0):
    super().__init__(name, False, help_string, short_name=short_name,
                     allow_hide_cpp=True)
    self._text = text
    self._exit_code = exit_code

  def parse(self, argument):
    if self._parse(argument):
      print(self._text())
      sys.exit(self._exit_code)


def install(flag_values: flags.FlagValues, text, full_text=None) -> None:
  """Replaces absl's `--help`, `-?`, `--helpshort` and `--helpfull`.

  Idempotent.

  Args:
    flag_values: where absl defined its help flags (`absl.flags.FLAGS`).
    text: callable with no arguments returning the help text; called only
      when a help flag is given.
    full_text: the same for `--helpfull` (which exits 1, as absl's does);
      None leaves absl's `--helpfull`.
  """
  app.define_help_flags()  # Idempotent; defines --helpfull, --help, ...
  if not isinstance(flag_values["help"], _HelpFlag):
    for name in ("help", "?", "helpshort"):
      delattr(flag_values, name)
    flags.DEFINE_flag(_HelpFlag("help", text, "?"), flag_values=flag_values)
    flags.DEFINE_flag(_HelpFlag("helpshort", text), flag_values=flag_values)
  if full_text is not None and (
      "helpfull" not in flag_values or
      not isinstance(flag_values["helpfull"], _HelpFlag)):
    if "helpfull" in flag_values:
      delattr(flag_values, "helpfull")
    flags.DEFINE_flag(
        _HelpFlag("helpfull", full_text, help_string="show every flag in "
                  "full", exit_code=1), flag_values=flag_values)
