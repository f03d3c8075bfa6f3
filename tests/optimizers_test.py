"""Tests for supcon_tf.optimizers."""

import math
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import config as config_lib
from supcon_tf import models
from supcon_tf import optimizers


def _lars_reference(params, grads_per_step, *, lr, momentum, weight_decay,
                    eta, nesterov, excluded, decoupled_decay=0.0):
  """Float64 LARS (SimCLR classic-momentum form) on dicts of arrays.

  `decoupled_decay` adds Keras-style `w -= lr * wd * w` before each step; it
  models the double application the optimiser must avoid.
  """
  w = {k: np.array(v, np.float64) for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in w.items()}
  for grads in grads_per_step:
    for k in w:
      w[k] = w[k] - lr * decoupled_decay * w[k]
      g = np.array(grads[k], np.float64)
      trust = 1.0
      if not excluded[k]:
        g = g + weight_decay * w[k]
        w_norm, g_norm = np.linalg.norm(w[k]), np.linalg.norm(g)
        if w_norm > 0 and g_norm > 0:
          trust = eta * w_norm / g_norm
      buf[k] = momentum * buf[k] + lr * trust * g
      if nesterov:
        w[k] = w[k] - (momentum * buf[k] + lr * trust * g)
      else:
        w[k] = w[k] - buf[k]
  return w


def _tiny_variables(rng):
  """A kernel, a bias, a BN-named gamma and an unnamed rank-1 scale."""
  values = {
      "kernel": rng.normal(size=(2, 3)),
      "bias": rng.normal(size=(3,)),
      # Rank 2 on purpose: only the name can exclude it.
      "gamma": rng.normal(size=(1, 3)),
      # Neutral name: only the rank can exclude it.
      "scale": rng.normal(size=(3,)),
  }
  variables = {}
  with keras.name_scope("dense"):
    variables["kernel"] = keras.Variable(values["kernel"], name="kernel",
                                         dtype="float32")
    variables["bias"] = keras.Variable(values["bias"], name="bias",
                                       dtype="float32")
  with keras.name_scope("batch_normalization"):
    variables["gamma"] = keras.Variable(values["gamma"], name="gamma",
                                        dtype="float32")
  with keras.name_scope("head"):
    variables["scale"] = keras.Variable(values["scale"], name="scale",
                                        dtype="float32")
  # float32-exact starting values, so the reference starts where TF does.
  values = {k: v.numpy().astype(np.float64) for k, v in variables.items()}
  return values, variables


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_numpy_reference(nesterov):
  rng = np.random.default_rng(0)
  values, variables = _tiny_variables(rng)
  names = list(variables)
  grads_per_step = [{k: rng.normal(size=v.shape).astype(np.float32)
                     for k, v in values.items()} for _ in range(3)]
  hparams = dict(lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.05,
                 nesterov=nesterov)
  opt = optimizers.LARS(
      learning_rate=hparams["lr"], momentum=hparams["momentum"],
      weight_decay=hparams["weight_decay"], eta=hparams["eta"],
      nesterov=nesterov)
  for grads in grads_per_step:
    opt.apply([tf.constant(grads[k]) for k in names],
              [variables[k] for k in names])

  excluded = {"kernel": False, "bias": True, "gamma": True, "scale": True}
  expected = _lars_reference(values, grads_per_step, excluded=excluded,
                             **hparams)
  for k in names:
    np.testing.assert_allclose(variables[k].numpy(), expected[k], rtol=1e-6,
                               atol=1e-6, err_msg=k)

  # Excluded variables follow plain momentum SGD (no decay, no trust ratio),
  # which is what keras SGD computes.
  sgd_values, sgd_variables = _tiny_variables(np.random.default_rng(0))
  sgd = keras.optimizers.SGD(hparams["lr"], momentum=hparams["momentum"],
                             nesterov=nesterov)
  for grads in grads_per_step:
    sgd.apply([tf.constant(grads[k]) for k in names],
              [sgd_variables[k] for k in names])
  for k in ("bias", "gamma", "scale"):
    np.testing.assert_allclose(variables[k].numpy(), sgd_variables[k].numpy(),
                               rtol=1e-6, atol=1e-6, err_msg=k)
  assert not np.allclose(variables["kernel"].numpy(),
                         sgd_variables["kernel"].numpy(), atol=1e-3)

  # The reference is sensitive to the mistakes the optimiser must avoid.
  doubled = _lars_reference(values, grads_per_step, excluded=excluded,
                            decoupled_decay=hparams["weight_decay"], **hparams)
  all_adapted = _lars_reference(
      values, grads_per_step, excluded={k: False for k in names}, **hparams)
  for wrong in (doubled, all_adapted):
    assert max(np.abs(wrong[k] - expected[k]).max() for k in names) > 1e-3


