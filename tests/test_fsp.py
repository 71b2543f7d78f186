"""FSP matrix (Eq. 1) and loss (Eq. 2) against an independent NumPy loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsp_jax import fsp_loss, fsp_matrix
from fsp_jax import fsp as fsp_lib


def numpy_fsp(f1, f2, pool="max"):
  """Eq. 1 with explicit loops; pools the larger map down by its integer ratio."""
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)

  def pool_down(f, h, w):
    b, hh, ww, c = f.shape
    kh, kw = hh // h, ww // w
    out = np.zeros((b, h, w, c))
    for i in range(h):
      for j in range(w):
        win = f[:, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw, :]
        out[:, i, j] = win.max((1, 2)) if pool == "max" else win.mean((1, 2))
    return out

  if f1.shape[1] > f2.shape[1]:
    f1 = pool_down(f1, f2.shape[1], f2.shape[2])
  elif f2.shape[1] > f1.shape[1]:
    f2 = pool_down(f2, f1.shape[1], f1.shape[2])
  b, h, w, m = f1.shape
  n = f2.shape[-1]
  g = np.zeros((b, m, n))
  for bi in range(b):
    for i in range(m):
      for j in range(n):
        s = 0.0
        for y in range(h):
          for x in range(w):
            s += f1[bi, y, x, i] * f2[bi, y, x, j]
        g[bi, i, j] = s / (h * w)
  return g


def numpy_loss(tfeats, sfeats, pairs, weights, pool="max", reduction="sum"):
  total = 0.0
  for (i, j), lam in zip(pairs, weights):
    gt = numpy_fsp(tfeats[i], tfeats[j], pool)
    gs = numpy_fsp(sfeats[i], sfeats[j], pool)
    per_example = (np.sum if reduction == "sum" else np.mean)((gt - gs) ** 2, axis=(1, 2))
    total += lam * np.mean(per_example)
  return total


def _features(rng, batch=2):
  # stem (8x8x3), section 1 (8x8x3), section 2 (4x4x5): like a tiny CIFAR ResNet.
  return [rng.normal(size=(batch, 8, 8, 3)), rng.normal(size=(batch, 8, 8, 3)),
          rng.normal(size=(batch, 4, 4, 5))]


def test_fsp_matrix_same_size_matches_loop():
  rng = np.random.default_rng(0)
  f1, f2 = rng.normal(size=(3, 5, 6, 4)), rng.normal(size=(3, 5, 6, 7))
  g = fsp_matrix(jnp.asarray(f1, jnp.float32), jnp.asarray(f2, jnp.float32))
  assert g.shape == (3, 4, 7) and g.dtype == jnp.float32
  np.testing.assert_allclose(g, numpy_fsp(f1, f2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_fsp_matrix_pools_larger_map(pool):
  rng = np.random.default_rng(1)
  f1, f2 = rng.normal(size=(2, 8, 8, 3)), rng.normal(size=(2, 4, 4, 5))
  g = fsp_matrix(jnp.asarray(f1, jnp.float32), jnp.asarray(f2, jnp.float32), pool=pool)
  np.testing.assert_allclose(g, numpy_fsp(f1, f2, pool), rtol=1e-5, atol=1e-6)
  # The second map may be the larger one too.
  g21 = fsp_matrix(jnp.asarray(f2, jnp.float32), jnp.asarray(f1, jnp.float32), pool=pool)
  np.testing.assert_allclose(g21, numpy_fsp(f2, f1, pool), rtol=1e-5, atol=1e-6)


def test_fsp_matrix_bf16_inputs_compute_in_float32():
  rng = np.random.default_rng(2)
  f1 = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.bfloat16)
  f2 = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.bfloat16)
  g = fsp_matrix(f1, f2)
  assert g.dtype == jnp.float32
  np.testing.assert_allclose(g, numpy_fsp(f1.astype(jnp.float32), f2.astype(jnp.float32)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shapes", [((1, 8, 8, 3), (1, 3, 3, 3)),
                                    ((1, 8, 4, 3), (1, 4, 8, 3)),
                                    ((1, 8, 8, 3), (2, 8, 8, 3))])
def test_fsp_matrix_rejects_unpairable_maps(shapes):
  with pytest.raises(ValueError, match="FSP"):
    fsp_matrix(jnp.zeros(shapes[0]), jnp.zeros(shapes[1]))


def test_fsp_matrix_is_pure_under_jit_grad_vmap():
  rng = np.random.default_rng(3)
  f1 = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  f2 = jnp.asarray(rng.normal(size=(2, 4, 4, 5)), jnp.float32)
  np.testing.assert_allclose(jax.jit(fsp_matrix)(f1, f2), fsp_matrix(f1, f2), rtol=1e-6)
  # vmap over an extra leading axis gives the per-slice results.
  stacked = jax.vmap(fsp_matrix)(jnp.stack([f1, 2 * f1]), jnp.stack([f2, f2]))
  np.testing.assert_allclose(stacked[1], 2 * fsp_matrix(f1, f2), rtol=1e-5)
  # d/d f2 of sum(G) is, for same-size maps, sum_i f1[..., i] / (h*w) on every channel.
  g = jax.grad(lambda a, b: fsp_matrix(a, b).sum(), argnums=1)(f1[:, :4, :4], f2)
  expected = np.repeat(np.asarray(f1[:, :4, :4]).sum(-1, keepdims=True) / 16, 5, -1)
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_fsp_loss_matches_loop_with_weights(pool):
  rng = np.random.default_rng(4)
  t, s = _features(rng), _features(rng)
  pairs, weights = ((0, 1), (1, 2)), (0.5, 2.0)
  got = fsp_loss([jnp.asarray(f, jnp.float32) for f in t],
                 [jnp.asarray(f, jnp.float32) for f in s], pairs, weights, pool)
  np.testing.assert_allclose(got, numpy_loss(t, s, pairs, weights, pool), rtol=1e-5)


def test_fsp_loss_mean_reduction_is_the_element_mean():
  rng = np.random.default_rng(6)
  t, s = _features(rng), _features(rng)
  pairs, weights = ((0, 1), (1, 2)), (0.5, 2.0)
  tj, sj = ([jnp.asarray(f, jnp.float32) for f in x] for x in (t, s))
  got = fsp_loss(tj, sj, pairs, weights, "max", reduction="mean")
  np.testing.assert_allclose(
      got, numpy_loss(t, s, pairs, weights, "max", reduction="mean"), rtol=1e-5)
  # 3x3 and 3x5 matrices: the mean is the sum with lambda_i / (m_i n_i).
  np.testing.assert_allclose(got, fsp_loss(tj, sj, pairs, (0.5 / 9, 2.0 / 15)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="not one of"):
    fsp_loss(tj, sj, pairs, weights, reduction="median")


def test_fsp_loss_default_pairs_and_equal_weights():
  rng = np.random.default_rng(5)
  t, s = _features(rng), _features(rng)
  got = fsp_loss([jnp.asarray(f, jnp.float32) for f in t],
                 [jnp.asarray(f, jnp.float32) for f in s])
  np.testing.assert_allclose(got, numpy_loss(t, s, ((0, 1), (1, 2)), (1.0, 1.0)),
                             rtol=1e-5)
  assert fsp_lib.default_fsp_pairs(4) == ((0, 1), (1, 2), (2, 3))


NAMES = ("stem", "section1", "section2")


def test_fsp_loss_of_named_features_matches_loop():
  """The models' dict features: pairs by name give the index-pair results."""
  rng = np.random.default_rng(7)
  t, s = _features(rng), _features(rng)
  # Inserted out of network order: the pairs, not the dict's order, decide.
  tj = {n: jnp.asarray(t[k], jnp.float32) for k, n in reversed(list(enumerate(NAMES)))}
  sj = {n: jnp.asarray(s[k], jnp.float32) for k, n in enumerate(NAMES)}
  pairs = fsp_lib.default_fsp_pairs(NAMES)
  assert pairs == (("stem", "section1"), ("section1", "section2"))
  got = fsp_loss(tj, sj, pairs, (0.5, 2.0))
  np.testing.assert_allclose(got, numpy_loss(t, s, ((0, 1), (1, 2)), (0.5, 2.0)),
                             rtol=1e-5)
  mats = fsp_lib.fsp_matrices(tj, (("section2", "stem"),), "avg")
  assert len(mats) == 1 and mats[0].shape == (2, 5, 3)
  np.testing.assert_allclose(mats[0], numpy_fsp(t[2], t[0], "avg"), rtol=1e-5, atol=1e-6)
  # Under jit the dict comes back in sorted key order; named pairs do not care.
  np.testing.assert_allclose(jax.jit(lambda a, b: fsp_loss(a, b, pairs, (0.5, 2.0)))(
      tj, sj), got, rtol=1e-6)
  with pytest.raises(ValueError, match="name the fsp_pairs"):
    fsp_lib.fsp_matrices(tj)


