"""Reproduce the paper's CIFAR-10 phenomena at a chosen scale, and write a report.

    python experiments/reproduce.py --data_root /tmp/cifar10 --scale 0.02 \
        --workdir runs/reproduce --report_dir docs/reproduction

Runs, sharing one teacher (ResNet-26, the full scaled schedule):
- Table 1, fast optimization (ResNet-26 -> ResNet-26): the teacher architecture trained
  for 1/3 of the teacher's iterations (per seed), and FSP students (one shared stage 1,
  stage 2 at 1/3 of the teacher's iterations, per seed).
- Table 3, network minimization (ResNet-26 -> ResNet-8): ResNet-8 from scratch and FSP
  students (one shared stage 1), same main-task iterations as the teacher, per seed.
Every schedule is the paper's, its iterations and learning-rate drops multiplied by
`--scale`. Writes `report.md`, `results.json` and `accuracy_vs_iteration.png`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

log = logging.getLogger("fsp_jax")
TEST_LOGITS = "test_logits.npy"  # A classification stage's test logits, for ensembles.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAPER = {
    "table1": {"teacher": 91.75, "teacher_short": 90.64, "student": 92.14,
               "teacher_ens": 93.48, "teacher_short_ens": 92.60, "student_ens": 93.26},
    "table3": {"teacher": 91.91, "scratch": 87.91, "student": 88.70},
}


def load_config(name: str):
  from fsp_jax import config_lib
  return config_lib.load(name)


def base_overrides(config, args, seed: int):
  config.seed = seed
  config.schedule_scale = args.scale
  if args.data_root:
    config.data.source = "folder"
    config.data.root = args.data_root
    # Decoded once, then read by every later run's process (--jobs workers).
    config.data.cache_dir = os.path.join(os.path.abspath(args.workdir), "data_cache")
  config.eval_batch_size = 500
  config.eval_every = 0
  # The curves' evaluations before the last on a fixed subset of the test set: a
  # ResNet-26 pass over all 10k images costs as much as ~40 training iterations.
  config.eval_examples = args.eval_examples
  config.log_every = args.log_every
  config.checkpoint_every = 100
  return config


# Element mean of squared differences == lambda_i = 1 / (m_i n_i): the CIFAR ResNets'
# pairs stem->s1, s1->s2, s2->s3 have 16x16, 16x32 and 32x64 matrices.
_ELEMENT_MEAN = (1 / (16 * 16), 1 / (16 * 32), 1 / (32 * 64))
# The re-implementations' stage 1: element-mean loss at LR 0.05 / 0.005 / 0.0005.
ELEMENT_MEAN_LRS = (0.05, 0.005, 0.0005)
TABLES = {"table1": ("cifar10_fast_optimization", ("teacher_short",)),
          "table1_mean": ("cifar10_fast_optimization", ("teacher_short",)),
          # teacher_short does not depend on stage 1: it runs once, in table1_short,
          # unless another Table 1 variant of the workdir has it.
          "table1_meanlong": ("cifar10_fast_optimization", ()),
          "table1_short": ("cifar10_fast_optimization", ("teacher_short",)),
          "table3": ("cifar10_minimization", ("scratch",)),
          "table3_mean": ("cifar10_minimization", ("scratch",)),
          "table3_meanlong": ("cifar10_minimization", ("scratch",))}
# --table1_stage1 / --table3_stage1: the table variant (run-directory prefix) per stage 1.
STAGE1_SUFFIX = {"paper": "", "element_mean": "_mean", "element_mean_long": "_meanlong"}


def grid_config(args, table: str, seed: int):
  """The config of one grid run: `table` (a key of TABLES) with `seed`."""
  name, baselines = TABLES[table]
  config = base_overrides(load_config(name), args, seed)
  wd = os.path.abspath(args.workdir)
  config.teacher.checkpoint = os.path.join(wd, "teacher", "teacher")
  config.baselines = baselines
  if table.endswith(("_mean", "_meanlong")):
    config.fsp.weights = _ELEMENT_MEAN
    config.fsp.schedule.learning_rates = ELEMENT_MEAN_LRS
  if table == "table1_short":
    config.methods = ()
  if table.endswith("_meanlong"):  # Stage 1 five times longer, same drop fractions.
    sched = config.fsp.schedule
    sched.num_steps *= 5
    sched.boundaries = tuple(5 * b for b in sched.boundaries)
  if seed != args.seeds[0]:  # One stage-1 result initialises every seed's student.
    config.fsp.checkpoint = os.path.join(wd, f"{table}_seed{args.seeds[0]}", "fsp")
  main_steps = int(round(config.student.schedule.num_steps * args.scale))
  # ResNet-26 evaluations cost 4x ResNet-8's: half as many points on Table 1.
  points = (args.curve_points if table.startswith("table3")
            else max(1, args.curve_points // 2))
  # Rounded up, so that the last curve point is the final evaluation (not one just
  # before it: 52, 104, 156, 208 and 210 cost a fifth ResNet-26 test pass).
  config.student.schedule.eval_every = max(1, -(-main_steps // points))
  return config


# Stage-1 ablations of Table 3 (ResNet-26 -> ResNet-8, seed 0, one run each), the known
# disagreements between implementations. Each entry changes the grid's Table 3 stage 1
# (--table3_stage1: the paper's, or the element-mean one) in one respect; the reference
# rows are the grid's own Table 3 seed-0 runs (its stage 1, scratch).
ABLATIONS = {
    "lr_1e-4": ("stage-1 LR 1e-4 / 1e-5 / 1e-6 (10x below the paper)",
                {"learning_rates": (1e-4, 1e-5, 1e-6)}),
    "mean_lr_0.05": ("element-mean loss, stage-1 LR 0.05 / 0.005 / 0.0005 "
                     "(the re-implementations' scale)",
                     {"weights": _ELEMENT_MEAN, "learning_rates": ELEMENT_MEAN_LRS}),
    "mean_lr_0.05_x5": ("element-mean loss at LR 0.05, stage 1 five times longer",
                        {"weights": _ELEMENT_MEAN, "learning_rates": ELEMENT_MEAN_LRS,
                         "length": 5}),
    "avg_pool": ("average instead of max pooling for s1 -> s2", {"pool": "avg"}),
    "stage1_x5": ("stage 1 five times longer (paper LRs and drop fractions)",
                  {"length": 5}),
    # The paper's stage-1 result itself, every convolution kernel then scaled back to
    # its initial norm: the same function (each kernel feeds batch norm), the next
    # stage's effective learning rate restored. Tests the cause, not a variant.
    "renorm_kernels": ("the grid's stage-1 result, each conv kernel scaled back to "
                       "its initial norm (same function)", {"renorm": True}),
    # The element-mean stage 1 at the low end of the re-implementations' LRs.
    "lr_0.02": ("stage-1 LR 0.02 / 0.002 / 0.0002", {"learning_rates": (0.02, 0.002,
                                                                      0.0002)}),
}
RENORMALIZED = "fsp_renormalized"  # The renorm_kernels ablation's stage-1 weights.


DIVERGED = "diverged.json"  # An ablation's record of a loss that became NaN or inf.
# The last grid command's elapsed time and --jobs (WORKDIR/...), for the report.
ELAPSED = "grid_elapsed.json"


def ablation_dir(args, name: str, seed=None) -> str:
  """An ablation's run directory: `ablation_NAME` for the first seed, then
  `ablation_NAME_seedS` (which reuse the first seed's stage 1, as the grid's seeds do)."""
  suffix = "" if seed in (None, args.seeds[0]) else f"_seed{seed}"
  return os.path.join(os.path.abspath(args.workdir), f"ablation_{name}{suffix}")


def ablation_config(args, name: str, seed=None):
  """The grid's Table 3 config (`args.t3`; first seed unless `seed`) with ablation
  `name`'s change to its stage 1, FSP student only; other seeds start from the first
  seed's stage-1 result."""
  seed = args.seeds[0] if seed is None else seed
  config = grid_config(args, args.t3, seed)
  change = ABLATIONS[name][1]
  config.baselines = ()
  config.fsp.checkpoint = ("" if seed == args.seeds[0] else
                           os.path.join(ablation_dir(args, name), "fsp"))
  sched = config.fsp.schedule
  if "length" in change:
    sched.num_steps *= change["length"]
    sched.boundaries = tuple(b * change["length"] for b in sched.boundaries)
  if "learning_rates" in change:
    sched.learning_rates = change["learning_rates"]
  if "weights" in change:
    config.fsp.weights = change["weights"]
  if "pool" in change:
    config.fsp.pool = change["pool"]
  if "renorm" in change:
    config.fsp.checkpoint = os.path.join(os.path.abspath(args.workdir),
                                         f"ablation_{name}", RENORMALIZED)
  return config


