"""Corruption robustness: top-1 under on-the-fly image corruptions.

The paper's robustness study (Khosla et al., 2020) measures top-1 on
ImageNet-C (Hendrycks & Dietterich, 2019). `corrupt` applies three of those
corruptions (Gaussian noise, Gaussian blur, JPEG) at severities 1..5 with the
CIFAR-10-C parameters, on the fly, to float images in [0, 1];
`corruption_robustness` reports a classifier's top-1 on each, and
`compare_robustness` / `robustness_table` put several runs side by side.

`evaluate_robustness` (the report's entry point) measures a cifar10 run on
CIFAR-10-C itself (`supcon_tf.cifar10_corrupted`) when TFDS has it prepared
in the data dir, and falls back to these built-in corruptions otherwise.
"""

import json
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from supcon_tf import cifar10_corrupted
from supcon_tf import config as config_lib
from supcon_tf import plots
from supcon_tf import rundir

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "jpeg")
MAX_SEVERITY = 5
# CIFAR-10-C parameters (Hendrycks & Dietterich, 2019) for severities 1..5.
NOISE_SIGMAS = (0.04, 0.06, 0.08, 0.09, 0.10)
# Blur sigma in pixels of a 32-pixel image; scaled with the image's shorter
# side, so a 64-pixel image gets twice the sigma.
BLUR_SIGMAS_32PX = (0.4, 0.6, 0.7, 0.8, 1.0)
JPEG_QUALITIES = (80, 65, 58, 50, 40)


def _check_severity(severity, allow_clean=True) -> int:
  lowest = 0 if allow_clean else 1
  if (isinstance(severity, bool) or
      not isinstance(severity, (int, np.integer)) or
      not lowest <= severity <= MAX_SEVERITY):
    raise ValueError(f"severity must be an int in [{lowest}, {MAX_SEVERITY}], "
                     f"got {severity!r}.")
  return int(severity)


def _check_kind(kind) -> str:
  if kind not in CORRUPTIONS:
    raise ValueError(f"Corruption kind={kind!r} is not one of "
                     f"{list(CORRUPTIONS)}.")
  return kind


def _seed_pair(seed) -> tf.Tensor:
  """A stateless-RNG seed `[2]` int64 from an int or a pair of ints."""
  seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
  if seed.shape.rank == 0:
    return tf.stack([seed, tf.constant(0, tf.int64)])
  if seed.shape.as_list() != [2]:
    raise ValueError(f"seed must be an int or a pair of ints, got shape "
                     f"{seed.shape}.")
  return seed


def _gaussian_blur(images: tf.Tensor, sigma_32px: float) -> tf.Tensor:
  """Separable Gaussian blur of `[batch, H, W, C]` with mirrored borders."""
  shape = tf.shape(images)
  side = tf.minimum(shape[1], shape[2])
  sigma = sigma_32px * tf.cast(side, tf.float32) / 32.0
  # Three sigmas hold 99.7% of the mass; SYMMETRIC padding allows <= side.
  radius = tf.minimum(tf.cast(tf.math.ceil(3.0 * sigma), tf.int32), side)
  offsets = tf.cast(tf.range(-radius, radius + 1), tf.float32)
  kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
  kernel /= tf.reduce_sum(kernel)
  channels = images.shape[-1] or shape[3]
  padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]],
                  mode="SYMMETRIC")
  along_width = tf.tile(kernel[None, :, None, None], [1, 1, channels, 1])
  along_height = tf.tile(kernel[:, None, None, None], [1, 1, channels, 1])
  blurred = tf.nn.depthwise_conv2d(padded, along_width, [1, 1, 1, 1], "VALID")
  return tf.nn.depthwise_conv2d(blurred, along_height, [1, 1, 1, 1], "VALID")


# One graph for every quality and shape: eager map_fn would run the JPEG
# round trip image by image in Python, ~100x slower.
@tf.function(input_signature=[
    tf.TensorSpec([None, None, None, None], tf.float32),
    tf.TensorSpec([], tf.int32)])
def _jpeg_graph(images, quality):
  # adjust_jpeg_quality takes one image at a time.
  return tf.map_fn(
      lambda image: tf.image.adjust_jpeg_quality(image, quality), images,
      fn_output_signature=tf.float32)


def _jpeg(images: tf.Tensor, quality: int) -> tf.Tensor:
  """JPEG round trip of each image of `[batch, H, W, C]` (C = 1 or 3)."""
  out = _jpeg_graph(images, tf.constant(quality, tf.int32))
  return tf.ensure_shape(out, images.shape)


