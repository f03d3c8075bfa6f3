"""Tests for supcon_tf.export: the served SavedModel matches the Keras model.

The central check loads the export in a fresh Python process in which Keras
and `supcon_tf` cannot even be imported, calls every signature there and
compares the results with the in-memory model. That process and the two
`saved_model_cli` runs start together once per module, because each pays
~5 s of TensorFlow import.
"""

import ast
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import config
from supcon_tf import data
from supcon_tf import export
from supcon_tf import models

SIZE = 16
CLASS_NAMES = ("cat", "dog", "ship")
SIGNATURES = ["serving_default", "serving_bytes", "embed"]
CLASSIFY_OUTPUTS = {"logits", "probabilities", "class_ids"}
TRAINING_MODULES = ("train_lib", "keras_model", "linear_eval", "losses")

# Runs in a fresh interpreter: argv = model dir, inputs dir, output .npz.
FRESH_PROCESS_SCRIPT = r"""
import json
import os
import sys

# A None entry makes `import keras` fail: the SavedModel must not need it.
for name in ("keras", "tf_keras", "supcon_tf"):
  sys.modules[name] = None

import numpy as np
import tensorflow as tf

model_dir, inputs_dir, out_path = sys.argv[1:4]
loaded = tf.saved_model.load(model_dir)
signatures = loaded.signatures
images = np.load(os.path.join(inputs_dir, "images.npy"))
results = {"signature_names": np.array(list(signatures))}

def record(prefix, outputs):
  for key, value in outputs.items():
    value = value.numpy()
    results[prefix + "." + key] = (
        value.astype(bytes) if value.dtype == object else value)

record("uint8", signatures["serving_default"](images=images))
record("embed", signatures["embed"](images=images))
with open(os.path.join(inputs_dir, "bytes.json")) as f:
  groups = json.load(f)
for group, files in groups.items():
  data = []
  for path in files:
    with open(path, "rb") as f:
      data.append(f.read())
  record(group, signatures["serving_bytes"](image_bytes=tf.constant(data)))

leaked = sorted(name for name, module in list(sys.modules.items())
                if module is not None and
                name.split(".")[0] in ("keras", "tf_keras", "supcon_tf"))
assert not leaked, leaked
assert sys.modules["keras"] is None and sys.modules["supcon_tf"] is None
np.savez(out_path, **results)
"""


def _saved_model_cli():
  path = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  return path if os.path.exists(path) else shutil.which("saved_model_cli")


def _smooth_images(rng, batch, height, width, channels=3):
  """Low-frequency images (JPEG keeps them well), with a black and a white
  pixel so the whole uint8 range is used. Returns uint8 `[b, h, w, c]`."""
  y, x = np.mgrid[0:height, 0:width]
  images = np.empty((batch, height, width, channels), np.float64)
  for b in range(batch):
    for c in range(channels):
      fy, fx = rng.uniform(0.02, 0.12, size=2)
      phase = rng.uniform(0, 2 * np.pi)
      images[b, :, :, c] = 0.5 + 0.45 * np.sin(
          2 * np.pi * (fy * y + fx * x) + phase)
  images = np.round(images * 255).astype(np.uint8)
  images[:, 0, 0, :] = 0
  images[:, -1, -1, :] = 255
  return images


def _perturb_batch_norm(model, rng):
  """Random gamma/beta and moving statistics, so inference-mode BN matters."""
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      channels = layer.gamma.shape[0]
      layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
      layer.beta.assign(rng.normal(0.0, 0.1, channels))
      layer.moving_mean.assign(rng.normal(0.0, 0.2, channels))
      layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))


def _resnet_classifier(seed=0):
  keras.utils.set_random_seed(seed)
  encoder = models.resnet(18, width=0.0625, input_shape=(SIZE, SIZE, 3))
  _perturb_batch_norm(encoder, np.random.default_rng(seed))
  classifier = keras.Sequential(
      [encoder, keras.layers.Dense(len(CLASS_NAMES))])
  classifier.build((None, SIZE, SIZE, 3))
  return classifier, encoder


