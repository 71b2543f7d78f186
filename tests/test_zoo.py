"""The field's methods (AT, SP, PKT, RKD, NST, CC, VID, CRD, DKD terms, AB's and FT's
stage 1) and sums of terms ('at+kd', 'crd+kd'): all through one run of the smoke
config, seeds side by side, CRD's memory bank through a kill, their layers, weights,
sums and formulas."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orbax.checkpoint as ocp

from fsp_jax import (checkpoints, config_lib, losses, methods, metrics, stages, train,
                     validation)

TERMS = ("at", "sp", "pkt", "rkd", "nst", "cc", "vid", "crd", "dkd")


def smoke(**overrides):
  """quickstart:smoke's main task in 4 steps, evaluated at its end only: these runs
  check that each method trains, not how well."""
  config = config_lib.load("quickstart:smoke")
  config.baselines = ()
  config.student.schedule.num_steps = 4
  config.student.schedule.boundaries = (2,)
  config.eval_every = 0
  config.log_every = 2
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Every built-in method and two sums, trained in one command-line run.
EVERY = tuple(m.name for m in methods.BUILTIN) + ("at+kd", "crd+kd")


def smoke_flags():
  """`smoke()`'s settings as command-line flags."""
  return ["--config.baselines=()", "--config.student.schedule.num_steps=4",
          "--config.student.schedule.boundaries=(2,)", "--config.eval_every=0",
          "--config.log_every=2"]


@pytest.fixture(scope="session")
def every_method_run(tmp_path_factory, cli_env, smoke_teacher):
  """`(workdir, stdout)` of `python -m fsp_jax.main --config quickstart:smoke
  --config.methods=EVERY` (the session's smoke teacher, `smoke()`'s main task), run
  once for the tests here that read it."""
  from conftest import quick_compile, shared_dir, with_devices

  def build(workdir):
    proc = subprocess.run(
        [sys.executable, "-m", "fsp_jax.main", "--config", "quickstart:smoke",
         f"--config.methods={EVERY!r}", "--workdir", str(workdir),
         f"--config.teacher.checkpoint={smoke_teacher}", *smoke_flags()],
        cwd=REPO, env=quick_compile(with_devices(cli_env, 4)), capture_output=True,
        text=True, timeout=900)
    if proc.returncode != 0:
      raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
    (workdir / "stdout.txt").write_text(proc.stdout)
  workdir = shared_dir(tmp_path_factory, "every_method", build)
  return workdir, (workdir / "stdout.txt").read_text()


@pytest.mark.parametrize("name", EVERY)
def test_every_method_through_the_command_line(name, every_method_run):
  """Each method of `EVERY` trained and reported by the command line on the smoke
  config: its stages' results, the main task's accuracy in its table row."""
  workdir, stdout = every_method_run
  method = methods.get(name)
  results = json.load(open(workdir / "results.json"))
  for stage in method.stage_names():
    assert stage in results, (stage, sorted(results))
  main = results[method.student_stage]
  assert main["steps"] == 4 and 0.0 < main["test_accuracy"] <= 1.0, main
  if method.stage_one is not None:
    loss = results[method.stage_one_name][f"test_{method.stage_one.name}_loss"]
    assert math.isfinite(loss) and loss >= 0, results
  row = [line for line in stdout.splitlines() if line.startswith(method.label + "  ")]
  assert len(row) == 1 and f"{100 * main['test_accuracy']:.2f}" in row[0], stdout
  if method.term is not None:
    _check_term_stage(workdir / method.student_stage, method.term.name, main)


@pytest.fixture
def teacher(smoke_teacher):
  """The smoke teacher (trained once for the session)."""
  return smoke_teacher


