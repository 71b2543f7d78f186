"""One run per workdir: an exclusive lock held for the run's lifetime.

`WORKDIR/.lock` is locked with `flock` by process 0 of a run. The kernel releases it
when the process ends, however it ends (SIGKILL included), so no stale lock ever blocks
a resume. The file holds the holder's host, pid and start time, for the message a
second run prints. Other processes of a multi-process run do not lock: they follow
process 0.

Shared storage: `flock` is exclusive across hosts on Linux NFS (v4, or v3 with lockd:
the client maps it to a POSIX byte-range lock) and on Lustre/GPFS mounted with locking
on; a file system mounted without lock support (`nolock`, some FUSE mounts) makes
`flock` local to each host, so two hosts would not see each other's lock.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import time
from typing import Optional

LOCK_FILE = ".lock"
log = logging.getLogger("fsp_jax")


class WorkdirBusy(ValueError):
  """Another run holds the workdir."""


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.load(f)
    return (f"host {info['host']}, pid {info['pid']}, started {info['started']}")
  except (OSError, ValueError, KeyError):
    return "a process whose details are not readable"


class WorkdirLock:
  """`with WorkdirLock(workdir, wait=False):` holds `workdir` for the block.

  Args:
    workdir: the run's directory (created if missing).
    wait: where another run holds it, wait for that run to end instead of failing.
    poll_s: how often to try again while waiting.
  Raises:
    WorkdirBusy (a ValueError) where another run holds it and `wait` is False.
  """

  def __init__(self, workdir: str, wait: bool = False, poll_s: float = 5.0):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.wait, self.poll_s = wait, poll_s
    self._fd: Optional[int] = None

  def __enter__(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    waited = False
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        holder = _holder(self.path)
        if not self.wait:
          os.close(fd)
          raise WorkdirBusy(
              f"workdir {os.path.dirname(self.path)} is in use by another fsp_jax run "
              f"({holder}); wait for it to end or stop it, run with "
              "--wait_for_workdir to start once it is free, or use another --workdir."
              ) from None
        if not waited:
          log.warning("workdir %s is in use (%s); waiting for it.",
                      os.path.dirname(self.path), holder)
          waited = True
        time.sleep(self.poll_s)
    # Ours now: say who holds it (the file's content is only read by waiting runs).
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