def test_pairs_resolve_from_names_or_indices_with_clear_errors():
  assert fsp_lib.resolve_pairs(((0, 1), ("section1", 2)), NAMES) == (
      ("stem", "section1"), ("section1", "section2"))
  assert fsp_lib.resolve_name("section2", NAMES) == "section2"
  assert fsp_lib.resolve_name(0, NAMES) == "stem"
  with pytest.raises(ValueError, match="'section4' is not a feature"):
    fsp_lib.resolve_pairs((("stem", "section4"),), NAMES)
  with pytest.raises(ValueError, match="3 is out of range"):
    fsp_lib.resolve_name(3, NAMES)
  for bad in (-1, True, 1.0):
    with pytest.raises(ValueError, match="out of range"):
      fsp_lib.resolve_name(bad, NAMES)
  assert fsp_lib.default_fsp_pairs(("stem",)) == ()


def test_no_gradient_reaches_the_teacher():
  rng = np.random.default_rng(6)
  t = [jnp.asarray(f, jnp.float32) for f in _features(rng)]
  s = [jnp.asarray(f, jnp.float32) for f in _features(rng)]
  g_teacher, g_student = jax.grad(fsp_loss, argnums=(0, 1))(t, s)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in g_teacher)
  assert any(float(jnp.abs(g).max()) > 0.0 for g in g_student)
  # The same with the models' named features.
  pairs = fsp_lib.default_fsp_pairs(NAMES)
  g_teacher, g_student = jax.grad(fsp_loss, argnums=(0, 1))(
      dict(zip(NAMES, t)), dict(zip(NAMES, s)), pairs)
  assert set(g_teacher) == set(NAMES)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in g_teacher.values())
  assert all(float(jnp.abs(g).max()) > 0.0 for g in g_student.values())


