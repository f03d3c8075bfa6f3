r"""The `supcon-tf` command line: the only module that reads flags.

  supcon-tf --workdir=runs/first                 # pretrain, evaluate, export
  supcon-tf --flagfile=experiments/cifar10_supcon_cpu30.cfg --workdir=runs/x
  supcon-tf --mode=evaluate --workdir=runs/first # redo the report and plots

Modes: `pretrain`, `linear_eval`, `export`, `evaluate`, `train_ce`
(cross-entropy baseline: `all` with --method=ce) and `all` (pretrain ->
linear evaluation -> export -> report). Every stage resumes from what the
work dir already holds. The defaults are the 30-minute CPU budget
configuration, experiments/cifar10_supcon_cpu30.cfg.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging

from supcon_tf import config as config_lib

MODES = ("all", "pretrain", "linear_eval", "export", "evaluate", "train_ce")

flags.DEFINE_enum("mode", "all", MODES, "What to run.")
flags.DEFINE_string("workdir", None, "Directory of the run (resumed if it "
                    "holds one).")
flags.DEFINE_string("dataset", "cifar10", "TFDS name or folder:<path>.")
flags.DEFINE_string("data_dir", None, "TFDS data dir with the prepared "
                    "dataset (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_enum("method", "supcon", config_lib.METHODS, "Training method.")
flags.DEFINE_string("encoder", "resnet18", "resnet18/34/50/101/152/200.")
flags.DEFINE_enum("stem", "cifar", ["cifar", "imagenet"], "ResNet stem.")
flags.DEFINE_float("width", 0.25, "ResNet width multiplier.")
flags.DEFINE_enum("head", "mlp", ["mlp", "linear"], "Projection head.")
flags.DEFINE_integer("projection_dim", 128, "Projection output width.")
flags.DEFINE_integer("image_size", 32, "Encoder input size.")
flags.DEFINE_integer("num_views", 2, "Views per image.")
flags.DEFINE_enum("augmentation", "simclr", config_lib.AUGMENTATIONS,
                  "View augmentation policy.")
flags.DEFINE_bool("blur", False, "Gaussian blur in the SimCLR policy.")
flags.DEFINE_enum("crop_sampling", "simclr", config_lib.CROP_SAMPLINGS,
                  "Random-resized-crop box: simclr (SimCLR's TF code, crop "
                  "height uniform) or torchvision (area uniform).")
flags.DEFINE_enum("eval_crop", "auto", config_lib.EVAL_CROPS,
                  "Evaluation/serving images: center (short side to "
                  "size/0.875, centre crop), resize (whole image) or auto "
                  f"(center from --image_size="
                  f"{config_lib.CENTER_CROP_MIN_SIZE} up).")
flags.DEFINE_bool("skip_corrupt", False, "In folder datasets, skip (and "
                  "count) undecodable image files instead of failing.")
flags.DEFINE_float("validation_fraction", 0.1, "Share of the training split "
                   "held out for linear-evaluation choices.")
flags.DEFINE_integer("batch_size", 256, "Global batch size (samples).")
flags.DEFINE_float("epochs", 8, "Pretraining epochs.")
flags.DEFINE_integer("steps", None, "Pretraining steps (overrides --epochs).")
flags.DEFINE_float("temperature", 0.1, "Loss temperature.")
flags.DEFINE_enum("contrast_mode", "all", config_lib.CONTRAST_MODES, "Anchors.")
flags.DEFINE_enum("summation", "out", config_lib.SUMMATIONS, "L_out or L_in.")
flags.DEFINE_enum("denominator", "all", config_lib.DENOMINATORS,
                  "Loss denominator.")
flags.DEFINE_integer("positives_cap", None, "Cap on positive views per anchor.")
flags.DEFINE_integer("queue_size", 0, "Memory queue of past keys (rows, one "
                     "per view) added to the contrast set; 0 = off.")
flags.DEFINE_float("key_encoder_momentum", 0.0, "0: queue keys from the "
                   "online encoder (XBM); in (0, 1): from its EMA (MoCo).")
flags.DEFINE_enum("optimizer", "adamw", config_lib.OPTIMIZERS, "Optimizer.")
flags.DEFINE_float("learning_rate", 0.01, "Base learning rate for batch 256 "
                   "(scaled by batch/256).")
flags.DEFINE_bool("lr_scaling", True, "Scale --learning_rate by "
                  "batch_size/256; --nolr_scaling uses it as given.")
flags.DEFINE_enum("lr_schedule", "cosine", ["cosine", "constant"],
                  "Learning-rate schedule after warm-up.")
flags.DEFINE_float("momentum", 0.9, "Momentum.")
flags.DEFINE_float("weight_decay", 1e-4, "Weight decay.")
flags.DEFINE_float("warmup_epochs", 0.5, "Linear warm-up epochs.")
flags.DEFINE_enum("strategy", "default", config_lib.STRATEGIES,
                  "tf.distribute strategy.")
flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into this many logical "
                     "devices (e.g. to run --strategy=mirrored on a CPU).")
flags.DEFINE_enum("mixed_precision", "mixed_bfloat16", config_lib.PRECISIONS,
                  "Compute dtype policy (bfloat16 measured 1.4x faster than "
                  "float32 on an AVX512-BF16 CPU; see experiments/).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the training step.")
flags.DEFINE_bool("deterministic", False, "Enable op determinism.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("steps_per_loop", 25, "Steps per tf.function call.")
flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints.")
flags.DEFINE_integer("linear_epochs", 10, "Linear-evaluation epochs.")
flags.DEFINE_list("linear_learning_rates", ["0.3", "1.0", "3.0"],
                  "Linear-evaluation learning rates, chosen on the "
                  "validation split.")
flags.DEFINE_integer("linear_batch_size", 256, "Linear-evaluation batch.")
flags.DEFINE_bool("linear_augment", False, "Augment in linear evaluation.")
flags.DEFINE_bool("robustness", True, "Measure corruption robustness in the "
                  "report.")

FLAGS = flags.FLAGS


class UsageError(ValueError):
  """A problem with the command line itself."""


def train_config() -> config_lib.TrainConfig:
  """The pretraining configuration the flags describe."""
  method = "ce" if FLAGS.mode == "train_ce" else FLAGS.method
  return config_lib.TrainConfig(
      method=method, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs,
      steps=FLAGS.steps, steps_per_loop=FLAGS.steps_per_loop,
      checkpoint_every=FLAGS.checkpoint_every,
      jit_compile=FLAGS.jit_compile, precision=FLAGS.mixed_precision,
      seed=FLAGS.seed, deterministic=FLAGS.deterministic,
      queue_size=FLAGS.queue_size,
      key_encoder_momentum=FLAGS.key_encoder_momentum,
      loss=config_lib.LossConfig(
          temperature=FLAGS.temperature, contrast_mode=FLAGS.contrast_mode,
          summation=FLAGS.summation, denominator=FLAGS.denominator,
          positives_cap=FLAGS.positives_cap),
      data=data_config(),
      model=config_lib.ModelConfig(
          encoder=FLAGS.encoder, stem=FLAGS.stem, width=FLAGS.width,
          head=FLAGS.head, projection_dim=FLAGS.projection_dim),
      optimizer=config_lib.OptimizerConfig(
          name=FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
          momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay,
          warmup_epochs=FLAGS.warmup_epochs, schedule=FLAGS.lr_schedule,
          scale_by_batch=FLAGS.lr_scaling))


def data_config() -> config_lib.DataConfig:
  return config_lib.DataConfig(
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
      image_size=FLAGS.image_size, num_views=FLAGS.num_views,
      augmentation=FLAGS.augmentation, blur=FLAGS.blur,
      crop_sampling=FLAGS.crop_sampling, eval_crop=FLAGS.eval_crop,
      validation_fraction=FLAGS.validation_fraction,
      skip_corrupt=FLAGS.skip_corrupt)


def linear_config() -> config_lib.LinearEvalConfig:
  try:
    rates = tuple(float(r) for r in FLAGS.linear_learning_rates)
  except ValueError:
    raise UsageError("--linear_learning_rates must be numbers, got "
                     f"{FLAGS.linear_learning_rates}.") from None
  return config_lib.LinearEvalConfig(
      epochs=FLAGS.linear_epochs, batch_size=FLAGS.linear_batch_size,
      learning_rate=rates[0], learning_rates=rates,
      augment=FLAGS.linear_augment, seed=FLAGS.seed)


def _split_cpu(devices: int) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if devices > 1:
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * devices)


def run_pipeline(mode: str, workdir: str) -> dict:
  """Runs the stages of `mode` in `workdir`; returns the report."""
  # Heavy imports after flag parsing, so --help and flag errors are instant.
  from supcon_tf import distributed  # pylint: disable=g-import-not-at-top
  from supcon_tf import rundir

  report_path = rundir.report_path(workdir)
  report = {}
  if os.path.exists(report_path):
    with open(report_path) as f:
      report = json.load(f)
  strategy = distributed.make_strategy(FLAGS.strategy)
  chief = distributed.is_chief(strategy)
  report = _run_stages(mode, workdir, report, strategy, chief)
  # Workers that are done wait for the chief's stages before leaving (not
  # after a failure: a worker still inside a training collective would wait
  # for this one forever; leaving lets the cluster report the error).
  distributed.wait_for_workers(strategy)
  return _write_report(report_path, report, chief)


def _run_stages(mode, workdir, report, strategy, chief):
  """The stages of `mode`; returns the updated report."""
  from supcon_tf import data  # pylint: disable=g-import-not-at-top
  from supcon_tf import distributed
  from supcon_tf import evaluation
  from supcon_tf import export
  from supcon_tf import linear_eval
  from supcon_tf import rundir
  from supcon_tf import train_lib

  pretrain_dir = rundir.pretrain_dir(workdir)
  if mode in ("all", "train_ce", "pretrain"):
    config = train_config()
    start = time.time()
    result = train_lib.pretrain(config, pretrain_dir, strategy)
    # A rerun of a finished pretraining trains nothing: keep its report.
    if report.get("pretrain", {}).get("steps") != result.step:
      report["pretrain"] = {"method": config.method, "steps": result.step,
                            "final_loss": result.loss,
                            "images_per_second": result.images_per_second,
                            "seconds_this_run": round(time.time() - start, 1)}
  if mode == "pretrain" or not chief:
    return report
  if distributed.is_multi_worker(strategy):
    # The later stages run on the chief alone, on one device: linear
    # evaluation on cached features costs a small fraction of pretraining,
    # and alone the chief needs no collectives with workers that are idle.
    strategy = distributed.make_strategy("default")
  config = rundir.load_config(pretrain_dir)
  encoder = train_lib.restore_encoder(pretrain_dir, config)
  info = data.dataset_info(config.data)
  if mode in ("all", "train_ce", "linear_eval"):
    start = time.time()
    classifier, result = linear_eval.linear_eval(
        encoder, config.data, linear_config(), strategy=strategy,
        workdir=rundir.linear_eval_dir(workdir))
    report["linear_eval"] = {**result.to_dict(),
                             "seconds_this_run": round(time.time() - start, 1)}
    classifier.save(rundir.classifier_path(workdir))
  if mode in ("all", "train_ce", "export"):
    classifier = _load_classifier(workdir)
    path = export.export_classifier(
        classifier, rundir.export_dir(workdir),
        image_size=config.data.image_size, encoder=encoder,
        class_names=info.class_names,
        eval_crop=config.data.resolved_eval_crop)
    report["export"] = path
  if mode in ("all", "train_ce", "evaluate"):
    report["evaluation"] = evaluation.evaluate_workdir(
        workdir, encoder=encoder, classifier=_load_classifier(workdir),
        data_config=config.data, robustness=FLAGS.robustness)
  return report


def _load_classifier(workdir):
  import keras  # pylint: disable=g-import-not-at-top
  from supcon_tf import rundir  # pylint: disable=g-import-not-at-top
  path = rundir.classifier_path(workdir)
  if not os.path.exists(path):
    raise UsageError(f"{path} does not exist: run --mode=linear_eval first.")
  return keras.saving.load_model(path)


def _write_report(path, report, chief):
  if chief:
    from supcon_tf import rundir  # pylint: disable=g-import-not-at-top
    rundir.atomic_write(path, json.dumps(report, indent=2, sort_keys=True))
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/first")
  _split_cpu(FLAGS.cpu_devices)
  workdir = os.path.abspath(FLAGS.workdir)
  try:
    config = train_config()  # Validates every training flag up front.
    linear_config()
    os.makedirs(workdir, exist_ok=True)
  except (ValueError, OSError) as e:
    _fail(e)
  logging.get_absl_handler().use_absl_log_file("supcon_tf", workdir)
  logging.info("Configuration: %s", config_lib.to_json(config))
  try:
    report = run_pipeline(FLAGS.mode, workdir)
  except KeyboardInterrupt:
    _fail("interrupted; run the same command again to resume.")
  except Exception as e:  # pylint: disable=broad-except
    # Errors the user can fix are ValueError / TrainingError: one line.
    from supcon_tf import train_lib  # pylint: disable=g-import-not-at-top
    if isinstance(e, (ValueError, OSError, train_lib.TrainingError)):
      logging.exception("Failed.")
      _fail(e)
    raise
  print(json.dumps(report, indent=2, sort_keys=True))


def _fail(error) -> None:
  print(f"supcon-tf: error: {_as_flags(str(error))}", file=sys.stderr)
  sys.exit(1)


def _as_flags(message: str) -> str:
  """Names `DataConfig` fields in library errors by their flags.

  Only `DataConfig`: its fields and their flags share names, while e.g.
  `LinearEvalConfig.batch_size` is `--linear_batch_size`.
  """
  return re.sub(
      r"\bDataConfig\.(\w+)",
      lambda m: f"--{m.group(1)}" if m.group(1) in FLAGS else m.group(0),
      message)


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
