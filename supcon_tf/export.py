"""Export of a trained classifier as a self-contained, versioned SavedModel.

`export_classifier` writes one SavedModel that serves raw images: the
uint8 -> float [0, 1] conversion is part of the graph, and the model loads
with plain `tf.saved_model.load` (or TF Serving) without `supcon_tf` or Keras.
Versions follow the TF Serving layout, `export_base/<version>/`, and each is
written to a hidden temporary sibling (`export_base/.tmp-<version>-<pid>`)
and renamed into place, so a server polling `export_base` never sees half a
model. A crash leaves at most a `.tmp-*` directory, which servers and
`latest_version` ignore; it may be deleted at any time.

Signatures (inputs -> outputs):

- `serving_default`: `images` uint8 `[batch, S, S, 3]` ->
  `logits` float32 `[batch, classes]`, `probabilities` float32
  `[batch, classes]` (softmax of the logits), `class_ids` int64 `[batch]`
  (argmax), and `class_names` string `[batch]` when class names were given.
- `serving_bytes`: `image_bytes` string `[batch]`, each an encoded image of
  any size in a format `tf.io.decode_image` reads (JPEG, PNG, GIF's first
  frame, BMP, WebP) -> the outputs of `serving_default`.
  Each image is decoded to RGB uint8 and brought to `S x S` by
  `supcon_tf.augment.eval_image`, the function evaluation uses, with the
  export's `eval_crop`: `center` resizes the short side to
  round(S / 0.875) and keeps the centre (ImageNet: 256, then 224), `resize`
  resizes the whole image (bilinear with antialiasing); the result is
  rounded to uint8 and goes through exactly the path of `serving_default`.
  Evaluation and `serving_bytes` therefore feed the model the same pixels,
  and under `resize` a PNG of an `S x S` image gives the same outputs as its
  pixels sent as `images`. `serving_default` takes images already prepared
  (e.g. by the same centre crop).
- `embed` (only when an encoder was given): `images` uint8
  `[batch, S, S, 3]` -> `embedding` float32 `[batch, dim]`, the encoder's
  representation divided by its L2 norm (an all-zero representation stays
  zero).

An empty batch gives empty outputs. Errors a client sees (TF 2.21):

- wrong rank, image size or channel count: a NumPy array is checked by
  TF's Python binding (`loaded.signatures["serving_default"](images=x)`),
  `TypeError` "Binding inputs to tf.function failed due to `Can not cast
  TensorSpec(shape=(1, 8, 8, 3), ...) to TensorSpec(shape=(None, 16, 16,
  3), ...)`"; `saved_model_cli run` / `tf.compat.v1.Session` raise
  `ValueError` "Cannot feed value of shape ..."; a `tf.Tensor`, and a server
  feeding the graph directly, reach the `EnsureShape` op inside the graph:
  `InvalidArgumentError` "Shape of tensor images [1,8,8,3] is not compatible
  with expected shape [?,16,16,3]." (`image_bytes` likewise must be
  `[batch]`).
- a non-uint8 `tf.Tensor`: `InvalidArgumentError` "... was expected to be a
  uint8 tensor but is a float tensor".
- caution: a non-uint8 *NumPy array* never reaches the graph as such. TF's
  Python binding (and `Session.run`, hence `saved_model_cli run`) casts it
  to uint8 with NumPy's rules, silently: 0.5 becomes 0 and 300 becomes 44.
  The graph cannot tell, so send uint8 arrays or `tf.uint8` tensors; float
  images in [0, 1] must be `np.round(x * 255).astype(np.uint8)` first.
- bytes that are not an image: `InvalidArgumentError` "Unknown image file
  format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required."

Checking an export by hand (TF 2.21's `saved_model_cli` evaluates only
Python literals in `--input_exprs`, so NumPy inputs go through a file):

```sh
saved_model_cli show --all --dir export_base/1
python -c "import numpy as np; np.save('x.npy', np.zeros((1, 32, 32, 3), 'u1'))"
saved_model_cli run --dir export_base/1 --tag_set serve \
    --signature_def serving_default --inputs images=x.npy
```

This module deliberately imports no training code (only the image
preparation of `supcon_tf.augment`).
"""

import os
import re
import shutil

import keras
import tensorflow as tf

from supcon_tf import augment as augment_lib

SIGNATURES = ("serving_default", "serving_bytes", "embed")
TMP_PREFIX = ".tmp-"
_VERSION_NAME = re.compile(r"[0-9]+")


