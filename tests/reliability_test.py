"""Fault injection: what a run survives, and how it fails when it cannot.

1. SIGKILL during pretraining (at a random step, and inside a checkpoint
   save) or during linear evaluation; the same command again finishes with
   the weights of an uninterrupted run, bit for bit.
2. A kill during export or checkpoint writing never publishes an
   incomplete model: the previous one stays the one that loads.
3. Non-finite loss (NaN inputs) or weights (exploding learning rate): a
   `TrainingError` naming the step, the last checkpoint is the last good one,
   and the command line exits 1.
   3b. A damaged newest checkpoint: pretraining falls back to the one
   before it, with a warning; restoring the encoder stops naming it. A full
   disk while checkpointing (ENOSPC, or a file-size limit making TF's own
   writer fail mid-file): one line, the previous checkpoint intact.
4. Same seed and configuration, same loss trajectory; another seed, another.
5. Bad inputs fail with one clear line and exit 1 before anything is written,
   also later stages run on a work dir without their inputs.
6. Serving errors: see `export_test.py` (`test_wrong_dtype_tensor_is_rejected`,
   `test_wrong_shape_is_rejected` for rank, image size and channels,
   `test_wrong_bytes_rank_is_rejected`, `test_undecodable_bytes_raise`,
   `test_numpy_float_images_are_cast_before_the_graph`); here they are sent
   between good calls under load.
7. The exported model answers 10,000 calls from 8 threads exactly as it does
   from one, with bounded memory growth.

Covered elsewhere and not repeated: an export failing by exception
(`export_test.test_crash_during_write_keeps_previous_version`), a leftover
`.tmp-*` export (`export_test.test_leftover_of_crashed_export_is_ignored`),
non-RGB TFDS datasets and grayscale/RGBA folder images
(`data_test.test_non_rgb_tfds_dataset`,
`data_test.test_folder_skip_corrupt_loads_the_rest`, which also counts the
skipped file), an unknown TFDS name or missing image folder
(`data_test.test_unknown_tfds_name`, `data_test.test_folder_missing_train_dir`),
an in-process interrupted linear evaluation
(`linear_eval_test.test_killed_run_resumes`).

Processes run `reliability_driver.py` or `python -m supcon_tf`; each pays a
TensorFlow import (~10 s on a busy 2-core machine), so tests start them
together where they can.
"""

import concurrent.futures
import contextlib
import errno
import functools
import json
import logging
import os
import pwd
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest  # pylint: disable=unused-import
import reliability_driver as driver
from supcon_tf import checkpoints
from supcon_tf import classifier as classifier_lib
from supcon_tf import config as config_lib
from supcon_tf import export
from supcon_tf import linear_eval
from supcon_tf import models
from supcon_tf import pipeline
from supcon_tf import pretrained
from supcon_tf import report_table
from supcon_tf import rundir
from supcon_tf import train_lib

TESTS = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(TESTS, "reliability_driver.py")
# Where `supcon_tf` is importable from (the repository, or Bazel runfiles).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(train_lib.__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
           PYTHONPATH=os.pathsep.join([ROOT, TESTS] + [
               p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
               if p]))
TIMEOUT = 300
RSS_GROWTH_LIMIT_MB = 200


# ----------------------------------------------------------------------------
# Helpers.


def start(args, log_path, cwd=None, env=None):
  """Starts `python *args` with stdout piped and stderr in `log_path`."""
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                             stderr=log, text=True, env={**ENV, **(env or {})},
                             cwd=cwd)
  process.log_path = log_path
  log.close()
  return process


def start_driver(tmp_path, name, *args, env=None):
  return start([DRIVER, *args], tmp_path / f"{name}.log", env=env)


def log_tail(process, chars=3000):
  with open(process.log_path) as f:
    return f.read()[-chars:]


def finish(process, expect_rc=0):
  """Waits for `process`; returns its stdout."""
  try:
    stdout, _ = process.communicate(timeout=TIMEOUT)
  finally:
    process.kill()
  assert process.returncode == expect_rc, (
      f"exit {process.returncode}, wanted {expect_rc}:\n{stdout[-2000:]}\n"
      f"{log_tail(process)}")
  return stdout


def kill_after(process, prefix, number, delay):
  """SIGKILLs `process` `delay` s after it prints `<prefix> <number>`."""
  watchdog = threading.Timer(TIMEOUT, process.kill)  # Should it hang.
  watchdog.start()
  seen = []
  try:
    for line in process.stdout:
      seen.append(line.strip())
      if seen[-1] == f"{prefix} {number}":
        time.sleep(delay)
        process.kill()
        break
    process.wait(timeout=TIMEOUT)
  finally:
    watchdog.cancel()
  assert seen and seen[-1] == f"{prefix} {number}", (
      f"exit {process.returncode} before `{prefix} {number}` (printed "
      f"{seen}):\n{log_tail(process)}")
  assert process.returncode == -9


def checkpoint_tensors(prefix):
  """Every numeric tensor of a checkpoint (the data iterator's is opaque)."""
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name)
          for name, dtype in reader.get_variable_to_dtype_map().items()
          if dtype.is_floating or dtype.is_integer}


def assert_checkpoints_load(directory):
  """Every checkpoint the `checkpoint` index file lists loads, finite.

  Files it does not list (a save killed before the index names it) are not
  checkpoints of the run: the resumed run writes over them. A listed one
  without its files can only be one that TF's clean-up of old checkpoints
  was deleting when killed; the latest is always there.

  Returns:
    `{step: {tensor name: value}}` of the listed checkpoints.
  """
  state = tf.train.get_checkpoint_state(directory)
  assert state is not None, os.listdir(directory)
  latest = os.path.join(directory,
                        os.path.basename(state.model_checkpoint_path))
  assert tf.io.gfile.exists(f"{latest}.index"), os.listdir(directory)
  loaded = {}
  for listed in state.all_model_checkpoint_paths:
    prefix = os.path.join(directory, os.path.basename(listed))
    if prefix == latest or tf.io.gfile.exists(f"{prefix}.index"):
      tensors = checkpoint_tensors(prefix)
      assert all(np.isfinite(v).all() for v in tensors.values()), prefix
      loaded[int(prefix.rsplit("-", 1)[1])] = tensors
  return loaded


def assert_same_tensors(got, want, context=""):
  assert sorted(got) == sorted(want), context
  for name in want:
    np.testing.assert_array_equal(got[name], want[name],
                                  err_msg=f"{name} {context}")


