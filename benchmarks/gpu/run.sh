#!/usr/bin/env bash
# The full-scale run for one GPU, inside one 10-minute command (see README.md here).
#
#   bash benchmarks/gpu/run.sh                 # on the GPU machine, from the repo root
#   DRY_RUN=1 bash benchmarks/gpu/run.sh       # the same script at a tiny scale, any CPU
#
# 1. bench: fsp_jax's steps in float32 and bfloat16 (images/s, XLA's FLOP count, share
#    of the GPU's peak), whole loops (host pipeline one step per call vs the device
#    pipeline with K steps per call, 3 seeds), and the PyTorch peer at its best.
# 2. The paper's Table 3 at full scale (teacher ResNet-26 64k iterations, stage 1 21k,
#    FSP and scratch ResNet-8 64k each, 3 seeds in one program), then Table 1 if the
#    time left allows; tables beside the paper's numbers, the time of every stage.
# 3. PART=zoo (its own 10-minute command; PART=tables,zoo runs both): the distiller
#    zoo on RepDistiller's CIFAR recipe (cifar10_zoo:recipe=repdistiller: 240 epochs
#    at batch 64, LR 0.05, x0.1 at 150/180/210, weight decay 5e-4) times ZOO_SCALE:
#    a ResNet-26 teacher, then scratch, kd, fsp, at, crd and dkd ResNet-8 students,
#    3 seeds side by side each, in one resumable run (rerun it to go on).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
PY=${PYTHON:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
OUT=$(mkdir -p "${OUT:-runs/gpu}" && cd "${OUT:-runs/gpu}" && pwd)
DRY_RUN=${DRY_RUN:-0}
START=$(date +%s)
BUDGET_S=${BUDGET_S:-570}  # Table 1 only starts with this much of the command left.
PART=${PART:-tables}  # tables (1 and 2 above), zoo (3), or tables,zoo.
ZOO_METHODS=${ZOO_METHODS:-kd fsp at crd dkd}
export PYTHONUNBUFFERED=1 JAX_TRACEBACK_FILTERING=off

# What the GPU machine lacks travels in .whl/ (ml-collections, tensorboardX and
# fsp_jax's own wheel, so that its shipped configs resolve by name): installed into
# /tmp. Everything then runs outside the checkout, so the installed fsp_jax is used.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ! (cd /tmp && "$PY" -c "import fsp_jax.configs") 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
      --target /tmp/fsp_site .
  export PYTHONPATH=/tmp/fsp_site:${PYTHONPATH:-}
fi

if [ "$DRY_RUN" = 1 ]; then
  SCALE=${SCALE:-0.0001}; BENCH=(--steps 2 --warmup 1 --batch_size 16 --teacher_depth 8)
  # Every bench command runs; those after the first time the main step only.
  MORE=main; BF16=main
  # K=2 steps per call in the loop bench; the tables' runs one step per call (their
  # programs then compile in half the time; the K-step loop is the bench's).
  LOOP=(--loop_steps 4 --repeats 1 --batch_size 16 --seed_axis vmap); K=2; TABLE_K=1
  # Seeds by vmap in the loop bench and the tables, as 'auto' picks on a GPU (one
  # program for the 3 seeds: a third of the unrolled program's compile time here).
  SEED_AXIS=vmap
  # Digits at 8x8, ResNet-8s, and learning rates 100x lower: a handful of steps at the
  # paper's rates on 8x8 images can diverge, and this run only checks the script.
  DATA_ONLY=(--config.data.source=digits --config.data.image_size="(8,8)"
             --config.data.pad=1 --config.teacher.model=cifar_resnet8
             --config.student.model=cifar_resnet8
             --config.fsp.schedule.learning_rates="(1e-5,1e-6,1e-7)")
  DATA=("${DATA_ONLY[@]}" --config.student.schedule.learning_rates="(1e-3,1e-4,1e-5)")
  TORCH=(--steps 2 --warmup 1 --batch_size 16 --no_compile)
  # The zoo's few steps: RepDistiller's recipe at 1e-5 (2 steps), CRD's bank read
  # with fewer negatives than the digits' other classes hold.
  ZOO_SCALE=${ZOO_SCALE:-0.00001}
  ZOO_DATA=("${DATA_ONLY[@]}" --config.crd.num_negatives=64
            --config.teacher.schedule.learning_rates="(1e-3,1e-4,1e-5,1e-6)"
            --config.student.schedule.learning_rates="(1e-3,1e-4,1e-5,1e-6)")
else
  SCALE=${SCALE:-1.0}; BENCH=(--steps 50 --warmup 10); LOOP=(--loop_steps 1000 --repeats 3)
  MORE=main,fsp; BF16=main,fsp,teacher
  K=${K:-200}; TABLE_K=$K; SEED_AXIS=auto
  DATA_DIR=${DATA_DIR:-/tmp/cifar10}
  if [ ! -d "$DATA_DIR/train" ]; then
    tar xzf "$REPO/.data/cifar10-images.tar.gz" -C "$(dirname "$DATA_DIR")"
  fi
  DATA=(--config.data.source=folder --config.data.root="$DATA_DIR")
  ZOO_DATA=("${DATA[@]}")
  TORCH=(--steps 50 --warmup 10)
  # The whole recipe is 7 x 187,500 steps of 3 seeds (plus FSP's stage 1): not yet
  # timed on a GPU; 0.1 is an estimate of what fits one 10-minute command.
  ZOO_SCALE=${ZOO_SCALE:-0.1}
fi

stage() { echo "== $1 ($(( $(date +%s) - START )) s into the run)"; }
cd "$OUT"

case ",$PART," in *,tables,*|*,zoo,*) ;; *)
  echo "PART=$PART: give tables, zoo or tables,zoo" >&2; exit 2 ;; esac
