r"""Paired step time: Keras 3 BatchNormalization against a fused-kernel one.

  python experiments/try_fused_bn.py --width=0.25 --batch=256 \
      --precision=mixed_bfloat16

Keras 3's TensorFlow backend runs training-mode batch norm as separate ops
(moments: Mean, SquaredDifference, ...; then Mul/Sub/Add and their
gradients); `tf.compat.v1.nn.fused_batch_norm` is one oneDNN kernel each way.
This script builds two `train_lib.Trainer`s, one with the library's
`resnet.FusedBatchNormalization` and one with it swapped (only while it is
built) for plain `keras.layers.BatchNormalization`, and times their
`train_loop` round-robin.
"""

import argparse
import importlib
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from supcon_tf import config as config_lib  # pylint: disable=g-import-not-at-top
from supcon_tf import train_lib  # pylint: disable=g-import-not-at-top

resnet_module = importlib.import_module("supcon_tf.models.resnet")


def make(config, fused):
  """A Trainer whose ResNet uses the fused layer or plain Keras BN."""
  original = resnet_module.FusedBatchNormalization
  if not fused:
    resnet_module.FusedBatchNormalization = keras.layers.BatchNormalization
  try:
    return train_lib.Trainer(config, tf.distribute.get_strategy(),
                             num_classes=10, input_shape=(32, 32, 3),
                             steps_per_epoch=1000)
  finally:
    resnet_module.FusedBatchNormalization = original


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--width", type=float, default=0.25)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--precision", default="mixed_bfloat16")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  config = config_lib.TrainConfig(
      batch_size=args.batch, steps=1000, precision=args.precision,
      model=config_lib.ModelConfig(encoder="resnet18", width=args.width),
      optimizer=config_lib.OptimizerConfig(warmup_epochs=0))
  views = tf.random.uniform([args.batch, 2, 32, 32, 3])
  labels = tf.random.uniform([args.batch], maxval=10, dtype=tf.int32)
  steps = tf.constant(args.steps)
  fns = {}
  for name, fused in (("keras BN", False), ("fused BN", True)):
    trainer = make(config, fused)
    it = iter(tf.data.Dataset.from_tensors((views, labels)).repeat())
    fns[name] = lambda t=trainer, it=it: t.train_loop(it, steps)["loss"]
  for fn in fns.values():
    fn().numpy()
    fn().numpy()
  rates = {k: [] for k in fns}
  for _ in range(args.repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn().numpy()
      rates[name].append(args.batch * args.steps /
                         (time.perf_counter() - start))
  for name, r in rates.items():
    print(f"{name}: samples/s {min(r):.1f} / {statistics.median(r):.1f} / "
          f"{max(r):.1f}")
  print(f"fused / keras (medians): "
        f"{statistics.median(rates['fused BN']) / statistics.median(rates['keras BN']):.2f}x")


if __name__ == "__main__":
  main()