def _conv_kernels(variables):
  """`{path: kernel}` of every convolution kernel (4-D) of a model's params."""
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  return {jax.tree_util.keystr(p): v for p, v in leaves
          if "kernel" in jax.tree_util.keystr(p) and v.ndim == 4}


def stage_one_weights(args, run_name: str):
  """(initial, stage-1 result) student variables of a Table 3 run or ablation."""
  from fsp_jax import checkpoints, stages
  wd = os.path.abspath(args.workdir)
  config = (grid_config(args, args.t3, args.seeds[0]) if run_name.startswith("table3")
            else ablation_config(args, run_name[len("ablation_"):]))
  exp = stages.setup(config, os.path.join(wd, run_name))
  path = config.fsp.checkpoint or os.path.join(wd, run_name, "fsp")
  final, _ = checkpoints.restore_model(path, stages.abstract_variables(exp, "student"))
  return stages.random_variables(exp, "student"), final


def write_renormalized(args, name: str) -> None:
  """The renorm_kernels ablation's stage-1 weights: the grid's Table 3 seed-0 stage-1
  result with each convolution kernel scaled to its norm at initialisation."""
  import jax
  import jax.numpy as jnp
  from fsp_jax import checkpoints
  out = ablation_config(args, name).fsp.checkpoint
  if checkpoints.has_checkpoints(out):
    return
  init, final = stage_one_weights(args, f"{args.t3}_seed{args.seeds[0]}")
  target = {k: jnp.linalg.norm(v) for k, v in _conv_kernels(init).items()}

  def rescale(path, v):
    key = jax.tree_util.keystr(path)
    return v * (target[key] / jnp.linalg.norm(v)) if key in target else v
  params = jax.tree_util.tree_map_with_path(rescale, final["params"])
  checkpoints.save_model(out, {"params": params, "batch_stats": final["batch_stats"]})


def kernel_norm_growth(args, run_name: str) -> float:
  """||all conv kernels|| of a run's stage-1 result over that of the initialisation.

  The convolutions feed batch norm, so their scale does not change the function but
  divides the effective learning rate of the next stage by this ratio squared.
  """
  import numpy as onp
  init, final = stage_one_weights(args, run_name)

  def norm(variables):
    return float(onp.sqrt(sum(float((onp.asarray(v) ** 2).sum())
                              for v in _conv_kernels(variables).values())))
  return norm(final) / norm(init)


