"""Tests of supcon_tf.models.backbones: keras.applications / keras-hub."""

import json
import os
import pathlib
import re
import shlex
import sys
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import logging
import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import cli
from supcon_tf import config as config_lib
from supcon_tf import models
from supcon_tf import pipeline
from supcon_tf import rundir
from supcon_tf.models import backbones

README = pathlib.Path(__file__).absolute().parent.parent / "README.md"
SIZE = 32
# A small MobileNetV2 (~0.4M weights) keeps these tests at seconds.
TINY = "keras_applications:MobileNetV2"
TINY_ARGS = {"alpha": 0.35}


def _images(n=4, seed=0):
  """`[n, SIZE, SIZE, 3]` float32 in [0, 1]."""
  rng = np.random.default_rng(seed)
  return rng.uniform(0, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _application(name, seed, calibration=None, **kwargs):
  """`keras.applications.<name>` as build_backbone builds it, seeded.

  With `calibration` (inputs as the model expects them), every batch norm's
  moving statistics become those of that batch: random weights then give
  inference-mode features that vary with the input (with the initial
  statistics they are nearly constant), at the pixel scale of
  `calibration`. Without it, the statistics are random, so that a loaded
  file differs from a fresh draw in them too.
  """
  keras.utils.set_random_seed(seed)
  model = getattr(keras.applications, name)(
      include_top=False, weights=None, pooling="avg",
      input_shape=(SIZE, SIZE, 3), **kwargs)
  norms = [l for l in model.layers
           if isinstance(l, keras.layers.BatchNormalization)]
  rng = np.random.default_rng(seed)
  if calibration is None:
    for layer in norms:
      channels = layer.moving_mean.shape[0]
      layer.moving_mean.assign(rng.normal(0.0, 0.2, channels))
      layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
    return model
  for layer in norms:  # moving = batch statistics.
    layer.momentum, layer.saved_momentum = 0.0, layer.momentum
  model(calibration, training=True)
  for layer in norms:
    layer.momentum = layer.saved_momentum
  return model


def test_builds_and_gives_float32_features():
  encoder = backbones.build_backbone(TINY, input_shape=(SIZE, SIZE, 3),
                                     **TINY_ARGS)
  features = encoder(_images(3), training=False)
  assert features.dtype == tf.float32
  assert features.shape == (3, encoder.output_shape[-1])
  assert encoder.output_shape[-1] > 8
  assert np.all(np.isfinite(features))
  assert ":" not in encoder.name  # TF name scopes refuse it.


def test_build_encoder_dispatches_on_the_name():
  config = config_lib.ModelConfig(
      encoder="keras_applications:MobileNetV3Small")
  encoder = models.build_encoder(config, input_shape=(SIZE, SIZE, 3))
  assert encoder.output_shape == (None, 576)  # keras' MobileNetV3Small.
  assert any(l.name == "backbone_input" for l in encoder.layers)


def test_clones_as_the_momentum_key_encoder_does():
  encoder = backbones.build_backbone(TINY, input_shape=(SIZE, SIZE, 3),
                                     **TINY_ARGS)
  clone = keras.models.clone_model(encoder)  # supcon_tf.memory's key encoder.
  for key, online in zip(clone.weights, encoder.weights):
    key.assign(online)
  images = _images()
  np.testing.assert_allclose(clone(images, training=False),
                             encoder(images, training=False), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("name, preprocess", [
    # Module preprocess_input: [-1, 1] ("tf" mode).
    ("MobileNetV2", keras.applications.mobilenet_v2.preprocess_input),
    # Built-in preprocessing layers fed 0..255.
    ("MobileNetV3Small", lambda pixels: pixels),
])
def test_backbone_sees_the_pixels_its_weights_expect(tmp_path, name,
                                                     preprocess):
  """[0, 1] images reach keras' model as its documented 0..255 input."""
  reference = _application(
      name, seed=1, alpha=0.75,
      calibration=preprocess(_images(16, seed=2) * 255.0))
  path = str(tmp_path / "reference.weights.h5")
  reference.save_weights(path)
  encoder = backbones.build_backbone(
      f"keras_applications:{name}", input_shape=(SIZE, SIZE, 3),
      weights=path, alpha=0.75)
  images = _images()
  expected = np.asarray(reference(preprocess(images * 255.0),
                                  training=False))
  # Features that depend on the image: the comparison can fail.
  assert expected.std(axis=0).mean() > 1e-3 * np.abs(expected).mean()
  np.testing.assert_allclose(encoder(images, training=False), expected,
                             rtol=1e-4, atol=1e-5)


def test_loads_weights_saved_locally(tmp_path):
  reference = _application("MobileNetV2", seed=2, **TINY_ARGS)
  path = str(tmp_path / "mobilenet_v2.weights.h5")
  reference.save_weights(path)
  keras.utils.set_random_seed(3)
  fresh = backbones.build_backbone(TINY, input_shape=(SIZE, SIZE, 3),
                                   **TINY_ARGS)
  loaded = backbones.build_backbone(TINY, input_shape=(SIZE, SIZE, 3),
                                    weights=path, **TINY_ARGS)
  [backbone] = [l for l in loaded.layers if isinstance(l, keras.Model)]
  assert len(backbone.weights) == len(reference.weights)
  for got, want in zip(backbone.weights, reference.weights):
    np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=got.path)
  # Without the file the weights are another random draw: the test could
  # not pass by chance.
  assert any(not np.array_equal(got.numpy(), want.numpy())
             for got, want in zip(fresh.weights, reference.weights))


def test_a_missing_weights_file_is_one_clear_line(tmp_path):
  missing = str(tmp_path / "missing.weights.h5")
  with pytest.raises(ValueError, match=r"encoder_weights=.*missing\.weights"
                     r"\.h5' does not exist"):
    backbones.build_backbone(TINY, input_shape=(SIZE, SIZE, 3),
                             weights=missing, **TINY_ARGS)


def test_weights_of_another_architecture_are_refused(tmp_path):
  path = str(tmp_path / "wide.weights.h5")
  _application("MobileNetV2", seed=0, alpha=1.0).save_weights(path)
  with pytest.raises(ValueError, match="does not fit keras_applications:"
                     "MobileNetV2"):
    backbones.build_backbone(TINY, input_shape=(SIZE, SIZE, 3),
                             weights=path, **TINY_ARGS)


def test_unknown_application_names_valid_ones():
  with pytest.raises(ValueError, match=r"no model 'MobileNetV4'.*"
                     r"MobileNetV[23]") as info:
    backbones.build_backbone("keras_applications:MobileNetV4")
  assert "\n" not in str(info.value)


def test_too_small_input_names_the_minimum():
  with pytest.raises(ValueError, match=r"InceptionV3 needs images of at "
                     r"least 75x75, got 32x32; set DataConfig.image_size "
                     r">= 75"):
    backbones.build_backbone("keras_applications:InceptionV3",
                             input_shape=(SIZE, SIZE, 3))


def test_keras_hub_missing_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "keras_hub", None)  # Import fails.
  with pytest.raises(ValueError, match="pip install keras-hub"):
    backbones.build_backbone("keras_hub:resnet_18_imagenet")


