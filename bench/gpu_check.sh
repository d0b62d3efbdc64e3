#!/usr/bin/env bash
# The GPU check: ViT-H/14 (224 px, mask 0.75, bf16) on ONE GPU in about 5 minutes; the long sweep
# is bench/gpu_bench.sh.
#
#   OUT=/tmp/gpu_check bash bench/gpu_check.sh      # results in $OUT, the table last on stdout
#
# Measures, side by side in one run, at micro-batch 32 (the recipe's per-GPU batch) and 128:
#   1. env: device, versions, the measured bf16 matmul ceiling (tools/gpu_check.py env);
#   2. the plain-PyTorch autocast step (fp32 weights, bf16 autocast: what most MAE code runs) and
#      the bare bf16 step (flat buffers, fused AdamW; eager SDPA and cuDNN attention, and regional
#      compile), timed in windows of back-to-back steps, one window profiled (tools/bench_model.py);
#   3. the real loop (tools/train.py's main: DeepSpeed ZeRO-1 with the lean step) on synthetic data
#      at 32 and 128, and on 3,072 generated 500x375 JPEGs in shards at 128 with CPU decode (14
#      workers) and with GPU decode (tools/bench_loop.py);
#   4. GPU JPEG decode alone: time, kernel launches per batch, agreement with the CPU path
#      (tools/bench_decode.py);
#   5. the report: one table + $OUT/gpu_check.json; exits 1 if the loop runs below 0.9x the bare
#      step at either micro-batch (tools/gpu_check.py report).
# STEPS="env bare-bf16 ..." runs only the named steps (bare-graphs and loop-compile, CUDA graphs and
# compiled blocks in the bare step and the loop, run only when named there).
# Steps past the time budget (BUDGET_S, 270 s by default) are skipped and say so. Each step's log
# is in $OUT/logs.tar.gz. PRESET, CONFIG, IMG, MB, MB_DATA, WORKERS, NUM_IMAGES, DEVICE, DECODE_ARGS,
# COMPILE=0 shrink it
# (tests/test_gpu_check.py runs it on a CPU with the tiny preset, so the script is proven before a
# GPU is lent). Needs DeepSpeed, webdataset and submitit: on the lent GPU machine they
# come as wheels in .whl/ (../shared/gpu/fetch-wheels.sh), installed first if present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
BUDGET_S=${BUDGET_S:-270}
PY=${PY:-python3}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
step() {  # step NAME SECONDS_NEEDED CMD... : run CMD unless the budget cannot fit it (or STEPS leaves it out)
  local name=$1 need=$2; shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
    return 0
  fi
  if [ -z "${STEPS:-}" ] && [[ " bare-graphs loop-compile " == *" $name "* ]]; then
    return 0  # optional: only when STEPS names it
  fi
  if (( $(elapsed) + need > BUDGET_S )); then
    echo "== $name: SKIPPED (needs ~${need}s, $(elapsed)s of ${BUDGET_S}s used)" | tee -a "$OUT/logs/skipped.txt"
    return 0
  fi
  echo "== $name ($(elapsed)s)"
  # A hung step (a deadlock, a stuck kernel) must not eat the whole run: 3x its expected time.
  timeout -k 5 $(( 3 * need )) "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/logs/$name.log"
  echo "== $name: exit $rc after $(elapsed)s"
}
PRESET=${PRESET:-mae_vit_huge_patch14}
CONFIG=${CONFIG:-configs/vit_huge.yaml}
IMG=${IMG:-224}
MB=${MB:-32,128}
MB_DATA=${MB_DATA:-128}
WORKERS=${WORKERS:-14}
NUM_IMAGES=${NUM_IMAGES:-3072}
H=(--preset "$PRESET" --img-size "$IMG" --mask-ratio 0.75 --micro-batch "$MB" --warmup 3 --repeats 4 --window 5 --profile)
L=(--workers "$WORKERS" "model.img_size=$IMG")

step env 20 "$PY" tools/gpu_check.py env "$OUT"
step bare-autocast 40 "$PY" tools/bench_model.py "${H[@]}" --precision autocast --attn sdpa --json "$OUT/bare.json" \
  --note "plain PyTorch autocast step"
step bare-bf16 50 "$PY" tools/bench_model.py "${H[@]}" --precision bf16 --attn sdpa,cudnn --json "$OUT/bare.json" \
  --append --note "bare bf16 step, eager"
step loop-synthetic 60 "$PY" tools/bench_loop.py "$CONFIG" --micro-batch "$MB" --data synthetic "${L[@]}" \
  --json "$OUT/loop.json"
step loop-data 70 "$PY" tools/bench_loop.py "$CONFIG" --micro-batch "$MB_DATA" --data shards,gpu_decode "${L[@]}" \
  --make-shards "$OUT/shards" --num-images "$NUM_IMAGES" --json "$OUT/loop_data.json"
if [ -f tools/bench_decode.py ]; then
  # shellcheck disable=SC2086  # DECODE_ARGS is a list of flags
  step decode 45 "$PY" tools/bench_decode.py --device "${DEVICE:-cuda}" ${DECODE_ARGS:-} --json "$OUT/decode.json"
fi
[ "${COMPILE:-1}" = 1 ] && step bare-compile 40 "$PY" tools/bench_model.py "${H[@]}" --precision bf16 --attn sdpa --compile blocks \
  --json "$OUT/bare.json" --append --note "bare bf16 step, regional compile"
# Launch-bound micro-batches: the blocks as CUDA graphs, bare and in the loop (not in the default run).
step bare-graphs 50 "$PY" tools/bench_model.py "${H[@]}" --precision bf16 --attn sdpa --compile graphs \
  --json "$OUT/bare.json" --append --note "bare bf16 step, regional compile with CUDA graphs"
step loop-compile 100 "$PY" tools/bench_loop.py "$CONFIG" --micro-batch "$MB" --data synthetic "${L[@]}" --no-base \
  --variant "model.compile=graphs" --variant "model.compile=blocks" --json "$OUT/loop_compile.json"
rm -rf "$OUT/shards"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "== report ($(elapsed)s)"
"$PY" tools/gpu_check.py report "$OUT"
