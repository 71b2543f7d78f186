"""Reproduce the paper's CIFAR-10 Tables 1 and 3 at one scale, and write a report.

    python experiments/reproduce.py --data_root /tmp/cifar10 --scale 0.03 \
        --teacher_scale 0.05 --jobs 2 --workdir runs/reproduce --report_dir docs/reproduction

Every schedule is the shipped config's (the paper's, stage 1 with its 5 % learning-rate
warm-up unless --exact), its iterations, drops and warm-up multiplied by --scale (the
teacher's by --teacher_scale where given: a teacher trained longer). The
runs, each a `python -m fsp_jax.main`-equivalent run directory of WORKDIR:
- `teacher`: ResNet-26, the teacher's schedule (cifar10_teacher).
- `table3`: network minimization (26 -> 8): FSP students, seeds trained side by side in
  one program, each seed its own stage 1 (the spread includes stage-1 variance).
- `table3_scratch`: ResNet-8 from scratch, the same seeds and main-task schedule.
- `table1`: fast optimization (26 -> 26): one stage 1 (the first seed) shared by every
  seed's stage 2 at 1/3 of the teacher's iterations, as the paper's Algorithm 1 does
  (the spread excludes stage-1 variance).
- `table1_short`: the teacher architecture trained for those same iterations.
- `stage1_exact_table1`, `stage1_exact_table3` (with --stage1_checks): the paper's stage
  1 without the warm-up, first seed, stage 1 only, beside the grid's.
With --jobs 2 the runs go two at a time, each pinned to its share of the cores; the
baselines need no teacher, so they run beside it. Rerunning the command resumes.
Writes `report.md`, `results.json` and `accuracy_vs_iteration.png` to --report_dir.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

log = logging.getLogger("fsp_jax")

ELAPSED = "grid_elapsed.json"  # The last grid command's wall time, for the report.
EXIT_DIVERGED = 3  # A worker's exit status for a run whose loss became NaN or inf.
EXIT_PREEMPTED = 4  # A worker stopped by SIGTERM after saving a checkpoint.
DIVERGED = "diverged.json"


@dataclasses.dataclass(frozen=True)
class GridRun:
  """One run directory of the grid: a config and the runs it reads (`after`)."""
  name: str
  config: Any
  after: Tuple[str, ...] = ()
  stage1_only: bool = False  # Train its `fsp` stage only (a stage-1 check).


def _config(name: str, args, exact: bool = False):
  """A shipped config with the grid's settings; `exact` (or --exact) for a table's
  config: the paper's stage 1 without the warm-up."""
  from fsp_jax import config_lib
  table = name != "cifar10_teacher"
  config = config_lib.load(name + (":exact" if table and (exact or args.exact) else ""))
  config.seed = args.seeds[0]
  config.num_seeds = len(args.seeds)
  config.schedule_scale = args.scale
  if args.data_root == "digits":  # The bundled 8x8 digits: a dry run in minutes.
    config.data.source = "digits"
  elif args.data_root:
    config.data.source = "folder"
    config.data.root = args.data_root
    # Decoded once, then read by every later run's process.
    config.data.cache_dir = os.path.join(os.path.abspath(args.workdir), "data_cache")
  config.eval_batch_size = 500
  # The curves' evaluations before the last on a fixed subset of the test set; every
  # final evaluation takes all of it.
  config.eval_examples = args.eval_examples
  config.log_every = args.log_every
  config.checkpoint_every = 100
  return config


