r"""Throughput of a full SupCon training step and of the input pipeline alone.

  python experiments/bench_train.py --batches=64,128 --width=1.0 --repeats=3

For each batch size (samples; two views each) it times, in one process:
the input pipeline alone (CIFAR-10 + SimCLR augmentation, `data_dir` from
--data_dir or TFDS_DATA_DIR), and the training step (ResNet-18, CIFAR stem)
on a fixed batch in float32 / mixed_bfloat16, with and without XLA. Each
figure is min/median/max samples per second (one sample = 2 views, so
images/s is twice the figure) over --repeats runs of --steps steps; ratios
compare medians measured in the same process.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from supcon_tf import config as config_lib
from supcon_tf import data
from supcon_tf import train_lib


def _rates(fn, samples_per_call, steps, repeats):
  fn()  # warm-up: tracing and compilation
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      fn()
    rates.append(samples_per_call * steps / (time.perf_counter() - start))
  return rates


def pipeline_rates(config, batch, steps, repeats):
  dataset = data.pretrain_dataset(config.data, global_batch_size=batch,
                                  seed=0)
  iterator = iter(dataset)
  return _rates(lambda: next(iterator)[0].numpy(), batch, steps, repeats)


def step_rates(config, batch, steps, repeats):
  trainer = train_lib.Trainer(config, tf.distribute.get_strategy(),
                              num_classes=10, input_shape=(32, 32, 3),
                              steps_per_epoch=1000)
  views = tf.random.uniform([batch, 2, 32, 32, 3])
  labels = tf.random.uniform([batch], maxval=10, dtype=tf.int32)
  step = tf.function(trainer.distributed_step)
  return _rates(lambda: step(views, labels)["loss"].numpy(), batch, steps,
                repeats)


def summary(rates):
  return (f"{min(rates):8.1f} / {statistics.median(rates):8.1f} / "
          f"{max(rates):8.1f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batches", default="64,128")
  parser.add_argument("--width", type=float, default=1.0)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args()
  base = config_lib.TrainConfig(
      steps=1000, data=config_lib.DataConfig(data_dir=args.data_dir),
      model=config_lib.ModelConfig(encoder="resnet18", width=args.width),
      optimizer=config_lib.OptimizerConfig(warmup_epochs=0))
  print(f"ResNet-18 (CIFAR stem, width {args.width}), samples/s (2 views "
        "each) as min / median / max; ratios of medians.\n")
  print("| batch | setting | samples/s | vs float32 no-XLA |")
  print("|---|---|---|---|")
  for batch in (int(b) for b in args.batches.split(",")):
    config = dataclasses.replace(base, batch_size=batch)
    results = {"input pipeline alone": pipeline_rates(
        config, batch, args.steps * 4, args.repeats)}
    for precision in ("float32", "mixed_bfloat16"):
      for jit in (False, True):
        name = f"{precision}, XLA {'on' if jit else 'off'}"
        results[name] = step_rates(
            dataclasses.replace(config, precision=precision, jit_compile=jit),
            batch, args.steps, args.repeats)
        sys.stdout.flush()
    reference = statistics.median(results["float32, XLA off"])
    for name, rates in results.items():
      ratio = statistics.median(rates) / reference
      print(f"| {batch} | {name} | {summary(rates)} | {ratio:.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
