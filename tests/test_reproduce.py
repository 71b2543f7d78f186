"""The reproduction grid's configs and ablations (experiments/reproduce.py), without
training."""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # experiments/ is a folder of the checkout, not of the package.

from experiments import reproduce  # noqa: E402
from fsp_jax import models, stages  # noqa: E402


def _args(tmp_path, **kw):
  base = dict(scale=0.01, data_root="", log_every=50, workdir=str(tmp_path),
              curve_points=8, eval_examples=2000, seeds=[0, 1, 2], t1="table1",
              t3="table3")
  return argparse.Namespace(**{**base, **kw})


def test_grid_keeps_the_papers_schedule_shape(tmp_path):
  args = _args(tmp_path)
  t3 = reproduce.grid_config(args, "table3", 0)
  assert t3.schedule_scale == 0.01
  assert (t3.fsp.schedule.num_steps, t3.fsp.schedule.boundaries) == (21000, (11000, 16000))
  assert t3.fsp.schedule.learning_rates == (1e-3, 1e-4, 1e-5)  # The paper's.
  assert t3.fsp.checkpoint == "" and t3.baselines == ("scratch",)
  # Other seeds start from the first seed's stage 1 (Algorithm 1: one stage 1, shared).
  assert reproduce.grid_config(args, "table3", 1).fsp.checkpoint == str(
      tmp_path / "table3_seed0" / "fsp")
  t1 = reproduce.grid_config(args, "table1_mean", 0)
  np.testing.assert_allclose(t1.fsp.weights, (1 / 256, 1 / 512, 1 / 2048))
  assert t1.fsp.schedule.learning_rates == reproduce.ELEMENT_MEAN_LRS
  long = reproduce.grid_config(args, "table1_meanlong", 0)
  assert (long.fsp.schedule.num_steps, long.fsp.schedule.boundaries) == (
      105000, (55000, 80000))
  assert long.baselines == ()
  # Curve points round up: 53, 106, 159 and the final 210 (not 208 and then 210).
  assert long.student.schedule.eval_every == 53
  assert t3.student.schedule.eval_every == 80
  # teacher_short does not depend on stage 1: table1_short runs it alone.
  short = reproduce.grid_config(args, "table1_short", 0)
  assert [s.name for s in stages.plan_stages(short)] == ["teacher_short"]


def test_table3_element_mean_long_is_the_x5_ablation_with_its_scratch_runs(tmp_path):
  """--table3_stage1 element_mean_long: the stage 1 of ablation mean_lr_0.05_x5 (the
  one that beat scratch), run as the grid's Table 3 with its scratch baseline."""
  args = _args(tmp_path, t3="table3_meanlong")
  t3 = reproduce.grid_config(args, "table3_meanlong", 0)
  ablation = reproduce.ablation_config(_args(tmp_path), "mean_lr_0.05_x5")  # On paper.
  assert t3.fsp.to_dict() == ablation.fsp.to_dict()
  assert t3.student.to_dict() == ablation.student.to_dict()
  assert (t3.fsp.schedule.num_steps, t3.fsp.schedule.boundaries) == (
      105000, (55000, 80000))
  assert t3.baselines == ("scratch",)
  assert reproduce.grid_config(args, "table3_meanlong", 2).fsp.checkpoint == str(
      tmp_path / "table3_meanlong_seed0" / "fsp")


def test_ablations_change_the_grids_own_table3_stage1(tmp_path):
  """On the element-mean grid an ablation keeps its loss scale and 5x length and changes
  one thing (here the LRs); renorm_kernels rescales that grid's stage-1 result."""
  args = _args(tmp_path, t3="table3_meanlong")
  base = reproduce.grid_config(args, "table3_meanlong", 0)
  lr = reproduce.ablation_config(args, "lr_0.02")
  assert lr.fsp.schedule.learning_rates == (0.02, 0.002, 0.0002)
  assert lr.fsp.weights == base.fsp.weights
  assert (lr.fsp.schedule.num_steps, lr.fsp.schedule.boundaries) == (
      base.fsp.schedule.num_steps, base.fsp.schedule.boundaries)
  assert lr.baselines == ()  # The grid's scratch runs are the reference.
  renorm = reproduce.ablation_config(args, "renorm_kernels")
  assert renorm.fsp.checkpoint == str(tmp_path / "ablation_renorm_kernels" /
                                      reproduce.RENORMALIZED)