def test_lars_applies_no_decoupled_weight_decay():
  # A zero loss gradient leaves only the folded-in decay, on the kernel only.
  lr, wd, eta = 0.5, 0.1, 0.05
  with keras.name_scope("dense"):
    kernel = keras.Variable(np.full((2, 2), 2.0), name="kernel",
                            dtype="float32")
    bias = keras.Variable(np.full((2,), 3.0), name="bias", dtype="float32")
  opt = optimizers.LARS(lr, momentum=0.0, weight_decay=wd, eta=eta)
  opt.apply([tf.zeros((2, 2)), tf.zeros((2,))], [kernel, bias])
  # g = wd * w, trust = eta * ||w|| / (wd * ||w||) = eta / wd, so the step is
  # lr * eta * w; a second, decoupled decay would add lr * wd * w.
  np.testing.assert_allclose(kernel.numpy(), 2.0 * (1 - lr * eta), rtol=1e-6)
  np.testing.assert_allclose(bias.numpy(), 3.0, rtol=1e-6)
  assert opt.weight_decay == wd


def test_lars_trust_ratio_falls_back_to_one():
  lr = 0.5
  with keras.name_scope("dense"):
    zero_kernel = keras.Variable(np.zeros((2, 3)), name="kernel",
                                 dtype="float32")
    still_kernel = keras.Variable(np.ones((2, 2)), name="kernel_b",
                                  dtype="float32")
  grad = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
  opt = optimizers.LARS(lr, momentum=0.0, weight_decay=0.0, eta=0.001)
  opt.apply([tf.constant(grad), tf.zeros((2, 2))],
            [zero_kernel, still_kernel])
  # ||w|| = 0: trust 1, so a plain SGD step (eta would have frozen it).
  np.testing.assert_allclose(zero_kernel.numpy(), -lr * grad, rtol=1e-6)
  # ||g|| = 0: trust 1, no step and no NaN.
  np.testing.assert_array_equal(still_kernel.numpy(), np.ones((2, 2)))


def test_lars_excludes_by_custom_pattern_and_var_list():
  with keras.name_scope("projection_norm"):
    normed = keras.Variable(np.ones((2, 2)), name="kernel", dtype="float32")
  with keras.name_scope("dense"):
    listed = keras.Variable(np.ones((2, 2)), name="kernel", dtype="float32")
    adapted = keras.Variable(np.ones((2, 2)), name="kernel_b",
                             dtype="float32")
  opt = optimizers.LARS(0.5, momentum=0.0, weight_decay=0.0, eta=0.01,
                        exclude_from_adaptation=["norm"])
  opt.exclude_from_weight_decay(var_list=[listed])
  grad = tf.fill((2, 2), 1.0)
  opt.apply([grad, grad, grad], [normed, listed, adapted])
  np.testing.assert_allclose(normed.numpy(), 0.5, rtol=1e-6)
  np.testing.assert_allclose(listed.numpy(), 0.5, rtol=1e-6)
  # trust = 0.01 * 2 / 2
  np.testing.assert_allclose(adapted.numpy(), 1 - 0.5 * 0.01, rtol=1e-6)


def test_lars_rejects_bad_arguments():
  with pytest.raises(ValueError, match="momentum"):
    optimizers.LARS(0.1, momentum=1.0)
  with pytest.raises(ValueError, match="eta"):
    optimizers.LARS(0.1, eta=0.0)
  with pytest.raises(ValueError, match="weight_decay"):
    optimizers.LARS(0.1, weight_decay=-1.0)
  with pytest.raises(ValueError, match="exclude_from_adaptation"):
    optimizers.LARS(0.1, exclude_from_adaptation="bias")


def test_lars_config_round_trip():
  schedule = optimizers.WarmupCosine(2.0, 3, 10, end_fraction=0.1)
  opt = optimizers.LARS(schedule, momentum=0.8, weight_decay=1e-2, eta=0.02,
                        nesterov=True, exclude_from_adaptation=("norm",),
                        clipnorm=5.0, name="my_lars")
  restored = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(opt))
  assert isinstance(restored, optimizers.LARS)
  assert restored is not opt
  config, restored_config = opt.get_config(), restored.get_config()
  assert restored_config == config
  assert config["exclude_from_adaptation"] == ["norm"]
  assert config["weight_decay"] == 1e-2
  assert isinstance(restored._learning_rate, optimizers.WarmupCosine)

  # Same hyper-parameters, same steps.
  rng = np.random.default_rng(1)
  init = rng.normal(size=(3, 2))
  grads = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(4)]
  results = []
  for o in (opt, restored):
    v = keras.Variable(init, name="kernel", dtype="float32")
    for g in grads:
      o.apply([tf.constant(g)], [v])
    results.append(v.numpy())
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
  assert not np.allclose(results[0], init)


