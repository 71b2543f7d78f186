"""Figures from workdirs: test-accuracy curves and FSP matrices, as PNG.

    python -m fsp_jax.plots WORKDIR [WORKDIR ...] --out DIR

writes

- `DIR/accuracy.png`: test accuracy against iteration of every classification stage
  of every workdir (teacher, FSP student, baselines: the paper's fast-optimization
  picture) and, beside it, stage 1's FSP loss against iteration.
- `DIR/fsp_matrices.png` (one workdir) or `DIR/fsp_matrices_<NAME>.png` (several):
  for each section pair, the teacher's FSP matrix next to the student's at
  initialisation and after stage 1, each with its FSP distance to the teacher
  (Eq. 2 for that pair). Weights come from the stage checkpoints; the matrices are
  averaged over the first `--num_images` test images.

Everything a workdir needs is read from it (`metrics.jsonl`, `stage.json`,
checkpoints); a teacher restored from elsewhere (`config.teacher.checkpoint`) is named
with `--teacher`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from fsp_jax import methods, metrics

# The baselines' and the teacher's; each method's students come from fsp_jax.methods.
STAGE_LABELS = {"teacher": "teacher", "scratch": "student from scratch",
                "teacher_short": "teacher, student's schedule"}
STAGE_COLORS = {"teacher": "tab:gray", "scratch": "tab:blue",
                "teacher_short": "tab:green", "fsp": "tab:purple"}


def _label(stage: str) -> str:
  return {**methods.stage_labels(), **STAGE_LABELS}.get(stage, stage)


def _color(stage: str):
  return {**methods.stage_colors(), **STAGE_COLORS}.get(stage)
LINESTYLES = ("-", "--", ":", "-.")


def _pyplot():
  # The caller's backend: inline in a notebook; main() picks Agg (files only).
  import matplotlib.pyplot as plt
  return plt


def stage_names(workdir: str) -> List[str]:
  """Stage directories of `workdir` that hold metrics, in the order they ran."""
  order = ["teacher", *methods.stage_order(), "scratch", "teacher_short"]
  found = [d for d in sorted(os.listdir(workdir))
           if os.path.exists(os.path.join(workdir, d, metrics.JSONL))]
  return sorted(found, key=lambda d: (order.index(d) if d in order else len(order), d))


def curves(workdir: str, key: str) -> Dict[str, np.ndarray]:
  """`{stage: (K, 2) array of (step, value)}` of metric `key` for each stage with it."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} does not exist.")
  out = {}
  for stage in stage_names(workdir):
    records = metrics.read_jsonl(os.path.join(workdir, stage, metrics.JSONL))
    points = sorted({r["step"]: r[key] for r in records if key in r}.items())
    if points:
      out[stage] = np.asarray(points, np.float64)
  return out


def seed_curves(workdir: str, stage: str, key: str) -> Dict[int, np.ndarray]:
  """`{seed: (K, 2) array of (step, value)}` of a several-seed stage's metric `key`
  (the evaluations' `per_seed` lists); `{}` for a one-seed stage."""
  records = metrics.read_jsonl(os.path.join(workdir, stage, metrics.JSONL))
  points: Dict[int, Dict[int, float]] = {}
  for r in records:
    for entry in r.get("per_seed", ()):
      if key in entry:
        points.setdefault(entry["seed"], {})[r["step"]] = entry[key]
  return {seed: np.asarray(sorted(p.items()), np.float64) for seed, p in points.items()}


def plot_accuracy(workdirs: Sequence[str], path: Optional[str] = None):
  """Test accuracy (%) against iteration per stage, and stage 1's FSP loss.

  Args:
    workdirs: run directories; stages share a colour, workdirs a line style.
    path: where to save the PNG (None: only return the figure).

  Returns:
    the matplotlib Figure.
  """
  plt = _pyplot()
  fig, (ax_acc, ax_fsp) = plt.subplots(1, 2, figsize=(11, 4),
                                       gridspec_kw={"width_ratios": (3, 2)})
  several = len(workdirs) > 1
  for k, workdir in enumerate(workdirs):
    prefix = f"{_name(workdir)}: " if several else ""
    style = LINESTYLES[k % len(LINESTYLES)]
    for stage, xy in curves(workdir, "test_accuracy").items():
      # Several seeds in one run: each seed a thin line, their mean the marked one.
      for seed_xy in seed_curves(workdir, stage, "test_accuracy").values():
        ax_acc.plot(seed_xy[:, 0], 100 * seed_xy[:, 1], style, linewidth=0.7,
                    alpha=0.45, color=_color(stage))
      ax_acc.plot(xy[:, 0], 100 * xy[:, 1], style, marker="o", markersize=3,
                  color=_color(stage),
                  label=prefix + _label(stage))
    for key, marker, what in (("loss", None, "train"), ("test_fsp_loss", "o", "test")):
      xy = curves(workdir, key).get("fsp")
      if xy is not None:
        ax_fsp.plot(xy[:, 0], xy[:, 1], style, marker=marker, markersize=3,
                    color=STAGE_COLORS["fsp"], alpha=0.5 if what == "train" else 1.0,
                    label=f"{prefix}{what}")
  ax_acc.set(xlabel="iteration", ylabel="test accuracy (%)",
             title="Test accuracy per stage")
  ax_fsp.set(xlabel="iteration", ylabel="FSP loss (Eq. 2)", yscale="log",
             title="Stage 1: FSP loss")
  for ax in (ax_acc, ax_fsp):
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=110)
  return fig


