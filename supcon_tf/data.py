"""Input pipelines from TFDS datasets or image folders.

Every pipeline is built from a `DataConfig` and an optional
`tf.distribute.InputContext`, so it plugs into
`strategy.distribute_datasets_from_function`:

  strategy.distribute_datasets_from_function(
      lambda ctx: pretrain_dataset(cfg, global_batch_size=512, seed=0,
                                   input_context=ctx))

Where the examples come from (TFDS datasets or image folders) and how the
splits are cut is `supcon_tf.sources`; this module batches, shards and
augments them.

Determinism: files are read in a fixed order, shuffling is seeded, and each
example's augmentation seed is derived from `seed`, the input pipeline id and
the example's position in the stream, so two runs with the same seed yield the
same batches.
"""

from typing import Optional

import tensorflow as tf

from supcon_tf import augment as augment_lib
from supcon_tf import config as config_lib
from supcon_tf import sources

# Re-exported: `dataset_info` returns it.
DatasetInfo = sources.DatasetInfo
_AUTOTUNE = tf.data.AUTOTUNE


def dataset_info(config: config_lib.DataConfig) -> DatasetInfo:
  """Class count, names, image shape and split sizes of `config.dataset`.

  Args:
    config: the data configuration.

  Returns:
    A `DatasetInfo`.

  Raises:
    ValueError: unknown or unprepared TFDS dataset, non-RGB TFDS images,
      missing folder, or undecodable folder files without `skip_corrupt`.
  """
  return sources.source(config).info


def _per_replica_batch_size(global_batch_size: int,
                            input_context: Optional[tf.distribute.InputContext]
                            ) -> int:
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got "
                     f"{global_batch_size}.")
  if input_context is None:
    return global_batch_size
  replicas = input_context.num_replicas_in_sync
  if global_batch_size % replicas:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by the "
        f"{replicas} replicas in sync; use a multiple of {replicas}.")
  return input_context.get_per_replica_batch_size(global_batch_size)


