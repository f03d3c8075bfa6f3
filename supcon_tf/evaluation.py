"""A run directory's evaluation beyond the linear classifier.

`evaluate_workdir` measures the k-NN top-1 (`supcon_tf.knn`), label
retrieval (`supcon_tf.retrieval`), the corruption robustness
(`supcon_tf.robustness`) and draws the figures of `supcon_tf.plots`;
`top1_accuracy` scores any classifier.
"""

import json
import os
from typing import Any, Dict, Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import data
from supcon_tf import embeddings
from supcon_tf import knn
from supcon_tf import plots
from supcon_tf import retrieval
from supcon_tf import robustness
from supcon_tf import rundir
from supcon_tf import summaries


def top1_accuracy(model: keras.Model, dataset: tf.data.Dataset) -> float:
  """Share of `(images, labels)` examples whose top logit is their label.

  Args:
    model: `[batch, H, W, C] -> [batch, classes]` logits (or probabilities).
    dataset: finite dataset of `(images, labels [batch])` batches.
  """
  correct = total = 0
  for images, labels in dataset:
    predictions = tf.argmax(model(images, training=False), axis=-1)
    correct += int(tf.reduce_sum(tf.cast(
        predictions == tf.cast(labels, predictions.dtype), tf.int64)))
    total += int(tf.size(labels))
  if not total:
    raise ValueError("top1_accuracy got an empty dataset.")
  return correct / total




def _training_curves(workdir, plot_path, notes):
  """`plots/training_curves.png`, or a note when there are no events."""
  try:
    plots.plot_training_curves(
        workdir, rundir.plot_path(workdir, rundir.TRAINING_CURVES_PLOT))
    plot_path(rundir.TRAINING_CURVES_PLOT)
  except ValueError as e:
    notes.append(f"{rundir.TRAINING_CURVES_PLOT} skipped: {e}")


def _show_embeddings(workdir, queries, test, info, config, plot_file):
  """The 2-D plot and the projector files of the test embeddings."""
  features, labels = queries
  plots.plot_embeddings(
      features, labels, plot_file, class_names=info.class_names,
      method=config.embedding_method, seed=config.seed,
      title=f"{_run_name(workdir)}: {len(labels)} test embeddings")
  # The embeddings the k-NN used, not a second pass of the encoder.
  return embeddings.write_projector(
      features, labels, rundir.projector_dir(workdir),
      class_names=info.class_names, images=test, seed=config.seed)

def _robustness(workdir, classifier, test, data_config, config, plot_file):
  """Writes `robustness.json` and its plot; returns the result dict."""
  result = robustness.evaluate_robustness(
      classifier, test, data_config, corruptions=config.corruptions,
      max_examples=config.max_examples, batch_size=config.batch_size,
      seed=config.seed)
  logging.info("corruption robustness on %s: mean top-1 %.4f",
               result["description"], result["mean_corrupted_top1"])
  rundir.atomic_write(rundir.robustness_path(workdir),
                      json.dumps(result, indent=2))
  plots.plot_robustness({_run_name(workdir): robustness.plotted(result)},
                        plot_file)
  return result

def _first(dataset: tf.data.Dataset, count: Optional[int],
           batch_size: int) -> tf.data.Dataset:
  """The first `count` examples of a batched dataset, batched again."""
  if count is None:
    return dataset
  return dataset.unbatch().take(count).batch(batch_size)


def _run_name(workdir: str) -> str:
  """The training method of a run (from its config.json), else its folder."""
  try:
    return str(rundir.load_config(rundir.pretrain_dir(workdir)).method)
  except (OSError, ValueError, KeyError, TypeError, tf.errors.OpError):
    return os.path.basename(os.path.normpath(workdir))


