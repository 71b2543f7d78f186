"""Orbax checkpoints of a stage: `model` (params, batch_stats), `optimizer`, `meta`,
plus `distiller` (a regressor, channel adapters) in stages whose objective has
learned parameters.

Keeping the model weights as their own item lets the next stage (or a teacher restore)
read just the weights, without knowing the optimizer or distiller of the stage that
wrote them. `meta` (JSON) holds what must resume with the weights, e.g. the stage's
wall time.

Crash safety: Orbax writes a step into a temporary directory and renames it when
complete, so a kill mid-save leaves only a `<step>.orbax-checkpoint-tmp*` folder that
`latest_step()` ignores and the next `manager()` deletes. Small JSON files are written
to a temporary file and renamed (`write_json_atomic`).

Integrity (docs/reliability.md): before any array is read, the stored shapes are
compared with the expected ones, so that *another architecture* (an error naming the
config field to change) is told apart from a checkpoint that *cannot be read*
(`CorruptCheckpoint`: truncated or damaged files, a missing item). A stage's own
corrupt step is moved aside (`<step>.corrupt-<time>`, which Orbax ignores) and the
stage resumes from its newest intact one (`restore_latest`, `final_intact`). A save
that fails (full disk, I/O error) raises `CheckpointWriteError`; the steps saved
before it stay complete.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from fsp_jax.validation import ConfigError

CHECKPOINT_DIR = "checkpoints"
STAGE_INFO = "stage.json"
ITEMS = ("model", "optimizer", "meta", "distiller", "objective_state")
CORRUPT_SUFFIX = ".corrupt-"
log = logging.getLogger("fsp_jax")
# Errors of a storage that cannot take a write (full, quota, failing, read-only).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)
_WRITE_TEXTS = ("No space left on device", "Disk quota exceeded", "Input/output error",
                "Read-only file system", "File too large")


class CorruptCheckpoint(ConfigError):
  """A checkpoint that cannot be read: truncated or damaged files, a missing item."""


class CheckpointWriteError(OSError):
  """A checkpoint save that failed (full disk, I/O error); earlier steps are intact."""


# Orbax saves a replicated array in parts, one per replica (replica-parallel writes,
# its default on CPU and TPU), each part cut out by a small compiled program: for a
# model of many small arrays on several devices that is most of a short run's first
# save, and no faster to write. Arrays of at least MIN_PARALLEL_SLICE bytes per
# replica keep it; smaller ones are written whole by their first replica. The
# format on disk is the same either way.
MIN_PARALLEL_SLICE = 1 << 20
_ARRAY_HANDLER = []


def _register_array_handler() -> None:
  """Registers (once) Orbax's jax.Array handler with MIN_PARALLEL_SLICE."""
  if not _ARRAY_HANDLER:
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_PARALLEL_SLICE)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    _ARRAY_HANDLER.append(handler)


def _item_handlers():
  _register_array_handler()
  return {"model": ocp.StandardCheckpointHandler(),
          "optimizer": ocp.StandardCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler(),
          "distiller": ocp.StandardCheckpointHandler(),
          "objective_state": ocp.StandardCheckpointHandler()}


def _chain(e: BaseException) -> List[BaseException]:
  """`e` and the exceptions it was raised from (causes and contexts), outermost first."""
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _first_line(e: BaseException, limit: int = 240) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit] + "..."


# A TensorStore status (what Orbax passes on from a damaged file), e.g.
# 'OUT_OF_RANGE: Error reading ...', 'DATA_LOSS: ...', 'FAILED_PRECONDITION: ...'.
_STATUS = re.compile(r"^[A-Z][A-Z_]+: ")


def damage(e: BaseException) -> Optional[str]:
  """What was unreadable where `e` (from an Orbax restore or metadata read) says
  files are damaged or missing; None where it is another error (a bug, a wrong
  target), which must not be taken for a corrupt checkpoint."""
  for x in _chain(e):
    if isinstance(x, PermissionError):  # Readable by someone else: not damage.
      return None
    if isinstance(x, (OSError, KeyError, EOFError, json.JSONDecodeError)) or (
        isinstance(x, ValueError) and _STATUS.match(str(x))):
      return f"{type(x).__name__}: {_first_line(x)}" if isinstance(x, KeyError) \
          else _first_line(x)
  return None


