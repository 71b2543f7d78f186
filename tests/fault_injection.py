"""The fsp_jax command line with one injected fault, for tests/test_reliability.py.

    FSP_FAULT=KIND:STAGE[:STEP] python tests/fault_injection.py --config ... --workdir ...

KIND says where the process signals itself, fails a write or pauses, so the test hits
exact moments that an outside fault would only hit by luck:
  mid_save:STAGE:STEP   SIGKILL while Orbax saves step STEP of STAGE: the first item
                        is written into the temporary folder, the step is not committed.
  before_results:STAGE  SIGKILL after STAGE finished (final checkpoint and metrics line
                        written) with results.json.tmp half written, before the rename.
  sigterm:STAGE:STEP    SIGTERM just before STAGE runs training step STEP (0-based).
  enospc:STAGE:STEP     OSError(ENOSPC) while Orbax saves step STEP of STAGE (in its
                        background thread, as the first item's folder is committed):
                        what a full disk does to a save.
  eio:STAGE:STEP        The same with OSError(EIO), a failing disk.
  enospc_results:STAGE  OSError(ENOSPC) writing results.json after STAGE finished.
  pause:STAGE:STEP      Before STAGE runs step STEP, prints 'fault: paused' and waits
                        until the file $FSP_RELEASE exists (a run held mid-way).
"""
import errno
import os
import signal
import sys
import time

# This tree's fsp_jax, not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsp_jax import checkpoints, data, main, metrics, train  # noqa: E402


def _signal_self(sig):
  sys.stderr.flush()
  os.kill(os.getpid(), sig)


def install(fault: str) -> None:
  kind, stage, *rest = fault.split(":")
  current = [None]
  real_stage = train.train_and_evaluate

  def train_and_evaluate(s, *args):
    current[0] = s.name
    return real_stage(s, *args)

  train.train_and_evaluate = train_and_evaluate

  if kind in ("mid_save", "enospc", "eio"):
    from orbax.checkpoint._src.path import atomicity
    target = os.path.join(stage, checkpoints.CHECKPOINT_DIR, rest[0])
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
      # Item folders finalize first (into the step's temporary folder), the step last.
      if target + "." in str(self._final_path) or str(self._final_path).endswith(target):
        if kind == "mid_save":
          _signal_self(signal.SIGKILL)
        code = errno.ENOSPC if kind == "enospc" else errno.EIO
        raise OSError(code, os.strerror(code), str(self._final_path))
      return await real_finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
  elif kind == "before_results":
    real_write = checkpoints.write_json_atomic

    def write_json_atomic(path, obj):
      if os.path.basename(path) == metrics.RESULTS and stage in obj:
        with open(path + ".tmp", "w") as f:
          f.write('{"teacher": {"kind": ')  # Half a file.
        _signal_self(signal.SIGKILL)
      return real_write(path, obj)

    checkpoints.write_json_atomic = write_json_atomic
  elif kind == "enospc_results":
    real_write = checkpoints.write_json_atomic

    def write_json_atomic(path, obj):
      if os.path.basename(path) == metrics.RESULTS and stage in obj:
        with open(path + ".tmp", "w") as f:
          f.write('{"teacher": ')  # What fit on the disk.
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path + ".tmp")
      return real_write(path, obj)

    checkpoints.write_json_atomic = write_json_atomic
  elif kind in ("sigterm", "pause"):
    real_batches = data.train_batches

    def train_batches(*args, **kwargs):
      for step, batch in real_batches(*args, **kwargs):
        if current[0] == stage and step == int(rest[0]):
          if kind == "sigterm":
            _signal_self(signal.SIGTERM)
          else:
            print("fault: paused", file=sys.stderr, flush=True)
            while not os.path.exists(os.environ["FSP_RELEASE"]):
              time.sleep(0.05)
        yield step, batch

    data.train_batches = train_batches
  else:
    raise SystemExit(f"unknown FSP_FAULT kind {kind!r}")


if __name__ == "__main__":
  if os.environ.get("FSP_FAULT"):
    install(os.environ["FSP_FAULT"])
  main.cli()