def _fingerprint(stage_dir: str) -> Dict[str, Any]:
  from fsp_jax import checkpoints
  if os.path.basename(os.path.normpath(stage_dir)) == checkpoints.CHECKPOINT_DIR:
    stage_dir = os.path.dirname(os.path.normpath(stage_dir))  # Its checkpoints/ folder.
  info = checkpoints.read_stage_info(stage_dir)
  if info is None or "fingerprint" not in info:
    raise FileNotFoundError(f"{stage_dir} has no stage.json; give a stage directory "
                            "written by fsp_jax (e.g. WORKDIR/teacher).")
  return info["fingerprint"]


def fsp_snapshots(workdir: str, teacher_dir: Optional[str] = None,
                  num_images: int = 256, pool: str = "max",
                  fsp_pairs: Optional[Sequence[Sequence]] = None) -> Dict[str, Any]:
  """FSP matrices of the teacher and of the student before and after stage 1.

  Args:
    workdir: a run directory with an `fsp` stage.
    teacher_dir: the teacher's stage directory; default `WORKDIR/teacher`.
    num_images: how many test images (from the first) to compute the matrices on.
    pool: spatial pooling for pairs of different size, as in the run's config.
    fsp_pairs: `(first, last)` feature names (or indices); default one pair per
      section.

  Returns:
    a dict: 'pairs'; 'teacher', 'init', 'stage1': per pair the batch-mean FSP matrix
    `(m, n)` (NumPy); 'distance': {'init', 'stage1'} per pair the batch mean of
    `||G_T - G_S||_F^2`; 'stage1_step': the step of the stage-1 checkpoint used;
    'num_images': how many test images were used.
  """
  import jax
  import ml_collections
  from fsp_jax import checkpoints, data, fsp, models, stages

  fsp_dir = os.path.join(workdir, "fsp")
  teacher_dir = teacher_dir or os.path.join(workdir, "teacher")
  if not os.path.isdir(fsp_dir):
    raise FileNotFoundError(f"{workdir} has no 'fsp' stage (stage 1) to plot.")
  if not os.path.isdir(teacher_dir):
    raise FileNotFoundError(
        f"{workdir} has no teacher stage; name the teacher's stage directory with "
        "--teacher (the run's config.teacher.checkpoint).")
  student_fp, teacher_fp = _fingerprint(fsp_dir), _fingerprint(teacher_dir)
  dataset = data.load_dataset(ml_collections.ConfigDict(student_fp["data"]))
  images = dataset.test_images[:num_images]
  shape = dataset.image_shape
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def network(fp, keys=()):
    """The stage's Network as its run built it (a preset, or a model by import path
    with the layers its fingerprint names)."""
    return models.Network(
        models.create_model(fp["model"], dataset.num_classes, fp["width_multiplier"]),
        tuple(float(v) for v in dataset.mean), tuple(float(v) for v in dataset.std),
        layers=tuple(fp.get("features", ())), feature_keys=tuple(keys),
        drop_tokens=int(fp.get("drop_tokens", 0)),
        token_grid=tuple(fp.get("token_grid", ())), classes=dataset.num_classes)

  student = network(student_fp)
  names = student.feature_names
  teacher = network(teacher_fp)
  # As in the run: where the two name their features differently, the teacher's are
  # keyed by the student's names, position by position.
  if teacher.feature_names != names:
    teacher = network(teacher_fp, keys=names)
  fsp_pairs = fsp_pairs or student_fp.get("fsp", {}).get("fsp_pairs")  # The run's.
  pairs = (fsp.resolve_pairs(fsp_pairs, names) if fsp_pairs
           else fsp.default_fsp_pairs(names))

  def matrices(net):
    return jax.jit(lambda v: fsp.fsp_matrices(net.apply(v, images)[1], pairs, pool))

  def restore(net, stage_dir, seeds=1):
    """The stage's final variables (a several-seed stage's first seed)."""
    template = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), shape))
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        ((seeds,) if seeds > 1 else ()) + a.shape, a.dtype, sharding=device), template)
    variables, step = checkpoints.restore_model(stage_dir, template,
                                                f"{stage_dir} checkpoint")
    if seeds > 1:
      variables = jax.tree.map(lambda x: x[0], variables)
    return variables, step

  teacher_m = matrices(teacher)(restore(teacher, teacher_dir)[0])
  student_matrices = matrices(student)
  stage1_vars, stage1_step = restore(student, fsp_dir,
                                     int(student_fp.get("num_seeds", 1)))
  # The student as stage 1 was initialised (from the seed and its role).
  rng = jax.random.fold_in(jax.random.PRNGKey(student_fp["seed"]),
                           stages.ROLE_SEED["student"])
  init_vars = jax.jit(lambda r: student.init(r, shape))(rng)
  out = {"pairs": pairs,
         "stage1_step": stage1_step, "num_images": len(images),
         "teacher": [np.asarray(g.mean(0)) for g in teacher_m], "distance": {}}
  for name, variables in (("init", init_vars), ("stage1", stage1_vars)):
    student_m = student_matrices(variables)
    out[name] = [np.asarray(g.mean(0)) for g in student_m]
    out["distance"][name] = [float(fsp.fsp_distance([t], [s]))
                             for t, s in zip(teacher_m, student_m)]
  return out