def _small_classifier():
  """A cheap model for the tests about files rather than numbers."""
  return keras.Sequential([
      keras.Input((SIZE, SIZE, 3)),
      keras.layers.GlobalAveragePooling2D(),
      keras.layers.Dense(len(CLASS_NAMES)),
  ])


def _logits(model, images):
  """In-memory reference: uint8 `[b, S, S, 3]` -> float32 `[b, classes]`."""
  return keras.ops.convert_to_numpy(
      model(images.astype(np.float32) / 255.0, training=False))


def _resized(image):
  """What `serving_bytes` makes of a decoded uint8 image `[h, w, c]`."""
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  image = tf.image.resize(image, [SIZE, SIZE], method="bilinear",
                          antialias=True)
  return np.clip(np.round(image.numpy()), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """The ResNet classifier exported with an encoder and class names, plus
  the in-memory models and the inputs fed to the export."""
  root = tmp_path_factory.mktemp("export")
  classifier, encoder = _resnet_classifier()
  path = export.export_classifier(
      classifier, str(root / "base"), image_size=SIZE, encoder=encoder,
      class_names=CLASS_NAMES)

  rng = np.random.default_rng(1)
  images = _smooth_images(rng, 4, SIZE, SIZE)
  inputs = root / "inputs"
  inputs.mkdir()
  np.save(inputs / "images.npy", images)
  extra = [_smooth_images(rng, 1, 24, 20)[0],  # downscaled
           _smooth_images(rng, 1, SIZE, SIZE, channels=1)[0],  # grayscale
           _smooth_images(rng, 1, 10, 12)[0]]  # upscaled
  encoded = {
      "png": [tf.io.encode_png(image).numpy() for image in images],
      "jpeg": [tf.io.encode_jpeg(image, quality=95,
                                 chroma_downsampling=False).numpy()
               for image in images],
      "mixed": [tf.io.encode_png(image).numpy() for image in extra],
  }
  files = {}
  for group, blobs in encoded.items():
    files[group] = []
    for i, blob in enumerate(blobs):
      file = inputs / f"{group}_{i}"
      file.write_bytes(blob)
      files[group].append(str(file))
  (inputs / "bytes.json").write_text(json.dumps(files))
  return dict(root=root, path=path, classifier=classifier, encoder=encoder,
              images=images, inputs=inputs, encoded=encoded, extra=extra)


@pytest.fixture(scope="module")
def outside(exported):
  """Results of the fresh process, `saved_model_cli show` and `run`.

  Takes ~10 s, over 20 s on a busy machine: tests reading it are slow.
  """
  root, path, inputs = exported["root"], exported["path"], exported["inputs"]
  cli = _saved_model_cli()
  assert cli, "saved_model_cli is not installed next to the interpreter"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  commands = {
      "fresh": [sys.executable, "-c", FRESH_PROCESS_SCRIPT, path,
                str(inputs), str(root / "fresh.npz")],
      "show": [cli, "show", "--all", "--dir", path],
      "run": [cli, "run", "--dir", path, "--tag_set", "serve",
              "--signature_def", "serving_default",
              "--inputs", f"images={inputs / 'images.npy'}",
              "--outdir", str(root / "cli_out")],
  }
  processes = {
      name: subprocess.Popen(command, cwd=root, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
      for name, command in commands.items()}
  done = {}
  for name, process in processes.items():
    stdout, stderr = process.communicate(timeout=240)
    done[name] = (process.returncode, stdout, stderr)
  fresh_rc, _, fresh_err = done["fresh"]
  assert fresh_rc == 0, fresh_err[-3000:]
  with np.load(root / "fresh.npz") as data:
    fresh = {key: data[key] for key in data.files}
  return dict(fresh=fresh, show=done["show"], run=done["run"],
              cli_out=root / "cli_out")


@pytest.fixture(scope="module")
def loaded(exported):
  return tf.saved_model.load(exported["path"])


def test_export_imports_no_training_code():
  with open(export.__file__) as f:
    tree = ast.parse(f.read())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      imported.add(node.module or "")
      imported.update(f"{node.module}.{alias.name}" for alias in node.names)
  # Only the image preparation it shares with evaluation.
  allowed = {"supcon_tf", "supcon_tf.augment"}
  bad = {name for name in imported
         if (name.startswith("supcon_tf") and name not in allowed) or
         name.split(".")[-1] in TRAINING_MODULES}
  assert not bad


@pytest.mark.parametrize("crop", ["center", "resize"])
def test_serving_bytes_sees_the_pixels_of_evaluation(tmp_path, crop):
  """`serving_bytes` and `data.eval_dataset` feed the model equal floats."""
  rng = np.random.default_rng(3)
  shapes = [(40, 30), (30, 50), (SIZE, SIZE), (17, 23), (64, 64)]
  files = []
  for split in ("train", "test"):
    for i, (height, width) in enumerate(shapes):
      path = tmp_path / "images" / split / "only" / f"{i}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(tf.io.encode_png(
          _smooth_images(rng, 1, height, width)[0]).numpy())
      if split == "test":
        files.append(path)
  cfg = config.DataConfig(dataset=f"folder:{tmp_path / 'images'}",
                          image_size=SIZE, eval_crop=crop,
                          validation_fraction=0.0)
  assert cfg.resolved_eval_crop == crop
  images, _ = next(iter(data.eval_dataset(cfg, "test", batch_size=10)))
  assert images.shape == (len(shapes), SIZE, SIZE, 3)
  # Logits = the model's input pixels.
  pixels = keras.Sequential([keras.Input((SIZE, SIZE, 3)),
                             keras.layers.Flatten()])
  path = export.export_classifier(pixels, str(tmp_path / "base"),
                                  image_size=SIZE, eval_crop=crop)
  served = tf.saved_model.load(path).signatures["serving_bytes"](
      image_bytes=tf.constant([f.read_bytes() for f in files]))["logits"]
  np.testing.assert_array_equal(
      served.numpy(), images.numpy().reshape(len(shapes), -1))