def _eval_every(schedule, scale: float, points: int) -> int:
  """Evaluations so that the last of `points` is the stage's final step."""
  steps = max(1, int(round(schedule.num_steps * scale)))
  return max(1, -(-steps // points))


def grid_plan(args) -> List[GridRun]:
  """Every run of the grid; a worker starts a run once those in its `after` finished.

  Order matters with --jobs 2: the teacher and a baseline first (neither reads
  anything), then the tables once the teacher is there.
  """
  wd = os.path.abspath(args.workdir)
  teacher_dir = os.path.join(wd, "teacher", "teacher")

  teacher = _config("cifar10_teacher", args)
  teacher.schedule_scale = args.teacher_scale
  teacher.teacher.schedule.eval_every = _eval_every(teacher.teacher.schedule,
                                                    args.teacher_scale, args.curve_points)

  def table(name, methods, baselines, shared=False):
    config = _config(name, args)
    config.methods, config.baselines = methods, baselines
    config.fsp.shared = shared
    if methods:
      config.teacher.checkpoint = teacher_dir
    config.student.schedule.eval_every = _eval_every(config.student.schedule,
                                                     args.scale, args.curve_points)
    return config

  plan = [GridRun("teacher", teacher),
          GridRun("table3_scratch", table("cifar10_minimization", (), ("scratch",))),
          GridRun("table1", table("cifar10_fast_optimization", ("fsp",), (),
                                  shared=True), ("teacher",)),
          GridRun("table1_short", table("cifar10_fast_optimization", (),
                                        ("teacher_short",))),
          GridRun("table3", table("cifar10_minimization", ("fsp",), ()), ("teacher",))]
  if args.stage1_checks and not args.exact:
    for tb, name in (("table1", "cifar10_fast_optimization"),
                     ("table3", "cifar10_minimization")):
      config = _config(name, args, exact=True)
      config.methods, config.baselines = ("fsp",), ()
      config.num_seeds = 1
      config.teacher.checkpoint = teacher_dir
      plan.append(GridRun(f"stage1_exact_{tb}", config, ("teacher",), stage1_only=True))
  return plan


def run_one(args, run: GridRun) -> bool:
  """Runs (or resumes) one grid run in this process. False where its loss became NaN
  or inf: recorded in the run directory (`diverged.json`) for the report."""
  from fsp_jax import metrics, stages, train
  run_dir = os.path.join(os.path.abspath(args.workdir), run.name)
  t0 = time.time()
  log.info("=== %s ===", run.name)
  try:
    if run.stage1_only:
      if "fsp" not in metrics.read_results(run_dir):
        exp = stages.setup(run.config, run_dir)
        stage = next(s for s in exp.stages if s.name == "fsp")
        metrics.write_results(run_dir, {
            "fsp": train.train_and_evaluate(stages.resolve(exp, stage))})
    else:
      train.run(run.config, run_dir)
  except FloatingPointError as e:  # A finding, not a crash.
    log.warning("=== %s diverged: %s", run.name, e)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, DIVERGED), "w") as f:
      json.dump({"error": str(e), "run": run.name}, f)
    return False
  log.info("=== %s done in %.0f s", run.name, time.time() - t0)
  return True


def core_groups(jobs: int) -> List[Optional[List[int]]]:
  """The CPU cores of each of `jobs` parallel runs: this process's cores split into
  `jobs` contiguous groups; [None] * jobs where the OS cannot pin (not Linux)."""
  if not hasattr(os, "sched_getaffinity"):
    return [None] * jobs
  cores = sorted(os.sched_getaffinity(0))
  if jobs > len(cores):
    raise ValueError(f"--jobs {jobs} exceeds the {len(cores)} CPU cores this process "
                     f"may use; pass --jobs {len(cores)} or fewer.")
  per = len(cores) // jobs
  return [cores[k * per:(k + 1) * per] for k in range(jobs)]


def finished(args, run: GridRun) -> bool:
  """Whether `run`'s directory holds the results of every stage it plans (a run an
  earlier command finished)."""
  if run.config is None:
    return False
  from fsp_jax import metrics, stages
  results = metrics.read_results(os.path.join(os.path.abspath(args.workdir), run.name))
  names = (["fsp"] if run.stage1_only
           else [s.name for s in stages.plan_stages(run.config)])
  return bool(results) and all(name in results for name in names)