@pytest.mark.parametrize("dtype", ["int64", "int32", "float32"])
def test_warmup_cosine_values(dtype):
  peak, end = 2.0, 0.2
  schedule = optimizers.WarmupCosine(
      peak=peak, warmup_steps=10, total_steps=110, end_fraction=0.1)
  steps = [0, 5, 10, 35, 60, 110, 500]
  expected = [
      0.0,  # start of warm-up
      1.0,  # half-way through warm-up
      2.0,  # end of warm-up: the peak
      end + (peak - end) * 0.5 * (1 + math.cos(math.pi / 4)),
      1.1,  # half-way through the decay: (peak + end) / 2
      0.2,  # end of the decay
      0.2,  # constant afterwards
  ]

  @tf.function
  def rates(s):
    return tf.stack([schedule(s[i]) for i in range(len(steps))])

  got = rates(tf.constant(steps, dtype=dtype)).numpy()
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  assert float(schedule(5)) == pytest.approx(1.0)


def test_warmup_cosine_without_warmup_starts_at_peak():
  schedule = optimizers.WarmupCosine(peak=1.0, warmup_steps=0, total_steps=4)
  got = [float(schedule(s)) for s in range(6)]
  np.testing.assert_allclose(got, [1.0, 0.853553, 0.5, 0.146447, 0.0, 0.0],
                             atol=1e-6)


def test_warmup_cosine_config_round_trip_and_errors():
  schedule = optimizers.WarmupCosine(0.3, 7, 70, end_fraction=0.25,
                                     name="sched")
  restored = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(schedule))
  assert isinstance(restored, optimizers.WarmupCosine)
  assert restored.get_config() == schedule.get_config()
  from_config = optimizers.WarmupCosine.from_config(schedule.get_config())
  for s in (0, 3, 7, 30, 70, 100):
    assert float(restored(s)) == pytest.approx(float(schedule(s)))
    assert float(from_config(s)) == pytest.approx(float(schedule(s)))
  with pytest.raises(ValueError, match="total_steps"):
    optimizers.WarmupCosine(1.0, warmup_steps=10, total_steps=5)
  with pytest.raises(ValueError, match="end_fraction"):
    optimizers.WarmupCosine(1.0, 0, 5, end_fraction=2.0)


def test_scaled_learning_rate():
  assert optimizers.scaled_learning_rate(0.5, 1024) == pytest.approx(2.0)
  assert optimizers.scaled_learning_rate(0.1, 128) == pytest.approx(0.05)
  assert optimizers.scaled_learning_rate(0.3, 256) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="global_batch_size"):
    optimizers.scaled_learning_rate(0.1, 0)


def _lr_at(opt, step):
  opt.iterations.assign(step)
  return float(opt.learning_rate)


@pytest.mark.parametrize("name,cls", [
    ("sgd", keras.optimizers.SGD),
    ("lars", optimizers.LARS),
    ("adamw", keras.optimizers.AdamW),
    ("lamb", keras.optimizers.Lamb),
])
def test_build_optimizer_class_and_schedule(name, cls):
  config = config_lib.OptimizerConfig(
      name=name, learning_rate=0.5, momentum=0.8, weight_decay=1e-3,
      warmup_epochs=2, schedule="cosine")
  opt = optimizers.build_optimizer(
      config, global_batch_size=512, total_steps=100, steps_per_epoch=10)
  assert type(opt) is cls
  assert _lr_at(opt, 0) == pytest.approx(0.0)
  assert _lr_at(opt, 10) == pytest.approx(0.5)
  assert _lr_at(opt, 20) == pytest.approx(1.0)  # 0.5 * 512 / 256
  assert _lr_at(opt, 60) == pytest.approx(0.5)
  assert _lr_at(opt, 100) == pytest.approx(0.0, abs=1e-7)
  assert opt.weight_decay == pytest.approx(1e-3)
  if name in ("sgd", "lars"):
    assert opt.momentum == pytest.approx(0.8)
  else:
    assert opt.beta_1 == pytest.approx(0.8)


