"""Optimisers and learning-rate schedules for contrastive pretraining.

`LARS` is the layer-wise adaptive optimiser of You et al. (2017) in the form
used by SimCLR and SupCon; `WarmupCosine` is the linear warm-up + cosine decay
schedule of both papers; `build_optimizer` turns an `OptimizerConfig` into a
ready Keras optimiser.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import keras
from keras import ops
import tensorflow as tf

from supcon_tf import config as config_lib

# Substrings of a variable's path that mark batch-norm parameters and biases.
DEFAULT_EXCLUDE = ("batch_normalization", "bias", "bn")
# Keras matches `exclude_from_weight_decay(var_names=...)` against the
# variable's name: the short Keras name ("gamma") in the generic code path, the
# backing tf.Variable's ("stem_bn/gamma:0") in the TensorFlow backend. Both
# end in the Keras 3 names of norm scales/offsets and biases, whatever the
# layer is called.
_NORM_AND_BIAS_NAME = r"(^|/)(gamma|beta|bias)(:\d+)?$"
# A warm-up longer than the whole run is cut to this share of the run.
SHORT_RUN_WARMUP_FRACTION = 0.1


def _variable_names(variable) -> Sequence[str]:
  # Keras variables carry a `path` ("model/dense/kernel"); plain tf.Variables
  # only a `name`.
  return (getattr(variable, "path", "") or "", variable.name or "")


def _matches(variable, patterns: Iterable[str]) -> bool:
  names = _variable_names(variable)
  return any(p in n for p in patterns for n in names)


def _is_norm_or_bias(variable, patterns: Iterable[str]) -> bool:
  """True for rank <= 1 variables and those whose path contains a pattern."""
  return len(variable.shape) <= 1 or _matches(variable, patterns)


@keras.saving.register_keras_serializable(package="supcon_tf")
class LARS(keras.optimizers.Optimizer):
  """Layer-wise Adaptive Rate Scaling with momentum (You et al., 2017).

  The SimCLR / SupCon form ("classic momentum"). For a variable `w` with
  gradient `g` that is adapted:

  ```
  g = g + weight_decay * w
  trust = eta * ||w|| / ||g||   if ||w|| > 0 and ||g|| > 0, else 1
  v = momentum * v + learning_rate * trust * g
  w = w - v                                             (nesterov=False)
  w = w - (momentum * v + learning_rate * trust * g)    (nesterov=True)
  ```

  The trust ratio scales the step (it enters the momentum buffer), so a
  change of learning rate takes effect through the buffer, as in SimCLR.

  Excluded variables (rank <= 1, i.e. biases and batch-norm scales/offsets,
  any whose path or name contains one of `exclude_from_adaptation`, and any
  passed to `exclude_from_weight_decay`) get neither weight decay nor the
  trust ratio: they follow plain momentum SGD, `v = momentum * v + lr * g`.

  Weight decay here is L2 folded into the gradient before the trust ratio;
  the Keras base class's decoupled weight decay is switched off so that it is
  not applied a second time.

  Args:
    learning_rate: float, or a `LearningRateSchedule`, or a callable.
    momentum: float in [0, 1).
    weight_decay: float >= 0, L2 coefficient for adapted variables.
    eta: trust coefficient, > 0.
    nesterov: use Nesterov momentum.
    exclude_from_adaptation: substrings of variable paths/names to exclude.
    **kwargs: standard Keras optimizer arguments (`clipnorm`, `use_ema`,
      `loss_scale_factor`, `name`, ...).

  Example:

  ```python
  optimizer = LARS(learning_rate=WarmupCosine(4.8, 500, 10_000),
                   weight_decay=1e-6)
  model.compile(optimizer=optimizer, loss=...)
  ```
  """

  def __init__(self,
               learning_rate,
               momentum: float = 0.9,
               weight_decay: float = 1e-6,
               eta: float = 0.001,
               nesterov: bool = False,
               exclude_from_adaptation: Sequence[str] = DEFAULT_EXCLUDE,
               **kwargs):
    if isinstance(learning_rate, int) and not isinstance(learning_rate, bool):
      learning_rate = float(learning_rate)
    weight_decay = 0.0 if weight_decay is None else float(weight_decay)
    super().__init__(
        learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    if weight_decay < 0:
      raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    if eta <= 0:
      raise ValueError(f"eta (trust coefficient) must be > 0, got {eta!r}.")
    if isinstance(exclude_from_adaptation, str):
      raise ValueError(
          "exclude_from_adaptation must be a sequence of strings, got the "
          f"string {exclude_from_adaptation!r}; wrap it in a list.")
    self.momentum = float(momentum)
    self.eta = float(eta)
    self.nesterov = bool(nesterov)
    self.exclude_from_adaptation = tuple(exclude_from_adaptation)

  def build(self, variables):
    """Creates momentum buffers and decides which variables are adapted.

    Args:
      variables: the trainable variables the optimiser will update.
    """
    if self.built:
      return
    super().build(variables)
    self._adapted = [
        not _is_norm_or_bias(v, self.exclude_from_adaptation)
        and self._use_weight_decay(v) for v in variables
    ]
    self.momentums = []
    if self.momentum != 0:
      self.momentums = self.add_optimizer_variables(variables, "momentum")

  def _apply_weight_decay(self, variables):
    # Weight decay is folded into the gradient in `update_step`; the base
    # class would otherwise apply decoupled decay on top of it.
    del variables

  def update_step(self, gradient, variable, learning_rate):
    """Updates one variable (and its momentum buffer) from its gradient."""
    if isinstance(gradient, tf.IndexedSlices):
      # The trust ratio needs the full gradient norm.
      gradient = tf.convert_to_tensor(gradient)
    index = self._get_variable_index(variable)
    lr = ops.cast(learning_rate, variable.dtype)
    grad = ops.cast(gradient, variable.dtype)

    if self._adapted[index]:
      w = ops.convert_to_tensor(variable)
      if self.weight_decay:
        grad = grad + ops.cast(self.weight_decay, variable.dtype) * w
      w_norm = ops.sqrt(ops.sum(ops.square(w)))
      g_norm = ops.sqrt(ops.sum(ops.square(grad)))
      ok = ops.logical_and(ops.greater(w_norm, 0), ops.greater(g_norm, 0))
      safe_g_norm = ops.where(ok, g_norm, ops.ones_like(g_norm))
      trust = ops.where(ok, self.eta * w_norm / safe_g_norm,
                        ops.ones_like(g_norm))
      lr = lr * ops.cast(trust, variable.dtype)

    step = lr * grad
    if not self.momentums:
      self.assign_sub(variable, step)
      return
    v = self.momentums[index]
    momentum = ops.cast(self.momentum, variable.dtype)
    self.assign(v, momentum * v + step)
    if self.nesterov:
      self.assign_sub(variable, momentum * v + step)
    else:
      self.assign_sub(variable, v)

  def get_config(self):
    config = super().get_config()
    config.update({
        "momentum": self.momentum,
        "eta": self.eta,
        "nesterov": self.nesterov,
        "exclude_from_adaptation": list(self.exclude_from_adaptation),
    })
    return config


@keras.saving.register_keras_serializable(package="supcon_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up then cosine decay (SimCLR / SupCon schedule).

  ```
  lr(s) = peak * s / warmup_steps                          s < warmup_steps
  lr(s) = end + (peak - end) * (1 + cos(pi * p)) / 2       otherwise
  p = min(1, (s - warmup_steps) / (total_steps - warmup_steps)),
  end = end_fraction * peak
  ```

  so the rate is `end` from `total_steps` on. `end_fraction=1` gives a
  constant rate after warm-up.

  Args:
    peak: learning rate reached at the end of warm-up, >= 0.
    warmup_steps: int >= 0; 0 starts at `peak`.
    total_steps: int >= warmup_steps; step at which the decay ends.
    end_fraction: final rate as a fraction of `peak`, in [0, 1].
    name: optional name.

  Example:

  ```python
  schedule = WarmupCosine(peak=0.5, warmup_steps=100, total_steps=1000)
  float(schedule(100))  # 0.5
  ```
  """

  def __init__(self,
               peak: float,
               warmup_steps: int,
               total_steps: int,
               end_fraction: float = 0.0,
               name: str | None = None):
    super().__init__()
    if peak < 0:
      raise ValueError(f"peak must be >= 0, got {peak!r}.")
    if warmup_steps < 0:
      raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}.")
    if total_steps < warmup_steps:
      raise ValueError(
          f"total_steps={total_steps!r} is below warmup_steps={warmup_steps!r};"
          " shorten the warm-up or lengthen the run.")
    if not 0.0 <= end_fraction <= 1.0:
      raise ValueError(
          f"end_fraction must be in [0, 1], got {end_fraction!r}.")
    self.peak = float(peak)
    self.warmup_steps = int(warmup_steps)
    self.total_steps = int(total_steps)
    self.end_fraction = float(end_fraction)
    self.name = name

  def __call__(self, step):
    """Learning rate at `step`.

    Args:
      step: scalar int or float (Python or tensor).

    Returns:
      scalar float32 tensor.
    """
    step = ops.cast(step, "float32")
    peak = self.peak
    end = self.end_fraction * peak
    warmup = float(self.warmup_steps)
    decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
    progress = ops.clip((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + ops.cos(math.pi * progress))
    if self.warmup_steps == 0:
      return cosine
    return ops.where(step < warmup, peak * step / warmup, cosine)

  def get_config(self):
    return {
        "peak": self.peak,
        "warmup_steps": self.warmup_steps,
        "total_steps": self.total_steps,
        "end_fraction": self.end_fraction,
        "name": self.name,
    }


def scaled_learning_rate(base_lr: float, global_batch_size: int) -> float:
  """Linear scaling rule: `base_lr * global_batch_size / 256`.

  Args:
    base_lr: rate for a global batch of 256.
    global_batch_size: samples per step over all replicas.

  Returns:
    The rate for `global_batch_size`.
  """
  if global_batch_size <= 0:
    raise ValueError(
        f"global_batch_size must be > 0, got {global_batch_size!r}.")
  return base_lr * global_batch_size / 256.0


def fit_warmup(warmup_steps: int, total_steps: int) -> int:
  """The warm-up a run of `total_steps` gets when `warmup_steps` are asked.

  A warm-up that fits in the run is kept. One longer than the run (e.g. the
  default 0.5 epochs on a `--steps=30` smoke run) would leave no decay, so it
  becomes `SHORT_RUN_WARMUP_FRACTION` of the run instead.

  Args:
    warmup_steps: requested warm-up steps, >= 0.
    total_steps: length of the run in steps, > 0.

  Returns:
    Warm-up steps in [0, total_steps].
  """
  if warmup_steps <= total_steps:
    return warmup_steps
  return int(round(SHORT_RUN_WARMUP_FRACTION * total_steps))


def exclude_norm_and_bias(optimizer: keras.optimizers.Optimizer,
                          variables: Iterable,
                          patterns: Sequence[str] = DEFAULT_EXCLUDE) -> None:
  """Keeps weight decay off biases and normalisation parameters.

  `build_optimizer` already excludes Keras's norm and bias variables by
  name; this also catches rank-1 variables whatever their name, and
  variables whose path contains one of `patterns`. Call it before the
  optimiser's first step (Keras refuses once the optimiser is built). It
  replaces any earlier `exclude_from_weight_decay` setting.

  Args:
    optimizer: an unbuilt Keras optimiser (any of `build_optimizer`'s).
    variables: the model's trainable variables.
    patterns: substrings of variable paths/names to exclude.
  """
  if optimizer.built:
    raise ValueError(
        f"Optimizer {optimizer.name!r} is already built; call "
        "exclude_norm_and_bias before its first step.")
  excluded = [v for v in variables if _is_norm_or_bias(v, patterns)]
  optimizer.exclude_from_weight_decay(
      var_list=excluded,
      var_names=[_NORM_AND_BIAS_NAME])


def build_optimizer(config: config_lib.OptimizerConfig, *,
                    global_batch_size: int, total_steps: int,
                    steps_per_epoch: int) -> keras.optimizers.Optimizer:
  """The optimiser and learning-rate schedule described by `config`.

  The peak rate is `config.learning_rate`, scaled by `global_batch_size / 256`
  when `config.scale_by_batch`. It is reached after `config.warmup_epochs`
  of linear warm-up (see `fit_warmup` for one longer than the run), then
  follows a cosine to 0 at `total_steps` (`schedule="cosine"`) or stays
  constant (`schedule="constant"`).

  Weight decay: `lars` folds L2 decay into the gradient (see `LARS`); `sgd`,
  `adamw` and `lamb` use Keras's decoupled decay (`w -= lr * wd * w` each
  step). None of them decays batch-norm scales and offsets or biases, as in
  SimCLR and the SupCon paper's LARS (the official PyTorch code decays
  everything): `LARS` skips every rank-1 variable and any whose path contains
  `batch_normalization`, `bias` or `bn`; `sgd`, `adamw` and `lamb` skip
  variables named `gamma`, `beta` or `bias` (the Keras 3 names of norm
  scales/offsets and biases, in any layer), and `exclude_norm_and_bias`
  extends that to every rank-1 variable (the training loop calls it).

  `momentum` / `nesterov` are the momentum of `sgd` and `lars`, and `beta_1`
  of `adamw` and `lamb`.

  Args:
    config: optimiser settings.
    global_batch_size: samples per step over all replicas.
    total_steps: length of the run in optimiser steps.
    steps_per_epoch: optimiser steps per epoch (converts warm-up epochs).

  Returns:
    An unbuilt `keras.optimizers.Optimizer`.
  """
  for arg, value in (("global_batch_size", global_batch_size),
                     ("total_steps", total_steps),
                     ("steps_per_epoch", steps_per_epoch)):
    if value is None or value <= 0:
      raise ValueError(f"{arg} must be > 0, got {value!r}.")
  peak = (scaled_learning_rate(config.learning_rate, global_batch_size)
          if config.scale_by_batch else float(config.learning_rate))
  requested = int(round(config.warmup_epochs * steps_per_epoch))
  warmup_steps = fit_warmup(requested, total_steps)
  if warmup_steps != requested:
    logging.warning(
        "warmup_epochs=%s is %d steps, more than the run's %d: warming up "
        "for %d steps instead.", config.warmup_epochs, requested,
        total_steps, warmup_steps)

  if config.schedule == "cosine":
    learning_rate = WarmupCosine(peak, warmup_steps, total_steps)
  elif warmup_steps > 0:
    learning_rate = WarmupCosine(
        peak, warmup_steps, total_steps, end_fraction=1.0)
  else:
    learning_rate = peak

  weight_decay = config.weight_decay or None
  momentum = float(config.momentum)
  if config.name == "lars":
    return LARS(
        learning_rate,
        momentum=momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov)
  if config.name == "sgd":
    optimizer = keras.optimizers.SGD(
        learning_rate,
        momentum=momentum,
        nesterov=config.nesterov,
        weight_decay=weight_decay)
  elif config.name == "adamw":
    optimizer = keras.optimizers.AdamW(
        learning_rate, beta_1=momentum, weight_decay=config.weight_decay)
  elif config.name == "lamb":
    optimizer = keras.optimizers.Lamb(
        learning_rate, beta_1=momentum, weight_decay=weight_decay)
  else:
    raise ValueError(f"Unknown optimizer {config.name!r}; use one of "
                     f"{list(config_lib.OPTIMIZERS)}.")
  if weight_decay:
    optimizer.exclude_from_weight_decay(
        var_names=[_NORM_AND_BIAS_NAME])
  return optimizer
