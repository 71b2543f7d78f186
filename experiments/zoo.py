"""The distiller zoo's table: every method on one CIFAR-10 teacher, one schedule.

    python experiments/zoo.py --data_root /tmp/cifar10 --scale 0.007 \
        --teacher_scale 0.05 --jobs 2 --workdir runs/zoo --report_dir docs/zoo

One teacher ResNet-26 (cifar10_teacher's schedule times --teacher_scale), then a
ResNet-8 student for each row (`ROWS`: scratch, every method of `cifar10_zoo`, and
FSP with the element-mean stage 1 of docs/reproduction), 3 seeds side by side in one
program per row, the main task on Table 3's schedule times --scale for every row (a
method's stage 1 first, on its own schedule at the same scale). Each row is one run
directory of WORKDIR (`python -m fsp_jax.main`'s): rerunning the command resumes,
and redoes nothing finished. With --jobs 2 two rows run at a time, each on one core.

Writes `report.md`, `results.json` and `accuracy_vs_iteration.png` to --report_dir;
`--bench FILE` (the JSON of `benchmarks/bench.py --methods zoo`) adds each step's
cost. `--report_only` rewrites the report from what has finished.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reproduce  # noqa: E402  (experiments/reproduce.py: the grid's runner)

log = logging.getLogger("fsp_jax")

ROWS = ("scratch", "kd", "fitnet", "fsp", "fsp_mean", "at", "sp", "pkt", "rkd", "nst",
        "cc", "vid", "ab", "ft", "crd", "crd+kd", "dkd")
# fsp_mean: FSP whose stage 1 takes the mean over each matrix's entries (the PyTorch
# re-implementations' loss), at their learning rate (docs/reproduction/findings.md).
FSP_MEAN = {"fsp.reduction": "mean", "fsp.schedule.learning_rates": (0.05, 0.005, 5e-4)}
# Published CIFAR-100 top-1 (%), another data set and scale: RepDistiller's README and
# the CRD paper (Tian et al. 2020, Table 1; CRD+KD), DKD: mdistiller's README.
# (resnet32x4 -> resnet8x4, resnet56 -> resnet20).
PUBLISHED = {"scratch": (72.50, 69.06), "kd": (73.33, 70.66), "fitnet": (73.50, 69.21),
             "at": (73.44, 70.55), "sp": (72.94, 69.67), "cc": (72.97, 69.63),
             "vid": (73.09, 70.38), "rkd": (71.90, 69.61), "pkt": (73.64, 70.34),
             "ab": (73.17, 69.47), "ft": (72.86, 69.84), "fsp": (72.62, 69.95),
             "nst": (73.30, 69.60), "crd": (75.51, 71.16), "crd+kd": (75.46, 71.63),
             "dkd": (76.32, 71.97)}
PUBLISHED_TEACHER = (79.42, 72.34)


# Why a method's step costs what it does beyond KD's (the teacher's forward pass and
# the student's step, which every method has), where that is over 1.25x.
COST_NOTES = {
    "crd": "scoring every example against the other side's memory bank. With N = "
           "50,000 training examples under 8 x (16384 + 1), each side is one B x N x 128 "
           "product and its gradient, every row weighted by how often it was drawn (no "
           "gather of B x 16385 rows of 128 floats forward, no scatter of their "
           "gradients backward: that form cost ~1.55x KD's step). Each positive is "
           "scored from its own bank row and the draws are counted by one float32 "
           "scatter-add (before: picked out of the B x N scores, counted in int32; "
           "side by side, 4 methods taking turns, 2 rounds: 1.42x and 1.45x KD's step "
           "before, 1.26x and 1.36x after). What is left, profiled term by term on one "
           "seed: the two bank products and their gradients (~12 ms each), their "
           "elementwise terms over B x N scores, drawing B x 16384 negatives and "
           "counting them; 16384 negatives are the paper's, so this cost is the "
           "method's on a CPU. crd+kd adds KD's term to it.",
    "vid": "three 1x1 convolutions per section and their gradients on every section's "
           "output at full resolution (131,072 positions x 16 channels in the first "
           "section at B = 128), computed as products of (B H W, C) matrices (on the "
           "4-D maps: 1.22x and 1.24x KD's step side by side, as matrices 1.08x and "
           "1.09x).",
    "nst": "three C x C polynomial kernels per section over every position at full "
           "resolution, on the maps' own (B, H W, C) layout with a gradient that needs "
           "no transpose of a whole map (before: 1.09x and 1.08x KD's step side by "
           "side, after 1.03x and 1.03x).",
}


def row_method(row: str) -> Optional[str]:
  """The `config.methods` entry of a row (None: scratch)."""
  return {"scratch": None, "fsp_mean": "fsp"}.get(row, row)


def row_stage(row: str) -> str:
  """The results key of a row's main-task stage."""
  from fsp_jax import methods
  method = row_method(row)
  return "scratch" if method is None else methods.get(method).student_stage


