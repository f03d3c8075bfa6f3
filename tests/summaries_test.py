"""Tests for supcon_tf.summaries: TensorBoard runs read back from disk."""

import dataclasses
import os
import sys
import types

import keras
import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.plugins.hparams import metadata as hparams_metadata
import tensorflow as tf

import conftest
from supcon_tf import config as config_lib
from supcon_tf import data
from supcon_tf import pipeline
from supcon_tf import rundir
from supcon_tf import summaries
from supcon_tf import train_lib


def read_values(logdir):
  """`[(tag, step, plugin, array)]` of every summary value in `logdir`."""
  values, plugins = [], {}
  pattern = os.path.join(logdir, "events.out.tfevents.*")
  for path in sorted(tf.io.gfile.glob(pattern)):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        # A writer may give the metadata with a tag's first value only.
        plugin = plugins.setdefault(
            value.tag, value.metadata.plugin_data.plugin_name)
        values.append((value.tag, event.step, plugin,
                       tf.make_ndarray(value.tensor)))
  return values


def read_scalars(logdir):
  """`{tag: {step: value}}` of the scalar summaries in `logdir`."""
  scalars = {}
  for tag, step, plugin, array in read_values(logdir):
    if plugin == "scalars":
      scalars.setdefault(tag, {})[step] = float(array)
  return scalars


def read_images(logdir, tag):
  """`[(step, [uint8 image arrays])]` of one image tag in `logdir`."""
  return [(step, [tf.io.decode_png(png).numpy() for png in array[2:]])
          for t, step, plugin, array in read_values(logdir)
          if t == tag and plugin == "images"]


def event_files(logdir):
  return tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*"))


def session_hparams(logdir):
  """`{name: value}` of the one HParams session start info in `logdir`."""
  infos = []
  for path in event_files(logdir):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == hparams_metadata.SESSION_START_INFO_TAG:
          infos.append(hparams_metadata.parse_session_start_info_plugin_data(
              value.metadata.plugin_data.content))
  [info] = infos
  return {name: getattr(v, v.WhichOneof("kind"))
          for name, v in info.hparams.items()}


# ----------------------------------------------------------------------------
# Views.

def test_view_grid_puts_each_images_views_side_by_side_clipped():
  views = tf.random.stateless_normal([5, 3, 4, 6, 3], seed=[1, 2]) * 2.0
  grid = summaries.view_grid(views, max_images=2)
  assert grid.shape == (2, 4, 18, 3)
  for v in range(3):
    np.testing.assert_array_equal(
        grid[:, :, 6 * v:6 * (v + 1)],
        tf.clip_by_value(views[:2, v], 0.0, 1.0))
  assert float(tf.reduce_min(grid)) == 0.0
  assert float(tf.reduce_max(grid)) == 1.0


def test_view_grid_refuses_other_layouts():
  with pytest.raises(ValueError, match=r"\[batch, views, H, W, C\]"):
    summaries.view_grid(tf.zeros([2, 4, 4, 3]))
  with pytest.raises(ValueError, match="max_images=0"):
    summaries.view_grid(tf.zeros([2, 2, 4, 4, 3]), max_images=0)


def test_write_views_writes_one_image_per_example_at_step_0(tmp_path):
  views = tf.random.stateless_uniform([6, 2, 8, 8, 3], seed=[3, 4])
  logdir = str(tmp_path / "train")
  summaries.write_views(logdir, views, max_images=3)
  [(step, images)] = read_images(logdir, summaries.VIEWS_TAG)
  assert step == 0 and len(images) == 3
  expected = summaries.view_grid(views, 3).numpy() * 255
  for image, want in zip(images, expected):
    assert image.shape == (8, 16, 3)
    np.testing.assert_allclose(image, want, atol=1)


# ----------------------------------------------------------------------------
# Linear-evaluation curves.

