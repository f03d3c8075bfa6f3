"""Embeddings as files, and the TensorBoard Embedding Projector.

`write_embeddings` runs a trained encoder (optionally followed by its
projection head) over a labelled dataset and writes `embeddings.npy` and
`labels.npy`; `write_projector` writes a TensorBoard Embedding Projector log
dir for a sample of rows. `embed_workdir` is `--mode=embed`: one split of a
finished run's dataset (or of another dataset, e.g. an image folder) into
the run dir (`supcon_tf.rundir` names the files).

```python
vectors, labels = embeddings.write_embeddings(encoder, dataset, "out")
embeddings.write_projector(vectors, labels, "out/projector", images=dataset)
# then: tensorboard --logdir out   (the Projector tab)
```
"""

import dataclasses
import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector

from supcon_tf import config as config_lib
from supcon_tf import data
from supcon_tf import knn
from supcon_tf import rundir
from supcon_tf import sources

DEFAULT_PROJECTOR_EXAMPLES = 1000
# "encoder": the frozen representation; "projection": encoder -> projection
# head, the space a contrastive loss trained.
SPACES = ("encoder", "projection")
THUMBNAIL_SIZE = 32
# TensorBoard's projector reads sprites up to 8192 pixels a side.
_MAX_SPRITE_SIDE = 8192
# The sample is `tf.train.Checkpoint(embeddings=<variable>)`: its key there
# is the tensor name the projector config must give.
_VARIABLE = "embeddings"
TENSOR_NAME = f"{_VARIABLE}/.ATTRIBUTES/VARIABLE_VALUE"
_EVENTS_GLOB = "events.out.tfevents.*"


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
  """What `embed_workdir` (`--mode=embed`) embeds.

  Attributes:
    split: "train", "validation" or "test" of the dataset.
    space: "encoder" or "projection" (contrastive runs only).
    dataset: a dataset other than the run's (a TFDS name or
      `folder:<path>`), read at the run's image size and crop; None: the
      run's own.
    data_dir: its TFDS data dir; None: the run's.
    projector_examples: rows in the projector sample.
    sprite: write a sprite of the sample's thumbnails.
    batch_size: images per encoder call.
    seed: seed of the projector sample.
  """
  split: str = "test"
  space: str = "encoder"
  dataset: Optional[str] = None
  data_dir: Optional[str] = None
  projector_examples: int = DEFAULT_PROJECTOR_EXAMPLES
  sprite: bool = True
  batch_size: int = 256
  seed: int = 0

  def __post_init__(self):
    if self.split not in sources.SPLITS:
      raise ValueError(f"embed split={self.split!r} is not one of "
                       f"{list(sources.SPLITS)} (--embed_split).")
    config_lib.check_choice("EmbedConfig.space", self.space, SPACES)
    for name in ("projector_examples", "batch_size"):
      value = getattr(self, name)
      if value is None or value < 1:
        raise ValueError(f"EmbedConfig.{name} must be >= 1, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ProjectorFiles:
  """What `write_projector` wrote.

  Attributes:
    log_dir: the folder for `tensorboard --logdir` (or any folder above it).
    rows: `[k]` int64, ascending: the embeddings' rows in the sample, in the
      order of the checkpoint, `metadata.tsv` and the sprite.
    tensor_name: the sample's key in the checkpoint and the config.
    sprite: whether a sprite of thumbnails was written.
  """
  log_dir: str
  rows: np.ndarray
  tensor_name: str
  sprite: bool


def embedding_model(encoder: keras.Model,
                    head: Optional[keras.layers.Layer] = None) -> keras.Model:
  """`encoder`, or `encoder -> head` as one model when a head is given.

  Args:
    encoder: `[batch, H, W, C] -> [batch, dim]`.
    head: e.g. the projection head, `[batch, dim] -> [batch, out]`.
  """
  if head is None:
    return encoder
  images = keras.Input(encoder.input_shape[1:])
  return keras.Model(images, head(encoder(images, training=False)),
                     name="embedding")


def write_embeddings(encoder: keras.Model, dataset: tf.data.Dataset,
                     output_dir: str, *,
                     head: Optional[keras.layers.Layer] = None
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """Embeds every example of `dataset` into `output_dir`.

  Writes `embeddings.npy` (`[n, dim]` float32, unit rows: the cosine
  geometry that k-NN and retrieval use, via `knn.embed`) and `labels.npy`
  (`[n]` int32), in dataset order, each whole or not at all.

  Args:
    encoder: `[batch, H, W, C] -> [batch, dim]`, run with `training=False`.
    dataset: finite dataset of `(images [batch, H, W, C], labels [batch])`,
      e.g. `data.eval_dataset(config, "test", batch_size=256)`.
    output_dir: created if needed.
    head: optional projection head after the encoder (the projection space).

  Returns:
    `(embeddings [n, dim], labels [n])` as written.

  Raises:
    ValueError: an empty dataset.
  """
  vectors, labels = knn.embed(embedding_model(encoder, head), dataset)
  tf.io.gfile.makedirs(output_dir)
  _save_array(rundir.embeddings_path(output_dir), vectors)
  _save_array(rundir.embedding_labels_path(output_dir), labels)
  return vectors, labels


def _save_array(path: str, array: np.ndarray) -> None:
  def write(tmp):
    with tf.io.gfile.GFile(tmp, "wb") as f:
      np.save(f, array)

  rundir.atomic_save(write, path)


def sample_rows(num_rows: int, max_examples: int,
                seed: int = 0) -> np.ndarray:
  """Ascending indices of a seeded sample of `min(num_rows, max_examples)`."""
  if max_examples is None or max_examples < 1:
    raise ValueError(f"max_examples must be >= 1, got {max_examples!r}.")
  if num_rows <= max_examples:
    return np.arange(num_rows, dtype=np.int64)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_rows, size=max_examples, replace=False))