def write_failure(e: BaseException) -> Optional[str]:
  """What a storage that cannot take a write says behind `e` ('No space left on
  device', 'Input/output error', ...), or None where `e` is another error. Orbax
  raises the OSError itself, or TensorStore's status text that quotes it."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in WRITE_ERRNOS:
      return os.strerror(x.errno)
    found = [t for t in _WRITE_TEXTS if t in str(x)]
    if found:
      return found[0]
  return None


def _errno_of(reason: str) -> Optional[int]:
  return next((code for code in WRITE_ERRNOS if os.strerror(code) == reason), None)


def _all_agree(ok: bool) -> bool:
  """True where `ok` holds on every process (each process reads the checkpoint)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class _StageManager(ocp.CheckpointManager):
  """A CheckpointManager whose failed saves raise one `CheckpointWriteError`.

  Orbax finishes a save in a background thread and reports its failure at the next
  `save` or `wait_until_finished`; the error names the step whose save failed and the
  newest complete one.
  """
  _saving: Optional[int] = None  # The step of the last save started.
  _failed: Optional[BaseException] = None

  def _write_error(self, step, e: BaseException) -> CheckpointWriteError:
    reason = write_failure(e) or _first_line(e)
    stage = os.path.basename(os.path.dirname(str(self.directory)))
    kept = [s for s in self.all_steps() if s != step]
    intact = (f"the checkpoint of step {max(kept)}" if kept else
              "no earlier checkpoint of this stage exists; earlier stages")
    err = CheckpointWriteError(
        f"[{stage}] could not save the checkpoint of step {step} in {self.directory} "
        f"({reason}). The run stopped; {intact} and results.json are intact. Free "
        "space (or fix the disk), then run the same command to resume.")
    err.errno = _errno_of(reason)
    self._failed = err
    return err

  def save(self, step, *args, **kwargs):
    self.wait_until_finished()  # A failure of the save before is that save's.
    self._saving = step
    try:
      return super().save(step, *args, **kwargs)
    except CheckpointWriteError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if write_failure(e) is None:
        raise
      raise self._write_error(step, e) from e

  def wait_until_finished(self):
    try:
      super().wait_until_finished()
    except CheckpointWriteError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if write_failure(e) is None:
        raise
      raise self._write_error(self._saving, e) from e

  def close(self):
    if self._failed is None:
      return super().close()
    try:  # The failure is already being reported: do not raise it twice.
      super().close()
    except Exception:  # pylint: disable=broad-except
      pass


def manager(stage_dir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """The CheckpointManager of one stage directory (`stage_dir/checkpoints`).

  Every process must create it (and call `save`/`restore_state`): Orbax coordinates
  the processes. Temporary folders of saves cut short by a kill are deleted. A save
  that fails (full disk) raises `CheckpointWriteError` (at that `save`, the next, or
  `wait_until_finished`).
  """
  if max_to_keep < 1:
    raise ConfigError(f"max_checkpoints_to_keep must be at least 1; got {max_to_keep} "
                     "(config.max_checkpoints_to_keep=2 keeps a fallback).")
  path = os.path.abspath(os.path.join(stage_dir, CHECKPOINT_DIR))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  return _StageManager(path, options=options, item_handlers=_item_handlers())


def _reader(ckpt_dir: str) -> ocp.CheckpointManager:
  """A read-only manager of `ckpt_dir` (nothing written, no cleanup)."""
  with _quiet():  # Orbax warns that it sets read-only options.
    return ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers=_item_handlers())


def save(mngr: ocp.CheckpointManager, step: int, state,
         meta: Optional[Dict[str, Any]] = None) -> None:
  """Saves a `train.TrainState` and a JSON `meta` dict at `step` (asynchronously).

  Call `mngr.wait_until_finished()` before relying on it. Raises
  `CheckpointWriteError` where this save or the one before failed (full disk).
  """
  items = dict(
      model=ocp.args.StandardSave(state.variables),
      optimizer=ocp.args.StandardSave({"opt_state": state.opt_state,
                                       "step": state.step}),
      meta=ocp.args.JsonSave(meta or {}))
  if state.distiller_params:
    items["distiller"] = ocp.args.StandardSave(state.distiller_params)
  if state.objective_state:  # A stateful objective's (CRD's memory bank).
    items["objective_state"] = ocp.args.StandardSave(state.objective_state)
  mngr.save(step, args=ocp.args.Composite(**items))