def run_ablations(args) -> None:
  from fsp_jax import train
  wd = os.path.abspath(args.workdir)
  for name in dict.fromkeys(args.ablations + args.ablation_seeds):  # Seed-0 runs first.
    t0 = time.time()
    log.info("=== ablation %s ===", name)
    run_dir = os.path.join(wd, f"ablation_{name}")
    if "renorm" in ABLATIONS[name][1]:
      write_renormalized(args, name)
    try:
      train.run(ablation_config(args, name), run_dir)
    except FloatingPointError as e:  # A finding, not a crash: recorded for the report.
      log.warning("=== ablation %s diverged: %s", name, e)
      with open(os.path.join(run_dir, DIVERGED), "w") as f:
        json.dump({"error": str(e)}, f)
      continue
    log.info("=== ablation %s done in %.0f s", name, time.time() - t0)
  for name in args.ablation_seeds:
    for seed in args.seeds[1:]:
      log.info("=== ablation %s, seed %d ===", name, seed)
      train.run(ablation_config(args, name, seed), ablation_dir(args, name, seed))


@dataclasses.dataclass(frozen=True)
class GridRun:
  """One run (a run directory, all the stages of its config) of the grid.

  `after`: the runs whose results it reads (the teacher; the first seed's stage 1), so
  which must have finished before it starts.
  """
  name: str
  config: Any
  after: Tuple[str, ...] = ()


def grid_plan(args) -> List[GridRun]:
  """Every run of the grid, in the order one process runs them.

  The teacher; Table 3's seeds (the first runs the shared stage 1); Table 1's seeds
  (likewise); and, where the Table 1 variant has no teacher_short baseline and no
  variant of the workdir has finished one, the teacher architecture trained for 1/3 of
  the iterations (`table1_short`, which reads nothing).
  """
  first = args.seeds[0]
  plan = [GridRun("teacher", base_overrides(load_config("cifar10_teacher"), args, 0))]
  for table in (args.t3, args.t1):
    for seed in args.seeds:
      after = ("teacher",) if seed == first else (f"{table}_seed{first}",)
      plan.append(GridRun(f"{table}_seed{seed}", grid_config(args, table, seed), after))
  if not TABLES[args.t1][1] and not any(
      finished(collect_runs(args), tb, "teacher_short", args.seeds) == list(args.seeds)
      for tb in TEACHER_SHORT_TABLES):
    plan += [GridRun(f"table1_short_seed{seed}", grid_config(args, "table1_short", seed))
             for seed in args.seeds]
  return plan


def run_one(args, run: GridRun) -> bool:
  """Runs (or resumes) one grid run in this process. False where its loss became NaN
  or inf: recorded in the run directory (`diverged.json`) for the report."""
  from fsp_jax import train
  wd = os.path.abspath(args.workdir)
  t0 = time.time()
  log.info("=== %s (seed %d) ===", run.name, run.config.seed)
  try:
    train.run(run.config, os.path.join(wd, run.name))
  except FloatingPointError as e:
    if run.name.startswith(args.t1 + "_seed"):  # Table 1 may diverge (paper stage 1).
      log.warning("=== %s diverged: %s", run.name, e)
      with open(os.path.join(wd, run.name, DIVERGED), "w") as f:
        json.dump({"error": str(e)}, f)
      return False
    raise
  log.info("=== %s done in %.0f s", run.name, time.time() - t0)
  return True


def run_grid(args) -> None:
  """Runs (or resumes) every run of the grid, one at a time, in `grid_plan`'s order.

  Table 3 (ResNet-8 students, cheap) before Table 1, then its stage-1 ablations: on a
  small machine the cheap, most informative runs finish early. A run whose loss became
  NaN skips the runs that read it (the other seeds of its table share its stage 1).
  """
  failed = set()
  ablations_done = False
  for run in grid_plan(args):
    if not ablations_done and run.name.startswith(args.t1 + "_seed"):
      run_ablations(args)
      ablations_done = True
    if failed & set(run.after):
      failed.add(run.name)
      continue
    if not run_one(args, run):
      failed.add(run.name)
  if not ablations_done:
    run_ablations(args)


# A worker's exit status for a run whose loss became NaN or inf (recorded, not an error).
EXIT_DIVERGED = 3


def core_groups(jobs: int) -> List[Optional[List[int]]]:
  """The CPU cores of each of `jobs` parallel runs: the cores this process may use,
  split into `jobs` equal contiguous groups; [None] * jobs where the OS cannot pin
  processes to cores (not Linux)."""
  if not hasattr(os, "sched_getaffinity"):
    log.warning("this OS cannot pin processes to cores: the %d parallel runs share "
                "them all.", jobs)
    return [None] * jobs
  cores = sorted(os.sched_getaffinity(0))
  if jobs > len(cores):
    raise ValueError(f"--jobs {jobs} exceeds the {len(cores)} CPU cores this process "
                     f"may use; pass --jobs {len(cores)} or fewer.")
  per = len(cores) // jobs
  return [cores[k * per:(k + 1) * per] for k in range(jobs)]


def worker_command(argv: List[str], run: GridRun) -> List[str]:
  """The command of a --jobs worker: this script, the grid's flags, `--run NAME`."""
  return [sys.executable, os.path.abspath(__file__), *argv, "--jobs", "1",
          "--run", run.name]