def test_each_ablation_changes_stage_one_only(tmp_path):
  args = _args(tmp_path)
  base = reproduce.grid_config(args, "table3", 0)
  for name in reproduce.ABLATIONS:
    config = reproduce.ablation_config(args, name)
    assert config.student.to_dict() == base.student.to_dict()
    assert config.teacher.checkpoint == base.teacher.checkpoint
    assert config.baselines == ()
  x5 = reproduce.ablation_config(args, "stage1_x5").fsp.schedule
  assert (x5.num_steps, x5.boundaries) == (105000, (55000, 80000))
  assert reproduce.ablation_config(args, "avg_pool").fsp.pool == "avg"
  renorm = reproduce.ablation_config(args, "renorm_kernels")
  assert renorm.fsp.checkpoint.endswith("ablation_renorm_kernels/fsp_renormalized")
  seed2 = reproduce.ablation_config(args, "mean_lr_0.05_x5", 2)
  assert seed2.seed == 2
  assert seed2.fsp.checkpoint == str(tmp_path / "ablation_mean_lr_0.05_x5" / "fsp")
  assert reproduce.ablation_dir(args, "avg_pool", 2).endswith("ablation_avg_pool_seed2")


@pytest.mark.parametrize("flag", ["--ablations", "--ablation_seeds"])
def test_unknown_ablation_is_a_clear_error(capsys, flag):
  with pytest.raises(SystemExit):
    reproduce.main([flag, "renorm_kernels,nope", "--report_only"])
  assert "unknown ablations ['nope']" in capsys.readouterr().err


def test_scaling_conv_kernels_keeps_the_function():
  """What the renorm_kernels ablation relies on: every conv kernel feeds batch norm,
  so rescaling kernels leaves the network's training-mode outputs unchanged."""
  model = models.create_model("cifar_resnet8", 10)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3))
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))

  def scale(path, v):
    return v * 5.0 if v.ndim == 4 else v
  scaled = {"params": jax.tree_util.tree_map_with_path(scale, variables["params"]),
            "batch_stats": variables["batch_stats"]}
  (a, fa), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  (b, fb), _ = model.apply(scaled, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
  assert list(fa) == list(fb) == list(model.feature_names)
  for name in fa:
    np.testing.assert_allclose(jnp.asarray(fb[name]), jnp.asarray(fa[name]), rtol=1e-3,
                               atol=1e-4)


def test_grid_plan_runs_each_run_after_the_runs_it_reads(tmp_path):
  args = _args(tmp_path, t1="table1_meanlong", t3="table3_meanlong")
  plan = reproduce.grid_plan(args)
  names = [r.name for r in plan]
  assert names == ["teacher"] + [f"table3_meanlong_seed{s}" for s in (0, 1, 2)] + [
      f"table1_meanlong_seed{s}" for s in (0, 1, 2)] + [
      f"table1_short_seed{s}" for s in (0, 1, 2)]
  after = {r.name: r.after for r in plan}
  assert after["table3_meanlong_seed0"] == after["table1_meanlong_seed0"] == ("teacher",)
  assert after["table1_meanlong_seed2"] == ("table1_meanlong_seed0",)
  assert after["teacher"] == after["table1_short_seed1"] == ()
  for k, run in enumerate(plan):  # One process can run them in this order.
    assert set(run.after) <= set(names[:k])
    # What a run reads is what `after` names: the teacher checkpoint, or the stage 1 of
    # the first seed of its table.
    if "fsp" in run.config.methods and run.config.fsp.checkpoint:
      assert os.path.dirname(run.config.fsp.checkpoint) == str(tmp_path / run.after[0])


def test_core_groups_split_the_allowed_cores(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7}, raising=False)
  assert reproduce.core_groups(2) == [[4, 5], [6, 7]]
  assert reproduce.core_groups(3) == [[4], [5], [6]]
  with pytest.raises(ValueError, match="--jobs 5 exceeds the 4 CPU cores"):
    reproduce.core_groups(5)


