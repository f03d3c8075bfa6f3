"""The run directory: its layout, atomic writes and "is this the same run?".

Layout of a work dir (every stage reads and writes only these names, and
only this module spells them):

    <workdir>/report.json                     summary of every stage (cli)
    <workdir>/pretrain/config.json            the pretraining `TrainConfig`
    <workdir>/pretrain/checkpoints/ckpt-<step>.*  encoder checkpoints
    <workdir>/pretrain/train/                 TensorBoard events
    <workdir>/linear_eval/classifier.keras    the linear classifier
    <workdir>/linear_eval/linear_eval.json    the linear evaluation's result
    <workdir>/linear_eval/lr_<rate>/          TensorBoard curves of one rate
    <workdir>/linear_eval/linear_backup/      crash-safe linear-eval state,
        run.json (its settings), state.json (records and selection),
        best-*.npz (the best weights), lr<i>/backup.json and lr<i>/*.weights.h5
        (the epoch backup of learning rate i); removed once finished
    <workdir>/export/                         the SavedModel
    <workdir>/retrieval.json                  Recall@k and mAP@R (evaluate)
    <workdir>/robustness.json                 corruption robustness (evaluate)
    <workdir>/evaluation/                     TensorBoard scalars (evaluate)
    <workdir>/hparams/                        TensorBoard HParams session
    <workdir>/plots/training_curves.png       figures (evaluate)
    <workdir>/plots/embeddings.png
    <workdir>/plots/robustness.png
    <workdir>/projector/                      TensorBoard Embedding Projector
        files of a sample of the test embeddings (evaluate):
        embeddings.ckpt-1.* and checkpoint (the sample), metadata.tsv (label,
        class), sprite.png (thumbnails), projector_config.pbtxt, and an
        events file that makes the folder a TensorBoard run
    <workdir>/embeddings/[<dataset>_]<split>[_projection]/  (embed)
        embeddings.npy, labels.npy, and projector/ as above for a sample

Imports only `config`, so that every stage (training, linear evaluation,
evaluation, plots, the CLI) can use it without importing the others.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, Iterable, Optional, Union

import tensorflow as tf

from supcon_tf import config as config_lib

PRETRAIN_DIR = "pretrain"
LINEAR_EVAL_DIR = "linear_eval"
EXPORT_DIR = "export"
REPORT_FILE = "report.json"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
EVENTS_DIR = "train"
# TensorBoard runs beside the pretraining one (`supcon_tf.summaries`).
LINEAR_CURVES_PREFIX = "lr_"
EVALUATION_EVENTS_DIR = "evaluation"
HPARAMS_DIR = "hparams"
CLASSIFIER_FILE = "classifier.keras"
LINEAR_BACKUP_DIR = "linear_backup"
PLOTS_DIR = "plots"
ROBUSTNESS_FILE = "robustness.json"
RETRIEVAL_FILE = "retrieval.json"
LINEAR_EVAL_FILE = "linear_eval.json"
# Under LINEAR_BACKUP_DIR.
LINEAR_RUN_FILE = "run.json"
LINEAR_STATE_FILE = "state.json"
LINEAR_EPOCH_BACKUP_FILE = "backup.json"
# Under PLOTS_DIR.
TRAINING_CURVES_PLOT = "training_curves.png"
EMBEDDINGS_PLOT = "embeddings.png"
ROBUSTNESS_PLOT = "robustness.png"
# Embeddings (`supcon_tf.embeddings`); TensorBoard names its
# projector_config.pbtxt itself.
EMBEDDINGS_DIR = "embeddings"
EMBEDDINGS_FILE = "embeddings.npy"
EMBEDDING_LABELS_FILE = "labels.npy"
PROJECTOR_DIR = "projector"
PROJECTOR_METADATA_FILE = "metadata.tsv"
PROJECTOR_SPRITE_FILE = "sprite.png"
PROJECTOR_CHECKPOINT_NAME = "embeddings.ckpt"
# Checkpoint `<CHECKPOINT_NAME>-<step>` is the files `<prefix>.index`, ...
CHECKPOINT_NAME = "ckpt"
CHECKPOINT_INDEX_SUFFIX = ".index"

# Fields that may change between a run and its resumption without changing
# the experiment.
RESUMABLE_CHANGES = ("steps_per_loop", "checkpoint_every", "keep_checkpoints")
# The run's length: a resume may change it (`store_config` checks it against
# the steps already trained and rewrites the stored config).
LENGTH_FIELDS = ("steps", "epochs")


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, incompatible work dir, ...)."""