def row_config(row: str, args):
  """The row's config: cifar10_zoo with this row's method alone (scratch: the
  baseline alone), the grid's data, seeds, scale and evaluations."""
  config = reproduce._config("cifar10_zoo", args)
  method = row_method(row)
  config.methods = () if method is None else (method,)
  config.baselines = ("scratch",) if method is None else ()
  if row == "fsp_mean":
    for key, value in FSP_MEAN.items():
      node = config
      *path, last = key.split(".")
      for p in path:
        node = node[p]
      node[last] = value
  if method is not None:
    config.teacher.checkpoint = os.path.join(os.path.abspath(args.workdir), "teacher",
                                             "teacher")
  config.student.schedule.eval_every = reproduce._eval_every(
      config.student.schedule, args.scale, args.curve_points)
  return config


def grid_plan(args) -> List[reproduce.GridRun]:
  """The teacher first, then every row. Scratch reads nothing, but waits for the
  teacher too: alone, the teacher trains on every core (a two-core run goes ~1.4x the
  speed of a one-core run beside another, and every other row waits on it), where
  beside scratch it would hold one core for its whole run."""
  teacher = reproduce._config("cifar10_teacher", args)
  teacher.schedule_scale = args.teacher_scale
  teacher.teacher.schedule.eval_every = reproduce._eval_every(
      teacher.teacher.schedule, args.teacher_scale, args.curve_points)
  plan = [reproduce.GridRun("teacher", teacher)]
  for row in args.rows:
    plan.append(reproduce.GridRun(row.replace("+", "_"), row_config(row, args),
                                  ("teacher",)))
  return plan


INVOCATIONS = "zoo_invocations.json"  # Each command's wall time (a rerun resumes).


