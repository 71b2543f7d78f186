"""The pure distillation losses (fsp_jax.losses) against float64 NumPy transcriptions
of RepDistiller's / mdistiller's formulas, written here with loops, plus properties
(zero at equality, batch-order invariance, RKD's scale invariance), jit, grad and vmap."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsp_jax import losses
from fsp_jax.validation import ConfigError

RTOL = 1e-5
ATOL = 1e-7


def rng(seed=0):
  return np.random.default_rng(seed)


def randn(seed, *shape):
  return rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- NumPy references


def np_softmax(y):
  y = np.asarray(y, np.float64)
  e = np.exp(y - y.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def np_kl_rows(log_q, p):
  """Per-row sum of p * (log p - log q), 0 log 0 = 0."""
  out = np.zeros(p.shape[0])
  for b in range(p.shape[0]):
    for k in range(p.shape[1]):
      if p[b, k] > 0:
        out[b] += p[b, k] * (np.log(p[b, k]) - log_q[b, k])
  return out


def np_kd(y_s, y_t, t=4.0):
  p_s = np_softmax(np.asarray(y_s, np.float64) / t)
  p_t = np_softmax(np.asarray(y_t, np.float64) / t)
  return np_kl_rows(np.log(p_s), p_t).sum() * t * t / p_s.shape[0]


def np_pool(f, h, w):
  """Adaptive average pooling of (B, H, W, C) to (h, w) for divisible sizes, by loops."""
  b, hh, ww, c = f.shape
  kh, kw = hh // h, ww // w
  out = np.zeros((b, h, w, c))
  for i in range(h):
    for j in range(w):
      out[:, i, j] = f[:, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean(axis=(1, 2))
  return out


def np_match(f_s, f_t):
  f_s, f_t = np.asarray(f_s, np.float64), np.asarray(f_t, np.float64)
  if f_s.shape[1] > f_t.shape[1]:
    f_s = np_pool(f_s, *f_t.shape[1:3])
  elif f_t.shape[1] > f_s.shape[1]:
    f_t = np_pool(f_t, *f_s.shape[1:3])
  return f_s, f_t


def np_unit(v, eps=1e-12):
  return v / max(np.sqrt(np.sum(v * v)), eps)


def np_at(f_s, f_t, p=2):
  f_s, f_t = np_match(f_s, f_t)
  b, h, w, _ = f_s.shape
  total = 0.0
  for n in range(b):
    a_s = np_unit(np.array([[np.mean(f_s[n, y, x] ** p) for x in range(w)]
                            for y in range(h)]).ravel())
    a_t = np_unit(np.array([[np.mean(f_t[n, y, x] ** p) for x in range(w)]
                            for y in range(h)]).ravel())
    total += np.sum((a_s - a_t) ** 2)
  return total / (b * h * w)


def np_sp(f_s, f_t):
  b = f_s.shape[0]

  def gram(f):
    f = np.asarray(f, np.float64).reshape(b, -1)
    g = np.array([[np.dot(f[i], f[j]) for j in range(b)] for i in range(b)])
    return np.stack([np_unit(row) for row in g])

  return np.sum((gram(f_t) - gram(f_s)) ** 2) / (b * b)


def np_pkt(x_s, x_t, eps=1e-7):
  def probs(x):
    x = np.asarray(x, np.float64)
    x = np.stack([row / (np.sqrt(np.sum(row * row)) + eps) for row in x])
    b = x.shape[0]
    s = np.array([[(np.dot(x[i], x[j]) + 1) / 2 for j in range(b)] for i in range(b)])
    return s / s.sum(axis=1, keepdims=True)

  s, t = probs(x_s), probs(x_t)
  return np.mean(t * np.log((t + eps) / (s + eps)))


def np_smooth_l1(x, y):
  d = np.abs(x - y)
  return np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5))


def np_rkd(e_s, e_t, w_d=25.0, w_a=50.0):
  def distances(e):
    e = np.asarray(e, np.float64).reshape(e.shape[0], -1)
    b = e.shape[0]
    d = np.zeros((b, b))
    for i in range(b):
      for j in range(b):
        if i != j:
          d[i, j] = max(np.sqrt(np.sum((e[i] - e[j]) ** 2)), 1e-6)
    return d / d[d > 0].mean()

  def angles(e):
    e = np.asarray(e, np.float64).reshape(e.shape[0], -1)
    b = e.shape[0]
    a = np.zeros((b, b, b))
    for i in range(b):
      for j in range(b):
        for k in range(b):
          a[i, j, k] = np.dot(np_unit(e[j] - e[i]), np_unit(e[k] - e[i]))
    return a.ravel()

  return (w_d * np_smooth_l1(distances(e_s), distances(e_t))
          + w_a * np_smooth_l1(angles(e_s), angles(e_t)))


def np_nst(f_s, f_t):
  f_s, f_t = np_match(f_s, f_t)

  def vectors(f):
    b, h, w, c = f.shape
    return np.stack([np.stack([np_unit(f[n, :, :, ch].ravel()) for ch in range(c)])
                     for n in range(b)])

  def poly(a, b):
    out = np.zeros((a.shape[0], b.shape[1], a.shape[1]))
    for n in range(a.shape[0]):
      for i in range(b.shape[1]):
        for j in range(a.shape[1]):
          out[n, i, j] = np.dot(a[n, j], b[n, i]) ** 2
    return out

  v_s, v_t = vectors(f_s), vectors(f_t)
  return poly(v_t, v_t).mean() + poly(v_s, v_s).mean() - 2 * poly(v_s, v_t).mean()


def np_dkd(y_s, y_t, labels, alpha=1.0, beta=8.0, t=4.0):
  y_s, y_t = np.asarray(y_s, np.float64), np.asarray(y_t, np.float64)
  b, k = y_s.shape
  gt = np.zeros((b, k))
  gt[np.arange(b), labels] = 1.0
  p_s, p_t = np_softmax(y_s / t), np_softmax(y_t / t)
  cat_s = np.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
  cat_t = np.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
  tckd = np_kl_rows(np.log(cat_s), cat_t).sum() * t * t / b
  # The non-target distributions over the K - 1 other classes (the -1000 mask).
  nckd = 0.0
  for n in range(b):
    keep = np.arange(k) != labels[n]
    q_s = np_softmax(y_s[n:n + 1, keep] / t)
    q_t = np_softmax(y_t[n:n + 1, keep] / t)
    nckd += np_kl_rows(np.log(q_s), q_t)[0]
  nckd *= t * t / b
  return alpha * tckd + beta * nckd


# ---------------------------------------------------------------- inputs

# The losses under jit (one compilation per shape; eager calls compile op by op, which
# costs more on small inputs). test_jit_gives_the_same_value checks them against eager.
kd_loss = jax.jit(losses.kd_loss)
at_loss = jax.jit(losses.at_loss, static_argnames="p")
sp_loss = jax.jit(losses.sp_loss)
pkt_loss = jax.jit(losses.pkt_loss)
rkd_loss = jax.jit(losses.rkd_loss)
nst_loss = jax.jit(losses.nst_loss)
dkd_loss = jax.jit(losses.dkd_loss)

LABELS = np.array([0, 3, 5, 1, 9, 3])


def cases(jit=True):
  """(name, loss function, student, teacher, NumPy reference) on random inputs;
  other keyword arguments (DKD's labels) bound in the function. jit=False: the
  functions of fsp_jax.losses themselves."""
  ns = globals() if jit else vars(losses)
  kd, at, sp, pkt, rkd, nst, dkd = (ns[f"{n}_loss"] for n in
                                    ("kd", "at", "sp", "pkt", "rkd", "nst", "dkd"))
  return [
      ("kd", kd, randn(1, 6, 10), randn(2, 6, 10), np_kd),
      ("at", at, randn(3, 4, 8, 8, 3), randn(4, 4, 4, 4, 5), np_at),
      ("sp", sp, randn(5, 4, 4, 4, 3), randn(6, 4, 2, 2, 7), np_sp),
      ("pkt", pkt, randn(7, 6, 5), randn(8, 6, 9), np_pkt),
      ("rkd", rkd, randn(9, 5, 4), randn(10, 5, 7), np_rkd),
      ("nst", nst, randn(11, 3, 4, 4, 6), randn(12, 3, 8, 8, 4), np_nst),
      ("dkd", lambda s, t: dkd(s, t, LABELS), randn(13, 6, 10),
       3.0 * randn(14, 6, 10), lambda s, t: np_dkd(s, t, LABELS)),
  ]


CASES = {name: case for name, *case in cases()}


# ---------------------------------------------------------------- against NumPy


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_reference(name):
  fn, s, t, ref = CASES[name]
  value = fn(s, t)
  assert value.shape == () and value.dtype == jnp.float32
  np.testing.assert_allclose(float(value), ref(s, t), rtol=RTOL, atol=ATOL)


def test_kd_and_dkd_at_other_temperatures_and_weights():
  s, t = randn(20, 5, 7), randn(21, 5, 7)
  for temp in (1.0, 2.5):
    np.testing.assert_allclose(float(kd_loss(s, t, temp)), np_kd(s, t, temp),
                               rtol=RTOL)
  labels = np.array([6, 0, 2, 2, 4])
  np.testing.assert_allclose(
      float(dkd_loss(s, t, labels, alpha=0.5, beta=2.0, temperature=2.0)),
      np_dkd(s, t, labels, 0.5, 2.0, 2.0), rtol=RTOL)


def test_kd_is_mean_kl_times_t_squared():
  s, t = randn(22, 4, 6), randn(23, 4, 6)
  temp = 3.0
  p_s, p_t = np_softmax(s / temp), np_softmax(t / temp)
  mean_kl = np.mean([np.sum(p_t[b] * np.log(p_t[b] / p_s[b])) for b in range(4)])
  np.testing.assert_allclose(float(kd_loss(s, t, temp)), temp ** 2 * mean_kl,
                             rtol=RTOL)


def test_at_p_and_same_size_maps():
  s, t = randn(24, 3, 4, 4, 2), randn(25, 3, 4, 4, 6)
  np.testing.assert_allclose(float(at_loss(s, t, p=4)), np_at(s, t, p=4),
                             rtol=RTOL)
  np.testing.assert_allclose(float(at_loss(s, t)), np_at(s, t), rtol=RTOL)


def test_pooling_of_non_square_maps_and_of_the_student():
  # Student larger (pooled), non-square maps, ratios 2 and 4.
  s, t = randn(26, 2, 8, 4, 3), randn(27, 2, 4, 1, 5)
  np.testing.assert_allclose(float(at_loss(s, t)), np_at(s, t), rtol=RTOL)
  np.testing.assert_allclose(float(nst_loss(s, t)), np_nst(s, t), rtol=RTOL)


def test_rkd_weights_are_arguments():
  s, t = randn(28, 4, 3), randn(29, 4, 5)
  np.testing.assert_allclose(float(rkd_loss(s, t, 1.0, 0.0)),
                             np_rkd(s, t, 1.0, 0.0), rtol=RTOL)
  np.testing.assert_allclose(float(rkd_loss(s, t, 0.0, 1.0)),
                             np_rkd(s, t, 0.0, 1.0), rtol=RTOL)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", sorted(CASES))
def test_zero_when_student_equals_teacher(name):
  fn, s, _, _ = CASES[name]
  # AT/NST need equal shapes to be equal; the student's map serves both sides.
  assert abs(float(fn(s, s))) < 1e-6


def test_batch_order_invariance():
  order = np.array([3, 0, 5, 1, 4, 2])
  for name, fn, s, t, _ in cases():
    perm = order[order < s.shape[0]]
    if name == "dkd":
      permuted = dkd_loss(s[perm], t[perm], LABELS[perm])
    else:
      permuted = fn(s[perm], t[perm])
    np.testing.assert_allclose(float(permuted), float(fn(s, t)), rtol=1e-5, atol=1e-7,
                               err_msg=name)


def test_rkd_invariant_to_a_common_scale():
  s, t = randn(30, 5, 4), randn(31, 5, 6)
  base = float(rkd_loss(s, t))
  np.testing.assert_allclose(float(rkd_loss(3.7 * s, t)), base, rtol=1e-5)
  np.testing.assert_allclose(float(rkd_loss(s, 0.25 * t)), base, rtol=1e-5)


def test_teacher_side_without_gradient_where_repdistiller_detaches_it():
  s, t = randn(32, 4, 3), randn(33, 4, 5)
  assert np.all(np.asarray(jax.jit(jax.grad(losses.rkd_loss, argnums=1))(s, t)) == 0)
  # NST: the teacher-teacher term is detached, so at student == teacher (the full
  # MMD's minimum, gradient 0) the teacher still gets the cross term's gradient.
  f = randn(34, 2, 4, 4, 3)
  grad_teacher = jax.jit(jax.grad(losses.nst_loss, argnums=1))(f, f)
  assert np.max(np.abs(np.asarray(grad_teacher))) > 1e-4
  grad_student = jax.jit(jax.grad(losses.nst_loss))(f, f)
  np.testing.assert_allclose(np.asarray(grad_student), 0, atol=1e-5)


def test_computes_in_float32_whatever_the_input_dtype():
  for name, fn, s, t, ref in cases():
    value = fn(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
    assert value.dtype == jnp.float32, name
    s16 = np.asarray(jnp.asarray(s, jnp.bfloat16).astype(jnp.float32))
    t16 = np.asarray(jnp.asarray(t, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(float(value), ref(s16, t16), rtol=1e-5, atol=ATOL,
                               err_msg=name)


# ---------------------------------------------------------------- jit, grad, vmap


def test_jit_gives_the_same_value():
  for (name, fn, s, t, _), (_, jitted, *_) in zip(cases(jit=False), cases()):
    np.testing.assert_allclose(float(jitted(s, t)), float(fn(s, t)), rtol=1e-6,
                               atol=1e-8, err_msg=name)


def _assert_finite_grad(fn, s, t, what):
  # jit: one compilation per loss and shape, where eager grads dispatch op by op.
  g = np.asarray(jax.jit(jax.grad(fn))(s, t))
  assert g.shape == np.shape(s), what
  assert np.all(np.isfinite(g)), f"{what}: non-finite gradient"
  return g


def test_gradients_are_finite_on_random_and_all_zero_inputs():
  for name, fn, s, t, _ in cases(jit=False):
    g = _assert_finite_grad(fn, s, t, f"{name} random")
    assert np.any(g != 0), name
    _assert_finite_grad(fn, np.zeros_like(s), np.zeros_like(t), f"{name} zeros")
    _assert_finite_grad(fn, np.zeros_like(s), t, f"{name} zero student")
    _assert_finite_grad(fn, s, np.zeros_like(t), f"{name} zero teacher")
    assert np.isfinite(float(fn(np.zeros_like(s), np.zeros_like(t)))), name


def test_rkd_with_identical_rows_and_a_single_row():
  s, t = randn(36, 5, 4), randn(37, 5, 6)
  s[3] = s[1]
  t[4] = t[0]
  assert np.isfinite(float(rkd_loss(s, t)))
  _assert_finite_grad(losses.rkd_loss, s, t, "rkd identical rows")
  np.testing.assert_allclose(float(rkd_loss(s, t)), np_rkd(s, t), rtol=1e-4)
  # B = 1 (RepDistiller: NaN, an empty mean): 0, with a finite gradient.
  one_s, one_t = s[:1], t[:1]
  assert float(rkd_loss(one_s, one_t)) == 0.0
  _assert_finite_grad(losses.rkd_loss, one_s, one_t, "rkd single row")


def test_dkd_extreme_logits_give_finite_values_and_gradients():
  # The -1000 mask underflows the target class to 0 in float32: 0 log 0 = 0.
  s, t = 30.0 * randn(38, 4, 6), 30.0 * randn(39, 4, 6)
  labels = np.array([1, 2, 3, 4])
  value = float(dkd_loss(s, t, labels, temperature=1.0))
  np.testing.assert_allclose(value, np_dkd(s, t, labels, t=1.0), rtol=1e-4)
  g = jax.jit(jax.grad(losses.dkd_loss))(s, t, labels, temperature=1.0)
  assert np.all(np.isfinite(np.asarray(g)))


def test_vmap_gives_the_per_slice_losses():
  for (name, fn, s, t, _), (_, jitted, *_) in zip(cases(jit=False), cases()):
    stacked_s = np.stack([s, 0.5 * s + 0.1, -s])
    stacked_t = np.stack([t, t[::-1].copy(), 2.0 * t])
    if name == "dkd":
      labels = np.stack([LABELS, LABELS[::-1], (LABELS + 1) % 10])
      mapped = jax.jit(jax.vmap(losses.dkd_loss))(stacked_s, stacked_t, labels)
      expected = [float(dkd_loss(a, b, c))
                  for a, b, c in zip(stacked_s, stacked_t, labels)]
    else:
      mapped = jax.jit(jax.vmap(fn))(stacked_s, stacked_t)
      expected = [float(jitted(a, b)) for a, b in zip(stacked_s, stacked_t)]
    assert mapped.shape == (3,), name
    np.testing.assert_allclose(np.asarray(mapped), expected, rtol=1e-5, atol=1e-7,
                               err_msg=name)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [losses.at_loss, losses.nst_loss])
def test_unpoolable_sizes_raise_a_one_line_config_error(fn):
  for s_shape, t_shape in (((2, 8, 8, 3), (2, 3, 3, 3)),
                           ((2, 8, 4, 3), (2, 4, 8, 3))):
    with pytest.raises(ConfigError) as info:
      fn(np.ones(s_shape, np.float32), np.ones(t_shape, np.float32))
    message = str(info.value)
    assert "\n" not in message
    assert str(s_shape) in message and str(t_shape) in message


def test_fsp_reexports():
  from fsp_jax import fsp
  assert losses.fsp_matrix is fsp.fsp_matrix and losses.fsp_loss is fsp.fsp_loss