def test_every_method_in_one_run(every_method_run, teacher):
  """Every method and two sums in one run (one teacher): the terms' own parameters
  trained and saved, AB's, FT's and CRD's stages and state."""
  tmp_path, _ = every_method_run
  config = smoke(**{"methods": EVERY, "teacher.checkpoint": teacher})
  results = json.load(open(tmp_path / "results.json"))
  assert set(results) == {s for m in EVERY for s in methods.get(m).stage_names()}
  exp = stages.setup(config, str(tmp_path))  # The same experiment (its fingerprints).
  by_name = {s.name: s for s in exp.stages}
  for name in TERMS + ("at+kd",):
    stage = by_name[name]
    assert stage.distill == name
    # A method's own parameters (CC's embeddings, VID's regressors) trained with the
    # student, saved apart from it.
    initial = stages.initial_distiller_params(exp, stage, exp.objective(stage))
    assert bool(jax.tree.leaves(initial)) == (name in ("cc", "vid", "crd")), name
    if jax.tree.leaves(initial):
      with checkpoints.manager(str(tmp_path / name)) as mngr:
        saved = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            distiller=ocp.args.StandardRestore(initial))).distiller
      moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           initial, saved)
      assert all(jax.tree.leaves(moved)), (name, moved)
  # AB: a stage 1 (no labels) whose weights start its main-task stage.
  assert by_name["ab"].init_from == "ab_init"
  assert math.isfinite(results["ab_init"]["test_ab_loss"])
  records = [r for r in metrics.read_jsonl(str(tmp_path / "ab_init" / metrics.JSONL))
             if "loss" in r]
  assert records[0]["loss"] > 0 and "task_loss" not in records[0]
  assert 0.0 < results["ab"]["test_accuracy"] <= 1.0
  _check_crd_bank(exp, by_name["crd"], tmp_path / "crd")
  _check_ft_stages(exp, by_name, tmp_path, results)


def _restore_items(stage_dir, **abstract):
  with checkpoints.manager(str(stage_dir)) as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        **{k: ocp.args.StandardRestore(v) for k, v in abstract.items()}))
  return {k: jax.device_get(restored[k]) for k in abstract}


def _check_crd_bank(exp, stage, stage_dir):
  """CRD's bank is checkpointed: the rows of the examples trained on moved (unit
  norm), the others did not; Z was set at the first step."""
  initial = jax.device_get(stages.initial_objective_state(exp, stage,
                                                          exp.objective(stage)))
  saved = _restore_items(stage_dir, objective_state=initial)["objective_state"]
  schedule = stage.schedule
  trained = np.unique(np.concatenate([
      np.asarray(stages.data.train_batch_indices(len(exp.dataset.train_labels),
                                                 schedule.batch_size, 0, step))
      for step in range(schedule.num_steps)]))
  for side in ("memory_s", "memory_t"):
    moved = np.any(saved[side] != initial[side], axis=1)
    np.testing.assert_array_equal(np.flatnonzero(moved), trained)
    np.testing.assert_allclose(np.linalg.norm(saved[side][trained], axis=1), 1.0,
                               rtol=1e-5)
  assert np.all(saved["z"] > 0) and np.all(initial["z"] < 0)


def _check_ft_stages(exp, by_name, tmp_path, results):
  """FT's stage 1 trains the paraphraser alone (the student's weights stay random);
  the main task starts the student from random weights, the paraphraser from stage 1
  (frozen), and trains the translator."""
  assert by_name["ft"].init_from is None and by_name["ft"].params_from == "ft_paraphraser"
  assert math.isfinite(results["ft_paraphraser"]["test_paraphrase_loss"])
  one = by_name["ft_paraphraser"]
  random = jax.device_get(stages.random_variables(exp, "student"))
  first = stages.initial_distiller_params(exp, one, exp.objective(one))
  saved = _restore_items(tmp_path / "ft_paraphraser", model=random, distiller=first)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, saved["model"], random)))
  assert not any(jax.tree.leaves(jax.tree.map(np.array_equal, saved["distiller"],
                                              jax.device_get(first))))
  main = by_name["ft"]
  start = jax.device_get(stages.initial_distiller_params(exp, main, exp.objective(main)))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, start["paraphraser"],
                                          saved["distiller"]["paraphraser"])))
  final = _restore_items(tmp_path / "ft", distiller=start)["distiller"]
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, final["paraphraser"],
                                          start["paraphraser"])))
  assert not any(jax.tree.leaves(jax.tree.map(np.array_equal, final["translator"],
                                              start["translator"])))