def pretrain_dir(workdir: str) -> str:
  return os.path.join(workdir, PRETRAIN_DIR)


def linear_eval_dir(workdir: str) -> str:
  return os.path.join(workdir, LINEAR_EVAL_DIR)


def export_dir(workdir: str) -> str:
  return os.path.join(workdir, EXPORT_DIR)


def report_path(workdir: str) -> str:
  return os.path.join(workdir, REPORT_FILE)


def classifier_path(workdir: str) -> str:
  return os.path.join(workdir, LINEAR_EVAL_DIR, CLASSIFIER_FILE)


def checkpoints_dir(run_dir: str) -> str:
  """`run_dir` is a pretraining directory (`<workdir>/pretrain`)."""
  return os.path.join(run_dir, CHECKPOINTS_DIR)


def checkpoint_prefix(directory: str, step: int) -> str:
  """The path prefix of the checkpoint of `step` in a checkpoints directory."""
  return os.path.join(directory, f"{CHECKPOINT_NAME}-{step}")


def checkpoint_index_path(prefix: str) -> str:
  """The index file of a checkpoint path prefix (written last by TF)."""
  return f"{prefix}{CHECKPOINT_INDEX_SUFFIX}"


def config_path(run_dir: str, name: str = CONFIG_FILE) -> str:
  """The stored configuration of a stage directory (`<workdir>/pretrain`)."""
  return os.path.join(run_dir, name)


def events_dir(workdir: str) -> str:
  return run_events_dir(pretrain_dir(workdir))


def run_events_dir(run_dir: str) -> str:
  """TensorBoard events of a pretraining directory (`<workdir>/pretrain`)."""
  return os.path.join(run_dir, EVENTS_DIR)


def linear_curves_dir(linear_dir: str, learning_rate: float) -> str:
  """TensorBoard run of one learning rate in `<workdir>/linear_eval`."""
  return os.path.join(linear_dir,
                      f"{LINEAR_CURVES_PREFIX}{float(learning_rate):g}")


def evaluation_events_dir(workdir: str) -> str:
  return os.path.join(workdir, EVALUATION_EVENTS_DIR)


def hparams_dir(workdir: str) -> str:
  """The run's HParams session: hyperparameters and final metrics."""
  return os.path.join(workdir, HPARAMS_DIR)


def linear_result_path(linear_dir: str) -> str:
  """`linear_dir` is a linear-eval directory (`<workdir>/linear_eval`)."""
  return os.path.join(linear_dir, LINEAR_EVAL_FILE)


def linear_backup_dir(linear_dir: str) -> str:
  """`linear_dir` is a linear-eval directory (`<workdir>/linear_eval`)."""
  return os.path.join(linear_dir, LINEAR_BACKUP_DIR)


def learning_rate_backup_dir(backup_root: str, index: int) -> str:
  """The epoch backup of the `index`-th learning rate in `linear_backup/`."""
  return os.path.join(backup_root, f"lr{index}")


