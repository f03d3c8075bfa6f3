r"""Accuracy against compute: a table and a picture from finished run dirs.

  python experiments/budget_study.py --plot=experiments/results/budget_study.png \
      SupCon=runs/study/supcon_s0,runs/study/supcon_s1 \
      CE=runs/study/ce_s0,runs/study/ce_s1

Each argument is `LABEL=WORKDIR[,WORKDIR...]`: finished `supcon-tf` run
directories (any mode that ran linear evaluation). Runs of one label are
grouped by their budget in image passes (encoder forward+backward passes of
one image view: steps x batch x views, the unit that does not depend on how
busy the machine was), and each group gives mean +- standard deviation over
its runs (seeds) of the test and validation top-1 of the linear classifier
and the k-NN top-1, with the pretraining wall time as measured. Prints a
Markdown table; with --plot, draws test top-1 (solid) and k-NN top-1
(dashed) against image passes, one colour per label, error bars where a
point has several seeds.
"""

import argparse
import collections
import json
import os
import statistics

from sweep_budget import image_passes  # pylint: disable=g-bad-import-order

from supcon_tf import rundir


def load_run(workdir: str) -> dict:
  """One finished run: its budget and its scores."""
  config = rundir.load_config(rundir.pretrain_dir(workdir))
  with open(rundir.report_path(workdir)) as f:
    report = json.load(f)
  if "linear_eval" not in report or "pretrain" not in report:
    raise SystemExit(f"{workdir}: report.json lacks pretraining or linear "
                     "evaluation; finish the run (--mode=all) first.")
  pretrain = report["pretrain"]
  evaluation = report.get("evaluation", {})
  return {
      "workdir": workdir,
      "seed": config.seed,
      "image_passes": image_passes(config, pretrain["steps"]),
      "test_top1": report["linear_eval"]["test_top1"],
      "val_top1": report["linear_eval"].get("val_top1"),
      "knn_top1": evaluation.get("knn_top1"),
      "seconds": pretrain.get("seconds_this_run"),
  }


def summarise(values):
  """`(mean, standard deviation or None, count)` of the non-None values."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None, 0
  spread = statistics.stdev(values) if len(values) > 1 else None
  return statistics.mean(values), spread, len(values)


def _cell(values, scale=100.0, digits=1):
  mean, spread, count = summarise(values)
  if count == 0:
    return "–"
  text = f"{mean * scale:.{digits}f}"
  return text + (f" ± {spread * scale:.{digits}f}" if spread is not None
                 else "")


def study_table(groups) -> str:
  """Markdown rows: label, image passes, seeds, scores (mean ± sd)."""
  lines = ["| method | image passes | seeds | pretrain s | val top-1 % | "
           "**test top-1 %** | k-NN top-1 % |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for (label, passes), runs in groups.items():
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines.append(
        f"| {label} | {passes:,} | {len(runs)} ({seeds}) | "
        f"{_cell([r['seconds'] for r in runs], 1.0, 0)} | "
        f"{_cell([r['val_top1'] for r in runs])} | "
        f"**{_cell([r['test_top1'] for r in runs])}** | "
        f"{_cell([r['knn_top1'] for r in runs])} |")
  return "\n".join(lines)


def plot_study(groups, path: str) -> None:
  """Test (solid) and k-NN (dashed) top-1 against image passes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  by_label = collections.defaultdict(list)
  for (label, passes), runs in groups.items():
    by_label[label].append((passes, runs))
  figure, axis = plt.subplots(figsize=(6.4, 4.2))
  for index, (label, points) in enumerate(by_label.items()):
    points.sort()
    colour = f"C{index}"
    x = [p / 1e6 for p, _ in points]
    for key, style, suffix in (("test_top1", "-o", "linear, test"),
                               ("knn_top1", "--s", "k-NN")):
      stats = [summarise([r[key] for r in runs]) for _, runs in points]
      if not any(count for _, _, count in stats):
        continue
      axis.errorbar(x, [100 * m for m, _, _ in stats],
                    yerr=[100 * (s or 0.0) for _, s, _ in stats],
                    fmt=style, color=colour, capsize=3,
                    label=f"{label} ({suffix})")
  axis.set_xlabel("budget: image passes (millions; fwd+bwd of one view)")
  axis.set_ylabel("CIFAR-10 top-1 (%)")
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=120)
  plt.close(figure)


def main():
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("groups", nargs="+", help="LABEL=WORKDIR[,WORKDIR...]")
  parser.add_argument("--plot", default=None, help="PNG to write")
  args = parser.parse_args()
  groups = collections.OrderedDict()
  for spec in args.groups:
    label, sep, dirs = spec.partition("=")
    if not sep or not dirs:
      raise SystemExit(f"{spec!r} is not LABEL=WORKDIR[,WORKDIR...].")
    for workdir in filter(None, dirs.split(",")):
      run = load_run(workdir)
      groups.setdefault((label, run["image_passes"]), []).append(run)
  print(study_table(groups))
  if args.plot:
    plot_study(groups, args.plot)
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
  main()
