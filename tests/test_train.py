"""One real step of each stage on tfds mock data; the optimizer and schedules; the
frozen teacher; evaluation sums; 1 vs 4 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from fsp_jax import data, methods, fsp, models, train


def _mesh(devices):
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def _network(ds, model_name="cifar_resnet8"):
  return models.Network(models.create_model(model_name, 10),
                        tuple(float(v) for v in ds.mean), tuple(float(v) for v in ds.std))


def _setup(ds, mesh, model_name="cifar_resnet8", lr=0.1, wd=1e-4):
  net = _network(ds, model_name)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(net.init(jax.random.PRNGKey(0), ds.image_shape), replicated)
  tx = train.create_optimizer(train.create_learning_rate_fn((lr,), ()), 0.9, wd)
  return net, train.create_train_state(net, variables, tx), replicated


def _fsp(net):
  return methods.FSP(fsp.default_fsp_pairs(net.feature_names))


@pytest.fixture(scope="module")
def cifar_mock():
  with tfds.testing.mock_data(num_examples=16):
    return data.load_tfds("cifar10")


def test_learning_rate_schedule_is_piecewise_in_iterations():
  fn = train.create_learning_rate_fn((0.1, 0.01, 0.001), (32000, 48000))
  got = [float(fn(s)) for s in (0, 31999, 32000, 47999, 48000, 64000)]
  np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  with pytest.raises(ValueError, match="boundaries"):
    train.create_learning_rate_fn((0.1, 0.01), ())


def test_warmup_rises_linearly_then_follows_the_schedule():
  fn = train.create_learning_rate_fn((1e-3, 1e-4), (110,), warmup_steps=10)
  got = [float(fn(s)) for s in (0, 4, 9, 10, 109, 110)]
  np.testing.assert_allclose(got, [1e-4, 5e-4, 1e-3, 1e-3, 1e-3, 1e-4], rtol=1e-6)


def _sgd_reference(w0, grad_fn, lrs, mu, wd, variant="pytorch"):
  """NumPy SGD, float64, over len(lrs) steps. 'pytorch' is torch.optim.SGD(momentum=mu,
  weight_decay=wd, dampening=0, nesterov=False): g' = g + wd w; v = mu v + g';
  w -= lr v. The others are what an optimizer could wrongly do instead."""
  w = {k: np.asarray(v, np.float64) for k, v in w0.items()}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  for lr in lrs:
    g = grad_fn(w)
    for k in w:
      if variant == "pytorch":
        v[k] = mu * v[k] + g[k] + wd * w[k]
        w[k] = w[k] - lr * v[k]
      elif variant == "decoupled":  # decay outside momentum: w -= lr wd w.
        v[k] = mu * v[k] + g[k]
        w[k] = w[k] - lr * v[k] - lr * wd * w[k]
      elif variant == "nesterov":
        d = g[k] + wd * w[k]
        v[k] = mu * v[k] + d
        w[k] = w[k] - lr * (d + mu * v[k])
      elif variant == "decay_after_momentum":  # chain(sgd(lr, mu), add_decayed_weights)
        v[k] = mu * v[k] + g[k]
        w[k] = w[k] - lr * v[k] + wd * w[k]
      else:
        raise ValueError(variant)
  return w


def test_optimizer_is_pytorch_sgd_with_coupled_weight_decay():
  """Four steps across a learning-rate boundary against a NumPy torch.optim.SGD; the
  alternatives (decoupled decay, Nesterov, decay after momentum, the schedule one
  step late) give numbers this test tells apart."""
  rng = np.random.default_rng(0)
  w0 = {"a": rng.normal(size=(3,)), "b": rng.normal(size=(2, 2))}
  scale = {k: rng.uniform(0.5, 2.0, size=x.shape) for k, x in w0.items()}
  shift = {k: rng.normal(size=x.shape) for k, x in w0.items()}
  # A quadratic's gradient, so that gradients depend on the weights an optimizer made.
  grad_np = lambda w: {k: scale[k] * w[k] + shift[k] for k in w}  # noqa: E731
  lrs, boundaries, mu, wd = (0.1, 0.02), (2,), 0.9, 0.1
  lr_fn = train.create_learning_rate_fn(lrs, boundaries)
  tx = train.create_optimizer(lr_fn, mu, wd)
  params = {k: jnp.asarray(v, jnp.float32) for k, v in w0.items()}
  opt_state = tx.init(params)
  steps = 4
  for _ in range(steps):
    grads = {k: jnp.asarray(scale[k], jnp.float32) * params[k] +
             jnp.asarray(shift[k], jnp.float32) for k in params}
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  # Step t (from 0) uses lr_fn(t): 0.1, 0.1, then 0.02 from step 2.
  schedule = [float(lr_fn(t)) for t in range(steps)]
  np.testing.assert_allclose(schedule, [0.1, 0.1, 0.02, 0.02], rtol=1e-6)
  want = _sgd_reference(w0, grad_np, schedule, mu, wd)
  for k in want:
    np.testing.assert_allclose(np.asarray(params[k]), want[k], rtol=1e-5, atol=1e-6)
  alternatives = {
      variant: _sgd_reference(w0, grad_np, schedule, mu, wd, variant)
      for variant in ("decoupled", "nesterov", "decay_after_momentum")}
  alternatives["constant_lr"] = _sgd_reference(w0, grad_np, [0.1] * steps, mu, wd)
  alternatives["lr_one_step_late"] = _sgd_reference(w0, grad_np, [0.1, 0.1, 0.1, 0.02],
                                                    mu, wd)
  alternatives["no_momentum"] = _sgd_reference(w0, grad_np, schedule, 0.0, wd)
  for variant, other in alternatives.items():
    gap = max(float(np.abs(other[k] - want[k]).max()) for k in want)
    assert gap > 1e-3, f"{variant} is indistinguishable from PyTorch's SGD"
    assert not all(np.allclose(np.asarray(params[k]), other[k], rtol=1e-5, atol=1e-6)
                   for k in want), variant


def test_classify_step_on_mock_cifar10(cifar_mock):
  mesh = _mesh(jax.devices())
  net, state, _ = _setup(cifar_mock, mesh)
  batch = data.to_global(data.train_batch(cifar_mock, 8, seed=0, step=0), mesh)
  before = jax.device_get(state.params)  # The step donates the state.
  new_state, metrics = train.jit_train_step(net)(state, batch, None)
  assert set(metrics) == {"loss", "accuracy"}
  assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
  assert new_state.params["distiller"] == {}
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before["student"],
                         jax.device_get(new_state.params["student"]))
  assert all(jax.tree.leaves(changed))
  with pytest.raises(ValueError, match="no loss"):
    train.train_step(new_state, batch, student=net, use_labels=False)


def test_fsp_step_on_mock_cifar10_trains_only_the_student(cifar_mock):
  mesh = _mesh(jax.devices())
  teacher = _network(cifar_mock, "cifar_resnet14")
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  teacher_vars = jax.device_put(teacher.init(jax.random.PRNGKey(1), (32, 32, 3)),
                                replicated)
  # A large decay, so that lr * wd = 5e-5 shows in float32 parameters.
  lr, wd = 1e-3, 5e-2
  net, state, _ = _setup(cifar_mock, mesh, lr=lr, wd=wd)
  d = _fsp(net)
  assert d.fsp_pairs == (("stem", "section1"), ("section1", "section2"),
                         ("section2", "section3"))
  batch = data.to_global(data.train_batch(cifar_mock, 8, seed=0, step=0), mesh)
  w0 = np.asarray(state.params["student"]["classifier"]["kernel"])
  step = train.jit_train_step(net, teacher, d, use_labels=False)
  copy = lambda s: jax.tree.map(jnp.copy, s)  # noqa: E731  (the step donates)
  new_state, metrics = step(copy(state), batch, teacher_vars)
  assert set(metrics) == {"loss"}
  # The classifier gets no FSP gradient: only weight decay moves it.
  w1 = np.asarray(new_state.params["student"]["classifier"]["kernel"])
  np.testing.assert_allclose(w1, w0 * (1 - lr * wd), rtol=1e-6)
  assert not np.allclose(w1, w0, rtol=1e-6, atol=0)
  new_state, metrics2 = step(new_state, batch, teacher_vars)
  assert float(metrics2["loss"]) < float(metrics["loss"])

  # The frozen teacher, step level. (a) The step's loss has exactly zero gradient
  # w.r.t. the teacher's variables, although its targets depend on them.
  def step_loss(tv):
    return train.train_step(state, batch, tv, student=net, teacher=teacher,
                            distiller=d, use_labels=False)[1]["loss"]

  grads = jax.jit(jax.grad(step_loss))(teacher_vars)
  assert jax.tree.structure(grads) == jax.tree.structure(teacher_vars)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
  images = batch["image"]
  reach = jax.jit(jax.grad(lambda tv: sum(jnp.sum(g) for g in d.teacher_targets(
      *teacher.apply(tv, images)))))(teacher_vars)
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(reach["params"]))
  # (b) Its teacher runs in inference mode: its FSP matrices are those of inference-
  # mode apply, not those of training mode (which would also move the statistics the
  # step never returns).
  inference = d.teacher_targets(*teacher.apply(teacher_vars, images))
  t_out, t_stats = teacher.apply(teacher_vars, images, train=True)
  train_mode = d.teacher_targets(*t_out)
  assert not np.allclose(t_stats["bn_input"]["mean"],
                         teacher_vars["batch_stats"]["bn_input"]["mean"])
  jitted = train.jit_teacher_targets(teacher, d)(teacher_vars, images)
  assert not all(np.allclose(a, b, rtol=1e-3) for a, b in zip(train_mode, inference))
  for a, b in zip(jitted, inference):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  _, m_ran = step(copy(state), batch, teacher_vars)
  cached = data.to_global(dict(data.train_batch(cifar_mock, 8, seed=0, step=0),
                               teacher_targets=jax.device_get(inference)), mesh)
  _, m_cached = step(copy(state), cached, None)
  moved = dict(cached, teacher_targets=jax.device_put(train_mode,
                                                      data.data_sharding(mesh)))
  _, m_moved = step(copy(state), moved, None)
  np.testing.assert_allclose(float(m_cached["loss"]), float(m_ran["loss"]), rtol=1e-5)
  assert not np.isclose(float(m_moved["loss"]), float(m_ran["loss"]), rtol=1e-3)
  # The state holds the student's statistics only.
  assert jax.tree.structure(new_state.batch_stats) == jax.tree.structure(
      state.batch_stats)


def test_eval_steps_sum_over_real_examples(cifar_mock):
  mesh = _mesh(jax.devices())
  net, state, _ = _setup(cifar_mock, mesh)
  teacher = _network(cifar_mock, "cifar_resnet14")
  tv = teacher.init(jax.random.PRNGKey(1), (32, 32, 3))
  images = cifar_mock.test_images[:8]
  labels = cifar_mock.test_labels[:8]
  mask = np.asarray([1, 1, 1, 0, 1, 1, 0, 1], np.float32)
  batch = {"image": images, "label": labels, "mask": mask}
  got = jax.jit(lambda v, b: train.eval_classify_step(v, b, network=net))(
      state.variables, batch)
  logits, feats = net.apply(state.variables, images)
  logits = np.asarray(logits, np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
  losses = -log_p[np.arange(8), labels]
  np.testing.assert_allclose(float(got["loss"]), np.sum(losses * mask), rtol=1e-5)
  np.testing.assert_allclose(float(got["correct"]),
                             np.sum((logits.argmax(-1) == labels) * mask))
  assert float(got["count"]) == 6
  d = _fsp(net)
  got = jax.jit(lambda v, tv, b: train.eval_distill_step(
      v, {}, tv, b, network=net, teacher=teacher, distiller=d))(state.variables, tv,
                                                                 batch)
  per_example = d.objective({}, d.teacher_targets(*teacher.apply(tv, images)), logits,
                            feats, 0)
  assert set(got) == {"fsp_loss", "count"} and float(got["count"]) == 6
  np.testing.assert_allclose(float(got["fsp_loss"]),
                             float(np.sum(np.asarray(per_example) * mask)), rtol=1e-5)
  # Host totals over batches.
  totals = train._accumulate(None, {"count": jnp.float32(6)})
  totals = train._accumulate(totals, {"count": jnp.float32(2)})
  assert totals == {"count": 8.0} and isinstance(totals["count"], np.float64)


@pytest.mark.parametrize("kind", ["classify", "fsp"])
def test_one_device_and_four_devices_give_the_same_step(kind):
  assert len(jax.devices()) == 4, "conftest sets 4 fake CPU devices"
  ds = data.load_digits(16)
  teacher = _network(ds, "cifar_resnet14")
  teacher_vars = teacher.init(jax.random.PRNGKey(1), (16, 16, 1))
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = _mesh(devices)
    lr = 0.05 if kind == "classify" else 1e-3  # The paper's stage-1 rate.
    net, state, replicated = _setup(ds, mesh, lr=lr)
    if kind == "classify":
      step, tv = train.jit_train_step(net), None
    else:
      step = train.jit_train_step(net, teacher, _fsp(net), use_labels=False)
      tv = jax.device_put(teacher_vars, replicated)
    for s in range(2):
      batch = data.to_global(data.train_batch(ds, 32, seed=0, step=s), mesh)
      state, metrics = step(state, batch, tv)
    results.append((jax.device_get(state.params), jax.device_get(state.batch_stats),
                    float(metrics["loss"])))
  (p1, b1, l1), (p4, b4, l4) = results
  np.testing.assert_allclose(l1, l4, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), p1, p4)
  # Running statistics sum over the batch in another order: float32 reduction noise.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), b1, b4)
