"""Label retrieval in an embedding space: Recall@k and mAP@R.

What a user of the embeddings (search, deduplication, similar items) gets:
each query ranks every gallery item by cosine similarity, and an item is
relevant when it shares the query's label.

* Recall@k: share of queries with at least one relevant item among their
  `k` most similar (the metric-learning convention of Oh Song et al. 2016,
  not the share of all relevant items found).
* mAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020): with
  `R` the number of relevant gallery items of a query, the mean over
  queries of `(1/R) * sum_{i <= R} precision@i * relevant_i`; 1 only when
  the `R` nearest items are exactly the relevant ones.

Plain TensorFlow matmul and `top_k`, `chunk_size` queries at a time, so
memory stays `[chunk_size, gallery]` floats.
"""

from typing import Dict, Sequence

import numpy as np
import tensorflow as tf

DEFAULT_RECALL_AT = (1, 5, 10)
DEFAULT_CHUNK_SIZE = 256


def retrieval_metrics(query_features, query_labels, gallery_features,
                      gallery_labels, *,
                      recall_at: Sequence[int] = DEFAULT_RECALL_AT,
                      chunk_size: int = DEFAULT_CHUNK_SIZE
                      ) -> Dict[str, float]:
  """Recall@k and mAP@R of queries against a gallery.

  Similarities are dot products, i.e. cosine similarities for unit rows
  (`supcon_tf.knn.embed` gives those). Ties rank the lower gallery index
  first. Queries with no relevant gallery item are left out of mAP@R and
  Recall@k and counted in `queries_without_match`.

  Args:
    query_features: `[num_queries, dim]` float.
    query_labels: `[num_queries]` int.
    gallery_features: `[num_gallery, dim]` float.
    gallery_labels: `[num_gallery]` int.
    recall_at: the `k` of each Recall@k, each in `[1, num_gallery]`.
    chunk_size: queries per similarity block.

  Returns:
    `{"recall@1": ..., "recall@5": ..., "map@r": ..., "queries": int,
    "gallery": int, "queries_without_match": int}`, the rates in [0, 1].

  Raises:
    ValueError: empty inputs, mismatched shapes, or a `k` outside
      `[1, num_gallery]`.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}.")
  query_features = np.asarray(query_features, np.float32)
  gallery_features = np.asarray(gallery_features, np.float32)
  query_labels = np.asarray(query_labels).astype(np.int64)
  gallery_labels = np.asarray(gallery_labels).astype(np.int64)
  _check(query_features, query_labels, "query")
  _check(gallery_features, gallery_labels, "gallery")
  if query_features.shape[1] != gallery_features.shape[1]:
    raise ValueError(
        f"query and gallery features differ in width: "
        f"{query_features.shape[1]} vs {gallery_features.shape[1]}.")
  num_gallery = len(gallery_labels)
  recall_at = tuple(int(k) for k in recall_at)
  for k in recall_at:
    if not 1 <= k <= num_gallery:
      raise ValueError(f"recall_at k={k} must be in [1, gallery size "
                       f"{num_gallery}].")
  classes, counts = np.unique(gallery_labels, return_counts=True)
  relevant_counts = np.zeros(len(query_labels), np.int64)
  known = np.isin(query_labels, classes)
  relevant_counts[known] = counts[np.searchsorted(classes,
                                                  query_labels[known])]
  gallery = tf.constant(gallery_features)
  gallery_labels_t = tf.constant(gallery_labels)
  hits = np.zeros(len(recall_at))
  average_precision = 0.0
  for start in range(0, len(query_labels), chunk_size):
    stop = start + chunk_size
    r = relevant_counts[start:stop]
    depth = int(max(r.max(), max(recall_at)))
    relevant = _ranked_relevance(
        tf.constant(query_features[start:stop]),
        tf.constant(query_labels[start:stop]), gallery, gallery_labels_t,
        tf.constant(depth)).numpy()
    matched = r > 0
    for i, k in enumerate(recall_at):
      hits[i] += relevant[matched, :k].any(axis=1).sum()
    # precision@i at the relevant ranks i <= R, summed, over R.
    ranks = np.arange(1, depth + 1)
    precision = np.cumsum(relevant, axis=1) / ranks
    within_r = ranks[None, :] <= r[:, None]
    sums = (precision * relevant * within_r).sum(axis=1)
    average_precision += (sums[matched] / r[matched]).sum()
  matched_queries = int((relevant_counts > 0).sum())
  denominator = max(matched_queries, 1)
  result = {f"recall@{k}": float(hits[i] / denominator)
            for i, k in enumerate(recall_at)}
  result.update({
      "map@r": float(average_precision / denominator),
      "queries": int(len(query_labels)),
      "gallery": int(num_gallery),
      "queries_without_match": int(len(query_labels) - matched_queries),
  })
  return result


@tf.function
def _ranked_relevance(queries, labels, gallery, gallery_labels, depth):
  """`[chunk, depth]` bool: is the i-th most similar gallery item relevant."""
  similarities = tf.matmul(queries, gallery, transpose_b=True)
  _, order = tf.math.top_k(similarities, k=depth, sorted=True)
  return tf.equal(tf.gather(gallery_labels, order), labels[:, None])


def _check(features, labels, name):
  if features.ndim != 2 or not len(features):
    raise ValueError(f"{name}_features must be a non-empty [n, dim] array, "
                     f"got shape {features.shape}.")
  if labels.shape != (len(features),):
    raise ValueError(f"{name}_labels must be [{len(features)}] to match "
                     f"{name}_features, got shape {labels.shape}.")
