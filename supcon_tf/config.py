"""Frozen configuration objects for every stage of the pipeline.

The library takes these objects; only the command-line module builds them
from flags. Standard library only, so any module may import this one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Tuple

# What `supcon_tf.pipeline.run` (and --mode) runs; `train_ce` is `all` with
# a cross-entropy pretraining; `embed` writes a split's embeddings.
MODES = ("all", "pretrain", "linear_eval", "export", "evaluate", "train_ce",
         "embed")
METHODS = ("supcon", "simclr", "npairs", "ce")
CONTRAST_MODES = ("all", "one")
SUMMATIONS = ("out", "in")
DENOMINATORS = ("all", "one_positive", "only_negatives")
AUGMENTATIONS = ("simclr", "randaugment", "autoaugment", "none")
# Random-resized-crop box sampling: SimCLR's TF code or torchvision's.
CROP_SAMPLINGS = ("simclr", "torchvision")
# Evaluation images: "center" resizes the short side to image_size / 0.875
# and crops the centre (the ImageNet protocol), "resize" resizes the whole
# image to image_size (a no-op for CIFAR), "auto" picks "center" from
# CENTER_CROP_MIN_SIZE up.
EVAL_CROPS = ("auto", "center", "resize")
CENTER_CROP_MIN_SIZE = 128
OPTIMIZERS = ("sgd", "lars", "adamw", "lamb")
LR_SCHEDULES = ("cosine", "constant")
STEMS = ("cifar", "imagenet")
# Encoders `<source>:<name>` beside the built-in `resnet<depth>`.
ENCODER_SOURCES = ("keras_applications", "keras_hub")
HEADS = ("mlp", "mlp_bn", "linear")
STRATEGIES = ("default", "mirrored", "multi_worker")
# "auto": mixed_bfloat16 where the hardware has bfloat16, else float32.
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
EMBEDDING_METHODS = ("pca", "tsne")
# Corruptions of the robustness report: "auto" is CIFAR-10-C when prepared
# in the data dir (and the run is cifar10), else the built-in ones.
CORRUPTION_SOURCES = ("auto", "builtin", "cifar10_corrupted")


def check_choice(name: str, value: str, choices: Tuple[str, ...]) -> None:
  """Raises ValueError naming `name`, `value` and the valid `choices`."""
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {list(choices)}.")


def _check_positive(name: str, value) -> None:
  if value is None or value <= 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")


def check_temperature(temperature, name: str = "temperature") -> None:
  """The one check of every temperature (configs, losses, k-NN): > 0, not NaN.

  Callers that also take a tensor (a schedule) check only python numbers.
  """
  if temperature is None or not temperature > 0:
    raise ValueError(f"{name} must be > 0, got {temperature!r}.")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Arguments of `supcon_tf.supcon_loss` (see its docstring)."""
  temperature: float = 0.1
  contrast_mode: str = "all"
  summation: str = "out"
  denominator: str = "all"
  positives_cap: Optional[int] = None
  scale_by_temperature: bool = True
  block_size: Optional[int] = None

  def __post_init__(self):
    check_temperature(self.temperature)
    check_choice("contrast_mode", self.contrast_mode, CONTRAST_MODES)
    check_choice("summation", self.summation, SUMMATIONS)
    check_choice("denominator", self.denominator, DENOMINATORS)
    if self.positives_cap is not None and self.positives_cap < 0:
      raise ValueError(
          f"positives_cap must be >= 0 or None, got {self.positives_cap}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where images come from and how views are made.

  Attributes:
    dataset: a TFDS name (`cifar10`, `cifar100`, `imagenet2012`, ...) or
      `folder:<path>` for a directory with one sub-directory per class.
    data_dir: TFDS data directory (None = TFDS default / `TFDS_DATA_DIR`).
    image_size: side of the square images fed to the encoder.
    num_views: augmented views per image for contrastive methods.
    augmentation: view policy, one of AUGMENTATIONS.
    blur: apply Gaussian blur in the SimCLR policy (ImageNet recipe).
    crop_sampling: how random resized crops draw their box: `simclr`
      (TF's `sample_distorted_bounding_box`, as SimCLR's TF code; crop height
      uniform: median area 0.46 of a square image at scale 0.2-1) or
      `torchvision` (`RandomResizedCrop`, as the official PyTorch SupCon
      code; area uniform: median 0.54 there).
    eval_crop: how unaugmented images (evaluation, cached linear-evaluation
      features, the exported `serving_bytes`) reach `image_size`: `center`
      (short side to round(image_size / 0.875), centre crop; 256 -> 224 for
      ImageNet), `resize` (whole image resized; CIFAR's stored 32x32 images
      pass unchanged) or `auto` (`center` for image_size >=
      CENTER_CROP_MIN_SIZE, else `resize`); see `resolved_eval_crop`.
    train_split / eval_split: TFDS split strings.
    validation_fraction: share of `train_split` held out for choices made in
      linear evaluation (the test split is reported once, at the end).
    skip_corrupt: in folder datasets, skip undecodable files (counted)
      instead of failing.
    train_examples: use only the first this many examples of the "train"
      split (what is left after the validation hold-out, which stays as it
      is), e.g. for smoke tests; None = all of them.
  """
  dataset: str = "cifar10"
  data_dir: Optional[str] = None
  image_size: int = 32
  num_views: int = 2
  augmentation: str = "simclr"
  blur: bool = False
  crop_sampling: str = "simclr"
  eval_crop: str = "auto"
  train_split: str = "train"
  eval_split: str = "test"
  validation_fraction: float = 0.1
  skip_corrupt: bool = False
  shuffle_buffer: int = 10_000
  train_examples: Optional[int] = None

  def __post_init__(self):
    _check_positive("image_size", self.image_size)
    if self.num_views < 1:
      raise ValueError(f"num_views must be >= 1, got {self.num_views}.")
    check_choice("augmentation", self.augmentation, AUGMENTATIONS)
    check_choice("crop_sampling", self.crop_sampling, CROP_SAMPLINGS)
    check_choice("eval_crop", self.eval_crop, EVAL_CROPS)
    if not 0.0 <= self.validation_fraction < 1.0:
      raise ValueError("validation_fraction must be in [0, 1), got "
                       f"{self.validation_fraction}.")
    if self.train_examples is not None and self.train_examples < 1:
      raise ValueError("DataConfig.train_examples must be >= 1 (or None for "
                       f"all), got {self.train_examples}.")

  @property
  def resolved_eval_crop(self) -> str:
    """`eval_crop` with `auto` settled: `center` or `resize`."""
    if self.eval_crop != "auto":
      return self.eval_crop
    return "center" if self.image_size >= CENTER_CROP_MIN_SIZE else "resize"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Encoder and projection head.

  Attributes:
    encoder: `resnet{18,34,50,101,152,200}`, `keras_applications:<Name>`
      (any `keras.applications` constructor, e.g.
      `keras_applications:MobileNetV3Small`) or `keras_hub:<preset or
      local preset directory>` (needs keras-hub).
    encoder_weights: None (random initialisation) or a local file of
      initial encoder weights: a `.weights.h5` file of the backbone (for
      keras_hub also a preset directory).
    stem: `cifar` (3x3 stride 1, no max-pool) or `imagenet` (7x7/2 + pool);
      ResNets only.
    width: channel multiplier of the ResNet (ResNets only).
    head: `mlp`, `mlp_bn` (batch norm before the hidden ReLU) or `linear`
      projection head.
    head_hidden: hidden width of the MLP head (None = representation width).
    projection_dim: output width of the head (L2-normalised).
    sync_batch_norm: None = synchronised exactly when there are several
      replicas; True/False forces it.
  """
  encoder: str = "resnet18"
  stem: str = "cifar"
  width: float = 1.0
  head: str = "mlp"
  head_hidden: Optional[int] = None
  projection_dim: int = 128
  sync_batch_norm: Optional[bool] = None
  encoder_weights: Optional[str] = None

  def __post_init__(self):
    source, sep, name = self.encoder.partition(":")
    if sep and (source not in ENCODER_SOURCES or not name):
      raise ValueError(
          f"encoder={self.encoder!r} is not resnet<depth>, "
          "keras_applications:<Name> or keras_hub:<preset>; e.g. "
          "keras_applications:MobileNetV3Small.")
    if self.encoder_weights is not None and not self.encoder_weights:
      raise ValueError("encoder_weights='' names no file; give a local "
                       ".weights.h5 path or leave it unset (None).")
    check_choice("stem", self.stem, STEMS)
    check_choice("head", self.head, HEADS)
    _check_positive("width", self.width)
    _check_positive("projection_dim", self.projection_dim)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimiser and learning-rate schedule.

  `learning_rate` is the base rate for a global batch of 256; the schedule
  scales it by global_batch / 256 (linear scaling rule).
  """
  name: str = "sgd"
  learning_rate: float = 0.5
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 1e-4
  warmup_epochs: float = 0.0
  schedule: str = "cosine"
  scale_by_batch: bool = True

  def __post_init__(self):
    check_choice("optimizer", self.name, OPTIMIZERS)
    check_choice("schedule", self.schedule, LR_SCHEDULES)
    _check_positive("learning_rate", self.learning_rate)
    if self.weight_decay < 0:
      raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")


def check_queue(queue_size: int, key_encoder_momentum: float) -> None:
  """Raises ValueError for a bad memory-queue setting, naming the fix."""
  if (isinstance(queue_size, bool) or not isinstance(queue_size, int)
      or queue_size < 0):
    raise ValueError(f"queue_size={queue_size!r} must be an int >= 0 "
                     "(0 = off).")
  if not 0.0 <= key_encoder_momentum < 1.0:
    raise ValueError(f"key_encoder_momentum={key_encoder_momentum} must be "
                     "in [0, 1) (e.g. 0.99; 0 = no key encoder).")
  if key_encoder_momentum and not queue_size:
    raise ValueError(
        f"key_encoder_momentum={key_encoder_momentum} needs a queue "
        "(queue_size > 0): the key encoder only fills the queue.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One pretraining (or cross-entropy) run.

  Attributes:
    method: `supcon`, `simclr`, `npairs` or `ce` (encoder + linear head
      trained with cross-entropy, same loop).
    batch_size: global batch size (samples; each has `num_views` views).
    epochs / steps: length of the run; `steps` wins when set.
    steps_per_loop: steps run inside one `tf.function` call; checkpoints,
      summaries and the progress bar update between loops.
    checkpoint_every: steps between checkpoints (rounded up to loops).
    jit_compile: XLA-compile the training step (one device, or replicas
      that are all GPUs; refused for several CPU replicas).
    precision: `float32`, `mixed_bfloat16`, `mixed_float16` or `auto`
      (`mixed_bfloat16` on GPUs of compute capability >= 8.0 and CPUs with
      AVX512-BF16 or AMX, else `float32`; resolved on the machine that runs).
    deterministic: enable TF op determinism (reproducible, slower).
    queue_size: rows of a FIFO memory queue of past keys (one row per view)
      added to every anchor's contrast set (`supcon` / `simclr`); 0 = off.
      Must hold at least one step's keys, `batch_size * num_views`.
    key_encoder_momentum: 0 = keys are the online embeddings with
      stop-gradient (XBM); in (0, 1) = keys from an exponential moving
      average copy of encoder + head (MoCo). Needs `queue_size > 0`.
  """
  method: str = "supcon"
  batch_size: int = 256
  epochs: float = 10.0
  steps: Optional[int] = None
  steps_per_loop: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  jit_compile: bool = False
  precision: str = "float32"
  seed: int = 0
  deterministic: bool = False
  queue_size: int = 0
  key_encoder_momentum: float = 0.0
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  optimizer: OptimizerConfig = dataclasses.field(
      default_factory=OptimizerConfig)

  def __post_init__(self):
    check_choice("method", self.method, METHODS)
    check_choice("precision", self.precision, PRECISIONS)
    _check_positive("batch_size", self.batch_size)
    _check_positive("steps_per_loop", self.steps_per_loop)
    if self.steps is None:
      _check_positive("epochs", self.epochs)
    else:
      _check_positive("steps", self.steps)
    check_queue(self.queue_size, self.key_encoder_momentum)
    if self.queue_size:
      if self.method not in ("supcon", "simclr"):
        raise ValueError(f"queue_size={self.queue_size} needs method "
                         f"'supcon' or 'simclr'; got {self.method!r}.")
      keys = self.batch_size * self.data.num_views
      if self.queue_size < keys:
        raise ValueError(
            f"queue_size={self.queue_size} is smaller than one step's keys "
            f"(batch_size={self.batch_size} x num_views="
            f"{self.data.num_views} = {keys}); use 0 (off) or >= {keys}.")


@dataclasses.dataclass(frozen=True)
class LinearEvalConfig:
  """Frozen-encoder linear classifier.

  `learning_rate` and `epochs` are chosen on the validation split held out
  from the training data; the test split is evaluated once at the end.

  Attributes:
    epochs: training epochs per learning rate; the epoch whose weights are
      kept (1..epochs) is chosen on the validation split.
    learning_rates: learning rates to choose from on the validation split;
      None means just `learning_rate`. When set, it replaces
      `learning_rate`.
    augment: train on augmented images (`DataConfig.augmentation`) instead
      of plain resized ones.
    cache_features: without `augment`, compute the encoder's features once
      and fit the linear layer on them.
  """
  epochs: int = 10
  batch_size: int = 256
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 0.0
  augment: bool = False
  cache_features: bool = True
  seed: int = 0
  learning_rates: Optional[Tuple[float, ...]] = None

  def __post_init__(self):
    _check_positive("epochs", self.epochs)
    _check_positive("batch_size", self.batch_size)
    _check_positive("learning_rate", self.learning_rate)
    if self.learning_rates is not None:
      # JSON gives lists; keep the config hashable.
      object.__setattr__(self, "learning_rates", tuple(self.learning_rates))
      if not self.learning_rates:
        raise ValueError("learning_rates must be None or non-empty, got ().")
      for rate in self.learning_rates:
        _check_positive("learning_rates entries", rate)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The report stage (`supcon_tf.evaluation.evaluate_workdir`).

  Attributes:
    robustness: measure corruption robustness (needs the linear classifier).
    corruptions: which corruptions, one of CORRUPTION_SOURCES: `auto`
      (CIFAR-10-C when a cifar10 run finds `cifar10_corrupted` prepared in
      its data dir, else the built-in ones), `builtin` (computed on the
      fly; `supcon_tf.robustness.corrupt`) or `cifar10_corrupted` (fails
      when it is not prepared).
    max_examples: test examples used for everything in the report (for
      CIFAR-10-C: the first this many images of each of its sets).
    knn_train_examples: training examples (validation held out) used as
      k-NN neighbours.
    k: k-NN neighbours (lowered to the number of neighbours available).
    temperature: k-NN vote temperature.
    batch_size: evaluation batch size.
    embedding_method: 2-D projection of the embedding plot, "pca" or "tsne".
    seed: seed of the corruption noise and of t-SNE.
  """
  robustness: bool = True
  corruptions: str = "auto"
  max_examples: int = 2000
  knn_train_examples: int = 10_000
  k: int = 200
  temperature: float = 0.1
  batch_size: int = 256
  embedding_method: str = "pca"
  seed: int = 0

  def __post_init__(self):
    for name in ("max_examples", "knn_train_examples", "k", "batch_size"):
      value = getattr(self, name)
      if value is None or value < 1:
        raise ValueError(f"EvalConfig.{name} must be >= 1, got {value!r}.")
    check_temperature(self.temperature, "EvalConfig.temperature")
    check_choice("EvalConfig.embedding_method", self.embedding_method,
                 EMBEDDING_METHODS)
    check_choice("EvalConfig.corruptions", self.corruptions,
                 CORRUPTION_SOURCES)


def to_dict(config) -> dict:
  """A JSON-ready dict of a (nested) config."""
  return dataclasses.asdict(config)


def to_json(config) -> str:
  return json.dumps(to_dict(config), indent=2, sort_keys=True)


def from_dict(cls, values: dict):
  """Rebuilds a (nested) config written by `to_dict`; unknown keys fail."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"Unknown {cls.__name__} keys: {unknown}.")
  kwargs = {}
  for name, value in values.items():
    sub = _NESTED.get((cls, name))
    kwargs[name] = from_dict(sub, value) if sub and isinstance(value, dict) else value
  return cls(**kwargs)


_NESTED = {
    (TrainConfig, "loss"): LossConfig,
    (TrainConfig, "data"): DataConfig,
    (TrainConfig, "model"): ModelConfig,
    (TrainConfig, "optimizer"): OptimizerConfig,
}


# The CPU-budget recipe (experiments/cifar10_supcon_cpu30.cfg, measured in
# experiments/RESULTS.md): the command line's defaults, each defined here
# once. The dataclass defaults above stay the library's (a full-width
# ResNet, SGD), for code that builds its own configuration.
BUDGET_TRAIN = TrainConfig(
    epochs=16, steps_per_loop=25, checkpoint_every=100, precision="auto",
    data=DataConfig(num_views=1, crop_sampling="torchvision"),
    model=ModelConfig(width=0.25, head="mlp_bn"),
    # Warm-up over 30 % of the 16 epochs: +1.0 point of validation top-1
    # over a half-epoch warm-up, 3 seeds each (RESULTS.md).
    optimizer=OptimizerConfig(name="adamw", learning_rate=0.01,
                              warmup_epochs=4.8))
BUDGET_LINEAR = LinearEvalConfig(epochs=10, learning_rates=(0.3, 1.0, 3.0))
