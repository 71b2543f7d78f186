"""The multi-host launcher: argument handling and the commands it generates."""
import os
import shlex

import pytest

from fsp_jax import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(capsys, *argv):
  code = launch.main(list(argv))
  out = capsys.readouterr()
  return code, out.out, out.err


def test_tpu_dry_run_ssh_to_all_workers(capsys):
  code, out, _ = _run(capsys, "tpu", "--tpu", "my-v4-32", "--zone", "us-central2-b",
                      "--project", "proj", "--config", "cifar10_teacher",
                      "--workdir", "/mnt/shared/runs/t", "--dry_run",
                      "--config.seed=3", "--config.data.name=cifar100")
  assert code == 0
  argv = shlex.split(out)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32"]
  assert "--zone=us-central2-b" in argv and "--project=proj" in argv
  assert "--worker=all" in argv
  remote, = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  assert "git clone" not in remote  # No --setup.
  # No checkout needed: the workers' installed fsp_jax resolves the config's name.
  assert "cd " not in remote
  train = remote.split("; mkdir -p /mnt/shared/runs/t/logs; ")[1].split(" 2>&1 | tee ")[0]
  assert shlex.split(train) == [
      "python3", "-m", "fsp_jax.main", "--config=cifar10_teacher",
      "--workdir=/mnt/shared/runs/t", "--distributed", "--config.seed=3",
      "--config.data.name=cifar100"]
  assert 'tee /mnt/shared/runs/t/logs/"$(hostname)".log' in remote


def test_tpu_setup_and_detach(capsys):
  code, out, _ = _run(capsys, "tpu", "--tpu", "v5e", "--zone", "z", "--config",
                      "quickstart:smoke", "--workdir", "/mnt/nfs/my run",
                      "--setup", "--git_url", "https://example.org/fsp_jax.git",
                      "--git_ref", "v0.1", "--detach", "--dry_run")
  assert code == 0
  remote = shlex.split(out)[-1]
  assert "git clone -q https://example.org/fsp_jax.git fsp_jax" in remote
  assert "checkout -q v0.1" in remote
  assert "pip install -q -U 'jax[tpu]' -e fsp_jax" in remote
  assert "; cd fsp_jax; nohup python3 -m fsp_jax.main --config=quickstart:smoke " in remote
  assert "< /dev/null &" in remote
  assert "'--workdir=/mnt/nfs/my run'" in remote  # Quoted for the remote shell.


def test_tpu_repo_dir_runs_there_for_config_files_in_a_checkout(capsys):
  code, out, _ = _run(capsys, "tpu", "--tpu", "t", "--zone", "z", "--config",
                      "my_configs/sweep.py:lr=0.1", "--workdir", "/s/x",
                      "--repo_dir", "work/fsp", "--dry_run")
  assert code == 0
  remote = shlex.split(out)[-1]
  assert "; cd work/fsp; python3 -m fsp_jax.main --config=my_configs/sweep.py:lr=0.1 " in (
      remote)


def test_slurm_dry_run_prints_the_sbatch_script(capsys):
  code, out, _ = _run(capsys, "slurm", "--nodes", "4", "--gpus_per_node", "8",
                      "--partition", "gpu", "--time", "12:00:00", "--config",
                      "cifar10_minimization", "--workdir", "/shared/r",
                      "--python", "/opt/venv/bin/python", "--repo_dir", "/shared/fsp_jax",
                      "--dry_run", "--config.half_precision=True")
  assert code == 0
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
               "#SBATCH --gpus-per-node=8", "#SBATCH --time=12:00:00",
               "#SBATCH --partition=gpu", "#SBATCH --output=/shared/r/logs/slurm-%j.out",
               "#SBATCH --signal=TERM@120", "cd /shared/fsp_jax",
               "srun --kill-on-bad-exit=1 /opt/venv/bin/python -m fsp_jax.main "
               "--config=cifar10_minimization --workdir=/shared/r "
               "--distributed --config.half_precision=True"):
    assert line in out.splitlines(), line
  assert out.splitlines()[1] == "#!/bin/bash"
  assert out.rstrip().endswith("# then: sbatch /shared/r/launch/fsp_jax.sbatch")
  assert "--account" not in out


