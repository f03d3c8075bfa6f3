"""Encoders from the Keras ecosystem: `keras.applications` and keras-hub.

`build_encoder` dispatches here for two kinds of encoder name:

- `keras_applications:<Name>`, any constructor of `keras.applications`
  (`keras_applications:MobileNetV3Small`, `keras_applications:ResNet50`,
  `keras_applications:EfficientNetB0`, ...);
- `keras_hub:<preset>`, a keras-hub preset name or a local preset directory
  (needs `pip install keras-hub`, an optional dependency).

The backbone is built without its classifier, with global average pooling,
random weights (`weights=None`, so nothing is downloaded) and the run's
input shape. `weights` (`ModelConfig.encoder_weights`) loads a local file
instead: the `.weights.h5` of the same backbone, e.g. written once on a
machine with network access by
`keras.applications.MobileNetV3Small(include_top=False,
weights="imagenet").save_weights("mnv3s.weights.h5")`, or for keras-hub a
local preset directory (its `model.weights.h5`).

Pixel scale. Every supcon_tf encoder takes float32 images in [0, 1] (what
`supcon_tf.data` and `supcon_tf.augment` produce, and what the exported
SavedModel feeds after its uint8 -> [0, 1] conversion). These backbones were
designed for 0..255 pixels followed by their own preprocessing, so the
encoder starts with a `BackboneInput` layer that multiplies by 255 and then
applies what the architecture's ImageNet weights were trained on: its
module's `preprocess_input` (BGR mean subtraction for ResNet50 and VGG,
[-1, 1] for MobileNet, MobileNetV2, ResNetV2, Inception, Xception and NASNet,
ImageNet mean / std for DenseNet), or nothing for EfficientNet,
EfficientNetV2, MobileNetV3 and ConvNeXt, which keep their built-in
preprocessing layers (`include_preprocessing=True`, made for 0..255). For
keras-hub, the scale and offset of the preset's image converter. Loaded
ImageNet weights therefore see the pixels they were trained on, and callers
(training, linear evaluation, export) need no per-backbone code.
"""

import difflib
import importlib
import os
import re

import keras
import tensorflow as tf

from supcon_tf import config as config_lib

KERAS_APPLICATIONS, KERAS_HUB = config_lib.ENCODER_SOURCES
# keras-hub's weights file inside a preset directory.
KERAS_HUB_WEIGHTS_FILE = "model.weights.h5"
WEIGHTS_SUFFIX = ".weights.h5"
# Set by this module; not constructor arguments a caller may pass.
_FIXED_ARGUMENTS = ("include_top", "weights", "pooling", "input_shape",
                    "input_tensor")
_MIN_SIZE = re.compile(r"at least (\d+)x(\d+)")


def is_backbone(encoder: str) -> bool:
  """Whether `encoder` names a `keras_applications:` / `keras_hub:` backbone."""
  source, sep, _ = encoder.partition(":")
  return bool(sep) and source in (KERAS_APPLICATIONS, KERAS_HUB)


def application_names() -> list:
  """The model constructors of `keras.applications`, sorted."""
  return sorted(name for name in dir(keras.applications)
                if name[:1].isupper()
                and callable(getattr(keras.applications, name)))


