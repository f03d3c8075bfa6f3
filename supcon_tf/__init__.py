"""Supervised Contrastive Learning for TensorFlow / Keras.

The loss is importable without the training stack; the Keras model
(`supcon_tf.keras_model.SupConModel`), the training loop
(`supcon_tf.train_lib`), linear evaluation and export live in their modules.

The loss names below load `supcon_tf.losses` or `supcon_tf.npairs` (and
TensorFlow) on first use, so that `supcon_tf.config` and the command line's
flag parsing start without TensorFlow. Keras finds the losses of a saved
model only once they are registered: `import supcon_tf.losses` (and
`supcon_tf.npairs` for `NPairsLoss`) before `keras.saving.load_model`.
"""

import importlib
import typing

if typing.TYPE_CHECKING:  # For type checkers and the Bazel deps check.
  from supcon_tf.npairs import NPairsLoss
  from supcon_tf.losses import SimCLRLoss
  from supcon_tf.losses import SupConLoss
  from supcon_tf.npairs import npairs_loss
  from supcon_tf.losses import supcon_loss
  from supcon_tf.losses import supcon_terms

__version__ = "0.1.0"

# Public name -> module that defines it.
_LAZY = {
    "NPairsLoss": "supcon_tf.npairs",
    "SimCLRLoss": "supcon_tf.losses",
    "SupConLoss": "supcon_tf.losses",
    "npairs_loss": "supcon_tf.npairs",
    "supcon_loss": "supcon_tf.losses",
    "supcon_terms": "supcon_tf.losses",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # Later lookups skip __getattr__.
    return value
  raise AttributeError(f"module 'supcon_tf' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))

