"""fsp_jax.layers computes what lax's convolution and Flax's BatchNorm compute.

The faster backward passes must not trade accuracy: values, gradients, running
statistics and a whole training step match the library versions to float32 rounding.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fsp_jax import layers, models, train

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((4, 16, 16, 3), 3, 1, "SAME"),             # CIFAR stem
    ((4, 16, 16, 8), 3, 2, "SAME"),             # first conv of a section
    ((4, 16, 16, 8), 3, 2, ((1, 1), (1, 1))),   # PyTorch-style padding
    ((4, 16, 16, 8), 1, 2, "VALID"),            # projection shortcut
    ((4, 15, 17, 5), 3, 2, "SAME"),             # odd sizes
    ((2, 20, 20, 3), 7, 2, ((3, 3), (3, 3))),   # ImageNet stem
    ((3, 13, 13, 4), 3, 3, ((1, 2), (0, 1))),   # stride 3, uneven padding
])
def test_conv_values_and_gradients_match_lax(shape, kernel, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1], 6)), jnp.float32)

  def loss(conv, x, w):
    y = conv(x, w, (stride, stride), padding, dimension_numbers=NHWC)
    return jnp.sum(jnp.sin(y)), y

  (l0, y0), g0 = jax.value_and_grad(functools.partial(loss, lax.conv_general_dilated),
                                    (0, 1), has_aux=True)(x, w)
  (l1, y1), g1 = jax.jit(jax.value_and_grad(
      functools.partial(loss, layers.conv_general_dilated), (0, 1), has_aux=True))(x, w)
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(g1, g0):  # dx, dw
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_conv_falls_back_to_lax_outside_its_case():
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((3, 3, 2, 4))  # Grouped: feature_group_count=2.
  y = layers.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                                  feature_group_count=2)
  np.testing.assert_array_equal(y, lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2))


@pytest.mark.parametrize("train_mode", [True, False])
def test_batch_norm_matches_flax(train_mode):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((8, 5, 5, 6)) * 3 + 1, jnp.float32)
  kw = dict(use_running_average=not train_mode, momentum=0.9, epsilon=1e-5)
  ours, ref = layers.BatchNorm(**kw), nn.BatchNorm(**kw)
  variables = ref.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(
      variables)
  variables = {"params": {"scale": jnp.linspace(0.5, 2, 6), "bias": jnp.linspace(-1, 1, 6)},
               "batch_stats": {"mean": jnp.linspace(-.2, .2, 6), "var": jnp.linspace(.5, 2, 6)}}
  target = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def loss(module, params, x):
    y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                              x, mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(y) * target), (y, updates["batch_stats"])

  results = []
  for module in (ref, ours):
    (l, (y, stats)), grads = jax.jit(jax.value_and_grad(
        functools.partial(loss, module), (0, 1), has_aux=True))(variables["params"], x)
    results.append((l, y, stats, grads))
  (l0, y0, s0, g0), (l1, y1, s1, g1) = results
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1, s0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g0)


def test_training_step_matches_the_library_layers(monkeypatch):
  """One real classify step: fsp_jax.layers vs lax.conv + flax.linen.BatchNorm."""
  rng = np.random.default_rng(2)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (16, 16, 16, 3)), jnp.uint8),
           "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  mean, std = (120.0,) * 3, (60.0,) * 3
  tx = train.create_optimizer(train.create_learning_rate_fn((0.1,), ()), 0.9, 1e-4)
  traced = []  # Convolutions traced with lax's: the patch reached the step.

  def lax_conv(*args, **kwargs):
    traced.append(1)
    return lax.conv_general_dilated(*args, **kwargs)

  runs = []
  for library in (True, False):
    if library:
      monkeypatch.setattr(layers, "conv_general_dilated", lax_conv)
      monkeypatch.setattr(layers, "BatchNorm", nn.BatchNorm)
    else:
      monkeypatch.undo()
    net = models.Network(models.create_model("cifar_resnet8", 10), mean, std)
    variables = net.init(jax.random.PRNGKey(0), (16, 16, 3))
    state = train.create_train_state(net, variables, tx)
    # A new jitted function each time: the second run is traced afresh.
    step = jax.jit(functools.partial(train.train_step, student=net))
    n_traced = len(traced)
    state, metrics = step(state, batch)
    assert (len(traced) > n_traced) == library
    runs.append((float(metrics["loss"]), jax.device_get(state.params),
                 jax.device_get(state.batch_stats)))
  (l0, p0, b0), (l1, p1, b1) = runs
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), b1, b0)