def evaluate_workdir(workdir: str, *, encoder: keras.Model,
                     classifier: Optional[keras.Model],
                     data_config: config_lib.DataConfig,
                     config: Optional[config_lib.EvalConfig] = None,
                     projection: Optional[keras.Model] = None
                     ) -> Dict[str, Any]:
  """kNN accuracy, retrieval, corruption robustness and figures of a run.

  Writes, under `workdir`:
    * `evaluation/`: the k-NN top-1, retrieval and robustness numbers as
      TensorBoard scalars (`summaries.evaluation_scalars`);
    * `retrieval.json`: Recall@1/5/10 and mAP@R of the test images as
      queries against the k-NN neighbours as gallery (same label =
      relevant), in the encoder's space and, given `projection`, in the
      projection head's (`{"encoder": ..., "projection": ...}`);
    * `plots/training_curves.png` from the `pretrain/train` TensorBoard
      events (skipped, with a note, when there are none);
    * `plots/embeddings.png`: 2-D projection of the test embeddings;
    * `projector/`: TensorBoard Embedding Projector files of a sample of
      those embeddings, with thumbnails (`embeddings.write_projector`);
    * with `robustness`: `robustness.json` (the
      `robustness.evaluate_robustness` result: CIFAR-10-C when prepared in
      the data dir, else the built-in corruptions; `config.corruptions`)
      and `plots/robustness.png`.

  The test examples are the first `config.max_examples` of the test split,
  the kNN neighbours the first `config.knn_train_examples` of the train split
  (validation held out), both without augmentation.

  Args:
    workdir: the run directory.
    encoder: Keras model `[batch, H, W, 3] -> [batch, dim]` (the frozen
      representation).
    classifier: Keras model mapping float images in [0, 1] to logits (the
      linear classifier); only needed with `config.robustness`.
    data_config: the run's data configuration.
    config: what to measure and on how many examples (default
      `EvalConfig()`).
    projection: optional Keras model `[batch, H, W, 3] -> [batch, dim]`,
      the encoder with its projection head (the space a contrastive loss
      trained); adds that space to the retrieval results.

  Returns:
    A JSON-ready dict: `{"knn_top1": float, "knn_k": int,
    "knn_train_examples": int, "test_examples": int, "retrieval": as in
    `retrieval.json`, "robustness": the
    `evaluate_robustness` dict or None, "plots": [paths of the written
    PNGs, relative to workdir], "projector": {"dir": relative to workdir,
    "examples": rows in its sample}, "notes": [what was skipped and why]}`.

  Raises:
    ValueError: `config.robustness` without a classifier;
      `config.corruptions="cifar10_corrupted"` without CIFAR-10-C prepared
      (`robustness.choose_corruptions`).
  """
  config = config or config_lib.EvalConfig()
  if config.robustness and classifier is None:
    raise ValueError("robustness=True needs a classifier; pass the linear "
                     "classifier or EvalConfig(robustness=False).")
  batch_size = config.batch_size
  os.makedirs(rundir.plots_dir(workdir), exist_ok=True)
  written, notes = [], []

  def plot_path(name):
    written.append(os.path.join(rundir.PLOTS_DIR, name))
    return rundir.plot_path(workdir, name)

  _training_curves(workdir, plot_path, notes)

  info = data.dataset_info(data_config)
  test = _first(data.eval_dataset(data_config, "test", batch_size=batch_size),
                config.max_examples, batch_size)
  train = _first(data.eval_dataset(data_config, "train",
                                   batch_size=batch_size),
                 config.knn_train_examples, batch_size)
  queries, gallery = knn.embed(encoder, test), knn.embed(encoder, train)
  test_labels, train_labels = queries[1], gallery[1]
  knn_top1, k_used = _knn_top1(queries, gallery, config, info.num_classes)
  spaces = _retrieval(workdir, queries, gallery, projection, test, train)

  projector = _show_embeddings(workdir, queries, test, info, config,
                               plot_path(rundir.EMBEDDINGS_PLOT))

  robustness_result = None
  if config.robustness:
    robustness_result = _robustness(workdir, classifier, test, data_config,
                                    config, plot_path(rundir.ROBUSTNESS_PLOT))
  summaries.write_evaluation(rundir.evaluation_events_dir(workdir), {
      "knn_top1": knn_top1, "retrieval": spaces,
      "robustness": robustness_result})
  return {
      "knn_top1": knn_top1,
      "knn_k": k_used,
      "knn_train_examples": int(len(train_labels)),
      "test_examples": int(len(test_labels)),
      "retrieval": spaces,
      "robustness": robustness_result,
      "plots": written,
      "projector": {"dir": rundir.PROJECTOR_DIR,
                    "examples": int(len(projector.rows))},
      "notes": notes,
  }


def _knn_top1(queries, gallery, config, num_classes):
  """`(top-1, k)` of the k-NN classifier of `queries` over `gallery`.

  Both are `(features [n, dim], labels [n])` in the encoder's space; `k` is
  `config.k`, or the gallery's size when smaller.
  """
  test_features, test_labels = queries
  train_features, train_labels = gallery
  k_used = min(config.k, len(train_labels))
  predictions = knn.knn_predict(train_features, train_labels, test_features,
                                k=k_used, temperature=config.temperature,
                                num_classes=num_classes)
  knn_top1 = float(np.mean(predictions == test_labels))
  logging.info("kNN top-1 (k=%d, %d neighbours, %d test images): %.4f",
               k_used, len(train_labels), len(test_labels), knn_top1)
  return knn_top1, k_used


def _retrieval(workdir, queries, gallery, projection, test, train):
  """`retrieval.json`: both spaces' metrics, written and returned.

  `queries` and `gallery` are `(features, labels)` in the encoder's space;
  with a `projection`, its space is embedded from the `test` and `train`
  datasets.
  """
  # Tiny galleries (smoke tests) drop the k they cannot reach.
  recall_at = [k for k in retrieval.DEFAULT_RECALL_AT if k <= len(gallery[1])]
  spaces = {"encoder": retrieval.retrieval_metrics(*queries, *gallery,
                                                   recall_at=recall_at)}
  if projection is not None:
    spaces["projection"] = retrieval.retrieval_metrics(
        *knn.embed(projection, test), *knn.embed(projection, train),
        recall_at=recall_at)
  rundir.atomic_write(rundir.retrieval_path(workdir),
                      json.dumps(spaces, indent=2, sort_keys=True))
  for space, result in spaces.items():
    logging.info("retrieval in the %s space: recall@1 %.4f, mAP@R %.4f",
                 space, result["recall@1"], result["map@r"])
  return spaces