def test_a_sum_trains_seeds_side_by_side_from_the_device(tmp_path, teacher):
  config = smoke(**{"methods": ("at+kd",), "num_seeds": 2, "steps_per_call": 2,
                    "data.pipeline": "device", "teacher.checkpoint": teacher})
  results = train.run(config, str(tmp_path))
  assert [p["seed"] for p in results["at+kd"]["per_seed"]] == [0, 1]
  _check_term_stage(tmp_path / "at+kd", "at+kd", results["at+kd"])


def _check_term_stage(stage_dir, name, result):
  """A main-task stage with a method's term: trained, the term logged beside the
  cross-entropy (not 0: teacher and student differ; finite), fingerprinted."""
  assert 0.0 < result["test_accuracy"] <= 1.0 and result["steps"] == 4
  records = [r for r in metrics.read_jsonl(str(stage_dir / metrics.JSONL))
             if "loss" in r]
  key = f"{name}_loss"
  assert records and all(key in r and "task_loss" in r for r in records), name
  assert all(math.isfinite(r[key]) and r[key] > 0 for r in records), name
  for r in records:
    assert r["loss"] == pytest.approx(r["task_loss"] + r[key], rel=1e-5), name
  info = json.load(open(stage_dir / "stage.json"))["fingerprint"]
  assert info["distill"]["method"] == name and "teacher" in info, name


def test_a_sum_is_its_parts(tmp_path, teacher):
  config = smoke(**{"methods": ("at+kd",), "teacher.checkpoint": teacher})
  exp = stages.setup(config, str(tmp_path))
  stage = exp.stages[0]
  total = exp.objective(stage)
  at, kd = total.objectives
  assert (type(at), type(kd)) == (methods.AT, methods.KD)
  assert at.weight == 1000.0 and at.layers == ("section1", "section2", "section3")
  rng = np.random.default_rng(0)
  feats = {n: jnp.asarray(rng.normal(size=(4, 8 >> k, 8 >> k, 16 << k)), jnp.float32)
           for k, n in enumerate(("section1", "section2", "section3"))}
  t_feats = {n: f + 0.5 for n, f in feats.items()}
  logits = jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)
  targets = total.teacher_targets(logits * 2, t_feats)
  got = total.objective({"at": {}, "kd": {}}, targets, logits, feats, 3)
  want = (at.objective({}, targets[0], logits, feats, 3)
          + kd.objective({}, targets[1], logits, feats, 3))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  want_at = 1000.0 * sum(losses.at_loss(feats[n], t_feats[n]) for n in feats)
  np.testing.assert_allclose(at.objective({}, targets[0], logits, feats, 3),
                             np.full(4, want_at), rtol=1e-5)


def test_layers_by_name_or_index_and_bad_ones_before_training(tmp_path, teacher):
  names = ("stem", "section1", "section2", "section3")
  config = smoke()
  defaults = {m: methods.build_objective(methods.get(m).term, config, names).layers
              for m in ("at", "sp", "pkt", "rkd", "nst")}
  assert defaults == {"at": names[1:], "sp": names[-1:], "pkt": names[-1:],
                      "rkd": names[-1:], "nst": names[1:]}
  config.sp.layers = (1, "section2")
  assert methods.build_objective(methods.SP, config, names).layers == (
      "section1", "section2")
  bad = smoke(methods=("nst",), **{"teacher.checkpoint": teacher,
                                   "nst.layers": ("section9",)})
  with pytest.raises(validation.ConfigError, match="'section9'"):
    stages.setup(bad, str(tmp_path / "bad"))
  assert not (tmp_path / "bad" / "nst").exists()
  with pytest.raises(validation.ConfigError, match=r"config.at.weight must be"):
    validation.check_config(smoke(methods=("at",), **{"at.weight": 0.0}))
  with pytest.raises(validation.ConfigError, match="only methods that add a term"):
    methods.get("fsp+kd")


