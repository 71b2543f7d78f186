"""The reproduction grid's report: tables beside the paper's, the plot, results.json.

Reads only what the grid's run directories hold (results.json, metrics.jsonl,
diverged.json); `python experiments/reproduce.py --report_only` rewrites it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import numpy as np

from fsp_jax import metrics, plots

# The paper's CIFAR-10 numbers (%): the average of three networks and their ensemble.
PAPER_TEACHER = 91.75
PAPER_T1 = {"student": 92.14, "student_ens": 93.26, "teacher_short": 90.64,
            "teacher_short_ens": 92.60}
PAPER_T3 = {"student": 88.70, "scratch": 87.91}
RUNS = ("teacher", "table3", "table3_scratch", "table1", "table1_short",
        "stage1_exact_table1", "stage1_exact_table3")
# (run, stage) of each row the tables report.
ROWS = {"teacher": ("teacher", "teacher"),
        "t3_student": ("table3", "student"), "t3_scratch": ("table3_scratch", "scratch"),
        "t1_student": ("table1", "student"), "t1_short": ("table1_short", "teacher_short")}


def collect(workdir: str) -> Dict[str, Dict[str, Any]]:
  """`{run: results.json}` of the grid's runs, `{'diverged': ...}` for a run whose
  loss became NaN or inf; runs not started are missing."""
  out = {}
  for name in RUNS:
    run_dir = os.path.join(workdir, name)
    diverged = os.path.join(run_dir, "diverged.json")
    results = metrics.read_results(run_dir)
    if os.path.exists(diverged):
      with open(diverged) as f:
        results = {**results, "diverged": json.load(f)["error"]}
    if results:
      out[name] = results
  return out


def stage_result(runs, row: str) -> Optional[Dict[str, Any]]:
  run, stage = ROWS[row]
  return runs.get(run, {}).get(stage)


def accuracies(result: Dict[str, Any]) -> List[float]:
  """Per-seed final test accuracies (%), on the whole test set."""
  if "per_seed" in result:
    return [100 * s["test_accuracy"] for s in result["per_seed"]]
  return [100 * result["test_accuracy"]]


def seed_curves(workdir: str, row: str) -> Dict[int, np.ndarray]:
  """`{seed: (K, 2) (step, test accuracy)}` of a row's evaluations; `{}` before any."""
  run, stage = ROWS[row]
  run_dir = os.path.join(workdir, run)
  if not os.path.isdir(os.path.join(run_dir, stage)):
    return {}
  curves = plots.seed_curves(run_dir, stage, "test_accuracy")
  if not curves:  # A one-seed stage.
    one = plots.curves(run_dir, "test_accuracy").get(stage)
    curves = {0: one} if one is not None and len(one) else {}
  return curves


def best_evaluation(workdir: str, row: str) -> Optional[float]:
  """Mean over seeds of each seed's best evaluation (%), final one included; the
  evaluations before the last are on the grid's fixed test subset."""
  curves = seed_curves(workdir, row)
  if not curves:
    return None
  return 100 * float(np.mean([np.max(c[:, 1]) for c in curves.values()]))


