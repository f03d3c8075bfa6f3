"""Figures of a run: training curves, embeddings, corruption robustness.

Matplotlib is imported inside the plotting functions, so importing the
library does not pay for it. Figures are drawn on matplotlib's Agg canvas
directly (no `pyplot`), which neither needs a display nor changes the
backend of a notebook or script that also uses pyplot.
"""

import os
from typing import Dict, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import rundir

# (panel title, scalar tags to look for in order): contrastive runs log
# nn_top1, cross-entropy runs log accuracy.
TRAINING_PANELS = (
    ("loss", ("loss",)),
    ("learning rate", ("learning_rate",)),
    ("training top-1", ("nn_top1", "accuracy")),
    ("images / s", ("images_per_second",)),
)
EMBEDDING_METHODS = config_lib.EMBEDDING_METHODS


def _figure(rows: int, cols: int, *, width: float, height: float):
  """A matplotlib Figure with a grid of axes, drawn by the Agg canvas."""
  # pylint: disable=g-import-not-at-top
  from matplotlib import figure as figure_lib
  from matplotlib.backends import backend_agg
  # pylint: enable=g-import-not-at-top
  fig = figure_lib.Figure(figsize=(width, height))
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False)
  return fig, axes


def _save(fig, out_png: str) -> str:
  directory = os.path.dirname(out_png)
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.tight_layout()
  fig.savefig(out_png, format="png", dpi=100)
  return out_png


