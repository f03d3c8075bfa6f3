r"""Short pretraining runs that compare settings for a CPU budget.

  python experiments/sweep_budget.py --steps=100 \
      --variant=base: --variant=lr5:optimizer.learning_rate=5

Every variant starts from the same base (the command line's budget recipe,
`config.BUDGET_TRAIN`: width-0.25 ResNet-18, batch 256, tau 0.1, precision
auto; but two views, the plain MLP head and SGD at 0.5, the first budget
setting, so that older variants keep their meaning; a linear warm-up over 0.9 x --warmup_fraction of the
steps, then a cosine decay to 0 at --steps) and changes the dotted
`TrainConfig` fields it names. Each one pretrains for --steps steps in its
own work dir under --out, then the weighted k-NN (k=200) classifies the first --val_examples images of the
validation split (held out of the training split, never trained on) with
the first --train_examples images of the rest of the training split as
neighbours. The test split is never read: settings are chosen here, and the
test split is evaluated once, by the final run. Prints a Markdown table of
final loss, image passes (encoder forward+backward of one view: steps x
batch x views, the machine-independent budget), k-NN top-1 and seconds; a
rerun resumes finished variants.
"""

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from supcon_tf import config as config_lib  # pylint: disable=g-import-not-at-top
from supcon_tf import data
from supcon_tf import knn
from supcon_tf import objectives
from supcon_tf import overrides
from supcon_tf import pretrained
from supcon_tf import train_lib


def base_config(steps: int, data_dir=None) -> config_lib.TrainConfig:
  """The first budget setting: two views, plain MLP head, SGD at 0.5.

  The command line's budget recipe (`config.BUDGET_TRAIN`) for everything
  else, so that the variants of every round keep their meaning.
  """
  budget = config_lib.BUDGET_TRAIN
  return dataclasses.replace(
      budget, steps=steps, checkpoint_every=steps,
      data=dataclasses.replace(budget.data, data_dir=data_dir, num_views=2),
      model=dataclasses.replace(budget.model, head="mlp"),
      optimizer=dataclasses.replace(budget.optimizer, name="sgd",
                                    learning_rate=0.5))


def apply_overrides(config, assignments: str):
  """`"a.b=1,c=x"` -> `config` with those dotted fields replaced."""
  try:
    return overrides.override(config, filter(None, assignments.split(",")))
  except ValueError as e:
    raise SystemExit(f"--variant: {e}") from None


def image_passes(config: config_lib.TrainConfig, steps=None) -> int:
  """Encoder forward+backward passes of one image view over `steps` steps.

  `steps` defaults to `config.steps`; views are those the method trains on.
  """
  views = objectives.get(config.method).num_views(config.data.num_views)
  return (config.steps if steps is None else steps) * config.batch_size * views


def run_variant(name, config, out, train_examples, val_examples):
  workdir = os.path.join(out, name)
  start = time.perf_counter()
  result = train_lib.pretrain(config, workdir)
  seconds = time.perf_counter() - start
  encoder = pretrained.restore_encoder(workdir, config)
  # The same split as pretraining: neighbours from its training part,
  # queries from the held-out validation part.
  neighbours = data.eval_dataset(config.data, "train", batch_size=500)
  validation = data.eval_dataset(config.data, "validation", batch_size=500)
  if validation is None:
    raise SystemExit("validation_fraction=0 leaves no validation split to "
                     "score settings on.")
  knn_top1 = knn.knn_accuracy(encoder,
                              neighbours.take(train_examples // 500),
                              validation.take(val_examples // 500))
  # The scaled loss is tau * L; L itself compares across temperatures.
  # Cross-entropy has no temperature.
  scale = (config.loss.temperature
           if config.loss.scale_by_temperature and config.method != "ce"
           else 1.0)
  return dict(variant=name, loss=result.loss / scale,
              image_passes=image_passes(config), val_knn_top1=knn_top1,
              seconds=seconds)


def main():
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--variant", action="append", required=True,
                      help="name:field=value,field=value (repeatable)")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--warmup_fraction", type=float, default=0.1)
  parser.add_argument("--train_examples", type=int, default=10_000)
  parser.add_argument("--val_examples", type=int, default=5_000)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--out", default="runs/sweep")
  args = parser.parse_args()
  rows = []
  for spec in args.variant:
    name, _, assignments = spec.partition(":")
    config = apply_overrides(base_config(args.steps, args.data_dir),
                             assignments)
    # Warm-up is in epochs; make it a fixed share of this short run. (An
    # epoch is 45,000 images after the validation hold-out, hence 0.9 x.)
    epochs = config.steps * config.batch_size / 50_000
    config = dataclasses.replace(config, optimizer=dataclasses.replace(
        config.optimizer, warmup_epochs=args.warmup_fraction * epochs))
    rows.append(run_variant(name, config, args.out, args.train_examples,
                            args.val_examples))
    print(json.dumps(rows[-1]), flush=True)
  print(f"\n{args.steps} steps unless a variant sets steps; loss is L "
        "(not tau * L) at the end.\n")
  print("| variant | final loss | image passes | val k-NN top-1 | seconds |")
  print("|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['variant']} | {row['loss']:.3f} | "
          f"{row['image_passes']:,} | {row['val_knn_top1']:.3f} "
          f"| {row['seconds']:.0f} |")


if __name__ == "__main__":
  main()