def _fit_tiny(callback, *, epochs, initial_epoch=0):
  """A softmax regression on fixed random features; returns its history."""
  features = tf.random.stateless_normal([32, 4], seed=[5, 6])
  labels = tf.cast(features[:, 0] > 0, tf.int32)
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  model.compile(
      optimizer=keras.optimizers.SGD(0.1),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")])
  return model.fit(features, labels, batch_size=8, epochs=epochs,
                   initial_epoch=initial_epoch, verbose=0, shuffle=False,
                   validation_data=(features[:16], labels[:16]),
                   callbacks=[callback]).history


def test_linear_eval_curves_write_every_epoch(tmp_path):
  logdir = str(tmp_path / "lr_0.1")
  history = _fit_tiny(summaries.LinearEvalCurves(logdir), epochs=3)
  scalars = read_scalars(logdir)
  assert set(scalars) >= {"train/loss", "train/top1", "validation/loss",
                          "validation/top1"}
  for tag, key in (("train/loss", "loss"), ("train/top1", "top1"),
                   ("validation/top1", "val_top1")):
    assert sorted(scalars[tag]) == [1, 2, 3]
    np.testing.assert_allclose([scalars[tag][e] for e in (1, 2, 3)],
                               history[key], rtol=1e-6)


def test_linear_eval_curves_restart_replaces_and_resume_appends(tmp_path):
  logdir = str(tmp_path / "lr_0.1")
  _fit_tiny(summaries.LinearEvalCurves(logdir), epochs=3)
  _fit_tiny(summaries.LinearEvalCurves(logdir), epochs=1)  # From the start.
  assert sorted(read_scalars(logdir)["train/loss"]) == [1]
  _fit_tiny(summaries.LinearEvalCurves(logdir), epochs=2, initial_epoch=1)
  assert sorted(read_scalars(logdir)["train/loss"]) == [1, 2]
  assert len(event_files(logdir)) == 2


def test_linear_eval_curves_write_nothing_off_the_chief(tmp_path):
  resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec({"worker": ["localhost:1", "localhost:2"]}),
      task_type="worker", task_id=1)
  worker = types.SimpleNamespace(cluster_resolver=resolver)
  logdir = str(tmp_path / "lr_0.1")
  _fit_tiny(summaries.LinearEvalCurves(logdir, worker), epochs=1)
  assert not os.path.exists(logdir)


# ----------------------------------------------------------------------------
# Evaluation scalars.

def _evaluation_result(clean):
  return {
      "knn_top1": 0.625,
      "knn_k": 8,  # Settings and counts are not scalars.
      "retrieval": {"encoder": {"recall@1": 0.75, "map@r": 0.5,
                                "queries": 8}},
      "robustness": {
          "clean_top1": clean, "severities": [1, 2, 3],
          "top1": {"noise": [0.5, 0.375, 0.25]},
          "mean_top1": {"noise": 0.375}, "num_examples": 8, "seed": 0,
          "description": "built-in corruptions",
          # A nested result with its own severities (as CIFAR-10-C's).
          "families": {"blur": {"severities": [2, 4], "top1": [0.5, 0.25]}},
      },
  }


def test_write_evaluation_writes_every_measurement(tmp_path):
  logdir = str(tmp_path / "evaluation")
  summaries.write_evaluation(logdir, _evaluation_result(clean=0.875))
  assert read_scalars(logdir) == {
      "knn/top1": {0: 0.625},
      "retrieval/encoder/recall@1": {0: 0.75},
      "retrieval/encoder/map@r": {0: 0.5},
      "robustness/clean_top1": {0: 0.875},
      "robustness/top1/noise": {1: 0.5, 2: 0.375, 3: 0.25},
      "robustness/mean_top1/noise": {0: 0.375},
      "robustness/families/blur/top1": {2: 0.5, 4: 0.25},
  }
  # A later evaluation replaces the run rather than adding to it.
  summaries.write_evaluation(logdir, _evaluation_result(clean=0.5))
  assert len(event_files(logdir)) == 1
  assert read_scalars(logdir)["robustness/clean_top1"] == {0: 0.5}


def test_write_evaluation_without_robustness(tmp_path):
  logdir = str(tmp_path / "evaluation")
  result = dict(_evaluation_result(clean=0.875), robustness=None)
  summaries.write_evaluation(logdir, result)
  assert not any(tag.startswith("robustness/")
                 for tag in read_scalars(logdir))


# ----------------------------------------------------------------------------
# HParams.