def read_invocations(workdir: str) -> List[Dict[str, Any]]:
  path = os.path.join(workdir, INVOCATIONS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def record_invocation(workdir: str, jobs: int, command: str, stop: threading.Event,
                      every_s: float = 30.0) -> None:
  """Keeps this invocation's wall time in WORKDIR/zoo_invocations.json, rewritten every
  `every_s` and when `stop` is set: a killed command leaves what it had run."""
  previous, t0 = read_invocations(workdir), time.time()
  while True:
    done = stop.wait(every_s)
    entry = {"elapsed_s": round(time.time() - t0, 1), "jobs": jobs, "command": command,
             "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0)),
             "finished": done}
    path = os.path.join(workdir, INVOCATIONS)
    with open(path + ".tmp", "w") as f:
      json.dump(previous + [entry], f, indent=1)
    os.replace(path + ".tmp", path)
    if done:
      return


def worker_command(argv: List[str], run: reproduce.GridRun) -> List[str]:
  return [sys.executable, os.path.abspath(__file__), *argv, "--jobs", "1", "--run",
          run.name]


# ---- the report -----------------------------------------------------------------
def _dir(row: str) -> str:
  return row.replace("+", "_")


def row_result(workdir: str, row: str) -> Optional[Dict[str, Any]]:
  from fsp_jax import metrics
  return metrics.read_results(os.path.join(workdir, _dir(row))).get(row_stage(row))


def seed_curves(workdir: str, row: str) -> Dict[int, np.ndarray]:
  """`{seed: (K, 2) (step, test accuracy)}` of a row's main-task evaluations."""
  from fsp_jax import plots
  run_dir = os.path.join(workdir, _dir(row))
  if not os.path.isdir(os.path.join(run_dir, row_stage(row))):
    return {}
  return plots.seed_curves(run_dir, row_stage(row), "test_accuracy")


def summarise(workdir: str, rows, bench: Optional[Dict] = None) -> Dict[str, Dict]:
  """`{row: {seeds, mean, std, ensemble, best_eval, last_eval, step_time_ratio,
  weight, ...}}` (accuracies in %) of every finished row."""
  from fsp_jax import config_lib, methods
  config = config_lib.load("cifar10_zoo")
  steps = (bench or {}).get("steps", {})
  scratch_ms = steps.get("scratch", {}).get("ms_per_step")
  out = {}
  for row in rows:
    r = row_result(workdir, row)
    if r is None:
      continue
    seeds = [100 * s["test_accuracy"] for s in r.get("per_seed", [r])]
    curves = seed_curves(workdir, row)
    entry = {"seeds": [round(a, 2) for a in seeds],
             "mean": round(float(np.mean(seeds)), 2),
             "std": round(float(np.std(seeds, ddof=1)), 2) if len(seeds) > 1 else 0.0,
             "ensemble": (round(100 * r["ensemble_test_accuracy"], 2)
                          if "ensemble_test_accuracy" in r else None),
             "best_eval": (round(100 * float(np.mean([c[:, 1].max() for c in
                                                      curves.values()])), 2)
                           if curves else None),
             "last_eval": round(float(np.mean(seeds)), 2),
             "steps": r["steps"], "wall_time_min": round(r["wall_time_s"] / 60, 1)}
    method = row_method(row)
    main_ms = steps.get(row_stage(row), {}).get("ms_per_step")
    entry["weight"] = None
    if method is not None:
      m = methods.get(method)
      entry["weight"] = weight_of(config, m)
      one = steps.get(m.stage_one_name, {}).get("ms_per_step") if m.stage_one else None
      if one and scratch_ms:
        entry["stage_one_step_time_ratio"] = round(one / scratch_ms, 3)
    if scratch_ms and main_ms:
      entry["step_time_ratio"] = round(main_ms / scratch_ms, 3)
    out[row] = entry
  return out


def weight_of(config, method) -> str:
  """The method's weights as the config's defaults give them ('' where none)."""
  names = ("weight", "beta", "alpha", "distance_weight", "angle_weight")
  parts = []
  for section in dict.fromkeys([method.section] + [o.section for o in method.objectives]):
    sec = config.get(section)
    if sec is None:
      continue
    parts += [f"{section}.{k} {sec[k]:g}" for k in names if k in sec]
  return ", ".join(parts)


def _ranks(values: Dict[str, float]) -> Dict[str, float]:
  """Rank 1 = highest value; ties share their mean rank."""
  order = sorted(values, key=lambda k: -values[k])
  ranks = {}
  i = 0
  while i < len(order):
    j = i
    while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
      j += 1
    for k in order[i:j + 1]:
      ranks[k] = (i + j) / 2 + 1
    i = j + 1
  return ranks


def spearman(a: Dict[str, float], b: Dict[str, float]) -> float:
  """Spearman's rank correlation of two scores over the keys they share."""
  keys = sorted(set(a) & set(b))
  ra = _ranks({k: a[k] for k in keys})
  rb = _ranks({k: b[k] for k in keys})
  x = np.array([ra[k] for k in keys]) - np.mean([ra[k] for k in keys])
  y = np.array([rb[k] for k in keys]) - np.mean([rb[k] for k in keys])
  return float(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)))


