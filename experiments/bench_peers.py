r"""Side-by-side SupCon training-step throughput: supcon_tf against PyTorch.

  # optional, for the benchmark only (a CPU wheel; plain `pip install torch`
  # may pull a multi-GB CUDA build):
  pip install torch==2.13.0
  python experiments/bench_peers.py                  # ~5 min on 2 idle cores
  python experiments/bench_peers.py --quick          # ~1 min smoke run
  python experiments/bench_peers.py --settings=budget --frameworks=tf

Both frameworks train the same network on the same fixed input: ResNet-18
with the CIFAR stem (3x3 stride-1 conv, no max-pool), a 2-layer MLP head to
128-d L2-normalised embeddings, the SupCon loss (Khosla et al., 2020) and SGD
with momentum 0.9 and weight decay 1e-4. One sample = 2 views (2 images).

* supcon_tf: the library's own `train_lib.Trainer.train_loop` (the code
  path of `pretrain`, `--steps` steps inside one `tf.function`), float32 and
  mixed_bfloat16, XLA off (and on with --xla).
* PyTorch peer: a port of the official HobbitLong/SupContrast step
  (`networks/resnet_big.py` SupConResNet, `losses.py` SupConLoss) written
  for this benchmark, float32 and bf16 autocast, NCHW and channels-last.

Settings: `full` = width 1.0, batch 64; `budget` = width 0.25 (16/32/64/128
channels), batch 256. Each framework runs in its own subprocess, so the
thread pools of one never spin while the other is timed; both get
--threads intra-op threads (default: physical cores) and the same
OMP/MKL variables. Within a subprocess the settings are timed round-robin
(repeat r of every setting before repeat r+1 of any), so slow drifts of a
shared machine hit every setting alike. The input pipeline's rate
(`supcon_tf.data.pretrain_dataset`, CIFAR-10 from TFDS_DATA_DIR, SimCLR
augmentation) is measured in the same run, or skipped with a note when the
data is absent.

Prints samples/s as min / median / max over --repeats, and each median as a
ratio to the best PyTorch median of the same setting.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {"full": (1.0, 64), "budget": (0.25, 256)}


def physical_cores():
  """Distinct (physical id, core id) pairs of /proc/cpuinfo, else nproc."""
  cores, phys = set(), None
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
          phys = value.strip()
        elif key == "core id":
          cores.add((phys, value.strip()))
  except OSError:
    pass
  return len(cores) or os.cpu_count() or 1


def cpu_description():
  model, flags = "unknown", []
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = [x for x in value.split()
                   if x.startswith(("avx512", "amx", "avx2", "fma"))]
  except OSError:
    pass
  return model, flags


def _time_round_robin(fns, samples_per_call, repeats):
  """fns: {name: callable}; returns {name: [samples/s per repeat]}."""
  for fn in fns.values():
    fn()  # warm-up: tracing, compilation, allocator growth
    fn()
  rates = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      rates[name].append(samples_per_call[name] / (time.perf_counter() - start))
  return rates


# ----------------------------------------------------------------- TensorFlow
def tf_worker(args):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from supcon_tf import config as config_lib  # pylint: disable=g-import-not-at-top
  from supcon_tf import train_lib  # pylint: disable=g-import-not-at-top

  tf.config.threading.set_intra_op_parallelism_threads(args.threads)
  tf.config.threading.set_inter_op_parallelism_threads(args.inter_threads)
  fns, samples = {}, {}
  for setting in args.settings.split(","):
    width, batch = SETTINGS[setting]
    precisions = ["float32", "mixed_bfloat16"]
    for precision in precisions:
      for jit in ([False, True] if args.xla else [False]):
        config = config_lib.TrainConfig(
            batch_size=batch, steps=1000, precision=precision,
            jit_compile=jit,
            model=config_lib.ModelConfig(encoder="resnet18", width=width),
            optimizer=config_lib.OptimizerConfig(warmup_epochs=0))
        trainer = train_lib.Trainer(config, tf.distribute.get_strategy(),
                                    num_classes=10, input_shape=(32, 32, 3),
                                    steps_per_epoch=1000)
        rng = tf.random.Generator.from_seed(0)
        views = rng.uniform([batch, 2, 32, 32, 3])
        labels = rng.uniform([batch], maxval=10, dtype=tf.int32)
        iterator = iter(tf.data.Dataset.from_tensors((views, labels)).repeat())
        steps = tf.constant(args.steps)
        name = (f"{setting} | supcon_tf {precision.replace('mixed_', '')}"
                f"{', XLA' if jit else ''}")
        fns[name] = (lambda t=trainer, it=iterator:
                     t.train_loop(it, steps)["loss"].numpy())
        samples[name] = batch * args.steps
  rates = _time_round_robin(fns, samples, args.repeats)
  if args.pipeline:
    rates.update(pipeline_rates(args))
  return rates


def pipeline_rates(args):
  """Samples/s of pretrain_dataset (2 augmented views) at each batch size."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from supcon_tf import config as config_lib  # pylint: disable=g-import-not-at-top
  from supcon_tf import data  # pylint: disable=g-import-not-at-top

  data_dir = args.data_dir or os.environ.get("TFDS_DATA_DIR")
  if not data_dir or not os.path.isdir(os.path.join(data_dir, "cifar10")):
    print(f"note: no CIFAR-10 under data_dir={data_dir!r}; input pipeline "
          "not measured (set TFDS_DATA_DIR).", file=sys.stderr)
    return {}
  out = {}
  for setting in args.settings.split(","):
    _, batch = SETTINGS[setting]
    dataset = data.pretrain_dataset(
        config_lib.DataConfig(data_dir=data_dir), global_batch_size=batch,
        seed=0)
    iterator = iter(dataset)
    batches = max(2, 2048 // batch)

    def fetch(it=iterator, n=batches):
      for _ in range(n):
        next(it)[0].numpy()
    out.update(_time_round_robin(
        {f"{setting} | input pipeline alone": fetch},
        {f"{setting} | input pipeline alone": batch * batches},
        args.repeats))
  del tf
  return out


# -------------------------------------------------------------------- PyTorch
def torch_worker(args):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  torch.set_num_interop_threads(args.inter_threads)
  torch.manual_seed(0)

  class BasicBlock(nn.Module):
    """resnet_big.BasicBlock: two 3x3 convs, 1x1 projection shortcut."""

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.shortcut = nn.Sequential()
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return F.relu(out + self.shortcut(x))

  class SupConResNet(nn.Module):
    """resnet_big.SupConResNet('resnet18', head='mlp', feat_dim=128)."""

    def __init__(self, width):
      super().__init__()
      ch = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
      self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(ch[0])
      layers, cin = [], ch[0]
      for cout, stride in zip(ch, (1, 2, 2, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
      self.layers = nn.Sequential(*layers)
      self.head = nn.Sequential(nn.Linear(cin, cin), nn.ReLU(inplace=True),
                                nn.Linear(cin, 128))

    def forward(self, x):
      out = self.layers(F.relu(self.bn1(self.conv1(x))))
      feat = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
      return F.normalize(self.head(feat), dim=1)

  def supcon_loss(features, labels, temperature=0.1, base_temperature=0.07):
    """losses.SupConLoss, contrast_mode='all': features [bsz, views, dim]."""
    bsz, views = features.shape[:2]
    labels = labels.view(-1, 1)
    mask = torch.eq(labels, labels.T).float().repeat(views, views)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    n = bsz * views
    logits_mask = 1 - torch.eye(n, device=features.device)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()

  fns, samples = {}, {}
  gen = torch.Generator().manual_seed(0)
  for setting in args.settings.split(","):
    width, batch = SETTINGS[setting]
    images0 = torch.rand(batch * 2, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    for dtype in ("float32", "bfloat16"):
      for channels_last in (False, True):
        model = SupConResNet(width)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        images = images0.contiguous(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                              weight_decay=1e-4)

        # Defaults bind this setting's tensors (a closure would see the last).
        def step(model=model, opt=opt, images=images, labels=labels,
                 dtype=dtype, batch=batch):
          for _ in range(args.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16,
                                enabled=dtype == "bfloat16"):
              z = model(images)
            # The official code splits the 2*bsz rows back into two views.
            f1, f2 = torch.split(z.float(), [batch, batch], dim=0)
            loss = supcon_loss(torch.stack([f1, f2], 1), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
          return loss.item()
        name = (f"{setting} | torch {dtype}"
                f"{', channels-last' if channels_last else ''}")
        fns[name], samples[name] = step, batch * args.steps
  return _time_round_robin(fns, samples, args.repeats)


# --------------------------------------------------------------------- driver
def run_worker(framework, args):
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={framework}",
         f"--settings={args.settings}", f"--steps={args.steps}",
         f"--repeats={args.repeats}", f"--threads={args.threads}",
         f"--inter_threads={args.inter_threads}"]
  cmd += ["--xla"] if args.xla else []
  cmd += [] if framework == "tf" and args.pipeline else ["--no_pipeline"]
  cmd += [f"--data_dir={args.data_dir}"] if args.data_dir else []
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             OMP_NUM_THREADS=str(args.threads),
             MKL_NUM_THREADS=str(args.threads))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(
      [root] + [p for p in [env.get("PYTHONPATH")] if p])
  proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=False)
  if proc.returncode:
    raise RuntimeError(f"{framework} worker failed (exit {proc.returncode}): "
                       f"{' '.join(cmd)}")
  return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def report(rates, settings):
  def fmt(r):
    return (f"{min(r):7.1f} / {statistics.median(r):7.1f} / "
            f"{max(r):7.1f}")
  print("| setting | run | samples/s min / median / max "
        "| vs best torch |")
  print("|---|---|---|---|")
  for setting in settings:
    rows = {k.split(" | ", 1)[1]: v for k, v in rates.items()
            if k.startswith(setting + " |")}
    torch_rows = [statistics.median(v) for k, v in rows.items()
                  if k.startswith("torch")]
    best = max(torch_rows) if torch_rows else None
    width, batch = SETTINGS[setting]
    for name, r in rows.items():
      ratio = (f"{statistics.median(r) / best:.2f}x" if best
               and not name.startswith("input") else "")
      print(f"| {setting} (width {width}, batch {batch}) | {name} | {fmt(r)} "
            f"| {ratio} |")


def main():
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--settings", default="full,budget",
                      help="comma list of: " + ", ".join(SETTINGS))
  parser.add_argument("--frameworks", default="tf,torch")
  parser.add_argument("--steps", type=int, default=3,
                      help="steps per timed call")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=physical_cores())
  parser.add_argument("--inter_threads", type=int, default=1)
  parser.add_argument("--xla", action="store_true",
                      help="also time supcon_tf with jit_compile=True")
  parser.add_argument("--no_pipeline", dest="pipeline", action="store_false")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default: $TFDS_DATA_DIR)")
  parser.add_argument("--quick", action="store_true",
                      help="1 step x 2 repeats (smoke run; noisy numbers)")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:
    args.steps, args.repeats = 1, 2
  for s in args.settings.split(","):
    if s not in SETTINGS:
      raise ValueError(f"--settings: unknown {s!r}; choose from "
                       f"{sorted(SETTINGS)}.")
  if args.worker:
    worker = {"tf": tf_worker, "torch": torch_worker}[args.worker]
    print(json.dumps(worker(args)))
    return
  model, flags = cpu_description()
  print(f"CPU: {model}; {os.cpu_count()} logical, {physical_cores()} "
        f"physical cores\nflags: {' '.join(flags)}")
  print(f"threads: intra-op {args.threads}, inter-op {args.inter_threads} "
        f"(tf.config.threading / torch.set_num_threads; OMP_NUM_THREADS="
        f"{args.threads}); steps per call {args.steps}, repeats "
        f"{args.repeats}\n")
  rates = {}
  for framework in args.frameworks.split(","):
    if framework == "torch":
      try:
        import torch  # pylint: disable=g-import-not-at-top,unused-import
      except ImportError:
        print("note: PyTorch not installed (pip install torch==2.13.0); "
              "peer skipped.\n")
        continue
    start = time.perf_counter()
    rates.update(run_worker(framework, args))
    print(f"[{framework}: {time.perf_counter() - start:.0f} s]")
    sys.stdout.flush()
  report(rates, args.settings.split(","))


if __name__ == "__main__":
  main()