def plot_fsp_matrices(snapshots: Dict[str, Any], path: Optional[str] = None,
                      title: str = ""):
  """Heatmaps: one row per section pair; teacher, student at init, after stage 1.

  Args:
    snapshots: what `fsp_snapshots` returns.
    path: where to save the PNG (None: only return the figure).
    title: figure title (e.g. the workdir).

  Returns:
    the matplotlib Figure. The three heatmaps of a row share one colour scale.
  """
  plt = _pyplot()
  pairs = snapshots["pairs"]
  fig, axes = plt.subplots(len(pairs), 3, figsize=(10, 2.6 * len(pairs) + 0.6),
                           squeeze=False, layout="constrained")
  columns = (("teacher", "teacher"), ("init", "student at init"),
             ("stage1", f"student after stage 1 (step {snapshots['stage1_step']})"))
  for row, (i, j) in enumerate(pairs):
    mats = [snapshots[key][row] for key, _ in columns]
    vmin = min(float(m.min()) for m in mats)
    vmax = max(float(m.max()) for m in mats)
    for col, ((key, label), mat) in enumerate(zip(columns, mats)):
      ax = axes[row, col]
      im = ax.imshow(mat, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto",
                     interpolation="nearest")
      text = label
      if key != "teacher":
        text += f"\ndistance {snapshots['distance'][key][row]:.4g}"
      ax.set_title(text, fontsize=9)
      ax.set_xticks([])
      ax.set_yticks([])
      if col == 0:
        ax.set_ylabel(f"features {i} -> {j}\n{mat.shape[0]} x {mat.shape[1]}",
                      fontsize=9)
    fig.colorbar(im, ax=list(axes[row]), fraction=0.03, pad=0.01)
  total = {k: sum(v) for k, v in snapshots["distance"].items()}
  fig.suptitle(f"{title + ': ' if title else ''}FSP matrices, mean over "
               f"{snapshots['num_images']} test images "
               f"\ntotal distance to the teacher {total['init']:.4g} at init, "
               f"{total['stage1']:.4g} after stage 1", fontsize=10)
  if path:
    fig.savefig(path, dpi=110)
  return fig


def _name(workdir: str) -> str:
  return os.path.basename(os.path.normpath(workdir))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m fsp_jax.plots",
      description="PNG figures from fsp_jax workdirs: accuracy curves, FSP matrices.")
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  parser.add_argument("--out", required=True, help="directory for the PNG files")
  parser.add_argument("--teacher", default=None,
                      help="teacher stage directory where a workdir has none")
  parser.add_argument("--num_images", type=int, default=256,
                      help="test images the FSP matrices are averaged over")
  parser.add_argument("--pool", default="max", choices=("max", "avg"),
                      help="as the run's config.fsp.pool")
  parser.add_argument("--no_matrices", action="store_true",
                      help="accuracy curves only (no checkpoints read)")
  args = parser.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")  # Files only: no display needed (CI, remote hosts).
  plt = _pyplot()
  missing = [w for w in args.workdirs if not os.path.isdir(w)]
  if missing:
    print(f"fsp_jax.plots: error: workdir {missing[0]!r} does not exist.",
          file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  written = [os.path.join(args.out, "accuracy.png")]
  plt.close(plot_accuracy(args.workdirs, written[0]))
  if not args.no_matrices:
    for workdir in args.workdirs:
      name = ("fsp_matrices.png" if len(args.workdirs) == 1
              else f"fsp_matrices_{_name(workdir)}.png")
      try:
        snaps = fsp_snapshots(workdir, args.teacher, args.num_images, args.pool)
      except (FileNotFoundError, ValueError) as e:
        print(f"fsp_jax.plots: skipping FSP matrices of {workdir}: {e}", file=sys.stderr)
        continue
      written.append(os.path.join(args.out, name))
      plt.close(plot_fsp_matrices(snaps, written[-1], title=_name(workdir)))
      dist = ", ".join(f"{pair}: {a:.4g} -> {b:.4g}" for pair, a, b in zip(
          snaps["pairs"], snaps["distance"]["init"], snaps["distance"]["stage1"]))
      print(f"{workdir}: FSP distance to the teacher, init -> stage 1: {dist}")
  for path in written:
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