def corrupt(images, kind: str, severity: int, *,
            seed: Union[int, Tuple[int, int], tf.Tensor] = 0) -> tf.Tensor:
  """A corrupted copy of float images, as in CIFAR-10-C / ImageNet-C.

  Kinds and their parameters for severities 1..5:
    * `gaussian_noise`: add N(0, sigma^2) per pixel and channel,
      sigma = `NOISE_SIGMAS` (0.04 .. 0.10).
    * `gaussian_blur`: Gaussian blur with sigma = `BLUR_SIGMAS_32PX`
      (0.4 .. 1.0) times (shorter image side / 32) pixels, mirrored borders.
    * `jpeg`: JPEG encode and decode at quality `JPEG_QUALITIES` (80 .. 40).
  Severity 0 returns the images unchanged (clean).

  Works eagerly and inside `tf.function`. The noise is stateless: the same
  `seed`, severity and shape give the same noise.

  Args:
    images: float images in [0, 1], `[batch, H, W, C]` or `[H, W, C]` (C = 1
      or 3 for `jpeg`).
    kind: one of `CORRUPTIONS`.
    severity: int in [0, 5].
    seed: noise seed, an int or a pair of ints (e.g. `(seed, batch_index)`
      so that every batch gets different noise).

  Returns:
    float32 images of the input's shape, clipped to [0, 1].

  Raises:
    ValueError: unknown `kind`, severity outside [0, 5], non-float images,
      or images that are not rank 3 or 4.
  """
  _check_kind(kind)
  severity = _check_severity(severity)
  images = tf.convert_to_tensor(images)
  if not images.dtype.is_floating:
    raise ValueError(
        f"corrupt expects float images in [0, 1], got dtype {images.dtype}; "
        "convert with tf.image.convert_image_dtype(images, tf.float32).")
  if images.shape.rank not in (3, 4):
    raise ValueError("corrupt expects images [batch, H, W, C] or [H, W, C], "
                     f"got shape {images.shape}.")
  images = tf.cast(images, tf.float32)
  single = images.shape.rank == 3
  batch = images[None] if single else images
  if severity == 0:
    out = batch
  elif kind == "gaussian_noise":
    noise_seed = tf.random.experimental.stateless_fold_in(_seed_pair(seed),
                                                          severity)
    out = batch + NOISE_SIGMAS[severity - 1] * tf.random.stateless_normal(
        tf.shape(batch), seed=noise_seed)
  elif kind == "gaussian_blur":
    out = _gaussian_blur(batch, BLUR_SIGMAS_32PX[severity - 1])
  else:
    out = _jpeg(tf.clip_by_value(batch, 0.0, 1.0),
                JPEG_QUALITIES[severity - 1])
  out = tf.clip_by_value(out, 0.0, 1.0)
  return out[0] if single else out


