#!/usr/bin/env bash
# Submit a config to a SLURM GPU cluster: one process per node, jax.distributed.
#   launch/slurm.sh NODES GPUS_PER_NODE CONFIG /shared/runs/x [--dry_run] [--config.F=V ...]
# CONFIG: a shipped config's name, NAME[:ARG] (e.g. cifar10_minimization,
# quickstart:smoke, cifar10_minimization:method=fitnet), or a config file's path.
# The workdir must be shared storage that every node sees at the same path.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 NODES GPUS_PER_NODE CONFIG WORKDIR [--dry_run] [--config.F=V ...]  (CONFIG: NAME[:ARG], e.g. cifar10_minimization)" >&2; exit 2; }
nodes=$1 gpus=$2 config=$3 workdir=$4; shift 4
exec python -m fsp_jax.launch slurm --nodes "$nodes" --gpus_per_node "$gpus" \
  --config "$config" --workdir "$workdir" "$@"
