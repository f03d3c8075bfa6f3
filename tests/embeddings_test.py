"""Tests of supcon_tf.embeddings: .npy files, projector files, --mode=embed."""

import json
import os
import pathlib
import shutil
import sys

from absl import logging
from google.protobuf import text_format
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins import projector
from tensorboard.plugins.projector import projector_plugin
from werkzeug import test as werkzeug_test

import conftest
from supcon_tf import cli
from supcon_tf import config as config_lib
from supcon_tf import embeddings
from supcon_tf import pipeline
from supcon_tf import rundir

IMAGE = 8


def tiny_encoder(dim=6):
  return keras.Sequential([keras.Input((IMAGE, IMAGE, 3)),
                           keras.layers.Flatten(), keras.layers.Dense(dim)])


def labelled_images(n=12, batch=5, seed=0):
  """`(dataset of (images, labels) batches, images, labels)`."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)
  labels = rng.integers(0, 3, n)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)
  return dataset, images, labels


def unit_rows(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def read_config(log_dir):
  config = projector.ProjectorConfig()
  text_format.Parse(
      (pathlib.Path(log_dir) / "projector_config.pbtxt").read_text(), config)
  return config


def test_write_embeddings_round_trips_shapes_and_labels(tmp_path):
  encoder = tiny_encoder()
  dataset, images, labels = labelled_images()
  out = tmp_path / "out"
  vectors, got_labels = embeddings.write_embeddings(encoder, dataset, str(out))
  saved = np.load(out / "embeddings.npy")
  saved_labels = np.load(out / "labels.npy")
  assert saved.shape == (12, 6) and saved.dtype == np.float32
  assert saved_labels.dtype.kind == "i"
  np.testing.assert_array_equal(saved_labels, labels)
  np.testing.assert_array_equal(got_labels, labels)
  np.testing.assert_array_equal(saved, vectors)
  np.testing.assert_allclose(saved, unit_rows(encoder(images).numpy()),
                             rtol=1e-5, atol=1e-6)
  # The projection space: the head after the encoder.
  head = keras.layers.Dense(4)
  projected, _ = embeddings.write_embeddings(encoder, dataset,
                                             str(tmp_path / "projected"),
                                             head=head)
  assert np.load(tmp_path / "projected" / "embeddings.npy").shape == (12, 4)
  np.testing.assert_allclose(
      projected, unit_rows(head(encoder(images)).numpy()), rtol=1e-5,
      atol=1e-6)


def test_projector_checkpoint_config_metadata_and_sprite_agree(tmp_path):
  dataset, images, labels = labelled_images()
  vectors = np.random.default_rng(1).normal(size=(12, 5)).astype(np.float32)
  log_dir = str(tmp_path / "projector")
  names = ["cat", "dog", "sea\tlion"]
  files = embeddings.write_projector(
      vectors, labels, log_dir, class_names=names, images=dataset,
      max_examples=7, seed=3, thumbnail_size=4)
  rows = files.rows
  assert len(rows) == 7 and len(set(rows)) == 7
  assert list(rows) == sorted(rows) and 0 <= rows[0] and rows[-1] < 12
  [embedding] = read_config(log_dir).embeddings
  assert embedding.tensor_name == files.tensor_name
  # TensorBoard finds the checkpoint through the folder's `checkpoint` file
  # and reads the tensor the config names.
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(log_dir))
  np.testing.assert_array_equal(reader.get_tensor(embedding.tensor_name),
                                vectors[rows])
  metadata = (pathlib.Path(log_dir) / embedding.metadata_path).read_text()
  assert metadata.splitlines() == ["label\tclass"] + [
      f"{label}\t{['cat', 'dog', 'sea lion'][label]}"
      for label in labels[rows]]
  # A 3 x 3 sheet of 4 x 4 thumbnails of the sampled rows, row by row.
  assert list(embedding.sprite.single_image_dim) == [4, 4]
  sprite = tf.io.decode_png(tf.io.read_file(
      os.path.join(log_dir, embedding.sprite.image_path))).numpy()
  assert sprite.shape == (12, 12, 3)
  for i, row in enumerate(rows):
    r, c = divmod(i, 3)
    expected = tf.image.resize(images[row:row + 1], [4, 4], antialias=True)
    np.testing.assert_allclose(sprite[4 * r:4 * r + 4, 4 * c:4 * c + 4],
                               np.round(expected[0].numpy() * 255), atol=1)
  assert not sprite[8:, 4:].any()  # Cells past the 7th stay empty.
  # The folder moves as a whole: the checkpoint path is relative.
  moved = shutil.copytree(log_dir, tmp_path / "moved")
  assert tf.train.latest_checkpoint(str(moved)).startswith(str(moved))
  # The same seed samples the same rows, another seed others.
  again = embeddings.write_projector(vectors, labels, log_dir, max_examples=7,
                                     seed=3)
  np.testing.assert_array_equal(again.rows, rows)
  assert not again.sprite
  assert not read_config(log_dir).embeddings[0].HasField("sprite")
  other = embeddings.write_projector(vectors, labels, str(tmp_path / "o"),
                                     max_examples=7, seed=4)
  assert list(other.rows) != list(rows)
  assert len(tf.io.gfile.glob(os.path.join(log_dir, "events.*"))) == 1


def test_projector_takes_every_row_when_fewer_than_the_sample(tmp_path):
  vectors = np.random.default_rng(0).normal(size=(12, 5))
  labels = np.arange(12) % 3
  files = embeddings.write_projector(vectors, labels, str(tmp_path))
  assert list(files.rows) == list(range(12))
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path)))
  assert reader.get_variable_to_shape_map()[files.tensor_name] == [12, 5]
  # Without class names the label numbers name the classes.
  assert (tmp_path / "metadata.tsv").read_text().splitlines()[1] == "0\t0"


def test_projector_rejects_bad_inputs(tmp_path):
  vectors, labels = np.zeros((4, 2)), np.array([0, 1, 2, 1])
  with pytest.raises(ValueError, match="class_names has 2 names"):
    embeddings.write_projector(vectors, labels, str(tmp_path),
                               class_names=["a", "b"])
  with pytest.raises(ValueError, match="got shapes"):
    embeddings.write_projector(vectors, labels[:3], str(tmp_path))
  with pytest.raises(ValueError, match="max_examples must be >= 1"):
    embeddings.write_projector(vectors, labels, str(tmp_path), max_examples=0)
  dataset, _, _ = labelled_images(n=2)
  with pytest.raises(ValueError, match="images holds 2 examples"):
    embeddings.write_projector(vectors, labels, str(tmp_path / "short"),
                               images=dataset)
  assert not (tmp_path / "short").exists()  # Nothing half-written.
  with pytest.raises(ValueError, match="embed split='val' is not one of"):
    embeddings.EmbedConfig(split="val")
  with pytest.raises(ValueError, match="space='logits' is not one of"):
    embeddings.EmbedConfig(space="logits")


def tensorboard_projector(logdir):
  """TensorBoard's projector plugin on `logdir`, as `tensorboard` runs it."""
  multiplexer = plugin_event_multiplexer.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(logdir)
  multiplexer.Reload()
  context = base_plugin.TBContext(
      logdir=logdir, multiplexer=multiplexer,
      data_provider=data_provider.MultiplexerDataProvider(multiplexer,
                                                          logdir))
  apps = projector_plugin.ProjectorPlugin(context).get_plugin_apps()
  return lambda route, query="": werkzeug_test.Client(apps[route]).get(
      f"{route}?{query}")