def cores_for(run: GridRun, others: List[GridRun], running, cores):
  """The cores `run` starts on: its slot's `cores`, or every core of this process
  (None) where nothing else runs and every other pending run reads it (a teacher
  before the runs that read it): a run that can have no neighbour is not held to one
  slot's share."""
  if not running and all(run.name in other.after for other in others):
    return None
  return cores


def worker_command(argv: List[str], run: GridRun) -> List[str]:
  """A worker's command line: this script, the grid's flags, `--run NAME`."""
  return [sys.executable, os.path.abspath(__file__), *argv, "--jobs", "1",
          "--run", run.name]


def run_grid(args, argv: List[str], command=worker_command, poll_s: float = 1.0,
             plan: Optional[List[GridRun]] = None) -> None:
  """Runs every grid run, `args.jobs` worker processes at a time (each pinned to its
  share of the cores; on a 2-core CPU two one-core runs do 1.2-1.5x the work of one
  two-core run), a run once those it reads finished. With --jobs 1, in this process.
  Workers log to `WORKDIR/logs/NAME.log`. `plan`: the runs (default: `grid_plan`)."""
  plan = grid_plan(args) if plan is None else plan
  if args.jobs == 1:
    failed = set()
    for run in plan:
      if failed & set(run.after) or not run_one(args, run):
        failed.add(run.name)
    return
  logs = os.path.join(os.path.abspath(args.workdir), "logs")
  os.makedirs(logs, exist_ok=True)
  slots = core_groups(args.jobs)
  pending, running, done, failed, error = list(plan), {}, set(), set(), None
  for run in plan:  # Finished by an earlier command: no worker for it.
    if finished(args, run):
      pending.remove(run)
      done.add(run.name)
      log.info("=== %s finished before", run.name)

  def stop(signum, frame):  # SIGTERM of the grid: its workers save and stop too.
    raise SystemExit(f"grid stopped by signal {signum}. Run the same command again to "
                     "resume.")

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    while pending or running:
      for slot, cores in enumerate(slots):
        if slot in running or error:
          continue
        for run in list(pending):
          if failed & set(run.after):
            pending.remove(run)
            failed.add(run.name)
            log.warning("=== %s skipped: a run it reads diverged", run.name)
          elif set(run.after) <= done:
            pending.remove(run)
            path = os.path.join(logs, run.name + ".log")
            cores = cores_for(run, pending, running, cores)
            pin = (None if cores is None
                   else functools.partial(os.sched_setaffinity, 0, cores))
            with open(path, "a") as out:
              proc = subprocess.Popen(command(argv, run), stdout=out,
                                      stderr=subprocess.STDOUT, preexec_fn=pin)
            log.info("=== %s started on cores %s (log: %s)", run.name,
                     "all" if cores is None else cores, path)
            running[slot] = (run, proc, time.time(), path)
            break
      if not running:
        break
      time.sleep(poll_s)
      for slot, (run, proc, t0, path) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        del running[slot]
        if rc == 0:
          done.add(run.name)
          log.info("=== %s done in %.0f s", run.name, time.time() - t0)
        elif rc == EXIT_DIVERGED:
          failed.add(run.name)
          log.warning("=== %s diverged (see %s)", run.name, path)
        elif error is None:
          error = (f"grid run {run.name} was stopped (SIGTERM) after saving a checkpoint"
                   if rc in (EXIT_PREEMPTED, -signal.SIGTERM) else
                   f"grid run {run.name} failed (exit status {rc}); its log: {path}")
          log.error("=== %s; stopping the others (they save a checkpoint first).", error)
          for other in running.values():
            other[1].terminate()
  except BaseException:  # Ctrl-C or a bug here: no worker outlives this process.
    for _, proc, _, _ in running.values():
      proc.terminate()
    for _, proc, _, _ in running.values():
      proc.wait()
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)
  if error:
    raise RuntimeError(error + ". Run the same command again to resume.")