def first_line(error: BaseException) -> str:
  """An error's message as one line, for one-line failure reports."""
  text = str(error).strip()
  return (text.splitlines() or [type(error).__name__])[0][:300]


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed; TrainingError if it cannot be written."""
  try:
    tf.io.gfile.makedirs(workdir)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise TrainingError(
        f"Work dir {workdir} is not writable ({e}). Choose another "
        "--workdir or fix its permissions.") from None


def plots_dir(workdir: str) -> str:
  return os.path.join(workdir, PLOTS_DIR)


def plot_path(workdir: str, name: str) -> str:
  """A figure's path: `name` is one of the `*_PLOT` file names."""
  return os.path.join(plots_dir(workdir), name)


def robustness_path(workdir: str) -> str:
  return os.path.join(workdir, ROBUSTNESS_FILE)


def retrieval_path(workdir: str) -> str:
  return os.path.join(workdir, RETRIEVAL_FILE)


def embeddings_dir(workdir: str, split: str, *, space: str = "encoder",
                   dataset: Optional[str] = None) -> str:
  """Where `--mode=embed` writes the embeddings of one split.

  `<workdir>/embeddings/[<dataset>_]<split>[_projection]`: `dataset` names
  a dataset other than the run's (`folder:<path>` by its last folder), and
  `space` is "encoder" or "projection".
  """
  name = split if space == "encoder" else f"{split}_{space}"
  if dataset:
    if dataset.startswith("folder:"):
      dataset = os.path.basename(os.path.normpath(dataset[len("folder:"):]))
    # A file name whatever the TFDS name or folder holds ("cifar10:3.0.2").
    name = f"{re.sub(r'[^A-Za-z0-9.-]+', '-', dataset).strip('-.')}_{name}"
  return os.path.join(workdir, EMBEDDINGS_DIR, name)


def embeddings_path(directory: str) -> str:
  """`directory` is one of `embeddings_dir` (or any `write_embeddings` dir)."""
  return os.path.join(directory, EMBEDDINGS_FILE)


def embedding_labels_path(directory: str) -> str:
  return os.path.join(directory, EMBEDDING_LABELS_FILE)


def projector_dir(directory: str) -> str:
  """The projector files of a work dir (evaluate) or an embeddings dir."""
  return os.path.join(directory, PROJECTOR_DIR)


def atomic_write(path: str, contents: Union[str, bytes]) -> None:
  """Writes text or bytes so that `path` is either old or complete."""
  mode = "wb" if isinstance(contents, bytes) else "w"

  def write(tmp):
    with tf.io.gfile.GFile(tmp, mode) as f:
      f.write(contents)

  atomic_save(write, path)


def atomic_save(write: Callable[[str], Any], path: str) -> None:
  """`write(tmp)` to a sibling file, then renames it to `path`.

  `path` holds its old contents or the complete new ones, never part of
  them; on failure the partial file is removed and the error re-raised. The
  sibling keeps `path`'s extension (Keras picks the format by it).
  """
  root, extension = os.path.splitext(path)
  tmp = f"{root}.tmp-{os.getpid()}{extension}"
  try:
    write(tmp)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except BaseException:
    try:
      tf.io.gfile.remove(tmp)
    except (OSError, tf.errors.OpError):
      pass  # Not written, or a full disk refusing even this.
    raise


def flatten(values: dict, prefix: str = "") -> dict:
  """`{"loss": {"temperature": t}}` -> `{"loss.temperature": t}`."""
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def changed_settings(path: str, settings: Dict[str, Any],
                     ignore: Iterable[str] = (),
                     defaults: Optional[Dict[str, Any]] = None
                     ) -> Dict[str, tuple]:
  """Compares `settings` with those stored at `path`: the one "same run?" check.

  Args:
    path: a JSON file of stored settings.
    settings: the current settings; nested dicts compare by dotted field.
    ignore: dotted fields allowed to differ.
    defaults: values of fields the stored file lacks (a run written before
      the field existed ran with its default); nested like `settings`.

  Returns:
    `{field: (stored, current)}` of each differing field, sorted by field;
    empty when they agree or nothing is stored at `path`.
  """
  if not tf.io.gfile.exists(path):
    return {}
  current = flatten(json.loads(json.dumps(settings)))  # As stored.
  with tf.io.gfile.GFile(path) as f:
    stored = flatten(json.load(f))
  if defaults:
    stored = {**flatten(json.loads(json.dumps(defaults))), **stored}
  ignore = set(ignore)
  return {k: (stored.get(k), current.get(k))
          for k in sorted(set(stored) | set(current))
          if k not in ignore and stored.get(k) != current.get(k)}


