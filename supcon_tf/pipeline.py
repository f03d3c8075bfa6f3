"""The stages of a run: pretrain -> linear eval -> export -> report.

The command line, the tests and a notebook call the same function:

```python
from supcon_tf import config, pipeline
report = pipeline.run("all", "runs/first", train=config.TrainConfig(...),
                      linear=config.LinearEvalConfig(),
                      evaluation_config=config.EvalConfig())
```

Every stage resumes from what the work dir holds (`supcon_tf.rundir` names
its files), and `report.json` collects what each stage measured.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import keras
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import data
from supcon_tf import distributed
from supcon_tf import embeddings
from supcon_tf import evaluation
from supcon_tf import export
from supcon_tf import linear_eval
from supcon_tf import pretrained
from supcon_tf import rundir
from supcon_tf import summaries
from supcon_tf import train_lib

# Stages each mode runs after (optional) pretraining.
_LATER_STAGES = {
    "all": ("linear_eval", "export", "evaluate"),
    "train_ce": ("linear_eval", "export", "evaluate"),
    "pretrain": (),
    "linear_eval": ("linear_eval",),
    "export": ("export",),
    "evaluate": ("evaluate",),
    "embed": ("embed",),
}


def check_prerequisites(mode: str, workdir: str) -> None:
  """Refuses a stage whose inputs `workdir` lacks, naming the mode making them.

  Creates nothing, so a refused run leaves the work dir (or its absence) as
  it was.

  Raises:
    ValueError: an unknown mode; `linear_eval`, `export`, `evaluate` or
      `embed` without a pretraining configuration and checkpoint; `export` or
      `evaluate` without the linear classifier.
  """
  if mode not in config_lib.MODES:
    raise ValueError(f"mode={mode!r} is not one of {list(config_lib.MODES)}.")
  if mode not in ("linear_eval", "export", "evaluate", "embed"):
    return
  pretrain_dir = rundir.pretrain_dir(workdir)
  checkpoints = rundir.checkpoints_dir(pretrain_dir)
  try:
    state = tf.train.get_checkpoint_state(checkpoints)
  except (ValueError, tf.errors.OpError):
    state = None  # An unreadable index: as good as none.
  listed = [] if state is None else state.all_model_checkpoint_paths
  if not any(os.path.exists(rundir.checkpoint_index_path(os.path.join(
      checkpoints, os.path.basename(p)))) for p in listed):
    raise ValueError(f"no pretraining checkpoint in {checkpoints}: run "
                     "--mode=pretrain (or all) first.")
  config_path = rundir.config_path(pretrain_dir)
  if not os.path.exists(config_path):
    raise ValueError(f"no pretraining configuration {config_path} beside "
                     "the checkpoints: run --mode=pretrain (or all) first.")
  classifier = rundir.classifier_path(workdir)
  if mode in ("export", "evaluate") and not os.path.exists(classifier):
    raise ValueError(f"no linear classifier {classifier}: run "
                     "--mode=linear_eval (or all) first.")


def run(mode: str, workdir: str, *, train: config_lib.TrainConfig,
        linear: config_lib.LinearEvalConfig,
        evaluation_config: Optional[config_lib.EvalConfig] = None,
        strategy: Optional[tf.distribute.Strategy] = None,
        verbose: bool = True,
        embed_config: Optional[embeddings.EmbedConfig] = None) -> dict:
  """Runs (or resumes) the stages of `mode` in `workdir`.

  Args:
    mode: one of `config.MODES`: `all` (pretrain, linear evaluation,
      export, report), `train_ce` (the same; `train.method` should be
      `ce`), `pretrain`, `linear_eval`, `export`, `evaluate` or `embed`
      (a split's embeddings and projector files; needs only pretraining).
    workdir: the run directory (created).
    train: the pretraining configuration (used by pretraining; the later
      stages read the one stored in the work dir).
    linear: the linear evaluation.
    evaluation_config: the report stage (default `EvalConfig()`).
    strategy: pretraining strategy (default: the current one). Under a
      multi-worker strategy every worker pretrains; the later stages run on
      the chief alone, on one device, while the others wait for it.
    verbose: one console line per stage and progress bars.
    embed_config: what `embed` embeds (default `EmbedConfig()`).

  Returns:
    The report, also written to `report.json` (by the chief).
  """
  check_prerequisites(mode, workdir)
  strategy = strategy or tf.distribute.get_strategy()
  chief = distributed.is_chief(strategy)
  report_path = rundir.report_path(workdir)
  report = {}
  if os.path.exists(report_path):
    with open(report_path) as f:
      report = json.load(f)

  def save_report():
    # After every stage: a later stage's crash keeps what earlier ones made.
    if chief:
      rundir.atomic_write(report_path,
                          json.dumps(report, indent=2, sort_keys=True))

  if mode in ("all", "train_ce", "pretrain"):
    start = time.time()
    result = train_lib.pretrain(train, rundir.pretrain_dir(workdir), strategy,
                                verbose=verbose)
    # A rerun of a finished pretraining trains nothing: keep its report.
    if report.get("pretrain", {}).get("steps") != result.step:
      report["pretrain"] = {"method": train.method, "steps": result.step,
                            "final_loss": result.loss,
                            "images_per_second": result.images_per_second,
                            "seconds_this_run": round(time.time() - start, 1)}
      if result.extended_from is not None:
        report["pretrain"]["extended_from_steps"] = result.extended_from
      save_report()
  if chief and _LATER_STAGES[mode]:
    # Linear evaluation on cached features costs a small fraction of
    # pretraining, and alone the chief needs no collectives with workers
    # that are idle: across workers it runs on one device.
    local = (tf.distribute.get_strategy()
             if distributed.is_multi_worker(strategy) else strategy)
    _later_stages(_LATER_STAGES[mode], workdir, report, linear,
                  evaluation_config or config_lib.EvalConfig(), local,
                  verbose, embed_config or embeddings.EmbedConfig(),
                  save_report)
  # Workers that are done wait for the chief's stages before leaving (not
  # after a failure: a worker still inside a training collective would wait
  # for this one forever; leaving lets the cluster report the error).
  distributed.wait_for_workers(strategy)
  save_report()
  if chief:
    summaries.write_hparams(workdir, report)  # TensorBoard's HParams.
  return report


def _later_stages(stages, workdir, report, linear, evaluation_config,
                  strategy, verbose, embed_config, save_report):
  """Linear evaluation, export, report, embeddings of the pretraining run.

  Fills `report` and calls `save_report()` after each stage.
  """
  pretrain_dir = rundir.pretrain_dir(workdir)
  config = rundir.load_config(pretrain_dir)
  encoder = pretrained.restore_encoder(pretrain_dir, config)

  def say(line):
    if verbose:
      print(line, flush=True)

  if "linear_eval" in stages:
    rates = len(linear.learning_rates or (linear.learning_rate,))
    say(f"linear evaluation: {rates} learning rate{'s' if rates > 1 else ''}"
        f" x {linear.epochs} epoch{'s' if linear.epochs > 1 else ''} (batch "
        f"{linear.batch_size})")
    start = time.time()
    classifier, result = linear_eval.linear_eval(
        encoder, config.data, linear, strategy=strategy,
        workdir=rundir.linear_eval_dir(workdir), verbose=verbose)
    report["linear_eval"] = {**result.to_dict(),
                             "seconds_this_run": round(time.time() - start, 1)}
    save_classifier(classifier, workdir)
    if config.method == "ce":
      # The probe on the frozen CE encoder is the comparable number; the
      # head CE trained with it is what a CE user would deploy.
      report["ce_head"] = _ce_head_accuracy(pretrain_dir, config)
    save_report()
  if "export" in stages or "evaluate" in stages:
    classifier = load_classifier(workdir)  # As saved: what is served.
  if "export" in stages:
    path = export.export_classifier(
        classifier, rundir.export_dir(workdir),
        image_size=config.data.image_size, encoder=encoder,
        class_names=data.dataset_info(config.data).class_names,
        eval_crop=config.data.resolved_eval_crop)
    report["export"] = path
    save_report()
    say(f"exported to {path}")
  if "evaluate" in stages:
    say("evaluation: k-NN accuracy, retrieval, "
        f"{'corruption robustness, ' if evaluation_config.robustness else ''}"
        "plots")
    report["evaluation"] = evaluation.evaluate_workdir(
        workdir, encoder=encoder, classifier=classifier,
        data_config=config.data, config=evaluation_config,
        projection=None if config.method == "ce" else
        pretrained.restore_projection(pretrain_dir, config))
    save_report()
    projector = os.path.join(workdir, report["evaluation"]["projector"]["dir"])
    say(f"projector: {report['evaluation']['projector']['examples']:,} test "
        f"embeddings in {projector} (tensorboard --logdir {projector})")
  if "embed" in stages:
    # A CE run has no projection head: embed_workdir says so.
    wants_head = embed_config.space == "projection" and config.method != "ce"
    report["embed"] = done = embeddings.embed_workdir(
        workdir, encoder=encoder, data_config=config.data,
        config=embed_config, projection=(
            pretrained.restore_projection(pretrain_dir, config)
            if wants_head else None))
    save_report()
    say(f"embeddings: {done['examples']:,} {done['split']} images, "
        f"{done['dim']}-d {done['space']} space, in {done['dir']}; "
        f"projector: tensorboard --logdir {done['projector']}")


def _ce_head_accuracy(pretrain_dir, config) -> dict:
  """Top-1 of a cross-entropy run's own head on validation and test."""
  model = pretrained.restore_ce_model(
      pretrain_dir, config, data.dataset_info(config.data).num_classes)
  accuracy = {}
  for split in ("validation", "test"):
    dataset = data.eval_dataset(config.data, split, batch_size=500)
    if dataset is not None:
      accuracy[f"{split}_top1"] = evaluation.top1_accuracy(model, dataset)
  return accuracy


def save_classifier(classifier: keras.Model, workdir: str) -> None:
  """Writes `classifier.keras` whole or not at all.

  Raises:
    TrainingError: the write failed (e.g. no space left on the device);
      an earlier classifier file stays as it was.
  """
  path = rundir.classifier_path(workdir)
  try:
    rundir.atomic_save(classifier.save, path)
  except (OSError, tf.errors.OpError) as e:
    raise rundir.TrainingError(
        f"Cannot write the linear classifier {path} "
        f"({rundir.first_line(e)}); nothing was written there. Free space on "
        "the device (or fix it) and run the same command again.") from None


def load_classifier(workdir: str) -> keras.Model:
  """The linear classifier a finished linear evaluation saved in `workdir`."""
  path = rundir.classifier_path(workdir)
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist: run --mode=linear_eval first.")
  # Inference only: the optimizer state saved with it is not needed (and
  # Keras warns when a default optimizer's variables do not match it).
  return keras.saving.load_model(path, compile=False)