def run_grid_parallel(args, argv: List[str], command=worker_command,
                      poll_s: float = 1.0) -> None:
  """Runs the grid's runs in `args.jobs` worker processes at a time, each pinned to
  its own share of the CPU cores, each run started once the runs it reads finished.

  Why: XLA:CPU spreads one CIFAR-sized step over two cores at about 65 % efficiency
  (ResNet-8: 550 images/s on two cores against 420 on one), so two runs on one core
  each do 1.2-1.5x the work of one run on two. Workers are this module again
  (`--run NAME`, every other flag the same); each logs to `WORKDIR/logs/NAME.log`.
  The stage-1 ablations, if any, run afterwards in this process. `command(argv, run)`
  gives a worker's command line (tests replace it).
  """
  import subprocess
  wd = os.path.abspath(args.workdir)
  logs = os.path.join(wd, "logs")
  os.makedirs(logs, exist_ok=True)
  slots = core_groups(args.jobs)
  pending = grid_plan(args)
  running = {}  # slot index -> (run, process, start time, log path)
  done, failed = set(), set()
  error = None
  try:
    while pending or running:
      for slot, cores in enumerate(slots):
        if slot in running or error:
          continue
        for run in list(pending):
          if failed & set(run.after):  # It reads a run that diverged.
            pending.remove(run)
            failed.add(run.name)
            log.warning("=== %s skipped: %s diverged", run.name,
                        ", ".join(sorted(failed & set(run.after))))
            continue
          if set(run.after) <= done:
            pending.remove(run)
            path = os.path.join(logs, run.name + ".log")
            # Pinned before Python starts, so XLA sizes its thread pool to these cores.
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
        break  # Nothing runs and nothing can start: every pending run was skipped.
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
          error = f"grid run {run.name} failed (exit status {rc}); its log: {path}"
          log.error("=== %s; stopping the others (they save a checkpoint first).", error)
          for _, other, _, _ in running.values():
            other.terminate()  # SIGTERM: training saves after the current step.
  except BaseException:  # Ctrl-C or a bug here: no worker outlives this process.
    for _, proc, _, _ in running.values():
      proc.terminate()
    for _, proc, _, _ in running.values():
      proc.wait()
    raise
  if error:
    raise RuntimeError(error + ". Run the same command again to resume.")
  if pending:
    raise RuntimeError(f"grid runs {[r.name for r in pending]} wait for runs that are "
                       "not in the grid: a bug in grid_plan.")
  run_ablations(args)


def collect_runs(args) -> Dict[str, Dict]:
  """{run name: results.json} of every grid run that has results (finished stages)."""
  wd = os.path.abspath(args.workdir)
  tables = dict.fromkeys((args.t1, args.t3) + TEACHER_SHORT_TABLES)
  names = ["teacher"] + [f"{t}_seed{s}" for t in tables for s in args.seeds]
  runs = {}
  for name in names:
    path = os.path.join(wd, name, "results.json")
    if os.path.exists(path):
      with open(path) as f:
        runs[name] = json.load(f)
  return runs


def finished(runs, table: str, stage: str, seeds) -> List[int]:
  """The seeds whose run of `table` has finished `stage`."""
  return [s for s in seeds if stage in runs.get(f"{table}_seed{s}", {})]


def ensemble_accuracy(args, table: str, stage: str, role: str, seeds) -> float:
  """Test accuracy of the averaged softmax of one stage's model over `seeds`."""
  wd = os.path.abspath(args.workdir)
  return ensemble_of([(grid_config(args, table, seed),
                       os.path.join(wd, f"{table}_seed{seed}")) for seed in seeds],
                     stage, role)


def ensemble_of(runs, stage: str, role: str) -> float:
  """Test accuracy of the averaged softmax of `stage`'s model over `runs` (config,
  run directory). Each model's test logits are computed once from its final
  checkpoint and kept beside it (`test_logits.npy`)."""
  from fsp_jax import checkpoints, stages, train
  probs, exp = 0.0, None
  for config, run_dir in runs:
    exp = stages.setup(config, run_dir)
    stage_dir = exp.stage_dir(stage)
    path = os.path.join(stage_dir, TEST_LOGITS)
    logits = _read_logits(path)
    if logits is None or logits.shape != (len(exp.dataset.test_labels),
                                          exp.networks[role].num_classes):
      variables, _ = checkpoints.restore_model(stage_dir,
                                               stages.abstract_variables(exp, role))
      logits = train.predict(exp.networks[role], variables, exp.dataset.test_images,
                             exp.mesh, config.eval_batch_size)
      # Renamed into place: a kill while writing leaves no half file.
      checkpoints.write_npy_atomic(path, logits)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs + e / e.sum(-1, keepdims=True)
  return float(np.mean(np.argmax(probs, -1) == exp.dataset.test_labels))


def _read_logits(path: str) -> Optional[np.ndarray]:
  """Cached test logits, or None where the file is missing or unreadable."""
  if not os.path.exists(path):
    return None
  try:
    return np.load(path)
  except (ValueError, OSError, EOFError):  # E.g. cut short by a kill.
    return None


def read_curve(stage_dir: str):
  """(steps, test accuracy %) of a stage's evaluations, step 0 excluded."""
  steps, accs = [], []
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "test_accuracy" in r:
        steps.append(r["step"])
        accs.append(100 * r["test_accuracy"])
  return np.asarray(steps), np.asarray(accs)


STAGE1_TITLE = {"_mean": ",\nelement-mean stage 1",
                "_meanlong": ",\nelement-mean stage 1 five times longer"}
PANELS = (("table3", (("student", "FSP student (ResNet-8)", "C0"),
                      ("scratch", "ResNet-8 from scratch", "C3")),
           "Table 3: network minimization (26 -> 8)"),
          ("table1", (("student", "FSP student (ResNet-26)", "C0"),
                      ("teacher_short", "ResNet-26 from scratch", "C3")),
           "Table 1: fast optimization (26 -> 26)"))


# Where Table 1's teacher_short runs may be (they do not depend on stage 1).
TEACHER_SHORT_TABLES = ("table1_mean", "table1", "table1_short")


def teacher_short_table(args, runs) -> str:
  """The first Table 1 variant of the workdir that has teacher_short runs."""
  return next((tb for tb in dict.fromkeys((args.t1,) + TEACHER_SHORT_TABLES)
               if finished(runs, tb, "teacher_short", args.seeds)), args.t1)


