"""capture_features (Linen and NNX), token-map FSP, models of your own in Network, and
their one-line errors. Tiny shapes: seconds in all."""
import sys

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import REPO

if REPO not in sys.path:  # The examples' models are imported from the repository.
  sys.path.insert(0, REPO)

import fsp_jax  # noqa: E402
from fsp_jax import capture, methods, fsp, models  # noqa: E402
from examples import cnn_linen, cnn_nnx, vit_student  # noqa: E402

MEAN, STD = (120.0, 110.0, 100.0), (60.0, 62.0, 64.0)


def _images(shape=(4, 16, 16, 3), seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, 256).astype(jnp.uint8)


def _one_line(e):
  text = str(e.value)
  assert "\n" not in text, text
  return text


# ------------------------------------------------------------ the package's ResNets


@pytest.mark.parametrize("name", [
    "cifar_resnet8", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_capture_on_resnets_gives_their_builtin_features(name):
  model = models.create_model(name, 10)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  variables = jax.jit(lambda r: model.init(r, x, train=False))(jax.random.PRNGKey(1))
  _, builtin = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  capture_fn = jax.jit(lambda v, paths: fsp_jax.capture_features(
      model, v, x, paths, train=False), static_argnums=1)
  got = capture_fn(variables, model.feature_names)
  assert set(got) == set(model.feature_names)
  for k in builtin:
    np.testing.assert_array_equal(got[k], builtin[k])
  # A section's feature is its last residual module's output, by that path too.
  n = model.modules_per_section
  paths = [f"section{s + 1}_module{n[s]}" for s in range(len(n))]
  by_module = capture_fn(variables, tuple(paths))
  for s, path in enumerate(paths):
    np.testing.assert_array_equal(by_module[path], builtin[f"section{s + 1}"])


def test_capture_in_training_updates_batch_stats_as_a_plain_apply():
  model = models.create_model("cifar_resnet8", 10)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  (logits, builtin), updates = jax.jit(lambda v: model.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables)
  (out, got_updates), feats = jax.jit(lambda v: capture.apply_and_capture(
      model, v, x, ("section2",), train=True, mutable=["batch_stats"]))(variables)
  assert set(got_updates) == {"batch_stats"}  # No intermediates left in.
  np.testing.assert_array_equal(out[0], logits)
  np.testing.assert_array_equal(feats["section2"], builtin["section2"])
  for a, b in zip(jax.tree.leaves(got_updates), jax.tree.leaves(updates)):
    np.testing.assert_array_equal(a, b)


def test_fsp_gradient_through_capture_equals_builtin_features():
  model = models.create_model("cifar_resnet8", 10)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  v = model.init(jax.random.PRNGKey(1), x, train=False)
  t_feats = model.apply(model.init(jax.random.PRNGKey(2), x, train=False), x,
                        train=False)[1]
  pairs = fsp.default_fsp_pairs(model.feature_names)

  def by_capture(params):
    f = fsp_jax.capture_features(model, {**v, "params": params}, x,
                                 model.feature_names, train=False)
    return fsp.fsp_loss(t_feats, f, pairs)

  def builtin(params):
    return fsp.fsp_loss(t_feats, model.apply({**v, "params": params}, x,
                                             train=False)[1], pairs)

  g1 = jax.jit(jax.grad(by_capture))(v["params"])
  g2 = jax.jit(jax.grad(builtin))(v["params"])
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_layer_paths_lists_nested_layers():
  model = cnn_linen.SmallCNN(10)
  x = jnp.zeros((1, 8, 8, 3))
  v = model.init(jax.random.PRNGKey(0), x, train=False)
  paths = fsp_jax.layer_paths(model, v, x, train=False)
  assert {"stem", "block1", "block2/conv_bn1", "block3/conv_bn2/bn", "head"} <= set(paths)
  nnx_paths = fsp_jax.layer_paths(cnn_nnx.SmallCNN(10, rngs=nnx.Rngs(0)))
  assert {"stem", "block2/conv_bn1", "block3/conv_bn2/bn", "head"} <= set(nnx_paths)


# ------------------------------------------------------------------ Linen and NNX


def _twins(in_features=3):
  """The Linen SmallCNN and the NNX one holding the Linen one's (non-trivial) weights."""
  linen = cnn_linen.SmallCNN(10)
  x = jnp.zeros((1, 16, 16, in_features))
  variables = linen.init(jax.random.PRNGKey(3), x, train=False)
  # Batch statistics away from their initial values, so that eval mode uses them.
  variables["batch_stats"] = jax.tree.map(
      lambda a: a + 0.1 * jax.random.uniform(jax.random.PRNGKey(a.size), a.shape),
      variables["batch_stats"])
  return linen, variables


def test_linen_and_nnx_twins_have_the_same_variables_tree():
  linen, variables = _twins()
  nnx_vars = models.NnxModel(cnn_nnx.SmallCNN, 10).init(jax.random.PRNGKey(0),
                                                        (16, 16, 3))
  assert jax.tree.structure(nnx_vars) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(nnx_vars), jax.tree.leaves(variables)):
    assert a.shape == b.shape


@pytest.mark.parametrize("train", [False, True])
def test_linen_and_nnx_give_the_same_features_and_fsp_loss(train):
  linen, variables = _twins()
  lin = models.Network(linen, MEAN, STD, layers=cnn_linen.FEATURES, classes=10)
  nx = models.Network(models.NnxModel(cnn_nnx.SmallCNN, 10), MEAN, STD,
                      layers=cnn_nnx.FEATURES, classes=10)
  images = _images()
  out_l = jax.jit(lambda v, i: lin.apply(v, i, train=train))(variables, images)
  out_n = jax.jit(lambda v, i: nx.apply(v, i, train=train))(variables, images)
  if train:
    (out_l, stats_l), (out_n, stats_n) = out_l, out_n
    for a, b in zip(jax.tree.leaves(stats_l), jax.tree.leaves(stats_n)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  (logits_l, feats_l), (logits_n, feats_n) = out_l, out_n
  np.testing.assert_allclose(logits_l, logits_n, rtol=1e-5, atol=1e-5)
  for k in cnn_linen.FEATURES:
    np.testing.assert_allclose(feats_l[k], feats_n[k], rtol=1e-5, atol=1e-5)
  # The FSP loss against a package teacher, keyed by the student's names.
  teacher = models.create_model("cifar_resnet8", 10)
  t_net = models.Network(teacher, MEAN, STD, feature_keys=cnn_linen.FEATURES)
  t_feats = t_net.apply(t_net.init(jax.random.PRNGKey(4), (16, 16, 3)), images)[1]
  pairs = fsp.default_fsp_pairs(cnn_linen.FEATURES)
  np.testing.assert_allclose(fsp.fsp_loss(t_feats, feats_l, pairs),
                             fsp.fsp_loss(t_feats, feats_n, pairs), rtol=1e-5)


def test_nnx_gradients_through_split_merge_equal_linen():
  linen, variables = _twins()
  lin = models.Network(linen, MEAN, STD, layers=cnn_linen.FEATURES, classes=10)
  nx = models.Network(models.NnxModel(cnn_nnx.SmallCNN, 10), MEAN, STD,
                      layers=cnn_nnx.FEATURES, classes=10)
  images = _images()
  distiller = methods.FSP(fsp.default_fsp_pairs(cnn_linen.FEATURES))
  targets = distiller.teacher_targets(None, lin.apply(variables, images[::-1])[1])

  def loss(net):
    def f(params):
      (logits, feats), _ = net.apply({**variables, "params": params}, images, train=True)
      return jnp.mean(distiller.objective({}, targets, logits, feats, 0))
    return jax.jit(jax.grad(f))(variables["params"])

  for a, b in zip(jax.tree.leaves(loss(lin)), jax.tree.leaves(loss(nx))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_nnx_capture_direct_and_inherited_call():
  class Base(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(3, 4, rngs=rngs)

    def __call__(self, x):
      return self.lin(x), "extra"  # A tuple: its first element is the output.

  class Child(Base):  # Inherits __call__.
    pass

  class Top(nnx.Module):
    def __init__(self, rngs):
      self.a = Base(rngs)
      self.b = Child(rngs)
      self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
      y = self.a(x)[0] + self.b(x)[0]
      for block in self.blocks:
        y = block(y)
      return y

  top = Top(nnx.Rngs(0))
  x = jnp.ones((2, 3))
  got = fsp_jax.capture_features(top, None, x, ("a", "b", "blocks/1", "b/lin"))
  np.testing.assert_allclose(got["a"], top.a.lin(x))
  np.testing.assert_allclose(got["b"], top.b.lin(x))
  np.testing.assert_allclose(got["b/lin"], top.b.lin(x))
  np.testing.assert_allclose(got["blocks/1"], top(x))
  assert "__call__" not in Child.__dict__ and Base.__call__.__name__ == "__call__"
  # Outside a capture the model is untouched (no sowing, no leftover state).
  assert not nnx.state(top, nnx.Intermediate)


# ------------------------------------------------------------------ token maps


def _np_fsp(f1, f2):
  b, n, m = f1.shape
  g = np.zeros((b, m, f2.shape[-1]))
  for bi in range(b):
    for t in range(n):
      g[bi] += np.outer(f1[bi, t], f2[bi, t])
  return g / n


def test_token_map_fsp_matches_numpy_loop():
  rng = np.random.default_rng(0)
  t1 = rng.normal(size=(2, 10, 5)).astype(np.float32)
  t2 = rng.normal(size=(2, 10, 3)).astype(np.float32)
  np.testing.assert_allclose(fsp.fsp_matrix(jnp.asarray(t1), jnp.asarray(t2)),
                             _np_fsp(t1, t2), rtol=1e-5, atol=1e-6)


def test_token_map_pairs_with_a_conv_map_after_dropping_the_class_token():
  rng = np.random.default_rng(1)
  tokens = rng.normal(size=(2, 1 + 16, 6)).astype(np.float32)  # class + 4x4 patches.
  conv = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  grid = fsp.tokens_to_grid(jnp.asarray(tokens), drop_leading=1)
  assert grid.shape == (2, 4, 4, 6)
  np.testing.assert_array_equal(grid[:, 1, 2], tokens[:, 1 + 1 * 4 + 2])  # row-major.
  # The NumPy oracle: max-pool the conv map 2x2, then Eq. 1 over the 16 positions.
  pooled = conv.reshape(2, 4, 2, 4, 2, 3).max(axis=(2, 4)).reshape(2, 16, 3)
  expect = _np_fsp(tokens[:, 1:], pooled)
  np.testing.assert_allclose(fsp.fsp_matrix(grid, jnp.asarray(conv)), expect,
                             rtol=1e-5, atol=1e-6)
  # A square token map without class token pairs with the conv map directly.
  np.testing.assert_allclose(fsp.fsp_matrix(jnp.asarray(tokens[:, 1:]),
                                            jnp.asarray(conv)), expect, rtol=1e-5,
                             atol=1e-6)
  rect = fsp.tokens_to_grid(jnp.asarray(tokens), grid=(2, 8), drop_leading=1)
  assert rect.shape == (2, 2, 8, 6)


def test_token_maps_in_fsp_loss_and_jit_grad():
  rng = np.random.default_rng(2)
  t = {"a": jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(2, 9, 5)), jnp.float32)}
  pairs = (("a", "b"),)
  loss = jax.jit(lambda s: fsp.fsp_loss(t, s, pairs))
  s = jax.tree.map(lambda a: a * 0.5, t)
  expect = np.mean(np.sum((_np_fsp(np.asarray(t["a"]), np.asarray(t["b"]))
                           - _np_fsp(np.asarray(s["a"]), np.asarray(s["b"]))) ** 2,
                          axis=(1, 2)))
  np.testing.assert_allclose(loss(s), expect, rtol=1e-5)
  grads = jax.grad(lambda s: fsp.fsp_loss(t, s, pairs))(s)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_vit_network_views_tokens_as_grids():
  net = models.Network(vit_student.ViT(10), MEAN, STD, layers=vit_student.FEATURES,
                       drop_tokens=1, classes=10)
  v = jax.jit(lambda r: net.init(r, (16, 16, 3)))(jax.random.PRNGKey(0))
  assert v["batch_stats"] == {}
  logits, feats = jax.jit(net.apply)(v, _images())
  assert logits.shape == (4, 10)
  assert {k: f.shape for k, f in feats.items()} == {k: (4, 4, 4, 64) for k in
                                                     vit_student.FEATURES}
  raw = jax.jit(lambda v, x: fsp_jax.capture_features(
      net.module, v, net.normalize(x), ("block2",), train=False))(v, _images())["block2"]
  np.testing.assert_array_equal(feats["block2"], raw[:, 1:].reshape(4, 4, 4, 64))


# ------------------------------------------------------------ one-line errors


def test_unknown_layer_is_one_line_with_closest_paths():
  model = cnn_linen.SmallCNN(10)
  x = jnp.zeros((1, 8, 8, 3))
  v = model.init(jax.random.PRNGKey(0), x, train=False)
  with pytest.raises(ValueError) as e:
    fsp_jax.capture_features(model, v, x, ("blok2",), train=False)
  text = _one_line(e)
  assert "'blok2'" in text and "'block2'" in text
  with pytest.raises(ValueError) as e:
    fsp_jax.capture_features(cnn_nnx.SmallCNN(10, rngs=nnx.Rngs(0)), None, x,
                             ("block2/conv_bn3",))
  assert "'block2/conv_bn1'" in _one_line(e) or "'block2/conv_bn2'" in _one_line(e)
  with pytest.raises(ValueError) as e:
    fsp_jax.capture_features(model, v, x, "block2", train=False)
  assert "one string" in _one_line(e)


@pytest.mark.parametrize("path, expect", [
    ("examples.no_such_module:Net", "cannot import module 'examples.no_such_module'"),
    ("examples.cnn_linen:SmallCnn", "did you mean 'SmallCNN'"),
    ("examples.cnn_linen", "not an import path"),
    ("examples.cnn_linen:FEATURES", "not a Linen or NNX module"),
])
def test_bad_import_path_is_one_line(path, expect):
  with pytest.raises(ValueError) as e:
    models.model_from_import_path(path, 10)
  assert expect in _one_line(e), str(e.value)


def test_unpairable_maps_are_one_line():
  with pytest.raises(ValueError) as e:
    fsp.fsp_matrix(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 1 + 9, 4)))
  assert "not a square grid" in _one_line(e)
  with pytest.raises(ValueError) as e:
    fsp.fsp_matrix(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 9, 4)))  # 3x3 vs 8x8.
  assert "cannot be paired" in _one_line(e)
  with pytest.raises(ValueError) as e:
    fsp.tokens_to_grid(jnp.zeros((1, 17, 4)), grid=(4, 5), drop_leading=1)
  assert "holds 20 tokens" in _one_line(e)
  with pytest.raises(ValueError) as e:
    fsp.fsp_matrix(jnp.zeros((1, 9, 3)), jnp.zeros((1, 8, 8, 8, 3)))
  assert "(B, H, W, C)" in _one_line(e)