def test_tensorboard_finds_the_projector_from_a_folder_above(tmp_path):
  dataset, _, labels = labelled_images()
  vectors = np.random.default_rng(1).normal(size=(12, 5)).astype(np.float32)
  files = embeddings.write_projector(
      vectors, labels, str(tmp_path / "run" / "projector"),
      class_names=["a", "b", "c"], images=dataset, max_examples=5)
  get = tensorboard_projector(str(tmp_path))
  assert json.loads(get("/runs").data) == [os.path.join("run", "projector")]
  query = f"run=run/projector&name={files.tensor_name}"
  served = np.frombuffer(get("/tensor", query).data, np.float32)
  np.testing.assert_array_equal(served.reshape(5, 5), vectors[files.rows])
  assert len(get("/metadata", query).data.decode().splitlines()) == 6
  assert get("/sprite_image", query).status_code == 200


def run_cli(*argv):
  """`supcon-tf *argv` in this process (mocked TFDS reaches it)."""
  cli.FLAGS(["supcon-tf", *argv])
  try:
    cli.main(["supcon-tf"])
  finally:
    cli.FLAGS.unparse_flags()


@pytest.fixture(name="quiet_log")
def _quiet_log(monkeypatch):
  # cli.main would send absl's log to a file in the work dir for good.
  monkeypatch.setattr(logging.get_absl_handler(), "use_absl_log_file",
                      lambda *args, **kwargs: None)


def write_folder(root):
  """`root/{train,test}/{cat,dog}/*.png`: test holds 3 cats and 2 dogs."""
  rng = np.random.default_rng(0)
  for split, counts in (("train", (2, 2)), ("test", (3, 2))):
    for name, count in zip(("cat", "dog"), counts):
      class_dir = root / split / name
      class_dir.mkdir(parents=True)
      for i in range(count):
        image = rng.integers(0, 256, (IMAGE, IMAGE, 3), np.uint8)
        (class_dir / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())


TINY_RUN = (f"--image_size={IMAGE}", "--steps=2", "--batch_size=8",
            "--width=0.0625",
            "--projection_dim=8", "--steps_per_loop=1", "--checkpoint_every=2",
            "--warmup_epochs=0", "--validation_fraction=0.2",
            "--mixed_precision=float32", "--linear_epochs=1",
            "--linear_learning_rates=0.1", "--linear_batch_size=8",
            "--norobustness", "--set=eval.max_examples=8",
            "--set=eval.knn_train_examples=8")