def plot(args, runs, out_path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  wd = os.path.abspath(args.workdir)
  variant = {"table1": args.t1, "table3": args.t3}
  panels = [(variant[t], lines, title + STAGE1_TITLE.get(variant[t][len(t):], ""))
            for t, lines, title in PANELS]
  panels = [p for p in panels if finished(runs, p[0], p[1][0][0], args.seeds)]
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  ts_table = teacher_short_table(args, runs)
  for ax, (table, lines, title) in zip(axes[0], panels):
    lines = [(table, stage, label, color) for stage, label, color in lines]
    if table == args.t3:  # The grid's stage 1 beside the ablations run for all seeds.
      # Colours other than the FSP student's (C0) and scratch's (C3).
      lines += [(("ablation", name), "student", f"FSP student, stage 1 '{name}'", color)
                for name, color in zip(args.ablation_seeds, ("C2", "C4", "C1", "C5", "C6"))]
    for source, stage, label, color in lines:
      if isinstance(source, tuple):  # ("ablation", name)
        dirs = [os.path.join(ablation_dir(args, source[1], s), stage)
                for s in args.seeds]
        dirs = [d for d in dirs if os.path.exists(os.path.join(d, "..", "results.json"))]
      else:
        if stage == "teacher_short":
          source = ts_table
        dirs = [os.path.join(wd, f"{source}_seed{s}", stage)
                for s in finished(runs, source, stage, args.seeds)]
      if not dirs:
        continue
      seeds = dirs
      curves = [read_curve(d) for d in dirs]
      n = min(len(c[0]) for c in curves)
      steps = curves[0][0][:n]
      accs = np.stack([c[1][:n] for c in curves])
      ax.plot(steps, accs.mean(0), "o-", color=color, ms=3,
              label=f"{label}, mean of {len(seeds)} seeds")
      ax.fill_between(steps, accs.min(0), accs.max(0), color=color, alpha=0.2)
    ax.set_xlabel("main-task iteration" + (
        f" (points before the last: {args.eval_examples:,} test images)"
        if args.eval_examples else ""))
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)


def _stats(values) -> str:
  v = 100 * np.asarray(values)
  if len(v) == 0:
    return "not run"
  std = v.std(ddof=1) if len(v) > 1 else 0.0
  return f"{v.mean():.2f} ± {std:.2f} (n={len(v)})"


def _versus_scratch(fsp, scratch) -> str:
  """The must-show verdict: FSP minus scratch (accuracies of the same seeds) against
  the larger of the two seed spreads."""
  gap = np.mean(fsp) - np.mean(scratch)
  spread = (max(np.std(fsp, ddof=1), np.std(scratch, ddof=1)) if len(fsp) > 1 else 0.0)
  return (f"FSP student minus scratch = {100 * gap:+.2f} points (mean of {len(fsp)}), "
          f"seed spread (largest std) {100 * spread:.2f}: " +
          ("**FSP beats scratch by more than the seed spread**." if gap > spread else
           "**FSP does not beat scratch by more than the seed spread**."))


def _accs(runs, table, stage, seeds):
  return np.asarray([runs[f"{table}_seed{s}"][stage]["test_accuracy"] for s in seeds])