def export_classifier(classifier: keras.Model,
                      export_base: str,
                      *,
                      image_size: int,
                      encoder: keras.Model | None = None,
                      class_names=None,
                      version: int | None = None,
                      eval_crop: str = "resize") -> str:
  """Writes `classifier` as a new version of a servable SavedModel.

  Args:
    classifier: Keras model mapping float32 images in [0, 1],
      `[batch, image_size, image_size, 3]`, to logits `[batch, classes]`
      (e.g. a frozen encoder followed by a `Dense` layer). It is called with
      `training=False`, so batch norm uses its moving statistics.
    export_base: directory holding the versions (created if missing); the
      model goes to `export_base/<version>/`.
    image_size: side `S` of the square images the signatures accept.
    encoder: optional Keras model mapping the same images to
      representations `[batch, dim]`; adds the `embed` signature. Usually the
      classifier's own encoder, whose variables are then saved once.
    class_names: optional sequence of `classes` strings; adds the
      `class_names` output.
    version: positive integer version; defaults to one more than the largest
      existing version (1 for an empty `export_base`).
    eval_crop: how `serving_bytes` brings decoded images to `image_size`,
      `center` or `resize` (`supcon_tf.augment.eval_image`); pass the
      `DataConfig.resolved_eval_crop` the model was evaluated with.

  Returns:
    The path of the written version directory, `export_base/<version>`.

  Raises:
    ValueError: for a non-positive `image_size`, an image size the models
      were not built for, a model that does not output rank-2 tensors,
      class names whose count differs from the number of logits, a
      non-positive `version`, a `version` that already exists (existing
      versions are never overwritten), or an `eval_crop` other than
      `center` / `resize`.
    OSError: writing failed (e.g. no space left on the device); one line
      naming `export_base`. Nothing is published and earlier versions are
      untouched.
  """
  if eval_crop not in ("center", "resize"):
    raise ValueError(f"eval_crop must be 'center' or 'resize', got "
                     f"{eval_crop!r}.")
  if isinstance(image_size, bool) or not isinstance(image_size, int) or (
      image_size <= 0):
    raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
  num_classes = _output_dim(classifier, image_size, "classifier")
  embedding_dim = None
  if encoder is not None:
    embedding_dim = _output_dim(encoder, image_size, "encoder")
  names = _check_class_names(class_names, num_classes)

  os.makedirs(export_base, exist_ok=True)
  existing = _versions(export_base)
  if version is None:
    version = max(existing, default=0) + 1
  elif isinstance(version, bool) or not isinstance(version, int) or (
      version <= 0):
    raise ValueError(f"version must be a positive int or None, got "
                     f"{version!r}.")
  elif version in existing:
    raise ValueError(
        f"Version {version} already exists in {export_base} "
        f"({existing[version]}); exports are never overwritten. Pass "
        "version=None for the next free version, or delete the old one.")

  final = os.path.join(export_base, str(version))
  tmp = os.path.join(export_base, f"{TMP_PREFIX}{version}-{os.getpid()}")
  # Left by an earlier crashed export of this process id.
  shutil.rmtree(tmp, ignore_errors=True)
  module = _ServingModule(classifier, num_classes, image_size, encoder,
                          embedding_dim, names, eval_crop)
  try:
    _write_saved_model(module, tmp, module.signatures())
    if os.path.exists(final):
      raise ValueError(
          f"{final} appeared while exporting (another export running?); "
          "not overwriting it. Export again for the next free version.")
    os.rename(tmp, final)
  except (OSError, tf.errors.OpError) as e:
    # E.g. no space left: nothing published, earlier versions untouched.
    shutil.rmtree(tmp, ignore_errors=True)
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    previous = latest_version(export_base)
    kept = f" and {previous} is unchanged" if previous else ""
    raise OSError(
        f"Cannot write export version {version} in {export_base} "
        f"({reason}); nothing was published{kept}. Free space on the device "
        "(or fix it) and export again.") from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def latest_version(export_base: str) -> str | None:
  """Path of the highest-numbered version in `export_base`.

  Args:
    export_base: directory of versions written by `export_classifier`.

  Returns:
    `export_base/<largest integer version>`, or None when `export_base` does
    not exist or holds no version (`.tmp-*` leftovers are not versions).
  """
  versions = _versions(export_base)
  if not versions:
    return None
  return versions[max(versions)]


def _versions(export_base):
  """Maps each integer version in `export_base` to its directory."""
  if not os.path.isdir(export_base):
    return {}
  found = {}
  for name in os.listdir(export_base):
    path = os.path.join(export_base, name)
    if _VERSION_NAME.fullmatch(name) and os.path.isdir(path):
      found[int(name)] = path
  return found


def _write_saved_model(module, path, signatures):
  """The one step that writes files; separate so tests can make it fail."""
  tf.saved_model.save(module, path, signatures=signatures)