def test_version_layout(exported):
  base = exported["root"] / "base"
  assert exported["path"] == str(base / "1")
  assert sorted(os.listdir(base)) == ["1"]
  assert export.latest_version(str(base)) == str(base / "1")


@pytest.mark.slow
def test_fresh_process_sees_signatures_in_order(outside):
  assert outside["fresh"]["signature_names"].tolist() == SIGNATURES


@pytest.mark.slow
def test_uint8_images_match_keras_model(exported, outside):
  fresh = outside["fresh"]
  expected = _logits(exported["classifier"], exported["images"])
  np.testing.assert_allclose(fresh["uint8.logits"], expected,
                             rtol=1e-5, atol=1e-5)
  probabilities = fresh["uint8.probabilities"]
  np.testing.assert_allclose(probabilities, tf.nn.softmax(expected).numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-6)
  assert fresh["uint8.class_ids"].dtype == np.int64
  np.testing.assert_array_equal(fresh["uint8.class_ids"],
                                expected.argmax(-1))
  np.testing.assert_array_equal(
      fresh["uint8.class_names"],
      [CLASS_NAMES[i].encode() for i in expected.argmax(-1)])
  # The random model must not be constant, or the comparisons prove little.
  assert np.ptp(expected, axis=0).min() > 1e-3


@pytest.mark.slow
def test_png_bytes_equal_uint8_path(outside):
  fresh = outside["fresh"]
  for key in CLASSIFY_OUTPUTS | {"class_names"}:
    np.testing.assert_array_equal(fresh[f"png.{key}"], fresh[f"uint8.{key}"])


