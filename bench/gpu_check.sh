#!/usr/bin/env bash
# ONE call on a lent GPU machine gives every GPU figure of issue 15, in at most 9 minutes:
#   here:   bash bench/gpu/fetch-deps.sh
#   device: run  carry [".device"]  timeout_s 590  command "bash bench/gpu_check.sh"
# Installs the carried wheels into /tmp (the image's torch stays), puts redis-server on PATH, then
# runs each step under its own limit (every step runs even if one failed) and writes logs, JSON
# reports and nvidia-smi samples to $OUT; the last step prints the summary (bench/gpu_summary.py).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ATTNSEG_CACHE_DIR=/tmp/attnseg-cache
site=/tmp/attnseg-site
python3 -m pip install -q --no-index --no-deps --target "$site" .device/wheels/*.whl 2>&1 | tail -3
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
rr=/tmp/redis-root; mkdir -p "$rr"
for f in .device/debs/*.deb; do dpkg -x "$f" "$rr"; done
export PATH="$rr/usr/bin:$PATH" LD_LIBRARY_PATH="$rr/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

failed=()
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    tail -n 4 "$OUT/$name.log"
    echo "=== $name: rc $rc in $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || failed+=("$name")
}
batches=(--device cuda --batch 1,2,4,8 --batch-repeats 3)
# Limits sum to 530 s (the model is built once, by the first benchmark, into ATTNSEG_CACHE_DIR).
step env 20 bash -c 'nvidia-smi -L; python3 -c "import torch, diffusers; print(torch.__version__, torch.version.cuda, diffusers.__version__)"'
step fp16-tests 80 env ATTNSEG_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_fp16.py
step diffseg 120 python3 -m bench.bench_unsupervised "${batches[@]}" --images 10 --json "$OUT/diffseg.json"
step selfcross 80 python3 -m bench.bench_text "${batches[@]}" --methods selfcross --images 5 --json "$OUT/text.json"
step oneshot 70 python3 -m bench.bench_oneshot --device cuda --epochs 5 --json "$OUT/oneshot.json"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/nvidia-smi.csv" &
sampler=$!
step service 160 python3 -m bench.bench_service --model sd15-random --worker-device cuda --resolution 512 \
    --phases 1x8@640x480 --max-batch 1,2,4,8 --jobs 100 --max-seconds 20 --warmup 2 --json "$OUT/service.json"
kill "$sampler" 2>/dev/null
python3 bench/gpu_summary.py "$OUT"
echo "gpu_check: ${#failed[@]} step(s) failed: ${failed[*]:-none}"