def ranking(table: Dict[str, Dict]) -> Dict[str, Any]:
  """fsp_jax's order of the finished rows beside the published CIFAR-100 order (rows
  with a published number): ranks, Spearman's rho per published column, the rows
  within one standard error of the mean of scratch, and each row's rank shift."""
  ours = {r: t["mean"] for r, t in table.items() if r in PUBLISHED}
  out: Dict[str, Any] = {"rows": sorted(ours, key=lambda r: -ours[r])}
  if len(ours) < 3:
    return out
  mine = _ranks(ours)
  for col, name in enumerate(("resnet32x4->resnet8x4", "resnet56->resnet20")):
    pub = {r: PUBLISHED[r][col] for r in ours}
    theirs = _ranks(pub)
    out[name] = {"spearman": round(spearman(ours, pub), 3),
                 "shift": {r: theirs[r] - mine[r] for r in ours}}
  if "scratch" in table:
    s = table["scratch"]
    out["scratch"] = s["mean"]
    out["not_above_scratch"] = [r for r in out["rows"] if r != "scratch"
                                and table[r]["mean"] - s["mean"]
                                < (table[r]["std"] + s["std"]) / math.sqrt(3)]
  return out


def ranking_lines(table: Dict[str, Dict]) -> List[str]:
  """The report's section on fsp_jax's order against the published one."""
  rank = ranking(table)
  if "resnet32x4->resnet8x4" not in rank:
    return []
  a, b = rank["resnet32x4->resnet8x4"], rank["resnet56->resnet20"]
  lines = ["", "## The ranking beside the published one", "",
           "fsp_jax's order (mean of 3 seeds, CIFAR-10): "
           + " > ".join(f"{r} {table[r]['mean']:.2f}" for r in rank["rows"]) + ".", "",
           f"Spearman's rank correlation with the published CIFAR-100 order: "
           f"**{a['spearman']:+.2f}** (resnet32x4 -> resnet8x4), **{b['spearman']:+.2f}** "
           f"(resnet56 -> resnet20), over the {len(rank['rows'])} rows both have.", ""]
  moved = sorted(a["shift"], key=lambda r: -abs(a["shift"][r]))[:5]
  lines += ["Largest moves against resnet32x4 -> resnet8x4 (published rank minus "
            "fsp_jax's; positive: higher here): "
            + ", ".join(f"{r} {a['shift'][r]:+g}" for r in moved) + ".", ""]
  if "not_above_scratch" in rank:
    lines += [f"Not above scratch by more than the two rows' standard errors "
              f"(std / sqrt 3) summed: "
              + (", ".join(rank["not_above_scratch"]) or "none") + "."]
  steps = table.get("scratch", {}).get("steps")
  lines += ["", "What differs from the published setting, each a reason for the order to "
            "move:",
            "- **Data**: CIFAR-10's 10 classes, not CIFAR-100's 100. The logit terms (KD, "
            "DKD, the KD of CRD+KD) pass on the teacher's probabilities over the other "
            "classes: with 9 other classes instead of 99 there is less of that to pass on, "
            "and the feature terms' share of what a student can learn grows.",
            f"- **Schedule**: each student trains {steps or '?'} iterations (Table 3's "
            "main task scaled to fit the table in 3 hours on 2 CPU cores), not 240 "
            "epochs. A short schedule rewards what speeds early optimisation (the paper's "
            "point for FSP; stage-1 methods start from a student already shaped by "
            "stage 1) and under-serves terms that act late or slowly (CRD's bank, filled "
            "one batch per step, holds each example as often as this schedule has visited it).",
            "- **Models**: ResNet-26 -> ResNet-8 at 16/32/64 channels (the FSP paper's "
            "CIFAR ResNets), not resnet32x4 -> resnet8x4 (4x wider) or resnet56 -> "
            "resnet20; a thin student has less capacity to copy the teacher's maps.",
            "- **Weights**: every method at RepDistiller's (DKD: mdistiller's) CIFAR-100 "
            "default, untuned here.",
            "- **Statistics**: the published cells are best-epoch accuracies of one to "
            "five runs; here the last evaluation, mean and std of 3 seeds trained side by "
            "side. Rows closer than about two standard deviations are a tie, not an "
            "order."]
  return lines


