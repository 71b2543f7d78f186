"""Why a stage stops early: SIGTERM or a preemption notice, and non-finite losses.

- `PreemptionWatch`: after SIGTERM (one process) or JAX's preemption notice (several
  processes, all agreeing on the step), the loop saves a checkpoint after the current
  step and raises `Preempted`; running the same command again resumes.
- `NonFiniteGuard`: a non-finite loss is tracked on the device after every step (no
  host sync) and checked at log steps and before every save; parameters are checked
  before every save. No checkpoint with a NaN or inf is ever written, and the error
  names the first bad step and the field to change.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

log = logging.getLogger("fsp_jax")


class Preempted(Exception):
  """Raised after SIGTERM (or a preemption notice) once a checkpoint has been written."""


class PreemptionWatch:
  """Says when to save and stop: after SIGTERM, at the same step on every process.

  One process: a SIGTERM handler sets a flag (restored on exit). Several processes:
  JAX's preemption service (started by `jax.distributed.initialize`, which takes over
  SIGTERM) makes every process stop at one agreed step, so that all of them join the
  collective save; `reached` must then be called at every step by every process.
  """

  def __init__(self):
    self.signalled = False
    self._multi = jax.process_count() > 1
    self._old_handler = None
    self._ticks = 0  # Steps run by this process, all stages: the same on every process.

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc):
    if self._old_handler is not None:
      signal.signal(signal.SIGTERM, self._old_handler)
      self._old_handler = None

  def _on_sigterm(self, signum, frame):
    log.warning("SIGTERM: saving a checkpoint after this step, then exiting.")
    self.signalled = True

  def reached(self) -> bool:
    """Call once per training step; True where this step must be saved and the run end."""
    self._ticks += 1
    if self._multi and not self.signalled:
      try:
        self.signalled = multihost_utils.reached_preemption_sync_point(self._ticks)
      except RuntimeError as e:  # jax_enable_preemption_service=False.
        log.warning("no preemption checkpoints (SIGTERM kills): %s", e)
        self._multi = False
    return self.signalled


def track_nonfinite(first_bad: Tuple[jax.Array, jax.Array], loss: jax.Array,
                    step) -> Tuple[jax.Array, jax.Array]:
  """`(step, loss)` of the first non-finite loss seen so far; step is -1 while none.

  Runs on the device after every training step, so the host learns the exact step of a
  NaN or inf without waiting for each step's loss (which would stall dispatch).
  """
  bad_step, bad_loss = first_bad
  new = (bad_step < 0) & ~jnp.isfinite(loss)
  return jnp.where(new, step, bad_step), jnp.where(new, loss, bad_loss)


def all_finite(tree) -> jax.Array:
  """True where every array of `tree` (e.g. params and batch_stats) is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


_track = jax.jit(track_nonfinite)


@jax.jit
def _track_many(first_bad, losses, first_step):
  """`track_nonfinite` over the losses `(K, ...)` of steps first_step, first_step+1..."""
  bad = ~jnp.all(jnp.isfinite(losses.reshape(losses.shape[0], -1)), axis=1)
  k = jnp.argmax(bad)
  worst = losses.reshape(losses.shape[0], -1)[k]
  loss = jnp.where(jnp.isfinite(worst), 0.0, worst)
  loss = loss[jnp.argmax(~jnp.isfinite(worst))]
  return track_nonfinite(first_bad, jnp.where(jnp.any(bad), loss, 0.0), first_step + k)
_all_finite = jax.jit(all_finite)


class NonFiniteGuard:
  """The non-finite-loss policy of one stage.

  Args:
    stage: the stage's name (for messages).
    lr_field: the config field of the stage's learning rates, what the error says
      to lower (e.g. 'fsp.schedule.learning_rates').
    stage_dir: the stage's directory (the error says how to redo the stage).
    sharding: where the device-side tracker lives (replicated).
  """

  def __init__(self, stage: str, lr_field: str, stage_dir: str, sharding):
    self.stage, self.lr_field, self.stage_dir = stage, lr_field, stage_dir
    self.first_bad = jax.device_put((jnp.int32(-1), jnp.float32(0)), sharding)

  def track(self, loss: jax.Array, step: int, first_step: Optional[int] = None) -> None:
    """After every call (asynchronous: nothing waits for the device).

    Args:
      loss: the step's loss, or the losses `(K, ...)` of steps `first_step..step`
        (K steps in one call; trailing axes, e.g. seeds, are any-of).
      step: the (last) step's number, counted from 1.
    """
    if first_step is None or jnp.ndim(loss) == 0:
      self.first_bad = _track(self.first_bad, loss, step)
    else:
      self.first_bad = _track_many(self.first_bad, loss, first_step)

  def check(self, mngr, step: int, variables=None) -> None:
    """Raises FloatingPointError where a loss so far, or `variables`, is not finite.

    Called at log steps (`variables` None: the loss only) and before every save.
    """
    bad_step, bad_loss = int(self.first_bad[0]), float(self.first_bad[1])
    if bad_step < 0 and (variables is None or bool(_all_finite(variables))):
      return
    mngr.wait_until_finished()
    good: Optional[int] = mngr.latest_step()
    what = (f"the loss became {bad_loss} at step {bad_step}" if bad_step >= 0 else
            f"the parameters became NaN or infinite by step {step}")
    kept = (f"the last good checkpoint (step {good}) is kept" if good is not None
            else "no checkpoint was written")
    raise FloatingPointError(
        f"[{self.stage}] {what}; training stopped and {kept}. Lower the learning "
        f"rate (config.{self.lr_field}) and rerun with a new --workdir (or delete "
        f"{self.stage_dir} to redo the stage).")