def test_build_optimizer_constant_schedule():
  base = dict(name="sgd", learning_rate=0.4, schedule="constant")
  no_warmup = optimizers.build_optimizer(
      config_lib.OptimizerConfig(**base, scale_by_batch=False),
      global_batch_size=512, total_steps=50, steps_per_epoch=10)
  assert [_lr_at(no_warmup, s) for s in (0, 25, 50, 80)] == pytest.approx(
      [0.4] * 4)
  warm = optimizers.build_optimizer(
      config_lib.OptimizerConfig(**base, warmup_epochs=0.5),
      global_batch_size=128, total_steps=50, steps_per_epoch=10)
  assert [_lr_at(warm, s) for s in (0, 1, 5, 25, 50, 80)] == pytest.approx(
      [0.0, 0.04, 0.2, 0.2, 0.2, 0.2])


def test_fit_warmup_keeps_what_fits_and_shortens_the_rest():
  assert optimizers.fit_warmup(0, 30) == 0
  assert optimizers.fit_warmup(30, 30) == 30
  assert optimizers.fit_warmup(703, 30) == 3  # 10 % of the run.
  assert optimizers.fit_warmup(31, 1) == 0


def test_build_optimizer_shortens_a_warmup_longer_than_the_run(caplog):
  # 0.5 epochs of 1,406 steps in a 30-step run: 3 warm-up steps.
  config = config_lib.OptimizerConfig(
      name="sgd", learning_rate=0.3, warmup_epochs=0.5, schedule="constant")
  with caplog.at_level("WARNING"):
    opt = optimizers.build_optimizer(config, global_batch_size=256,
                                     total_steps=30, steps_per_epoch=1406)
  assert [_lr_at(opt, s) for s in (0, 1, 3, 29)] == pytest.approx(
      [0.0, 0.1, 0.3, 0.3])
  assert "is 703 steps, more than the run's 30" in caplog.text
  assert "warming up for 3 steps instead" in caplog.text


def test_build_optimizer_rejects_bad_lengths():
  config = config_lib.OptimizerConfig(warmup_epochs=20)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optimizers.build_optimizer(config, global_batch_size=256,
                               total_steps=100, steps_per_epoch=0)


def _decay_variables():
  with keras.name_scope("dense"):
    kernel = keras.Variable(np.ones((2, 2)), name="kernel", dtype="float32")
    bias = keras.Variable(np.ones((2,)), name="bias", dtype="float32")
  with keras.name_scope("head"):
    scale = keras.Variable(np.ones((2,)), name="scale", dtype="float32")
  return [kernel, bias, scale]


