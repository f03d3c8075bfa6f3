"""Cross-replica collectives and strategy construction.

The only module that talks to other replicas. Everything here is a no-op
outside a multi-replica `tf.distribute` context, so callers need no branches.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import tensorflow as tf


def num_replicas() -> int:
  """Replicas in sync for the current context (1 outside any strategy)."""
  return tf.distribute.get_strategy().num_replicas_in_sync


def _replica_context():
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return None
  return ctx


def all_gather(x: tf.Tensor) -> tf.Tensor:
  """Concatenates `x` from every replica along axis 0, in replica order.

  Differentiable: the gradient reaching replica r's copy of `x` is the sum,
  over all replicas, of the gradients flowing into rows of replica r. Summed
  per-replica gradients therefore equal the gradient of the same loss on one
  device with the global batch. `bfloat16` cannot be gathered, so floating
  inputs are gathered as float32.

  Args:
    x: `[local_batch, ...]`.

  Returns:
    `[global_batch, ...]`; `x` itself outside a multi-replica context.
  """
  ctx = _replica_context()
  if ctx is None:
    return x
  if x.dtype in (tf.bfloat16, tf.float16):
    x = tf.cast(x, tf.float32)
  # A fresh op takes the device of the enclosing scope: collectives of
  # MultiWorkerMirroredStrategy fail on tensors without one (e.g. inputs).
  return ctx.all_gather(tf.identity(x), axis=0)


def replica_offset(local_batch: tf.Tensor) -> tf.Tensor:
  """Row of the global batch where this replica's first local row sits.

  Works with unequal local batches (the last partial batch of an epoch).

  Args:
    local_batch: scalar int, this replica's batch size.

  Returns:
    scalar int32.
  """
  ctx = _replica_context()
  if ctx is None:
    return tf.constant(0, tf.int32)
  sizes = all_gather(tf.reshape(tf.cast(local_batch, tf.int32), [1]))
  replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
  return tf.reduce_sum(sizes[:replica_id])


def all_reduce_sum(x: tf.Tensor) -> tf.Tensor:
  """Sum of `x` over replicas, without gradient (for counts and metrics)."""
  ctx = _replica_context()
  if ctx is None:
    return x
  return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(x))


def agree_on_finite(grads):
  """Makes every replica's gradients non-finite when any replica's are.

  `keras.optimizers.LossScaleOptimizer` decides to apply a step (or to skip
  it and halve the loss scale) from the gradients it is given, assuming they
  are all-reduced already: under `MirroredStrategy` it reads replica 0's
  decision, elsewhere each replica decides alone. Keras optimizers only sum
  the gradients after that decision, so an overflow on one replica would be
  summed into the applied update (or replicas would disagree). Passing the
  gradients through this first makes all replicas skip together.

  Args:
    grads: list of this replica's gradients (tensors, `IndexedSlices` or
      None).

  Returns:
    `grads` unchanged when every replica's are finite, else the same
    structure filled with NaN; `grads` itself outside a multi-replica
    context.
  """
  ctx = _replica_context()
  if ctx is None:
    return grads
  values = [g.values if isinstance(g, tf.IndexedSlices) else g
            for g in grads if g is not None]
  if not values:
    return grads
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                          for v in values])
  bad_replicas = all_reduce_sum(1.0 - tf.cast(finite, tf.float32))
  all_finite = tf.equal(bad_replicas, 0.0)

  def poison(x):
    return tf.where(all_finite, x, tf.constant(float("nan"), x.dtype))

  out = []
  for g in grads:
    if g is None:
      out.append(None)
    elif isinstance(g, tf.IndexedSlices):
      out.append(tf.IndexedSlices(poison(g.values), g.indices, g.dense_shape))
    else:
      out.append(poison(g))
  return out


def make_strategy(name: str = "default", devices=None, *,
                  collective_key_base: Optional[int] = None
                  ) -> tf.distribute.Strategy:
  """Builds a strategy by name.

  Args:
    name: `default` (one device), `mirrored` (all local GPUs, or the given
      `devices`, e.g. logical CPUs) or `multi_worker` (processes described by
      the `TF_CONFIG` environment variable).
    devices: optional device list for `mirrored`.
    collective_key_base: optional first collective key of a `mirrored`
      strategy. Several strategies of different sizes in one process (tests)
      would otherwise share group keys and abort; give each its own range,
      e.g. 10_000 * n for the n-th strategy.

  Returns:
    A `tf.distribute.Strategy`.
  """
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    if devices is None and not tf.config.list_logical_devices("GPU"):
      # Without GPUs MirroredStrategy would use one CPU; use every logical
      # CPU so that splitting the CPU into devices gives several replicas.
      devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if collective_key_base is not None:
      # TF reads this class attribute when the strategy is made; there is no
      # public argument for it.
      tf.distribute.MirroredStrategy._collective_key_base = (  # pylint: disable=protected-access
          int(collective_key_base))
    return tf.distribute.MirroredStrategy(devices=devices)
  if name == "multi_worker":
    if "TF_CONFIG" not in os.environ:
      raise ValueError(
          "strategy='multi_worker' needs the TF_CONFIG environment variable "
          "describing the cluster, e.g. "
          + json.dumps({"cluster": {"worker": ["host1:port", "host2:port"]},
                        "task": {"type": "worker", "index": 0}}))
    return tf.distribute.MultiWorkerMirroredStrategy()
  raise ValueError(f"Unknown strategy {name!r}; use one of "
                   "'default', 'mirrored', 'multi_worker'.")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes checkpoints, summaries and exports."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type in (None, "chief") or (
      task_type == "worker" and task_id == 0 and
      "chief" not in resolver.cluster_spec().as_dict())


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  """Whether `strategy` spans several worker processes."""
  resolver = getattr(strategy, "cluster_resolver", None)
  return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
          and resolver is not None
          and sum(len(tasks) for tasks in
                  resolver.cluster_spec().as_dict().values()) > 1)


def wait_for_workers(strategy: tf.distribute.Strategy) -> None:
  """Returns once every worker of `strategy` has called it.

  A worker that leaves the cluster early makes the others' next collective
  (or the coordination service) fail, so workers with nothing left to do
  wait here for the chief. A no-op on one worker.
  """
  if not is_multi_worker(strategy):
    return

  @tf.function
  def all_reduce_one():
    def replica_fn():
      with replica_device_scope(strategy):
        return tf.identity(tf.constant(1.0))
    return strategy.reduce(tf.distribute.ReduceOp.SUM,
                           strategy.run(replica_fn), axis=None)

  all_reduce_one()


def replica_device_scope(strategy: tf.distribute.Strategy):
  """Device scope the replica function must run under.

  `MultiWorkerMirroredStrategy` places `all_gather` wrongly unless the replica
  function runs on the worker's own device; other strategies need nothing.
  """
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return tf.device(strategy.extended.worker_devices[0])
  return contextlib.nullcontext()
