"""Supervised Contrastive Learning for TensorFlow / Keras.

The loss is importable without the training stack; the Keras model
(`supcon_tf.keras_model.SupConModel`), the training loop
(`supcon_tf.train_lib`), linear evaluation and export live in their modules.
"""

from supcon_tf.losses import NPairsLoss
from supcon_tf.losses import SimCLRLoss
from supcon_tf.losses import SupConLoss
from supcon_tf.losses import npairs_loss
from supcon_tf.losses import supcon_loss
from supcon_tf.losses import supcon_terms

__version__ = "0.1.0"