def build_backbone(encoder: str, *, input_shape=(32, 32, 3), weights=None,
                   sync_batch_norm: bool = False, **kwargs) -> keras.Model:
  """An encoder around a `keras.applications` or keras-hub backbone.

  Layers follow the global Keras dtype policy (mixed precision included);
  the pixel arithmetic of `BackboneInput` runs in float32 and the output is
  always float32.

  Args:
    encoder: `keras_applications:<Name>` (e.g.
      `keras_applications:MobileNetV3Small`) or `keras_hub:<preset or local
      preset directory>`.
    input_shape: `(H, W, 3)` of the images.
    weights: None (random initialisation) or a local path: a `.weights.h5`
      file of the backbone or, for keras-hub, a preset directory.
    sync_batch_norm: synchronise every batch norm of the backbone across the
      replicas of a `tf.distribute` strategy.
    **kwargs: further `keras.applications` constructor arguments, e.g.
      `alpha=0.35` for `MobileNetV2` (not `include_top`, `weights`,
      `pooling`, `input_shape`, which this function sets).

  Returns:
    A `keras.Model` mapping float32 images in [0, 1], `[batch, H, W, 3]`, to
    float32 representations `[batch, dim]` (`dim` the backbone's pooled
    width, e.g. 576 for MobileNetV3Small, 2048 for ResNet50).

  Raises:
    ValueError: an unknown `keras.applications` name (with suggestions),
      images smaller than the architecture's minimum (naming it), keras-hub
      not installed, a missing or unreadable weights file, or an argument
      this function sets itself.
  """
  if not is_backbone(encoder):
    raise ValueError(f"encoder={encoder!r} is not keras_applications:<Name> "
                     "or keras_hub:<preset>.")
  source, _, name = encoder.partition(":")
  fixed = sorted(set(kwargs) & set(_FIXED_ARGUMENTS))
  if fixed:
    raise ValueError(f"build_backbone sets {fixed} itself; drop them from "
                     "the keyword arguments.")
  if source == KERAS_APPLICATIONS:
    backbone, preprocessing = _application(name, input_shape, kwargs)
  else:
    backbone, preprocessing = _keras_hub_backbone(name, input_shape)
    if weights is not None and os.path.isdir(weights):
      weights = os.path.join(weights, KERAS_HUB_WEIGHTS_FILE)
  if weights is not None:
    load_weights(backbone, weights, encoder=encoder)
  if sync_batch_norm:
    _synchronize_batch_norm(backbone)

  images = keras.Input(shape=tuple(input_shape), name="images")
  x = backbone(preprocessing(images))
  if len(x.shape) == 4:  # keras-hub feature maps.
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
  elif len(x.shape) == 3:  # keras-hub tokens.
    x = keras.layers.GlobalAveragePooling1D(name="avg_pool")(x)
  # Mixed precision leaves the features in the compute dtype; the loss,
  # all_gather and the linear head all expect float32.
  outputs = keras.layers.Activation("linear", dtype="float32",
                                    name="representation")(x)
  # TF name scopes refuse ':' and '/'.
  return keras.Model(images, outputs,
                     name=re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder))