def corruption_robustness(classifier: keras.Model, dataset: tf.data.Dataset,
                          *, kinds: Sequence[str] = CORRUPTIONS,
                          severities: Sequence[int] = (1, 2, 3, 4, 5),
                          max_examples: Optional[int] = None,
                          seed: int = 0) -> Dict[str, Any]:
  """Top-1 of a classifier on clean and corrupted images.

  Each batch is corrupted once per (kind, severity) with `corrupt`; the
  noise seed is `(seed, batch index)`, so results are reproducible.

  Args:
    classifier: Keras model mapping float32 images in [0, 1],
      `[batch, H, W, C]`, to logits `[batch, num_classes]` (run with
      `training=False`), e.g. the `linear_eval` classifier.
    dataset: finite dataset of `(images [batch, H, W, C]` float in [0, 1],
      `labels [batch]` int), e.g. `data.eval_dataset(cfg, "test", ...)`.
    kinds: corruption kinds, each in `CORRUPTIONS`.
    severities: severities, each in [1, 5].
    max_examples: use at most this many examples (the first ones).
    seed: noise seed.

  Returns:
    A JSON-ready dict:
      `{"clean_top1": float, "severities": [s, ...],
        "top1": {kind: [top-1 at each severity]},
        "mean_top1": {kind: mean over severities},
        "mean_corrupted_top1": mean over kinds and severities (None without
          kinds), "num_examples": int, "seed": int}`.

  Raises:
    ValueError: bad kinds, severities or `max_examples`, non-float images,
      or no examples.
  """
  if isinstance(kinds, str):
    kinds = (kinds,)
  kinds = [_check_kind(k) for k in kinds]
  severities = [_check_severity(s, allow_clean=False) for s in severities]
  if len(set(kinds)) != len(kinds) or len(set(severities)) != len(severities):
    raise ValueError(f"kinds {kinds} and severities {severities} must not "
                     "repeat.")
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"max_examples must be >= 1 or None, got "
                     f"{max_examples!r}.")
  image_spec = dataset.element_spec[0]
  if not image_spec.dtype.is_floating:
    raise ValueError(
        f"corruption_robustness expects float images in [0, 1], got dtype "
        f"{image_spec.dtype}; map tf.image.convert_image_dtype over the "
        "dataset (data.eval_dataset already yields floats).")
  predict = tf.function(
      lambda images: tf.argmax(classifier(images, training=False), axis=-1,
                               output_type=tf.int32),
      input_signature=[tf.TensorSpec([None, *image_spec.shape[1:]],
                                     tf.float32)])
  conditions = [(kind, s) for kind in kinds for s in severities]
  correct = {condition: 0 for condition in [None] + conditions}
  seen = 0
  for index, (images, labels) in enumerate(dataset):
    if max_examples is not None:
      images, labels = (images[:max_examples - seen],
                        labels[:max_examples - seen])
    images = tf.cast(images, tf.float32)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if not len(labels):
      break
    seen += len(labels)
    correct[None] += int(np.sum(predict(images).numpy() == labels))
    batch_seed = tf.constant([seed, index], tf.int64)
    for kind, severity in conditions:
      corrupted = corrupt(images, kind, severity, seed=batch_seed)
      correct[kind, severity] += int(np.sum(predict(corrupted).numpy() ==
                                            labels))
    if max_examples is not None and seen >= max_examples:
      break
  if not seen:
    raise ValueError("corruption_robustness got an empty dataset.")
  top1 = {kind: [correct[kind, s] / seen for s in severities]
          for kind in kinds}
  return {
      "clean_top1": correct[None] / seen,
      "severities": severities,
      "top1": top1,
      "mean_top1": {kind: float(np.mean(v)) for kind, v in top1.items()},
      "mean_corrupted_top1": (float(np.mean(list(top1.values())))
                              if kinds else None),
      "num_examples": seen,
      "seed": int(seed),
  }


# ----------------------------------------------------------------------------
# The report: CIFAR-10-C when prepared, else the built-in corruptions.

BUILTIN = "builtin"


def choose_corruptions(corruptions: str, data_config: config_lib.DataConfig
                       ) -> Tuple[str, str]:
  """Which corruptions `EvalConfig.corruptions` means for this run.

  Looks for prepared files only; nothing is downloaded.

  Returns:
    `(source, description)`: `"cifar10_corrupted"` or `"builtin"`, and what
    the report calls them, e.g. "built-in corruptions (CIFAR-10-C not found
    in /data)".

  Raises:
    ValueError: an unknown choice; `cifar10_corrupted` for a dataset other
      than cifar10, or with no CIFAR-10-C corruption prepared at all five
      severities in the data dir (the message gives the `tfds build`
      command).
  """
  config_lib.check_choice("corruptions", corruptions,
                          config_lib.CORRUPTION_SOURCES)
  if corruptions == BUILTIN:
    return BUILTIN, "built-in corruptions (corruptions=builtin)"
  dataset = data_config.dataset.split(":")[0]  # Drop a ":<version>".
  if dataset != "cifar10":
    if corruptions == cifar10_corrupted.NAME:
      raise ValueError(
          f"corruptions={corruptions!r} needs dataset 'cifar10' (CIFAR-10-C "
          f"corrupts its test images), got {data_config.dataset!r}; use "
          "corruptions='auto' or 'builtin'.")
    return BUILTIN, ("built-in corruptions (CIFAR-10-C is for cifar10, not "
                     f"{data_config.dataset})")
  found, _ = cifar10_corrupted.complete_corruptions(data_config.data_dir)
  where = cifar10_corrupted.searched_data_dir(data_config.data_dir)
  if found:
    return cifar10_corrupted.NAME, f"CIFAR-10-C from {where}"
  if corruptions == cifar10_corrupted.NAME:
    raise ValueError(
        f"corruptions='cifar10_corrupted' but CIFAR-10-C is not prepared in "
        f"data_dir={where!r}: build it with "
        f"`{cifar10_corrupted.build_command(data_config.data_dir)}` (a "
        "2.9 GB download), or use corruptions='auto' or 'builtin'.")
  return BUILTIN, f"built-in corruptions (CIFAR-10-C not found in {where})"