def files_of(directory, skip=("supcon_tf.",)):
  """`{relative path: bytes}` of every file under `directory` but logs."""
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      if not name.startswith(skip):
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          found[os.path.relpath(path, directory)] = f.read()
  return found


def step_of(message):
  """The step a `TrainingError` message names (`... at step N; ...`)."""
  marker = " at step "
  assert marker in message, message
  return int(message.split(marker)[1].split(";")[0])


# ----------------------------------------------------------------------------
# 1 and 2. Killed processes.


@pytest.mark.slow
def test_pretrain_killed_anywhere_resumes_bit_exact(tmp_path):
  rng = random.Random()
  seed = int(os.environ.get("KILL_SEED", rng.randrange(10**6)))
  rng.seed(seed)
  kill_step = rng.randint(3, driver.STEPS - 2)  # After the first checkpoint.
  delay = rng.uniform(0.0, 0.6)  # Between steps, in a save or in the next.
  where = (f"kill after step {kill_step} + {delay:.2f} s (seed {seed}; "
           f"rerun with KILL_SEED={seed})")
  dirs = {name: str(tmp_path / name) for name in ("straight", "random",
                                                  "in_save")}
  straight = start_driver(tmp_path, "straight", "pretrain", dirs["straight"])
  randomly = start_driver(tmp_path, "random", "pretrain", dirs["random"],
                          "--sleep=0.4")
  in_save = start_driver(tmp_path, "in_save", "pretrain", dirs["in_save"],
                         "--die_in_save=6")

  kill_after(randomly, "step", kill_step, delay)
  finish(in_save, expect_rc=-9)
  ckpt = {name: os.path.join(path, "checkpoints")
          for name, path in dirs.items()}
  survived = assert_checkpoints_load(ckpt["random"])
  assert 2 <= max(survived) <= kill_step, (where, sorted(survived))
  # ckpt-6 was complete on disk, but the index file is written last: the
  # run resumes from ckpt-4.
  assert checkpoint_tensors(os.path.join(ckpt["in_save"], "ckpt-6"))
  assert tf.train.latest_checkpoint(ckpt["in_save"]).endswith("ckpt-4")
  assert sorted(assert_checkpoints_load(ckpt["in_save"])) == [2, 4]

  resumed = [start_driver(tmp_path, f"{name}_again", "pretrain", dirs[name])
             for name in ("random", "in_save")]
  for process in [straight] + resumed:
    finish(process)
  final = {name: assert_checkpoints_load(path) for name, path in ckpt.items()}
  for name in ("random", "in_save"):
    assert sorted(final[name]) == sorted(final["straight"]) == [8, 10, 12]
    for step in (8, 10, 12):
      # Model, optimizer slots, step counter: all bit-identical.
      assert_same_tensors(final[name][step], final["straight"][step],
                          f"{name}: {where}")


# 2.5 global batches of keys (8 samples x 2 views a step): the queue wraps
# around within the run, mid-step, so its pointer is rarely 0.
QUEUE_SIZE = 40
QUEUE_TENSORS = ("queue/.ATTRIBUTES/VARIABLE_VALUE",
                 "queue_labels/.ATTRIBUTES/VARIABLE_VALUE",
                 "queue_pointer/.ATTRIBUTES/VARIABLE_VALUE")


def _queue_pointer_at(step):
  return step * driver.BATCH * driver.VIEWS % QUEUE_SIZE


@pytest.mark.slow
def test_pretrain_with_queue_killed_anywhere_resumes_bit_exact(tmp_path):
  # The queue, its labels and pointer (and with momentum the key encoder and
  # head) are in the checkpoint: a run killed anywhere resumes with the
  # queue of its last checkpoint and ends as an uninterrupted one, bit for
  # bit. XBM (momentum 0) and MoCo (0.9) runs go side by side.
  rng = random.Random()
  seed = int(os.environ.get("KILL_SEED", rng.randrange(10**6)))
  rng.seed(seed)
  runs = {}
  for momentum in (0.0, 0.9):
    kill_step = rng.randint(3, driver.STEPS - 2)  # After the 1st checkpoint.
    delay = rng.uniform(0.0, 0.6)  # Between steps, in a save or in the next.
    runs[momentum] = dict(
        kill_step=kill_step, delay=delay,
        flags=(f"--queue_size={QUEUE_SIZE}", f"--momentum={momentum}"),
        where=(f"momentum {momentum}: kill after step {kill_step} + "
               f"{delay:.2f} s (seed {seed}; rerun with KILL_SEED={seed})"),
        dirs={name: str(tmp_path / f"{name}_{momentum}")
              for name in ("straight", "random")})
  processes = {}
  for momentum, run in runs.items():
    processes[momentum, "straight"] = start_driver(
        tmp_path, f"straight_{momentum}", "pretrain",
        run["dirs"]["straight"], *run["flags"])
    processes[momentum, "random"] = start_driver(
        tmp_path, f"random_{momentum}", "pretrain", run["dirs"]["random"],
        "--sleep=0.4", *run["flags"])
  # Each watched from its own thread: the kills land at their own steps.
  with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
    kills = [pool.submit(kill_after, processes[momentum, "random"], "step",
                         run["kill_step"], run["delay"])
             for momentum, run in runs.items()]
  for kill in kills:
    kill.result()
  for momentum, run in runs.items():
    run["ckpt"] = {name: os.path.join(path, "checkpoints")
                   for name, path in run["dirs"].items()}
    survived = assert_checkpoints_load(run["ckpt"]["random"])
    assert 2 <= max(survived) <= run["kill_step"], (run["where"],
                                                    sorted(survived))
    for step, tensors in survived.items():
      assert int(tensors[QUEUE_TENSORS[2]]) == _queue_pointer_at(step), (
          run["where"], step)
    processes[momentum, "resumed"] = start_driver(
        tmp_path, f"random_again_{momentum}", "pretrain",
        run["dirs"]["random"], *run["flags"])
  for (momentum, name), process in processes.items():
    if name != "random":
      finish(process)

  for momentum, run in runs.items():
    final = {name: assert_checkpoints_load(path)
             for name, path in run["ckpt"].items()}
    assert sorted(final["random"]) == sorted(final["straight"]) == [8, 10, 12]
    last = final["straight"][driver.STEPS]
    assert all(name in last for name in QUEUE_TENSORS), sorted(last)
    assert last[QUEUE_TENSORS[0]].shape == (QUEUE_SIZE, 8)
    # Full (no empty slot, label -1) and wrapped around.
    assert np.all(last[QUEUE_TENSORS[1]] >= 0), last[QUEUE_TENSORS[1]]
    assert int(last[QUEUE_TENSORS[2]]) == _queue_pointer_at(driver.STEPS)
    assert _queue_pointer_at(driver.STEPS) != 0
    key_names = sorted(name for name in last
                       if name.startswith(("key_encoder/", "key_head/")))
    assert any(name.startswith("key_encoder/") for name in key_names) == (
        bool(momentum)), sorted(last)
    assert any(name.startswith("key_head/") for name in key_names) == (
        bool(momentum)), sorted(last)
    if momentum:
      # The key networks are a state of their own, not copies of the online
      # ones: the head's weights and the encoder's batch-norm statistics
      # (the online encoder's other weights sit under `optimizer/`).
      pairs = [(key, key[len("key_"):]) for key in key_names
               if key[len("key_"):] in last]
      assert any(key.startswith("key_head/") for key, _ in pairs), key_names
      assert any(key.startswith("key_encoder/") for key, _ in pairs), (
          key_names)
      assert any(not np.array_equal(last[key], last[online])
                 for key, online in pairs if key.startswith("key_head/"))
      assert any(not np.array_equal(last[key], last[online])
                 for key, online in pairs if key.startswith("key_encoder/"))
    for step in (8, 10, 12):
      # Model, optimizer slots, step counter, queue, its labels and
      # pointer, key encoder and head: all bit-identical.
      assert_same_tensors(final["random"][step], final["straight"][step],
                          run["where"])


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def start_workers(tmp_path, name, workdir, workers=2):
  """The workers of a loopback cluster running the pretrain driver."""
  cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(workers)]}
  return [start_driver(
      tmp_path, f"{name}-{index}", "pretrain", workdir, "--sleep=0.3",
      "--multi_worker", env={"TF_CONFIG": json.dumps(
          {"cluster": cluster, "task": {"type": "worker", "index": index}})})
          for index in range(workers)]


