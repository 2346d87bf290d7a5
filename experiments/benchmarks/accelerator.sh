#!/usr/bin/env bash
# CLIP ViT-B/16 (configs/clip_vit_b16.py, bf16) on one accelerator: the attention check at the
# image tower's shapes, then the train-step benchmark at each batch size given (default 1024
# 2048). Each run writes OUTDIR/b16_BATCH.json and .log; a batch that does not fit fails alone.
#
#   bash experiments/benchmarks/accelerator.sh OUTDIR [BATCH ...]
#
# XLA_PYTHON_CLIENT_MEM_FRACTION (default here 0.95) is the share of device memory JAX takes.
set -uo pipefail
out=${1:?usage: accelerator.sh OUTDIR [BATCH ...]}
shift
batches=("${@:-1024 2048}")
read -r -a batches <<<"${batches[*]}"
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export PYTHONUNBUFFERED=1
python3 -m experiments.benchmarks.attention --batch=${ATTN_BATCH:-256} --out="$out/attention.json" \
  2>&1 | grep -v '^[IW][0-9]' | tee "$out/attention.log"
for b in "${batches[@]}"; do
  echo "=== ViT-B/16 batch $b"
  timeout "${RUN_TIMEOUT_S:-240}" python3 -m experiments.benchmarks.run \
    --config=configs/clip_vit_b16.py --config.train.batch_size="$b" --pipeline=false \
    --torch=off --steps=20 --warmup=3 --out="$out/b16_$b.json" 2>&1 \
    | grep -v '^[IW][0-9]' | tee "$out/b16_$b.log" || echo "batch $b failed (rc $?)"
done
