"""Orbax checkpoints of a stage: `model` (params, batch_stats), `optimizer`, `meta`,
plus `distiller` (a FitNet regressor, FSP adapters) in stages whose objective has
learned parameters.

Keeping the model weights as their own item lets the next stage (or a teacher restore)
read just the weights, without knowing the optimizer or distiller of the stage that
wrote them. `meta` (JSON) holds what must resume with the weights, e.g. the stage's
wall time.

Crash safety: Orbax writes a step into a temporary directory and renames it when
complete, so a kill mid-save leaves only a `<step>.orbax-checkpoint-tmp*` folder that
`latest_step()` ignores and the next `manager()` deletes. Small JSON files are written
to a temporary file and renamed (`write_json_atomic`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Dict, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

CHECKPOINT_DIR = "checkpoints"
STAGE_INFO = "stage.json"
ITEMS = ("model", "optimizer", "meta", "distiller")
log = logging.getLogger("fsp_jax")


def manager(stage_dir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """The CheckpointManager of one stage directory (`stage_dir/checkpoints`).

  Every process must create it (and call `save`/`restore_state`): Orbax coordinates
  the processes. Temporary folders of saves cut short by a kill are deleted.
  """
  path = os.path.abspath(os.path.join(stage_dir, CHECKPOINT_DIR))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(path, options=options, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, state,
         meta: Optional[Dict[str, Any]] = None) -> None:
  """Saves a `train.TrainState` and a JSON `meta` dict at `step` (asynchronously).

  Call `mngr.wait_until_finished()` before relying on it.
  """
  items = dict(
      model=ocp.args.StandardSave(state.variables),
      optimizer=ocp.args.StandardSave({"opt_state": state.opt_state,
                                       "step": state.step}),
      meta=ocp.args.JsonSave(meta or {}))
  if state.distiller_params:
    items["distiller"] = ocp.args.StandardSave(state.distiller_params)
  mngr.save(step, args=ocp.args.Composite(**items))


def save_model(path: str, variables, step: int = 0) -> None:
  """Writes `{'params', 'batch_stats'}` alone as a checkpoint that `restore_model`
  (and so `config.teacher.checkpoint`) reads; `path` is the stage-like directory."""
  with manager(path) as mngr:
    mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(variables)))
    mngr.wait_until_finished()


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_state(mngr: ocp.CheckpointManager, step: int, state):
  """Restores a `train.TrainState` saved by `save`, with `state`'s shapes and
  shardings. Returns `(state, meta)`; `meta` is `{}` for checkpoints without one."""
  items = dict(
      model=ocp.args.StandardRestore(_abstract(state.variables)),
      optimizer=ocp.args.StandardRestore(_abstract({"opt_state": state.opt_state,
                                                    "step": state.step})))
  has_meta = (mngr.directory / str(step) / "meta").exists()
  if has_meta:
    items["meta"] = ocp.args.JsonRestore()
  if state.distiller_params:
    items["distiller"] = ocp.args.StandardRestore(_abstract(state.distiller_params))
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  params = {"student": restored.model["params"],
            "distiller": restored.distiller if state.distiller_params else {}}
  state = state.replace(params=params, batch_stats=restored.model["batch_stats"],
                        opt_state=restored.optimizer["opt_state"],
                        step=restored.optimizer["step"])
  return state, (dict(restored.meta) if has_meta else {})


def has_checkpoints(stage_dir: str) -> bool:
  """Whether `stage_dir/checkpoints` holds anything (complete or cut-short saves)."""
  path = os.path.join(stage_dir, CHECKPOINT_DIR)
  return os.path.isdir(path) and any(not n.startswith(".") for n in os.listdir(path))


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
  write_json_atomic(os.path.join(stage_dir, STAGE_INFO), info)


def _write_atomic(path: str, write, mode: str) -> None:
  """`write(f)` into `path.tmp`, flushed to disk, then renamed over `path`: readers
  (and a kill) see the old file or the new, never half."""
  tmp = path + ".tmp"
  with open(tmp, mode) as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON atomically (`_write_atomic`)."""
  _write_atomic(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True), "w")


def write_npy_atomic(path: str, array) -> None:
  """`np.save` to `path` atomically (`_write_atomic`)."""
  _write_atomic(path, lambda f: np.save(f, array), "wb")


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
  # Read-only: a teacher from another workdir is never modified (no cleanup, no
  # metadata written).
  with _quiet():  # Orbax warns that it sets read-only options.
    mngr = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=ITEMS)
  with mngr:
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


@contextlib.contextmanager
def _quiet():
  """Absl (Orbax) log lines below ERROR are dropped inside the block."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


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


def restore_pretrained(path: str, variables, what: str = "pretrained checkpoint"):
  """Initial weights for fine-tuning: `variables` with every array taken from `path`.

  The classifier is the exception where its shape differs (another number of classes,
  e.g. ImageNet's 1000 for CUB-200's 200): it keeps its value in `variables` (random).
  Any other missing or differently shaped array is an error.

  Args:
    path: a stage directory or its checkpoints/ folder (e.g. `convert_torchvision`'s
      output).
    variables: `{'params', 'batch_stats'}` of the configured architecture.
  Returns:
    `(variables, step)`, arrays placed as those of `variables`.
  """
  ckpt_dir = resolve_checkpoint_dir(path)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{what} {path!r} does not exist; give a stage directory "
                            "or a convert_torchvision output directory.")
  with ocp.CheckpointManager(ckpt_dir, item_names=ITEMS) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"{what} {path!r} holds no complete checkpoint.")
    # Restored as saved (host arrays), so a differently sized classifier still loads.
    metadata = mngr.item_metadata(step).model
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
    saved = mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target))).model
  saved_leaves = {jax.tree_util.keystr(kp): v for kp, v in
                  jax.tree_util.tree_flatten_with_path(saved)[0]}
  reinitialised = []

  def pick(kp, current):
    key = jax.tree_util.keystr(kp)
    if key not in saved_leaves:
      raise ValueError(f"{what} {path!r} has no {key}: it holds another architecture.")
    value = saved_leaves[key]
    if tuple(value.shape) != tuple(current.shape):
      if "classifier" in key:
        reinitialised.append(key)
        return current
      raise ValueError(f"{what} {path!r}: {key} has shape {tuple(value.shape)}, the "
                       f"configured architecture expects {tuple(current.shape)}.")
    return jax.device_put(np.asarray(value, current.dtype), current.sharding)

  out = jax.tree_util.tree_map_with_path(pick, variables)
  if reinitialised:
    log.info("%s: %s differ in shape (another number of classes) and start from random "
             "weights.", what, ", ".join(reinitialised))
  return out, step