@pytest.mark.long
@pytest.mark.parametrize("where", ["replicas", "workers"])
def test_distributed_pretrain_killed_resumes_bit_exact(tmp_path, where):
  # The input iterator of a multi-device strategy cannot be checkpointed:
  # the resumed run must still read on from the restored step.
  dirs = {name: str(tmp_path / name) for name in ("straight", "killed")}
  if where == "replicas":
    runs = {name: [start_driver(tmp_path, name, "pretrain", path,
                                "--sleep=0.3", "--replicas=2")]
            for name, path in dirs.items()}
  else:
    runs = {name: start_workers(tmp_path, name, path)
            for name, path in dirs.items()}
  kill_after(runs["killed"][0], "step", 5, 0.0)  # After ckpt-4.
  for process in runs["killed"][1:]:
    process.kill()
    process.wait(timeout=TIMEOUT)
  for process in runs["straight"]:
    finish(process)
  ckpt = {name: os.path.join(path, "checkpoints")
          for name, path in dirs.items()}
  assert max(assert_checkpoints_load(ckpt["killed"])) == 4
  if where == "replicas":
    again = [start_driver(tmp_path, "again", "pretrain", dirs["killed"],
                          "--replicas=2")]
  else:
    again = start_workers(tmp_path, "again", dirs["killed"])
  for process in again:
    finish(process)
  final = {name: assert_checkpoints_load(path) for name, path in ckpt.items()}
  assert sorted(final["killed"]) == sorted(final["straight"]) == [8, 10, 12]
  for step in (8, 10, 12):
    assert_same_tensors(final["killed"][step], final["straight"][step],
                        f"{where}, step {step}")


@pytest.mark.slow
def test_linear_eval_killed_resumes_bit_exact(tmp_path):
  rng = random.Random()
  seed = int(os.environ.get("KILL_SEED", rng.randrange(10**6)))
  rng.seed(seed)
  # Epochs count on over both learning rates (1..2 * EPOCHS).
  kill_epoch = rng.randint(1, 2 * driver.EPOCHS - 1)
  delay = rng.uniform(0.0, 0.6)
  dirs = {name: tmp_path / name for name in ("straight", "killed")}
  straight = start_driver(tmp_path, "straight", "linear",
                          str(dirs["straight"]))
  killed = start_driver(tmp_path, "killed", "linear", str(dirs["killed"]),
                        "--sleep=0.4")
  kill_after(killed, "epoch", kill_epoch, delay)
  assert (dirs["killed"] / linear_eval.BACKUP_DIR).is_dir()
  assert not (dirs["killed"] / linear_eval.RESULT_FILE).exists()
  again = start_driver(tmp_path, "again", "linear", str(dirs["killed"]))
  finish(straight)
  finish(again)

  where = (f"kill after epoch {kill_epoch} + {delay:.2f} s (seed {seed}; "
           f"rerun with KILL_SEED={seed})")
  results = {}
  for name, path in dirs.items():
    assert not (path / linear_eval.BACKUP_DIR).exists(), where
    results[name] = json.loads((path / linear_eval.RESULT_FILE).read_text())
  # The per-epoch losses and accuracies of every learning rate included.
  assert results["killed"] == results["straight"], where
  with np.load(dirs["straight"] / "linear.npz") as want, np.load(
      dirs["killed"] / "linear.npz") as got:
    for key in want.files:
      np.testing.assert_array_equal(got[key], want[key], err_msg=where)


def _serve(path, images):
  return tf.saved_model.load(path).signatures["serving_default"](
      images=images)["logits"].numpy()


@pytest.mark.slow
def test_export_killed_before_publishing_keeps_previous_version(tmp_path):
  base = tmp_path / "export"
  # Killed once its version is completely written, just before the rename
  # that publishes it: the latest instant a kill can come.
  killed = start_driver(tmp_path, "killed", "export", str(base),
                        "--die_in_export")
  classifier = classifier_lib.build_classifier(driver.tiny_encoder(),
                                               driver.CLASSES)
  first = export.export_classifier(classifier, str(base), image_size=8)
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8)
  before = _serve(first, images)
  finish(killed, expect_rc=-9)
  # Version 1 or 2, depending on which export started first.
  leftover = [n for n in os.listdir(base) if n != "1"]
  assert len(leftover) == 1 and leftover[0].startswith(
      export.TMP_PREFIX), leftover
  # It would load (it is complete), but it is not a version.
  assert tf.saved_model.load(str(base / leftover[0])) is not None
  assert export.latest_version(str(base)) == first
  np.testing.assert_array_equal(_serve(first, images), before)
  second = export.export_classifier(classifier, str(base), image_size=8)
  assert second == str(base / "2") and export.latest_version(str(base)) == (
      second)
  np.testing.assert_array_equal(_serve(second, images), before)