def save_model(path: str, variables, step: int = 0) -> None:
  """Writes `{'params', 'batch_stats'}` alone as a checkpoint that `restore_model`
  (and so `config.teacher.checkpoint`) reads; `path` is the stage-like directory."""
  with manager(path) as mngr:
    mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(variables)))
    mngr.wait_until_finished()


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _shapes(tree) -> Dict[str, Tuple[int, ...]]:
  return {jax.tree_util.keystr(kp): tuple(x.shape)
          for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _classes(shapes: Dict[str, Tuple[int, ...]]) -> Optional[int]:
  """The number of classes of a classifier (its bias's size, else its kernel's last)."""
  for key in sorted(shapes, key=lambda k: "bias" not in k):
    if "classifier" in key and shapes[key]:
      return shapes[key][-1]
  return None


def architecture_mismatch(expected, stored, what: str, path: str, step: int,
                          section: str = "") -> Optional[str]:
  """Why arrays of shapes `stored` (a checkpoint's metadata) cannot be restored into
  `expected` (the configured model's tree), naming the config field to change; None
  where every array's path and shape match.

  Args:
    expected, stored: trees with `.shape` leaves (arrays, ShapeDtypeStructs,
      Orbax ArrayMetadata).
    section: the config section of the model, 'teacher' or 'student' ('' names no
      section).
  """
  want, got = _shapes(expected), _shapes(stored)
  if want == got:
    return None
  prefix = f"config.{section}." if section else "config.<teacher|student>."
  where = f"{what} {path!r} (step {step}) does not fit the configured architecture"
  diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  if all("classifier" in k and k in want and k in got for k in diff):
    there, here = _classes(got), _classes(want)
    if section == "teacher":
      fix = (f"a teacher trained on another task: set {prefix}num_classes={there}")
    else:
      fix = ("it was trained on another data set or choice of classes: use the "
             "checkpoint's (config.data.name, config.data.classes)")
    return f"{where}: its classifier has {there} classes, the configured {here}; {fix}."
  first = diff[0]
  detail = (f"{first} has shape {got[first]} there, {want[first]} here"
            if first in want and first in got else
            f"{first} is {'only in the checkpoint' if first in got else 'missing there'}")
  return (f"{where}: {detail} ({len(got)} arrays there, {len(want)} here): it holds "
          f"another model; set {prefix}model and {prefix}width_multiplier to the "
          "checkpoint's.")


def _corrupt(what: str, path: str, step: int, problem: str) -> CorruptCheckpoint:
  err = CorruptCheckpoint(f"{what} {path!r} (step {step}) is corrupt, it cannot be "
                          f"read ({problem}).")
  err.problem = problem
  return err


def _problem(e: CorruptCheckpoint) -> str:
  """The damage a CorruptCheckpoint names."""
  return getattr(e, "problem", str(e))


def _model_metadata(mngr, step: int, what: str, path: str):
  """The stored tree of the `model` item (shapes and dtypes), read before any array.
  Raises CorruptCheckpoint where it cannot be read or the item is missing."""
  try:
    stored = mngr.item_metadata(step).get("model")
  except Exception as e:  # pylint: disable=broad-except
    problem = damage(e)
    if problem is None:
      raise
    raise _corrupt(what, path, step, problem) from e
  if stored is None or not jax.tree.leaves(stored):
    raise _corrupt(what, path, step, "its 'model' item or that item's metadata is "
                   "missing")
  return stored


def _restore(mngr, step: int, args, what: str, path: str):
  """`mngr.restore(step, args)`, damaged or missing files as CorruptCheckpoint."""
  try:
    return mngr.restore(step, args=args)
  except Exception as e:  # pylint: disable=broad-except
    problem = damage(e)
    if problem is None:
      raise
    raise _corrupt(what, path, step, problem) from e


def restore_state(mngr: ocp.CheckpointManager, step: int, state, what: str = ""):
  """Restores a `train.TrainState` saved by `save`, with `state`'s shapes and
  shardings. Returns `(state, meta)`; `meta` is `{}` for checkpoints without one.

  Raises CorruptCheckpoint where the step cannot be read (compared first: another
  architecture is a ValueError).
  """
  path = str(mngr.directory)
  what = what or "checkpoint"
  problem = architecture_mismatch(state.variables, _model_metadata(mngr, step, what, path),
                                  what, path, step)
  if problem:
    raise ConfigError(problem)
  items = dict(
      model=ocp.args.StandardRestore(_abstract(state.variables)),
      optimizer=ocp.args.StandardRestore(_abstract({"opt_state": state.opt_state,
                                                    "step": state.step})))
  has_meta = (mngr.directory / str(step) / "meta").exists()
  if has_meta:
    items["meta"] = ocp.args.JsonRestore()
  if state.distiller_params:
    items["distiller"] = ocp.args.StandardRestore(_abstract(state.distiller_params))
  if state.objective_state:
    items["objective_state"] = ocp.args.StandardRestore(
        _abstract(state.objective_state))
  restored = _restore(mngr, step, ocp.args.Composite(**items), what, path)
  params = {"student": restored.model["params"],
            "distiller": restored.distiller if state.distiller_params else {}}
  if state.objective_state:
    state = state.replace(objective_state=restored.objective_state)
  state = state.replace(params=params, batch_stats=restored.model["batch_stats"],
                        opt_state=restored.optimizer["opt_state"],
                        step=restored.optimizer["step"])
  return state, (dict(restored.meta) if has_meta else {})


def set_aside(ckpt_dir: str, step: int) -> str:
  """Renames step `step` of `ckpt_dir` to `<step>.corrupt-<time>` (process 0; every
  process waits for it), a name Orbax ignores; returns the new name. Kept, not
  deleted: what was wrong can still be looked at."""
  name = f"{step}{CORRUPT_SUFFIX}{time.strftime('%Y%m%dT%H%M%S')}"
  if jax.process_index() == 0:
    base, k = name, 1
    while os.path.exists(os.path.join(ckpt_dir, name)):
      name, k = f"{base}.{k}", k + 1
    os.rename(os.path.join(ckpt_dir, str(step)), os.path.join(ckpt_dir, name))
  _sync(f"set aside {ckpt_dir} {step}")
  return name


def restore_latest(mngr: ocp.CheckpointManager, state, stage: str):
  """Restores the newest intact checkpoint of a stage into `state`.

  A step that cannot be read is moved aside (`set_aside`, one warning line naming it)
  and the step before it is tried: the stage then recomputes from there what an
  uninterrupted run computes. Returns `(state, meta, step)`; `(state, {}, 0)` where no
  intact checkpoint is left (the stage starts over). Another architecture is a
  ValueError (never moved aside).
  """
  while True:
    step = mngr.latest_step()
    if step is None:
      return state, {}, 0
    restored, problem = None, "it could not be read on another process"
    try:
      restored = restore_state(mngr, step, state, f"[{stage}] checkpoint")
    except CorruptCheckpoint as e:
      problem = _problem(e)
    if _all_agree(restored is not None):
      return restored + (step,)
    moved = set_aside(str(mngr.directory), step)
    mngr.reload()
    previous = mngr.latest_step()
    then = (f"resuming from step {previous}" if previous is not None else
            "no intact checkpoint is left, so the stage starts over from step 0")
    log.warning("[%s] the checkpoint of step %d cannot be read (%s); moved it to %s and "
                "%s.", stage, step, problem, os.path.join(str(mngr.directory), moved),
                then)


def _read_as_saved(mngr, step: int, what: str, path: str):
  """The `model` item of `step` as stored (host arrays), every array read."""
  stored = _model_metadata(mngr, step, what, path)
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), stored)
  return _restore(mngr, step, ocp.args.Composite(
      model=ocp.args.StandardRestore(target)), what, path).model


