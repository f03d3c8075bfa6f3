"""The loop of a pretraining run: steps, progress, summaries, checkpoints.

`train_lib.pretrain` builds the run (models, data, restored state) and hands
it to `train_until`, which steps it in loops of `steps_per_loop` steps.
"""

from __future__ import annotations

import math
import time

import keras
import tensorflow as tf

from supcon_tf import rundir


def train_until(trainer, saver, iterator, workdir, step, end, *, verbose):
  """Trains from `step` to `end` in loops of `steps_per_loop` steps.

  Writes every loop's metrics as TensorBoard summaries and to the progress
  bar, and checkpoints every `checkpoint_every` steps and at `end`.

  Args:
    trainer: the run's `train_lib.Trainer`.
    saver: its `checkpoints.CheckpointSaver`.
    iterator: the distributed iterator of the run's batches, at `step`.
    workdir: directory of the run (summaries go to its `train/`).
    step: the step the models are at.
    end: the step to stop at.
    verbose: show a progress bar.

  Returns:
    `(step, loss, images_per_second)`: the last loop's step and loss (NaN
    when there was nothing left to train) and the rate of
    `train_lib.TrainResult`.
  """
  config = trainer.config
  writer = (tf.summary.create_file_writer(rundir.run_events_dir(workdir))
            if saver.chief else tf.summary.create_noop_writer())
  progress = keras.utils.Progbar(trainer.total_steps, verbose=int(verbose),
                                 stateful_metrics=["loss", "lr", "img/s"],
                                 unit_name="step")
  progress.update(step)
  loop = max(1, config.steps_per_loop)
  every = max(loop, config.checkpoint_every)
  first, last_saved, metrics = step, step, {"loss": float("nan")}
  rate = 0.0
  # The run's rate leaves out the first loop, which traces the step.
  steady_samples, steady_seconds = 0, 0.0
  while step < end:
    steps = min(loop, end - step)
    start = time.perf_counter()
    metrics = {k: float(v) for k, v in
               trainer.train_loop(iterator, tf.constant(steps)).items()}
    elapsed = time.perf_counter() - start
    check_finite(trainer, metrics, step, steps, last_saved)
    samples = steps * config.batch_size
    rate = samples / elapsed
    if step > first:
      steady_samples += samples
      steady_seconds += elapsed
    step += steps
    learning_rate = trainer.learning_rate()
    with writer.as_default(step=step):
      for name, value in dict(metrics, learning_rate=learning_rate,
                              images_per_second=rate).items():
        tf.summary.scalar(name, value)
    progress.update(step, [("loss", metrics["loss"]),
                           ("lr", learning_rate), ("img/s", rate)])
    if step - last_saved >= every or step >= end:
      saver.save(step)
      last_saved = step
  writer.flush()
  if verbose and step < trainer.total_steps:
    print(flush=True)  # Ends the progress bar, which ends itself at 100 %.
  if steady_seconds:
    rate = steady_samples / steady_seconds
  return step, metrics["loss"], rate


def check_finite(trainer, metrics, step, steps, last_saved) -> None:
  """TrainingError when a loop's metrics or the weights after it are not finite.

  The metrics come from the weights before each update: an update can
  still leave inf/NaN weights (or BN statistics) behind a finite loss.
  """
  finite_metrics = all(math.isfinite(v) for v in metrics.values())
  if finite_metrics and bool(trainer.weights_are_finite()):
    return
  where = (f"step {step + 1}" if steps == 1 else
           f"steps {step + 1}..{step + steps}")
  what = (f"training metrics {metrics}" if not finite_metrics else
          f"weights (metrics {metrics})")
  raise rundir.TrainingError(
      f"Non-finite {what} at {where}; nothing was saved after step "
      f"{last_saved}. Lower the learning rate or check the inputs.")
