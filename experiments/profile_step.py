r"""Where a supcon_tf training step's CPU time goes (TensorFlow profiler).

  python experiments/profile_step.py --width=0.25 --batch=256 \
      --precision=mixed_bfloat16 --steps=2 --logdir=/tmp/prof

Builds `train_lib.Trainer` (ResNet-18, CIFAR stem), warms `train_loop` up,
traces `--steps` steps with `tf.profiler.experimental.start/stop`, then reads
the `.xplane.pb` it wrote (TensorFlow's own XSpace proto, no TensorBoard
needed) and prints the op types that took the most time on the host
threads, summed over threads, with their share of the total op time.
"""

import argparse
import collections
import glob
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top

from supcon_tf import config as config_lib  # pylint: disable=g-import-not-at-top
from supcon_tf import train_lib  # pylint: disable=g-import-not-at-top


_CONTAINERS = ("Process", "Run", "PartitionedCall",
               "StatefulPartitionedCall", "While", "If")


def op_times(logdir):
  """{op type: total ps} from the newest .xplane.pb under logdir."""
  path = max(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"),
                       recursive=True), key=os.path.getmtime)
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  totals = collections.Counter()
  for plane in space.planes:
    if plane.name != "/host:CPU":
      continue
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      # TF op executor threads carry events named "name:Type".
      for event in line.events:
        name = names.get(event.metadata_id, "")
        if ":" not in name or name.startswith(("$", "Iterator")):
          continue
        op_type = name.rsplit(":", 1)[1]
        # "Process"/"Run" etc. are executor scopes enclosing the ops.
        if (not re.fullmatch(r"[A-Za-z0-9_]+", op_type)
            or op_type in _CONTAINERS):
          continue
        totals[op_type] += event.duration_ps
  return totals


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--width", type=float, default=0.25)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--precision", default="mixed_bfloat16")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--logdir", default="/tmp/supcon_profile")
  args = parser.parse_args()
  config = config_lib.TrainConfig(
      batch_size=args.batch, steps=1000, precision=args.precision,
      model=config_lib.ModelConfig(encoder="resnet18", width=args.width),
      optimizer=config_lib.OptimizerConfig(warmup_epochs=0))
  trainer = train_lib.Trainer(config, tf.distribute.get_strategy(),
                              num_classes=10, input_shape=(32, 32, 3),
                              steps_per_epoch=1000)
  views = tf.random.uniform([args.batch, 2, 32, 32, 3])
  labels = tf.random.uniform([args.batch], maxval=10, dtype=tf.int32)
  iterator = iter(tf.data.Dataset.from_tensors((views, labels)).repeat())
  steps = tf.constant(args.steps)
  trainer.train_loop(iterator, steps)["loss"].numpy()  # warm-up
  tf.profiler.experimental.start(args.logdir)
  trainer.train_loop(iterator, steps)["loss"].numpy()
  tf.profiler.experimental.stop()
  totals = op_times(args.logdir)
  total = sum(totals.values()) or 1
  print(f"width {args.width}, batch {args.batch}, {args.precision}: "
        f"{total / 1e12 / args.steps:.2f} s op time per step (all threads)")
  print("| op type | ms/step | share |\n|---|---|---|")
  for op_type, ps in totals.most_common(args.top):
    print(f"| {op_type} | {ps / 1e9 / args.steps:.1f} | "
          f"{100 * ps / total:.1f} % |")


if __name__ == "__main__":
  main()
