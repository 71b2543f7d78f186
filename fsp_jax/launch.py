"""Start a config on several hosts: a Cloud TPU VM pod slice, or a SLURM GPU cluster.

    python -m fsp_jax.launch tpu --tpu NAME --zone ZONE --config cifar10_minimization \\
        --workdir /mnt/shared/runs/x [--setup] [--dry_run] [--config.FIELD=VALUE ...]
    python -m fsp_jax.launch slurm --nodes 2 --gpus_per_node 8 --config quickstart:smoke \\
        --workdir /shared/runs/x [--partition P] [--dry_run] [--config.FIELD=VALUE ...]

Both start one `python -m fsp_jax.main --distributed` process per host; each calls
`jax.distributed.initialize()`, which reads the TPU metadata or SLURM's environment,
and the processes train one model over all chips. `--config` is what `fsp_jax.main`
takes: a shipped config's name with an optional argument (`NAME[:ARG]`, resolved by
the fsp_jax installed on the hosts; names are checked here first), or the path of a
config file on the hosts. The hosts need fsp_jax installed, not a checkout (`--setup`
installs one on TPU workers). The workdir must be one directory that every host sees
at the same path (NFS, Filestore, Lustre, a gcsfuse mount): checkpoints are written by
all processes, metrics and results by process 0. `--dry_run` prints what would run
(the gcloud command, or the sbatch script) and runs nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

# Where --setup clones the repository on each TPU worker (relative to its home).
DEFAULT_TPU_CHECKOUT = "fsp_jax"


class LaunchError(ValueError):
  """A launch request that cannot work; the message says what to change."""


def split_overrides(extra: Sequence[str]) -> List[str]:
  """Keeps `--config.FIELD=VALUE` arguments; anything else is an error."""
  for arg in extra:
    if not arg.startswith("--config."):
      raise LaunchError(f"unexpected argument {arg!r}; config overrides look like "
                        "--config.FIELD=VALUE.")
  return list(extra)


def is_config_name(spec: str) -> bool:
  """Whether `--config` names a shipped config (`NAME[:ARG]`) rather than a file."""
  from fsp_jax import config_lib
  name, _ = config_lib.split(spec)
  return not (name.endswith(".py") or "/" in name or os.sep in name)


def check_config(spec: str) -> None:
  """A shipped config's name and argument must load (with this fsp_jax); a config
  file is a path on the hosts, so it is not opened here."""
  if not spec or not is_config_name(spec):
    return
  from fsp_jax import config_lib
  try:
    config_lib.load(spec)
  except (ValueError, TypeError, ImportError) as e:
    message = " ".join(str(e).split())
    raise LaunchError(f"--config {spec!r}: {message}") from None


def check_workdir(workdir: str) -> None:
  """The workdir must be an absolute path every host can open as a file path."""
  if "://" in workdir:
    raise LaunchError(
        f"workdir {workdir!r} is a URL; fsp_jax writes workdirs with file APIs, so "
        "mount the storage on every host (e.g. gcsfuse, Filestore) and give its path.")
  if not os.path.isabs(workdir):
    raise LaunchError(f"workdir {workdir!r} must be an absolute path on storage that "
                      "every host mounts at the same place.")


def main_command(python: str, config: str, workdir: str,
                 overrides: Sequence[str]) -> List[str]:
  """The training command each host runs (one process per host)."""
  return [python, "-m", "fsp_jax.main", f"--config={config}", f"--workdir={workdir}",
          "--distributed", *overrides]


# ---- Cloud TPU VM ------------------------------------------------------------------
def tpu_remote_script(args, overrides: Sequence[str]) -> str:
  """The shell script each TPU VM worker runs (through `gcloud ... ssh --command`)."""
  q = shlex.quote
  workdir = args.workdir
  # The checkout to work in: --repo_dir, or where --setup clones; none otherwise (the
  # installed fsp_jax resolves config names wherever the command runs).
  repo = args.repo_dir or (DEFAULT_TPU_CHECKOUT if args.setup else "")
  lines = ["set -euo pipefail"]
  if args.setup:
    lines += [
        f"if [ ! -d {q(repo)} ]; then git clone -q {q(args.git_url)} {q(repo)}; fi",
        f"git -C {q(repo)} fetch -q origin && git -C {q(repo)} checkout -q "
        f"{q(args.git_ref)}",
        f"{q(args.python)} -m pip install -q -U 'jax[tpu]' -e {q(repo)}",
    ]
  train = " ".join(q(a) for a in main_command(args.python, args.config, workdir,
                                                overrides))
  log = f"{q(os.path.join(workdir, 'logs'))}/\"$(hostname)\".log"
  lines.append(f"mkdir -p {q(os.path.join(workdir, 'logs'))}")
  if repo:
    lines.append(f"cd {q(repo)}")
  if args.detach:
    lines.append(f"nohup {train} > {log} 2>&1 < /dev/null &")
    lines.append(f"echo \"$(hostname): started, log {os.path.join(workdir, 'logs')}"
                 "/$(hostname).log\"")
  else:
    lines.append(f"{train} 2>&1 | tee {log}")
  return "; ".join(lines)


def tpu_command(args, overrides: Sequence[str]) -> List[str]:
  """`gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...` as argv."""
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  cmd += ["--worker=all", f"--command={tpu_remote_script(args, overrides)}"]
  return cmd


# ---- SLURM ------------------------------------------------------------------------
def slurm_script(args, overrides: Sequence[str]) -> str:
  """An sbatch script: one task per node, each driving all GPUs of its node."""
  q = shlex.quote
  logs = os.path.join(args.workdir, "logs")
  directives = [
      f"--job-name={args.job_name}",
      f"--nodes={args.nodes}",
      "--ntasks-per-node=1",
      f"--gpus-per-node={args.gpus_per_node}",
      f"--cpus-per-task={args.cpus_per_task}",
      f"--time={args.time}",
      f"--output={os.path.join(logs, 'slurm-%j.out')}",
      # SIGTERM 120 s before the time limit: the pipeline checkpoints and exits, and
      # submitting the same script again resumes.
      "--signal=TERM@120",
  ]
  if args.partition:
    directives.append(f"--partition={args.partition}")
  if args.account:
    directives.append(f"--account={args.account}")
  train = " ".join(q(a) for a in main_command(args.python, args.config, args.workdir,
                                                overrides))
  return "\n".join([
      "#!/bin/bash",
      *(f"#SBATCH {d}" for d in directives),
      "# Generated by `python -m fsp_jax.launch slurm`. jax.distributed.initialize()",
      "# finds the coordinator, process count and index in SLURM's environment.",
      "set -euo pipefail",
      *([f"cd {q(args.repo_dir)}"] if args.repo_dir else []),
      f"srun --kill-on-bad-exit=1 {train}",
      "",
  ])


def slurm_plan(args, overrides: Sequence[str]) -> Tuple[str, str, List[str]]:
  """(script path, script text, sbatch argv)."""
  path = args.script or os.path.join(args.workdir, "launch", f"{args.job_name}.sbatch")
  return path, slurm_script(args, overrides), ["sbatch", path]


# ---- command line -----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m fsp_jax.launch",
      description="Start an fsp_jax config on a TPU pod slice or a SLURM GPU cluster. "
                  "Extra --config.FIELD=VALUE arguments are passed to fsp_jax.main.")
  sub = parser.add_subparsers(dest="target", required=True)

  def common(p):
    p.add_argument("--config", required=True,
                   help="a shipped config's name, with an optional argument "
                        "(NAME[:ARG], e.g. cifar10_minimization, quickstart:smoke, "
                        "cifar10_minimization:method=kd), or a config file's path "
                        "on the hosts (PATH.py[:ARG])")
    p.add_argument("--workdir", required=True,
                   help="absolute path on storage shared by all hosts")
    p.add_argument("--dry_run", action="store_true", help="print, run nothing")

  tpu = sub.add_parser("tpu", help="all workers of a Cloud TPU VM (pod slice)")
  common(tpu)
  tpu.add_argument("--tpu", required=True, help="TPU VM name")
  tpu.add_argument("--zone", required=True, help="e.g. us-central2-b")
  tpu.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  tpu.add_argument("--repo_dir", default="",
                   help="a checkout on each worker (relative to its home) to run in, "
                        "e.g. for config file paths inside it; --setup clones it there "
                        f"(default {DEFAULT_TPU_CHECKOUT}). Default without --setup: "
                        "none, the workers' installed fsp_jax")
  tpu.add_argument("--python", default="python3", help="python on the workers")
  tpu.add_argument("--setup", action="store_true",
                   help="first clone/update the repository and pip install jax[tpu] "
                        "and fsp_jax on every worker")
  tpu.add_argument("--git_url", default="",
                   help="the repository the workers clone (needed by --setup)")
  tpu.add_argument("--git_ref", default="main", help="branch/tag/commit for --setup")
  tpu.add_argument("--detach", action="store_true",
                   help="start in the background (nohup) and return; logs in "
                        "WORKDIR/logs/<host>.log")

  slurm = sub.add_parser("slurm", help="an sbatch job on a SLURM GPU cluster")
  common(slurm)
  slurm.add_argument("--nodes", type=int, default=1)
  slurm.add_argument("--gpus_per_node", type=int, default=8)
  slurm.add_argument("--cpus_per_task", type=int, default=16)
  slurm.add_argument("--time", default="24:00:00", help="SLURM time limit")
  slurm.add_argument("--partition", default="")
  slurm.add_argument("--account", default="")
  slurm.add_argument("--job_name", default="fsp_jax")
  slurm.add_argument("--repo_dir", default="",
                     help="a directory to cd into on the nodes before training, e.g. a "
                          "checkout whose config files --config names by relative path "
                          "(default: none; sbatch's working directory, where sbatch "
                          "was run)")
  slurm.add_argument("--python", default=sys.executable,
                     help="python with fsp_jax installed (default: this one)")
  slurm.add_argument("--script", default="",
                     help="where to write the sbatch script (default: "
                          "WORKDIR/launch/JOB_NAME.sbatch)")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  try:
    overrides = split_overrides(extra)
    check_workdir(args.workdir)
    check_config(args.config)
    if args.target == "tpu":
      if args.setup and not args.git_url:
        raise LaunchError("--setup clones the repository on every worker: give its "
                          "URL with --git_url.")
      cmd = tpu_command(args, overrides)
      if args.dry_run:
        print(shlex.join(cmd))
        return 0
      if shutil.which("gcloud") is None:
        raise LaunchError("gcloud is not on PATH; install the Google Cloud CLI, or use "
                          "--dry_run to print the command.")
      return subprocess.run(cmd, check=False).returncode
    if args.nodes < 1 or args.gpus_per_node < 1:
      raise LaunchError(f"--nodes ({args.nodes}) and --gpus_per_node "
                        f"({args.gpus_per_node}) must be at least 1.")
    path, script, cmd = slurm_plan(args, overrides)
    if args.dry_run:
      print(f"# {path}\n{script}# then: {shlex.join(cmd)}")
      return 0
    if shutil.which("sbatch") is None:
      raise LaunchError("sbatch is not on PATH; run this on a SLURM login node, or "
                        "use --dry_run to print the script.")
    # SLURM opens --output before the job starts: the log folder must exist.
    os.makedirs(os.path.join(args.workdir, "logs"), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(script)
    print(f"wrote {path}")
    return subprocess.run(cmd, check=False).returncode
  except LaunchError as e:
    print(f"fsp_jax.launch: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