# ----------------------------------------------------------------------------
# 3. Non-finite numbers.


def _record_saves(monkeypatch):
  """Records the in-memory encoder weights at every checkpoint save."""
  saved = {}
  real_save = checkpoints.CheckpointSaver.save

  def save(self, step):
    encoder = self.manager.checkpoint.encoder
    saved[step] = [w.numpy().copy() for w in encoder.weights]
    return real_save(self, step)

  monkeypatch.setattr(checkpoints.CheckpointSaver, "save", save)
  return saved


def test_nan_inputs_stop_before_saving(tmp_path, monkeypatch):
  saved = _record_saves(monkeypatch)
  config = driver.tiny_config(steps=8)
  # NaN images do not always give a NaN loss: on CPU, ReLU maps NaN to 0,
  # the embeddings become zero and the loss a finite tau * ln(2B - 1). The
  # batch-norm statistics turn NaN, and the weight check stops the run.
  with pytest.raises(rundir.TrainingError, match="Non-finite") as error:
    train_lib.pretrain(config, str(tmp_path),
                       dataset_fn=functools.partial(driver.dataset_fn,
                                                    nan_from_step=5),
                       verbose=False)
  assert step_of(str(error.value)) == 5
  assert "nothing was saved after step 4" in str(error.value)
  assert sorted(saved) == [2, 4]
  ckpt = str(tmp_path / "checkpoints")
  assert tf.train.latest_checkpoint(ckpt).endswith("ckpt-4")
  assert sorted(assert_checkpoints_load(ckpt)) == [2, 4]
  restored = pretrained.restore_encoder(str(tmp_path), config,
                                       (driver.IMAGE, driver.IMAGE, 3))
  for got, want in zip(restored.weights, saved[4]):
    np.testing.assert_array_equal(got.numpy(), want)


class _ExplodingRate(keras.optimizers.schedules.LearningRateSchedule):
  """0.1 for 4 steps, then 1e20."""

  def __call__(self, step):
    return tf.where(step < 4, 0.1, 1e20)


def test_exploding_learning_rate_stops_before_saving(tmp_path, monkeypatch):
  saved = _record_saves(monkeypatch)
  monkeypatch.setattr(train_lib.optimizers, "build_optimizer",
                      lambda *args, **kwargs: keras.optimizers.SGD(
                          _ExplodingRate(), momentum=0.9))
  config = driver.tiny_config(steps=10)
  with pytest.raises(rundir.TrainingError, match="Non-finite") as error:
    train_lib.pretrain(config, str(tmp_path),
                       dataset_fn=driver.dataset_fn, verbose=False)
  # Here too the loss stays finite (zero embeddings): the weight check, not
  # the loss, stops the run, at the first step with non-finite weights.
  step = step_of(str(error.value))
  assert step >= 5, str(error.value)
  good = list(range(2, step, 2))
  assert sorted(saved) == good, str(error.value)
  ckpt = str(tmp_path / "checkpoints")
  assert tf.train.latest_checkpoint(ckpt).endswith(f"ckpt-{good[-1]}")
  assert sorted(assert_checkpoints_load(ckpt)) == good[-3:]
  restored = pretrained.restore_encoder(str(tmp_path), config,
                                       (driver.IMAGE, driver.IMAGE, 3))
  for got, want in zip(restored.weights, saved[good[-1]]):
    np.testing.assert_array_equal(got.numpy(), want)


# ----------------------------------------------------------------------------
# 3b. Damaged checkpoints and a full disk.