def read_scalars(event_dir: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """Every scalar summary of the TensorBoard event files in a directory.

  Reads both TF2 tensor summaries (`tf.summary.scalar`) and TF1
  `simple_value` summaries. When a resumed run logged a step twice, the
  value read last (from the newest file) wins.

  Args:
    event_dir: directory holding `events.out.tfevents.*` files.

  Returns:
    `{tag: (steps [n] int64, values [n] float64)}`, steps ascending; empty
    when the directory has no event files or no scalars.
  """
  by_tag: Dict[str, Dict[int, float]] = {}
  # Names hold the creation time after a fixed prefix: sorting orders runs.
  pattern = os.path.join(event_dir, "events.out.tfevents.*")
  for path in sorted(tf.io.gfile.glob(pattern)):
    try:
      for record in tf.data.TFRecordDataset(path):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
          if value.HasField("simple_value"):
            scalar = float(value.simple_value)
          elif value.HasField("tensor"):
            array = tf.make_ndarray(value.tensor)
            if array.size != 1 or not np.issubdtype(array.dtype, np.number):
              continue
            scalar = float(array.reshape(()))
          else:
            continue
          by_tag.setdefault(value.tag, {})[int(event.step)] = scalar
    except tf.errors.DataLossError:
      # A run killed while writing leaves a truncated last record.
      logging.warning("Truncated event file %s; using what was read.", path)
  result = {}
  for tag, values in by_tag.items():
    steps = np.array(sorted(values), np.int64)
    result[tag] = steps, np.array([values[s] for s in steps], np.float64)
  return result


def plot_training_curves(workdir: str, out_png: str) -> str:
  """Loss, learning rate, training top-1 and throughput against the step.

  Args:
    workdir: a run directory; its `pretrain/train` events are read (see
      `read_scalars`).
    out_png: where to write the PNG (parent directories are created).

  Returns:
    `out_png`.

  Raises:
    ValueError: when `<workdir>/pretrain/train` holds no scalar summaries
      (the run has not pretrained yet, or logged elsewhere).
  """
  event_dir = rundir.events_dir(workdir)
  scalars = read_scalars(event_dir)
  if not scalars:
    raise ValueError(
        f"No TensorBoard scalars in {event_dir}; pretrain in this work dir "
        "first (supcon-tf --mode=pretrain).")
  fig, axes = _figure(1, len(TRAINING_PANELS), width=4 * len(TRAINING_PANELS),
                      height=3.2)
  for ax, (title, tags) in zip(axes[0], TRAINING_PANELS):
    tag = next((t for t in tags if t in scalars), None)
    if tag is None:
      ax.text(0.5, 0.5, "not recorded", ha="center", va="center",
              transform=ax.transAxes)
      ax.set_title(title)
      continue
    steps, values = scalars[tag]
    ax.plot(steps, values, marker="." if len(steps) < 30 else None)
    ax.set_title(f"{title} ({tag})" if len(tags) > 1 else title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.suptitle(os.path.basename(os.path.normpath(workdir)) or workdir)
  return _save(fig, out_png)


def pca_2d(features) -> np.ndarray:
  """Projection on the two leading principal components (NumPy SVD).

  Args:
    features: `[n, dim]` float.

  Returns:
    `[n, 2]` float64 coordinates (a missing component, e.g. for `dim == 1`
    or `n == 1`, is zero). Each axis's sign is fixed so that its largest
    loading is positive, which makes the picture reproducible.
  """
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or not len(features):
    raise ValueError(f"Expected features [n, dim] with n > 0, got shape "
                     f"{features.shape}.")
  centered = features - features.mean(axis=0)
  _, _, vt = np.linalg.svd(centered, full_matrices=False)
  components = vt[:2]
  signs = np.sign(components[np.arange(len(components)),
                             np.argmax(np.abs(components), axis=1)])
  points = centered @ (components * np.where(signs == 0, 1, signs)[:, None]).T
  return np.pad(points, [(0, 0), (0, 2 - points.shape[1])])


def project_2d(features, method: str = "pca", *, seed: int = 0
               ) -> Tuple[np.ndarray, str]:
  """2-D coordinates of embeddings for a scatter plot.

  Args:
    features: `[n, dim]` float.
    method: `"pca"`, or `"tsne"` (scikit-learn's t-SNE when it is
      installed; otherwise PCA).
    seed: t-SNE random state.

  Returns:
    `(points [n, 2], method used)`; the method is `"pca"` when t-SNE was
    asked for but scikit-learn is missing or there are too few points.
  """
  if method not in EMBEDDING_METHODS:
    raise ValueError(f"method={method!r} is not one of "
                     f"{list(EMBEDDING_METHODS)}.")
  features = np.asarray(features, np.float32)
  if method == "tsne" and len(features) > 3:
    try:
      from sklearn import manifold  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.info("scikit-learn is not installed: PCA instead of t-SNE.")
    else:
      # t-SNE needs perplexity < n; 30 is the usual value.
      perplexity = min(30.0, (len(features) - 1) / 3)
      tsne = manifold.TSNE(n_components=2, perplexity=perplexity,
                           init="pca", random_state=seed)
      return tsne.fit_transform(features).astype(np.float64), "tsne"
  return pca_2d(features), "pca"


def plot_embeddings(features, labels, out_png: str, *,
                    class_names: Optional[Sequence[str]] = None,
                    method: str = "pca", title: str = "Test embeddings",
                    seed: int = 0) -> str:
  """A 2-D scatter plot of embeddings coloured by class.

  Args:
    features: `[n, dim]` float embeddings (e.g. from `knn.embed`).
    labels: `[n]` int class of each row.
    out_png: where to write the PNG (parent directories are created).
    class_names: legend names in label order (default: the label numbers).
    method: `"pca"` or `"tsne"` (see `project_2d`); when t-SNE falls back to
      PCA the title says so.
    title: figure title; the method is appended.
    seed: t-SNE random state.

  Returns:
    `out_png`.
  """
  labels = np.asarray(labels).reshape(-1)
  features = np.asarray(features)
  if len(labels) != len(features):
    raise ValueError(f"features has {len(features)} rows but labels has "
                     f"{len(labels)}; pass one label per row.")
  points, used = project_2d(features, method, seed=seed)
  suffix = used.upper() if used == method else (
      "PCA; t-SNE needs scikit-learn")
  if method == "tsne" and used == "pca" and len(features) <= 3:
    suffix = "PCA; too few points for t-SNE"
  fig, axes = _figure(1, 1, width=6.5, height=5.5)
  ax = axes[0, 0]
  classes = np.unique(labels)
  colours = _colours(len(classes))
  for colour, label in zip(colours, classes):
    name = (class_names[label] if class_names is not None and
            0 <= label < len(class_names) else str(label))
    rows = labels == label
    ax.scatter(points[rows, 0], points[rows, 1], s=6, color=colour,
               label=name, alpha=0.7, linewidths=0)
  if len(classes) <= 20:
    ax.legend(fontsize="small", markerscale=2, loc="best")
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(f"{title} ({suffix})")
  return _save(fig, out_png)


def _colours(n: int):
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
  if n <= 20:
    return [cmap(i) for i in range(n)]
  return [cmap(i / max(n - 1, 1)) for i in range(n)]


def plot_robustness(results_by_model: Mapping[str, Mapping], out_png: str
                    ) -> str:
  """Top-1 against corruption severity: one panel per kind, one line per model.

  Severity 0 is the clean accuracy.

  Args:
    results_by_model: `{model name: robustness.corruption_robustness(...)
      result}` (the dicts stored in `robustness.json`).
    out_png: where to write the PNG (parent directories are created).

  Returns:
    `out_png`.

  Raises:
    ValueError: for no models or a result without `clean_top1`,
      `severities` and `top1`.
  """
  if not results_by_model:
    raise ValueError("results_by_model is empty; pass {name: result}.")
  kinds = []
  for name, result in results_by_model.items():
    missing = {"clean_top1", "severities", "top1"} - set(result)
    if missing:
      raise ValueError(
          f"Robustness result of {name!r} lacks {sorted(missing)}; pass the "
          "dict returned by robustness.corruption_robustness.")
    kinds += [k for k in result["top1"] if k not in kinds]
  if not kinds:
    raise ValueError("No corruption kinds in results_by_model.")
  fig, axes = _figure(1, len(kinds), width=4 * len(kinds), height=3.4)
  for ax, kind in zip(axes[0], kinds):
    for name, result in results_by_model.items():
      if kind not in result["top1"]:
        continue
      severities = [0] + list(result["severities"])
      top1 = [result["clean_top1"]] + list(result["top1"][kind])
      ax.plot(severities, top1, marker="o", label=name)
    ax.set_title(kind.replace("_", " "))
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("top-1")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  return _save(fig, out_png)
