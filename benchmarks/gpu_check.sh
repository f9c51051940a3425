#!/usr/bin/env bash
# The GPU session for issue 9, prepared: latency of pruned models against the original on CUDA (bf16), within
# about 8 minutes on an H200, every file under "$OUT" (default /tmp/fxprune-gpu). No pip installs: it needs
# python3 with torch, torchvision and transformers. Run from the repository root:
#
#     OUT=/path/to/folder bash benchmarks/gpu_check.sh          # the GPU sweep
#     OUT=/tmp/smoke bash benchmarks/gpu_check.sh --smoke       # the same steps on CPU with tiny models (~1-2 min)
#
# Steps (each one worker process per model; a model past its --timeout keeps the rows measured before):
#   1. resnet50 and vit_b_16, ratios 0.1..0.8, defaults and round_to=1, batch 1 and 64, 20 runs each
#      (~1-2 min: prune ~1 s per ratio, cudnn autotuning, a batch of 64 takes 10-40 ms);        limit 2 x 120 s
#   2. llama-7b (32 layers, bf16, built on the GPU per ratio since it is pruned in place), prefill 1 x 1024 and
#      4 x 1024 tokens, defaults at ratios 0.1..0.8, round_to=1 at 0.2, 0.5 and 0.8 only, 10 runs each
#      (12 models x ~20 s: build ~5 s, in-place prune ~10-15 s, timing ~2 s; ~4-5 min);          limit 300 s
#   3. merge: $OUT/latency_cuda.md, .jsonl and .png (the files to commit as benchmarks/latency_cuda.*),
#      and a summary (rows slower than the original; speed-ups at ratio 0.5) at the end of $OUT/log.txt.
# Worst case (every limit reached) ~9.5 min, under the 10-minute limit of one command; the table then says which
# rows are missing (the log says why).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fxprune-gpu}"
mkdir -p "$OUT"
export PYTHONPATH=.
PY="${PYTHON:-python3}"
DEV=cuda
IMAGES=(--models resnet50,vit_b_16 --timeout 120)
LLAMA=(--models llama-7b --round1-ratios 0.2,0.5,0.8 --repeats 10 --warmup 2 --timeout 300)
if [ "${1:-}" = "--smoke" ]; then  # CPU, tiny: checks the script, not the hardware
    DEV=cpu
    IMAGES=(--models resnet18 --ratios 0.5 --batches 1,2 --repeats 1 --timeout 300)
    LLAMA=(--models llama-tiny --ratios 0.3,0.6 --round1-ratios 0.6 --llama-batches 1,2 --repeats 1 --warmup 1
           --timeout 300)
fi
START=$(date +%s)
{
    echo "gpu_check.sh $*: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(uname -srm)"
    "$PY" -c "import torch, torchvision, transformers; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and
torch.cuda.get_device_name(0))"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
        --format=csv
    grep -m1 "model name" /proc/cpuinfo; nproc
    "$PY" benchmarks/latency.py --device "$DEV" "${IMAGES[@]}" --out "$OUT/latency_${DEV}_images.md" \
        --plot "$OUT/images.png"
    echo "images done after $(( $(date +%s) - START )) s"
    "$PY" benchmarks/latency.py --device "$DEV" "${LLAMA[@]}" --out "$OUT/latency_${DEV}_llama.md" \
        --plot "$OUT/llama.png"
    echo "llama done after $(( $(date +%s) - START )) s"
    "$PY" benchmarks/latency.py --from-raw "$OUT/latency_${DEV}_images.jsonl,$OUT/latency_${DEV}_llama.jsonl" \
        --out "$OUT/latency_${DEV}.md"
    echo "all done after $(( $(date +%s) - START )) s"
} 2>&1 | tee "$OUT/log.txt"
test -s "$OUT/latency_${DEV}.md"
