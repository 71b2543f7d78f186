#!/usr/bin/env bash
# Alternate `python -m fsp_jax.bench` runs under different XLA_FLAGS settings (one
# process each, since XLA reads the flags at start-up), ROUNDS rounds, and print the
# main / fsp / teacher images per second of each run. Compare settings round by round:
# timings on a shared VM drift by 20-30% between minutes.
#
#   ROUNDS=3 bash benchmarks/xla_flags_ab.sh \
#     "--xla_force_host_platform_device_count=1" "--xla_force_host_platform_device_count=2"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
for r in $(seq "${ROUNDS:-3}"); do
  for flags in "$@"; do
    line=$(XLA_FLAGS="$flags" "$PYTHON" -m fsp_jax.bench --steps 6 --warmup 2 \
             --only main,fsp,teacher 2>/dev/null | tail -1)
    echo "round $r | XLA_FLAGS=$flags | $("$PYTHON" -c 'import json, sys
d = json.loads(sys.argv[1])
print("main %s  fsp %s  teacher %s img/s" % tuple(d[k + "_images_per_s"] for k in ("main", "fsp", "teacher")))' "$line")"
  done
done