def _fake_grid(monkeypatch, tmp_path, runs, exit_codes):
  """run_grid_parallel over fake runs: each worker logs its start and end times to
  events.txt, sleeps, and exits with `exit_codes.get(name, 0)`."""
  monkeypatch.setattr(reproduce, "grid_plan", lambda args: [
      reproduce.GridRun(name, None, after) for name, after in runs])
  monkeypatch.setattr(reproduce, "core_groups", lambda jobs: [None] * jobs)
  ablations = []
  monkeypatch.setattr(reproduce, "run_ablations", ablations.append)
  events = tmp_path / "events.txt"
  script = ("import sys, time; n, rc = sys.argv[1], int(sys.argv[2]); "
            f"f = open({str(events)!r}, 'a'); f.write(f'start {{n}} {{time.time()}}\\n'); "
            "f.flush(); time.sleep(0.3); f.write(f'end {n} {time.time()}\\n'); "
            "sys.exit(rc)")

  def command(argv, run):
    return [sys.executable, "-c", script, run.name, str(exit_codes.get(run.name, 0))]
  args = _args(tmp_path, jobs=2)
  return args, command, events, ablations


def _read_events(events):
  out = {}
  for line in events.read_text().splitlines():
    kind, name, t = line.split()
    out[(kind, name)] = float(t)
  return out


def test_parallel_grid_starts_runs_after_what_they_read_two_at_a_time(
    monkeypatch, tmp_path):
  runs = [("teacher", ()), ("t3_seed0", ("teacher",)), ("t3_seed1", ("t3_seed0",)),
          ("t1_seed0", ("teacher",)), ("short0", ()), ("short1", ())]
  args, command, events, ablations = _fake_grid(monkeypatch, tmp_path, runs, {})
  reproduce.run_grid_parallel(args, ["--jobs", "2"], command=command, poll_s=0.02)
  ev = _read_events(events)
  assert {n for _, n in ev} == {n for n, _ in runs}
  for name, after in runs:
    for dep in after:
      assert ev[("start", name)] >= ev[("end", dep)]
  # Never more than two at a time, and two at once while possible (teacher + short0).
  times = sorted((t, +1 if kind == "start" else -1) for (kind, _), t in ev.items())
  level = np.cumsum([d for _, d in times])
  assert level.max() == 2
  assert ev[("start", "short0")] < ev[("end", "teacher")]
  assert ablations == [args]
  assert (tmp_path / "logs" / "t1_seed0.log").exists()


def test_parallel_grid_skips_what_reads_a_diverged_run_and_stops_on_errors(
    monkeypatch, tmp_path):
  runs = [("teacher", ()), ("t1_seed0", ("teacher",)), ("t1_seed1", ("t1_seed0",)),
          ("short0", ())]
  args, command, events, _ = _fake_grid(
      monkeypatch, tmp_path, runs, {"t1_seed0": reproduce.EXIT_DIVERGED})
  reproduce.run_grid_parallel(args, [], command=command, poll_s=0.02)
  assert {n for _, n in _read_events(events)} == {"teacher", "t1_seed0", "short0"}

  events.unlink()
  args, command, events, ablations = _fake_grid(monkeypatch, tmp_path, runs,
                                                {"teacher": 1})
  with pytest.raises(RuntimeError, match="grid run teacher failed .exit status 1.; "
                                         "its log: .*teacher.log"):
    reproduce.run_grid_parallel(args, [], command=command, poll_s=0.02)
  started = {n for k, n in _read_events(events) if k == "start"}
  assert "t1_seed0" not in started and "t1_seed1" not in started
  assert ablations == []