def test_nnx_model_with_rng_state_is_refused_in_one_line():
  class WithDropout(nnx.Module):
    def __init__(self, num_classes, *, rngs):
      self.lin = nnx.Linear(3, num_classes, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
      return self.lin(self.drop(x.mean((1, 2))))

  with pytest.raises(ValueError) as e:
    models.NnxModel(WithDropout, 10).init(jax.random.PRNGKey(0), (8, 8, 3))
  assert "nnx.Param and nnx.BatchStat" in _one_line(e)


def test_presets_keep_their_features_and_can_be_renamed():
  module = models.create_model("cifar_resnet8", 10)
  plain = models.Network(module, MEAN, STD)
  renamed = models.Network(module, MEAN, STD, feature_keys=("a", "b", "c", "d"))
  v = plain.init(jax.random.PRNGKey(0), (8, 8, 3))
  images = _images((2, 8, 8, 3))
  logits, feats = plain.apply(v, images)
  logits2, feats2 = renamed.apply(v, images)
  assert plain.feature_names == module.feature_names
  assert renamed.feature_names == ("a", "b", "c", "d")
  np.testing.assert_array_equal(logits, logits2)
  for old, new in zip(module.feature_names, renamed.feature_names):
    np.testing.assert_array_equal(feats[old], feats2[new])