def test_dkd_warms_its_term_up_over_the_first_twentieth_and_a_bit():
  dkd = methods.DKD(num_steps=240)  # 20 of 240 steps, as mdistiller's epochs.
  np.testing.assert_allclose([float(dkd.warmup_at(s)) for s in (0, 9, 19, 100)],
                             [1 / 20, 10 / 20, 1.0, 1.0], rtol=1e-6)
  rng = np.random.default_rng(1)
  s, t = (jnp.asarray(rng.normal(size=(6, 10)), jnp.float32) for _ in range(2))
  labels = jnp.asarray(rng.integers(0, 10, 6))
  got = dkd.objective({}, t, s, {}, 239, labels=labels)
  np.testing.assert_allclose(got, np.full(6, losses.dkd_loss(s, t, labels)), rtol=1e-6)
  assert jax.tree.leaves(jax.grad(lambda x: dkd.objective(
      {}, t, x, {}, 5, labels=labels).mean())(s))[0].shape == (6, 10)


def test_ab_is_a_stage_one_method_like_fsp():
  config = smoke(methods=("ab",))
  assert [s.name for s in stages.plan_stages(config)] == [
      "teacher", "ab_init", "ab"]
  # Per example, Eq. of the AB paper (RepDistiller's sum / batch size) in NumPy.
  ab = methods.AB(("section1",))
  rng = np.random.default_rng(2)
  r = rng.normal(size=(3, 4, 4, 5)).astype(np.float32)
  t = rng.normal(size=(3, 4, 4, 5)).astype(np.float32)
  params = {"section1": {"kernel": np.eye(5, dtype=np.float32),
                         "scale": np.ones(5, np.float32), "bias": np.zeros(5, np.float32)}}
  connected = np.asarray(ab.connect(params["section1"], jnp.asarray(r)), np.float64)
  want = ((connected + 1) ** 2 * ((connected > -1) & (t <= 0))
          + (connected - 1) ** 2 * ((connected <= 1) & (t > 0))).sum((1, 2, 3)) * 3e-3
  got = ab.objective(params, (jnp.asarray(t),), None, {"section1": jnp.asarray(r)}, 0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_crd_resumes_exactly_after_a_kill_with_its_bank_per_seed(tmp_path, teacher):
  """Two seeds side by side; the run loses its last checkpoint (a kill after step 2's
  save) and resumes: weights, bank and results are the uninterrupted run's."""
  config = smoke(**{"methods": ("crd",), "num_seeds": 2, "checkpoint_every": 2,
                    "teacher.checkpoint": teacher})
  results = train.run(config, str(tmp_path))
  exp = stages.setup(config, str(tmp_path))
  (stage,) = exp.stages
  abstract = dict(
      model=jax.device_get(stages.initial_variables(exp, stage)),
      objective_state=jax.device_get(stages.initial_objective_state(
          exp, stage, exp.objective(stage))))
  assert abstract["objective_state"]["memory_s"].shape[0] == 2  # The seed axis.
  before = _restore_items(tmp_path / "crd", **abstract)
  ckpts = tmp_path / "crd" / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2", "4"]
  import shutil
  shutil.rmtree(ckpts / "4")
  (tmp_path / metrics.RESULTS).unlink()
  again = train.run(config, str(tmp_path))
  after = _restore_items(tmp_path / "crd", **abstract)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  assert again["crd"]["per_seed"] == results["crd"]["per_seed"]
  # The seeds' banks differ (their own initialisations, data and negatives).
  assert not np.array_equal(*before["objective_state"]["memory_s"])


def _np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_crd_against_a_numpy_transcription_of_repdistiller(monkeypatch):
  from fsp_jax.methods import crd as crd_lib
  rng = np.random.default_rng(3)
  n, d, k, b, c_s, c_t = 12, 4, 5, 3, 6, 7
  labels = np.array([0, 1, 2] * 4, np.int32)
  obj = methods.CRD(("section3",), weight=0.8, embed_dim=d, num_negatives=k)
  state = jax.device_get(obj.init_state(jax.random.PRNGKey(0), jnp.asarray(labels)))
  np.testing.assert_array_equal(labels[state["order"]], np.sort(labels))
  params = {"embed_s": {"kernel": rng.normal(size=(c_s, d)), "bias": rng.normal(size=d)},
            "embed_t": {"kernel": rng.normal(size=(c_t, d)), "bias": rng.normal(size=d)}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  s_map = rng.normal(size=(b, 2, 2, c_s)).astype(np.float32)
  t_emb = rng.normal(size=(b, c_t)).astype(np.float32)
  index = np.array([4, 0, 11], np.int32)
  step = 7
  loss, new = obj.objective(params, jnp.asarray(t_emb), jnp.zeros((b, 10)),
                            {"section3": jnp.asarray(s_map)}, step,
                            labels=jnp.asarray(labels[index]), index=jnp.asarray(index),
                            state=state)
  rows = np.asarray(crd_lib.negatives(jax.random.fold_in(state["key"], step),
                                      jnp.asarray(labels[index]), state, k))
  assert np.all(labels[rows] != labels[index][:, None])
  # NumPy, float64: ContrastMemory then ContrastLoss, both sides.
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  f_s = _np_normalize(s_map.mean((1, 2)) @ p["embed_s"]["kernel"] + p["embed_s"]["bias"])
  f_t = _np_normalize(t_emb @ p["embed_t"]["kernel"] + p["embed_t"]["bias"])
  idx = np.concatenate([index[:, None], rows], 1)
  m_s, m_t = (np.asarray(state[m], np.float64) for m in ("memory_s", "memory_t"))
  out_s = np.exp(np.einsum("bjd,bd->bj", m_t[idx], f_s) / 0.07)
  out_t = np.exp(np.einsum("bjd,bd->bj", m_s[idx], f_t) / 0.07)
  z = np.array([out_s.mean() * n, out_t.mean() * n])

  def nce(x):
    pn = k / n
    pos = np.log(x[:, 0] / (x[:, 0] + pn + 1e-7))
    neg = np.log(pn / (x[:, 1:] + pn + 1e-7))
    return -(pos.sum() + neg.sum()) / x.shape[0]
  want = 0.8 * (nce(out_s / z[0]) + nce(out_t / z[1]))
  np.testing.assert_allclose(np.asarray(loss), np.full(b, want), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(new["z"]), z, rtol=1e-4)
  want_s = m_s.copy()
  want_s[index] = _np_normalize(0.5 * m_s[index] + 0.5 * f_s)
  np.testing.assert_allclose(np.asarray(new["memory_s"]), want_s, rtol=1e-5, atol=1e-6)
  # Z stays once set; the bank's two ways of scoring agree.
  _, later = obj.objective(params, jnp.asarray(t_emb), jnp.zeros((b, 10)),
                           {"section3": jnp.asarray(s_map)}, step + 1,
                           labels=jnp.asarray(labels[index]), index=jnp.asarray(index),
                           state=new)
  np.testing.assert_array_equal(np.asarray(later["z"]), np.asarray(new["z"]))
  big = jnp.asarray(rng.normal(size=(100, d)), jnp.float32)
  got = crd_lib.bank_scores(big, jnp.asarray(f_s, jnp.float32), jnp.asarray(idx))
  np.testing.assert_allclose(np.asarray(got), np.einsum(
      "bjd,bd->bj", np.asarray(big, np.float64)[idx], f_s), rtol=1e-5, atol=1e-6)
  # The whole bank scored, each row weighted by its draws (this bank of 12 rows), is
  # the sum over the gathered rows (larger banks): the same loss, Z and gradients.
  def run(whole):
    monkeypatch.setattr(crd_lib, "scores_whole_bank", lambda n, k: whole)
    def f(params, s_map):
      loss, new = obj.objective(params, jnp.asarray(t_emb), jnp.zeros((b, 10)),
                                {"section3": s_map}, step, labels=jnp.asarray(
                                    labels[index]), index=jnp.asarray(index),
                                state=state)
      return jnp.sum(loss), new["z"]
    (loss, z), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(
        params, jnp.asarray(s_map))
    return loss, z, grads
  whole, gathered = run(True), run(False)
  assert float(whole[0]) == pytest.approx(b * want, rel=1e-4)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               whole, gathered)
  # Negatives are uniform over the other classes' examples.
  many = np.asarray(crd_lib.negatives(jax.random.PRNGKey(1), jnp.zeros(400, jnp.int32),
                                      state, 50))
  counts = np.bincount(many.ravel(), minlength=n)
  others = labels != 0
  assert counts[~others].sum() == 0
  assert counts[others].min() > 0.8 * counts[others].mean()
  with pytest.raises(validation.ConfigError, match="other classes"):
    obj.check_training_set(np.zeros(10, np.int32), 1)


def test_crd_plus_kd_sums_a_stateful_term():
  config = smoke(methods=("crd+kd",))
  total = methods.build_objective(methods.get("crd+kd").term, config,
                                  ("stem", "section1", "section2", "section3"))
  assert total.stateful and total.reads_index and total.reads_labels
  crd, kd = total.objectives
  assert (crd.weight, crd.num_negatives, crd.temperature, crd.momentum) == (
      0.8, 16384, 0.07, 0.5)
  rng = np.random.default_rng(4)
  labels = jnp.asarray(np.arange(20) % 4, jnp.int32)
  state = total.init_state(jax.random.PRNGKey(0), labels)
  feats = {"section3": jnp.asarray(rng.normal(size=(4, 2, 2, 8)), jnp.float32)}
  params = total.init(jax.random.PRNGKey(1), {"section3": feats["section3"][..., :6]},
                      feats)
  logits = jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)
  targets = total.teacher_targets(logits + 1, {"section3": feats["section3"][..., :6]})
  index = jnp.asarray([1, 5, 2, 7])
  got, new = methods.call(total, params, targets, logits, feats, 0,
                          labels=labels[index], index=index, state=state)
  want_crd, want_state = methods.call(crd, params["crd"], targets[0], logits, feats, 0,
                                      labels=labels[index], index=index,
                                      state=state["crd"])
  want = want_crd + kd.objective({}, targets[1], logits, feats, 0)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(new["crd"]["memory_t"], want_state["memory_t"])


