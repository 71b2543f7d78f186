"""Orbax checkpoints of a stage: `model` (params, batch_stats) and `optimizer` items.

Keeping the model weights as their own item lets the next stage (or a teacher restore)
read just the weights, without knowing the optimizer of the stage that wrote them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
STAGE_INFO = "stage.json"


def manager(stage_dir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """The CheckpointManager of one stage directory (`stage_dir/checkpoints`)."""
  path = os.path.abspath(os.path.join(stage_dir, CHECKPOINT_DIR))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(path, options=options, item_names=("model", "optimizer"))


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves a TrainState at `step` (asynchronously; `mngr.wait_until_finished()`)."""
  mngr.save(step, args=ocp.args.Composite(
      model=ocp.args.StandardSave({"params": state.params,
                                   "batch_stats": state.batch_stats}),
      optimizer=ocp.args.StandardSave({"opt_state": state.opt_state,
                                       "step": state.step})))


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_state(mngr: ocp.CheckpointManager, step: int, state):
  """Restores a TrainState saved by `save`, with `state`'s shapes and shardings."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(_abstract(state.variables)),
      optimizer=ocp.args.StandardRestore(_abstract({"opt_state": state.opt_state,
                                                    "step": state.step}))))
  return state.replace(params=restored.model["params"],
                       batch_stats=restored.model["batch_stats"],
                       opt_state=restored.optimizer["opt_state"],
                       step=restored.optimizer["step"])


def resolve_checkpoint_dir(path: str) -> str:
  """Accepts a stage directory or its checkpoints/ folder; returns the latter."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return os.path.join(path, CHECKPOINT_DIR)
  return path


def read_stage_info(stage_dir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(stage_dir, STAGE_INFO)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_stage_info(stage_dir: str, info: Dict[str, Any]) -> None:
  os.makedirs(stage_dir, exist_ok=True)
  tmp = os.path.join(stage_dir, STAGE_INFO + ".tmp")
  with open(tmp, "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(stage_dir, STAGE_INFO))


def restore_model(path: str, variables, what: str = "checkpoint"):
  """Restores `{'params', 'batch_stats'}` from the latest checkpoint under `path`.

  Args:
    path: a stage directory or its checkpoints/ folder.
    variables: a tree of the expected structure (arrays or ShapeDtypeStructs with the
      wanted shardings).
    what: how to name the checkpoint in errors (e.g. "teacher checkpoint").
  Raises:
    FileNotFoundError where no checkpoint exists, ValueError where it holds another
    architecture.
  """
  ckpt_dir = resolve_checkpoint_dir(path)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{what} {path!r} does not exist; give a stage directory "
                            "written by fsp_jax (e.g. WORKDIR/teacher).")
  with ocp.CheckpointManager(ckpt_dir, item_names=("model", "optimizer")) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"{what} {path!r} holds no complete checkpoint.")
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(_abstract(variables))))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(f"{what} {path!r} (step {step}) does not fit the configured "
                       f"architecture: {first[:300]}") from None
  _check_shapes(variables, restored.model, what, path)
  return restored.model, step


def _check_shapes(expected, restored, what, path):
  exp = jax.tree_util.tree_flatten_with_path(expected)[0]
  got = jax.tree_util.tree_flatten_with_path(restored)[0]
  if len(exp) != len(got):
    raise ValueError(f"{what} {path!r} holds {len(got)} arrays, the configured "
                     f"architecture {len(exp)}: it is another architecture.")
  for (kp, a), (_, b) in zip(exp, got):
    if tuple(a.shape) != tuple(b.shape):
      raise ValueError(f"{what} {path!r}: {jax.tree_util.keystr(kp)} has shape "
                       f"{tuple(b.shape)}, the configured architecture expects "
                       f"{tuple(a.shape)}.")