def _shard(ds: tf.data.Dataset,
           input_context: Optional[tf.distribute.InputContext]
           ) -> tf.data.Dataset:
  if input_context is not None and input_context.num_input_pipelines > 1:
    ds = ds.shard(input_context.num_input_pipelines,
                  input_context.input_pipeline_id)
  return ds


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _augmented_dataset(config: config_lib.DataConfig, *,
                       global_batch_size: int, seed: int,
                       input_context: Optional[tf.distribute.InputContext],
                       policy: str, num_views: int, repeat: bool,
                       squeeze_view: bool,
                       skip_batches: int = 0) -> tf.data.Dataset:
  """Sharded, shuffled, augmented, batched "train" split."""
  if skip_batches < 0:
    raise ValueError(f"skip_batches must be >= 0, got {skip_batches}.")
  batch_size = _per_replica_batch_size(global_batch_size, input_context)
  source = sources.source(config)
  view_fn = augment_lib.make_view_fn(policy, size=config.image_size,
                                 blur=config.blur, num_views=num_views,
                                 crop_sampling=config.crop_sampling,
                                 eval_crop=config.resolved_eval_crop)
  pipeline_id = input_context.input_pipeline_id if input_context else 0

  ds = _shard(source.read("train"), input_context)
  ds = ds.shuffle(config.shuffle_buffer, seed=seed,
                  reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  # The element's position in the (repeated) stream keys its augmentation:
  # reproducible, and different for every epoch, view and input pipeline.
  base_seed = tf.constant([seed, pipeline_id], tf.int64)

  def prepare(index, example):
    raw, label = example
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    views = view_fn(source.decode(raw), example_seed)
    if squeeze_view:
      views = views[0]
    return views, tf.cast(label, tf.int32)

  ds = tf.data.Dataset.zip((tf.data.Dataset.counter(), ds))
  # Skipped before decoding and augmenting, so resuming deep into a run
  # costs only reading the raw records again.
  ds = ds.skip(skip_batches * batch_size)
  ds = ds.map(prepare, num_parallel_calls=_AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  return _with_options(ds).prefetch(_AUTOTUNE)


def pretrain_dataset(config: config_lib.DataConfig, *,
                     global_batch_size: int, seed: int,
                     input_context: Optional[tf.distribute.InputContext] = None,
                     num_views: Optional[int] = None, augment: bool = True,
                     repeat: bool = True,
                     skip_batches: int = 0) -> tf.data.Dataset:
  """Multi-view batches of the "train" split for contrastive pretraining.

  Args:
    config: the data configuration (`augmentation`, `image_size`, `blur`, ...).
    global_batch_size: examples per step over all replicas.
    seed: shuffling and augmentation seed.
    input_context: from `distribute_datasets_from_function`; shards the data
      by input pipeline and sets the per-replica batch size.
    num_views: views per image (default `config.num_views`).
    augment: False makes every view the resized image (policy "none").
    repeat: repeat indefinitely (each epoch reshuffled and re-augmented).
    skip_batches: start after this many batches, with exactly the batches
      (order and augmentation) that a dataset skipped by iteration would
      yield next; a resumed run continues its stream this way.

  Returns:
    A dataset of `(views [per_replica_batch, views, size, size, 3]` float32
    in [0, 1], `labels [per_replica_batch]` int32); incomplete batches are
    dropped.

  Raises:
    ValueError: `global_batch_size` not divisible by the replicas, or any
      dataset error of `dataset_info`.
  """
  num_views = config.num_views if num_views is None else num_views
  return _augmented_dataset(
      config, global_batch_size=global_batch_size, seed=seed,
      input_context=input_context,
      policy=config.augmentation if augment else "none",
      num_views=num_views, repeat=repeat, squeeze_view=False,
      skip_batches=skip_batches)


def supervised_dataset(
    config: config_lib.DataConfig, *, global_batch_size: int, seed: int,
    input_context: Optional[tf.distribute.InputContext] = None,
    augment: bool = True, repeat: bool = True) -> tf.data.Dataset:
  """Single-view batches of the "train" split for cross-entropy / linear eval.

  Args:
    config: the data configuration.
    global_batch_size: examples per step over all replicas.
    seed: shuffling and augmentation seed.
    input_context: optional `tf.distribute.InputContext`.
    augment: apply `config.augmentation`; False only resizes.
    repeat: repeat indefinitely.

  Returns:
    A dataset of `(images [per_replica_batch, size, size, 3]` float32 in
    [0, 1], `labels [per_replica_batch]` int32); incomplete batches are
    dropped.
  """
  return _augmented_dataset(
      config, global_batch_size=global_batch_size, seed=seed,
      input_context=input_context,
      policy=config.augmentation if augment else "none",
      num_views=1, repeat=repeat, squeeze_view=True)


def eval_dataset(config: config_lib.DataConfig, split: str, *,
                 batch_size: int,
                 input_context: Optional[tf.distribute.InputContext] = None
                 ) -> Optional[tf.data.Dataset]:
  """Every example of one split, in a fixed order, without augmentation.

  Args:
    config: the data configuration.
    split: "train", "validation" or "test".
    batch_size: global batch size (divided among replicas when
      `input_context` is given).
    input_context: optional `tf.distribute.InputContext`.

  Returns:
    A dataset of `(images [batch, size, size, 3]` float32 in [0, 1],
    `labels [batch]` int32) that keeps the last, smaller batch. Images go
    through `augment.eval_image` with `config.resolved_eval_crop`: the
    short side resized to image_size / 0.875 and the centre kept (ImageNet
    sizes), or the whole image resized (CIFAR's 32x32 pass unchanged); the
    exported `serving_bytes` signature does the same. None for "validation"
    when `validation_fraction` is 0.
  """
  sources.check_split(split)
  batch_size = _per_replica_batch_size(batch_size, input_context)
  source = sources.source(config)
  if split == "validation" and source.info.num_val == 0:
    return None
  size, crop = config.image_size, config.resolved_eval_crop

  def prepare(raw, label):
    image = augment_lib.eval_image(source.decode(raw), size=size, crop=crop)
    return augment_lib.uint8_to_float(image), tf.cast(label, tf.int32)

  ds = _shard(source.read(split), input_context)
  ds = ds.map(prepare, num_parallel_calls=_AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=False)
  return _with_options(ds).prefetch(_AUTOTUNE)
