"""One real step of each stage on tfds mock data; schedules; 1 vs 4 devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fsp_jax import data, models, train


def _mesh(devices):
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def _setup(mesh, model_name="cifar_resnet8", lr=0.1):
  model = models.create_model(model_name, 10)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(
      train.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3)), replicated)
  tx = train.create_optimizer(train.create_learning_rate_fn((lr,), ()), 0.9, 1e-4)
  return model, train.create_train_state(model, variables, tx), replicated


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


def test_classify_step_on_mock_cifar10(cifar_mock):
  mesh = _mesh(jax.devices())
  model, state, _ = _setup(mesh)
  batch = data.to_global(data.train_batch(cifar_mock, 8, seed=0, step=0), mesh)
  mean, std = jnp.asarray(cifar_mock.mean), jnp.asarray(cifar_mock.std)
  new_state, metrics = jax.jit(train.classify_step)(state, batch, mean, std)
  assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
  assert all(jax.tree.leaves(changed))


def test_fsp_step_on_mock_cifar10_trains_only_the_student(cifar_mock):
  mesh = _mesh(jax.devices())
  teacher = models.create_model("cifar_resnet14", 10)
  teacher_vars = train.init_variables(teacher, jax.random.PRNGKey(1), (32, 32, 3))
  model, state, _ = _setup(mesh, lr=1e-3)
  batch = data.to_global(data.train_batch(cifar_mock, 8, seed=0, step=0), mesh)
  mean, std = jnp.asarray(cifar_mock.mean), jnp.asarray(cifar_mock.std)
  step = jax.jit(functools.partial(train.fsp_step, teacher_apply=teacher.apply,
                                   fsp_pairs=((0, 1), (1, 2), (2, 3)), fsp_weights=None,
                                   pool="max"))
  teacher_before = jax.tree.map(np.asarray, teacher_vars)
  new_state, metrics = step(state, teacher_vars, batch, mean, std)
  new_state, metrics2 = step(new_state, teacher_vars, batch, mean, std)
  assert float(metrics2["loss"]) < float(metrics["loss"])
  # The frozen teacher is untouched, its BN statistics too.
  jax.tree.map(np.testing.assert_array_equal, teacher_before,
               jax.tree.map(np.asarray, teacher_vars))
  # The classifier gets no FSP gradient: only weight decay moves it.
  w0 = state.params["classifier"]["kernel"]
  w1 = jax.jit(lambda: step(state, teacher_vars, batch, mean, std)[0])().params[
      "classifier"]["kernel"]
  np.testing.assert_allclose(w1, w0 * (1 - 1e-3 * 1e-4), rtol=1e-6)


@pytest.mark.parametrize("kind", ["classify", "fsp"])
def test_one_device_and_four_devices_give_the_same_step(cifar_mock, kind):
  assert len(jax.devices()) == 4, "conftest sets 4 fake CPU devices"
  ds = data.load_digits(16)
  teacher = models.create_model("cifar_resnet14", 10)
  teacher_vars = train.init_variables(teacher, jax.random.PRNGKey(1), (16, 16, 1))
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = _mesh(devices)
    model = models.create_model("cifar_resnet8", 10)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables = jax.device_put(
        train.init_variables(model, jax.random.PRNGKey(0), (16, 16, 1)), replicated)
    lr = 0.05 if kind == "classify" else 1e-3  # The paper's stage-1 rate.
    tx = train.create_optimizer(train.create_learning_rate_fn((lr,), ()), 0.9, 1e-4)
    state = train.create_train_state(model, variables, tx)
    mean, std = jnp.asarray(ds.mean), jnp.asarray(ds.std)
    if kind == "classify":
      step = jax.jit(train.classify_step)
      run = lambda s, b: step(s, b, mean, std)  # noqa: E731
    else:
      step = jax.jit(functools.partial(train.fsp_step, teacher_apply=teacher.apply,
                                       fsp_pairs=((0, 1), (1, 2), (2, 3)),
                                       fsp_weights=None, pool="max"))
      tv = jax.device_put(teacher_vars, replicated)
      run = lambda s, b: step(s, tv, b, mean, std)  # noqa: E731
    for s in range(2):
      batch = data.to_global(data.train_batch(ds, 32, seed=0, step=s), mesh)
      state, metrics = run(state, batch)
    results.append((jax.device_get(state.params), jax.device_get(state.batch_stats),
                    float(metrics["loss"])))
  (p1, b1, l1), (p4, b4, l4) = results
  np.testing.assert_allclose(l1, l4, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), p1, p4)
  # Running statistics sum over the batch in another order: float32 reduction noise.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), b1, b4)