def test_workers_run_this_script_and_it_runs_from_anywhere(tmp_path):
  """--jobs workers are `python experiments/reproduce.py ... --run NAME`; the script
  needs only the installed fsp_jax, whatever the working directory."""
  import subprocess
  run = reproduce.GridRun("table3_seed1", None, ("table3_seed0",))
  cmd = reproduce.worker_command(["--scale", "0.01"], run)
  assert cmd[:2] == [sys.executable, os.path.join(REPO, "experiments", "reproduce.py")]
  assert cmd[2:] == ["--scale", "0.01", "--jobs", "1", "--run", "table3_seed1"]
  out = subprocess.run(cmd[:2] + ["--workdir", str(tmp_path / "w"), "--data_root", "",
                                  "--run", "nope"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2, out.stderr
  assert "--run 'nope' is not a run of this grid; its runs: teacher, table3_seed0" in (
      out.stderr)


def _untrained_teacher_runs(tmp_path, seeds):
  """(config, run directory) of teacher-only smoke runs whose final checkpoints hold
  random weights (no training, no compiled initialisation), as a finished run leaves
  them."""
  from fsp_jax import checkpoints, config_lib

  def random_weights(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      return np.full(leaf.shape, 1.0 if "var" in name else 0.0, leaf.dtype)
    return (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
  rng = np.random.default_rng(0)
  runs = []
  for seed in seeds:
    config = config_lib.load("quickstart:smoke")
    config.teacher_only, config.seed = True, seed
    run_dir = str(tmp_path / f"seed{seed}")
    stage, = stages.plan_stages(config)
    stage_dir = os.path.join(run_dir, stage.name)
    checkpoints.write_stage_info(stage_dir, {"fingerprint": stages.fingerprint(
        config, stage, [stage])})
    exp = stages.setup(config, run_dir)
    checkpoints.save_model(stage_dir, jax.tree_util.tree_map_with_path(
        random_weights, stages.abstract_variables(exp, "teacher")))
    runs.append((config, run_dir))
  return runs, exp


def test_ensemble_of_averages_softmaxes_and_caches_test_logits(tmp_path):
  """The library keeps no test logits: reproduce computes each model's from its final
  checkpoint once, keeps them beside it, and reads them back."""
  from fsp_jax import checkpoints, train
  runs, exp = _untrained_teacher_runs(tmp_path, (0, 1))
  labels = exp.dataset.test_labels
  logits = []
  for config, run_dir in runs:
    run_exp = stages.setup(config, run_dir)
    variables, _ = checkpoints.restore_model(os.path.join(run_dir, "teacher"),
                                             stages.abstract_variables(run_exp, "teacher"))
    logits.append(train.predict(run_exp.networks["teacher"], variables,
                                run_exp.dataset.test_images, run_exp.mesh,
                                config.eval_batch_size))
  probs = sum(jax.nn.softmax(l.astype(np.float64), -1) for l in logits)
  want = float(np.mean(np.argmax(probs, -1) == labels))
  assert reproduce.ensemble_of(runs, "teacher", "teacher") == pytest.approx(want)
  cached = [os.path.join(d, "teacher", reproduce.TEST_LOGITS) for _, d in runs]
  for path, l in zip(cached, logits):
    np.testing.assert_allclose(np.load(path), l, rtol=1e-5, atol=1e-5)
  # Read back, not recomputed: logits that are the labels give an ensemble of 100 %.
  np.save(cached[0], 100.0 * np.eye(exp.dataset.num_classes, dtype=np.float32)[labels])
  assert reproduce.ensemble_of(runs[:1], "teacher", "teacher") == 1.0
  # A file cut short (a kill while writing it) or of another test set is recomputed.
  with open(cached[0], "r+b") as f:
    f.truncate(100)
  assert reproduce.ensemble_of(runs, "teacher", "teacher") == pytest.approx(want)
  np.save(cached[1], logits[1][:10])
  assert reproduce.ensemble_of(runs, "teacher", "teacher") == pytest.approx(want)
  np.testing.assert_allclose(np.load(cached[1]), logits[1], rtol=1e-5, atol=1e-5)