def final_intact(stage_dir: str, final_step: int, stage: str) -> bool:
  """Whether a finished stage's final checkpoint (step `final_step`) is there and can
  be read in full (its model item: what later stages restore).

  Where it cannot be read it is moved aside (`set_aside`): False (with one warning)
  tells the caller to run the stage again, which resumes from its newest intact
  checkpoint and computes the same final weights.
  """
  ckpt_dir = os.path.join(os.path.abspath(stage_dir), CHECKPOINT_DIR)
  latest, problem = None, None
  if os.path.isdir(ckpt_dir):
    with _reader(ckpt_dir) as mngr:
      latest = mngr.latest_step()
      if latest == final_step:
        try:
          _read_as_saved(mngr, latest, f"[{stage}] checkpoint", ckpt_dir)
        except CorruptCheckpoint as e:
          problem = _problem(e)
  if latest != final_step:
    log.warning("[%s] finished earlier, but its final checkpoint (step %d) is missing; "
                "the stage runs again from its newest checkpoint.", stage, final_step)
    return False
  if _all_agree(problem is None):
    return True
  moved = set_aside(ckpt_dir, final_step)
  log.warning("[%s] its final checkpoint (step %d) cannot be read (%s); moved it to %s, "
              "and the stage runs again from its newest intact checkpoint.", stage,
              final_step, problem or "on another process", os.path.join(ckpt_dir, moved))
  return False


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
  (and a kill) see the old file or the new, never half. Where the write fails (a full
  disk), `path` keeps its old content and the partial `path.tmp` is removed."""
  tmp = path + ".tmp"
  try:
    with open(tmp, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON atomically (`_write_atomic`)."""
  _write_atomic(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True), "w")


