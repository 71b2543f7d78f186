"""How far a stage 1 moved the student's weights: kernel norms against initialization.

    python experiments/kernel_norms.py runs/reproduce/table1/fsp --model cifar_resnet26
    python experiments/kernel_norms.py STAGE_DIR --model M --rescale OUT_DIR

Every convolution of the CIFAR ResNets feeds batch norm, so its output does not depend
on the kernel's scale and SGD can only grow the kernel (the gradient is orthogonal to
it); a kernel grown by a factor r divides the effective learning rate of the next stage
by about r^2 (docs/reproduction/weak_teacher/findings.md). This prints, for the final
checkpoint of STAGE_DIR (a stage 1's directory; a leading seed axis is read per seed),
the global norm of every 4-D kernel over the norm of a fresh initialization of the
same architecture (He-normal, whose norm varies by a few percent between draws for the
smallest layer and far less overall), per section and overall, and the batch-norm
scales' mean. `--rescale OUT_DIR` writes the same weights with every convolution kernel
scaled back to its initial norm, a stage-1 checkpoint for `--config.fsp.checkpoint`.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Dict, Tuple

import jax
import numpy as np
from flax import traverse_util


def _flat(tree) -> Dict[Tuple[str, ...], np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _section(path: Tuple[str, ...]) -> str:
  """The part of the network a parameter path is in: its first component up to the
  first '_' ('section1_module2' -> 'section1', 'stem_conv' -> 'stem')."""
  return path[0].split("_")[0]


def read_final(stage_dir: str):
  """`(variables, step)` of a stage directory's newest checkpoint, as stored."""
  import orbax.checkpoint as ocp
  ckpt = os.path.join(stage_dir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {ckpt!r}; give a stage directory of "
                            "a finished run.")
  restored = ocp.StandardCheckpointer().restore(os.path.join(ckpt, str(steps[-1]),
                                                             "model"))
  return jax.tree.map(np.asarray, restored), steps[-1]


def kernel_norm_ratios(variables, initial) -> Dict[str, object]:
  """Norm ratios of the 4-D kernels of `variables` (optionally with a leading seed
  axis) to those of `initial` (one seed): per section and overall, each a list over
  seeds; and each seed's mean batch-norm scale."""
  init = _flat(initial["params"])
  got = _flat(variables["params"])
  kernels = [p for p, a in init.items() if p[-1] == "kernel" and a.ndim == 4]
  seeded = got[kernels[0]].ndim == 5
  n_seeds = got[kernels[0]].shape[0] if seeded else 1
  per = collections.defaultdict(lambda: [[0.0, 0.0] for _ in range(n_seeds)])
  for p in kernels:
    a = got[p] if seeded else got[p][None]
    for s in range(n_seeds):
      for key in (_section(p), "all"):
        per[key][s][0] += float(np.sum(a[s].astype(np.float64) ** 2))
        per[key][s][1] += float(np.sum(init[p].astype(np.float64) ** 2))
  out = {k: [float(np.sqrt(x / y)) for x, y in v] for k, v in per.items()}
  scales = [p for p in got if p[-1] == "scale"]
  out["bn_scale_mean"] = [float(np.mean(np.concatenate(
      [(got[p][s] if seeded else got[p]).ravel() for p in scales])))
      for s in range(n_seeds)] if scales else []
  return out


def rescaled(variables, initial):
  """`variables` with every 4-D kernel scaled back to its norm in `initial` (per seed
  where they carry a seed axis); every other array unchanged."""
  init = _flat(initial["params"])

  def fix(path, a):
    keys = tuple(getattr(k, "key", str(k)) for k in path)
    if keys[0] != "params" or keys[1:] not in init or init[keys[1:]].ndim != 4:
      return a
    ref = np.linalg.norm(init[keys[1:]])
    if a.ndim == 5:
      norms = np.linalg.norm(a.reshape(a.shape[0], -1), axis=1)
      return a * (ref / norms)[:, None, None, None, None]
    return a * (ref / np.linalg.norm(a))
  return jax.tree_util.tree_map_with_path(fix, variables)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("stage_dir")
  p.add_argument("--model", required=True, help="the student's preset, e.g. cifar_resnet8")
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--init_seed", type=int, default=0)
  p.add_argument("--rescale", default="", help="write the rescaled weights here")
  args = p.parse_args(argv)
  from fsp_jax import checkpoints, models
  variables, step = read_final(args.stage_dir)
  module = models.create_model(args.model, args.num_classes)
  initial = models.init_variables(module, jax.random.PRNGKey(args.init_seed),
                                  (args.image_size, args.image_size, 3))
  ratios = kernel_norm_ratios(variables, initial)
  print(json.dumps({"stage_dir": args.stage_dir, "step": step, **{
      k: [round(x, 3) for x in v] for k, v in ratios.items()}}))
  if args.rescale:
    checkpoints.save_model(args.rescale, rescaled(variables, initial), step)
    print(f"rescaled weights written to {args.rescale}", file=sys.stderr)


if __name__ == "__main__":
  main()