def plot(workdir: str, rows, path: str) -> bool:
  """Test accuracy against iteration: every row's mean over its seeds."""
  from fsp_jax import plots
  plt = plots._pyplot()
  fig, ax = plt.subplots(figsize=(10, 6))
  drawn = False
  cmap = plt.get_cmap("tab20")
  for k, row in enumerate(rows):
    curves = seed_curves(workdir, row)
    if not curves:
      continue
    n = min(len(c) for c in curves.values())
    steps = next(iter(curves.values()))[:n, 0]
    mean = np.mean([c[:n, 1] for c in curves.values()], axis=0)
    ax.plot(steps, 100 * mean, marker=".", lw=1.5 if row != "scratch" else 2.5,
            color="k" if row == "scratch" else cmap(k % 20), label=row)
    drawn = True
  ax.set_xlabel("iteration (main task)")
  ax.set_ylabel("test accuracy (%), mean of the seeds")
  ax.grid(alpha=0.3)
  if drawn:
    ax.legend(ncol=3, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
  plt.close(fig)
  return drawn


def _pct(value) -> str:
  return "-" if value is None else f"{value:.2f}"


def write(args, command: str) -> str:
  """Writes report.md, results.json and the plot to --report_dir; returns report.md."""
  from fsp_jax import metrics
  wd = os.path.abspath(args.workdir)
  os.makedirs(args.report_dir, exist_ok=True)
  bench = None
  if args.bench:
    with open(args.bench) as f:
      bench = json.loads(f.read().strip().splitlines()[-1])
  table = summarise(wd, args.rows, bench)
  with open(os.path.join(args.report_dir, "results.json"), "w") as f:
    json.dump(table, f, indent=1)
  teacher = metrics.read_results(os.path.join(wd, "teacher")).get("teacher")
  invocations = read_invocations(wd)
  done = [r for r in args.rows if r in table]
  lines = ["# The distiller zoo on CIFAR-10 (ResNet-26 -> ResNet-8, scaled)", "",
           f"Command: `{command}`", "",
           f"Rows finished: **{len(done)} of {len(args.rows)}**"
           + ("." if len(done) == len(args.rows) else
              " (the command is resumable: rerunning it trains the rest)."), ""]
  if invocations:
    total = sum(i["elapsed_s"] for i in invocations)
    lines += [f"Wall time of the command: **{total / 60:.1f} min** over "
              f"{len(invocations)} invocation(s) (a rerun resumes; "
              + ", ".join(f"{i['elapsed_s'] / 60:.1f} min" for i in invocations)
              + f"), {invocations[-1]['jobs']} row(s) at a time.", ""]
  if teacher:
    lines += [f"Teacher (ResNet-26): **{100 * teacher['test_accuracy']:.2f} %** after "
              f"{teacher['steps']} iterations ({teacher['wall_time_s'] / 60:.1f} min).", ""]
  lines += ["| method | test acc % (mean ± std, 3 seeds) | ensemble % | best eval % | "
            "last eval % | step time / scratch | weight | published C-100 32x4->8x4 | "
            "published C-100 56->20 |", "|---|---|---|---|---|---|---|---|---|"]
  for row in args.rows:
    pub = PUBLISHED.get(row if row != "fsp_mean" else "", ("-", "-"))
    t = table.get(row)
    if t is None:
      lines.append(f"| {row} | not finished | | | | | | {pub[0]} | {pub[1]} |")
      continue
    ratio = t.get("step_time_ratio")
    cells = [f"{t['mean']:.2f} ± {t['std']:.2f}", _pct(t["ensemble"]),
             _pct(t["best_eval"]), _pct(t["last_eval"]),
             "-" if ratio is None else f"{ratio:.2f}x", t["weight"] or "-",
             str(pub[0]), str(pub[1])]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  lines += ranking_lines(table)
  if bench:
    lines += ["", "## What each step costs", "",
              f"`benchmarks/bench.py --methods zoo` ({bench.get('framework', '')}, "
              f"{bench.get('backend', '')}, {bench.get('devices', '?')} device(s), "
              f"{bench.get('num_seeds', '?')} seeds per step): every training step of the "
              "table as training builds it, the teacher's forward pass included, "
              "medians of steps taking turns.", "",
              "| stage | method | batch | ms per step | seed-images/s | / KD's step | "
              "/ scratch's step |", "|---|---|---|---|---|---|---|"]
    steps = bench.get("steps", {})
    scratch_ms = steps.get("scratch", {}).get("ms_per_step")
    for name, st in steps.items():
      over = f"{st['ms_per_step'] / scratch_ms:.2f}x" if scratch_ms else "-"
      lines.append(f"| {name} | {st['method']} | {st['batch_size']} | "
                   f"{st['ms_per_step']:.0f} | {st['seed_images_per_s']:.0f} | "
                   f"{st.get('step_over_kd', float('nan')):.2f}x | {over} |")
    slow = [n for n, st in steps.items() if st.get("step_over_kd", 0) > 1.25]
    if slow:
      lines += ["", "Over 1.25x KD's step: " + ", ".join(
          f"{n} ({steps[n]['step_over_kd']:.2f}x)" for n in slow) + "."]
      notes = dict.fromkeys(m for n in slow for m in steps[n]["method"].split("+")
                            if m in COST_NOTES)
      lines += [f"- {m}: {COST_NOTES[m]}" for m in notes]
  if plot(wd, args.rows, os.path.join(args.report_dir, "accuracy_vs_iteration.png")):
    lines += ["", "![test accuracy against iteration](accuracy_vs_iteration.png)"]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(args.report_dir, "report.md"), "w") as f:
    f.write(text)
  return text


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_root", default="/tmp/cifar10",
                      help="CIFAR-10 image folder; '' loads tfds cifar10; 'digits' the "
                           "bundled digits (a dry run)")
  parser.add_argument("--scale", type=float, default=0.007,
                      help="multiplies every student schedule's iterations and drops")
  parser.add_argument("--teacher_scale", type=float, default=0.05,
                      help="the teacher's factor (0.05: 79 %% in docs/reproduction)")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--rows", default=",".join(ROWS),
                      help=f"comma-separated rows (default all: {','.join(ROWS)})")
  parser.add_argument("--workdir", default="runs/zoo")
  parser.add_argument("--report_dir", default="docs/zoo")
  parser.add_argument("--bench", default="",
                      help="JSON of `benchmarks/bench.py --methods zoo` for the costs")
  parser.add_argument("--curve_points", type=int, default=6)
  parser.add_argument("--eval_examples", type=int, default=2000)
  parser.add_argument("--log_every", type=int, default=20)
  parser.add_argument("--jobs", type=int, default=1)
  parser.add_argument("--run", default="", help="run only this grid run (a worker)")
  parser.add_argument("--report_only", action="store_true")
  args = parser.parse_args(argv)
  args.rows = [r for r in args.rows.split(",") if r]
  unknown = sorted(set(args.rows) - set(ROWS))
  if unknown:
    parser.error(f"unknown --rows {unknown}; choose from {', '.join(ROWS)}.")
  if args.jobs < 1 or args.seeds < 1:
    parser.error("--jobs and --seeds must be at least 1.")
  args.seeds = list(range(args.seeds))
  args.exact = False  # reproduce._config: every stage 1 warmed up as shipped.
  return args


def command_line(argv: List[str]) -> str:
  return reproduce.command_line(argv).replace("experiments/reproduce.py",
                                              "experiments/zoo.py")


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("fsp_jax").setLevel(logging.INFO)
  if args.run:  # A --jobs worker.
    reproduce.run_worker(args, grid_plan(args))
  if not args.report_only:
    wd = os.path.abspath(args.workdir)
    os.makedirs(wd, exist_ok=True)
    stop = threading.Event()
    clock = threading.Thread(target=record_invocation, daemon=True,
                             args=(wd, args.jobs, command_line(argv), stop))
    clock.start()
    try:
      reproduce.run_grid(args, [a for a in argv if a != "--report_only"],
                         command=worker_command, plan=grid_plan(args))
    finally:
      stop.set()
      clock.join()
  recorded = read_invocations(os.path.abspath(args.workdir))
  print(write(args, recorded[-1]["command"] if recorded else command_line(argv)))


if __name__ == "__main__":
  main()