def write_npy_atomic(path: str, array) -> None:
  """`np.save` to `path` atomically (`_write_atomic`)."""
  _write_atomic(path, lambda f: np.save(f, array), "wb")


def _section_of(what: str) -> str:
  """The config section a checkpoint's model is configured by, from how callers name
  it ('teacher checkpoint', 'stage-1 checkpoint ...')."""
  return "teacher" if what.lower().startswith("teacher") else "student"


def _latest_step(mngr, what: str, path: str) -> int:
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{what} {path!r} holds no complete checkpoint.")
  return step


def _existing_checkpoint_dir(path: str, what: str) -> str:
  ckpt_dir = resolve_checkpoint_dir(path)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{what} {path!r} does not exist; give a stage directory "
                            "written by fsp_jax (e.g. WORKDIR/teacher).")
  return ckpt_dir


def restore_model(path: str, variables, what: str = "checkpoint",
                  section: Optional[str] = None):
  """Restores `{'params', 'batch_stats'}` from the latest checkpoint under `path`.

  The stored shapes are compared with `variables` before any array is read. Never
  falls back to an older step (it would not be the final weights); never writes
  (a checkpoint from another workdir is opened read-only).

  Args:
    path: a stage directory or its checkpoints/ folder.
    variables: a tree of the expected structure (arrays or ShapeDtypeStructs with the
      wanted shardings).
    what: how to name the checkpoint in errors (e.g. "teacher checkpoint").
    section: the config section of its model ('teacher', 'student'), named in errors;
      by default read from `what`.
  Returns:
    `(variables, step)`.
  Raises:
    FileNotFoundError where no checkpoint exists, ValueError naming the field to
    change where it holds another architecture, CorruptCheckpoint (a ValueError)
    where it cannot be read.
  """
  ckpt_dir = _existing_checkpoint_dir(path, what)
  with _reader(ckpt_dir) as mngr:
    step = _latest_step(mngr, what, path)
    try:
      problem = architecture_mismatch(variables,
                                      _model_metadata(mngr, step, what, path), what,
                                      path, step, section or _section_of(what))
      if problem:
        raise ConfigError(problem)
      restored = _restore(mngr, step, ocp.args.Composite(
          model=ocp.args.StandardRestore(_abstract(variables))), what, path)
    except CorruptCheckpoint as e:
      others = [s for s in mngr.all_steps() if s != step]
      older = (f" (its step{'s' if len(others) > 1 else ''} "
               f"{', '.join(map(str, others))} hold{'' if len(others) > 1 else 's'} "
               "earlier, not final, weights)" if others else "")
      raise CorruptCheckpoint(
          f"{e} Rerun the run that wrote it, which recomputes a final checkpoint that "
          f"cannot be read{older}, or give another checkpoint.") from None
  return restored.model, step


