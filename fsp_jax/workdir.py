"""One run per workdir: an exclusive lock held for the run's lifetime.

`WORKDIR/.lock` is locked with `flock` by process 0 of a run. The kernel releases it
when the process ends, however it ends (SIGKILL included), so no stale lock ever blocks
a resume. The file holds the holder's host, pid and start time, for the message a
second run prints. Other processes of a multi-process run do not lock: they follow
process 0 (`hold`).

Shared storage (docs/reliability.md): Linux NFS clients turn `flock` into a POSIX
byte-range lock that the server arbitrates (NFSv4, or v3 with lockd), so it excludes
runs on other hosts too; a host that dies without unlocking (power loss, not a killed
process) keeps it until the server's lease expires (NFSv4: about 90 s). Lustre and
GPFS lock across hosts when mounted with locking on (`flock` on Lustre). A file
system mounted without lock support (`nolock`, some FUSE mounts) makes `flock` local
to each host: two hosts would not see each other's lock.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
from typing import Iterator, Optional

LOCK_FILE = ".lock"
log = logging.getLogger("fsp_jax")


class WorkdirBusy(ValueError):
  """Another run holds the workdir."""


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.load(f)
    return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process whose details are not readable yet"


class WorkdirLock:
  """`with WorkdirLock(workdir, wait=False):` holds `workdir` for the block.

  Args:
    workdir: the run's directory (created if missing).
    wait: where another run holds it, wait (one log line) until that run ends
      instead of failing.
  Attributes:
    waited: whether another run held it first (what it wrote meanwhile must be
      checked again).
  Raises:
    WorkdirBusy (a ValueError) where another run holds it and `wait` is False: one
    line naming the holder's host, pid and start time, and what to do.
  """

  def __init__(self, workdir: str, wait: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.wait = wait
    self.waited = False
    self._fd: Optional[int] = None

  def __enter__(self):
    os.makedirs(self.workdir, exist_ok=True)
    # CLOEXEC: a program this run starts does not inherit (and keep) the lock.
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(self.path)
      if not self.wait:
        os.close(fd)
        raise WorkdirBusy(
            f"workdir {self.workdir} is in use by another fsp_jax run ({holder}); "
            "wait for it to end or stop it, run with --wait_for_workdir to start once "
            "it is free, or use another --workdir.") from None
      log.warning("workdir %s is in use by another fsp_jax run (%s); waiting for it to "
                  "end.", self.workdir, holder)
      self.waited = True
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # Blocks; returns the moment the holder ends.
      except BaseException:
        os.close(fd)
        raise
    # Ours now: say who holds it (read only by the runs this one turns away).
    info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": datetime.datetime.now().isoformat(timespec="seconds")
                       }).encode()
    os.pwrite(fd, info, 0)
    os.ftruncate(fd, len(info))
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


@contextlib.contextmanager
def hold(workdir: str, wait: bool = False) -> Iterator[WorkdirLock]:
  """Holds `workdir` for the block: process 0 locks it (`WorkdirLock`), and every
  process of a multi-process run learns the outcome, so that all of them stop where
  it is busy (WorkdirBusy) or go on together. Yields the lock (`.waited` agreed by all
  processes)."""
  import jax  # Only here: the lock itself needs no JAX.
  if jax.process_count() == 1:
    with WorkdirLock(workdir, wait) as lock:
      yield lock
    return
  from jax.experimental import multihost_utils
  import numpy as np
  lock, busy = WorkdirLock(workdir, wait), ""
  if jax.process_index() == 0:
    try:
      lock.__enter__()
    except WorkdirBusy as e:
      busy = str(e)
  # Processes other than 0 wait here while process 0 waits for the lock.
  ok, waited = multihost_utils.broadcast_one_to_all(
      np.array([busy == "", lock.waited], np.int32))
  if not ok:
    raise WorkdirBusy(busy or f"workdir {lock.workdir} is in use by another fsp_jax "
                      "run (process 0 names it).")
  lock.waited = bool(waited)
  try:
    yield lock
  finally:
    lock.__exit__()
