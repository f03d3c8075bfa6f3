"""Time and peak memory of the SupCon loss, forward + backward.

Variants, on `rows = samples * 2 views` L2-normalised 128-d embeddings
with integer labels:

  dense: the usual formulation (as in the widely used PyTorch SupConLoss
         port): logits matrix, float masks from tf.equal + cast, log_prob
         matrix, sum over positives; gradient by autodiff.
  dense_xla: the same, compiled by XLA (`jit_compile=True`), which fuses
         the elementwise work around the matmuls.
  ours:  `supcon_tf.supcon_loss` with its automatic path (dense up to
         `blockwise.AUTO_MIN_LOGITS` logits, blocks above), anchors
         being the contrast tensor itself.
  fused: the same with `gather=True` (what training calls): the contrast
         passes through the cross-replica gather (a copy on one device).
  fused2: `gather=True` under a MirroredStrategy of 2 logical CPU devices
         (the CPU split in two): each replica's half of the anchors against
         the gathered global contrast (rectangular blocks), gradients back
         through the gather; the time is both replicas' step.
  floor: one `[rows, dim] x [dim, rows]` matmul and an exp over the result
         (forward only): what any exact method has to pay at least.

Every (variant, rows, classes) runs in a fresh child process
(`bench_loss.py --one VARIANT ROWS CLASSES`) that reports its times and its
peak RSS above the baseline taken after importing TensorFlow and creating
the inputs. The parent prints markdown tables.

Usage:
  python experiments/bench_loss.py --rows 512,2048 --classes 10
  python experiments/bench_loss.py  # all sizes (slow; dense skipped where
                                    # it would not fit in memory)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("dense", "dense_xla", "ours", "fused", "fused2", "floor")
# Ratios of medians printed per row: (numerator, denominator).
RATIOS = (("ours", "dense"), ("ours", "floor"), ("ours", "fused"),
          ("fused", "dense_xla"), ("fused2", "dense_xla"))
DIM = 128
VIEWS = 2
TEMPERATURE = 0.1
# float32 [rows, rows] matrices alive at the peak, per variant (measured:
# dense peaks at 14.1 GiB at 16,384 rows, the floor at 1.1 GiB).
MATRICES = {"dense": 14, "dense_xla": 14, "ours": 0, "fused": 0,
            "fused2": 0, "floor": 2}


def _available_bytes():
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return None


def _peak_rss_bytes():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dense_loss(tf, features, labels):
  """The usual dense SupCon loss, written the way it usually is."""
  batch = tf.shape(features)[0]
  contrast_count = features.shape[1]
  contrast_feature = tf.concat(tf.unstack(features, axis=1), 0)
  anchor_feature, anchor_count = contrast_feature, contrast_count
  mask = tf.cast(tf.equal(labels[:, None], labels[None, :]), tf.float32)
  anchor_dot_contrast = tf.matmul(anchor_feature, contrast_feature,
                                  transpose_b=True) / TEMPERATURE
  logits_max = tf.reduce_max(anchor_dot_contrast, 1, keepdims=True)
  logits = anchor_dot_contrast - tf.stop_gradient(logits_max)
  mask = tf.tile(mask, [anchor_count, contrast_count])
  rows = batch * anchor_count
  logits_mask = 1.0 - tf.eye(rows, batch * contrast_count)
  mask = mask * logits_mask
  exp_logits = tf.exp(logits) * logits_mask
  log_prob = logits - tf.math.log(tf.reduce_sum(exp_logits, 1, keepdims=True))
  mask_pos_pairs = tf.reduce_sum(mask, 1)
  mask_pos_pairs = tf.where(mask_pos_pairs < 1e-6, 1.0, mask_pos_pairs)
  mean_log_prob_pos = tf.reduce_sum(mask * log_prob, 1) / mask_pos_pairs
  loss = -TEMPERATURE * mean_log_prob_pos
  return tf.reduce_mean(loss)


def run_one(variant, rows, classes, repeats, block_size):
  """Child process: prints one JSON line with times and peak memory."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import numpy as np
  import tensorflow as tf
  import supcon_tf

  if variant == "fused2":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

  rng = np.random.default_rng(0)
  samples = rows // VIEWS
  features = rng.normal(size=(samples, VIEWS, DIM)).astype(np.float32)
  features /= np.linalg.norm(features, axis=-1, keepdims=True)
  features = tf.constant(features)
  labels = tf.constant(rng.integers(0, classes, samples), tf.int32)
  baseline = _peak_rss_bytes()

  if variant == "fused2":
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    halves = tf.split(features, 2), tf.split(labels, 2)

    def replica_step():
      index = tf.distribute.get_replica_context().replica_id_in_sync_group
      x = tf.gather(tf.stack(halves[0]), index)
      y = tf.gather(tf.stack(halves[1]), index)
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_mean(supcon_tf.supcon_loss(
            x, y, temperature=TEMPERATURE, block_size=block_size,
            gather=True))
      return loss, tape.gradient(loss, x)

    @tf.function
    def step():
      loss, grad = strategy.run(replica_step)
      return (strategy.reduce("SUM", loss, None),
              strategy.gather(grad, axis=0))
  elif variant == "floor":
    flat = tf.reshape(features, [rows, DIM])

    @tf.function
    def step():
      return tf.reduce_sum(tf.exp(tf.matmul(flat, flat, transpose_b=True)))
  else:
    def loss_fn(x):
      if variant.startswith("dense"):
        return _dense_loss(tf, x, labels)
      return tf.reduce_mean(supcon_tf.supcon_loss(
          x, labels, temperature=TEMPERATURE, block_size=block_size,
          gather=variant == "fused"))

    @tf.function(jit_compile=variant == "dense_xla")
    def step():
      with tf.GradientTape() as tape:
        tape.watch(features)
        loss = loss_fn(features)
      return loss, tape.gradient(loss, features)

  tf.nest.map_structure(lambda t: t.numpy(), step())  # trace + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), step())
    times.append(time.perf_counter() - start)
  print(json.dumps({"times": times,
                    "peak_bytes": _peak_rss_bytes() - baseline}))


