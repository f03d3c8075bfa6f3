"""Projection heads: encoder representations to the contrastive space."""

import keras
from keras import ops

HEAD_KINDS = ("mlp", "linear")


@keras.saving.register_keras_serializable(package="supcon_tf")
class ProjectionHead(keras.layers.Layer):
  """Projection head of the SupCon paper, with L2-normalised outputs.

  `kind="mlp"` is Dense(hidden) -> ReLU -> Dense(output_dim), the head of the
  paper (no batch norm); `kind="linear"` is a single Dense(output_dim). The
  last Dense layer and the L2 normalisation along the last axis run in
  float32, whatever the dtype policy (the hidden layer follows the policy),
  because the contrastive loss divides dot products by a small temperature:
  embeddings rounded to bfloat16 before normalising would carry that
  rounding into every logit.

  Args:
    kind: `"mlp"` or `"linear"`.
    hidden_dim: width of the MLP's hidden layer; None uses the input width.
      Ignored by the linear head.
    output_dim: width of the normalised embedding.
    **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

  Example:

  ```python
  head = ProjectionHead(kind="mlp", output_dim=128)
  z = head(tf.random.normal([8, 512]))  # [8, 128], unit rows, float32
  ```
  """

  def __init__(self, kind="mlp", hidden_dim=None, output_dim=128, **kwargs):
    super().__init__(**kwargs)
    if kind not in HEAD_KINDS:
      raise ValueError(
          f"ProjectionHead kind={kind!r} is not one of {list(HEAD_KINDS)}.")
    if hidden_dim is not None and hidden_dim <= 0:
      raise ValueError(f"hidden_dim must be > 0 or None, got {hidden_dim!r}.")
    if output_dim is None or output_dim <= 0:
      raise ValueError(f"output_dim must be > 0, got {output_dim!r}.")
    self.kind = kind
    self.hidden_dim = hidden_dim
    self.output_dim = output_dim

  def build(self, input_shape):
    # The hidden width may default to the input width, so the sub-layers are
    # made here rather than in __init__.
    self.hidden = None
    if self.kind == "mlp":
      units = self.hidden_dim or input_shape[-1]
      if units is None:
        raise ValueError(
            "ProjectionHead needs a known input width or an explicit "
            f"hidden_dim; got input shape {input_shape}.")
      self.hidden = keras.layers.Dense(
          units, activation="relu", dtype=self.dtype_policy, name="hidden")
      self.hidden.build(input_shape)
      input_shape = tuple(input_shape[:-1]) + (units,)
    # float32 like the loss; its float32 weights are the same under any
    # policy, so checkpoints do not change.
    self.projection = keras.layers.Dense(
        self.output_dim, dtype="float32", name="projection")
    self.projection.build(input_shape)

  def call(self, inputs):
    """Projects and normalises.

    Args:
      inputs: representations `[batch, dim]` (any leading dims).

    Returns:
      float32 embeddings `[batch, output_dim]` with unit L2 norm.
    """
    x = inputs if self.hidden is None else self.hidden(inputs)
    x = self.projection(ops.cast(x, "float32"))
    return ops.normalize(x, axis=-1, order=2, epsilon=1e-12)

  def get_config(self):
    config = super().get_config()
    config.update({
        "kind": self.kind,
        "hidden_dim": self.hidden_dim,
        "output_dim": self.output_dim,
    })
    return config
