"""Tests of supcon_tf.plots: event files, projections and figures."""

import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import plots


def test_read_scalars_reads_tf2_summaries_and_keeps_the_latest(tmp_path):
  conftest.write_scalars(tmp_path, [1, 2, 3])
  scalars = plots.read_scalars(str(tmp_path))
  assert set(scalars) == {"loss", "learning_rate", "nn_top1",
                          "images_per_second"}
  steps, values = scalars["loss"]
  assert steps.tolist() == [1, 2, 3]
  np.testing.assert_allclose(values, [4.9, 4.8, 4.7], rtol=1e-6)
  # A resumed run writes a newer file that repeats step 3.
  writer = tf.summary.create_file_writer(str(tmp_path), filename_suffix=".b")
  with writer.as_default():
    tf.summary.scalar("loss", -1.0, step=3)
  writer.close()
  assert plots.read_scalars(str(tmp_path))["loss"][1].tolist()[-1] == -1.0
  assert plots.read_scalars(str(tmp_path / "missing")) == {}


def test_read_scalars_survives_a_truncated_event_file(tmp_path):
  conftest.write_scalars(tmp_path, [1, 2, 3])
  (path,) = tmp_path.glob("events.out.tfevents.*")
  path.write_bytes(path.read_bytes()[:-7])  # Killed mid-write.
  steps, values = plots.read_scalars(str(tmp_path))["loss"]
  assert steps.tolist() == [1, 2, 3]
  np.testing.assert_allclose(values, [4.9, 4.8, 4.7], rtol=1e-6)
  assert plots.read_scalars(str(tmp_path))["images_per_second"][0].tolist() == [
      1, 2]


def test_plot_training_curves(tmp_path):
  with pytest.raises(ValueError, match="pretrain"):
    plots.plot_training_curves(str(tmp_path), str(tmp_path / "a.png"))
  conftest.write_scalars(tmp_path / "pretrain" / "train", [1, 2, 3], method="ce")
  out = plots.plot_training_curves(str(tmp_path), str(tmp_path / "p/c.png"))
  assert out == str(tmp_path / "p/c.png")
  conftest.assert_png(out)


def test_pca_keeps_the_geometry_of_planar_data():
  rng = np.random.RandomState(0)
  plane = rng.normal(size=[30, 2]) * [3.0, 1.0]
  rotation, _ = np.linalg.qr(rng.normal(size=[5, 5]))
  features = plane @ rotation[:2] + rng.normal(size=[5])
  points = plots.pca_2d(features)

  def distances(x):
    return np.linalg.norm(x[:, None] - x[None], axis=-1)

  np.testing.assert_allclose(distances(points), distances(plane), atol=1e-8)
  assert points[:, 0].var() > points[:, 1].var()
  assert plots.pca_2d(np.ones([4, 1])).shape == (4, 2)


def test_tsne_falls_back_to_pca_without_scikit_learn(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn", None)  # Import fails.
  features = np.random.RandomState(0).normal(size=[12, 4])
  points, used = plots.project_2d(features, "tsne")
  assert used == "pca"
  np.testing.assert_allclose(points, plots.pca_2d(features), atol=1e-5)
  with pytest.raises(ValueError, match="umap"):
    plots.project_2d(features, "umap")


def test_plot_embeddings_and_robustness_write_pngs(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn", None)
  rng = np.random.RandomState(0)
  labels = np.arange(40) % 4
  features = rng.normal(size=[40, 8]) + labels[:, None]
  for method in ("pca", "tsne"):
    out = plots.plot_embeddings(
        features, labels, str(tmp_path / f"{method}.png"),
        class_names=list("abcd"), method=method)
    conftest.assert_png(out)
  with pytest.raises(ValueError, match="one label per row"):
    plots.plot_embeddings(features, labels[:3], str(tmp_path / "x.png"))

  result = {"clean_top1": 0.9, "severities": [1, 2],
            "top1": {"jpeg": [0.8, 0.7], "gaussian_noise": [0.6, 0.5]}}
  other = {**result, "top1": {"jpeg": [0.7, 0.6]}}
  out = plots.plot_robustness({"supcon": result, "ce": other},
                              str(tmp_path / "r.png"))
  conftest.assert_png(out)
  with pytest.raises(ValueError, match="clean_top1"):
    plots.plot_robustness({"x": {"top1": {}}}, str(tmp_path / "y.png"))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