def run_worker(args, plan: List[GridRun]) -> None:
  """A --jobs worker: runs `args.run` of `plan` and exits with its status (0, or
  EXIT_DIVERGED, EXIT_PREEMPTED after saving a checkpoint)."""
  runs = {run.name: run for run in plan}
  if args.run not in runs:
    sys.exit(f"--run {args.run!r} is not a run of this grid; its runs: "
             f"{', '.join(runs)}.")
  from fsp_jax import guards
  try:
    sys.exit(0 if run_one(args, runs[args.run]) else EXIT_DIVERGED)
  except guards.Preempted as e:  # Checkpoint saved: rerunning the grid resumes.
    log.warning("=== %s stopped: %s", args.run, e)
    sys.exit(EXIT_PREEMPTED)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_root", default="/tmp/cifar10",
                      help="CIFAR-10 image folder (ROOT/train/<class>, ROOT/test/<class>);"
                           " '' loads tfds cifar10; 'digits' the bundled digits (a dry "
                           "run of the grid)")
  parser.add_argument("--scale", type=float, default=0.03,
                      help="multiplies every iteration count, drop and warm-up")
  parser.add_argument("--teacher_scale", type=float, default=None,
                      help="the teacher's factor instead of --scale: a teacher trained "
                           "longer than the tables' runs, where --scale leaves it short "
                           "of the accuracy distillation needs (default: --scale)")
  parser.add_argument("--seeds", type=int, default=3,
                      help="seeds 0..N-1, trained side by side in one program per run")
  parser.add_argument("--workdir", default="runs/reproduce")
  parser.add_argument("--report_dir", default="docs/reproduction")
  parser.add_argument("--exact", action="store_true",
                      help="the paper's stage 1 exactly (no learning-rate warm-up)")
  parser.add_argument("--stage1_checks", action="store_true",
                      help="also run the exact paper stage 1 (first seed, stage 1 only) "
                           "of both tables beside the grid's warmed-up one")
  parser.add_argument("--curve_points", type=int, default=8,
                      help="evaluations per stage (the last is the final one)")
  parser.add_argument("--eval_examples", type=int, default=2000,
                      help="test examples (a fixed random subset) of the evaluations "
                           "before a stage's last; the final one takes all. 0: all.")
  parser.add_argument("--log_every", type=int, default=20)
  parser.add_argument("--jobs", type=int, default=1,
                      help="runs at a time, each pinned to its share of the CPU cores "
                           "(2 on a 2-core CPU); 1 runs them one after another")
  parser.add_argument("--run", default="", help="run only this grid run (a worker)")
  parser.add_argument("--report_only", action="store_true",
                      help="write the report from the runs finished so far")
  parser.add_argument("--note", default="", help="appended to the report's wall time")
  args = parser.parse_args(argv)
  if args.jobs < 1:
    parser.error(f"--jobs must be at least 1; got {args.jobs}.")
  if args.seeds < 1:
    parser.error(f"--seeds must be at least 1; got {args.seeds}.")
  args.seeds = list(range(args.seeds))
  if args.teacher_scale is None:
    args.teacher_scale = args.scale
  return args


def command_line(argv: List[str]) -> str:
  """The grid command as typed (worker and report flags dropped)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    if a in ("--run", "--note"):
      skip = True
      continue
    if a.startswith(("--run=", "--note=")) or a == "--report_only":
      continue
    out.append(shlex.quote(a))
  return "python experiments/reproduce.py " + " ".join(out)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("fsp_jax").setLevel(logging.INFO)
  if args.run:  # A --jobs worker: one run, no report.
    run_worker(args, grid_plan(args))
  if not args.report_only:
    t0 = time.time()
    run_grid(args, [a for a in argv if a != "--report_only"])
    os.makedirs(os.path.abspath(args.workdir), exist_ok=True)
    with open(os.path.join(os.path.abspath(args.workdir), ELAPSED), "w") as f:
      json.dump({"elapsed_s": round(time.time() - t0, 1), "jobs": args.jobs,
                 "command": command_line(argv)}, f)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import report  # experiments/report.py: tables, ensembles and the plot.
  print(report.write(args, command_line(argv)))


if __name__ == "__main__":
  main()
