"""Real processes killed and resumed, several processes, and workdirs that do not fit.

Every run here is the real command line in a subprocess on `quickstart:smoke` (2 CPU
devices, see conftest's `cli_env`), without the scratch baseline: teacher, stage 1,
stage 2.
"""
import glob
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import with_devices
from fsp_jax import checkpoints, metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "quickstart:smoke"
FAULTS = os.path.join(REPO, "tests", "fault_injection.py")
STAGES = ("teacher", "fsp", "student")


@pytest.fixture(scope="module")
def env(cli_env):
  return cli_env


# A loss at every step: the curves compared below are complete.
COMMON = ("--config.log_every=1", "--config.baselines=()")


def _cmd(workdir, *args, fault=None):
  entry = [FAULTS] if fault else ["-m", "fsp_jax.main"]
  return [sys.executable, *entry, "--config", TINY, "--workdir", str(workdir), *COMMON,
          *args]


def run_cli(env, workdir, *args, fault=None, timeout=600):
  """Runs the CLI to its end; returns (exit status, stdout + stderr)."""
  proc = subprocess.run(_cmd(workdir, *args, fault=fault), cwd=REPO,
                        env=dict(env, FSP_FAULT=fault or ""), capture_output=True,
                        text=True, timeout=timeout)
  return proc.returncode, proc.stdout + proc.stderr


def run_cli_until(env, workdir, pattern, sig, *args):
  """Runs the CLI and sends it `sig` as soon as a line containing `pattern` appears."""
  proc = subprocess.Popen(_cmd(workdir, *args), cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if pattern in line:
      proc.send_signal(sig)
      break
  lines += proc.stdout.readlines()
  return proc.wait(timeout=600), "".join(lines)


def committed_steps(stage_dir):
  path = os.path.join(stage_dir, checkpoints.CHECKPOINT_DIR)
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def tmp_folders(stage_dir):
  return glob.glob(os.path.join(stage_dir, checkpoints.CHECKPOINT_DIR, "*tmp*"))


def metrics(stage_dir):
  """metrics.jsonl without the timing field (the only one a restart may change)."""
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  for r in records:
    r.pop("images_per_s", None)
  return records


def final_weights(stage_dir):
  """The model item of a stage's last committed checkpoint, on one device."""
  import orbax.checkpoint as ocp
  path = os.path.join(stage_dir, checkpoints.CHECKPOINT_DIR,
                      str(committed_steps(stage_dir)[-1]), "model")
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          meta)
    return jax.device_get(ckptr.restore(path, target))


def tree_digest(path):
  """A hash of every file under `path` (names and bytes): shows nothing was rewritten."""
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      h.update(os.path.relpath(full, path).encode())
      with open(full, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def clean_run(env, tmp_path_factory):
  """The uninterrupted run (one process, two devices) others are compared with."""
  workdir = tmp_path_factory.mktemp("clean")
  rc, out = run_cli(env, workdir)
  assert rc == 0, out
  return workdir


def assert_same_run(workdir, clean):
  """Same results.json numbers, metrics and final weights as the uninterrupted run."""
  got = json.load(open(os.path.join(workdir, metrics_lib.RESULTS)))
  want = json.load(open(os.path.join(clean, metrics_lib.RESULTS)))
  assert got.keys() == want.keys()
  for name in want:
    for key in ("steps", "test_accuracy", "test_loss", "test_fsp_loss"):
      assert got[name].get(key) == want[name].get(key), (name, key)
    assert metrics(os.path.join(workdir, name)) == metrics(os.path.join(clean, name)), name
    jax.tree.map(np.testing.assert_array_equal, final_weights(os.path.join(workdir, name)),
                 final_weights(os.path.join(clean, name)))


def test_killed_anywhere_then_resumed_equals_uninterrupted(env, clean_run, tmp_path):
  workdir = tmp_path / "run"

  # 1. SIGKILL mid-save of the teacher's step 8: the step stays a temporary folder.
  rc, out = run_cli(env, workdir, fault="mid_save:teacher:8")
  assert rc == -signal.SIGKILL, out
  assert committed_steps(workdir / "teacher") == [4]
  assert tmp_folders(workdir / "teacher"), "the kill should leave a cut-short save"
  assert not (workdir / metrics_lib.RESULTS).exists()

  # 2. Resumes the teacher from step 4 (the cut-short save is deleted), then an outside
  # SIGKILL lands somewhere in stage 1 after its step 2 (wherever the process is).
  rc, out = run_cli_until(env, workdir, "[fsp] step 2/8", signal.SIGKILL)
  assert rc == -signal.SIGKILL, out
  assert "[teacher] resumes from its checkpoint at step 4" in out
  assert not tmp_folders(workdir / "teacher")
  assert list(json.load(open(workdir / metrics_lib.RESULTS))) == ["teacher"]

  # 3. SIGKILL after stage 1's final checkpoint and metrics, mid-way through writing
  # results.json (its temporary file is half written).
  rc, out = run_cli(env, workdir, fault="before_results:fsp")
  assert rc == -signal.SIGKILL, out
  assert committed_steps(workdir / "fsp")[-1] == 8
  assert (workdir / (metrics_lib.RESULTS + ".tmp")).exists()
  assert "fsp" not in json.load(open(workdir / metrics_lib.RESULTS))

  # 4. Stage 1 is only evaluated again; SIGTERM before stage 2's step 5 (0-based): it
  # saves step 6, an off-schedule step, and exits with 143.
  rc, out = run_cli(env, workdir, fault="sigterm:student:5")
  assert rc == 143, out
  assert "[fsp] resumes from its checkpoint at step 8" in out
  assert "checkpoint at step 6 saved" in out and "Traceback" not in out
  assert committed_steps(workdir / "student")[-1] == 6
  assert not tmp_folders(workdir / "student")

  # 5. Finishes.
  rc, out = run_cli(env, workdir)
  assert rc == 0, out
  assert "[student] resumes from its checkpoint at step 6" in out
  assert_same_run(workdir, clean_run)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(env, workdir, *args, sigterm_at=None):
  """Two CLI processes of one run on loopback, one CPU device each.

  With `sigterm_at`, process 0 gets SIGTERM when it logs a line containing it.
  Returns [(exit status, output)] of processes 0 and 1.
  """
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}", *args),
      cwd=REPO, env=with_devices(env, 1), text=True, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT) for i in range(2)]
  out0 = []
  for line in procs[0].stdout:
    out0.append(line)
    if sigterm_at and sigterm_at in line:
      procs[0].send_signal(signal.SIGTERM)
      sigterm_at = None
  out1 = procs[1].stdout.read()
  return [(procs[0].wait(timeout=600), "".join(out0)), (procs[1].wait(timeout=600), out1)]