@pytest.mark.slow
def test_mode_all_writes_projector_files_and_embed_writes_a_split(
    tmp_path, capsys, quiet_log):
  del quiet_log
  workdir = tmp_path / "run"
  folder = tmp_path / "pets"
  write_folder(folder)
  with conftest.mock_tfds(tmp_path, num_examples=16, num_train=20):
    run_cli(f"--workdir={workdir}", *TINY_RUN)
    out = capsys.readouterr().out.splitlines()
    log_dir = workdir / "projector"
    assert (f"projector: 8 test embeddings in {log_dir} (tensorboard "
            f"--logdir {log_dir})") in out
    run_cli(f"--workdir={workdir}", "--mode=embed")
    out = capsys.readouterr().out.splitlines()
    run_cli(f"--workdir={workdir}", "--mode=embed",
            f"--dataset=folder:{folder}")
  # The evaluation's projector holds its 8 test embeddings: the first 8
  # of the whole test split that --mode=embed wrote.
  test_dir = workdir / "embeddings" / "test"
  vectors = np.load(test_dir / "embeddings.npy")
  assert vectors.shape == (16, 32) and len(np.load(test_dir / "labels.npy"))
  [embedding] = read_config(log_dir).embeddings
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(log_dir)))
  np.testing.assert_allclose(reader.get_tensor(embedding.tensor_name),
                             vectors[:8], rtol=1e-4, atol=1e-5)
  assert embedding.sprite.image_path
  assert (f"embeddings: 16 test images, 32-d encoder space, in {test_dir}; "
          f"projector: tensorboard --logdir {test_dir / 'projector'}") in out
  # An image folder's test split, labelled by its class folders.
  pets = workdir / "embeddings" / "pets_test"
  np.testing.assert_array_equal(np.load(pets / "labels.npy"), [0, 0, 0, 1, 1])
  assert np.load(pets / "embeddings.npy").shape == (5, 32)
  metadata = (pets / "projector" / "metadata.tsv").read_text().splitlines()
  assert metadata == ["label\tclass"] + ["0\tcat"] * 3 + ["1\tdog"] * 2
  report = json.loads((workdir / "report.json").read_text())
  assert report["embed"]["dataset"] == f"folder:{folder}"
  assert report["evaluation"]["projector"] == {"dir": "projector",
                                               "examples": 8}


def tiny_train():
  return config_lib.TrainConfig(
      method="supcon", batch_size=8, steps=2, steps_per_loop=1,
      checkpoint_every=2,
      data=config_lib.DataConfig(dataset="cifar10", image_size=IMAGE,
                                 validation_fraction=0.2),
      model=config_lib.ModelConfig(width=0.0625, projection_dim=8),
      optimizer=config_lib.OptimizerConfig(name="sgd", learning_rate=0.1,
                                           warmup_epochs=0.0))


def test_embed_needs_only_pretraining(tmp_path, capsys, quiet_log):
  del quiet_log
  workdir = tmp_path / "run"
  empty = tmp_path / "empty"
  with pytest.raises(SystemExit):
    run_cli(f"--workdir={empty}", "--mode=embed")
  assert "no pretraining checkpoint" in capsys.readouterr().err
  assert not empty.exists()
  linear = config_lib.LinearEvalConfig(epochs=1, batch_size=8)
  with conftest.mock_tfds(tmp_path, num_examples=16, num_train=20):
    pipeline.run("pretrain", str(workdir), train=tiny_train(), linear=linear,
                 verbose=False)
    with pytest.raises(SystemExit):
      run_cli(f"--workdir={workdir}", "--mode=embed", "--embed_split=val")
    [error] = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("supcon-tf: error:")]
    assert error.startswith("supcon-tf: error: embed split='val' is not one")
    run_cli(f"--workdir={workdir}", "--mode=embed", "--embed_split=validation")
    report = pipeline.run(
        "embed", str(workdir), train=tiny_train(), linear=linear,
        verbose=False, embed_config=embeddings.EmbedConfig(
            split="train", space="projection", projector_examples=5,
            sprite=False))
  assert not os.path.exists(rundir.linear_eval_dir(str(workdir)))
  validation = workdir / "embeddings" / "validation"
  assert np.load(validation / "embeddings.npy").shape == (16, 32)
  projected = workdir / "embeddings" / "train_projection"
  assert report["embed"]["dir"] == str(projected)
  assert np.load(projected / "embeddings.npy").shape == (16, 8)
  log_dir = str(projected / "projector")
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(log_dir))
  assert reader.get_variable_to_shape_map()[embeddings.TENSOR_NAME] == [5, 8]
  assert not os.path.exists(os.path.join(log_dir, "sprite.png"))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