def _child(variant, rows, classes, args):
  cmd = [sys.executable, os.path.abspath(__file__), "--one", variant,
         str(rows), str(classes), "--repeats", str(args.repeats)]
  if args.block_size is not None:
    cmd += ["--block_size", str(args.block_size)]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         timeout=args.timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timeout {args.timeout}s"}
  for line in reversed(out.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
  return {"error": f"rc {out.returncode}: {tail[:80]}"}


def _gib(n):
  return n / 2**30


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default="512,2048,8192,16384,32768",
                      help="comma-separated anchor rows (samples x 2 views)")
  parser.add_argument("--classes", default="10,1000")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed calls per child, after one warm-up call")
  parser.add_argument("--rounds", type=int, default=1,
                      help="children per configuration, variants "
                      "interleaved; times are pooled, memory is the max")
  parser.add_argument("--block_size", type=int, default=None,
                      help="block_size passed to supcon_loss (default: auto)")
  parser.add_argument("--timeout", type=int, default=1800,
                      help="seconds per child process")
  parser.add_argument("--one", nargs=3, metavar=("VARIANT", "ROWS", "CLASSES"),
                      help="internal: run one configuration and print JSON")
  args = parser.parse_args()
  if args.one:
    variant, rows, classes = args.one
    run_one(variant, int(rows), int(classes), args.repeats, args.block_size)
    return

  variants = args.variants.split(",")
  results = {}
  print(f"load average before: {os.getloadavg()}", flush=True)
  for rows in (int(r) for r in args.rows.split(",")):
    for classes in (int(c) for c in args.classes.split(",")):
      for _ in range(args.rounds):
        for variant in variants:
          need = MATRICES[variant] * 4 * rows * rows
          available = _available_bytes()
          if available is not None and need > 0.8 * available:
            result = {"error": f"n/a (needs ~{_gib(need):.0f} GiB)"}
          else:
            result = _child(variant, rows, classes, args)
          print(f"# {variant} rows={rows} classes={classes}: "
                f"{json.dumps(result)}", file=sys.stderr, flush=True)
          pooled = results.setdefault((rows, classes, variant), {})
          if "times" in result:
            pooled.pop("error", None)
            pooled.setdefault("times", []).extend(result["times"])
            pooled["peak_bytes"] = max(pooled.get("peak_bytes", 0),
                                       result["peak_bytes"])
          elif "times" not in pooled:
            pooled["error"] = result["error"]
  print(f"load average after: {os.getloadavg()} (2 cores)", flush=True)
  _print_tables(results, variants)


def _print_tables(results, variants):
  import statistics
  keys = sorted({(r, c) for r, c, _ in results})

  def median(key):
    res = results.get(key, {})
    return statistics.median(res["times"]) if "times" in res else None

  def fastest(key):
    res = results.get(key, {})
    return min(res["times"]) if "times" in res else None

  def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "n/a"

  print("\nTime, forward + backward (floor: forward), seconds "
        "min / median / max; ratios of medians (of minima)\n")
  pairs = [(a, b) for a, b in RATIOS if a in variants and b in variants]
  print("| rows | classes | " + " | ".join(variants) + "".join(
      f" | {a}/{b}" for a, b in pairs) + " |")
  print("|---:|---:|" + "---|" * len(variants) + "---:|" * len(pairs))
  for rows, classes in keys:
    cells = []
    for variant in variants:
      res = results.get((rows, classes, variant), {})
      if "times" in res:
        t = res["times"]
        cells.append(f"{min(t):.3f} / {statistics.median(t):.3f} / "
                     f"{max(t):.3f}")
      else:
        cells.append(res.get("error", "-"))
    ratios = []
    for a, b in pairs:
      ours, theirs = (rows, classes, a), (rows, classes, b)
      ratios.append(f"{ratio(median(ours), median(theirs))} "
                    f"({ratio(fastest(ours), fastest(theirs))})")
    print(f"| {rows} | {classes} | " + " | ".join(cells + ratios) + " |")

  def peak(key):
    res = results.get(key, {})
    return res.get("peak_bytes")

  print("\nPeak RSS above baseline, MiB\n")
  print("| rows | classes | " + " | ".join(variants) + " | ours/dense |")
  print("|---:|---:|" + "---:|" * len(variants) + "---:|")
  for rows, classes in keys:
    cells = []
    for variant in variants:
      value = peak((rows, classes, variant))
      cells.append(f"{value / 2**20:.0f}" if value is not None else
                   results.get((rows, classes, variant), {}).get("error", "-"))
    mem_ratio = ratio(peak((rows, classes, "ours")),
                      peak((rows, classes, "dense")))
    print(f"| {rows} | {classes} | " + " | ".join(cells + [mem_ratio]) +
          " |")


if __name__ == "__main__":
  main()