if [[ ",$PART," == *,tables,* ]]; then
stage "bench float32"
"$PY" "$REPO"/benchmarks/bench.py "${BENCH[@]}" --only main,fsp,teacher | tee "$OUT/bench_f32.json"
stage "bench bfloat16"
"$PY" "$REPO"/benchmarks/bench.py "${BENCH[@]}" --only "$BF16" --half_precision \
    | tee "$OUT/bench_bf16.json"
for axis in vmap unrolled; do
  stage "bench 3 seeds in one program, seed_axis=$axis"
  "$PY" "$REPO"/benchmarks/bench.py "${BENCH[@]}" --only "$MORE" --num_seeds 3 \
      --seed_axis "$axis" | tee "$OUT/bench_seeds_$axis.json"
done
stage "bench loops: host pipeline 1 step/call vs K=$K steps/call, 3 seeds"
"$PY" "$REPO"/benchmarks/bench.py --loop "${LOOP[@]}" --steps_per_call "$K" --num_seeds 3 \
    | tee "$OUT/bench_loop.json"
stage "PyTorch peer"
if "$PY" -c "import torch" 2>/dev/null; then
  "$PY" "$REPO"/benchmarks/gpu/torch_gpu.py "${TORCH[@]}" | tee "$OUT/torch.json" || true
else
  echo '{"error": "torch is not installed"}' | tee "$OUT/torch.json"
fi

common=("${DATA[@]}" --config.schedule_scale="$SCALE" --config.num_seeds=3
        --config.steps_per_call="$TABLE_K" --config.data.pipeline=device
        --config.seed_axis="$SEED_AXIS"
        --config.eval_every=0 --config.log_every="$TABLE_K"
        --config.checkpoint_every=$(( TABLE_K * 40 )))
stage "Table 3 at scale $SCALE: teacher, stage 1, FSP students, scratch (3 seeds each)"
"$PY" -m fsp_jax.main --config cifar10_minimization --workdir "$OUT/table3" "${common[@]}"
left=$(( BUDGET_S - ($(date +%s) - START) ))
if [ "$left" -gt 240 ] || [ "$DRY_RUN" = 1 ]; then
  stage "Table 1 at scale $SCALE (the Table 3 teacher; ResNet-26 students, one shared stage 1)"
  "$PY" -m fsp_jax.main --config cifar10_fast_optimization --workdir "$OUT/table1" \
      "${common[@]}" --config.teacher.checkpoint="$OUT/table3/teacher" \
      --config.fsp.shared=True || true
else
  echo "== Table 1 skipped: ${left} s left of the budget"
fi
fi  # PART tables

if [[ ",$PART," == *,zoo,* ]]; then
  # One run: the teacher, then each method's stages in turn, scratch last; a command
  # stopped at its time limit resumes where it was when run again.
  methods=$(printf '"%s",' $ZOO_METHODS)
  stage "zoo at RepDistiller's recipe x $ZOO_SCALE: teacher ResNet-26, $ZOO_METHODS, scratch"
  "$PY" -m fsp_jax.main --config cifar10_zoo:recipe=repdistiller --workdir "$OUT/zoo" \
      --config.methods="($methods)" --config.baselines='("scratch",)' \
      --config.schedule_scale="$ZOO_SCALE" --config.num_seeds=3 \
      --config.steps_per_call="$TABLE_K" --config.data.pipeline=device \
      --config.seed_axis="$SEED_AXIS" --config.eval_every=0 \
      --config.log_every="$TABLE_K" --config.checkpoint_every=$(( TABLE_K * 40 )) \
      "${ZOO_DATA[@]}"
fi
stage "summary"
"$PY" "$REPO"/benchmarks/gpu/tables.py "$OUT" | tee "$OUT/summary.md"
