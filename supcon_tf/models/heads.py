"""Projection heads: encoder representations to the contrastive space."""

import keras
from keras import ops

HEAD_KINDS = ("mlp", "mlp_bn", "linear")


@keras.saving.register_keras_serializable(package="supcon_tf")
class ProjectionHead(keras.layers.Layer):
  """Projection head of the SupCon paper, with L2-normalised outputs.

  `kind="mlp"` is Dense(hidden) -> ReLU -> Dense(output_dim), the head of the
  paper (no batch norm); `kind="mlp_bn"` puts batch norm before the ReLU
  (Dense without bias -> BatchNorm -> ReLU -> Dense, as SimCLR v2 and MoCo v3
  heads do), which centres the hidden layer of a randomly initialised
  network whose representations of all images point nearly the same way;
  `kind="linear"` is a single Dense(output_dim). The
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
    sync_batch_norm: synchronise the `mlp_bn` batch norm across replicas
      (as the encoder's is when there are several).
    **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

  Example:

  ```python
  head = ProjectionHead(kind="mlp", output_dim=128)
  z = head(tf.random.normal([8, 512]))  # [8, 128], unit rows, float32
  ```
  """

  def __init__(self, kind="mlp", hidden_dim=None, output_dim=128,
               sync_batch_norm=False, **kwargs):
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
    self.sync_batch_norm = bool(sync_batch_norm)

  def build(self, input_shape):
    # The hidden width may default to the input width, so the sub-layers are
    # made here rather than in __init__.
    self.hidden = self.hidden_norm = None
    if self.kind != "linear":
      units = self.hidden_dim or input_shape[-1]
      if units is None:
        raise ValueError(
            "ProjectionHead needs a known input width or an explicit "
            f"hidden_dim; got input shape {input_shape}.")
      with_norm = self.kind == "mlp_bn"
      self.hidden = keras.layers.Dense(
          units, activation=None if with_norm else "relu",
          use_bias=not with_norm, dtype=self.dtype_policy, name="hidden")
      self.hidden.build(input_shape)
      input_shape = tuple(input_shape[:-1]) + (units,)
      if with_norm:
        self.hidden_norm = keras.layers.BatchNormalization(
            synchronized=self.sync_batch_norm, dtype=self.dtype_policy,
            name="hidden_bn")
        self.hidden_norm.build(input_shape)
    # float32 like the loss; its float32 weights are the same under any
    # policy, so checkpoints do not change.
    self.projection = keras.layers.Dense(
        self.output_dim, dtype="float32", name="projection")
    self.projection.build(input_shape)

  def call(self, inputs, training=None):
    """Projects and normalises.

    Args:
      inputs: representations `[batch, dim]` (any leading dims).
      training: batch-norm mode of the `mlp_bn` head.

    Returns:
      float32 embeddings `[batch, output_dim]` with unit L2 norm.
    """
    x = inputs if self.hidden is None else self.hidden(inputs)
    if self.hidden_norm is not None:
      x = ops.relu(self.hidden_norm(x, training=training))
    x = self.projection(ops.cast(x, "float32"))
    return ops.normalize(x, axis=-1, order=2, epsilon=1e-12)

  def get_config(self):
    config = super().get_config()
    config.update({
        "kind": self.kind,
        "hidden_dim": self.hidden_dim,
        "output_dim": self.output_dim,
        "sync_batch_norm": self.sync_batch_norm,
    })
    return config