def _store_config(workdir, config):
  os.makedirs(rundir.pretrain_dir(workdir))
  rundir.atomic_write(rundir.config_path(rundir.pretrain_dir(workdir)),
                      config_lib.to_json(config))


def _report(test_top1):
  return {"pretrain": {"final_loss": 4.5, "steps": 2},
          "linear_eval": {"test_top1": test_top1, "val_top1": None},
          "evaluation": {"knn_top1": 0.25}}


def test_hparams_of_two_run_dirs_compare_in_one_parent(tmp_path):
  supcon = config_lib.TrainConfig(method="supcon", batch_size=64, steps=10)
  simclr = dataclasses.replace(supcon, method="simclr",
                               loss=config_lib.LossConfig(temperature=0.5))
  for name, config, top1 in (("a", supcon, 0.5), ("b", simclr, 0.25)):
    _store_config(str(tmp_path / name), config)
    assert summaries.write_hparams(str(tmp_path / name), _report(top1))
  logdir_a = rundir.hparams_dir(str(tmp_path / "a"))
  hparams = session_hparams(logdir_a)
  assert hparams["method"] == "supcon"
  assert hparams["batch_size"] == 64 and hparams["steps"] == 10
  assert hparams["loss.temperature"] == pytest.approx(0.1)
  assert hparams["model.encoder"] == "resnet18"
  assert set(hparams) <= set(summaries.HPARAM_FIELDS)
  assert session_hparams(rundir.hparams_dir(str(tmp_path / "b")))[
      "loss.temperature"] == pytest.approx(0.5)
  assert read_scalars(logdir_a) == {
      "linear_eval/test_top1": {0: 0.5}, "evaluation/knn_top1": {0: 0.25},
      "pretrain/final_loss": {0: 4.5}}  # val_top1 None: left out.
  # TensorBoard, pointed at the parent, finds both sessions.
  multiplexer = plugin_event_multiplexer.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(str(tmp_path))
  multiplexer.Reload()
  runs = multiplexer.PluginRunToTagToContent(hparams_metadata.PLUGIN_NAME)
  assert sorted(runs) == ["a/hparams", "b/hparams"]
  # Writing again (a later stage) replaces the session.
  summaries.write_hparams(str(tmp_path / "a"), _report(0.75))
  assert len(event_files(logdir_a)) == 1
  assert read_scalars(logdir_a)["linear_eval/test_top1"] == {0: 0.75}


def test_write_hparams_needs_a_pretraining_config(tmp_path):
  assert not summaries.write_hparams(str(tmp_path), {})
  assert not os.path.exists(rundir.hparams_dir(str(tmp_path)))


# ----------------------------------------------------------------------------
# Pretraining and a whole run.

def _synthetic_dataset_fn(context):
  """Fixed `(views [4, 2, 8, 8, 3], labels [4])` per-replica batches."""
  views = tf.random.stateless_uniform([16, 2, 8, 8, 3], seed=[7, 8])
  return tf.data.Dataset.from_tensor_slices((views, tf.range(16) % 4)).repeat(
  ).batch(context.get_per_replica_batch_size(4), drop_remainder=True)


def _tiny_encoder():
  return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                           keras.layers.Dense(16)])


def test_pretraining_shows_its_first_views_once(tmp_path):
  config = config_lib.TrainConfig(
      method="supcon", batch_size=4, steps=2, steps_per_loop=1,
      checkpoint_every=1, model=config_lib.ModelConfig(projection_dim=8))
  workdir = str(tmp_path / "pretrain")
  train_lib.pretrain(config, workdir, encoder=_tiny_encoder(),
                     dataset_fn=_synthetic_dataset_fn, stop_at_step=1,
                     verbose=False)
  train_lib.pretrain(config, workdir, encoder=_tiny_encoder(),  # Resumes.
                     dataset_fn=_synthetic_dataset_fn, verbose=False)
  events = rundir.run_events_dir(workdir)
  [(step, images)] = read_images(events, summaries.VIEWS_TAG)
  assert step == 0 and len(images) == 4
  first, _ = next(iter(_synthetic_dataset_fn(tf.distribute.InputContext())))
  for image, want in zip(images, summaries.view_grid(first).numpy() * 255):
    np.testing.assert_allclose(image, want, atol=1)
  assert sorted(read_scalars(events)["loss"]) == [1, 2]


