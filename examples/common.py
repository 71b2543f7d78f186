"""What the worked examples share: one package teacher, the configs, FSP against
scratch over seeds, and the summary (mean ± std, wall time) the docs quote.

Every example runs the ordinary pipeline, `fsp_jax.train.run(config, workdir)`, with
its student given by import path; run them from the repository root as
`python -m examples.NAME --data_root DIR`. The teacher (a package ResNet-14) is trained
once, in `WORKDIR/teacher`, and restored by every example (`teacher.checkpoint`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

DEFAULT_ROOT = os.environ.get("FSP_CIFAR10_DIR", "/tmp/cifar10")


def parse_args(argv, default_name: str):
  p = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_root", default=DEFAULT_ROOT,
                 help="CIFAR-10 image folder (DIR/train/<class>/*, DIR/test/<class>/*).")
  p.add_argument("--workdir", default="runs/own_models",
                 help="Runs go to WORKDIR/<name>/seed<k>, the teacher to "
                      "WORKDIR/teacher.")
  p.add_argument("--name", default=default_name)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--teacher_model", default="cifar_resnet14")
  p.add_argument("--teacher_steps", type=int, default=1000)
  p.add_argument("--teacher_batch_size", type=int, default=128)
  p.add_argument("--stage1_steps", type=int, default=300,
                 help="Stage-1 iterations, run once (first seed) and shared by the "
                      "seeds, as the paper's Algorithm 1 and docs/reproduction.md do.")
  p.add_argument("--stage1_lr", type=float, default=0.02,
                 help="Stage-1 learning rate (element-mean FSP loss).")
  p.add_argument("--steps", type=int, default=250,
                 help="Main-task iterations of the FSP student and of scratch.")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--evals", type=int, default=3,
                 help="Test evaluations during each main-task run (on 2,000 images), "
                      "besides the final one on all 10,000.")
  return p.parse_args(argv)


def base_config(args):
  """The pipeline's default config on the image folder, at the examples' scale."""
  from fsp_jax import config_lib
  from fsp_jax.configs import default
  config = config_lib.load("default")
  config.data.update(source="folder", root=args.data_root,
                     cache_dir=os.path.join(args.workdir, "data_cache"))
  config.teacher.model = args.teacher_model
  t = args.teacher_steps
  config.teacher.schedule = default.schedule(
      t, (0.1, 0.01, 0.001), (t // 2, 3 * t // 4), batch_size=args.teacher_batch_size)
  s = args.steps
  config.student.schedule = default.schedule(
      s, (0.1, 0.01), (2 * s // 3,), batch_size=args.batch_size)
  config.fsp.reduction = "mean"  # docs/reproduction/weak_teacher/findings.md: LR 0.02-0.05.
  config.fsp.schedule = default.schedule(args.stage1_steps, (args.stage1_lr,), (),
                                         batch_size=args.batch_size)
  config.methods = ("fsp",)
  config.baselines = ("scratch",)
  config.eval_every = max(1, s // (args.evals + 1)) if args.evals else 0
  config.eval_examples = 2000
  config.log_every = 50
  config.checkpoint_every = 1000
  return config


def _setup_logging():
  log = logging.getLogger("fsp_jax")
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False
  log.setLevel(logging.INFO)


def ensure_teacher(args) -> str:
  """The shared teacher's stage directory, trained here the first time."""
  from fsp_jax import train
  config = base_config(args)
  config.teacher_only = True
  workdir = os.path.join(args.workdir, "teacher")
  results = train.run(config, workdir)
  print(f"teacher {args.teacher_model}: {100 * results['teacher']['test_accuracy']:.2f} "
        f"% after {results['teacher']['steps']} steps, "
        f"{results['teacher']['wall_time_s']:.0f} s", flush=True)
  return os.path.join(workdir, "teacher")


def _curve(stage_dir):
  from fsp_jax import metrics
  return [(r["step"], r["test_accuracy"]) for r in
          metrics.read_jsonl(os.path.join(stage_dir, metrics.JSONL))
          if "test_accuracy" in r]


def mean_std(values):
  values = [100 * v for v in values]
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return statistics.mean(values), std


def run_example(args, student: str, features, title: str, overrides=None):
  """FSP student against the same student from scratch, one run per seed; writes
  `WORKDIR/<name>/summary.json` and prints a Markdown summary."""
  from fsp_jax import train
  _setup_logging()
  t0 = time.time()
  teacher_dir = ensure_teacher(args)
  t_teacher = time.time() - t0
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  per_seed = {}
  t1 = time.time()
  stage_one = ""
  for seed in seeds:
    config = base_config(args)
    config.seed = seed
    config.teacher.checkpoint = teacher_dir
    config.fsp.checkpoint = stage_one  # The first seed's stage 1, for the others.
    config.student.model = student
    config.student.features = tuple(features)
    for key, value in (overrides or {}).items():
      section, field = key.split(".")
      config[section][field] = value
    workdir = os.path.join(args.workdir, args.name, f"seed{seed}")
    results = train.run(config, workdir)
    if not stage_one:
      stage_one = os.path.join(workdir, "fsp")
      stage1 = results["fsp"]
    per_seed[seed] = {
        "fsp": results["student"]["test_accuracy"],
        "scratch": results["scratch"]["test_accuracy"],
        "wall_s": {k: results[k]["wall_time_s"] for k in ("student", "scratch")},
        "curves": {k: _curve(os.path.join(workdir, k)) for k in ("student", "scratch")}}
  wall = time.time() - t1
  fsp_m, fsp_s = mean_std([r["fsp"] for r in per_seed.values()])
  scr_m, scr_s = mean_std([r["scratch"] for r in per_seed.values()])
  summary = {
      "title": title, "student": student, "features": list(features),
      "overrides": overrides or {}, "seeds": seeds, "per_seed": per_seed,
      "fsp_mean": fsp_m, "fsp_std": fsp_s, "scratch_mean": scr_m, "scratch_std": scr_s,
      "stage1": {"wall_s": stage1["wall_time_s"],
                 "test_fsp_loss": stage1.get("test_fsp_loss")},
      "wall_s_seeds": round(wall, 1), "wall_s_teacher_here": round(t_teacher, 1),
      "args": vars(args)}
  out = os.path.join(args.workdir, args.name, "summary.json")
  with open(out, "w") as f:
    json.dump(summary, f, indent=1)
  print(f"\n{title}\n")
  print("| run | test accuracy %, mean ± std | per seed |")
  print("|---|---|---|")
  for key, m, s in (("fsp", fsp_m, fsp_s), ("scratch", scr_m, scr_s)):
    seeds_txt = ", ".join(f"{100 * per_seed[k][key]:.2f}" for k in seeds)
    print(f"| {key} | {m:.2f} ± {s:.2f} (n={len(seeds)}) | {seeds_txt} |")
  print(f"\nFSP minus scratch: {fsp_m - scr_m:+.2f} points; wall time of the seeds' runs "
        f"{wall / 60:.1f} min; summary: {out}")
  return summary