def load_weights(model: keras.Model, path: str, *, encoder: str) -> None:
  """Loads a local `.weights.h5` file into `model` (built, same architecture).

  Raises:
    ValueError: `path` does not exist, is not a `.weights.h5` file, or does
      not hold `encoder`'s weights (one line naming the file and the fix).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(
        f"encoder_weights={path!r} does not exist; pass a local "
        f"{WEIGHTS_SUFFIX} file of {encoder} (or leave it unset to start "
        "from random weights).")
  if not path.endswith(WEIGHTS_SUFFIX):
    raise ValueError(f"encoder_weights={path!r} is not a {WEIGHTS_SUFFIX} "
                     "file; save it with model.save_weights('x"
                     f"{WEIGHTS_SUFFIX}').")
  try:
    model.load_weights(path)
  except (ValueError, OSError, KeyError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(
        f"encoder_weights={path!r} does not fit {encoder} at this input "
        f"shape ({reason}); save the weights of the same architecture built "
        "with include_top=False.") from None


@keras.saving.register_keras_serializable(package="supcon_tf")
class BackboneInput(keras.layers.Layer):
  """Images in [0, 1] -> the pixels a backbone's weights were trained on.

  Multiplies by 255, then applies `preprocess_input` of the
  `keras.applications` module of `application` or, for keras-hub,
  `pixels * scale + offset` (per channel when they are lists). Runs in
  float32 whatever the global policy, so the 0..255 arithmetic is exact.

  Args:
    application: a `keras.applications` constructor name, e.g. `"ResNet50"`.
    scale / offset: a float or a list of 3 (keras-hub image converters).
  """

  def __init__(self, application=None, scale=None, offset=None, **kwargs):
    kwargs.setdefault("dtype", "float32")
    super().__init__(**kwargs)
    self.application = application
    self.scale = scale
    self.offset = offset
    self._preprocess = None
    if application is not None:
      module = getattr(keras.applications, application).__module__
      self._preprocess = importlib.import_module(module).preprocess_input

  def call(self, images):
    """`[batch, H, W, 3]` in [0, 1] -> `[batch, H, W, 3]` float32."""
    pixels = images * 255.0
    if self._preprocess is not None:
      return self._preprocess(pixels)
    if self.scale is not None:
      pixels = pixels * tf.constant(self.scale, pixels.dtype)
    if self.offset is not None:
      pixels = pixels + tf.constant(self.offset, pixels.dtype)
    return pixels

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "application": self.application,
            "scale": self.scale, "offset": self.offset}


def _application(name, input_shape, kwargs):
  """`(backbone, BackboneInput)` of `keras.applications.<name>`."""
  names = application_names()
  if name not in names:
    close = difflib.get_close_matches(name, names, n=3)
    examples = close or ["MobileNetV3Small", "ResNet50", "EfficientNetB0",
                         "ConvNeXtTiny"]
    raise ValueError(
        f"keras.applications has no model {name!r}; use one of {examples} "
        f"(all {len(names)}: dir(keras.applications)).")
  constructor = getattr(keras.applications, name)
  try:
    backbone = constructor(include_top=False, weights=None, pooling="avg",
                           input_shape=tuple(input_shape), **kwargs)
  except ValueError as e:
    match = _MIN_SIZE.search(str(e))
    if match is None:
      raise
    size = match.group(1)
    raise ValueError(
        f"keras_applications:{name} needs images of at least {size}x{size}, "
        f"got {input_shape[0]}x{input_shape[1]}; set DataConfig.image_size "
        f">= {size}.") from None
  return backbone, BackboneInput(application=name, name="backbone_input")


def _keras_hub_backbone(preset, input_shape):
  """`(backbone, BackboneInput)` of a keras-hub preset, random weights."""
  try:
    keras_hub = importlib.import_module("keras_hub")
  except ImportError:
    raise ValueError(
        f"encoder 'keras_hub:{preset}' needs keras-hub, which is not "
        "installed: pip install keras-hub (or supcon-tf[hub]).") from None
  # Architecture only: weights come from `encoder_weights` if at all. A
  # named preset's config is fetched by keras-hub; a directory is local.
  from_preset = keras_hub.models.Backbone.from_preset
  try:
    try:
      backbone = from_preset(preset, load_weights=False,
                             image_shape=tuple(input_shape))
    except TypeError:  # A backbone without an `image_shape` argument.
      backbone = from_preset(preset, load_weights=False)
  except (ValueError, OSError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(f"keras-hub cannot load the preset {preset!r} "
                     f"({reason}); give a preset name keras-hub lists or a "
                     "local preset directory.") from None
  scale, offset = 1.0 / 255.0, None  # No converter: [0, 1] as it is.
  try:
    converter = keras_hub.layers.ImageConverter.from_preset(preset)
    scale, offset = converter.scale, converter.offset
  except (ValueError, OSError, KeyError, AttributeError):
    pass  # The preset has no image converter.
  return backbone, BackboneInput(scale=_as_list(scale),
                                 offset=_as_list(offset),
                                 name="backbone_input")


def _as_list(value):
  """A float or a plain list of floats (JSON-serialisable), or None."""
  if value is None:
    return None
  try:
    return [float(v) for v in value]
  except TypeError:
    return float(value)


def _synchronize_batch_norm(model):
  """Makes every batch norm of `model` (nested layers too) synchronised."""
  # `synchronized` is read at call time and saved in the layer config.
  # Keras has no public walk over nested layers (keras-hub nests them).
  # pylint: disable-next=protected-access
  layers = model._flatten_layers(include_self=False)
  for layer in layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.synchronized = True