@pytest.mark.slow
def test_jpeg_bytes_match_decoded_pixels(exported, outside):
  fresh = outside["fresh"]
  decoded = np.stack([tf.io.decode_jpeg(blob, channels=3).numpy()
                      for blob in exported["encoded"]["jpeg"]])
  assert not np.array_equal(decoded, exported["images"])  # Really lossy.
  np.testing.assert_allclose(
      fresh["jpeg.logits"], _logits(exported["classifier"], decoded),
      rtol=1e-5, atol=1e-5)
  # Close to the lossless result, relative to the logits' scale.
  scale = np.abs(fresh["uint8.logits"]).max()
  error = np.abs(fresh["jpeg.logits"] - fresh["uint8.logits"]).max()
  assert error < 0.05 * scale


@pytest.mark.slow
def test_bytes_of_other_sizes_and_grayscale(exported, outside):
  fresh = outside["fresh"]
  images = np.stack([_resized(image) for image in exported["extra"]])
  expected = _logits(exported["classifier"], images)
  np.testing.assert_allclose(fresh["mixed.logits"], expected,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(fresh["mixed.class_ids"], expected.argmax(-1))


@pytest.mark.slow
def test_embed_is_normalised_encoder_output(exported, outside):
  embedding = outside["fresh"]["embed.embedding"]
  representation = _logits(exported["encoder"], exported["images"])
  np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0,
                             atol=1e-5)
  np.testing.assert_allclose(
      embedding,
      representation / np.linalg.norm(representation, axis=-1, keepdims=True),
      rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_saved_model_cli_show_lists_signatures(outside):
  rc, stdout, stderr = outside["show"]
  assert rc == 0, stderr[-3000:]
  for name in SIGNATURES:
    assert f"signature_def['{name}']" in stdout
  assert "dtype: DT_UINT8" in stdout and "shape: (-1, 16, 16, 3)" in stdout
  assert "inputs['image_bytes']" in stdout
  # The in-graph shape check that protects servers feeding the graph.
  assert "'EnsureShape'" in stdout


@pytest.mark.slow
def test_saved_model_cli_run_matches_keras_model(exported, outside):
  rc, _, stderr = outside["run"]
  assert rc == 0, stderr[-3000:]
  # saved_model_cli restores through the graph-mode loader, as TF Serving.
  logits = np.load(outside["cli_out"] / "logits.npy")
  np.testing.assert_allclose(
      logits, _logits(exported["classifier"], exported["images"]),
      rtol=1e-5, atol=1e-5)


def test_wrong_dtype_tensor_is_rejected(loaded):
  with pytest.raises(tf.errors.InvalidArgumentError, match="uint8"):
    loaded.signatures["serving_default"](
        images=tf.zeros([1, SIZE, SIZE, 3], tf.float32))
  with pytest.raises(tf.errors.InvalidArgumentError, match="uint8"):
    loaded.signatures["embed"](images=tf.zeros([1, SIZE, SIZE, 3], tf.int32))


def test_numpy_float_images_are_cast_before_the_graph(loaded):
  # TF's Python binding casts NumPy arrays to the signature's dtype, as the
  # module docstring warns; the graph never sees the floats.
  serve = loaded.signatures["serving_default"]
  floats = np.full([1, SIZE, SIZE, 3], 0.7, np.float32)
  np.testing.assert_array_equal(
      serve(images=floats)["logits"].numpy(),
      serve(images=np.zeros([1, SIZE, SIZE, 3], np.uint8))["logits"].numpy())


@pytest.mark.parametrize("shape", [
    (SIZE, SIZE, 3),  # No batch axis.
    (1, 8, 8, 3),  # Wrong image size.
    (1, SIZE, SIZE, 1),  # Wrong channel count.
])
def test_wrong_shape_is_rejected(loaded, shape):
  for name in ("serving_default", "embed"):
    # NumPy input is checked against the TensorSpec by TF's Python binding;
    # a tensor goes straight to the graph, where EnsureShape stops it.
    with pytest.raises(TypeError, match="Can not cast"):
      loaded.signatures[name](images=np.zeros(shape, np.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"Shape of tensor images \S+ is not compatible"):
      loaded.signatures[name](images=tf.zeros(shape, tf.uint8))


def test_wrong_bytes_rank_is_rejected(loaded):
  with pytest.raises(TypeError, match="Can not cast"):
    loaded.signatures["serving_bytes"](image_bytes=np.array([[b"x"]]))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"Shape of tensor image_bytes \S+ is not compat"):
    loaded.signatures["serving_bytes"](image_bytes=tf.constant([[b"x"]]))


def test_undecodable_bytes_raise(loaded, exported):
  good = exported["encoded"]["png"][0]
  for bad in (b"not an image", good[:20]):
    with pytest.raises(tf.errors.InvalidArgumentError):
      loaded.signatures["serving_bytes"](image_bytes=tf.constant([good, bad]))


def test_empty_batch_gives_empty_outputs(loaded):
  empty = np.zeros([0, SIZE, SIZE, 3], np.uint8)
  for outputs in (
      loaded.signatures["serving_default"](images=empty),
      loaded.signatures["serving_bytes"](
          image_bytes=tf.constant([], tf.string))):
    assert outputs["logits"].shape == (0, len(CLASS_NAMES))
    assert outputs["class_names"].shape == (0,)
  embedding = loaded.signatures["embed"](images=empty)["embedding"]
  assert embedding.shape[0] == 0 and embedding.shape[1] > 0


def test_versions_increment_without_optional_parts(tmp_path):
  base = str(tmp_path / "base")
  assert export.latest_version(base) is None
  classifier = _small_classifier()
  first = export.export_classifier(classifier, base, image_size=SIZE)
  second = export.export_classifier(classifier, base, image_size=SIZE)
  assert (first, second) == (os.path.join(base, "1"), os.path.join(base, "2"))
  assert export.latest_version(base) == second
  loaded = tf.saved_model.load(second)
  assert list(loaded.signatures) == ["serving_default", "serving_bytes"]
  outputs = loaded.signatures["serving_default"](
      images=np.zeros([2, SIZE, SIZE, 3], np.uint8))
  assert set(outputs) == CLASSIFY_OUTPUTS


def test_leftover_of_crashed_export_is_ignored(tmp_path):
  base = tmp_path / "base"
  classifier = _small_classifier()
  export.export_classifier(classifier, str(base), image_size=SIZE)
  # A crash after writing everything but before the rename, from another
  # process; plus a file and a folder whose names are not versions.
  leftover = base / ".tmp-2-999999"
  shutil.copytree(base / "1", leftover)
  (base / "7").write_text("not a directory")
  (base / "abc").mkdir()
  assert export.latest_version(str(base)) == str(base / "1")
  path = export.export_classifier(classifier, str(base), image_size=SIZE)
  assert path == str(base / "2")
  assert export.latest_version(str(base)) == path
  assert leftover.is_dir()  # Only its owner may remove it.


def test_existing_version_is_never_overwritten(tmp_path):
  base = tmp_path / "base"
  classifier = _small_classifier()
  path = export.export_classifier(classifier, str(base), image_size=SIZE,
                                  version=5)
  assert path == str(base / "5")
  before = (base / "5" / "saved_model.pb").read_bytes()
  with pytest.raises(ValueError, match="already exists"):
    export.export_classifier(classifier, str(base), image_size=SIZE,
                             version=5, class_names=CLASS_NAMES)
  assert (base / "5" / "saved_model.pb").read_bytes() == before
  assert sorted(os.listdir(base)) == ["5"]
  assert export.export_classifier(classifier, str(base),
                                  image_size=SIZE) == str(base / "6")


@pytest.mark.parametrize("kwargs,message", [
    (dict(version=0), "version"),
    (dict(version=True), "version"),
    (dict(version="3"), "version"),
    (dict(image_size=0), "image_size"),
    (dict(image_size=32), "built for 16x16"),
    (dict(class_names=["a", "b"]), "2 class_names"),
    (dict(class_names="abc"), "single string"),
    (dict(eval_crop="auto"), "eval_crop"),
])
def test_invalid_arguments_raise_before_writing(tmp_path, kwargs, message):
  base = tmp_path / "base"
  kwargs = {"image_size": SIZE, **kwargs}
  with pytest.raises(ValueError, match=message):
    export.export_classifier(_small_classifier(), str(base), **kwargs)
  assert not base.exists() or not os.listdir(base)


def test_non_rank2_output_raises(tmp_path):
  not_pooled = keras.Sequential([keras.Input((SIZE, SIZE, 3)),
                                 keras.layers.Dense(3)])
  with pytest.raises(ValueError, match="rank-2"):
    export.export_classifier(not_pooled, str(tmp_path), image_size=SIZE)


@pytest.mark.parametrize("written", ["partial", "complete"])
def test_crash_during_write_keeps_previous_version(tmp_path, monkeypatch,
                                                   written):
  base = tmp_path / "base"
  classifier = _small_classifier()
  export.export_classifier(classifier, str(base), image_size=SIZE)
  images = _smooth_images(np.random.default_rng(2), 2, SIZE, SIZE)
  before = tf.saved_model.load(str(base / "1")).signatures[
      "serving_default"](images=images)["logits"].numpy()

  real_write = export._write_saved_model  # pylint: disable=protected-access

  def crashing_write(module, path, signatures):
    if written == "partial":
      os.makedirs(path)
      with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(b"\x08")
    else:
      real_write(module, path, signatures)
    raise OSError("disk full")

  monkeypatch.setattr(export, "_write_saved_model", crashing_write)
  with pytest.raises(OSError, match="disk full"):
    export.export_classifier(classifier, str(base), image_size=SIZE)
  assert sorted(os.listdir(base)) == ["1"]  # No version, no leftover.
  assert export.latest_version(str(base)) == str(base / "1")
  after = tf.saved_model.load(str(base / "1")).signatures[
      "serving_default"](images=images)["logits"].numpy()
  np.testing.assert_array_equal(after, before)

  monkeypatch.setattr(export, "_write_saved_model", real_write)
  assert export.export_classifier(classifier, str(base),
                                  image_size=SIZE) == str(base / "2")



@pytest.mark.parametrize("failure", ["enospc", "file_size_limit"])
def test_full_disk_is_one_line_and_keeps_previous_version(tmp_path,
                                                          monkeypatch,
                                                          failure):
  base = tmp_path / "base"
  classifier = _small_classifier()
  first = export.export_classifier(classifier, str(base), image_size=SIZE)
  images = _smooth_images(np.random.default_rng(2), 2, SIZE, SIZE)
  before = tf.saved_model.load(first).signatures["serving_default"](
      images=images)["logits"].numpy()
  real_write = export._write_saved_model  # pylint: disable=protected-access
  if failure == "enospc":
    def full_write(module, path, signatures):
      del module, signatures
      os.makedirs(path)
      with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(b"\x08\x01")  # Half a file, then the disk is full.
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(export, "_write_saved_model", full_write)
    limit = contextlib.nullcontext()
  else:
    # The real writer (TensorFlow's C++ file system) failing mid-file.
    limit = conftest.file_size_limit(
        max(os.path.getsize(p) for p in tf.io.gfile.glob(
            os.path.join(first, "**", "*")) if os.path.isfile(p)) // 2)
  with limit, pytest.raises(OSError) as error:
    export.export_classifier(classifier, str(base), image_size=SIZE)
  message = str(error.value)
  assert "\n" not in message and str(base) in message, message
  assert f"nothing was published and {first} is unchanged" in message
  if failure == "enospc":
    assert "No space left on device" in message
  assert sorted(os.listdir(base)) == ["1"]  # No version, no leftover.
  after = tf.saved_model.load(first).signatures["serving_default"](
      images=images)["logits"].numpy()
  np.testing.assert_array_equal(after, before)
  monkeypatch.setattr(export, "_write_saved_model", real_write)
  assert export.export_classifier(classifier, str(base),
                                  image_size=SIZE) == str(base / "2")

if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