def restore_distiller(path: str, params, what: str = "checkpoint"):
  """Restores a stage's objective parameters (its `distiller` item: a stage 1's
  paraphraser, regressor) from the latest checkpoint under `path`, with `params`'
  structure, shapes and shardings (ShapeDtypeStructs). Raises as `restore_model`."""
  ckpt_dir = _existing_checkpoint_dir(path, what)
  with _reader(ckpt_dir) as mngr:
    step = _latest_step(mngr, what, path)
    if not (mngr.directory / str(step) / "distiller").exists():
      raise ConfigError(f"{what} {path!r} holds no parameters of its objective at step "
                        f"{step}: give the stage directory of this method's stage 1.")
    restored = _restore(mngr, step, ocp.args.Composite(
        distiller=ocp.args.StandardRestore(_abstract(params))), what, path)
  return restored.distiller


@contextlib.contextmanager
def _quiet():
  """Absl (Orbax) log lines below ERROR are dropped inside the block."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


def _pretrained_mismatch(stored_shapes, variables, what: str, path: str) -> List[str]:
  """Raises ValueError where an array of `variables` is missing from the stored
  shapes or has another shape (the classifier excepted); returns the classifier's
  arrays that differ (they start from `variables`' values)."""
  reinitialised = []
  for key, shape in _shapes(variables).items():
    if key not in stored_shapes:
      raise ConfigError(f"{what} {path!r} has no {key}: it holds another architecture "
                       "(config.teacher.model, config.teacher.width_multiplier).")
    if tuple(stored_shapes[key]) != shape:
      if "classifier" in key:
        reinitialised.append(key)
        continue
      raise ConfigError(f"{what} {path!r}: {key} has shape {tuple(stored_shapes[key])}, "
                       f"the configured architecture expects {shape} "
                       "(config.teacher.model, config.teacher.width_multiplier).")
  return reinitialised


def check_pretrained(path: str, variables, what: str = "pretrained checkpoint") -> None:
  """What `restore_pretrained` would refuse, from the stored shapes alone (no array
  read): a missing checkpoint, another architecture, unreadable metadata."""
  ckpt_dir = _existing_checkpoint_dir(path, what)
  with _reader(ckpt_dir) as mngr:
    step = _latest_step(mngr, what, path)
    stored = _shapes(_model_metadata(mngr, step, what, path))
  _pretrained_mismatch(stored, variables, what, path)


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
  ckpt_dir = _existing_checkpoint_dir(path, what)
  with _reader(ckpt_dir) as mngr:
    step = _latest_step(mngr, what, path)
    stored = _model_metadata(mngr, step, what, path)
    reinitialised = _pretrained_mismatch(_shapes(stored), variables, what, path)
    # Restored as saved (host arrays), so a differently sized classifier still loads.
    saved = _read_as_saved(mngr, step, what, path)
  saved_leaves = {jax.tree_util.keystr(kp): v for kp, v in
                  jax.tree_util.tree_flatten_with_path(saved)[0]}

  def pick(kp, current):
    key = jax.tree_util.keystr(kp)
    if key in reinitialised:
      return current
    return jax.device_put(np.asarray(saved_leaves[key], current.dtype), current.sharding)

  out = jax.tree_util.tree_map_with_path(pick, variables)
  if reinitialised:
    log.info("%s: %s differ in shape (another number of classes) and start from random "
             "weights.", what, ", ".join(reinitialised))
  return out, step


def warn_if_short_of_space(workdir: str, nbytes: int) -> bool:
  """Logs one warning (and returns True) where the file system of `workdir` has less
  than `nbytes` free: a save that then fails stops the run (CheckpointWriteError)."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  stat = os.statvfs(path)
  free = stat.f_bavail * stat.f_frsize
  if nbytes <= free:
    return False
  log.warning("the checkpoints of this run take about %s, but only %s are free under "
              "%s; a full disk stops the run (exit status 4) and the same command "
              "resumes once there is space.", _size(nbytes), _size(free), path)
  return True


def _size(nbytes: int) -> str:
  """'3.2 GiB', '640 MiB', '12 KiB'."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
    if nbytes >= scale:
      return f"{nbytes / scale:.3g} {unit}"
  return f"{nbytes / 2**10:.3g} KiB"