def write_report(args, runs, wall_s: float, elapsed: Optional[Dict] = None) -> str:
  """The report's markdown. `wall_s`: the runs' own wall times, summed; `elapsed`:
  `{'elapsed_s', 'jobs'}` of the last grid command (ELAPSED), where known."""
  seeds = args.seeds
  t = runs["teacher"]["teacher"]
  steps_t = t["steps"]
  s1 = int(round(21000 * args.scale))
  s2 = int(round(21000 * args.scale))
  s3 = int(round(64000 * args.scale))
  t1 = args.t1  # The Table 1 runs: 'table1' (paper stage 1), 'table1_mean', ...
  t3 = args.t3  # The Table 3 runs, likewise.

  def stage_one_steps(table):
    first = runs.get(f"{table}_seed{seeds[0]}", {})
    return first["fsp"]["steps"] if "fsp" in first else s1
  s1_t1, s1_t3 = stage_one_steps(t1), stage_one_steps(t3)
  ts_table = teacher_short_table(args, runs)

  def src(tb, st):
    return ts_table if (tb, st) == (t1, "teacher_short") else tb
  done = {(tb, st): finished(runs, src(tb, st), st, seeds)
          for tb in (t1, t3) for st in ("student", "scratch", "teacher_short")}
  ens = {}
  for tb, st, role in ((t1, "student", "student"), (t1, "teacher_short", "teacher"),
                       (t3, "student", "student"), (t3, "scratch", "student")):
    ens[(tb, st)] = (
        f"{100 * ensemble_accuracy(args, src(tb, st), st, role, done[(tb, st)]):.2f}"
        if len(done[(tb, st)]) > 1 else "–")
  acc = {k: _accs(runs, src(*k), k[1], v) for k, v in done.items()}
  f1, ts = acc[(t1, "student")], acc[(t1, "teacher_short")]
  f3, sc = acc[(t3, "student")], acc[(t3, "scratch")]
  lines = [
      "# FSP distillation on real CIFAR-10, scaled down",
      "",
      f"Command: `{(elapsed or {}).get('command', args.command)}`",
      "",
      f"Scale factor **{args.scale}** on every iteration count and learning-rate drop of "
      f"the paper (teacher {steps_t} of 64k iterations, stage 1 {s1} of 21k"
      + (" unless a table's stage 1 below is five times longer"
         if any(tb.endswith("_meanlong") for tb in (t1, t3)) else "")
      + ", Table 1 "
      f"stage 2 {s2} of 21k, Table 3 stage 2 {s3} of 64k); batch 128, SGD momentum 0.9, "
      "weight decay 1e-4, pad-4 random crops, the paper's learning rates (stage 1: 1e-3 "
      "with Eq. 2's sum) unless a table's stage 1 says otherwise below. "
      "Data: the shared JPEG re-encoding of CIFAR-10 (50k train / 10k test; lossy, so "
      "absolute numbers sit a little below the original's). Seeds "
      f"{', '.join(map(str, seeds))}; one teacher, and one stage-1 result per table "
      "shared by the seeds (the paper's Algorithm 1); seeds change the initialisation "
      "of the scratch runs and the data order of every main-task run. "
      + (f"Wall time of the command: **{elapsed['elapsed_s'] / 60:.1f} min** "
         f"(its last invocation; {elapsed['jobs']} run(s) at a time, each on its share "
         "of the cores); the runs' own times add up to "
         if elapsed else "Wall time of the runs: ")
      + f"**{wall_s / 60:.1f} min**, on a machine with {os.cpu_count()} CPU cores"
      + (f", {args.note}" if args.note else "") + ".",
      "",
      "## Table 3: network minimization (ResNet-26 -> ResNet-8)",
      "",
      "| run | iterations | accuracy %, mean ± std | ensemble % | paper |",
      "|---|---|---|---|---|",
      f"| teacher ResNet-26 | {steps_t} | {100 * t['test_accuracy']:.2f} (1 net) | – | "
      f"{PAPER['table3']['teacher']} |",
      f"| ResNet-8 from scratch | {s3} | {_stats(sc)} | {ens[(t3, 'scratch')]} | "
      f"{PAPER['table3']['scratch']} |",
      f"| FSP student ResNet-8 | {s1_t3} (stage 1) + {s3} | {_stats(f3)} | "
      f"{ens[(t3, 'student')]} | {PAPER['table3']['student']} |",
      "",
      "Per seed (FSP / scratch): " + ", ".join(
          f"seed {s}: {100 * a:.2f} / {100 * b:.2f}"
          for s, a, b in zip(done[(t3, "student")], f3, sc)),
      "",
      "## Table 1: fast optimization (ResNet-26 -> ResNet-26)",
      "",
      "| run | iterations | accuracy %, mean ± std | ensemble % | paper avg | paper ensemble |",
      "|---|---|---|---|---|---|",
      f"| teacher | {steps_t} | {100 * t['test_accuracy']:.2f} (1 net) | – | "
      f"{PAPER['table1']['teacher']} | {PAPER['table1']['teacher_ens']} |",
      f"| teacher arch., 1/3 of the iterations | {s2} | {_stats(ts)} | "
      f"{ens[(t1, 'teacher_short')]} | {PAPER['table1']['teacher_short']} | "
      f"{PAPER['table1']['teacher_short_ens']} |",
      f"| FSP student: stage 1 shared + stage 2 | {s1_t1} + {s2} | {_stats(f1)} | "
      f"{ens[(t1, 'student')]} | {PAPER['table1']['student']} | "
      f"{PAPER['table1']['student_ens']} |",
      "",
      "![accuracy against main-task iteration](accuracy_vs_iteration.png)",
      "",
      *([f"The curves' points before the last are on a fixed random "
         f"{args.eval_examples:,} of the 10,000 test images (binomial std. about "
         f"{100 * (0.25 / args.eval_examples) ** 0.5:.1f} points at 50 %); every "
         "accuracy in the tables is on all 10,000.", ""]
        if args.eval_examples else []),
      "## What it shows",
      "",
  ]
  bad = os.path.join(os.path.abspath(args.workdir), f"table1_seed{seeds[0]}", DIVERGED)
  if os.path.exists(bad):
    with open(bad) as f:
      error = json.load(f)["error"].split(";")[0]
    lines.append(f"- Table 1 with the paper's stage 1 (Eq. 2's sum, LR 1e-3) diverged: "
                 f"{error}." + (" The Table 1 rows above use the element-mean loss at "
                                f"stage-1 LR {ELEMENT_MEAN_LRS[0]} instead "
                                f"(`--table1_stage1 {args.table1_stage1}`)."
                                if t1 != "table1"
                                else ""))
  elif t1 != "table1":
    lines.append("- Table 1 uses the element-mean FSP loss at stage-1 LR "
                 f"{ELEMENT_MEAN_LRS[0]} (`--table1_stage1 {args.table1_stage1}`).")
  if t1 == "table1_meanlong":
    lines.append(f"- Table 1's stage 1 is five times the scaled length ({s1_t1} "
                 f"iterations); its teacher_short rows are the runs of {ts_table} (they "
                 "do not depend on stage 1).")
  if t3 != "table3":
    lines.append("- Table 3 uses the element-mean FSP loss at stage-1 LR "
                 f"{ELEMENT_MEAN_LRS[0]} (`--table3_stage1 {args.table3_stage1}`)" +
                 (f", stage 1 five times the scaled length ({s1_t3} iterations)"
                  if t3 == "table3_meanlong" else "") + ".")
  if len(f3) and len(sc):
    n = min(len(f3), len(sc))
    lines.append("- Minimization: " + _versus_scratch(f3[:n], sc[:n]))
  if len(f1) and len(ts):
    gap = f1.mean() - ts.mean()
    lines.append(
        f"- Fast optimization: FSP student at 1/3 of the iterations {100 * f1.mean():.2f}% "
        f"vs the teacher architecture trained for those iterations {100 * ts.mean():.2f}% "
        f"({100 * gap:+.2f}): " + ("**reaches at least its accuracy**." if gap >= 0
                                    else "**does not reach it**."))
  expected = {t3: ("student", "scratch"), t1: ("student", "teacher_short")}
  missing = [f"{tb} {st} seed {s}" for tb, sts in expected.items() for st in sts
             for s in seeds if s not in done[(tb, st)]]
  if missing:
    lines.append("- Not finished in this session's time (a rerun of the same command "
                 "resumes and completes them): " + ", ".join(missing) + ".")
  return "\n".join(lines) + "\n"


def _curve_at(curve, step):
  steps, accs = curve
  hit = accs[steps == step]
  return f"{hit[0]:.2f}" if len(hit) else "–"


