"""The reproduction grid (experiments/reproduce.py, experiments/report.py): its plan,
its runner and its report, without training; a dry run of the whole grid is slow."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # experiments/ is a folder of the checkout, not of the package.

from conftest import write_run  # noqa: E402
from experiments import reproduce, report  # noqa: E402
from fsp_jax import stages  # noqa: E402


def _args(tmp_path, *extra):
  return reproduce.parse_args(["--workdir", str(tmp_path), "--data_root", "",
                               "--scale", "0.01", *extra])


def _plan(tmp_path, *extra):
  return {run.name: run for run in reproduce.grid_plan(_args(tmp_path, *extra))}


def _stages(run):
  return {s.name: s for s in stages.plan_stages(run.config)}


def test_grid_scales_the_papers_schedules_by_one_factor(tmp_path):
  plan = _plan(tmp_path)
  assert list(plan) == ["teacher", "table3_scratch", "table1", "table1_short", "table3"]
  teacher = _stages(plan["teacher"])["teacher"].schedule
  assert (teacher.num_steps, teacher.boundaries) == (640, (320, 480))
  t3, t1 = _stages(plan["table3"]), _stages(plan["table1"])
  # Stage 1: 21k iterations, drops at 11k and 16k, the 5 % warm-up, LR 1e-3, Eq. 2's sum.
  for st in (t3, t1):
    fsp = st["fsp"].schedule
    assert (fsp.num_steps, fsp.boundaries, fsp.warmup_steps) == (210, (110, 160), 10)
    assert fsp.learning_rates == (1e-3, 1e-4, 1e-5)
  assert plan["table3"].config.fsp.reduction == "sum"
  assert t3["student"].schedule.num_steps == 640  # Table 3: as long as the teacher.
  assert t1["student"].schedule.num_steps == 210  # Table 1: 1/3 of it.
  assert _stages(plan["table3_scratch"])["scratch"].schedule.num_steps == 640
  assert _stages(plan["table1_short"])["teacher_short"].schedule.num_steps == 210
  assert _stages(plan["table1_short"])["teacher_short"].role == "teacher"
  assert plan["table1"].config.teacher.model == "cifar_resnet26"
  assert plan["table1"].config.student.model == "cifar_resnet26"
  assert plan["table3"].config.student.model == "cifar_resnet8"
  assert _plan(tmp_path, "--exact")["table3"].config.fsp.schedule.warmup_steps == 0
  # A teacher trained longer than the tables' runs, which keep --scale.
  longer = _plan(tmp_path, "--teacher_scale", "0.02")
  assert _stages(longer["teacher"])["teacher"].schedule.num_steps == 1280
  assert _stages(longer["table3"])["student"].schedule.num_steps == 640


def test_seeds_share_one_program_table1_shares_stage1_and_baselines_need_no_teacher(
    tmp_path):
  plan = _plan(tmp_path)
  for run in plan.values():
    assert run.config.num_seeds == 3 and run.config.seed == 0
  t3, t1 = plan["table3"].config, plan["table1"].config
  fsp3, fsp1 = _stages(plan["table3"])["fsp"], _stages(plan["table1"])["fsp"]
  assert stages.seeds_of(t3, fsp3) == [0, 1, 2]  # Each seed its own stage 1.
  assert stages.seeds_of(t1, fsp1) == [0]  # One stage 1 for every seed.
  assert stages.seeds_of(t1, _stages(plan["table1"])["student"]) == [0, 1, 2]
  teacher_dir = os.path.join(str(tmp_path), "teacher", "teacher")
  for name in ("table3", "table1"):
    assert plan[name].config.teacher.checkpoint == teacher_dir
    assert plan[name].after == ("teacher",)
    assert "teacher" not in _stages(plan[name])
  for name in ("table3_scratch", "table1_short"):  # They run beside the teacher.
    assert plan[name].after == () and "teacher" not in _stages(plan[name])
  # The evaluations' last point is the final iteration.
  assert 640 % t3.student.schedule.eval_every == 0


def test_stage1_checks_run_the_exact_paper_stage1_only(tmp_path):
  plan = _plan(tmp_path, "--stage1_checks")
  for tb in ("table1", "table3"):
    run = plan[f"stage1_exact_{tb}"]
    assert run.stage1_only and run.after == ("teacher",)
    assert run.config.num_seeds == 1
    assert _stages(run)["fsp"].schedule.warmup_steps == 0
    assert run.config.student.model == plan[tb].config.student.model


def test_core_groups_split_the_allowed_cores(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7}, raising=False)
  assert reproduce.core_groups(2) == [[4, 5], [6, 7]]
  assert reproduce.core_groups(3) == [[4], [5], [6]]
  with pytest.raises(ValueError, match="--jobs 5 exceeds the 4 CPU cores"):
    reproduce.core_groups(5)


def test_a_run_nothing_can_run_beside_takes_every_core():
  teacher, scratch = reproduce.GridRun("teacher", None), reproduce.GridRun("s", None)
  reads = [reproduce.GridRun(n, None, ("teacher",)) for n in ("a", "b")]
  # Alone, and everything left reads it: every core.
  assert reproduce.cores_for(teacher, reads, {}, [0]) is None
  # A run that could go beside it (scratch), or one already running: its slot's.
  assert reproduce.cores_for(teacher, reads + [scratch], {}, [0]) == [0]
  assert reproduce.cores_for(reads[0], reads[1:], {1: "running"}, [0]) == [0]
  assert reproduce.cores_for(reads[0], reads[1:], {}, [1]) == [1]


def test_a_run_finished_before_is_not_started_again(tmp_path):
  args = _args(tmp_path)
  plan = {run.name: run for run in reproduce.grid_plan(args)}
  scratch = plan["table3_scratch"]
  assert not reproduce.finished(args, scratch)
  os.makedirs(tmp_path / "table3_scratch")
  (tmp_path / "table3_scratch" / "results.json").write_text(json.dumps({
      "scratch": {"test_accuracy": 0.5}}))
  assert reproduce.finished(args, scratch)
  (tmp_path / "table3" / "x").mkdir(parents=True)
  (tmp_path / "table3" / "results.json").write_text(json.dumps({"fsp": {}}))
  assert not reproduce.finished(args, plan["table3"])  # Its student is not there yet.


def _fake_grid(monkeypatch, tmp_path, runs, exit_codes):
  """run_grid over fake runs: each worker logs its start and end times, sleeps, and
  exits with `exit_codes.get(name, 0)`."""
  monkeypatch.setattr(reproduce, "grid_plan", lambda args: [
      reproduce.GridRun(name, None, after) for name, after in runs])
  monkeypatch.setattr(reproduce, "core_groups", lambda jobs: [None] * jobs)
  events = tmp_path / "events.txt"
  script = ("import sys, time; n, rc = sys.argv[1], int(sys.argv[2]); "
            f"f = open({str(events)!r}, 'a'); f.write(f'start {{n}} {{time.time()}}\\n'); "
            "f.flush(); time.sleep(0.3); f.write(f'end {n} {time.time()}\\n'); "
            "sys.exit(rc)")

  def command(argv, run):
    return [sys.executable, "-c", script, run.name, str(exit_codes.get(run.name, 0))]
  return _args(tmp_path, "--jobs", "2"), command, events


def _read_events(events):
  out = {}
  for line in events.read_text().splitlines():
    kind, name, t = line.split()
    out[(kind, name)] = float(t)
  return out


def test_grid_runs_two_at_a_time_each_after_what_it_reads(monkeypatch, tmp_path):
  runs = [("teacher", ()), ("table3_scratch", ()), ("table1", ("teacher",)),
          ("table1_short", ()), ("table3", ("teacher",))]
  args, command, events = _fake_grid(monkeypatch, tmp_path, runs, {})
  reproduce.run_grid(args, [], command=command, poll_s=0.02)
  ev = _read_events(events)
  assert {n for _, n in ev} == {n for n, _ in runs}
  for name, after in runs:
    for dep in after:
      assert ev[("start", name)] >= ev[("end", dep)]
  times = sorted((t, +1 if kind == "start" else -1) for (kind, _), t in ev.items())
  assert np.cumsum([d for _, d in times]).max() == 2
  assert ev[("start", "table3_scratch")] < ev[("end", "teacher")]  # Beside it.
  assert (tmp_path / "logs" / "table1.log").exists()


def test_grid_skips_what_reads_a_diverged_run_and_stops_on_errors(monkeypatch, tmp_path):
  runs = [("teacher", ()), ("table1", ("teacher",)), ("after1", ("table1",)),
          ("short", ())]
  args, command, events = _fake_grid(monkeypatch, tmp_path, runs,
                                     {"table1": reproduce.EXIT_DIVERGED})
  reproduce.run_grid(args, [], command=command, poll_s=0.02)
  assert {n for _, n in _read_events(events)} == {"teacher", "table1", "short"}
  events.unlink()
  args, command, events = _fake_grid(monkeypatch, tmp_path, runs, {"teacher": 1})
  with pytest.raises(RuntimeError, match="grid run teacher failed .exit status 1.; "
                                         "its log: .*teacher.log"):
    reproduce.run_grid(args, [], command=command, poll_s=0.02)
  started = {n for k, n in _read_events(events) if k == "start"}
  assert "table1" not in started


def test_a_preempted_worker_or_a_sigtermed_grid_stops_every_run_resumably(
    monkeypatch, tmp_path):
  runs = [("teacher", ()), ("short", ())]
  args, command, _ = _fake_grid(monkeypatch, tmp_path, runs,
                                {"teacher": reproduce.EXIT_PREEMPTED})
  with pytest.raises(RuntimeError, match="teacher was stopped .SIGTERM. after saving a "
                                         "checkpoint. Run the same command again"):
    reproduce.run_grid(args, [], command=command, poll_s=0.02)
  # SIGTERM of the grid's process: its workers (here: sleepers) are terminated and
  # reaped, not left running without it.
  procs = []

  class Recorded(subprocess.Popen):
    def __init__(self, *a, **k):
      super().__init__(*a, **k)
      procs.append(self)

  monkeypatch.setattr(reproduce.subprocess, "Popen", Recorded)

  def sigterm_once_both_started():
    while len(procs) < 2:
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=sigterm_once_both_started, daemon=True).start()
  sleeper = lambda argv, run: [sys.executable, "-c", "import time; time.sleep(60)"]  # noqa: E731
  t0 = time.time()
  with pytest.raises(SystemExit, match="grid stopped by signal"):
    reproduce.run_grid(args, [], command=sleeper, poll_s=0.02)
  assert time.time() - t0 < 30
  assert len(procs) == 2 and all(p.returncode == -signal.SIGTERM for p in procs)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Restored.


def test_workers_run_this_script_from_anywhere(tmp_path):
  run = reproduce.GridRun("table3", None, ("teacher",))
  cmd = reproduce.worker_command(["--scale", "0.01"], run)
  assert cmd[:2] == [sys.executable, os.path.join(REPO, "experiments", "reproduce.py")]
  assert cmd[2:] == ["--scale", "0.01", "--jobs", "1", "--run", "table3"]
  out = subprocess.run(cmd[:2] + ["--workdir", str(tmp_path / "w"), "--data_root", "",
                                  "--run", "nope"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 1, out.stderr
  assert "--run 'nope' is not a run of this grid; its runs: teacher, table3_scratch" in (
      out.stderr)
  assert reproduce.command_line(["--scale", "0.04", "--run", "x", "--report_only",
                                 "--note", "shared machine", "--note=y"]) == (
      "python experiments/reproduce.py --scale 0.04")


def _classify(accs, ensemble, steps=640):
  out = {"kind": "classify", "model": "m", "steps": steps, "wall_time_s": 60.0,
         "test_accuracy": float(np.mean(accs)), "test_loss": 1.0}
  if len(accs) > 1:
    out.update(test_accuracy_std=float(np.std(accs, ddof=1)),
               ensemble_test_accuracy=ensemble,
               per_seed=[{"seed": s, "test_accuracy": a} for s, a in enumerate(accs)])
  return out


def test_report_tables_gains_and_best_evaluations(tmp_path):
  wd = str(tmp_path / "w")
  write_run(wd, "teacher", {"teacher": _classify([0.80], None, 640)})
  per_seed = lambda accs: [{"seed": s, "test_accuracy": a}  # noqa: E731
                           for s, a in enumerate(accs)]
  write_run(wd, "table3", {
      "fsp": {"kind": "fsp", "steps": 210, "wall_time_s": 30.0, "test_fsp_loss": 5.0,
              "per_seed": [{"seed": s, "test_fsp_loss": 5.0 + s} for s in range(3)]},
      "student": _classify([0.74, 0.75, 0.76], 0.78)},
      {"student": [{"step": 320, "test_accuracy": 0.5,
                    "per_seed": per_seed([0.50, 0.77, 0.60])},
                   {"step": 640, "test_accuracy": 0.75,
                    "per_seed": per_seed([0.74, 0.75, 0.76])}]})
  write_run(wd, "table3_scratch", {"scratch": _classify([0.70, 0.72, 0.71], 0.73)})
  write_run(wd, "stage1_exact_table1", {})
  with open(os.path.join(wd, "stage1_exact_table1", "diverged.json"), "w") as f:
    json.dump({"error": "[fsp] the loss became nan at step 9"}, f)
  args = _args(tmp_path, "--workdir", wd, "--report_dir", str(tmp_path / "r"))
  text = report.write(args, "python experiments/reproduce.py --scale 0.01")
  assert "**80.00 %** after 640 iterations" in text
  assert "| ResNet-8 from scratch | 71.00 ± 1.00 | 73.00 |" in text
  # Best evaluation: each seed's best (seed 1's was at step 320), then the mean.
  assert "| FSP student (ResNet-8) | 75.00 ± 1.00 | 78.00 | 75.67 | 640 |" in text
  g = report.gain(report.collect(wd), "t3_student", "t3_scratch")
  assert g["gain"] == pytest.approx(4.0)
  assert g["standard_error"] == pytest.approx(np.sqrt(2 / 3))
  assert g["every_seed_ahead"]
  assert "**+4.00 points**" in text
  assert "FSP student, 1/3 of the iterations | not finished" in text
  assert "test FSP loss 5.0, 6.0, 7.0 after 210 iterations" in text
  assert "exactly as the paper (no warm-up): **diverged**: [fsp] the loss became nan" in (
      text)
  saved = json.load(open(tmp_path / "r" / "results.json"))
  assert saved["gains"]["table3_student_vs_scratch"]["gain"] == pytest.approx(4.0)
  assert (tmp_path / "r" / "accuracy_vs_iteration.png").exists()


def test_kernel_norms_measure_and_undo_a_stage1s_growth(tmp_path):
  import jax
  from experiments import kernel_norms
  from fsp_jax import checkpoints, models
  module = models.create_model("cifar_resnet8", 10)
  initial = models.init_variables(module, jax.random.PRNGKey(0), (32, 32, 3))
  grown = jax.tree_util.tree_map_with_path(
      lambda p, a: a * (3.0 if p[-1].key == "kernel" and a.ndim == 4 else 1.0), initial)
  # Three seeds: the first grown 3x, the others 2x in the stem only.
  stem = lambda p, a: a * (2.0 if p[1].key.startswith("stem") and a.ndim == 4 else 1.0)  # noqa: E731
  seeds = jax.tree.map(lambda *a: np.stack(a), grown,
                       jax.tree_util.tree_map_with_path(stem, initial),
                       jax.tree_util.tree_map_with_path(stem, initial))
  checkpoints.save_model(str(tmp_path / "fsp"), seeds, 630)
  stored, step = kernel_norms.read_final(str(tmp_path / "fsp"))
  assert step == 630
  r = kernel_norms.kernel_norm_ratios(stored, initial)
  np.testing.assert_allclose(r["section2"], [3.0, 1.0, 1.0], rtol=1e-5)
  np.testing.assert_allclose(r["stem"], [3.0, 2.0, 2.0], rtol=1e-5)
  assert 1.0 < r["all"][1] < 2.0 and r["all"][0] == pytest.approx(3.0, rel=1e-5)
  back = kernel_norms.kernel_norm_ratios(kernel_norms.rescaled(stored, initial), initial)
  for part in ("stem", "section1", "all"):
    np.testing.assert_allclose(back[part], 1.0, rtol=1e-5)
  one = jax.tree.map(lambda a: a[0], stored)  # One seed (a shared stage 1).
  np.testing.assert_allclose(kernel_norms.kernel_norm_ratios(one, initial)["all"], [3.0],
                             rtol=1e-5)
  out = kernel_norms.rescaled(one, initial)
  bn = lambda t: t["params"]["stem_bn"]["scale"] if "stem_bn" in t["params"] else 0  # noqa: E731
  np.testing.assert_array_equal(bn(out), bn(one))  # Only the kernels change.


@pytest.mark.slow
def test_whole_grid_dry_run_on_digits(tmp_path):
  """The grid command end to end at a tiny scale on the bundled digits: every run,
  two at a time, and the report (its stage 1 may diverge at 8x8: then it says so)."""
  wd, rd = tmp_path / "w", tmp_path / "r"
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "reproduce.py"),
       "--data_root", "digits", "--scale", "0.0005", "--jobs", "2", "--log_every", "4",
       "--workdir", str(wd), "--report_dir", str(rd)],
      capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  text = (rd / "report.md").read_text()
  assert "## Table 3" in text and "## Table 1" in text
  assert "| ResNet-8 from scratch | " in text and "not finished" not in text
  assert "Teacher (ResNet-26): **" in text
