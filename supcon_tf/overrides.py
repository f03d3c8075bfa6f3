"""Dotted `section.field=value` overrides of the configuration objects.

The command line's `--set` and `experiments/sweep_budget.py --variant` go
through `override`, so any field of a `supcon_tf.config` object can be set
without a flag of its own: `loss.block_size=512`,
`optimizer.learning_rate=1e-3`, `linear.epochs=20` (on the command line the
`linear.` / `eval.` prefix picks the object).
"""

from __future__ import annotations

import json
from typing import Iterable

from supcon_tf import config as config_lib


def parse_value(text: str):
  """JSON where it parses (`0.5`, `true`, `null`, `[1, 2]`), else the text."""
  lowered = text.strip().lower()
  if lowered in ("true", "false", "none", "null"):
    return {"true": True, "false": False}.get(lowered)
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def override(config, assignments: Iterable[str]):
  """`config` with dotted fields replaced, e.g. `"loss.block_size=512"`.

  Args:
    config: a (nested) config dataclass, e.g. a `TrainConfig`.
    assignments: `"field=value"` or `"section.field=value"` strings; values
      are JSON where they parse (`0.5`, `true`, `none`, `[0.3, 1.0]`), text
      otherwise.

  Returns:
    A new config of the same type, validated like any other.

  Raises:
    ValueError: an item without `=`, or a field the config does not have
      (the message lists the fields it does have).
  """
  values = config_lib.to_dict(config)
  for item in assignments:
    path, sep, text = item.partition("=")
    if not sep or not path:
      raise ValueError(f"Override {item!r} is not field=value, e.g. "
                       "loss.temperature=0.5.")
    *parents, leaf = path.strip().split(".")
    node = values
    for depth, key in enumerate(parents + [leaf]):
      is_section = depth < len(parents)
      where = ".".join(parents[:depth]) or type(config).__name__
      if key not in node:
        raise ValueError(f"Override {item!r}: {where} has no {key!r}; it "
                         f"has {sorted(node)}.")
      if is_section != isinstance(node[key], dict):
        raise ValueError(
            f"Override {item!r}: {where}.{key} is "
            + ("a value, not a section of fields." if is_section else
               f"a section: set one of its fields {sorted(node[key])}."))
      if is_section:
        node = node[key]
    node[leaf] = parse_value(text)
  return config_lib.from_dict(type(config), values)
