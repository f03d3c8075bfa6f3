"""Supervised Contrastive Learning for TensorFlow / Keras."""

from supcon_tf.losses import NPairsLoss
from supcon_tf.losses import SimCLRLoss
from supcon_tf.losses import SupConLoss
from supcon_tf.losses import npairs_loss
from supcon_tf.losses import supcon_loss
from supcon_tf.losses import supcon_terms

__version__ = "0.1.0"