def check_resumable(workdir: str, config: config_lib.TrainConfig,
                    name: str = CONFIG_FILE, *, write: bool = True,
                    ignore: Iterable[str] = ()) -> None:
  """Writes the run's config, or refuses a resume that changes it.

  Args:
    workdir: the run's directory.
    config: the run's configuration.
    name: file of the stored configuration in `workdir`.
    write: write the configuration when `workdir` holds none yet; False only
      checks (so that a run failing before its first step claims nothing).
    ignore: further dotted fields allowed to differ (e.g. `LENGTH_FIELDS`).

  Raises:
    TrainingError: `workdir` holds a run whose configuration differs in a
      field other than `RESUMABLE_CHANGES`; the message names each field
      (nested ones dotted, e.g. `loss.temperature`).
  """
  path = config_path(workdir, name)
  if tf.io.gfile.exists(path):
    changed = changed_settings(path, json.loads(config_lib.to_json(config)),
                               ignore=RESUMABLE_CHANGES + tuple(ignore),
                               defaults=config_lib.to_dict(type(config)()))
    if changed:
      details = "; ".join(f"{k}: {old!r} -> {new!r}"
                          for k, (old, new) in changed.items())
      raise TrainingError(
          f"{workdir} holds a run with a different configuration ({details}). "
          "Resuming would silently change the experiment: use a new work dir "
          "or the stored settings.")
    return
  if write:
    atomic_write(path, config_lib.to_json(config))


def store_config(workdir: str, config: config_lib.TrainConfig, *, step: int,
                 length: Callable[[config_lib.TrainConfig], int]
                 ) -> Optional[int]:
  """Writes `config.json`, or checks that the run resumes the stored one.

  The run's length may change (`LENGTH_FIELDS`) if the new length covers the
  steps already trained. The run then continues as a run of the new length
  planned from the start would: the data stream goes on where it stopped,
  and the learning rate follows the new length's schedule from `step` on
  (for a finished cosine run, a warm restart). The stored config becomes the
  new one.

  Args:
    workdir: the pretraining directory.
    config: the run's configuration.
    step: the steps already trained.
    length: a configuration's length in steps (`train_lib.total_steps`).

  Returns:
    The stored run's length in steps when it differs from `config`'s, else
    None (also for a new run).

  Raises:
    TrainingError: `config`'s length is below `step`, or the stored run
      differs in another field (`check_resumable`).
  """
  path = config_path(workdir)
  stored = load_config(workdir) if tf.io.gfile.exists(path) else None
  if stored is None or all(getattr(stored, f) == getattr(config, f)
                           for f in LENGTH_FIELDS):
    check_resumable(workdir, config)
    return None
  total = length(config)
  if total < step:
    raise TrainingError(
        f"{workdir} has already trained {step:,} steps, more than the "
        f"{total:,} asked for (steps={config.steps!r}, "
        f"epochs={config.epochs!r}): ask for at least {step:,} steps, or use "
        "a new work dir.")
  # Every worker, like check_resumable: the same bytes, written atomically.
  atomic_write(path, config_lib.to_json(config))
  stored_total = length(stored)
  return stored_total if stored_total != total else None


def load_config(workdir: str, name: str = CONFIG_FILE):
  """The `TrainConfig` stored in a pretraining directory."""
  with tf.io.gfile.GFile(config_path(workdir, name)) as f:
    return config_lib.from_dict(config_lib.TrainConfig, json.load(f))
