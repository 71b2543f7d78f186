"""Each distiller's objective against its formula in NumPy; a step with learned
distiller parameters; the pluggable step reproduces the FSP step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsp_jax import data, distillers, fsp, models, train


def _maps(rng, b, shapes):
  return [rng.uniform(0, 1, size=(b,) + s).astype(np.float32) for s in shapes]


def _np_gram(f1, f2):
  """Eq. 1 for maps of equal spatial size, float64: `(B, m, n)`."""
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  return np.einsum("bhwm,bhwn->bmn", f1, f2) / (f1.shape[1] * f1.shape[2])


def _np_maxpool(f, factor):
  b, h, w, c = f.shape
  return f.reshape(b, h // factor, factor, w // factor, factor, c).max((2, 4))


def test_fsp_objective_is_eq2_per_example():
  rng = np.random.default_rng(0)
  shapes = [(8, 8, 4), (8, 8, 4), (4, 4, 8)]
  teacher, student = _maps(rng, 3, shapes), _maps(rng, 3, shapes)
  d = distillers.FSP(weights=(1.0, 0.5))
  targets = d.teacher_targets(None, teacher)
  got = d.objective({}, targets, None, student, 0)
  # Pairs (0, 1) and (1, 2); the second max-pools the 8x8 map to 4x4.
  want = np.zeros(3)
  for lam, (i, j) in zip((1.0, 0.5), ((0, 1), (1, 2))):
    def gram(f):
      a, b = f[i], f[j]
      if a.shape[1] > b.shape[1]:
        a = _np_maxpool(a, a.shape[1] // b.shape[1])
      return _np_gram(a, b)
    want += lam * np.sum((gram(teacher) - gram(student)) ** 2, axis=(1, 2))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  # Its batch mean is the library's Eq. 2.
  np.testing.assert_allclose(float(jnp.mean(got)),
                             float(fsp.fsp_loss(teacher, student, weights=(1.0, 0.5))),
                             rtol=1e-6)
  assert d.init(jax.random.PRNGKey(0), teacher, student) == {}
  # The element-mean scale: 4x4 and 4x8 matrices.
  mean = distillers.FSP(weights=(1.0, 0.5), reduction="mean")
  np.testing.assert_allclose(
      np.asarray(mean.objective({}, targets, None, student, 0)),
      np.asarray(distillers.FSP(weights=(1.0 / 16, 0.5 / 32)).objective(
          {}, targets, None, student, 0)), rtol=1e-6)
  with pytest.raises(ValueError, match="fsp.reduction"):
    distillers.FSP(reduction="avg")


def test_fsp_adapter_maps_student_channels_to_the_teacher():
  rng = np.random.default_rng(1)
  teacher = _maps(rng, 2, [(4, 4, 6), (4, 4, 10)])
  student = _maps(rng, 2, [(4, 4, 3), (4, 4, 5)])
  plain = distillers.FSP()
  with pytest.raises(ValueError, match="adapter"):
    plain.objective({}, plain.teacher_targets(None, teacher), None, student, 0)
  d = distillers.FSP(adapter=True)
  params = d.init(jax.random.PRNGKey(0), teacher, student)
  assert {k: v["kernel"].shape for k, v in params.items()} == {
      "adapter0": (3, 6), "adapter1": (5, 10)}
  got = d.objective(params, d.teacher_targets(None, teacher), None, student, 0)
  a0, a1 = (np.asarray(params[f"adapter{k}"]["kernel"], np.float64) for k in (0, 1))
  # G(F0 A0, F1 A1) = A0^T G(F0, F1) A1.
  g_s = np.einsum("im,bij,jn->bmn", a0, _np_gram(*student), a1)
  want = np.sum((_np_gram(*teacher) - g_s) ** 2, axis=(1, 2))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


@pytest.mark.parametrize("kernel", [1, 3])
def test_hint_objective_is_fitnet_l2_through_a_regressor(kernel):
  rng = np.random.default_rng(2)
  teacher = _maps(rng, 2, [(6, 6, 4), (6, 6, 7)])
  student = _maps(rng, 2, [(6, 6, 4), (6, 6, 3)])
  d = distillers.Hint(hint_feature=1, guided_feature=1, regressor_kernel=kernel)
  params = d.init(jax.random.PRNGKey(0), teacher, student)
  w = np.asarray(params["regressor"]["kernel"], np.float64)
  assert w.shape == (kernel, kernel, 3, 7)
  bias = rng.normal(size=7)
  params = {"regressor": {"kernel": params["regressor"]["kernel"],
                          "bias": jnp.asarray(bias, jnp.float32)}}
  got = d.objective(params, d.teacher_targets(None, teacher), None, student, 0)
  # A 'SAME' convolution written out: zero padding, then the sum over the window.
  g = np.asarray(student[1], np.float64)
  p = kernel // 2
  padded = np.pad(g, ((0, 0), (p, p), (p, p), (0, 0)))
  conv = np.zeros((2, 6, 6, 7))
  for dy in range(kernel):
    for dx in range(kernel):
      conv += np.einsum("bhwc,cd->bhwd", padded[:, dy:dy + 6, dx:dx + 6], w[dy, dx])
  regressed = np.maximum(conv + bias, 0.0)
  want = 0.5 * np.sum((teacher[1] - regressed) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_hint_pools_the_larger_map_and_checks_indices():
  rng = np.random.default_rng(3)
  teacher = _maps(rng, 1, [(8, 8, 2), (4, 4, 2)])
  student = _maps(rng, 1, [(8, 8, 2), (4, 4, 2)])
  d = distillers.Hint(hint_feature=1, guided_feature=0)
  params = d.init(jax.random.PRNGKey(0), teacher, student)
  got = d.objective(params, teacher[1], None, student, 0)
  regressed = np.asarray(d.regress(params, student[0]))
  want = 0.5 * np.sum((teacher[1] - _np_maxpool(regressed, 2)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  with pytest.raises(ValueError, match="hint_feature 5 is out of range"):
    distillers.Hint(hint_feature=5).init(jax.random.PRNGKey(0), teacher, student)


def test_kd_objective_is_softened_kl_with_a_linear_weight():
  rng = np.random.default_rng(4)
  t_logits = rng.normal(size=(5, 7)).astype(np.float32) * 3
  s_logits = rng.normal(size=(5, 7)).astype(np.float32) * 3

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p_t = softmax(t_logits.astype(np.float64) / 3.0)
  p_s = softmax(s_logits.astype(np.float64) / 3.0)
  kl = np.sum(p_t * np.log(p_t / p_s), axis=-1)
  d = distillers.KD(temperature=3.0, weight=4.0, final_weight=1.0, num_steps=101)
  targets = d.teacher_targets(t_logits, None)
  for step, weight in ((0, 4.0), (50, 2.5), (100, 1.0), (500, 1.0)):
    np.testing.assert_allclose(np.asarray(d.objective({}, targets, s_logits, None, step)),
                               weight * kl, rtol=1e-5)
  hinton = distillers.KD(temperature=3.0, weight=0.5, scale_by_t_squared=True)
  np.testing.assert_allclose(np.asarray(hinton.objective({}, targets, s_logits, None, 7)),
                             0.5 * 9.0 * kl, rtol=1e-5)
  # Zero at a match; the teacher gets no gradient.
  np.testing.assert_allclose(np.asarray(d.objective({}, targets, t_logits, None, 0)), 0,
                             atol=1e-6)
  grad_t = jax.grad(lambda t: jnp.sum(d.objective({}, t, s_logits, None, 0)))(t_logits)
  assert not np.any(np.asarray(grad_t))
  with pytest.raises(ValueError, match="same classes"):
    d.objective({}, targets[:, :5], s_logits, None, 0)


def _digits_setup(teacher_width=1):
  ds = data.load_digits(16)
  teacher = models.create_model("cifar_resnet8", 10, teacher_width)
  student = models.create_model("cifar_resnet8", 10)
  tv = train.init_variables(teacher, jax.random.PRNGKey(1), (16, 16, 1))
  sv = train.init_variables(student, jax.random.PRNGKey(0), (16, 16, 1))
  batch = data.train_batch(ds, 16, seed=0, step=0)
  return ds, teacher, student, tv, sv, batch


def test_step_trains_distiller_params_with_the_student_and_not_the_teacher():
  ds, teacher, student, tv, sv, batch = _digits_setup(teacher_width=2)
  x = jnp.zeros((1, 16, 16, 1))
  _, t_feats = teacher.apply(tv, x, train=False)
  _, s_feats = student.apply(sv, x, train=False)
  d = distillers.Hint(hint_feature=2, guided_feature=2)
  dparams = d.init(jax.random.PRNGKey(2), t_feats, s_feats)
  tx = train.create_optimizer(train.create_learning_rate_fn((1e-3,), ()), 0.9, 0.0)
  state = train.create_train_state(student, sv, tx, dparams)
  assert set(state.trainable) == {"model", "distiller"}
  step = jax.jit(functools.partial(train.train_step, teacher_apply=teacher.apply,
                                   distiller=d, use_labels=False))
  mean, std = jnp.asarray(ds.mean), jnp.asarray(ds.std)
  teacher_before = jax.tree.map(np.asarray, tv)
  new, m1 = step(state, tv, batch, mean, std)
  new, m2 = step(new, tv, batch, mean, std)
  assert float(m2["loss"]) < float(m1["loss"]) and int(new.step) == 2
  assert not np.allclose(new.distiller_params["regressor"]["kernel"],
                         dparams["regressor"]["kernel"])
  assert not np.allclose(new.params["stem_conv"]["kernel"],
                         sv["params"]["stem_conv"]["kernel"])
  # Only layers up to the guided one (section 2) learn; no weight decay here.
  np.testing.assert_array_equal(new.params["section3_module1"]["conv1"]["kernel"],
                                sv["params"]["section3_module1"]["conv1"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.tree.map(np.asarray, tv))


def test_kd_term_adds_to_cross_entropy_in_a_main_task_step():
  ds, teacher, student, tv, sv, batch = _digits_setup()
  tx = train.create_optimizer(train.create_learning_rate_fn((0.0,), ()), 0.9, 0.0)
  state = train.create_train_state(student, sv, tx)
  mean, std = jnp.asarray(ds.mean), jnp.asarray(ds.std)
  d = distillers.KD(temperature=3.0, weight=4.0)
  _, metrics = jax.jit(functools.partial(train.train_step, teacher_apply=teacher.apply,
                                         distiller=d))(state, tv, batch, mean, std)
  images = train.normalize(batch["image"], mean, std)
  (logits, _), _ = student.apply(sv, images, train=True, mutable=["batch_stats"])
  t_logits, _ = teacher.apply(tv, images, train=False)
  ce = float(train.cross_entropy_loss(logits, batch["label"]))
  kd = float(jnp.mean(d.objective({}, t_logits, logits, None, 0)))
  np.testing.assert_allclose(float(metrics["task_loss"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kd_loss"]), kd, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["loss"]), ce + kd, rtol=1e-5)


def test_fsp_through_the_pluggable_step_equals_the_fsp_step():
  ds, teacher, student, tv, sv, batch = _digits_setup()
  tx = train.create_optimizer(train.create_learning_rate_fn((1e-3,), ()), 0.9, 1e-4)
  state = train.create_train_state(student, sv, tx)
  mean, std = jnp.asarray(ds.mean), jnp.asarray(ds.std)
  a, ma = jax.jit(functools.partial(
      train.fsp_step, teacher_apply=teacher.apply, fsp_pairs=None, fsp_weights=None,
      pool="max"))(state, tv, batch, mean, std)
  b, mb = jax.jit(functools.partial(
      train.train_step, teacher_apply=teacher.apply, distiller=distillers.FSP(),
      use_labels=False))(state, tv, batch, mean, std)
  np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
