#!/usr/bin/env bash
# Fine-tune DINOv2 ViT-S/14 (offline stand-in for facebook/dinov2-small) on nwpu12 at 112 px, for about
# 60 minutes of a 2-core CPU machine, then save OUTPUT/backbone for `scenecluster cluster`.
# DATA (default: ../shared/data/nwpu12, beside the repository) and OUTPUT (default: /tmp/finetune-nwpu12) and
# the virtual environment VENV (default: .venv) are relative to the repository root, or absolute.
#
# Step budget: a training step (augment + fwd + bwd + AdamW) ran at 15.6 images/s on one core
# (benchmarks/bench_finetune.py, 112 px, batch 32, 1 thread, the other core busy); 2 workers x 1 thread
# should reach ~25 images/s, but the machine is shared, so plan on ~12 images/s for the group:
#   (3600 s - ~300 s for start-up, decode and 6 validation passes) x 12 images/s / 32 per step ~ 1240 steps.
# nwpu12: 8,400 images, 10 % held out -> 7,560 train -> 236 steps/epoch at 2 workers x 16 -> ~5 epochs.
# Recipe for a small source: freeze the patch embedding + first 4 of 12 blocks, layer decay 0.75 (block 12
# gets 7.5e-5, block 5 ~1e-5), peak lr 1e-4 for the heads, warm-up 120 steps (~half an epoch, 10 %).
# --resume makes a rerun after an interruption continue from the last epoch checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
. "${VENV:-.venv}/bin/activate"
DATA=${DATA:-../shared/data/nwpu12}
OUTPUT=${OUTPUT:-/tmp/finetune-nwpu12}
THROUGHPUT=${THROUGHPUT:-12}          # images/s of the whole worker group, planned
BUDGET_S=${BUDGET_S:-3600}
OVERHEAD_S=${OVERHEAD_S:-300}
MAX_STEPS=$(( (BUDGET_S - OVERHEAD_S) * THROUGHPUT / 32 ))
echo "finetune nwpu12: max_steps=${MAX_STEPS} start=$(date -Is)"
time scenecluster finetune "${DATA}" --output "${OUTPUT}" \
  --image-size 112 --workers 2 --batch-size 16 --torch-threads 1 --device cpu --num-cpus 2 \
  --epochs 6 --max-steps "${MAX_STEPS}" --lr 1e-4 --layer-decay 0.75 --freeze-blocks 4 \
  --warmup-steps 120 --weight-decay 0.05 --label-smoothing 0.1 --val-fraction 0.1 --seed 0 --resume
echo "done=$(date -Is)"
