"""Tests of supcon_tf.retrieval: Recall@k and mAP@R against hand counts."""

import sys

import numpy as np
import pytest

from supcon_tf import retrieval


def reference(queries, query_labels, gallery, gallery_labels, ks):
  """Query by query, straight from the definitions."""
  recall = {k: [] for k in ks}
  average_precision = []
  for q, label in zip(queries, query_labels):
    order = np.argsort(-(gallery @ q), kind="stable")
    relevant = gallery_labels[order] == label
    r = relevant.sum()
    if not r:
      continue
    for k in ks:
      recall[k].append(relevant[:k].any())
    precision = np.cumsum(relevant[:r]) / np.arange(1, r + 1)
    average_precision.append((precision * relevant[:r]).sum() / r)
  out = {f"recall@{k}": np.mean(v) for k, v in recall.items()}
  out["map@r"] = np.mean(average_precision)
  return out


def test_a_hand_counted_ranking():
  # One query [1, 0]; gallery ranked by similarity: a (label 0), b (1),
  # c (0), d (1). R = 2: precision@1 = 1 (relevant), rank 2 not relevant,
  # so AP@R = (1 + 0) / 2.
  gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]],
                     np.float32)
  result = retrieval.retrieval_metrics(
      np.array([[1.0, 0.0]]), [0], gallery, [0, 1, 0, 1], recall_at=(1, 2))
  assert result == {"recall@1": 1.0, "recall@2": 1.0, "map@r": 0.5,
                    "queries": 1, "gallery": 4, "queries_without_match": 0}
  # Label 1: ranks 2 and 4 are relevant, R = 2, AP@R = (0 + 1/2) / 2.
  result = retrieval.retrieval_metrics(
      np.array([[1.0, 0.0]]), [1], gallery, [0, 1, 0, 1], recall_at=(1, 2))
  assert (result["recall@1"], result["recall@2"], result["map@r"]) == (
      0.0, 1.0, 0.25)


def test_perfect_clusters_score_one():
  labels = np.repeat(np.arange(3), 4)
  features = np.eye(3, dtype=np.float32)[labels]
  result = retrieval.retrieval_metrics(features, labels, features, labels)
  assert result["map@r"] == 1.0 and result["recall@10"] == 1.0


@pytest.mark.parametrize("chunk_size", [1, 7, 256])
def test_matches_the_definition_on_random_data(chunk_size):
  rng = np.random.default_rng(0)
  gallery = rng.normal(size=(120, 6)).astype(np.float32)
  gallery_labels = rng.integers(0, 5, size=120)
  queries = rng.normal(size=(30, 6)).astype(np.float32)
  query_labels = rng.integers(0, 5, size=30)
  got = retrieval.retrieval_metrics(queries, query_labels, gallery,
                                    gallery_labels, chunk_size=chunk_size)
  want = reference(queries, query_labels, gallery, gallery_labels, (1, 5, 10))
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)


def test_queries_without_a_match_are_counted_not_scored():
  gallery = np.eye(2, dtype=np.float32)
  result = retrieval.retrieval_metrics(
      gallery, [0, 7], gallery, [0, 1], recall_at=(1,))
  assert result["queries_without_match"] == 1
  assert result["recall@1"] == 1.0 and result["map@r"] == 1.0


@pytest.mark.parametrize("kwargs,match", [
    ({"recall_at": (5,)}, "recall_at k=5"),
    ({"recall_at": (0,)}, "recall_at k=0"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_settings_name_the_value(kwargs, match):
  features = np.eye(3, dtype=np.float32)
  with pytest.raises(ValueError, match=match):
    retrieval.retrieval_metrics(features, [0, 1, 2], features, [0, 1, 2],
                                **kwargs)


def test_bad_shapes_name_the_argument():
  features = np.eye(3, dtype=np.float32)
  with pytest.raises(ValueError, match="gallery_labels must be"):
    retrieval.retrieval_metrics(features, [0, 1, 2], features, [0, 1])
  with pytest.raises(ValueError, match="differ in width"):
    retrieval.retrieval_metrics(features, [0, 1, 2], features[:, :2],
                                [0, 1, 2], recall_at=(1,))
  with pytest.raises(ValueError, match="query_features must be"):
    retrieval.retrieval_metrics(np.zeros((0, 3)), [], features, [0, 1, 2])


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