def _hub_architecture(image_shape):
  """A small conv net standing in for a keras-hub image backbone."""
  images = keras.Input(image_shape)
  return keras.Model(images, keras.layers.Conv2D(6, 3, strides=2)(images))


def test_keras_hub_wiring_with_a_stand_in_module(tmp_path, monkeypatch):
  """Preset dir weights, converter scale/offset and pooling, on a stand-in
  for keras-hub's `Backbone.from_preset` / `ImageConverter.from_preset`
  (keras-hub itself is an optional dependency)."""
  calls = []

  def backbone_from_preset(preset, load_weights=True, **kwargs):
    calls.append((preset, load_weights, kwargs))
    return _hub_architecture(kwargs["image_shape"])

  def converter_from_preset(preset):
    del preset
    return types.SimpleNamespace(scale=np.array([1 / 127.5] * 3), offset=-1.0)

  monkeypatch.setitem(sys.modules, "keras_hub", types.SimpleNamespace(
      models=types.SimpleNamespace(Backbone=types.SimpleNamespace(
          from_preset=backbone_from_preset)),
      layers=types.SimpleNamespace(ImageConverter=types.SimpleNamespace(
          from_preset=converter_from_preset))))
  preset = tmp_path / "preset"
  preset.mkdir()
  keras.utils.set_random_seed(5)
  reference = _hub_architecture((SIZE, SIZE, 3))
  reference.save_weights(str(preset / backbones.KERAS_HUB_WEIGHTS_FILE))
  encoder = backbones.build_backbone(f"keras_hub:{preset}",
                                     input_shape=(SIZE, SIZE, 3),
                                     weights=str(preset))
  assert calls == [(str(preset), False, {"image_shape": (SIZE, SIZE, 3)})]
  images = _images()
  expected = np.mean(reference(images * 2.0 - 1.0), axis=(1, 2))
  np.testing.assert_allclose(encoder(images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoder", ["keras_apps:ResNet50",
                                     "keras_applications:", "keras_hub:"])
