#!/usr/bin/env bash
# The GPU check: every GPU stage timed on one GPU in well under 8 minutes, figures as JSON lines.
#
#   benchmarks/gpu_check.sh                 # images from $IMAGES, else ../shared/data/nwpu12, else .gpucheck/images
#   UMAP_N=100000 benchmarks/gpu_check.sh   # the full 100k x 384 UMAP comparison (default 100k)
#
# Needs torch with CUDA; torchvision (nvJPEG), umap-learn and cuML are used when present. No Ray: one process
# stands for one actor or worker. Wheels in .gpucheck/wheels (e.g. umap-learn, pynndescent) are installed to a
# scratch folder first, for GPU machines without network. Figures go to stdout and $OUT/gpu_check.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".gpucheck/wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpucheck-site \
        .gpucheck/wheels/*.whl
    export PYTHONPATH="/tmp/gpucheck-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
images="${IMAGES:-}"
[[ -z "$images" && -d ../shared/data/nwpu12 ]] && images=../shared/data/nwpu12
[[ -z "$images" ]] && images=.gpucheck/images
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
exec python3 benchmarks/gpu_check.py --images "$images" --umap-n "${UMAP_N:-100000}" \
    --dpgmm-n "${DPGMM_N:-1000000}" "$@"
