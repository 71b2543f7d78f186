"""Real processes killed and resumed, several processes, workdirs that do not fit,
two runs on one workdir, corrupt checkpoints, full disks and bad fields of later stages.

Every CLI run here is the real command line in a subprocess on `quickstart:smoke` (2
CPU devices, see conftest's `cli_env`), without the scratch baseline: teacher, stage 1,
stage 2. No output of any of them may hold a traceback. The unit tests at the end
(checkpoint integrity, the workdir lock) run in-process.
"""
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import quick_compile, shared_dir, with_devices
from fsp_jax import checkpoints, metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "quickstart:smoke"
FAULTS = os.path.join(REPO, "tests", "fault_injection.py")
STAGES = ("teacher", "fsp", "student")


@pytest.fixture(scope="module")
def env(cli_env):
  """The command line's environment here, with XLA:CPU's quicker loop emitters
  (conftest's `quick_compile`): every run a test here compares is made with them."""
  return quick_compile(cli_env)


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
  assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
  return proc.returncode, proc.stdout + proc.stderr


def start_cli(env, workdir, *args, fault=None, **extra_env):
  """Starts the CLI (stdout and stderr in one pipe); returns the Popen."""
  return subprocess.Popen(_cmd(workdir, *args, fault=fault), cwd=REPO,
                          env=dict(env, FSP_FAULT=fault or "", **extra_env), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until(proc, pattern):
  """The lines `proc` prints up to the first one containing `pattern`."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if pattern in line:
      return "".join(lines)
  raise AssertionError(f"{pattern!r} never printed:\n" + "".join(lines))


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
  def build(workdir):
    rc, out = run_cli(env, workdir)
    assert rc == 0, out
  # Made once for the session (the test workers share it): the tests only read it.
  return shared_dir(tmp_path_factory, "reliability_clean_run", build)


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


def assert_one_line_error(rc, out, message, status=2):
  assert rc == status, out
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


def test_bad_fields_of_later_stages_are_refused_before_any_step(env, tmp_path):
  workdir = tmp_path / "w"
  for args, message in (
      # The student (stage 2) schedule: 2 learning rates, 2 boundaries.
      (["--config.student.schedule.boundaries=(1,2)"],
       "student.schedule: 2 learning rates need 1 boundaries; got 2"),
      # Stage 1's batch cannot be split over the 2 devices: known before the teacher.
      (["--config.fsp.schedule.batch_size=31"],
       "fsp.schedule.batch_size=31 is not divisible by the 2 devices the batch is split "
       "over (stage 'fsp'); set --config.fsp.schedule.batch_size=32"),
      (["--config.student.schedule.batch_size=100000"], "exceeds the"),
  ):
    rc, out = run_cli(env, workdir, *args)
    assert_one_line_error(rc, out, message)
    assert "[teacher]" not in out  # Not a step, not a line of the teacher's.
    assert not workdir.exists()  # Nothing written, not even the lock.


def test_two_runs_on_one_workdir(env, clean_run, tmp_path):
  workdir, release = tmp_path / "shared", tmp_path / "release"
  # The first run holds the workdir, paused in stage 1 before its step 2.
  first = start_cli(env, workdir, fault="pause:fsp:2", FSP_RELEASE=str(release))
  read_until(first, "fault: paused")
  try:
    # The same command pasted again: refused at once, naming the holder.
    rc, out = run_cli(env, workdir)
    assert_one_line_error(
        rc, out, f"is in use by another fsp_jax run (host {socket.gethostname()}, pid "
        f"{first.pid}, started ", status=3)
    assert "--wait_for_workdir" in out and not (workdir / "student").exists()
    # A requeued job with --wait_for_workdir waits for the first run ...
    second = start_cli(env, workdir, "--wait_for_workdir")
    waiting = read_until(second, "waiting for it to end")
    assert f"pid {first.pid}" in waiting
    # ... which is preempted (checkpoint at step 3), and then takes over.
    first.send_signal(signal.SIGTERM)
    release.touch()
    out1 = first.communicate(timeout=300)[0]
    assert first.returncode == 143, out1
    assert "[fsp] SIGTERM: checkpoint at step 3 saved" in out1
    out2 = waiting + second.communicate(timeout=600)[0]
    assert second.returncode == 0, out2
  finally:
    for proc in (first, locals().get("second")):
      if proc is not None and proc.poll() is None:
        proc.kill()
  assert "[fsp] resumes from its checkpoint at step 3" in out2
  assert "Traceback" not in out1 + out2
  assert_same_run(workdir, clean_run)


def _truncate_largest_file(folder, size=1000):
  files = [f for f in glob.glob(os.path.join(folder, "**"), recursive=True)
           if os.path.isfile(f)]
  os.truncate(max(files, key=os.path.getsize), size)


def test_truncated_final_checkpoint_recovered(env, clean_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(clean_run, workdir)
  ckpt_dir = workdir / "teacher" / checkpoints.CHECKPOINT_DIR
  _truncate_largest_file(ckpt_dir / "12" / "model")  # A disk or copy fault.
  # Given as a teacher from elsewhere: corrupt (not "another architecture"), refused
  # in one line, left as it is.
  before = tree_digest(workdir / "teacher")
  rc, out = run_cli(env, tmp_path / "other", f"--config.teacher.checkpoint={workdir}/"
                    "teacher")
  assert_one_line_error(rc, out, f"teacher checkpoint '{workdir}/teacher' (step 12) is "
                        "corrupt, it cannot be read (OUT_OF_RANGE")
  assert "does not fit" not in out and "its step 8 holds earlier" in out
  assert tree_digest(workdir / "teacher") == before
  # In its own workdir: one warning; the step is moved aside and the teacher recomputed
  # from step 8 (the later stages, finished, are not redone).
  rc, out = run_cli(env, workdir)
  assert rc == 0, out
  warnings = [line for line in out.splitlines() if "cannot be read" in line]
  assert len(warnings) == 1 and "[teacher] its final checkpoint (step 12)" in warnings[0]
  assert "[teacher] resumes from its checkpoint at step 8" in out
  assert "[fsp] finished earlier" in out and "[student] finished earlier" in out
  assert [os.path.basename(p).split(".")[0] for p in glob.glob(
      str(ckpt_dir / "12.corrupt-*"))] == ["12"]
  assert committed_steps(workdir / "teacher") == [8, 12]
  assert_same_run(workdir, clean_run)


def test_full_disk_during_a_save_then_resumed(env, clean_run, tmp_path):
  workdir = tmp_path / "run"
  # 1. The disk fills while the teacher's step 8 is saved (Orbax's background thread).
  rc, out = run_cli(env, workdir, fault="enospc:teacher:8")
  assert_one_line_error(rc, out, "[teacher] could not save the checkpoint of step 8 in ",
                        status=4)
  assert "No space left on device" in out and "the checkpoint of step 4" in out
  assert committed_steps(workdir / "teacher") == [4]
  assert not (workdir / metrics_lib.RESULTS).exists()
  # 2. Space again; the teacher resumes from step 4, then results.json cannot be
  # written after stage 1: the results.json before stays as it was.
  rc, out = run_cli(env, workdir, fault="enospc_results:fsp")
  assert_one_line_error(rc, out, "results.json.tmp' (No space left on device)", status=4)
  assert "[teacher] resumes from its checkpoint at step 4" in out
  assert list(json.load(open(workdir / metrics_lib.RESULTS))) == ["teacher"]
  # 3. The same command finishes: as if nothing had happened.
  rc, out = run_cli(env, workdir)
  assert rc == 0, out
  assert "[fsp] resumes from its checkpoint at step 8" in out
  assert_same_run(workdir, clean_run)


# In-process unit tests: checkpoint integrity and the workdir lock.


def _tiny_variables(num_classes=6, width=16, seed=0):
  """A `{'params', 'batch_stats'}` tree shaped like a network's (a conv, a classifier),
  large enough that its arrays go to data files."""
  rng = np.random.default_rng(seed)
  return {"params": {"stem_conv": {"kernel": rng.normal(size=(3, 3, 16, width))},
                     "classifier": {"kernel": rng.normal(size=(width, num_classes)),
                                    "bias": rng.normal(size=(num_classes,))}},
          "batch_stats": {"stem_bn": {"mean": rng.normal(size=(width,))}}}


def _abstract(tree):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                      tree)


def test_checkpoint_of_another_architecture_names_the_field(tmp_path):
  checkpoints.save_model(str(tmp_path / "t6"), _tiny_variables(num_classes=6))
  with pytest.raises(ValueError, match=r"its classifier has 6 classes, the configured "
                     r"4; .*set config\.teacher\.num_classes=6\.") as e:
    checkpoints.restore_model(str(tmp_path / "t6"), _abstract(_tiny_variables(4)),
                              "teacher checkpoint")
  assert not isinstance(e.value, checkpoints.CorruptCheckpoint)
  with pytest.raises(ValueError, match=r"set config\.student\.model and "
                     r"config\.student\.width_multiplier"):
    checkpoints.restore_model(str(tmp_path / "t6"),
                              _abstract(_tiny_variables(6, width=32)),
                              "stage-1 checkpoint")


# Orbax's read coroutines of a damaged file still fail after the restore has (what the
# CLI's sys.unraisablehook keeps from the user).
_DAMAGED_READS = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@_DAMAGED_READS
def test_corrupt_checkpoint_is_not_another_architecture(tmp_path):
  checkpoints.save_model(str(tmp_path / "t"), _tiny_variables())
  _truncate_largest_file(str(tmp_path / "t" / checkpoints.CHECKPOINT_DIR / "0" / "model"))
  with pytest.raises(checkpoints.CorruptCheckpoint, match=r"\(step 0\) is corrupt, it "
                     "cannot be read"):
    checkpoints.restore_model(str(tmp_path / "t"), _abstract(_tiny_variables()),
                              "teacher checkpoint")


@_DAMAGED_READS
def test_restore_latest_falls_back_past_corrupt_steps(tmp_path, caplog):
  import optax
  from fsp_jax import train

  def state_of(seed):
    v = jax.tree.map(jnp.asarray, _tiny_variables(seed=seed))
    return train.TrainState.create(apply_fn=None, tx=optax.sgd(0.1, momentum=0.9),
                                   params={"student": v["params"], "distiller": {}},
                                   batch_stats=v["batch_stats"])

  with checkpoints.manager(str(tmp_path), max_to_keep=3) as mngr:
    for step in (1, 2, 3):
      checkpoints.save(mngr, step, state_of(step), {"wall_time_s": float(step)})
    mngr.wait_until_finished()
  ckpt_dir = tmp_path / checkpoints.CHECKPOINT_DIR
  _truncate_largest_file(str(ckpt_dir / "3" / "model"))
  shutil.rmtree(ckpt_dir / "2" / "optimizer")  # A missing item.
  with checkpoints.manager(str(tmp_path)) as mngr, caplog.at_level("WARNING", "fsp_jax"):
    state, meta, step = checkpoints.restore_latest(mngr, state_of(0), "s")
  assert (step, meta) == (1, {"wall_time_s": 1.0})
  jax.tree.map(np.testing.assert_array_equal, state.params, state_of(1).params)
  warnings = [r.getMessage() for r in caplog.records]
  assert len(warnings) == 2 and "step 3 cannot be read" in warnings[0]
  assert "resuming from step 2" in warnings[0] and "resuming from step 1" in warnings[1]
  assert sorted(n.split(".")[0] for n in os.listdir(ckpt_dir)) == ["1", "2", "3"]
  # None intact: the stage starts over.
  _truncate_largest_file(str(ckpt_dir / "1" / "model"))
  with checkpoints.manager(str(tmp_path)) as mngr:
    state, meta, step = checkpoints.restore_latest(mngr, state_of(0), "s")
  assert (step, meta) == (0, {})


def test_failed_save_raises_one_error_and_keeps_the_previous_step(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.path import atomicity
  variables = jax.tree.map(jnp.asarray, _tiny_variables())
  real = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if "/2." in str(self._final_path) or str(self._final_path).endswith("/2"):
      raise OSError(errno.EIO, os.strerror(errno.EIO), str(self._final_path))
    return await real(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  mngr = checkpoints.manager(str(tmp_path / "stage"))
  model = ocp.args.Composite(model=ocp.args.StandardSave(variables))
  mngr.save(1, args=model)
  mngr.save(2, args=model)
  with pytest.raises(checkpoints.CheckpointWriteError,
                     match=r"\[stage\] could not save the checkpoint of step 2 .*"
                     r"Input/output error.*the checkpoint of step 1 and results.json "
                     "are intact") as e:
    mngr.wait_until_finished()
  assert e.value.errno == errno.EIO
  mngr.close()  # The failure is not raised twice.
  assert committed_steps(tmp_path / "stage") == [1]


_HOLD = ("import sys, time; from fsp_jax.workdir import WorkdirLock; "
         "WorkdirLock(sys.argv[1]).__enter__(); print('held', flush=True); "
         "time.sleep(600)")


def test_workdir_lock_refuses_waits_and_is_freed_by_sigkill(tmp_path):
  from fsp_jax.workdir import WorkdirBusy, WorkdirLock
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirBusy, match=f"in use by another fsp_jax run \\(host "
                       f"{socket.gethostname()}, pid {holder.pid}, started "):
      with WorkdirLock(str(tmp_path)):
        pass
    got = {}

    def wait():
      with WorkdirLock(str(tmp_path), wait=True) as lock:
        got["waited"] = lock.waited

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not got  # Waiting for the holder.
    holder.send_signal(signal.SIGKILL)  # No cleanup: the kernel frees the lock.
    holder.wait(timeout=30)
    waiter.join(timeout=30)
    assert got == {"waited": True}
    with WorkdirLock(str(tmp_path)) as lock:  # Free again after the block.
      assert not lock.waited
  finally:
    holder.kill()