def _output_dim(model, image_size, what):
  """Checks `model` on one blank image and returns its output width."""
  input_shape = _declared_input_shape(model)
  if input_shape is not None:
    declared = tuple(input_shape[1:3])
    if any(d is not None and d != image_size for d in declared):
      raise ValueError(
          f"The {what} was built for {declared[0]}x{declared[1]} images but "
          f"image_size={image_size}; pass image_size={declared[0]} or "
          "rebuild the model for that size.")
  outputs = model(tf.zeros([1, image_size, image_size, 3]), training=False)
  if len(outputs.shape) != 2:
    raise ValueError(
        f"The {what} must map images to a rank-2 tensor [batch, dim]; it "
        f"returned shape {tuple(outputs.shape)}.")
  return int(outputs.shape[-1])


def _declared_input_shape(model):
  try:
    shape = model.input_shape
  except (AttributeError, ValueError):
    return None  # A subclassed model: nothing declared.
  if not isinstance(shape, tuple) or len(shape) != 4:
    return None
  return shape


def _check_class_names(class_names, num_classes):
  if class_names is None:
    return None
  if isinstance(class_names, (str, bytes)):
    raise ValueError(
        f"class_names must be a sequence of {num_classes} strings, got the "
        f"single string {class_names!r}.")
  names = [str(n) for n in class_names]
  if len(names) != num_classes:
    raise ValueError(
        f"Got {len(names)} class_names but the classifier outputs "
        f"{num_classes} logits; pass one name per logit.")
  return names


def _to_float(images):
  """The one image conversion of the model: uint8 -> float32 in [0, 1]."""
  return augment_lib.uint8_to_float(images)


def _apply(model, images, width):
  """`model` on uint8 `images` `[batch, S, S, 3]` -> float32 `[batch, width]`.

  TF's CPU Conv2D returns its input unchanged for an empty batch, which
  breaks the next layer, so an empty batch skips the model.
  """
  return tf.cond(
      tf.shape(images)[0] > 0,
      lambda: tf.cast(model(_to_float(images), training=False), tf.float32),
      lambda: tf.zeros([0, width], tf.float32))


class _ServingModule(tf.Module):
  """The object saved: the signature functions and the variables they use.

  The Keras models themselves are not attributes (only the variables the
  traced functions read), so the SavedModel holds no Keras objects and loads
  without Keras.
  """

  def __init__(self, classifier, num_classes, image_size, encoder,
               embedding_dim, class_names, eval_crop):
    super().__init__(name="serving")
    size = image_size
    image_spec = tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")
    names = None if class_names is None else tf.constant(class_names)

    def check_images(images):
      # Python callers are stopped by the TensorSpec; this also stops
      # servers that feed the graph directly.
      return tf.ensure_shape(images, [None, size, size, 3])

    def classify(images):
      logits = _apply(classifier, check_images(images), num_classes)
      class_ids = tf.argmax(logits, axis=-1, output_type=tf.int64)
      outputs = {
          "logits": logits,
          "probabilities": tf.nn.softmax(logits, axis=-1),
          "class_ids": class_ids,
      }
      if names is not None:
        outputs["class_names"] = tf.gather(names, class_ids)
      return outputs

    def decode(data):
      image = tf.io.decode_image(data, channels=3, dtype=tf.uint8,
                                 expand_animations=False)
      image = tf.ensure_shape(image, [None, None, 3])
      return augment_lib.eval_image(image, size=size, crop=eval_crop)

    def classify_bytes(image_bytes):
      image_bytes = tf.ensure_shape(image_bytes, [None])
      images = tf.map_fn(
          decode, image_bytes,
          fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
      return classify(images)

    def embed(images):
      representation = _apply(encoder, check_images(images), embedding_dim)
      return {"embedding": tf.math.l2_normalize(representation, axis=-1)}

    self.serving_default = tf.function(classify, input_signature=[image_spec])
    self.serving_bytes = tf.function(
        classify_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    self.embed = None
    if encoder is not None:
      self.embed = tf.function(embed, input_signature=[image_spec])

    # Track the tf.Variables the traced graphs read, not the Keras variable
    # wrappers: with the wrappers, graph-mode loaders (TF Serving,
    # `saved_model_cli run`) restore copies that the signatures never read
    # and fail with "Could not find variable ...".
    variables, seen = [], set()
    for function in self.signatures().values():
      for var in function.variables:
        if id(var) not in seen:
          seen.add(id(var))
          variables.append(var)
    self.model_variables = variables

  def signatures(self):
    """Signature name -> concrete function, `serving_default` first."""
    functions = {name: getattr(self, name) for name in SIGNATURES}
    # The input signatures are fixed, so each function has one trace.
    return {name: function.get_concrete_function()
            for name, function in functions.items() if function is not None}