def test_fsp_loss_rejects_channel_mismatch_with_clear_error():
  t = [jnp.zeros((2, 8, 8, 16)), jnp.zeros((2, 8, 8, 16))]
  s = [jnp.zeros((2, 8, 8, 8)), jnp.zeros((2, 8, 8, 8))]
  with pytest.raises(ValueError, match="equal channel counts"):
    fsp_loss(t, s)
  with pytest.raises(ValueError, match="does not return"):
    fsp_loss(t, t, fsp_pairs=((0, 5),))
  named = dict(zip(("stem", "section1"), t))
  with pytest.raises(ValueError, match="does not return"):
    fsp_loss(named, named, fsp_pairs=(("stem", "section9"),))
  with pytest.raises(ValueError, match="one weight per pair"):
    fsp_loss(t, t, weights=(1.0, 2.0))


def test_max_pool_gradient_matches_reduce_window_and_shares_ties():
  f = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 8, 3)), jnp.float32)
  weights = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 4, 3)))

  def reference(f):
    window = (1, 2, 2, 1)
    return jax.lax.reduce_window(f, -jnp.inf, jax.lax.max, window, window, "VALID")

  for pool in (reference, lambda f: fsp_lib._pool_to(f, 4, 4, "max")):
    assert pool(f).shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(fsp_lib._pool_to(f, 4, 4, "max"), reference(f))
  grads = [jax.grad(lambda f: jnp.sum(p(f) * weights))(f)
           for p in (reference, lambda f: fsp_lib._pool_to(f, 4, 4, "max"))]
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6)  # Unique maxima.
  ties = jnp.zeros((1, 2, 2, 1))
  g = jax.grad(lambda f: jnp.sum(fsp_lib._pool_to(f, 1, 1, "max")))(ties)
  np.testing.assert_allclose(g, jnp.full((1, 2, 2, 1), 0.25))