def evaluate_robustness(classifier: keras.Model, test: tf.data.Dataset,
                        data_config: config_lib.DataConfig, *,
                        corruptions: str = "auto",
                        max_examples: Optional[int] = None,
                        batch_size: int = 256, seed: int = 0
                        ) -> Dict[str, Any]:
  """A run's corruption robustness: CIFAR-10-C or the built-in corruptions.

  Args:
    classifier: Keras model mapping float32 images in [0, 1],
      `[batch, H, W, C]`, to logits `[batch, num_classes]`.
    test: the clean test images, `(images [batch, H, W, C]` float in [0, 1],
      `labels [batch])`, already cut to the examples to use.
    data_config: the run's data configuration (dataset, data dir, image
      size and evaluation crop).
    corruptions: `EvalConfig.corruptions` (see `choose_corruptions`).
    max_examples: CIFAR-10-C images used per set (the first ones in
      TFDS's order, the same images in every set); None: all 10,000.
    batch_size: CIFAR-10-C batch size.
    seed: noise seed of the built-in corruptions.

  Returns:
    The `corruption_robustness` dict (built-in) or the
    `cifar10_corrupted.cifar10_corrupted_robustness` dict, either with
    `"corruptions"` (`"builtin"` or `"cifar10_corrupted"`), `"description"`
    (what they are, and for the fallback why) and
    `"relative_corrupted_top1"` (mean corrupted top-1 / clean top-1, None
    for a clean top-1 of 0).

  Raises:
    ValueError: see `choose_corruptions`.
  """
  source, description = choose_corruptions(corruptions, data_config)
  if source == cifar10_corrupted.NAME:
    clean = corruption_robustness(classifier, test, kinds=())["clean_top1"]
    return cifar10_corrupted.cifar10_corrupted_robustness(
        classifier, data_config, clean_top1=clean, max_examples=max_examples,
        batch_size=batch_size)
  result = corruption_robustness(classifier, test, seed=seed)
  clean, mean = result["clean_top1"], result["mean_corrupted_top1"]
  return {"corruptions": BUILTIN, "description": description, **result,
          "relative_corrupted_top1": mean / clean if clean else None}


def plotted(result: Mapping[str, Any]) -> Mapping[str, Any]:
  """What `plots.plot_robustness` draws of an `evaluate_robustness` result.

  CIFAR-10-C: one panel per corruption family (`family_summary`), not 19.
  """
  if result.get("corruptions") == cifar10_corrupted.NAME:
    return cifar10_corrupted.family_summary(result)
  return result


# ----------------------------------------------------------------------------
# Saved results of run directories.

def load_robustness(workdir: str) -> Dict[str, Any]:
  """The `robustness.json` that `evaluate_workdir` wrote in `workdir`."""
  path = rundir.robustness_path(workdir)
  if not tf.io.gfile.exists(path):
    raise ValueError(
        f"{path} does not exist; run `supcon-tf --mode=evaluate "
        f"--workdir={workdir}` (with --robustness) first.")
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def compare_robustness(workdirs: Mapping[str, str], out_png: str
                       ) -> Dict[str, Dict[str, Any]]:
  """Plots the robustness of several runs together (e.g. SupCon vs CE).

  Args:
    workdirs: `{model name: run directory holding robustness.json}`; the
      names label the lines.
    out_png: where to write the PNG (parent directories are created).

  Returns:
    `{model name: its robustness.json dict}`, e.g. for
    `robustness_table`.

  Raises:
    ValueError: no work dirs, or one without `robustness.json`.
  """
  if not workdirs:
    raise ValueError("workdirs is empty; pass {name: workdir}.")
  results = {name: load_robustness(workdir)
             for name, workdir in workdirs.items()}
  plots.plot_robustness(results, out_png)
  return results


def robustness_table(results_by_model: Mapping[str, Mapping]) -> str:
  """A Markdown table of clean and mean corrupted top-1 per kind (in %).

  Args:
    results_by_model: `{model name: corruption_robustness result}`.

  Returns:
    The table, one row per model.
  """
  kinds = []
  for result in results_by_model.values():
    kinds += [k for k in result["top1"] if k not in kinds]
  header = ["model", "clean"] + [k.replace("_", " ") for k in kinds] + [
      "mean corrupted"]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]

  def percent(value):
    return "-" if value is None else f"{100 * value:.1f}"

  for name, result in results_by_model.items():
    cells = [name, percent(result["clean_top1"])]
    cells += [percent(float(np.mean(result["top1"][k])) if k in result["top1"]
                      else None) for k in kinds]
    cells.append(percent(result.get("mean_corrupted_top1")))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
