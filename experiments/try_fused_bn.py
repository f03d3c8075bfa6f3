r"""Paired step time: Keras 3 BatchNormalization against a fused-kernel one.

  python experiments/try_fused_bn.py --width=0.25 --batch=256 \
      --precision=mixed_bfloat16

Keras 3's TensorFlow backend runs training-mode batch norm as separate ops
(moments: Mean, SquaredDifference, ...; then Mul/Sub/Add and their
gradients); `tf.compat.v1.nn.fused_batch_norm` is one oneDNN kernel each way.
This script builds two `train_lib.Trainer`s, the second with
`keras.layers.BatchNormalization` replaced (only while it is built) by a
subclass whose training call uses the fused kernel, and times their
`train_loop` round-robin. An experiment, not library code.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from supcon_tf import config as config_lib  # pylint: disable=g-import-not-at-top
from supcon_tf import train_lib  # pylint: disable=g-import-not-at-top


class FusedBatchNormalization(keras.layers.BatchNormalization):
  """Training-mode NHWC batch norm through FusedBatchNormV3."""

  def call(self, inputs, training=None, mask=None):
    if not training or self.synchronized or len(inputs.shape) != 4:
      return super().call(inputs, training=training, mask=mask)
    gamma = tf.cast(self.gamma, tf.float32)
    beta = tf.cast(self.beta, tf.float32)
    y, mean, var = tf.compat.v1.nn.fused_batch_norm(
        inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
    n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
    var = var * (n - 1.0) / n  # fused returns the Bessel-corrected variance
    m = self.momentum
    self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
    self.moving_variance.assign(self.moving_variance * m + var * (1.0 - m))
    return y


def make(config, fused):
  original = keras.layers.BatchNormalization
  if fused:
    keras.layers.BatchNormalization = FusedBatchNormalization
  try:
    return train_lib.Trainer(config, tf.distribute.get_strategy(),
                             num_classes=10, input_shape=(32, 32, 3),
                             steps_per_epoch=1000)
  finally:
    keras.layers.BatchNormalization = original


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