def _damage(prefix, how):
  """Truncates or garbles the data file of checkpoint `prefix`."""
  data_file, = tf.io.gfile.glob(f"{prefix}.data-*")
  size = os.path.getsize(data_file)
  if how == "truncated":
    os.truncate(data_file, size // 2)
  else:
    with open(data_file, "r+b") as f:
      f.seek(size // 2)
      f.write(bytes(255 - b for b in f.read(64)))


def _six_steps():
  return driver.tiny_config(steps=6)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
  """A 6-step run stopped at step 4 (checkpoints 2 and 4), ckpt-4's tensors."""
  workdir = tmp_path_factory.mktemp("four_steps")
  train_lib.pretrain(_six_steps(), str(workdir), dataset_fn=driver.dataset_fn,
                     stop_at_step=4, verbose=False)
  return workdir, checkpoint_tensors(str(workdir / "checkpoints" / "ckpt-4"))


@pytest.mark.parametrize("how", [
    "truncated", pytest.param("garbled", marks=pytest.mark.slow)])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(
    tmp_path, four_steps, how, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(four_steps[0], workdir)
  newest = str(workdir / "checkpoints" / "ckpt-4")
  _damage(newest, how)
  config = _six_steps()
  # Linear evaluation must not silently use an older encoder: it stops.
  before = files_of(workdir)
  with pytest.raises(rundir.TrainingError, match="is damaged") as error:
    pretrained.restore_encoder(str(workdir), config,
                              (driver.IMAGE, driver.IMAGE, 3))
  assert newest in str(error.value) and "\n" not in str(error.value)
  assert "--mode=pretrain" in str(error.value)
  assert files_of(workdir) == before
  # Pretraining resumes from ckpt-2 with a warning and rewrites ckpt-4 as
  # an uninterrupted run wrote it.
  with caplog.at_level(logging.WARNING):
    result = train_lib.pretrain(config, str(workdir),
                                dataset_fn=driver.dataset_fn, stop_at_step=4,
                                verbose=False)
  assert result.step == 4
  assert any(newest in r.getMessage() and "instead of the newest" in
             r.getMessage() for r in caplog.records), caplog.text
  assert_same_tensors(checkpoint_tensors(newest), four_steps[1], how)
  pretrained.restore_encoder(str(workdir), config,
                            (driver.IMAGE, driver.IMAGE, 3))


def test_every_checkpoint_damaged_stops_naming_the_newest(tmp_path,
                                                          four_steps):
  workdir = tmp_path / "run"
  shutil.copytree(four_steps[0], workdir)
  for step in (2, 4):
    _damage(str(workdir / "checkpoints" / f"ckpt-{step}"), "truncated")
  before = files_of(workdir)
  with pytest.raises(rundir.TrainingError, match="is damaged") as error:
    train_lib.pretrain(_six_steps(), str(workdir),
                       dataset_fn=driver.dataset_fn, verbose=False)
  assert str(workdir / "checkpoints" / "ckpt-4") in str(error.value)
  assert "no earlier one restores" in str(error.value)
  assert files_of(workdir) == before


def _no_space_in_checkpoint_writes(monkeypatch):
  """TF's checkpoint writer fails with ENOSPC after writing half a shard."""
  # pylint: disable=g-import-not-at-top
  from tensorflow.python.checkpoint import functional_saver
  # pylint: enable=g-import-not-at-top

  def save(self, file_prefix, options=None):
    del self, options
    prefix = file_prefix.numpy().decode()
    os.makedirs(f"{prefix}_temp", exist_ok=True)
    with open(f"{prefix}_temp/part-00000-of-00001.data-00000-of-00001",
              "wb") as f:
      f.write(b"\0" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(functional_saver.MultiDeviceSaver, "save", save)


@pytest.mark.parametrize("failure", [
    "enospc", pytest.param("file_size_limit", marks=pytest.mark.slow)])
def test_full_disk_while_checkpointing_keeps_the_previous_one(
    tmp_path, monkeypatch, four_steps, failure):
  config = _six_steps()
  workdir = tmp_path / "run"
  shutil.copytree(four_steps[0], workdir)
  ckpt = workdir / "checkpoints"
  previous = str(ckpt / "ckpt-4")
  kept = {step: checkpoint_tensors(str(ckpt / f"ckpt-{step}"))
          for step in (2, 4)}
  if failure == "enospc":
    _no_space_in_checkpoint_writes(monkeypatch)
    limit = contextlib.nullcontext()
  else:
    # The real writer (TensorFlow's C++ file system) failing mid-file.
    data_file, = tf.io.gfile.glob(f"{previous}.data-*")
    limit = conftest.file_size_limit(os.path.getsize(data_file) // 2)
  with limit, pytest.raises(rundir.TrainingError) as error:
    train_lib.pretrain(config, str(workdir), dataset_fn=driver.dataset_fn,
                       verbose=False)
  message = str(error.value)
  assert "\n" not in message, message
  assert "checkpoint of step 6" in message and previous in message, message
  if failure == "enospc":
    assert "No space left on device" in message, message
  # The failed checkpoint left nothing; the others are intact and load.
  assert not tf.io.gfile.glob(str(ckpt / "ckpt-6*")), os.listdir(ckpt)
  assert tf.train.latest_checkpoint(str(ckpt)) == previous
  for step, tensors in kept.items():
    assert_same_tensors(checkpoint_tensors(str(ckpt / f"ckpt-{step}")),
                        tensors, f"ckpt-{step}")
  pretrained.restore_encoder(str(workdir), config,
                            (driver.IMAGE, driver.IMAGE, 3))
  if failure == "file_size_limit":  # Slow already: one more run.
    # With space again, the same command finishes.
    assert train_lib.pretrain(config, str(workdir),
                              dataset_fn=driver.dataset_fn,
                              verbose=False).step == 6


# ----------------------------------------------------------------------------
# 4. Reproducibility.


def _loss_trajectory(workdir):
  losses = {}
  for path in tf.io.gfile.glob(os.path.join(workdir, "train", "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "loss":
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return [losses[step] for step in sorted(losses)]


@pytest.mark.slow
def test_same_seed_same_trajectory_other_seed_differs(tmp_path):
  trajectories = []
  for run, seed in enumerate((0, 0, 1)):
    workdir = str(tmp_path / str(run))
    train_lib.pretrain(driver.tiny_config(steps=4, seed=seed), workdir,
                       dataset_fn=driver.dataset_fn, verbose=False)
    trajectories.append(_loss_trajectory(workdir))
  same, again, other = trajectories
  assert len(same) == 4 and np.isfinite(same).all()
  assert same == again  # Exactly.
  assert all(a != b for a, b in zip(same, other)), (same, other)


# ----------------------------------------------------------------------------
# 5. Bad inputs: library level.


def test_cross_entropy_labels_out_of_range_raise():
  trainer = train_lib.Trainer(
      driver.tiny_config(method="ce"), tf.distribute.get_strategy(),
      num_classes=3, input_shape=(driver.IMAGE, driver.IMAGE, 3),
      steps_per_epoch=10)
  views = tf.zeros([4, 1, driver.IMAGE, driver.IMAGE, 3])
  assert np.isfinite(trainer.loss_terms(views, tf.constant([0, 1, 2, 2]))[
      "loss"].numpy())
  for labels in ([0, 1, 3, 2], [0, -1, 1, 2]):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"labels in \[0, num_classes=3\)"):
      trainer.loss_terms(views, tf.constant(labels))


def test_missing_dataset_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  missing = str(tmp_path / "no_tfds_here")
  config = driver.tiny_config(data=config_lib.DataConfig(
      image_size=driver.IMAGE, data_dir=missing))
  with pytest.raises(ValueError, match="not prepared") as error:
    train_lib.pretrain(config, str(workdir), verbose=False)
  assert missing in str(error.value)
  # A config.json here would refuse the corrected command as a resume.
  assert files_of(workdir) == {}


def test_unwritable_work_dir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("results")
  for workdir in (blocker, blocker / "run"):
    with pytest.raises(rundir.TrainingError, match="not writable"):
      train_lib.pretrain(driver.tiny_config(), str(workdir),
                         dataset_fn=driver.dataset_fn, verbose=False)
  assert blocker.read_text() == "results"


@contextlib.contextmanager
def _unprivileged():
  """Runs the body as user `nobody` when the tests run as root.

  Root ignores permission bits. Only the effective ids change, so the body
  ends as root again; any thread writing files meanwhile would write as
  `nobody`.
  """
  if os.geteuid() != 0:
    yield
    return
  nobody = pwd.getpwnam("nobody")
  os.setegid(nobody.pw_gid)
  os.seteuid(nobody.pw_uid)
  try:
    yield
  finally:
    os.seteuid(0)
    os.setegid(0)


def test_read_only_work_dir():
  # Not under tmp_path: pytest makes its base directory private to root.
  parent = tempfile.mkdtemp(prefix="read-only-")
  os.chmod(parent, 0o755)
  workdir = os.path.join(parent, "run")
  os.mkdir(workdir, 0o555)
  os.chmod(workdir, 0o555)  # Whatever the umask.
  try:
    with _unprivileged():
      with pytest.raises(PermissionError):
        open(os.path.join(workdir, "probe"), "w").close()
      with pytest.raises(rundir.TrainingError, match="not writable"):
        train_lib.pretrain(driver.tiny_config(), workdir,
                           dataset_fn=driver.dataset_fn, verbose=False)
    assert os.listdir(workdir) == []
  finally:
    os.chmod(workdir, 0o755)
    shutil.rmtree(parent)


def test_resume_with_changed_setting_names_it(tmp_path):
  config = driver.tiny_config()
  rundir.check_resumable(str(tmp_path), config)
  stored = (tmp_path / "config.json").read_bytes()
  changed = driver.tiny_config(loss=config_lib.LossConfig(temperature=0.5),
                               checkpoint_every=4)
  with pytest.raises(rundir.TrainingError,
                     match=r"\(loss\.temperature: 0\.1 -> 0\.5\)"):
    rundir.check_resumable(str(tmp_path), changed)
  assert (tmp_path / "config.json").read_bytes() == stored
  # checkpoint_every may change between a run and its resumption.
  rundir.check_resumable(str(tmp_path), driver.tiny_config(
      checkpoint_every=4))


def test_checkpoint_of_another_architecture_is_refused_untouched(tmp_path):
  config = driver.tiny_config(steps=2)
  train_lib.pretrain(config, str(tmp_path), dataset_fn=driver.dataset_fn,
                     verbose=False)
  before = files_of(tmp_path)
  other = models.resnet(18, width=0.125,
                        input_shape=(driver.IMAGE, driver.IMAGE, 3))
  # Same config.json, another encoder passed in.
  with pytest.raises(rundir.TrainingError, match="does not match"):
    train_lib.pretrain(config, str(tmp_path), dataset_fn=driver.dataset_fn,
                       encoder=other, verbose=False)
  assert files_of(tmp_path) == before
  # Checkpoints without their config.json (copied from elsewhere): the new
  # config must not be written beside them.
  os.remove(tmp_path / "config.json")
  del before["config.json"]
  wide_config = driver.tiny_config(
      steps=2, model=config_lib.ModelConfig(encoder="resnet18", width=0.125,
                                            projection_dim=8))
  with pytest.raises(rundir.TrainingError, match="does not match"):
    train_lib.pretrain(wide_config, str(tmp_path),
                       dataset_fn=driver.dataset_fn, verbose=False)
  assert files_of(tmp_path) == before


# ----------------------------------------------------------------------------
# 5. Bad inputs: the command line.


def _write_images(root, corrupt):
  """`root/train/<class>/*.png`, 4 images per class, plus a broken file."""
  rng = np.random.default_rng(0)
  for name in ("a", "b"):
    class_dir = root / "train" / name
    class_dir.mkdir(parents=True)
    for i in range(4):
      image = rng.integers(0, 256, (8, 8, 3), np.uint8)
      (class_dir / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
  if corrupt:
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG garbage")


def _cli(tmp_path, name, *flags):
  """Starts `python -m supcon_tf --workdir=<tmp>/<name> *flags`."""
  workdir = tmp_path / name
  if not workdir.exists():
    workdir.mkdir()
    (workdir / "report.json").write_text('{"kept": true}')
  process = start(["-m", "supcon_tf", f"--workdir={workdir}", *flags],
                  tmp_path / f"{name}.stderr", cwd=str(tmp_path))
  return dict(process=process, workdir=workdir, before=files_of(workdir))


def _cli_result(run):
  process = run["process"]
  process.communicate(timeout=TIMEOUT)
  with open(process.log_path) as f:
    stderr = f.read()
  errors = [line for line in stderr.splitlines()
            if line.startswith("supcon-tf: error: ")]
  return dict(rc=process.returncode, stderr=stderr, errors=errors,
              unchanged=files_of(run["workdir"]) == run["before"])


def _flags_of(**values):
  """The `TrainConfig` the command line builds from `values`."""
  from supcon_tf import cli  # pylint: disable=g-import-not-at-top
  argv = ["supcon-tf"] + [f"--{k}={v}" for k, v in values.items()]
  cli.FLAGS(argv)
  try:
    return cli.train_config(), cli.data_config()
  finally:
    cli.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  """Failing command lines, started together; name -> result."""
  tmp = tmp_path_factory.mktemp("cli")
  _write_images(tmp / "corrupt", corrupt=True)
  (tmp / "a_file").write_text("not a directory")
  changed = tmp / "changed" / "pretrain"
  changed.mkdir(parents=True)
  (tmp / "changed" / "report.json").write_text('{"kept": true}')
  rundir.check_resumable(str(changed), _flags_of(workdir=tmp)[0])
  pretrain = ["--mode=pretrain"]
  runs = {
      "flag_value": _cli(tmp, "flag_value", "--method=supcom"),
      "replicas": _cli(tmp, "replicas", *pretrain, "--cpu_devices=3",
                       "--strategy=mirrored", "--batch_size=8"),
      "no_data_dir": _cli(tmp, "no_data_dir", *pretrain,
                          f"--data_dir={tmp / 'no_tfds'}"),
      "corrupt": _cli(tmp, "corrupt", *pretrain,
                      f"--dataset=folder:{tmp / 'corrupt'}"),
      "changed": _cli(tmp, "changed", *pretrain, "--temperature=0.5"),
  }
  file_run = start(["-m", "supcon_tf", f"--workdir={tmp / 'a_file'}"],
                   tmp / "a_file.stderr", cwd=str(tmp))
  results = {name: _cli_result(run) for name, run in runs.items()}
  file_run.communicate(timeout=TIMEOUT)
  with open(file_run.log_path) as f:
    stderr = f.read()
  results["file_workdir"] = dict(
      rc=file_run.returncode, stderr=stderr, unchanged=(
          (tmp / "a_file").read_text() == "not a directory"),
      errors=[l for l in stderr.splitlines() if l.startswith("supcon-tf:")])
  results["tmp"] = tmp
  return results


@pytest.mark.slow
@pytest.mark.parametrize("name,message", [
    ("replicas", "batch_size=8 is not divisible by the 3 replicas"),
    ("no_data_dir", "set --data_dir"),
    ("corrupt", "broken.png"),
    ("changed", "loss.temperature: 0.1 -> 0.5"),
    ("file_workdir", "a_file"),
])
def test_command_line_fails_with_one_line(cli_runs, name, message):
  result = cli_runs[name]
  assert result["rc"] == 1, result["stderr"][-3000:]
  assert len(result["errors"]) == 1, result["stderr"][-3000:]
  assert message in result["errors"][0]
  assert "Traceback" not in result["stderr"]
  # Nothing written over what the work dir held: report.json is intact
  # and no config.json claims the work dir for the failed command.
  assert result["unchanged"], name


@pytest.mark.slow
def test_command_line_messages_name_flags(cli_runs):
  assert str(cli_runs["tmp"] / "no_tfds") in cli_runs["no_data_dir"][
      "errors"][0]
  assert "--skip_corrupt" in cli_runs["corrupt"]["errors"][0]
  assert "DataConfig" not in cli_runs["no_data_dir"]["errors"][0]
  assert "DataConfig" not in cli_runs["corrupt"]["errors"][0]


@pytest.mark.slow
def test_command_line_rejects_unknown_flag_value(cli_runs):
  result = cli_runs["flag_value"]
  assert result["rc"] == 1 and result["unchanged"]
  assert result["errors"] == [
      "supcon-tf: error: flag --method=supcom: value should be one of "
      "<supcon|simclr|npairs|ce> (--help lists the flags)"], result["stderr"]
  assert result["stderr"].strip() == result["errors"][0]


def _everything_in(directory):
  """Every path under `directory`, directories and logs included."""
  if not os.path.exists(directory):
    return None
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, dirs, files in os.walk(directory)
                for name in dirs + files)


def test_later_stages_name_what_is_missing_and_the_mode_making_it(
    tmp_path, four_steps):
  foreign = tmp_path / "foreign"
  (foreign / "pretrain" / "checkpoints").mkdir(parents=True)
  (foreign / "notes.txt").write_text("not a run")
  for workdir in (tmp_path / "missing", tmp_path, foreign):
    for mode in ("linear_eval", "export", "evaluate"):
      with pytest.raises(ValueError) as error:
        pipeline.check_prerequisites(mode, str(workdir))
      assert str(error.value) == (
          f"no pretraining checkpoint in {workdir}/pretrain/checkpoints: run "
          "--mode=pretrain (or all) first.")
  pretrained = tmp_path / "pretrained"
  shutil.copytree(four_steps[0], pretrained / "pretrain")
  pipeline.check_prerequisites("linear_eval", str(pretrained))
  for mode in ("export", "evaluate"):
    with pytest.raises(ValueError, match=(
        r"no linear classifier .*/linear_eval/classifier.keras: run "
        r"--mode=linear_eval \(or all\) first")):
      pipeline.check_prerequisites(mode, str(pretrained))
  os.remove(pretrained / "pretrain" / "config.json")
  with pytest.raises(ValueError, match="no pretraining configuration"):
    pipeline.check_prerequisites("linear_eval", str(pretrained))
  for mode in ("all", "pretrain", "train_ce"):
    pipeline.check_prerequisites(mode, str(tmp_path / "missing"))
  assert not (tmp_path / "missing").exists()
  with pytest.raises(ValueError, match="mode='al' is not one of"):
    pipeline.check_prerequisites("al", str(tmp_path))


@pytest.mark.slow
def test_later_stages_on_an_empty_or_foreign_work_dir_leave_it_as_it_was(
    tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "foreign" / "pretrain").mkdir(parents=True)
  (tmp_path / "foreign" / "notes.txt").write_text("not a run")
  runs = {}
  for name, mode in (("empty", "linear_eval"), ("missing", "export"),
                     ("foreign", "evaluate")):
    workdir = tmp_path / name
    runs[name] = (workdir, _everything_in(workdir), start(
        ["-m", "supcon_tf", f"--workdir={workdir}", f"--mode={mode}"],
        tmp_path / f"{name}.stderr", cwd=str(tmp_path)))
  for name, (workdir, before, process) in runs.items():
    process.communicate(timeout=TIMEOUT)
    stderr = log_tail(process, 100_000)
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.startswith(
        "supcon-tf:")] == [
            f"supcon-tf: error: no pretraining checkpoint in "
            f"{workdir}/pretrain/checkpoints: run --mode=pretrain (or all) "
            "first."], stderr[-3000:]
    assert _everything_in(workdir) == before, name


def test_skip_corrupt_flag_reaches_the_data_config(tmp_path):
  assert not _flags_of(workdir=tmp_path)[1].skip_corrupt
  assert _flags_of(workdir=tmp_path, skip_corrupt=True)[1].skip_corrupt


@pytest.mark.slow
def test_command_line_skips_corrupt_files_and_exits_1_on_blow_up(tmp_path):
  _write_images(tmp_path / "images", corrupt=True)
  run = _cli(
      tmp_path, "run", "--mode=pretrain", "--skip_corrupt",
      f"--dataset=folder:{tmp_path / 'images'}", "--validation_fraction=0",
      "--image_size=8", "--width=0.0625", "--projection_dim=8",
      "--batch_size=4", "--steps=10", "--steps_per_loop=1",
      "--checkpoint_every=2", "--mixed_precision=float32",
      "--learning_rate=1e20", "--nolr_scaling", "--lr_schedule=constant",
      "--warmup_epochs=0", "--weight_decay=0", "--augmentation=none")
  result = _cli_result(run)
  assert result["rc"] == 1, result["stderr"][-3000:]
  assert len(result["errors"]) == 1, result["stderr"][-3000:]
  assert "Non-finite" in result["errors"][0]
  step = step_of(result["errors"][0])
  logs = "".join(open(p).read() for p in tf.io.gfile.glob(
      str(run["workdir"] / "supcon_tf.*")))
  assert "Skipping 1 undecodable image file(s)" in logs
  ckpt = str(run["workdir"] / "pretrain" / "checkpoints")
  latest = tf.train.latest_checkpoint(ckpt)
  if latest:
    assert int(latest.rsplit("-", 1)[1]) < step
    assert_checkpoints_load(ckpt)
  assert json.loads((run["workdir"] / "report.json").read_text()) == {
      "kept": True}


# ----------------------------------------------------------------------------
# The command line end to end on a CIFAR-10 subset.


def _run_cli(*flags):
  """Runs `python -m supcon_tf *flags` to the end; returns the result."""
  return subprocess.run([sys.executable, "-m", "supcon_tf", *flags],
                        capture_output=True, text=True, env=ENV,
                        timeout=TIMEOUT * 3, check=False)


SMOKE_FLAGS = (
    "--train_examples=640", "--steps=4", "--width=0.0625", "--batch_size=16",
    "--steps_per_loop=2", "--checkpoint_every=2", "--projection_dim=8",
    "--mixed_precision=float32", "--linear_epochs=1",
    "--linear_learning_rates=0.1", "--validation_fraction=0.0002",
    "--norobustness")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TFDS_DATA_DIR"),
                    reason="TFDS_DATA_DIR is not set")
def test_smoke_run_prints_stages_and_a_table(tmp_path):
  """A CIFAR-10 subset runs end to end with the default warm-up."""
  from supcon_tf import cli  # pylint: disable=g-import-not-at-top
  # Set but without cifar10 is a broken set-up, not a reason to skip.
  tfds_data_dir = os.environ["TFDS_DATA_DIR"]
  assert os.path.isdir(os.path.join(tfds_data_dir, "cifar10")), (
      f"TFDS_DATA_DIR={tfds_data_dir} holds no cifar10/: prepare it there "
      "or unset TFDS_DATA_DIR.")
  workdir = tmp_path / "run"
  first = _run_cli(f"--workdir={workdir}", *SMOKE_FLAGS)
  assert first.returncode == 0, first.stderr[-3000:]
  lines = [line.strip() for line in re.split(r"[\r\n]", first.stdout)]
  stages = [line for line in lines if re.match(
      r"pretraining[ :]\S|linear evaluation:|exported to |evaluation:", line)]
  assert stages == [
      "pretraining 4 steps (0.1 epochs of 40 steps, batch 16, supcon, "
      "float32); "
      "warm-up shortened from 192 to 0 steps to fit the run",
      "linear evaluation: 1 learning rate x 1 epoch (batch 256)",
      f"exported to {workdir / 'export' / '1'}",
      "evaluation: k-NN accuracy, retrieval, plots",
  ]
  assert (workdir / "retrieval.json").is_file()
  report = json.loads((workdir / "report.json").read_text())
  table = report_table.summary_table(report, str(workdir)).splitlines()
  assert lines[-len(table) - 1:-1] == [line.strip() for line in table]
  assert report["pretrain"]["steps"] == 4

  again = _run_cli(f"--workdir={workdir}", "--mode=pretrain", "--json",
                   *SMOKE_FLAGS)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads(again.stdout) == report
  assert "pretraining: already done (4 steps)" in again.stderr


# ----------------------------------------------------------------------------
# 7. Under load.


def _rss_mb():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_export_under_load_from_threads(tmp_path):
  encoder = driver.tiny_encoder()
  classifier = classifier_lib.build_classifier(encoder, driver.CLASSES)
  path = export.export_classifier(classifier, str(tmp_path), image_size=8,
                                  encoder=encoder)
  loaded = tf.saved_model.load(path)
  signatures = loaded.signatures
  rng = np.random.default_rng(0)
  # Single images and batches, for the classifier and the embedding.
  pool = []
  for batch in [1] * 12 + list(range(2, 9)) + [16, 32]:
    images = tf.constant(rng.integers(0, 256, (batch, 8, 8, 3), np.uint8))
    for name in ("serving_default", "embed"):
      pool.append((name, images))
  bad = tf.zeros([1, 4, 4, 3], tf.uint8)  # Wrong image size.

  def call(index):
    name, images = pool[index]
    return {k: v.numpy() for k, v in signatures[name](images=images).items()}

  reference = [call(i) for i in range(len(pool))]
  for _ in range(10):  # Warm-up: allocator pools, traced functions.
    for i in range(len(pool)):
      call(i)
  rss_before = _rss_mb()

  threads, calls_per_thread = 8, 1250
  mismatches, errors, rejected = [], [], [0] * threads

  def work(thread):
    local = np.random.default_rng(thread)
    try:
      for n in range(calls_per_thread):
        if n % 50 == 49:  # A bad request among the good ones.
          try:
            signatures["serving_default"](images=bad)
          except tf.errors.InvalidArgumentError:
            rejected[thread] += 1
          continue
        index = int(local.integers(len(pool)))
        got = call(index)
        if any(not np.array_equal(got[k], reference[index][k])
               for k in reference[index]):
          mismatches.append((thread, n, index))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(repr(e))

  workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
  for worker in workers:
    worker.start()
  for worker in workers:
    worker.join()
  growth = _rss_mb() - rss_before
  assert not errors, errors[:3]
  assert not mismatches, mismatches[:5]
  assert rejected == [calls_per_thread // 50] * threads
  assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.0f} MB"




@pytest.mark.long
def test_command_line_multi_worker_mode_all_reaches_an_export(tmp_path):
  # Pretraining on both workers, then the later stages on the chief alone
  # while the other worker waits for it.
  rng = np.random.default_rng(0)
  for split, count in (("train", 16), ("test", 4)):
    for name in ("a", "b"):
      class_dir = tmp_path / "images" / split / name
      class_dir.mkdir(parents=True)
      for i in range(count):
        image = rng.integers(0, 256, (8, 8, 3), np.uint8)
        (class_dir / f"{i}.png").write_bytes(
            tf.io.encode_png(image).numpy())
  workdir = tmp_path / "run"
  flags = [f"--workdir={workdir}", "--strategy=multi_worker",
           f"--dataset=folder:{tmp_path / 'images'}", "--image_size=8",
           "--width=0.0625", "--projection_dim=8", "--batch_size=8",
           "--steps=4", "--steps_per_loop=2", "--checkpoint_every=2",
           "--warmup_epochs=0", "--mixed_precision=float32",
           "--linear_epochs=1", "--linear_learning_rates=0.3",
           "--linear_batch_size=8", "--norobustness"]
  cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
  workers = [start(["-m", "supcon_tf", *flags], tmp_path / f"worker{i}.log",
                   cwd=str(tmp_path), env={"TF_CONFIG": json.dumps(
                       {"cluster": cluster,
                        "task": {"type": "worker", "index": i}})})
             for i in range(2)]
  for process in workers:
    finish(process)
  with open(workdir / "report.json") as f:
    report = json.load(f)
  assert report["pretrain"]["steps"] == 4
  assert 0.0 <= report["linear_eval"]["test_top1"] <= 1.0
  assert report["export"] == str(workdir / "export" / "1")
  assert (workdir / "export" / "1" / "saved_model.pb").exists()


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