def test_config_refuses_malformed_names(encoder):
  with pytest.raises(ValueError, match="keras_applications:<Name>"):
    config_lib.ModelConfig(encoder=encoder)


def test_mixed_precision_computes_in_bfloat16_and_returns_float32():
  with conftest.global_policy("mixed_bfloat16"):
    encoder = backbones.build_backbone(TINY, input_shape=(SIZE, SIZE, 3),
                                       **TINY_ARGS)
  [backbone] = [l for l in encoder.layers if isinstance(l, keras.Model)]
  convs = [l for l in backbone.layers if isinstance(l, keras.layers.Conv2D)]
  assert {l.compute_dtype for l in convs} == {"bfloat16"}
  assert encoder.get_layer("backbone_input").compute_dtype == "float32"
  features = encoder(_images(), training=True)
  assert features.dtype == tf.float32
  assert np.all(np.isfinite(features))


@pytest.mark.slow
def test_batch_norm_is_synchronised_under_a_mirrored_strategy():
  strategy = conftest.make_mirrored(2)
  config = config_lib.ModelConfig(encoder=TINY)
  with strategy.scope():
    encoder = models.build_encoder(
        config, input_shape=(SIZE, SIZE, 3),
        num_replicas=strategy.num_replicas_in_sync)
  [backbone] = [l for l in encoder.layers if isinstance(l, keras.Model)]
  norms = [l for l in backbone.layers
           if isinstance(l, keras.layers.BatchNormalization)]
  assert norms and all(l.synchronized for l in norms)

  @tf.function
  def replica0_features(first, second):
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: (first, second)[context.replica_id_in_sync_group])
    features = strategy.run(lambda x: encoder(x, training=True),
                            args=(per_replica,))
    return strategy.experimental_local_results(features)[0]

  a, b = tf.constant(_images(4, seed=0)), tf.constant(_images(4, seed=1))
  # Batch statistics span both replicas: replica 0 sees replica 1's images.
  assert not np.allclose(replica0_features(a, b), replica0_features(a, a))


# Loads the export in a fresh interpreter: argv = model dir, images .npy,
# output .npz.
FRESH_PROCESS_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
served = tf.saved_model.load(sys.argv[1])
images = tf.constant(np.load(sys.argv[2]))
out = served.signatures["serving_default"](images=images)
embedding = served.signatures["embed"](images=images)["embedding"]
np.savez(sys.argv[3], logits=out["logits"].numpy(),
         embedding=embedding.numpy())
