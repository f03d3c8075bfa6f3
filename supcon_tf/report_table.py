"""A run's report (`report.json`) as a short table for people.

The command line prints it at the end of a run; `report.json` keeps
everything. No TensorFlow at import: the command line loads this before its
flags are checked.
"""

from __future__ import annotations


def _percent(value) -> str:
  """A fraction in [0, 1] as `'75.9 %'`; None as `'-'`."""
  return "-" if value is None else f"{100 * value:.1f} %"


def summary_table(report: dict, workdir: str) -> str:
  """The report as a short table for people (report.json has everything)."""
  rows = []
  pretrain = report.get("pretrain")
  if pretrain:
    rows.append(("pretraining", (
        f"{pretrain['method']}, {pretrain['steps']:,} steps, final loss "
        f"{pretrain['final_loss']:.4f}, "
        f"{pretrain['images_per_second']:,.0f} images/s")))
  linear = report.get("linear_eval")
  if linear:
    rows.append(("linear eval top-1", (
        f"{_percent(linear['test_top1'])} test, top-{linear['top5_k']} "
        f"{_percent(linear['test_top5'])} (learning rate "
        f"{linear['learning_rate']:g}, {linear['epochs']} "
        f"epoch{'s' if linear['epochs'] > 1 else ''}, chosen on "
        f"{linear['selected_on']})")))
  head = report.get("ce_head")
  if head:
    rows.append(("CE head top-1", (
        f"{_percent(head.get('test_top1'))} test (the network CE trained, "
        "beside the linear probe on its frozen encoder)")))
  evaluation = report.get("evaluation")
  if evaluation:
    rows.append(("k-NN top-1", (
        f"{_percent(evaluation['knn_top1'])} (k={evaluation['knn_k']}, "
        f"{evaluation['knn_train_examples']:,} neighbours)")))
    for space, result in (evaluation.get("retrieval") or {}).items():
      rows.append((f"retrieval ({space})", (
          f"recall@1 {_percent(result['recall@1'])}, mAP@R "
          f"{_percent(result['map@r'])} (retrieval.json)")))
    robustness = evaluation.get("robustness")
    if robustness:
      rows.append(("corrupted top-1", (
          f"{_percent(robustness['mean_corrupted_top1'])} mean, clean "
          f"{_percent(robustness['clean_top1'])}" +
          # Which corruptions (reports before the CIFAR-10-C choice: none).
          (f", on {robustness['description']}"
           if robustness.get("description") else ""))))
  if report.get("export"):
    rows.append(("SavedModel", report["export"]))
  from supcon_tf import rundir  # pylint: disable=g-import-not-at-top
  rows.append(("report", rundir.report_path(workdir)))
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