def test_ft_factor_and_reconstruction_against_numpy():
  from fsp_jax.methods import ft as ft_lib
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  conv = {"kernel": rng.normal(size=(3, 3, 3, 2)).astype(np.float32),
          "bias": rng.normal(size=2).astype(np.float32)}
  padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((2, 4, 4, 2)) + conv["bias"]
  for i in range(3):
    for j in range(3):
      want += padded[:, i:i + 4, j:j + 4] @ conv["kernel"][i, j]
  np.testing.assert_allclose(np.asarray(ft_lib.conv3x3(conv, jnp.asarray(x))), want,
                             rtol=1e-4, atol=1e-4)
  a = np.mean(x.astype(np.float64) ** 2, -1).reshape(2, -1)
  np.testing.assert_allclose(np.asarray(ft_lib.factor_attention(jnp.asarray(x))),
                             a / np.linalg.norm(a, axis=1, keepdims=True), rtol=1e-5)
  # The term: RepDistiller's FactorTransfer (p1 2, p2 1) of the two factors, x 200,
  # the larger factor average-pooled to the smaller.
  term = methods.FT(("section3",), weight=200.0, rate=0.5)
  t_map = jnp.asarray(np.abs(rng.normal(size=(2, 2, 2, 8))), jnp.float32)
  s_map = jnp.asarray(np.abs(rng.normal(size=(2, 4, 4, 5))), jnp.float32)
  params = term.init(jax.random.PRNGKey(0), {"section3": t_map}, {"section3": s_map})
  assert params["paraphraser"]["encoder"][-1]["kernel"].shape[-1] == 4  # 8 x 0.5.
  f_s = np.asarray(ft_lib.translate(params["translator"], s_map), np.float64)
  f_t = np.asarray(ft_lib.encode(params["paraphraser"], t_map), np.float64)
  f_s = f_s.reshape(2, 2, 2, 2, 2, 4).mean((2, 4))
  def att(f):
    v = (f ** 2).mean(-1).reshape(2, -1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)
  want = 200.0 * np.abs(att(f_s) - att(f_t)).mean()
  got = term.objective(params, t_map, jnp.zeros((2, 10)), {"section3": s_map}, 0)
  np.testing.assert_allclose(np.asarray(got), np.full(2, want), rtol=1e-4)
  assert term.trainable(params)["paraphraser"]["encoder"][0]["kernel"] is False
  # Stage 1: the mean squared reconstruction error of the teacher's map.
  one = methods.Paraphrase(("section3",))
  p1 = one.init(jax.random.PRNGKey(1), {"section3": t_map}, {})
  rec = ft_lib.decode(p1["paraphraser"], ft_lib.encode(p1["paraphraser"], t_map))
  np.testing.assert_allclose(
      np.asarray(one.objective(p1, t_map, None, None, 0)),
      ((np.asarray(rec, np.float64) - np.asarray(t_map)) ** 2).mean((1, 2, 3)),
      rtol=1e-5)
  assert not one.trains_student and one.freezes
  assert [s.name for s in stages.plan_stages(smoke(methods=("ft",)))] == [
      "teacher", "ft_paraphraser", "ft"]