def test_two_processes_match_one_process_with_two_devices(env, clean_run, tmp_path):
  workdir = tmp_path / "two"
  # The one-process run's teacher, restored by both processes (checkpoints written
  # with another device layout), then stage 1 and stage 2 on two processes.
  teacher = f"--config.teacher.checkpoint={clean_run / 'teacher'}"
  # SIGTERM reaches process 0 only; JAX's preemption service stops both at one step.
  (rc0, out0), (rc1, out1) = run_two_processes(env, workdir, teacher,
                                               sigterm_at="[fsp] step 2/8")
  assert (rc0, rc1) == (143, 143), out0 + out1
  saved = re.findall(r"\[(\w+)\] SIGTERM: checkpoint at step (\d+) saved", out0 + out1)
  assert len(saved) == 2 and saved[0] == saved[1], out0 + out1
  stage, step = saved[0]
  assert committed_steps(workdir / stage)[-1] == int(step)

  (rc0, out0), (rc1, out1) = run_two_processes(env, workdir, teacher)
  assert (rc0, rc1) == (0, 0), out0 + out1
  assert f"[{stage}] resumes from its checkpoint at step {step}" in out0
  assert "results:" in out0 and "results:" not in out1  # Reports from process 0 only.
  assert "[student]" not in out1  # Progress lines too.

  got = json.load(open(workdir / metrics_lib.RESULTS))
  want = json.load(open(clean_run / metrics_lib.RESULTS))
  assert list(got) == ["fsp", "student"]
  for name in got:
    a, b = metrics(workdir / name), metrics(clean_run / name)
    assert [r["step"] for r in a] == [r["step"] for r in b], name  # No duplicates.
    for ra, rb in zip(a, b):
      for key in ("loss", "accuracy", "test_loss", "test_fsp_loss"):
        if key in rb:
          np.testing.assert_allclose(ra[key], rb[key], rtol=1e-4, err_msg=(name, ra))
    for key in ("test_accuracy", "test_fsp_loss"):
      if key in want[name]:
        np.testing.assert_allclose(got[name][key], want[name][key], rtol=1e-4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5),
                 final_weights(workdir / name), final_weights(clean_run / name))


def assert_one_line_error(rc, out, message):
  assert rc == 2, out
  errors = [line for line in out.splitlines() if line.startswith("fsp_jax: error: ")]
  assert len(errors) == 1 and message in errors[0], out
  assert "Traceback" not in out


def test_teacher_checkpoint_of_another_architecture(env, clean_run, tmp_path):
  teacher = clean_run / "teacher"  # A trained cifar_resnet8.
  before = tree_digest(teacher)
  rc, out = run_cli(env, tmp_path / "w", f"--config.teacher.checkpoint={teacher}",
                    "--config.teacher.model=cifar_resnet14")
  assert_one_line_error(rc, out, "does not fit the configured architecture")
  assert tree_digest(teacher) == before
  assert not (tmp_path / "w" / "fsp").exists()  # Refused before anything was written.


def test_workdir_of_another_experiment_is_refused_untouched(env, clean_run, tmp_path):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(clean_run, workdir)
  before = tree_digest(workdir)
  rc, out = run_cli(env, workdir, "--config.seed=1")
  assert_one_line_error(rc, out, "holds a different experiment's stage 'teacher' "
                        "(seed: 0 there, 1 here)")
  rc, out = run_cli(env, workdir, "--config.fsp.pool=avg")
  assert_one_line_error(rc, out, "stage 'fsp' (fsp.pool: 'max' there, 'avg' here)")
  assert tree_digest(workdir) == before
  # Checkpoints whose experiment is unknown (no stage.json) are refused too.
  os.remove(workdir / "student" / checkpoints.STAGE_INFO)
  before = tree_digest(workdir)
  rc, out = run_cli(env, workdir)
  assert_one_line_error(rc, out, "holds checkpoints but no stage.json")
  assert tree_digest(workdir) == before
