#!/usr/bin/env bash
# Start a config on every worker of a Cloud TPU VM pod slice (jax.distributed).
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG /mnt/shared/runs/x [--dry_run] [--config.F=V ...]
# CONFIG: a shipped config's name, NAME[:ARG] (e.g. cifar10_minimization,
# quickstart:smoke, cifar10_minimization:method=fitnet), or a config file's path.
# The workdir must be shared storage that every worker sees at the same path.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--dry_run] [--config.F=V ...]  (CONFIG: NAME[:ARG], e.g. cifar10_minimization)" >&2; exit 2; }
name=$1 zone=$2 config=$3 workdir=$4; shift 4
exec python -m fsp_jax.launch tpu --tpu "$name" --zone "$zone" --config "$config" \
  --workdir "$workdir" "$@"