def _mean_std(values: List[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _ensemble(result) -> str:
  e = result.get("ensemble_test_accuracy")
  return "-" if e is None else f"{100 * e:.2f}"


def _row(workdir, runs, row: str, label: str, paper: str) -> str:
  r = stage_result(runs, row)
  if r is None:
    run = ROWS[row][0]
    state = ("diverged" if "diverged" in runs.get(run, {}) else "not finished")
    return f"| {label} | {state} | | | | | {paper} |"
  best = best_evaluation(workdir, row)
  return (f"| {label} | {_mean_std(accuracies(r))} | {_ensemble(r)} | "
          f"{'-' if best is None else f'{best:.2f}'} | {r['steps']} | "
          f"{r['wall_time_s'] / 60:.1f} | {paper} |")


def gain(runs, a: str, b: str) -> Optional[Dict[str, float]]:
  """Mean of a's seeds minus b's (points), the seeds' stds, and the gain over its
  standard error (Welch)."""
  ra, rb = stage_result(runs, a), stage_result(runs, b)
  if ra is None or rb is None:
    return None
  xa, xb = accuracies(ra), accuracies(rb)
  d = float(np.mean(xa) - np.mean(xb))
  sa = float(np.std(xa, ddof=1)) if len(xa) > 1 else 0.0
  sb = float(np.std(xb, ddof=1)) if len(xb) > 1 else 0.0
  se = float(np.sqrt(sa ** 2 / len(xa) + sb ** 2 / len(xb)))
  return {"gain": d, "std_a": sa, "std_b": sb, "standard_error": se,
          "gain_over_se": d / se if se > 0 else float("inf"),
          "every_seed_ahead": bool(min(xa) > max(xb))}


def _gain_line(g, what: str) -> str:
  if g is None:
    return f"- {what}: no result (see the rows above)."
  return (f"- {what}: **{g['gain']:+.2f} points** (seed stds {g['std_a']:.2f} and "
          f"{g['std_b']:.2f}; {g['gain_over_se']:+.1f} standard errors of the "
          f"difference; every seed ahead of every seed: "
          f"{'yes' if g['every_seed_ahead'] else 'no'}).")


def kernel_growth(workdir: str, run: str, result) -> Optional[Dict[str, List[float]]]:
  """How much a run's stage 1 grew the student's convolution kernels (norm after /
  norm at initialization, per seed; experiments/kernel_norms.py); None where its
  checkpoint cannot be read."""
  import jax
  try:
    from experiments import kernel_norms
  except ImportError:  # Run as experiments/reproduce.py: this folder is on sys.path.
    import kernel_norms
  from fsp_jax import models
  stage_dir = os.path.join(workdir, run, "fsp")
  try:
    variables, _ = kernel_norms.read_final(stage_dir)
    module = models.create_model(result["model"], 10)
    initial = models.init_variables(module, jax.random.PRNGKey(0), (32, 32, 3))
    return kernel_norms.kernel_norm_ratios(variables, initial)
  except (OSError, ValueError, KeyError) as e:
    print(f"kernel norms of {stage_dir!r} not read: {e}")
    return None


def _growth(g) -> str:
  if not g:
    return ""
  return (f"; convolution kernels' norm grew {', '.join(f'{x:.2f}' for x in g['all'])}x "
          f"(stem {', '.join(f'{x:.1f}' for x in g['stem'])}x)")


def stage1_lines(runs, workdir: Optional[str] = None) -> List[str]:
  """The stage-1 lines of the report; with `workdir`, each with the growth of the
  student's kernel norms during it (the mechanism behind a stage 2 that learns slowly:
  docs/reproduction/weak_teacher/findings.md)."""
  out = []
  for table, run in (("Table 3", "table3"), ("Table 1", "table1")):
    r = runs.get(run, {}).get("fsp")
    if r is not None:
      per = r.get("per_seed")
      loss = (", ".join(f"{s['test_fsp_loss']:.1f}" for s in per) if per
              else f"{r['test_fsp_loss']:.1f}")
      g = kernel_growth(workdir, run, r) if workdir else None
      out.append(f"- {table} stage 1 ({'one per seed' if per else 'shared by the seeds'}"
                 f", warmed up): test FSP loss {loss} after {r['steps']} iterations, "
                 f"{r['wall_time_s'] / 60:.1f} min{_growth(g)}.")
    exact = runs.get(f"stage1_exact_{run}")
    if exact is not None:
      if "diverged" in exact:
        out.append(f"- {table} stage 1 exactly as the paper (no warm-up): "
                   f"**diverged**: {exact['diverged']}")
      elif "fsp" in exact:
        e = exact["fsp"]
        g = kernel_growth(workdir, f"stage1_exact_{run}", e) if workdir else None
        out.append(f"- {table} stage 1 exactly as the paper (no warm-up, first seed): "
                   f"test FSP loss {e['test_fsp_loss']:.1f} after {e['steps']} "
                   f"iterations{_growth(g)}.")
  return out


def plot(workdir: str, runs, path: str) -> bool:
  """Accuracy against iteration, every seed a line: Table 3's and Table 1's FSP
  students beside their baselines, and the teacher."""
  plt = plots._pyplot()
  panels = [("Table 3: ResNet-26 -> ResNet-8", (("t3_student", "FSP student", "C0"),
                                                ("t3_scratch", "ResNet-8 from scratch",
                                                 "C3"))),
            ("Table 1: ResNet-26 -> ResNet-26", (("t1_student", "FSP student", "C0"),
                                                 ("t1_short", "ResNet-26, same iterations",
                                                  "C3"))),
            ("Teacher: ResNet-26", (("teacher", "teacher", "k"),))]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  drawn = False
  for ax, (title, lines) in zip(axes, panels):
    for row, label, color in lines:
      for k, (seed, c) in enumerate(sorted(seed_curves(workdir, row).items())):
        ax.plot(c[:, 0], 100 * c[:, 1], color=color, marker=".", lw=1,
                label=label if k == 0 else None)
        drawn = True
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc="lower right")
  fig.tight_layout()
  if drawn:
    fig.savefig(path, dpi=110)
  plt.close(fig)
  return drawn


def write(args, command: str) -> str:
  """Writes report.md, results.json and accuracy_vs_iteration.png; returns the report."""
  workdir = os.path.abspath(args.workdir)
  runs = collect(workdir)
  os.makedirs(args.report_dir, exist_ok=True)
  elapsed = None
  path = os.path.join(workdir, "grid_elapsed.json")
  if os.path.exists(path):
    with open(path) as f:
      elapsed = json.load(f)
  stage_wall = sum(r.get("wall_time_s", 0.0) for res in runs.values()
                   for r in res.values() if isinstance(r, dict))
  gains = {"table3_student_vs_scratch": gain(runs, "t3_student", "t3_scratch"),
           "table1_student_vs_teacher_short": gain(runs, "t1_student", "t1_short")}
  with open(os.path.join(args.report_dir, "results.json"), "w") as f:
    json.dump({"scale": args.scale, "teacher_scale": args.teacher_scale,
               "seeds": args.seeds, "command": command,
               "elapsed": elapsed, "stage_wall_time_s": round(stage_wall, 1),
               "gains": gains, "runs": runs}, f, indent=1)
  drawn = plot(workdir, runs, os.path.join(args.report_dir, "accuracy_vs_iteration.png"))

  teacher = stage_result(runs, "teacher")
  p1, p3 = PAPER_T1, PAPER_T3
  lines = [
      "# Reproduction of Tables 1 and 3 (CIFAR-10, scaled)", "",
      f"Scale **{args.scale}** on every iteration count, learning-rate drop and warm-up of "
      + (f"the teacher's schedule at **{args.teacher_scale}**, " if
         args.teacher_scale != args.scale else "") +
      f"the shipped configs (the paper's schedules; stage 1 "
      f"{'exactly as the paper' if args.exact else 'with its learning rate warmed up over the first 5 %'}). "
      f"Seeds {', '.join(map(str, args.seeds))}, trained side by side in one program per "
      "run; one teacher. Table 3: each seed its own stage 1 (the spread includes "
      "stage-1 variance). Table 1: one stage 1 (first seed) shared by every seed's "
      "stage 2, as the paper's Algorithm 1 (the spread excludes it).", "",
      f"Command: `{command}`", ""]
  if elapsed:
    lines.append(f"Wall time of the command: **{elapsed['elapsed_s'] / 60:.1f} min** "
                 f"({elapsed['jobs']} run(s) at a time); the stages' own times add up "
                 f"to {stage_wall / 60:.1f} min. {args.note}".rstrip())
    lines.append("")
  lines += [
      "Accuracies are on the whole test set at the final iteration, mean ± std "
      "over seeds (ddof 1); *ensemble*: the mean of the seeds' softmax outputs; "
      "*best eval*: each seed's best evaluation, the final one included, averaged "
      "(RepDistiller-style; the evaluations before the last use a fixed subset of "
      f"{args.eval_examples or 'all'} test images), reported for comparison only.", "",
      f"Teacher (ResNet-26): "
      + (f"**{100 * teacher['test_accuracy']:.2f} %** after {teacher['steps']} "
         f"iterations ({teacher['wall_time_s'] / 60:.1f} min); paper {PAPER_TEACHER} %."
         if teacher else "not finished."), "",
      "## Table 3: network minimization (ResNet-26 -> ResNet-8)", "",
      "| row | final acc % | ensemble % | best eval % | iterations | min | paper % |",
      "|---|---|---|---|---|---|---|",
      _row(workdir, runs, "t3_scratch", "ResNet-8 from scratch", f"{p3['scratch']}"),
      _row(workdir, runs, "t3_student", "FSP student (ResNet-8)", f"{p3['student']}"), "",
      _gain_line(gains["table3_student_vs_scratch"], "FSP student vs scratch"), "",
      "## Table 1: fast optimization (ResNet-26 -> ResNet-26)", "",
      "| row | final acc % | ensemble % | best eval % | iterations | min | paper % |",
      "|---|---|---|---|---|---|---|",
      _row(workdir, runs, "teacher", "teacher, full schedule", f"{PAPER_TEACHER}"),
      _row(workdir, runs, "t1_short", "ResNet-26, 1/3 of the iterations",
           f"{p1['teacher_short']} (ens. {p1['teacher_short_ens']})"),
      _row(workdir, runs, "t1_student", "FSP student, 1/3 of the iterations",
           f"{p1['student']} (ens. {p1['student_ens']})"), "",
      _gain_line(gains["table1_student_vs_teacher_short"],
                 "FSP student vs the teacher architecture at the same iterations"), "",
      "## Stage 1", ""] + stage1_lines(runs, workdir) + [""]
  if drawn:
    lines += ["![accuracy against iteration, every seed](accuracy_vs_iteration.png)", ""]
  report = "\n".join(lines)
  with open(os.path.join(args.report_dir, "report.md"), "w") as f:
    f.write(report)
  return report