def write_projector(embeddings, labels, log_dir: str, *,
                    class_names: Optional[Sequence[str]] = None,
                    images: Optional[tf.data.Dataset] = None,
                    max_examples: int = DEFAULT_PROJECTOR_EXAMPLES,
                    seed: int = 0,
                    thumbnail_size: int = THUMBNAIL_SIZE) -> ProjectorFiles:
  """A TensorBoard Embedding Projector log dir for a sample of embeddings.

  Writes, in `log_dir`: a checkpoint of the sample (`embeddings.ckpt-1.*`
  and `checkpoint`), `metadata.tsv` (a `label`, `class` header, then a row
  per sample row), with `images` a `sprite.png` of thumbnails,
  `projector_config.pbtxt` tying them together, and an events file, so that
  `tensorboard --logdir` on `log_dir` or any folder above it shows the
  sample in its Projector tab. Earlier files there are replaced.

  Args:
    embeddings: `[n, dim]` float.
    labels: `[n]` int class of each row.
    log_dir: created if needed.
    class_names: name of each label (default: the label numbers).
    images: the dataset the embeddings came from, in the same order:
      `(images [batch, H, W, 3]` float in [0, 1] or uint8, `labels)`; only
      read up to the sample's last row.
    max_examples: sample size; all rows when there are fewer.
    seed: seed of the sample.
    thumbnail_size: sprite cell side in pixels (lowered to keep the sprite
      within 8192 pixels).

  Returns:
    A `ProjectorFiles`.

  Raises:
    ValueError: mismatched or empty `embeddings` and `labels`, labels
      outside `class_names`, `max_examples` < 1, or `images` shorter than
      the embeddings.
  """
  embeddings = np.asarray(embeddings, np.float32)
  labels = np.asarray(labels).reshape(-1)
  if embeddings.ndim != 2 or len(embeddings) != len(labels) or not len(labels):
    raise ValueError(
        "Expected embeddings [n, dim] and labels [n] with n > 0; got shapes "
        f"{embeddings.shape} and {labels.shape}.")
  names = _class_names(labels, class_names)
  rows = sample_rows(len(labels), max_examples, seed)
  per_row = math.ceil(math.sqrt(len(rows)))
  size = max(1, min(thumbnail_size, _MAX_SPRITE_SIDE // per_row))
  # Read first: too few images fail before anything is written.
  thumbnails = None if images is None else _thumbnails(images, rows, size)
  tf.io.gfile.makedirs(log_dir)
  rundir.atomic_write(
      os.path.join(log_dir, rundir.PROJECTOR_METADATA_FILE),
      "".join(f"{row}\n" for row in ["label\tclass"] + [
          f"{label}\t{names[label]}" for label in labels[rows]]))
  checkpoint = tf.train.Checkpoint(**{_VARIABLE: tf.Variable(
      embeddings[rows], trainable=False)})
  # save() also writes the `checkpoint` file (relative paths) through which
  # TensorBoard finds the newest checkpoint of a folder.
  checkpoint.save(os.path.join(log_dir, rundir.PROJECTOR_CHECKPOINT_NAME))

  config = projector.ProjectorConfig()
  embedding = config.embeddings.add()
  embedding.tensor_name = TENSOR_NAME
  embedding.metadata_path = rundir.PROJECTOR_METADATA_FILE
  if thumbnails is not None:
    _write_sprite(thumbnails, per_row,
                  os.path.join(log_dir, rundir.PROJECTOR_SPRITE_FILE))
    embedding.sprite.image_path = rundir.PROJECTOR_SPRITE_FILE
    embedding.sprite.single_image_dim.extend([size, size])
  projector.visualize_embeddings(log_dir, config)
  _write_run_marker(log_dir, len(rows), embeddings.shape)
  return ProjectorFiles(log_dir=log_dir, rows=rows, tensor_name=TENSOR_NAME,
                        sprite=images is not None)


def _class_names(labels: np.ndarray,
                 class_names: Optional[Sequence[str]]) -> list:
  """A one-line name per label; checks that every label has one."""
  if labels.min() < 0:
    raise ValueError(f"labels must be >= 0, got {labels.min()}.")
  if class_names is None:
    return [str(i) for i in range(int(labels.max()) + 1)]
  if labels.max() >= len(class_names):
    raise ValueError(
        f"labels reach {labels.max()} but class_names has "
        f"{len(class_names)} names; pass a name for every class.")
  # Tabs and newlines would shift the TSV's columns and rows.
  return [" ".join(str(name).split()) for name in class_names]


def _thumbnails(images: tf.data.Dataset, rows: np.ndarray,
                size: int) -> np.ndarray:
  """uint8 `[len(rows), size, size, 3]`: the images at `rows` (ascending)."""
  picked, start = [], 0
  for batch in images:
    batch = batch[0] if isinstance(batch, (tuple, list)) else batch
    end = start + int(batch.shape[0])
    lo, hi = np.searchsorted(rows, [start, end])
    if hi > lo:
      chosen = tf.gather(batch, rows[lo:hi] - start)
      if chosen.dtype == tf.uint8:
        chosen = tf.cast(chosen, tf.float32) / 255.0
      picked.append(tf.image.resize(tf.cast(chosen, tf.float32),
                                    [size, size], antialias=True).numpy())
    start = end
    if hi == len(rows):
      break
  if sum(len(p) for p in picked) < len(rows):
    raise ValueError(
        f"images holds {start} examples but the sample needs row "
        f"{rows[-1]}; pass the dataset the embeddings came from.")
  thumbnails = np.concatenate(picked)
  return np.clip(np.round(thumbnails * 255.0), 0, 255).astype(np.uint8)


def _write_sprite(thumbnails: np.ndarray, per_row: int, path: str) -> None:
  """A square sheet of `per_row` x `per_row` cells, filled row by row."""
  size = thumbnails.shape[1]
  sheet = np.zeros([per_row * size, per_row * size, 3], np.uint8)
  for i, thumbnail in enumerate(thumbnails):
    row, column = divmod(i, per_row)
    sheet[row * size:(row + 1) * size,
          column * size:(column + 1) * size] = thumbnail
  rundir.atomic_write(path, tf.io.encode_png(sheet).numpy())


def _write_run_marker(log_dir: str, sample: int, shape) -> None:
  """An events file: TensorBoard lists a folder as a run only with one.

  Without it `tensorboard --logdir` finds the projector files only when
  pointed at `log_dir` itself. One file: earlier ones are removed.
  """
  for old in tf.io.gfile.glob(os.path.join(log_dir, _EVENTS_GLOB)):
    tf.io.gfile.remove(old)
  writer = tf.summary.create_file_writer(log_dir)
  with writer.as_default():
    tf.summary.text(
        "projector", f"{sample:,} of {shape[0]:,} embeddings ({shape[1]}-d): "
        "see the Projector tab.", step=0)
  writer.close()


def embed_workdir(workdir: str, *, encoder: keras.Model,
                  data_config: config_lib.DataConfig,
                  config: Optional[EmbedConfig] = None,
                  projection: Optional[keras.Model] = None
                  ) -> Dict[str, Any]:
  """`--mode=embed`: a split's embeddings and projector files in `workdir`.

  Writes `rundir.embeddings_dir(...)`: `embeddings.npy`, `labels.npy`
  (`write_embeddings`) and `projector/` (`write_projector`, thumbnails
  included unless `config.sprite` is False).

  Args:
    workdir: the run directory.
    encoder: the run's encoder `[batch, H, W, 3] -> [batch, dim]`.
    data_config: the run's data configuration (`config.dataset` and
      `config.data_dir` replace its fields of the same name).
    config: what to embed (default `EmbedConfig()`).
    projection: the run's encoder -> projection head model; needed for
      `config.space == "projection"`.

  Returns:
    A JSON-ready dict: `{"dataset", "split", "space", "examples", "dim",
    "dir", "projector", "projector_examples"}`.

  Raises:
    ValueError: the projection space without a projection model, an empty
      validation split, or any dataset error (e.g. a folder without the
      split's directory).
  """
  config = config or EmbedConfig()
  model = encoder
  if config.space == "projection":
    if projection is None:
      raise ValueError("EmbedConfig.space='projection' needs the run's "
                       "projection head, which a method='ce' run has none "
                       "of; use space='encoder'.")
    model = projection
  other = config.dataset not in (None, data_config.dataset)
  data_config = dataclasses.replace(
      data_config, dataset=config.dataset or data_config.dataset,
      data_dir=(data_config.data_dir if config.data_dir is None
                else config.data_dir))
  dataset = data.eval_dataset(data_config, config.split,
                              batch_size=config.batch_size)
  if dataset is None:
    raise ValueError(f"The validation split of {data_config.dataset!r} is "
                     "empty (validation_fraction=0): embed 'train' or "
                     "'test'.")
  out = rundir.embeddings_dir(workdir, config.split, space=config.space,
                              dataset=data_config.dataset if other else None)
  vectors, labels = write_embeddings(model, dataset, out)
  files = write_projector(
      vectors, labels, rundir.projector_dir(out),
      class_names=data.dataset_info(data_config).class_names,
      images=dataset if config.sprite else None,
      max_examples=config.projector_examples, seed=config.seed)
  return {"dataset": data_config.dataset, "split": config.split,
          "space": config.space, "examples": int(len(labels)),
          "dim": int(vectors.shape[1]), "dir": out,
          "projector": files.log_dir,
          "projector_examples": int(len(files.rows))}
