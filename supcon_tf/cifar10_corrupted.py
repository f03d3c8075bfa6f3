"""CIFAR-10-C (Hendrycks & Dietterich, 2019): top-1 on its prepared TFDS sets.

TFDS prepares CIFAR-10-C as the builder configs
`cifar10_corrupted/<corruption>_<severity>` (19 corruptions x severities
1..5), each the 10,000 CIFAR-10 test images corrupted (stored in one
shuffled order that every set shares), with
`tfds build cifar10_corrupted --data_dir=<dir>`. Nothing here
downloads: `complete_corruptions` finds the corruptions whose five
severities are prepared in a data dir, and `cifar10_corrupted_robustness`
scores a classifier on them through the run's own evaluation preprocessing.
"""

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import file_utils as tfds_file_utils

from supcon_tf import config as config_lib
from supcon_tf import data

NAME = "cifar10_corrupted"
SEVERITIES = (1, 2, 3, 4, 5)
# The groups of Hendrycks & Dietterich; "extra" are the four corruptions
# outside the 15 of the benchmark's mean.
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "frosted_glass_blur", "motion_blur",
             "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic", "pixelate", "jpeg_compression"),
    "extra": ("gaussian_blur", "saturate", "spatter", "speckle_noise"),
}


def config_name(corruption: str, severity: int) -> str:
  """The TFDS builder config of one set, e.g. `gaussian_noise_1`."""
  return f"{corruption}_{severity}"


def all_configs() -> List[Tuple[str, int]]:
  """`(corruption, severity)` of every TFDS builder config, in TFDS's order."""
  return [(c.corruption, c.severity)
          for c in tfds.builder_cls(NAME).BUILDER_CONFIGS]


def _data_dirs(data_dir: Optional[str]) -> List[str]:
  """Where TFDS looks for datasets given `data_dir` (None: its defaults)."""
  return [str(d) for d in tfds_file_utils.list_data_dirs(data_dir)]


def searched_data_dir(data_dir: Optional[str]) -> str:
  """The data dir(s) TFDS reads for `data_dir`, for messages."""
  return ", ".join(_data_dirs(data_dir))


def build_command(data_dir: Optional[str]) -> str:
  """The command that prepares CIFAR-10-C where `data_dir` would find it."""
  return f"tfds build {NAME} --data_dir={_data_dirs(data_dir)[0]}"


def _is_prepared(corruption: str, severity: int,
                 data_dir: Optional[str]) -> bool:
  name = config_name(corruption, severity)
  # No builder without the config's directory: TFDS warns for every absent
  # one, and a data dir holds few of the 95.
  if not any(tf.io.gfile.isdir(os.path.join(d, NAME, name))
             for d in _data_dirs(data_dir)):
    return False
  return tfds.builder(f"{NAME}/{name}", data_dir=data_dir).is_prepared()


def complete_corruptions(data_dir: Optional[str]
                         ) -> Tuple[List[str], List[str]]:
  """The corruptions prepared at every severity in `data_dir`, and the rest.

  Only looks at files: nothing is downloaded or built.

  Returns:
    `(corruptions, missing)`: the corruptions whose five severities are all
    prepared, in TFDS's order, and the config names not prepared (e.g.
    `"fog_3"`; every config when none is).
  """
  configs = all_configs()
  missing = [config_name(*c) for c in configs
             if not _is_prepared(*c, data_dir)]
  corruptions = []
  for corruption, _ in configs:
    if corruption not in corruptions and not any(
        config_name(corruption, s) in missing for s in SEVERITIES):
      corruptions.append(corruption)
  return corruptions, missing


def _set_config(data_config: config_lib.DataConfig, corruption: str,
                severity: int) -> config_lib.DataConfig:
  """The run's data config reading one CIFAR-10-C set as its test split."""
  # CIFAR-10-C has only a test split: read it as "train" too, none held out.
  return dataclasses.replace(
      data_config, dataset=f"{NAME}/{config_name(corruption, severity)}",
      train_split="test", eval_split="test", validation_fraction=0.0,
      train_examples=None)


def _correct_and_seen(predict, dataset: tf.data.Dataset,
                      max_examples: Optional[int]) -> Tuple[int, int]:
  """Correct predictions and examples seen over the first `max_examples`."""
  correct = seen = 0
  for images, labels in dataset:
    if max_examples is not None:
      images, labels = (images[:max_examples - seen],
                        labels[:max_examples - seen])
    labels = np.asarray(labels).reshape(-1)
    if not len(labels):
      break
    correct += int(np.sum(predict(images).numpy() == labels))
    seen += len(labels)
    if max_examples is not None and seen >= max_examples:
      break
  return correct, seen


def _mean(values: Sequence[float]) -> Optional[float]:
  return float(np.mean(values)) if len(values) else None