def ablation_section(args, runs) -> List[str]:
  """The report's table of Table 3 stage-1 ablations that have finished."""
  wd = os.path.abspath(args.workdir)
  seed = args.seeds[0]
  base = runs.get(f"{args.t3}_seed{seed}", {})
  rows = []
  if "student" in base:
    rows.append((f"{args.table3_stage1} (the grid's seed-0 run)", f"{args.t3}_seed{seed}"))
  diverged = []
  for name, (label, _) in ABLATIONS.items():
    path = os.path.join(wd, f"ablation_{name}", "results.json")
    bad = os.path.join(wd, f"ablation_{name}", DIVERGED)
    if os.path.exists(bad) and not os.path.exists(path):
      with open(bad) as f:
        error = json.load(f)["error"]
      steps = ablation_config(args, name).fsp.schedule.num_steps * args.scale
      diverged.append(f"| {label} | {int(round(steps))} | diverged: "
                      f"{error.split(';')[0].split('] ')[-1]} | – | – | – |")
    elif os.path.exists(path):
      with open(path) as f:
        runs[f"ablation_{name}"] = json.load(f)
      rows.append((label, f"ablation_{name}"))
  if not rows:
    return []
  total = int(round(64000 * args.scale))
  marks = [total // 4, total // 2, total]
  head = " / ".join(f"@{m}" for m in marks)
  lines = [
      "## Stage-1 ablations (Table 3, ResNet-26 -> ResNet-8, seed 0)",
      "",
      f"One change each to the grid's Table 3 stage 1 (`{args.table3_stage1}`); stage 2 "
      "and the scratch baseline as in the grid. "
      "`kernel norm x` is the norm of all the student's convolution kernels after stage 1 "
      "over their initial norm: the kernels feed batch norm, so the next stage's "
      "effective learning rate is divided by its square.",
      "",
      f"| stage 1 | steps | test FSP loss | kernel norm x | student acc. % {head} | "
      "minus scratch |",
      "|---|---|---|---|---|---|",
  ]
  scratch = base.get("scratch", {}).get("test_accuracy")
  if scratch is not None:
    sc_curve = read_curve(os.path.join(wd, f"{args.t3}_seed{seed}", "scratch"))
    lines.append("| none: ResNet-8 from scratch | – | – | 1.00 | " +
                 " / ".join(_curve_at(sc_curve, m) for m in marks) + " | – |")
  for label, run_name in rows:
    r = runs[run_name]
    if "student" not in r:
      continue
    curve = read_curve(os.path.join(wd, run_name, "student"))
    growth = kernel_norm_growth(args, run_name)
    delta = (f"{100 * (r['student']['test_accuracy'] - scratch):+.2f}"
             if scratch is not None else "–")
    stage_one = r.get("fsp", base.get("fsp"))  # renorm_kernels: the grid's stage 1.
    lines.append(f"| {label} | {stage_one['steps']} | {stage_one['test_fsp_loss']:.4g} | "
                 f"{growth:.2f} | " + " / ".join(_curve_at(curve, m) for m in marks) +
                 f" | {delta} |")
  return lines + diverged + [""] + ablation_seeds_section(args, runs)


def ablation_seeds_section(args, runs) -> List[str]:
  """Table 3 again for each of `--ablation_seeds`: FSP students with its stage 1, over
  all seeds."""
  return [line for name in args.ablation_seeds
          for line in _ablation_seeds_table(args, runs, name)]


def _ablation_seeds_table(args, runs, name: str) -> List[str]:
  seeds = [s for s in args.seeds if os.path.exists(
      os.path.join(ablation_dir(args, name, s), "results.json"))]
  scratch_seeds = finished(runs, args.t3, "scratch", args.seeds)
  if len(seeds) < 2 or len(scratch_seeds) < 2:
    return []
  accs = []
  for seed in seeds:
    with open(os.path.join(ablation_dir(args, name, seed), "results.json")) as f:
      accs.append(json.load(f)["student"]["test_accuracy"])
  accs = np.asarray(accs)
  sc = _accs(runs, args.t3, "scratch", scratch_seeds)
  ens = ensemble_of([(ablation_config(args, name, s), ablation_dir(args, name, s))
                     for s in seeds], "student", "student")
  sc_ens = ensemble_accuracy(args, args.t3, "scratch", "student", scratch_seeds)
  total = int(round(64000 * args.scale))
  stage_one = int(round(ablation_config(args, name).fsp.schedule.num_steps * args.scale))
  return [
      f"## Table 3 with the stage 1 `{name}`, all seeds",
      "",
      f"{ABLATIONS[name][0]}; one stage-1 result ({stage_one} iterations, seed "
      f"{args.seeds[0]}) shared by the seeds, as in the grid.",
      "",
      "| run | iterations | accuracy %, mean ± std | ensemble % | paper |",
      "|---|---|---|---|---|",
      f"| ResNet-8 from scratch (the grid's) | {total} | {_stats(sc)} | "
      f"{100 * sc_ens:.2f} | {PAPER['table3']['scratch']} |",
      f"| FSP student ResNet-8 | {stage_one} (stage 1) + {total} | {_stats(accs)} | "
      f"{100 * ens:.2f} | {PAPER['table3']['student']} |",
      "",
      "Per seed (FSP / scratch): " + ", ".join(
          f"seed {s}: {100 * a:.2f} / {100 * b:.2f}" for s, a, b in zip(seeds, accs, sc)),
      "",
      "- " + _versus_scratch(accs, sc),
      "",
  ]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("--data_root", default="/tmp/cifar10",
                      help="CIFAR-10 image folder (ROOT/train/<class>, ROOT/test/<class>);"
                           " '' loads tfds cifar10 instead.")
  parser.add_argument("--scale", type=float, default=0.02)
  parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")],
                      default=[0, 1, 2])
  parser.add_argument("--workdir", default="runs/reproduce")
  parser.add_argument("--report_dir", default="docs/reproduction")
  parser.add_argument("--curve_points", type=int, default=8)
  parser.add_argument("--eval_examples", type=int, default=2000,
                      help="Test examples (a fixed random subset) of the evaluations "
                           "during a run, the accuracy curves' points before the last; "
                           "every final accuracy takes all 10,000. 0: all, every time.")
  parser.add_argument("--log_every", type=int, default=50)
  parser.add_argument("--table1_stage1", choices=tuple(STAGE1_SUFFIX),
                      default="paper",
                      help="Table 1's stage 1: the paper's (Eq. 2's sum, LR 1e-3) or the "
                           "re-implementations' element-mean loss at LR 0.05, or that "
                           "with a stage 1 five times longer.")
  parser.add_argument("--table3_stage1", choices=tuple(STAGE1_SUFFIX), default="paper",
                      help="Table 3's stage 1, as --table1_stage1; the ablations "
                           "change this stage 1.")
  parser.add_argument("--ablations", type=lambda s: [x for x in s.split(",") if x],
                      default=None,
                      help="Table 3 stage-1 ablations to run (comma-separated; '' none; "
                           "default all with --table3_stage1 paper, else none): "
                           + ", ".join(ABLATIONS))
  parser.add_argument("--ablation_seeds", type=lambda s: [x for x in s.split(",") if x],
                      default=None,
                      help="Ablations to run for every seed too (comma-separated; their "
                           "students start from their first seed's stage 1), each "
                           "reported as Table 3 again; '' none (default mean_lr_0.05_x5 "
                           "with --table3_stage1 paper, else none).")
  parser.add_argument("--note", default="",
                      help="Appended to the report's wall-time sentence, e.g. 'shared "
                           "with other jobs while it ran'.")
  parser.add_argument("--ablations_only", action="store_true",
                      help="Run only --ablations (the grid's teacher and Table 3 seed-0 "
                           "runs must have finished), then write the report.")
  parser.add_argument("--report_only", action="store_true",
                      help="Write the report from the runs finished so far; train nothing.")
  parser.add_argument("--jobs", type=int, default=1,
                      help="Grid runs at a time, each in its own process pinned to its "
                           "share of the CPU cores (on a CPU machine, one per core is "
                           "fastest: 2 on 2 cores); 1 runs them one after another in "
                           "this process (on a GPU or TPU).")
  parser.add_argument("--run", default="",
                      help="Run only this grid run (e.g. 'teacher', 'table3_seed1'), "
                           "in this process, and write no report: what each --jobs "
                           "worker does.")
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  if args.jobs < 1:
    parser.error(f"--jobs must be at least 1; got {args.jobs}.")
  args.t1 = "table1" + STAGE1_SUFFIX[args.table1_stage1]
  args.t3 = "table3" + STAGE1_SUFFIX[args.table3_stage1]
  paper_t3 = args.t3 == "table3"
  if args.ablations is None:
    args.ablations = list(ABLATIONS) if paper_t3 else []
  if args.ablation_seeds is None:
    args.ablation_seeds = ["mean_lr_0.05_x5"] if paper_t3 else []
  unknown = set(args.ablations + args.ablation_seeds) - set(ABLATIONS)
  if unknown:
    parser.error(f"unknown ablations {sorted(unknown)}; choose from {list(ABLATIONS)}.")
  args.command = "python experiments/reproduce.py " + " ".join(
      f"--{k} {shlex.quote(','.join(map(str, v)) if isinstance(v, list) else str(v))}"
      for k, v in vars(args).items()
      if k not in ("command", "report_only", "ablations_only", "t1", "t3", "run"))
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("fsp_jax").setLevel(logging.INFO)
  if args.run:  # A --jobs worker: one run, no report.
    plan = {run.name: run for run in grid_plan(args)}
    if args.run not in plan:
      parser.error(f"--run {args.run!r} is not a run of this grid; its runs: "
                   f"{', '.join(plan)}.")
    sys.exit(0 if run_one(args, plan[args.run]) else EXIT_DIVERGED)
  t0 = time.time()
  if args.ablations_only:
    run_ablations(args)
  elif not args.report_only:
    if args.jobs > 1:
      run_grid_parallel(args, [a for a in argv if a != "--report_only"])
    else:
      run_grid(args)
    with open(os.path.join(os.path.abspath(args.workdir), ELAPSED), "w") as f:
      json.dump({"elapsed_s": round(time.time() - t0, 1), "jobs": args.jobs,
                 "command": args.command}, f)
  runs = collect_runs(args)
  # The grid's own runs: the teacher, Table 3 and the Table 1 variant reported.
  ts = teacher_short_table(args, runs)
  used = [("teacher", None)] + [(f"{t}_seed{s}", None) for t in (args.t3, args.t1)
                                for s in args.seeds]
  if ts != args.t1:  # Only its teacher_short stages are this grid's.
    used += [(f"{ts}_seed{s}", "teacher_short") for s in args.seeds]
  wall = sum(r.get("wall_time_s", 0.0) for name, only in used
             for stage, r in runs.get(name, {}).items() if only in (None, stage))
  os.makedirs(args.report_dir, exist_ok=True)
  elapsed = None
  elapsed_path = os.path.join(os.path.abspath(args.workdir), ELAPSED)
  if os.path.exists(elapsed_path):
    with open(elapsed_path) as f:
      elapsed = json.load(f)
  with open(os.path.join(args.report_dir, "results.json"), "w") as f:
    json.dump({"scale": args.scale, "seeds": args.seeds, "wall_time_s": wall,
               "command": elapsed, "runs": runs}, f, indent=1)
  plot(args, runs, os.path.join(args.report_dir, "accuracy_vs_iteration.png"))
  report = write_report(args, runs, wall, elapsed)
  report += "\n" + "\n".join(ablation_section(args, runs))
  findings = os.path.relpath(os.path.join(REPO, "docs", "reproduction", "findings.md"),
                             os.path.abspath(args.report_dir))
  report += ("\nThe interpretation of these numbers, written by hand: "
             f"[findings.md]({findings}).\n")
  with open(os.path.join(args.report_dir, "report.md"), "w") as f:
    f.write(report)
  print(report)


if __name__ == "__main__":
  main()
