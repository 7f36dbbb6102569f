#!/usr/bin/env bash
# Device side of benchmarks/gpu_transfer.py, for a GPU box that has no network and takes at most ~60 MB a call.
#
# Here (once): pack the untuned backbone (float16), both scene sets and the pydantic wheels, and cut the
# gzipped tar into parts of 57 MiB under .gpuxfer/ (ignored by git):
#   benchmarks/gpu_transfer.sh pack BACKBONE_DIR DATA_DIR
# There, one call per part (carry .gpuxfer/partN), each on the same warm machine:
#   benchmarks/gpu_transfer.sh receive N
# The last part's call also runs the work and returns the first ~60 MB of features:
#   benchmarks/gpu_transfer.sh run
# Later calls return the rest, one batch of at most 60 MB and 6 files each (batches listed in the run's log):
#   benchmarks/gpu_transfer.sh fetch K
set -euo pipefail
cd "$(dirname "$0")/.."
stash=/tmp/gpuxfer
case "${1:?pack, receive N, run or fetch K}" in
pack)
    backbone=${2:?backbone folder}; data=${3:?folder holding eurosat/ and nwpu12/}
    tmp=$(mktemp -d)
    mkdir -p "$tmp/xfer/data" "$tmp/xfer/wheels" .gpuxfer
    python - "$backbone" "$tmp/xfer/backbone" <<'EOF'
import sys
from scenecluster.models import load_backbone, save_backbone
save_backbone(load_backbone(sys.argv[1]).half(), sys.argv[2])  # half the bytes; upcast again on load
EOF
    cp .gpucheck/wheels/{annotated,pydantic,typing}*.whl "$tmp/xfer/wheels/"
    cp -r "$data/eurosat" "$data/nwpu12" "$tmp/xfer/data/"
    tar cf - -C "$tmp" xfer | gzip -1 | split -b 57M -d -a 1 - .gpuxfer/part
    rm -rf "$tmp"
    ls -l .gpuxfer
    ;;
receive)
    mkdir -p "$stash"
    cp ".gpuxfer/part$2" "$stash/"
    ls -l "$stash"
    ;;
run)
    cd "$stash"
    cat part? | tar xzf -
    python3 -c "import pydantic" 2>/dev/null \
        || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$stash/site" xfer/wheels/*.whl
    cd - >/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$stash/log.txt" || true
    PYTHONPATH="$stash/site:$PWD/src" PYTHONUNBUFFERED=1 python3 benchmarks/gpu_transfer.py \
        --data "$stash/xfer/data" --backbone "$stash/xfer/backbone" --out "$stash/res" "${@:2}" 2>&1 \
        | grep -v -e '^Loading weights' -e '^Writing model' | tee -a "$stash/log.txt" \
        || echo "gpu_transfer.py failed; returning what it wrote" | tee -a "$stash/log.txt"
    # Cut every feature file into chunks of 15 MB, in the order they were made, and group them into batches.
    mkdir -p "$stash/chunks"
    python3 - "$stash" <<'EOF'
import json, os, sys
stash = sys.argv[1]
runs = json.load(open(f"{stash}/res/meta.json"))["runs"]
batches, batch, size = [], [], 0
for run in runs:
    data = open(f"{stash}/res/{run['file']}", "rb").read()
    for i in range(0, len(data), 15_000_000):
        name = f"{run['file']}.{i // 15_000_000}"
        open(f"{stash}/chunks/{name}", "wb").write(data[i : i + 15_000_000])
        part = min(15_000_000, len(data) - i)
        if batch and (size + part > 60_000_000 or len(batch) == 6):
            batches.append(batch)
            batch, size = [], 0
        batch.append(name)
        size += part
batches.append(batch)
json.dump(batches, open(f"{stash}/batches.json", "w"))
print("batches:", json.dumps(batches))
EOF
    cp "$stash/res/meta.json" "$stash/log.txt" "$OUT/"
    python3 -c "import json,sys; print('\n'.join(json.load(open(sys.argv[1]))[0]))" "$stash/batches.json" \
        | while read -r f; do cp "$stash/chunks/$f" "$OUT/"; done
    ;;
fetch)
    python3 -c "import json,sys; print('\n'.join(json.load(open(sys.argv[1]))[int(sys.argv[2])]))" \
        "$stash/batches.json" "$2" | while read -r f; do cp "$stash/chunks/$f" "$OUT/"; done
    ls -l "$OUT"
    ;;
esac