def test_first_views_are_the_first_of_the_runs_stream(tmp_path):
  config = config_lib.TrainConfig(
      batch_size=8, seed=3, data=config_lib.DataConfig(
          dataset="cifar10", num_views=3, validation_fraction=0.2))
  with conftest.mock_tfds(tmp_path, num_examples=16, num_train=20):
    views = summaries.first_views(config, num_views=3, max_images=2)
    batch, _ = next(iter(data.pretrain_dataset(
        config.data, global_batch_size=8, seed=3)))
  assert views.shape == (2, 3, 32, 32, 3)
  np.testing.assert_array_equal(views, batch[:2])


@pytest.mark.slow
def test_a_run_writes_the_four_kinds_of_summaries(tmp_path):
  workdir = str(tmp_path / "run")
  train = config_lib.TrainConfig(
      method="supcon", batch_size=8, steps=2, steps_per_loop=1,
      checkpoint_every=2,
      data=config_lib.DataConfig(dataset="cifar10", validation_fraction=0.2),
      model=config_lib.ModelConfig(width=0.0625, projection_dim=8),
      optimizer=config_lib.OptimizerConfig(name="sgd", learning_rate=0.1))
  linear = config_lib.LinearEvalConfig(epochs=2, batch_size=8,
                                       learning_rates=(0.1, 0.05))
  with conftest.mock_tfds(tmp_path, num_examples=16, num_train=20):
    for mode in ("pretrain", "linear_eval", "evaluate"):  # "all" but export.
      report = pipeline.run(
          mode, workdir, train=train, linear=linear,
          evaluation_config=config_lib.EvalConfig(
              max_examples=8, knn_train_examples=8),
          verbose=False)

  # 1. The views of the first batch, once, at step 0.
  events = rundir.events_dir(workdir)
  [(step, images)] = read_images(events, summaries.VIEWS_TAG)
  assert step == 0 and len(images) == summaries.DEFAULT_MAX_IMAGES
  assert images[0].shape == (32, 2 * 32, 3)
  assert sorted(read_scalars(events)["loss"]) == [1, 2]

  # 2. One run of curves per learning rate, matching the recorded history.
  linear_dir = rundir.linear_eval_dir(workdir)
  for entry in report["linear_eval"]["history"]:
    scalars = read_scalars(rundir.linear_curves_dir(
        linear_dir, entry["learning_rate"]))
    for record in entry["epochs"]:
      for tag, key in (("train/loss", "loss"), ("train/top1", "top1"),
                       ("validation/top1", "val_top1")):
        assert scalars[tag][record["epoch"]] == pytest.approx(record[key])
  assert {"lr_0.05", "lr_0.1"} <= set(os.listdir(linear_dir))

  # 3. The evaluation's numbers.
  evaluation = report["evaluation"]
  scalars = read_scalars(rundir.evaluation_events_dir(workdir))
  assert scalars["knn/top1"] == {0: pytest.approx(evaluation["knn_top1"])}
  assert scalars["retrieval/encoder/map@r"] == {
      0: pytest.approx(evaluation["retrieval"]["encoder"]["map@r"])}
  assert scalars["robustness/clean_top1"] == {
      0: pytest.approx(evaluation["robustness"]["clean_top1"])}
  assert any(tag.startswith("robustness/") and sorted(steps) == [1, 2, 3, 4, 5]
             for tag, steps in scalars.items())

  # 4. The HParams session: the stored config and the final metrics.
  hparams_dir = rundir.hparams_dir(workdir)
  hparams = session_hparams(hparams_dir)
  assert hparams["method"] == "supcon" and hparams["steps"] == 2
  scalars = read_scalars(hparams_dir)
  assert scalars["linear_eval/test_top1"] == {
      0: pytest.approx(report["linear_eval"]["test_top1"])}
  assert scalars["evaluation/knn_top1"] == {
      0: pytest.approx(evaluation["knn_top1"])}


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
