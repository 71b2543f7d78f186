"""Each distiller's objective against its formula in NumPy; building them from
configs; steps with learned distiller parameters, a frozen teacher (no gradient,
inference mode), KD added to cross-entropy, and FSP's step as SGD on Eq. 2."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ml_collections

from fsp_jax import data, methods, fsp, models, train


NAMES = ("stem", "section1", "section2")
PAIRS = (("stem", "section1"), ("section1", "section2"))


def _maps(rng, b, shapes, names=NAMES):
  """Named feature maps `{'stem': (b,) + shapes[0], ...}`, as the models return them."""
  return {n: rng.uniform(0, 1, size=(b,) + s).astype(np.float32)
          for n, s in zip(names, shapes)}


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
  d = methods.FSP(PAIRS, weights=(1.0, 0.5))
  targets = d.teacher_targets(None, teacher)
  assert len(targets) == 2
  got = d.objective({}, targets, None, student, 0)
  # Pairs (stem, section1) and (section1, section2); the second max-pools the 8x8 map
  # to 4x4.
  want = np.zeros(3)
  for lam, (i, j) in zip((1.0, 0.5), PAIRS):
    def gram(f):
      a, b = f[i], f[j]
      if a.shape[1] > b.shape[1]:
        a = _np_maxpool(a, a.shape[1] // b.shape[1])
      return _np_gram(a, b)
    want += lam * np.sum((gram(teacher) - gram(student)) ** 2, axis=(1, 2))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  # Its batch mean is the library's Eq. 2.
  np.testing.assert_allclose(
      float(jnp.mean(got)),
      float(fsp.fsp_loss(teacher, student, PAIRS, weights=(1.0, 0.5))), rtol=1e-6)
  assert d.init(jax.random.PRNGKey(0), teacher, student) == {}
  # Only the named pair is used: a single pair gives its own term.
  one = methods.FSP((("section1", "section2"),))
  np.testing.assert_allclose(
      np.asarray(one.objective({}, one.teacher_targets(None, teacher), None, student, 0)),
      np.sum((_np_gram(_np_maxpool(teacher["section1"], 2), teacher["section2"]) -
              _np_gram(_np_maxpool(student["section1"], 2), student["section2"])) ** 2,
             axis=(1, 2)), rtol=1e-5)
  # The element-mean scale: 4x4 and 4x8 matrices.
  mean = methods.FSP(PAIRS, weights=(1.0, 0.5), reduction="mean")
  np.testing.assert_allclose(
      np.asarray(mean.objective({}, targets, None, student, 0)),
      np.asarray(methods.FSP(PAIRS, weights=(1.0 / 16, 0.5 / 32)).objective(
          {}, targets, None, student, 0)), rtol=1e-6)
  with pytest.raises(ValueError, match="fsp.reduction"):
    methods.FSP(PAIRS, reduction="avg")
  with pytest.raises(ValueError, match="one weight per pair"):
    methods.FSP(PAIRS, weights=(1.0,))


def test_fsp_adapter_maps_student_channels_to_the_teacher():
  rng = np.random.default_rng(1)
  names = ("stem", "section1")
  teacher = _maps(rng, 2, [(4, 4, 6), (4, 4, 10)], names)
  student = _maps(rng, 2, [(4, 4, 3), (4, 4, 5)], names)
  pairs = (("stem", "section1"),)
  plain = methods.FSP(pairs)
  with pytest.raises(ValueError, match="adapter"):
    plain.objective({}, plain.teacher_targets(None, teacher), None, student, 0)
  d = methods.FSP(pairs, adapter=True)
  params = d.init(jax.random.PRNGKey(0), teacher, student)
  assert {k: v["kernel"].shape for k, v in params.items()} == {
      "adapter_stem": (3, 6), "adapter_section1": (5, 10)}
  got = d.objective(params, d.teacher_targets(None, teacher), None, student, 0)
  a0, a1 = (np.asarray(params[f"adapter_{n}"]["kernel"], np.float64) for n in names)
  # G(F0 A0, F1 A1) = A0^T G(F0, F1) A1.
  g_s = np.einsum("im,bij,jn->bmn", a0, _np_gram(*student.values()), a1)
  want = np.sum((_np_gram(*teacher.values()) - g_s) ** 2, axis=(1, 2))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
  # Only the features a pair uses get an adapter.
  wide = dict(teacher, section2=np.zeros((2, 2, 2, 7), np.float32))
  narrow = dict(student, section2=np.zeros((2, 2, 2, 1), np.float32))
  assert set(d.init(jax.random.PRNGKey(0), wide, narrow)) == {"adapter_stem",
                                                              "adapter_section1"}
  with pytest.raises(ValueError, match="'section2' is not a feature"):
    methods.FSP((("section1", "section2"),), adapter=True).init(
        jax.random.PRNGKey(0), teacher, student)


@pytest.mark.parametrize("kernel", [1, 3])
def test_hint_objective_is_fitnet_l2_through_a_regressor(kernel):
  rng = np.random.default_rng(2)
  names = ("stem", "section1")
  teacher = _maps(rng, 2, [(6, 6, 4), (6, 6, 7)], names)
  student = _maps(rng, 2, [(6, 6, 4), (6, 6, 3)], names)
  d = methods.Hint(hint_feature="section1", guided_feature="section1",
                      regressor_kernel=kernel)
  params = d.init(jax.random.PRNGKey(0), teacher, student)
  w = np.asarray(params["regressor"]["kernel"], np.float64)
  assert w.shape == (kernel, kernel, 3, 7)
  bias = rng.normal(size=7)
  params = {"regressor": {"kernel": params["regressor"]["kernel"],
                          "bias": jnp.asarray(bias, jnp.float32)}}
  targets = d.teacher_targets(None, teacher)
  np.testing.assert_array_equal(targets, teacher["section1"])
  got = d.objective(params, targets, None, student, 0)
  # A 'SAME' convolution written out: zero padding, then the sum over the window.
  g = np.asarray(student["section1"], np.float64)
  p = kernel // 2
  padded = np.pad(g, ((0, 0), (p, p), (p, p), (0, 0)))
  conv = np.zeros((2, 6, 6, 7))
  for dy in range(kernel):
    for dx in range(kernel):
      conv += np.einsum("bhwc,cd->bhwd", padded[:, dy:dy + 6, dx:dx + 6], w[dy, dx])
  regressed = np.maximum(conv + bias, 0.0)
  want = 0.5 * np.sum((teacher["section1"] - regressed) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_hint_pools_the_larger_map_and_checks_features():
  rng = np.random.default_rng(3)
  names = ("stem", "section1")
  teacher = _maps(rng, 1, [(8, 8, 2), (4, 4, 2)], names)
  student = _maps(rng, 1, [(8, 8, 2), (4, 4, 2)], names)
  d = methods.Hint(hint_feature="section1", guided_feature="stem")
  params = d.init(jax.random.PRNGKey(0), teacher, student)
  got = d.objective(params, teacher["section1"], None, student, 0)
  regressed = np.asarray(d.regress(params, student["stem"]))
  want = 0.5 * np.sum((teacher["section1"] - _np_maxpool(regressed, 2)) ** 2,
                      axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  with pytest.raises(ValueError, match="hint_feature 'section5' is not a feature"):
    methods.Hint(hint_feature="section5").init(jax.random.PRNGKey(0), teacher,
                                                  student)
  with pytest.raises(ValueError, match="guided_feature 'section2' is not a feature"):
    methods.Hint(hint_feature="stem").init(jax.random.PRNGKey(0), teacher, student)


def test_from_config_and_build_resolve_names_and_indices():
  names = ("stem", "section1", "section2", "section3")
  config = ml_collections.ConfigDict(dict(
      fsp=dict(fsp_pairs=(), weights=(), pool="max", reduction="sum", adapter=False),
      fitnet=dict(hint_feature="section2", guided_feature=1, regressor_kernel=3,
                  pool="avg"),
      kd=dict(temperature=3.0, weight=4.0, final_weight=1.0, scale_by_t_squared=False)),
      type_safe=False)  # Fields given by name or by index.
  assert [(m.name, m.stage_one, m.term) for m in methods.BUILTIN[:3]] == [
      ("fsp", methods.FSP, None), ("fitnet", methods.Hint, methods.KD),
      ("kd", None, methods.KD)]
  # () = one pair per section, by name.
  assert methods.build_objective(methods.FSP, config, names) == methods.FSP(
      (("stem", "section1"), ("section1", "section2"), ("section2", "section3")))
  config.fsp.fsp_pairs = ((0, "section2"), ("section2", 3))
  config.fsp.weights = (1.0, 0.5)
  config.fsp.update(pool="avg", reduction="mean", adapter=True)
  assert methods.build_objective(methods.FSP, config, names) == methods.FSP(
      (("stem", "section2"), ("section2", "section3")), (1.0, 0.5), "avg",
      adapter=True, reduction="mean")
  assert methods.build_objective(methods.Hint, config, names) == methods.Hint(
      "section2", "section1", 3, "avg")
  assert methods.build_objective(methods.KD, config, names, num_steps=50) == methods.KD(
      3.0, 4.0, 1.0, 50, False)
  assert methods.KD.from_config(config.kd, names, 7).num_steps == 7
  config.fitnet.hint_feature = 5
  with pytest.raises(ValueError, match="fitnet.hint_feature 5 is out of range"):
    methods.build_objective(methods.Hint, config, names)
  config.fsp.fsp_pairs = (("stem", "section9"),)
  with pytest.raises(ValueError, match="'section9' is not a feature"):
    methods.build_objective(methods.FSP, config, names)
  with pytest.raises(ValueError, match="unknown distillation method 'hint'"):
    methods.get("hint")  # An objective's name, not a method's.


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
  d = methods.KD(temperature=3.0, weight=4.0, final_weight=1.0, num_steps=101)
  targets = d.teacher_targets(t_logits, None)
  for step, weight in ((0, 4.0), (50, 2.5), (100, 1.0), (500, 1.0)):
    np.testing.assert_allclose(np.asarray(d.objective({}, targets, s_logits, None, step)),
                               weight * kl, rtol=1e-5)
  hinton = methods.KD(temperature=3.0, weight=0.5, scale_by_t_squared=True)
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
  stats = (tuple(float(v) for v in ds.mean), tuple(float(v) for v in ds.std))
  teacher = models.Network(models.create_model("cifar_resnet8", 10, teacher_width),
                           *stats)
  student = models.Network(models.create_model("cifar_resnet8", 10), *stats)
  tv = teacher.init(jax.random.PRNGKey(1), (16, 16, 1))
  sv = student.init(jax.random.PRNGKey(0), (16, 16, 1))
  batch = data.train_batch(ds, 16, seed=0, step=0)
  return ds, teacher, student, tv, sv, batch


def _hint_setup():
  ds, teacher, student, tv, sv, batch = _digits_setup(teacher_width=2)
  x = jnp.zeros((1, 16, 16, 1), jnp.uint8)
  _, t_feats = teacher.apply(tv, x)
  _, s_feats = student.apply(sv, x)
  d = methods.Hint(hint_feature="section2", guided_feature="section2")
  dparams = d.init(jax.random.PRNGKey(2), t_feats, s_feats)
  return teacher, student, tv, sv, batch, d, dparams


def _step(student, teacher, d, use_labels):
  """`train.train_step` jitted without donation (its inputs are used again)."""
  return jax.jit(functools.partial(train.train_step, student=student, teacher=teacher,
                                   distiller=d, use_labels=use_labels))


def test_step_trains_distiller_params_with_the_student():
  teacher, student, tv, sv, batch, d, dparams = _hint_setup()
  tx = train.create_optimizer(train.create_learning_rate_fn((1e-3,), ()), 0.9, 0.0)
  # Host copies: the jitted step donates the state (and so these very arrays).
  sv0, dparams0 = jax.device_get(sv), jax.device_get(dparams)
  state = train.create_train_state(student, sv, tx, dparams)
  assert set(state.params) == {"student", "distiller"}
  assert state.distiller_params is state.params["distiller"]
  assert state.variables["params"] is state.params["student"]
  step = train.jit_train_step(student, teacher, d, use_labels=False)
  assert step is train.jit_train_step(student, teacher, d, use_labels=False)
  new, m1 = step(state, batch, tv)
  new, m2 = step(new, batch, tv)
  assert set(m1) == {"loss"}  # One term, no labels: no accuracy.
  assert float(m2["loss"]) < float(m1["loss"]) and int(new.step) == 2
  assert not np.allclose(new.distiller_params["regressor"]["kernel"],
                         dparams0["regressor"]["kernel"])
  assert not np.allclose(new.params["student"]["stem_conv"]["kernel"],
                         sv0["params"]["stem_conv"]["kernel"])
  # Only layers up to the guided one (section 2) learn; no weight decay here.
  np.testing.assert_array_equal(
      new.params["student"]["section3_module1"]["conv1"]["kernel"],
      sv0["params"]["section3_module1"]["conv1"]["kernel"])
  np.testing.assert_array_equal(new.params["student"]["classifier"]["kernel"],
                                sv0["params"]["classifier"]["kernel"])


@pytest.mark.parametrize("method", ["hint", "kd"])
def test_step_gives_the_teacher_no_gradient_and_no_new_statistics(method):
  teacher, student, tv, sv, batch, d, dparams = _hint_setup()
  use_labels = method == "kd"
  if method == "kd":
    d, dparams = methods.KD(temperature=3.0, weight=4.0), {}
  tx = train.create_optimizer(train.create_learning_rate_fn((1e-2,), ()), 0.9, 1e-4)
  state = train.create_train_state(student, sv, tx, dparams)
  images = jnp.asarray(batch["image"])

  # 1. The gradient of the step's loss w.r.t. the teacher's variables is exactly zero,
  # although the teacher's targets depend on them.
  def step_loss(teacher_variables):
    _, metrics = train.train_step(state, batch, teacher_variables, student=student,
                                  teacher=teacher, distiller=d, use_labels=use_labels)
    return metrics["loss"]

  grads = jax.jit(jax.grad(step_loss))(tv)
  assert jax.tree.structure(grads) == jax.tree.structure(tv)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
  reach = jax.jit(jax.grad(
      lambda v: jnp.sum(d.teacher_targets(*teacher.apply(v, images)))))(tv)
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(reach["params"]))

  # 2. The step runs the teacher in inference mode. In training mode the teacher would
  # move its statistics and give other targets.
  inference = d.teacher_targets(*teacher.apply(tv, images))
  (t_out, t_stats) = teacher.apply(tv, images, train=True)
  train_mode = d.teacher_targets(*t_out)
  assert not np.allclose(t_stats["stem_bn"]["mean"], tv["batch_stats"]["stem_bn"]["mean"])
  assert not np.allclose(train_mode, inference, rtol=1e-3)
  np.testing.assert_allclose(train.jit_teacher_targets(teacher, d)(tv, images),
                             inference, rtol=1e-5, atol=1e-6)
  step = _step(student, teacher, d, use_labels)
  ran, m_ran = step(state, batch, tv)
  cached, m_cached = step(state, dict(batch, teacher_targets=inference), None)
  moved, m_moved = step(state, dict(batch, teacher_targets=train_mode), None)
  np.testing.assert_allclose(float(m_ran["loss"]), float(m_cached["loss"]), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               ran.params, cached.params)
  assert not np.isclose(float(m_ran["loss"]), float(m_moved["loss"]), rtol=1e-3)
  # What the step returns holds the student's statistics only (the teacher has twice
  # the student's width): nothing the teacher could take back.
  assert jax.tree.map(np.shape, ran.batch_stats) == jax.tree.map(np.shape,
                                                                 sv["batch_stats"])
  assert jax.tree.map(np.shape, ran.batch_stats) != jax.tree.map(np.shape,
                                                                 tv["batch_stats"])


def test_kd_term_adds_to_cross_entropy_in_a_main_task_step():
  ds, teacher, student, tv, sv, batch = _digits_setup()
  tx = train.create_optimizer(train.create_learning_rate_fn((0.0,), ()), 0.9, 0.0)
  state = train.create_train_state(student, sv, tx)
  d = methods.KD(temperature=3.0, weight=4.0)
  _, metrics = _step(student, teacher, d, True)(state, batch, tv)
  (logits, _), _ = student.apply(sv, batch["image"], train=True)
  t_logits, _ = teacher.apply(tv, batch["image"])
  ce = float(train.cross_entropy_loss(logits, batch["label"]))
  kd = float(jnp.mean(d.objective({}, t_logits, logits, None, 0)))
  assert set(metrics) == {"loss", "accuracy", "task_loss", "kd_loss"}
  np.testing.assert_allclose(float(metrics["task_loss"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kd_loss"]), kd, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["loss"]), ce + kd, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]),
                             np.mean(np.argmax(logits, -1) == batch["label"]))


def test_fsp_step_is_one_sgd_step_on_eq2():
  """The FSP stage-1 step: loss = Eq. 2 between the teacher's (inference mode) and the
  student's (train mode) features; update = PyTorch SGD on its gradient."""
  ds, teacher, student, tv, sv, batch = _digits_setup()
  d = methods.FSP(fsp.default_fsp_pairs(student.feature_names))
  # A large decay, so that lr * wd = 1e-5 shows in float32 parameters.
  lr, wd = 1e-3, 1e-2
  tx = train.create_optimizer(train.create_learning_rate_fn((lr,), ()), 0.9, wd)
  state = train.create_train_state(student, sv, tx)
  new, metrics = _step(student, teacher, d, False)(state, batch, tv)
  assert set(metrics) == {"loss"} and new.params["distiller"] == {}

  _, t_feats = teacher.apply(tv, batch["image"])

  def reference(params):
    (_, s_feats), stats = student.apply(
        {"params": params, "batch_stats": sv["batch_stats"]}, batch["image"], train=True)
    return fsp.fsp_loss(t_feats, s_feats, d.fsp_pairs), (s_feats, stats)

  (loss, (s_feats, stats)), grads = jax.value_and_grad(reference, has_aux=True)(
      sv["params"])
  # Eq. 2 in NumPy: pairs (stem, section1) at 16x16, then max-pooled 16->8 and 8->4.
  want = 0.0
  for i, j in d.fsp_pairs:
    def gram(f):
      a, b = np.asarray(f[i]), np.asarray(f[j])
      if a.shape[1] > b.shape[1]:
        a = _np_maxpool(a, a.shape[1] // b.shape[1])
      return _np_gram(a, b)
    want += np.mean(np.sum((gram(t_feats) - gram(s_feats)) ** 2, axis=(1, 2)))
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  # First step (momentum buffer 0): w' = w - lr * (g + wd * w), i.e. the step's
  # gradient (w - w') / lr - wd * w is the reference's (to float32 summation noise).
  def check(w, w_new, g):
    w, w_new, g = (np.asarray(x, np.float64) for x in (w, w_new, g))
    if not np.any(g):  # The classifier: FSP gives it no gradient, decay alone moves it.
      np.testing.assert_allclose(w_new, w * (1 - lr * wd), rtol=1e-6)
      return
    g_step = (w - w_new) / lr - wd * w
    np.testing.assert_allclose(g_step, g, rtol=1e-3, atol=1e-3 * np.abs(g).max())
  jax.tree.map(check, sv["params"], new.params["student"], grads)
  assert [k for k, g in grads.items() if not any(map(np.any, jax.tree.leaves(g)))] == [
      "classifier"]
  assert not np.allclose(new.params["student"]["classifier"]["kernel"],
                         sv["params"]["classifier"]["kernel"], rtol=1e-6, atol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new.batch_stats, stats)