def test_slurm_script_needs_no_checkout(capsys):
  """By default the nodes run the installed fsp_jax where sbatch runs: the script
  names no directory of this checkout."""
  code, out, _ = _run(capsys, "slurm", "--config", "cifar10_minimization:method=fitnet",
                      "--workdir", "/shared/r", "--python", "/opt/venv/bin/python",
                      "--dry_run")
  assert code == 0
  assert REPO not in out and not any(l.startswith("cd ") for l in out.splitlines())
  assert ("srun --kill-on-bad-exit=1 /opt/venv/bin/python -m fsp_jax.main "
          "--config=cifar10_minimization:method=fitnet --workdir=/shared/r "
          "--distributed") in out.splitlines()


def test_slurm_writes_the_script_and_submits(tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(launch.shutil, "which", lambda name: "/usr/bin/" + name)
  monkeypatch.setattr(launch.subprocess, "run",
                      lambda cmd, check: calls.append(cmd) or
                      type("Done", (), {"returncode": 0})())
  workdir = str(tmp_path / "run")
  code, out, _ = _run(capsys, "slurm", "--config", "quickstart",
                      "--workdir", workdir)
  assert code == 0
  script = tmp_path / "run" / "launch" / "fsp_jax.sbatch"
  assert calls == [["sbatch", str(script)]]
  text = script.read_text()
  assert text.startswith("#!/bin/bash\n#SBATCH --job-name=fsp_jax\n")
  assert "--config=quickstart " in text
  assert not any(l.startswith("cd ") for l in text.splitlines())
  assert (tmp_path / "run" / "logs").is_dir()
  assert sorted(os.listdir(tmp_path / "run")) == ["launch", "logs"]


@pytest.mark.parametrize("argv,message", [
    (["slurm", "--config", "c.py", "--workdir", "runs/x", "--dry_run"],
     "must be an absolute path"),
    (["slurm", "--config", "c.py", "--workdir", "gs://b/x", "--dry_run"],
     "is a URL"),
    (["slurm", "--config", "c.py", "--workdir", "/s/x", "--nodes", "0", "--dry_run"],
     "must be at least 1"),
    (["tpu", "--tpu", "t", "--zone", "z", "--config", "c.py", "--workdir", "/s/x",
      "--dry_run", "--seed=1"], "config overrides look like --config.FIELD=VALUE"),
    (["tpu", "--tpu", "t", "--zone", "z", "--config", "c.py", "--workdir", "/s/x",
      "--setup", "--dry_run"], "give its URL with --git_url"),
    (["slurm", "--config", "cifar10_minimisation", "--workdir", "/s/x", "--dry_run"],
     "unknown config 'cifar10_minimisation'; the shipped configs are "),
    (["tpu", "--tpu", "t", "--zone", "z", "--config", "quickstart:smok", "--workdir",
      "/s/x", "--dry_run"], "unknown config argument 'smok'"),
])
def test_bad_requests_are_one_line_errors(capsys, argv, message):
  code, out, err = _run(capsys, *argv)
  assert code == 2 and out == ""
  assert err.startswith("fsp_jax.launch: error:") and message in err
  assert len(err.strip().splitlines()) == 1


def test_tpu_without_gcloud_says_so(capsys, monkeypatch):
  monkeypatch.setattr(launch.shutil, "which", lambda name: None)
  code, _, err = _run(capsys, "tpu", "--tpu", "t", "--zone", "z", "--config", "c.py",
                      "--workdir", "/s/x")
  assert code == 2 and "gcloud is not on PATH" in err


def test_missing_required_flag_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    launch.main(["tpu", "--config", "c.py", "--workdir", "/s/x"])
  assert e.value.code == 2
  assert "--tpu" in capsys.readouterr().err


def test_launch_shell_wrappers_dry_run(tmp_path):
  """The wrappers run from any directory: they need the installed fsp_jax only."""
  import subprocess
  import sys
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep +
             os.environ.get("PATH", ""))
  out = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sh"), "2", "8",
                        "cifar10_minimization", "/shared/runs/x", "--dry_run"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "#SBATCH --nodes=2" in out.stdout and "--distributed" in out.stdout
  assert "--config=cifar10_minimization --workdir=/shared/runs/x" in out.stdout
  tpu = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "t", "z",
                        "quickstart:smoke", "/shared/runs/y", "--dry_run"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert tpu.returncode == 0, tpu.stderr
  assert "--config=quickstart:smoke --workdir=/shared/runs/y --distributed" in tpu.stdout
  bad = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "usage" in bad.stderr