def test_build_optimizer_sgd_excludes_norm_and_bias_from_decay():
  config = config_lib.OptimizerConfig(
      name="sgd", learning_rate=0.5, momentum=0.0, weight_decay=0.1,
      schedule="constant", scale_by_batch=False)
  zeros = [tf.zeros((2, 2)), tf.zeros((2,)), tf.zeros((2,))]
  decayed = 1 - 0.5 * 0.1

  by_name = optimizers.build_optimizer(
      config, global_batch_size=256, total_steps=10, steps_per_epoch=5)
  kernel, bias, scale = _decay_variables()
  by_name.apply(zeros, [kernel, bias, scale])
  np.testing.assert_allclose(kernel.numpy(), decayed, rtol=1e-6)
  np.testing.assert_allclose(bias.numpy(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(scale.numpy(), decayed, rtol=1e-6)

  by_rank = optimizers.build_optimizer(
      config, global_batch_size=256, total_steps=10, steps_per_epoch=5)
  variables = _decay_variables()
  optimizers.exclude_norm_and_bias(by_rank, variables)
  by_rank.apply(zeros, variables)
  np.testing.assert_allclose(variables[0].numpy(), decayed, rtol=1e-6)
  np.testing.assert_allclose(variables[1].numpy(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(variables[2].numpy(), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="already built"):
    optimizers.exclude_norm_and_bias(by_rank, variables)


def _mirrored_problem(strategy, x, y, grad_steps, rng_seed=3):
  """Trains out = (x @ kernel) * gamma + bias with LARS; returns the values."""
  rng = np.random.default_rng(rng_seed)
  init = {"kernel": rng.normal(size=(4, 3)), "gamma": rng.normal(size=(1, 3)),
          "bias": rng.normal(size=(3,))}
  with strategy.scope():
    with keras.name_scope("dense"):
      kernel = keras.Variable(init["kernel"], name="kernel", dtype="float32")
      bias = keras.Variable(init["bias"], name="bias", dtype="float32")
    with keras.name_scope("batch_normalization"):
      gamma = keras.Variable(init["gamma"], name="gamma", dtype="float32")
    variables = [kernel, gamma, bias]
    opt = optimizers.LARS(
        optimizers.WarmupCosine(0.5, 1, 3), momentum=0.9,
        weight_decay=0.05, eta=0.1, nesterov=True)
    opt.build(variables)

  def replica_step(xb, yb):
    with tf.GradientTape() as tape:
      out = tf.matmul(xb, kernel) * gamma + bias
      # A sum, so per-replica gradients add up to the full-batch gradient.
      loss = tf.reduce_sum(tf.square(out - yb))
    grads = tape.gradient(loss, variables)
    opt.apply(grads, variables)

  replicas = strategy.num_replicas_in_sync
  per_replica = len(x) // replicas

  def shard(data):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(data[ctx.replica_id_in_sync_group *
                                     per_replica:
                                     (ctx.replica_id_in_sync_group + 1) *
                                     per_replica]))

  @tf.function
  def train_step(xb, yb):
    strategy.run(replica_step, args=(xb, yb))

  xs, ys = shard(x), shard(y)
  for _ in range(grad_steps):
    train_step(xs, ys)
  copies = [[c.numpy() for c in strategy.experimental_local_results(v.value)]
            for v in variables]
  return copies


def test_lars_mirrored_matches_single_device():
  devices = tf.config.list_logical_devices("CPU")
  assert len(devices) >= 2, "tests/conftest.py configures logical CPUs"
  rng = np.random.default_rng(5)
  x = rng.normal(size=(8, 4)).astype(np.float32)
  y = rng.normal(size=(8, 3)).astype(np.float32)
  mirrored = conftest.make_mirrored(2)
  single = tf.distribute.OneDeviceStrategy(devices[0].name)
  got = _mirrored_problem(mirrored, x, y, grad_steps=3)
  want = _mirrored_problem(single, x, y, grad_steps=3)
  start = _mirrored_problem(single, x, y, grad_steps=0)
  for copies, (reference,), (initial,) in zip(got, want, start):
    assert len(copies) == 2
    np.testing.assert_allclose(copies[0], copies[1], rtol=0, atol=0)
    np.testing.assert_allclose(copies[0], reference, rtol=1e-5, atol=1e-6)
    assert not np.allclose(reference, initial)




def _decay_only_step(name, variables):
  """One step of `build_optimizer(name)` with zero gradients: decay alone.

  Returns:
    The values of `variables` before the step.
  """
  optimizer = optimizers.build_optimizer(
      config_lib.OptimizerConfig(name=name, learning_rate=0.5,
                                 weight_decay=0.1, schedule="constant",
                                 warmup_epochs=0.0, scale_by_batch=False),
      global_batch_size=256, total_steps=10, steps_per_epoch=5)
  before = [v.numpy() for v in variables]
  optimizer.apply([tf.zeros_like(v) for v in variables], variables)
  return before


@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb"])
def test_build_optimizer_keeps_decay_off_resnet_norm_and_bias(name):
  # Keras 3 names batch-norm variables "gamma"/"beta" (the path holds "bn"):
  # a zero gradient must leave all of them, and the head's biases, as they
  # were while every kernel decays.
  model_config = config_lib.ModelConfig(encoder="resnet18", width=0.125)
  encoder = models.build_encoder(model_config, input_shape=(32, 32, 3),
                                 num_replicas=1)
  head = models.build_head(model_config)
  head.build(encoder.output_shape)
  variables = encoder.trainable_variables + head.trainable_variables
  before = _decay_only_step(name, variables)
  norm_and_bias = [len(v.shape) == 1 for v in variables]
  assert sum(norm_and_bias) == 42  # 20 BN layers x (gamma, beta) + 2 biases
  for v, b, excluded in zip(variables, before, norm_and_bias):
    if excluded:
      np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)
    else:
      assert np.abs(v.numpy()).sum() < np.abs(b).sum(), v.path


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_build_optimizer_keeps_decay_off_norms_of_any_name(name):
  # Layer names of other encoders need not contain "bn": a LayerNorm called
  # "ln" and a BatchNorm called "norm" keep their scales and offsets.
  model = keras.Sequential([
      keras.Input((4,)), keras.layers.Dense(3, name="proj"),
      keras.layers.LayerNormalization(name="ln"),
      keras.layers.BatchNormalization(name="norm")])
  variables = model.trainable_variables
  before = _decay_only_step(name, variables)
  changed = {v.path.split("/", 1)[1]: not np.array_equal(v.numpy(), b)
             for v, b in zip(variables, before)}
  assert changed == {"proj/kernel": True, "proj/bias": False,
                     "ln/gamma": False, "ln/beta": False,
                     "norm/gamma": False, "norm/beta": False}


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