def test_vid_against_a_numpy_transcription_of_repdistiller():
  """RepDistiller's VIDLoss: a regressor of three bias-free 1x1 convolutions (ReLUs
  between) predicts the teacher's map, the Gaussian NLL with softplus(alpha) + 1e-5
  variances averaged over every element, summed over layers; the larger map
  average-pooled to the smaller; initial variance 5."""
  rng = np.random.default_rng(7)
  s_maps = {"a": np.abs(rng.normal(size=(3, 4, 4, 5))), "b": rng.normal(size=(3, 2, 2, 6))}
  t_maps = {"a": np.abs(rng.normal(size=(3, 2, 2, 4))), "b": rng.normal(size=(3, 2, 2, 3))}
  f32 = lambda d: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
  term = methods.VID(("a", "b"), weight=2.0, init_variance=5.0)
  params = term.init(jax.random.PRNGKey(0), f32(t_maps), f32(s_maps))
  softplus = lambda a: np.log1p(np.exp(a))
  np.testing.assert_allclose(softplus(np.asarray(params["a"]["alpha"], np.float64)) + 1e-5,
                             5.0, rtol=1e-6)
  # Variances away from their start, so that each channel's own variance is checked.
  for k in params:
    params[k]["alpha"] = jnp.asarray(rng.normal(size=params[k]["alpha"].shape), jnp.float32)
  want = 0.0
  for k in ("a", "b"):
    p = {n: np.asarray(v, np.float64) for n, v in params[k].items()}
    s, t = s_maps[k], t_maps[k]
    if s.shape[1] > t.shape[1]:
      f = s.shape[1] // t.shape[1]
      s = s.reshape(3, t.shape[1], f, t.shape[2], f, s.shape[-1]).mean((2, 4))
    mu = np.maximum(np.maximum(s @ p["w1"], 0) @ p["w2"], 0) @ p["w3"]
    var = softplus(p["alpha"]) + 1e-5
    want += np.mean(0.5 * ((mu - t) ** 2 / var + np.log(var)))
  targets = term.teacher_targets(None, f32(t_maps))
  got = term.objective(params, targets, jnp.zeros((3, 10)), f32(s_maps), 0)
  np.testing.assert_allclose(np.asarray(got), np.full(3, 2.0 * want), rtol=1e-5)
  grads = jax.grad(lambda p: term.objective(p, targets, jnp.zeros((3, 10)), f32(s_maps),
                                            0).sum())(params)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
