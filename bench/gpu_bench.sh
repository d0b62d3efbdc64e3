#!/usr/bin/env bash
# ViT-H/14 MAE training-step benchmark on ONE GPU (written for an H100 SXM 80GB; any CUDA GPU runs it).
#
#   bash bench/gpu_bench.sh                 # all variants at micro-batches 64, 128, 256 (+ 8, 32)
#   OUT=bench/bench_model_h200.json bash bench/gpu_bench.sh
#
# Each step is forward + backward + AdamW in DeepSpeed-style bf16 (bf16 weights/activations,
# fp32 master weights and Adam state), on a fixed random batch: the model alone, no data loading,
# no ZeRO communication. Variants: attention math | sdpa | flash (SDPA forced to FlashAttention)
# | flash_attn (the flash-attn package; skipped with a reason when it is not installed),
# x torch.compile of each block off | on, x activation checkpointing off | every block.
# 3 warm-up steps (they absorb compilation), then the median of 10 device-synchronised steps.
# Expect ~40 minutes on an H100, most of it compiling. Results: a table on stdout and $OUT
# (JSON); copy the table into bench/RESULTS.md. Keep the machine otherwise idle.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/bench_model_h100.json}
PRESET=mae_vit_huge_patch14
COMMON=(--preset "$PRESET" --img-size 224 --mask-ratio 0.75 --precision bf16 --warmup 3 --repeats 10)

mkdir -p bench
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  "$PY" -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed (pip install flash-attn --no-build-isolation to include it)"
} | tee "${OUT%.json}.env.txt"

# The analytic FLOPs and the peak the MFU column uses (H100 SXM: 989.4 TFLOP/s bf16 dense).
"$PY" -m maescale.flops

# 1. Every variant at the issue's micro-batches: 4 attention x 2 compile x 2 checkpointing = 16 runs each.
first=1
for MB in 64 128 256; do
  "$PY" tools/bench_model.py "${COMMON[@]}" --micro-batch "$MB" \
      --attn sdpa,math,flash,flash_attn --compile off,on --ckpt 0,1 --grid product \
      --json "$OUT" $([ $first = 1 ] || echo --append) --note "ViT-H/14 one GPU, all variants, mb $MB"
  first=0
done

# 2. The per-GPU micro-batches of global batch 4096 at 16 nodes (32) and 64 nodes (8) x 8 GPUs:
#    how much MFU is left when the per-GPU work shrinks (bench/SCALING.md assumes 40-50%).
"$PY" tools/bench_model.py "${COMMON[@]}" --micro-batch 8,32 \
    --attn sdpa,flash_attn --compile off,on --ckpt 0 --grid product \
    --json "$OUT" --append --note "ViT-H/14 one GPU, small per-GPU batches of 16/64-node runs"

# 3. The micro-batch ceiling: the largest of these that runs without checkpointing; the memory
#    model (bench/RESULTS.md) predicts about 590 at ZeRO-1 x 8 ranks, fewer here (one GPU holds
#    all optimizer state: 20 bytes/param with the fp32 gradient copy).
"$PY" tools/bench_model.py "${COMMON[@]}" --micro-batch 384,448,512 \
    --attn sdpa --compile off --ckpt 0 --warmup 2 --repeats 3 \
    --json "$OUT" --append --note "ViT-H/14 one GPU, memory ceiling without checkpointing"

echo "wrote $OUT"