"""


def _run_cli(argv, monkeypatch):
  monkeypatch.setattr(logging.get_absl_handler(), "use_absl_log_file",
                      lambda *args, **kwargs: None)
  cli.FLAGS(["supcon-tf", *argv])
  try:
    cli.main(["supcon-tf"])
  finally:
    cli.FLAGS.unparse_flags()


def _tiny_run_flags(workdir):
  return [f"--workdir={workdir}", "--encoder=keras_applications:"
          "MobileNetV3Small", "--batch_size=8", "--steps=2",
          "--steps_per_loop=1", "--checkpoint_every=2",
          "--mixed_precision=float32", "--validation_fraction=0.2",
          "--projection_dim=8", "--linear_epochs=1",
          "--linear_learning_rates=0.1", "--linear_batch_size=8",
          "--norobustness", "--set=eval.max_examples=8",
          "--set=eval.knn_train_examples=8"]


@pytest.mark.slow
def test_command_line_trains_exports_and_serves(tmp_path, monkeypatch,
                                                capsys):
  """--encoder=keras_applications:... --encoder_weights=..., end to end."""
  weights = str(tmp_path / "mnv3s.weights.h5")
  _application("MobileNetV3Small", seed=4).save_weights(weights)
  workdir = tmp_path / "run"
  with conftest.mock_tfds(tmp_path, num_examples=16, num_train=20):
    _run_cli(_tiny_run_flags(workdir) + [f"--encoder_weights={weights}"],
             monkeypatch)
    classifier = pipeline.load_classifier(str(workdir))
  capsys.readouterr()
  report = json.loads((workdir / rundir.REPORT_FILE).read_text())
  assert report["pretrain"]["steps"] == 2
  stored = rundir.load_config(rundir.pretrain_dir(str(workdir)))
  assert stored.model.encoder_weights == weights
  # The SavedModel serves raw uint8 images in a fresh process, as the
  # saved classifier (with its backbone) computes them here.
  uint8 = np.round(_images(5, seed=6) * 255).astype(np.uint8)
  np.save(tmp_path / "images.npy", uint8)
  result = conftest.python(
      "-c", FRESH_PROCESS_SCRIPT, report["export"],
      str(tmp_path / "images.npy"), str(tmp_path / "served.npz"),
      timeout=240, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(tmp_path / "served.npz") as served:
    expected = classifier(uint8.astype(np.float32) / 255.0, training=False)
    np.testing.assert_allclose(served["logits"], expected, rtol=1e-4,
                               atol=1e-5)
    assert served["embedding"].shape == (5, 576)
    np.testing.assert_allclose(
        np.linalg.norm(served["embedding"], axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("flag, message", [
    ("--encoder_weights={tmp}/none.weights.h5", "none.weights.h5' does not "
     "exist"),
    ("--encoder=keras_applications:ResNet5", "no model 'ResNet5'.*ResNet50"),
])
def test_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys,
                                          flag, message):
  workdir = tmp_path / "run"
  argv = _tiny_run_flags(workdir) + [flag.format(tmp=tmp_path)]
  with conftest.mock_tfds(tmp_path, num_examples=16, num_train=20):
    with pytest.raises(SystemExit) as info:
      _run_cli(argv, monkeypatch)
  assert info.value.code == 1
  err = capsys.readouterr().err
  # In-process, absl may also print the logged traceback to stderr; the
  # console command logs it to its file.
  [line] = [l for l in err.splitlines() if l.startswith("supcon-tf: error")]
  assert re.search(message, line), err[-3000:]
  # Nothing the next, corrected command would trip over.
  assert not os.path.exists(rundir.config_path(rundir.pretrain_dir(
      str(workdir))))


def _readme_command():
  """The argv of the README's "Other backbones" command, `supcon-tf` first."""
  text = README.read_text().split("## Other backbones", 1)[1]
  block = re.search(r"^```sh\n(.*?)^```", text, re.S | re.M).group(1)
  return shlex.split(block.replace("\\\n", " "))


def test_readme_command_names_a_backbone():
  argv = _readme_command()
  assert argv[0] == "supcon-tf"
  assert any(a.startswith("--encoder=keras_applications:") for a in argv)


@pytest.mark.slow
def test_readme_command_runs_on_the_repository_data(tmp_path):
  """The README's command as written (its work dir moved to tmp_path)."""
  data_dir = os.environ.get("TFDS_DATA_DIR", "")
  if not os.path.isdir(os.path.join(data_dir, "cifar10")):
    pytest.skip("needs TFDS_DATA_DIR with the prepared CIFAR-10")
  argv = [f"--workdir={tmp_path / 'run'}" if a.startswith("--workdir=")
          else a for a in _readme_command()[1:]]
  result = conftest.python("-m", "supcon_tf", *argv, timeout=1200,
                           cwd=conftest.ROOT,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "run" / rundir.REPORT_FILE).read_text())
  assert report["pretrain"]["steps"] == 4
  assert os.path.isdir(report["export"])


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
