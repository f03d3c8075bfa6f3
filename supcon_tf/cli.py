r"""The `supcon-tf` command line: the only module that reads flags.

  supcon-tf --workdir=runs/first                 # pretrain, evaluate, export
  supcon-tf --flagfile=experiments/cifar10_supcon_cpu30.cfg --workdir=runs/x
  supcon-tf --mode=evaluate --workdir=runs/first # redo the report and plots

Modes: `pretrain`, `linear_eval`, `export`, `evaluate`, `train_ce`
(cross-entropy baseline: `all` with --method=ce), `all` (pretrain ->
linear evaluation -> export -> report) and `embed` (the --embed_split
embeddings and TensorBoard projector files). Every stage resumes from what the
work dir already holds. The defaults are the 30-minute CPU budget
configuration, experiments/cifar10_supcon_cpu30.cfg.

This module defines the flags, builds the configuration objects from them,
calls `supcon_tf.pipeline.run` and prints; the stages live in the pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging

from supcon_tf import cli_help
from supcon_tf import config as config_lib
from supcon_tf import overrides
from supcon_tf import report_table
from supcon_tf import tf_startup

MODES = config_lib.MODES
# Flag defaults: the CPU-budget recipe, defined once in config.
_TRAIN = config_lib.BUDGET_TRAIN
_LINEAR = config_lib.BUDGET_LINEAR

flags.DEFINE_enum("mode", "all", MODES, "What to run.")
flags.DEFINE_string("workdir", None, "Directory of the run (resumed if it "
                    "holds one).")
flags.DEFINE_string(
    "embed_split", "test", "Split to embed: train, validation or test. "
    "--mode=embed takes it from the run's dataset, or from --dataset (e.g. "
    "folder:<path>) when given.")
flags.DEFINE_string("dataset", _TRAIN.data.dataset,
                    "TFDS name or folder:<path>.")
flags.DEFINE_string(
    "data_dir", _TRAIN.data.data_dir, "TFDS data dir of the prepared "
    "dataset. Unset: $TFDS_DATA_DIR, else ~/tensorflow_datasets.")
flags.DEFINE_enum("method", _TRAIN.method, config_lib.METHODS,
                  "Training method.")
flags.DEFINE_string(
    "encoder", _TRAIN.model.encoder,
    "resnet18/34/50/101/152/200, keras_applications:<Name> or "
    "keras_hub:<preset>. <Name> is any keras.applications model, e.g. "
    "MobileNetV3Small or ResNet50; <preset> a keras-hub preset or local "
    "preset directory (needs pip install keras-hub). Backbones start from "
    "random weights unless --encoder_weights; --stem and --width apply to "
    "the ResNets only.")
flags.DEFINE_string(
    "encoder_weights", _TRAIN.model.encoder_weights,
    "Local file of initial encoder weights. A .weights.h5 file of the "
    "backbone (e.g. keras.applications.ResNet50(include_top=False, "
    "weights='imagenet').save_weights('r50.weights.h5')) or, for "
    "keras_hub, a local preset directory.")
flags.DEFINE_enum("stem", _TRAIN.model.stem, config_lib.STEMS, "ResNet stem.")
flags.DEFINE_float("width", _TRAIN.model.width, "ResNet width multiplier.")
flags.DEFINE_enum("head", _TRAIN.model.head, config_lib.HEADS,
                  "Projection head. mlp_bn: batch norm before its ReLU.")
flags.DEFINE_integer("projection_dim", _TRAIN.model.projection_dim,
                     "Projection output width.")
flags.DEFINE_integer("image_size", _TRAIN.data.image_size,
                     "Encoder input size.")
flags.DEFINE_integer("num_views", _TRAIN.data.num_views, "Views per image.")
flags.DEFINE_enum("augmentation", _TRAIN.data.augmentation,
                  config_lib.AUGMENTATIONS, "Augmentation of the views.")
flags.DEFINE_bool("blur", _TRAIN.data.blur,
                  "Gaussian blur in the SimCLR policy.")
flags.DEFINE_enum(
    "crop_sampling", _TRAIN.data.crop_sampling, config_lib.CROP_SAMPLINGS,
    "Random-resized-crop sampling. simclr: SimCLR's TF code (crop "
    "height uniform); torchvision: area uniform.")
flags.DEFINE_enum(
    "eval_crop", _TRAIN.data.eval_crop, config_lib.EVAL_CROPS,
    "Evaluation and serving crop. center: short side to "
    "size/0.875, centre crop; resize: whole image; auto: center from "
    f"--image_size={config_lib.CENTER_CROP_MIN_SIZE} up.")
flags.DEFINE_bool(
    "skip_corrupt", _TRAIN.data.skip_corrupt, "Skip undecodable images of "
    "folder datasets. They are counted; without it one fails the run.")
flags.DEFINE_float(
    "validation_fraction", _TRAIN.data.validation_fraction,
    "Share of the training split held out. Linear evaluation chooses its "
    "learning rate and epoch on it.")
flags.DEFINE_integer(
    "train_examples", _TRAIN.data.train_examples,
    "Use only the first N training examples. Counted after the "
    "validation hold-out; e.g. for a smoke test or a laptop.")
flags.DEFINE_integer("batch_size", _TRAIN.batch_size,
                     "Global batch size (samples).")
flags.DEFINE_float("epochs", _TRAIN.epochs, "Pretraining epochs.")
flags.DEFINE_integer("steps", _TRAIN.steps,
                     "Pretraining steps (overrides --epochs).")
flags.DEFINE_float("temperature", _TRAIN.loss.temperature, "Loss temperature.")
flags.DEFINE_enum("contrast_mode", _TRAIN.loss.contrast_mode,
                  config_lib.CONTRAST_MODES, "Anchors.")
flags.DEFINE_enum("summation", _TRAIN.loss.summation, config_lib.SUMMATIONS,
                  "L_out or L_in.")
flags.DEFINE_enum("denominator", _TRAIN.loss.denominator,
                  config_lib.DENOMINATORS, "Loss denominator.")
flags.DEFINE_integer("positives_cap", _TRAIN.loss.positives_cap,
                     "Cap on positive views per anchor.")
flags.DEFINE_integer(
    "queue_size", _TRAIN.queue_size, "Memory queue of past keys; 0 = off. "
    "Rows, one per view, added to the contrast set.")
flags.DEFINE_float(
    "key_encoder_momentum", _TRAIN.key_encoder_momentum,
    "EMA momentum of the key encoder. 0: queue keys from the "
    "online encoder (XBM); in (0, 1): from its EMA (MoCo).")
flags.DEFINE_enum("optimizer", _TRAIN.optimizer.name, config_lib.OPTIMIZERS,
                  "Optimizer.")
flags.DEFINE_float("learning_rate", _TRAIN.optimizer.learning_rate,
                   "Base learning rate for batch 256. Scaled by "
                   "batch_size/256 unless --nolr_scaling.")
flags.DEFINE_bool(
    "lr_scaling", _TRAIN.optimizer.scale_by_batch, "Scale --learning_rate by "
    "batch_size/256. --nolr_scaling uses it as given.")
flags.DEFINE_enum("lr_schedule", _TRAIN.optimizer.schedule,
                  config_lib.LR_SCHEDULES,
                  "Schedule after the warm-up.")
flags.DEFINE_float("momentum", _TRAIN.optimizer.momentum, "Momentum.")
flags.DEFINE_float("weight_decay", _TRAIN.optimizer.weight_decay,
                   "Weight decay.")
flags.DEFINE_float("warmup_epochs", _TRAIN.optimizer.warmup_epochs,
                   "Linear warm-up epochs.")
flags.DEFINE_enum("strategy", "default", config_lib.STRATEGIES,
                  "tf.distribute strategy.")
flags.DEFINE_integer(
    "cpu_devices", 0, "Split the CPU into this many logical "
    "devices. E.g. to run --strategy=mirrored on a CPU.")
flags.DEFINE_enum(
    "mixed_precision", _TRAIN.precision, config_lib.PRECISIONS,
    "Compute dtype policy. auto = mixed_bfloat16 where the "
    "hardware has bfloat16 (measured 1.4x float32 on an "
    "AVX512-BF16 CPU), float32 where it is emulated (0.15x).")
flags.DEFINE_bool("jit_compile", _TRAIN.jit_compile,
                  "XLA-compile the training step.")
flags.DEFINE_bool("deterministic", _TRAIN.deterministic,
                  "Enable op determinism.")
flags.DEFINE_integer("seed", _TRAIN.seed, "Random seed.")
flags.DEFINE_integer("steps_per_loop", _TRAIN.steps_per_loop,
                     "Steps per tf.function call.")
flags.DEFINE_integer("checkpoint_every", _TRAIN.checkpoint_every,
                     "Steps between checkpoints.")
flags.DEFINE_multi_string(
    "set", [], "Set any configuration field, dotted; repeatable. "
    "TrainConfig fields as they are, linear.<field> for LinearEvalConfig, "
    "eval.<field> for EvalConfig: --set=loss.block_size=512 "
    "--set=loss.scale_by_temperature=false --set=linear.epochs=20")
flags.DEFINE_integer("linear_epochs", _LINEAR.epochs,
                     "Linear-evaluation epochs.")
flags.DEFINE_list(
    "linear_learning_rates", [str(r) for r in _LINEAR.learning_rates],
    "Linear-evaluation learning rates. The best on the "
    "validation split is kept.")
flags.DEFINE_integer("linear_batch_size", _LINEAR.batch_size,
                     "Linear-evaluation batch.")
flags.DEFINE_bool("linear_augment", _LINEAR.augment,
                  "Augment in linear evaluation.")
flags.DEFINE_bool("robustness",
                  config_lib.EvalConfig().robustness,
                  "Measure corruption robustness in the "
                  "report.")
flags.DEFINE_enum(
    "corruptions", config_lib.EvalConfig().corruptions,
    config_lib.CORRUPTION_SOURCES, "Which corruptions. auto: CIFAR-10-C "
    "(cifar10_corrupted) when a cifar10 run finds it prepared in --data_dir, "
    "else builtin (computed on the fly, offline); cifar10_corrupted: fail "
    "up front without it.")
flags.DEFINE_bool(
    "json", False, "Print the JSON report, not the summary table. "
    "It is alone on stdout (progress then goes to stderr) and always in "
    "<workdir>/report.json.")

FLAGS = flags.FLAGS

# `--help` (a line a flag) and `--helpfull` (each description in full): our
# flags, by stage, in this order. A new flag goes in one group.
FLAG_GROUPS = (
    ("run", ("mode", "workdir", "embed_split")),
    ("data", ("dataset", "data_dir", "validation_fraction", "train_examples",
              "image_size", "num_views", "augmentation", "crop_sampling",
              "blur", "eval_crop", "skip_corrupt")),
    ("model", ("encoder", "encoder_weights", "stem", "width", "head",
               "projection_dim")),
    ("loss", ("method", "temperature", "contrast_mode", "summation",
              "denominator", "positives_cap", "queue_size",
              "key_encoder_momentum")),
    ("optimisation", (
        "batch_size", "epochs", "steps", "optimizer", "learning_rate",
        "lr_scaling", "lr_schedule", "warmup_epochs", "momentum",
        "weight_decay", "mixed_precision", "jit_compile", "deterministic",
        "seed", "steps_per_loop", "checkpoint_every")),
    ("distribution", ("strategy", "cpu_devices")),
    ("linear evaluation", ("linear_epochs", "linear_learning_rates",
                           "linear_batch_size", "linear_augment")),
    ("export / report", ("robustness", "corruptions", "json")),
    ("any other setting", ("set",)),
)

def grouped_help() -> str:
  """The text of `--help`: our flags by stage, a line each with its default."""
  return cli_help.short_help(FLAGS, FLAG_GROUPS)


def full_help() -> str:
  """The text of `--helpfull`: our flags by stage, described in full."""
  return cli_help.grouped_help(FLAGS, FLAG_GROUPS)


cli_help.install(FLAGS, grouped_help, full_help)


class UsageError(ValueError):
  """A problem with the command line itself."""


_LINEAR_PREFIX = "linear."
_EVAL_PREFIX = "eval."


def _set_assignments(prefix: str = ""):
  """The --set items of one config, prefix removed.

  `prefix` is "linear." (LinearEvalConfig), "eval." (EvalConfig) or ""
  (TrainConfig: the items with neither prefix).
  """
  prefixes = (_LINEAR_PREFIX, _EVAL_PREFIX)
  return [item[len(prefix):] for item in FLAGS.set
          if item.startswith(prefix) and
          (prefix or not item.startswith(prefixes))]


def train_config() -> config_lib.TrainConfig:
  """The pretraining configuration the flags describe."""
  method = "ce" if FLAGS.mode == "train_ce" else FLAGS.method
  return overrides.override(_train_config_of_flags(method),
                             _set_assignments())


def _train_config_of_flags(method: str) -> config_lib.TrainConfig:
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
          head=FLAGS.head, projection_dim=FLAGS.projection_dim,
          # Absolute: the stored config must name the same file on resume.
          encoder_weights=(os.path.abspath(FLAGS.encoder_weights)
                           if FLAGS.encoder_weights else None)),
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
      skip_corrupt=FLAGS.skip_corrupt, train_examples=FLAGS.train_examples)


def linear_config() -> config_lib.LinearEvalConfig:
  try:
    rates = tuple(float(r) for r in FLAGS.linear_learning_rates)
  except ValueError:
    raise UsageError("--linear_learning_rates must be numbers, got "
                     f"{FLAGS.linear_learning_rates}.") from None
  return overrides.override(config_lib.LinearEvalConfig(
      epochs=FLAGS.linear_epochs, batch_size=FLAGS.linear_batch_size,
      learning_rate=rates[0], learning_rates=rates,
      augment=FLAGS.linear_augment, seed=FLAGS.seed),
      _set_assignments(prefix=_LINEAR_PREFIX))


def eval_config() -> config_lib.EvalConfig:
  return overrides.override(
      config_lib.EvalConfig(robustness=FLAGS.robustness,
                            corruptions=FLAGS.corruptions, seed=FLAGS.seed),
      _set_assignments(prefix=_EVAL_PREFIX))


def embed_config():
  """What --mode=embed embeds: an `embeddings.EmbedConfig` (TensorFlow)."""
  from supcon_tf import embeddings  # pylint: disable=g-import-not-at-top
  # A dataset other than the run's only when the command line names one.
  given = {name: FLAGS[name].value for name in ("dataset", "data_dir")
           if FLAGS[name].present}
  return embeddings.EmbedConfig(split=FLAGS.embed_split, seed=FLAGS.seed,
                                **given)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/first")
  workdir = os.path.abspath(FLAGS.workdir)
  try:
    config = train_config()  # Validates every flag up front.
    linear, evaluation = linear_config(), eval_config()
  except (ValueError, OSError) as e:
    _fail(e)
  # Only now TensorFlow (seconds to import): flag errors come at once.
  tf_startup.split_cpu(FLAGS.cpu_devices)
  from supcon_tf import distributed  # pylint: disable=g-import-not-at-top
  from supcon_tf import pipeline
  from supcon_tf import rundir
  try:
    embed = embed_config()
    # Before anything is created: a stage without its inputs leaves the
    # work dir (or its absence) as it was.
    pipeline.check_prerequisites(FLAGS.mode, workdir)
    if (FLAGS.mode in ("all", "train_ce") and FLAGS.robustness and
        evaluation.corruptions == "cifar10_corrupted"):
      # A missing CIFAR-10-C fails now, not after the pretraining.
      from supcon_tf import robustness  # pylint: disable=g-import-not-at-top
      robustness.choose_corruptions("cifar10_corrupted", config.data)
    os.makedirs(workdir, exist_ok=True)
  except (ValueError, OSError) as e:
    _fail(e)
  logging.get_absl_handler().use_absl_log_file("supcon_tf", workdir)
  logging.info("Configuration: %s", config_lib.to_json(config))
  # With --json, stdout carries the JSON alone: progress goes to stderr.
  progress_to = (contextlib.redirect_stdout(sys.stderr) if FLAGS.json
                 else contextlib.nullcontext())
  try:
    with progress_to:
      report = pipeline.run(
          FLAGS.mode, workdir, train=config, linear=linear,
          evaluation_config=evaluation,
          strategy=distributed.make_strategy(FLAGS.strategy),
          embed_config=embed)
  except KeyboardInterrupt:
    _fail("interrupted; run the same command again to resume.")
  except Exception as e:  # pylint: disable=broad-except
    # Errors the user can fix are ValueError / TrainingError: one line.
    if isinstance(e, (ValueError, OSError, rundir.TrainingError)):
      logging.exception("Failed.")
      _fail(e)
    raise
  if FLAGS.json:
    print(json.dumps(report, indent=2, sort_keys=True))
  else:
    print(report_table.summary_table(report, workdir))


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


def _parse_flags(argv):
  """absl's parsing, with a bad flag as one `supcon-tf: error:` line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e} (--help lists the flags)")


def run():
  """Console-script entry point."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
