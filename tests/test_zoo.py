"""The field's methods (AT, SP, PKT, RKD, NST, CC, VID, DKD terms, AB's stage 1) and
sums of terms ('at+kd'): all through one run of the smoke config with two seeds side
by side, their layers, weights, sums and formulas."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orbax.checkpoint as ocp

from fsp_jax import (checkpoints, config_lib, losses, methods, metrics, stages, train,
                     validation)

TERMS = ("at", "sp", "pkt", "rkd", "nst", "cc", "vid", "dkd")


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


@pytest.fixture
def teacher(smoke_teacher):
  """The smoke teacher (trained once for the session)."""
  return smoke_teacher


def test_every_method_in_one_run(tmp_path, teacher):
  """Every term method, a sum and AB's two stages in one run (the same teacher)."""
  config = smoke(**{"methods": TERMS + ("at+kd", "ab"),
                    "teacher.checkpoint": teacher})
  results = train.run(config, str(tmp_path))
  assert set(results) == set(TERMS) | {"at+kd", "ab_init", "ab"}
  exp = stages.setup(config, str(tmp_path))
  by_name = {s.name: s for s in exp.stages}
  for name in TERMS + ("at+kd",):
    stage = by_name[name]
    assert stage.distill == name
    _check_term_stage(tmp_path / name, name, results[name])
    # A method's own parameters (CC's embeddings, VID's regressors) trained with the
    # student, saved apart from it.
    initial = stages.initial_distiller_params(exp, stage, exp.objective(stage))
    assert bool(jax.tree.leaves(initial)) == (name in ("cc", "vid")), name
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