def cifar10_corrupted_robustness(
    classifier: keras.Model, data_config: config_lib.DataConfig, *,
    clean_top1: float, max_examples: Optional[int] = None,
    batch_size: int = 256) -> Dict[str, Any]:
  """Top-1 of a classifier on each CIFAR-10-C set prepared in the data dir.

  Each set goes through `data.eval_dataset` with the run's `image_size` and
  `eval_crop`, as the clean test images do. Corruptions prepared at only
  some severities are left out (listed in `missing`).

  Args:
    classifier: Keras model mapping float32 images in [0, 1],
      `[batch, H, W, 3]`, to logits `[batch, 10]`.
    data_config: the run's data configuration (a cifar10 run); its
      `data_dir` is searched.
    clean_top1: top-1 on the same (first `max_examples`) clean test images.
    max_examples: use the first this many images of each set (in TFDS's
      order, the same for every set; a sample of the test images, not
      necessarily those of `clean_top1`); None: all 10,000.
    batch_size: evaluation batch size.

  Returns:
    A JSON-ready dict: `{"corruptions": "cifar10_corrupted", "description":
    str, "clean_top1": float, "severities": [1, ..., 5], "top1":
    {corruption: [top-1 at each severity]}, "mean_top1": {corruption: mean
    over severities}, "mean_corrupted_top1": mean over every set,
    "relative_corrupted_top1": that mean / clean_top1 (None for a clean
    top-1 of 0), "family_mean_top1": {family of FAMILIES: mean over its
    evaluated sets}, "benchmark_mean_top1": mean over the 15 benchmark
    corruptions (None unless all are evaluated), "num_examples": images per
    set, "data_dir": str, "missing": [config names not prepared]}`.

  Raises:
    ValueError: no corruption prepared at all five severities.
  """
  corruptions, missing = complete_corruptions(data_config.data_dir)
  searched = searched_data_dir(data_config.data_dir)
  if not corruptions:
    raise ValueError(
        f"CIFAR-10-C ({NAME}) is not prepared in data_dir={searched!r}: "
        f"build it with `{build_command(data_config.data_dir)}` (a 2.9 GB "
        "download), or use the built-in corruptions (corruptions='builtin').")
  predict = None
  top1, counts = {}, set()
  for corruption in corruptions:
    top1[corruption] = []
    for severity in SEVERITIES:
      dataset = data.eval_dataset(
          _set_config(data_config, corruption, severity), "test",
          batch_size=batch_size)
      if predict is None:  # One graph for every set.
        predict = tf.function(
            lambda images: tf.argmax(classifier(images, training=False),
                                     axis=-1, output_type=tf.int32),
            input_signature=[tf.TensorSpec(
                [None, *dataset.element_spec[0].shape[1:]], tf.float32)])
      correct, seen = _correct_and_seen(predict, dataset, max_examples)
      if not seen:
        raise ValueError(f"CIFAR-10-C set {config_name(corruption, severity)}"
                         f" in {searched} is empty; rebuild it with "
                         f"`{build_command(data_config.data_dir)}`.")
      top1[corruption].append(correct / seen)
      counts.add(seen)
  mean_top1 = {c: float(np.mean(v)) for c, v in top1.items()}
  mean_all = float(np.mean(list(top1.values())))
  benchmark = [c for family, names in FAMILIES.items() if family != "extra"
               for c in names]
  return {
      "corruptions": NAME,
      "description": (f"CIFAR-10-C: {len(corruptions)} corruptions x "
                      f"{len(SEVERITIES)} severities from {searched}"),
      "clean_top1": clean_top1,
      "severities": list(SEVERITIES),
      "top1": top1,
      "mean_top1": mean_top1,
      "mean_corrupted_top1": mean_all,
      "relative_corrupted_top1": (mean_all / clean_top1 if clean_top1
                                  else None),
      "family_mean_top1": {
          family: _mean([mean_top1[c] for c in names if c in mean_top1])
          for family, names in FAMILIES.items()},
      "benchmark_mean_top1": (
          _mean([mean_top1[c] for c in benchmark])
          if all(c in mean_top1 for c in benchmark) else None),
      # Sets shorter than max_examples would make their top-1 incomparable.
      "num_examples": min(counts),
      "data_dir": searched,
      "missing": missing,
  }


def family_summary(result: Dict[str, Any]) -> Dict[str, Any]:
  """A `cifar10_corrupted_robustness` result averaged by corruption family.

  Returns:
    `{"clean_top1", "severities", "top1": {family: [mean top-1 of its
    evaluated corruptions at each severity]}}`, the form
    `plots.plot_robustness` draws (one panel per family, not 19).
  """
  top1 = {}
  for family, names in FAMILIES.items():
    rows = [result["top1"][c] for c in names if c in result["top1"]]
    if rows:
      top1[family] = [float(v) for v in np.mean(rows, axis=0)]
  return {"clean_top1": result["clean_top1"],
          "severities": list(result["severities"]), "top1": top1}
