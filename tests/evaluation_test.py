"""Tests of supcon_tf.evaluation: a run directory's evaluation."""

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import classifier as classifier_lib
from supcon_tf import config as config_lib
from supcon_tf import data
from supcon_tf import evaluation
from supcon_tf import knn
from supcon_tf import models
from supcon_tf import retrieval
from supcon_tf import robustness as robustness_lib


IMAGE = 8


def mock_cifar10(tmp_path, num_examples=20, num_train=20, num_test=10):
  return conftest.mock_tfds(tmp_path, "cifar10", num_examples, num_train,
                           num_test)


def test_evaluate_workdir_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  conftest.write_scalars(workdir / "pretrain" / "train", [10, 20, 30])
  with open(workdir / "pretrain" / "config.json", "w") as f:
    json.dump({"method": "supcon"}, f)
  encoder = models.resnet(18, width=0.0625, input_shape=(IMAGE, IMAGE, 3))
  classifier = classifier_lib.build_classifier(encoder, 10)
  images = keras.Input((IMAGE, IMAGE, 3))
  # A constant projection ranks the gallery in index order: retrieval there
  # differs from the encoder's, so the test sees which model each space used.
  projection = keras.Model(images, keras.layers.Dense(
      4, kernel_initializer="zeros", bias_initializer="ones")(
          encoder(images)))
  data_config = config_lib.DataConfig(dataset="cifar10", image_size=IMAGE,
                                      validation_fraction=0.25)
  with mock_cifar10(tmp_path):
    result = evaluation.evaluate_workdir(
        str(workdir), encoder=encoder, classifier=classifier,
        data_config=data_config, config=config_lib.EvalConfig(
            max_examples=6, knn_train_examples=12, batch_size=4),
        projection=projection)
    # The same kNN classifier and retrieval, computed from scratch on the
    # same examples.
    train = data.eval_dataset(data_config, "train", batch_size=12).take(1)
    test = data.eval_dataset(data_config, "test", batch_size=6).take(1)
    expected_knn = knn.knn_accuracy(encoder, train, test, k=12,
                                           num_classes=10)
    expected_retrieval = {
        space: retrieval.retrieval_metrics(*knn.embed(model, test),
                                           *knn.embed(model, train))
        for space, model in (("encoder", encoder),
                             ("projection", projection))}
    images, labels = next(iter(test))
    plain = np.mean(np.argmax(classifier.predict(images, verbose=0), 1) ==
                    labels.numpy())

  assert result["knn_top1"] == pytest.approx(expected_knn)
  assert result["knn_k"] == 12 and result["knn_train_examples"] == 12
  assert result["test_examples"] == 6
  assert result["notes"] == []
  assert result["plots"] == ["plots/training_curves.png",
                             "plots/embeddings.png", "plots/robustness.png"]
  for path in result["plots"]:
    conftest.assert_png(os.path.join(workdir, path))
  robustness = result["robustness"]
  assert robustness["num_examples"] == 6
  assert robustness["clean_top1"] == pytest.approx(plain)
  assert set(robustness["top1"]) == set(robustness_lib.CORRUPTIONS)
  with open(workdir / "robustness.json") as f:
    assert json.load(f) == robustness
  assert result["retrieval"] == expected_retrieval
  assert expected_retrieval["encoder"] != expected_retrieval["projection"]
  with open(workdir / "retrieval.json") as f:
    assert json.load(f) == expected_retrieval
  assert json.loads(json.dumps(result)) == result


def test_evaluate_workdir_without_events_or_robustness(tmp_path):
  workdir = tmp_path / "bare"
  encoder = models.resnet(18, width=0.0625, input_shape=(IMAGE, IMAGE, 3))
  data_config = config_lib.DataConfig(dataset="cifar10", image_size=IMAGE,
                                      validation_fraction=0.0)
  with pytest.raises(ValueError, match="classifier"):
    evaluation.evaluate_workdir(str(workdir), encoder=encoder,
                                classifier=None, data_config=data_config)
  with mock_cifar10(tmp_path, num_examples=8, num_train=8, num_test=8):
    result = evaluation.evaluate_workdir(
        str(workdir), encoder=encoder, classifier=None,
        data_config=data_config, config=config_lib.EvalConfig(
            robustness=False, max_examples=5, batch_size=4))
  assert result["knn_k"] == 8 and result["test_examples"] == 5
  assert result["robustness"] is None
  assert result["plots"] == ["plots/embeddings.png"]
  assert len(result["notes"]) == 1 and "training_curves" in result["notes"][0]
  assert not os.path.exists(workdir / "robustness.json")
  # Without a projection, the encoder space only; a gallery of 8 has no
  # recall@10.
  assert list(result["retrieval"]) == ["encoder"]
  assert "recall@10" not in result["retrieval"]["encoder"]
  assert result["retrieval"]["encoder"]["gallery"] == 8
  conftest.assert_png(os.path.join(workdir, "plots", "embeddings.png"))



def test_top1_accuracy_counts_the_top_logit():
  # Logits that pick class (label + shift) % 3: all right at shift 0, none
  # at shift 1; the last batch is smaller.
  labels = np.array([0, 1, 2, 2, 1], np.int32)
  for shift, expected in ((0, 1.0), (1, 0.0)):
    logits = np.eye(3, dtype=np.float32)[(labels + shift) % 3]
    model = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])
    dataset = tf.data.Dataset.from_tensor_slices((logits, labels)).batch(2)
    assert evaluation.top1_accuracy(model, dataset) == expected
  with pytest.raises(ValueError, match="empty"):
    evaluation.top1_accuracy(model, dataset.take(0))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
