#!/usr/bin/env bash
# Every GPU benchmark in one script, within ~8 minutes on one H100/H200, each printing its ratio:
#   1. CLIP ViT-L-14, bf16: the Spark `clip` step vs a plain open_clip loop (same images, same batch)
#   2. recaption: the Spark `recaption` step vs a plain transformers `generate` loop (a ~0.9B random
#      Qwen2.5-VL with realistic shapes; greedy on both sides, captions compared)
#   3. training MFU: the staged trainer on a ~0.7B ViT + projector + LLM, bf16, vision-tower FLOPs counted
# Random weights everywhere (nothing can be downloaded on the device machine); throughput does not
# depend on the weights. Usage: bash benchmarks/gpu.sh [OUT_DIR]   (figures also go to OUT_DIR/*.log)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench-out/gpu}}"
mkdir -p "$OUT"
PY=.venv/bin/python
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "benchmarks/gpu.sh: no NVIDIA GPU here (nvidia-smi finds none); run it on a GPU machine." >&2
  exit 2
fi
if [ ! -x "$PY" ]; then make setup >/dev/null || exit 1; fi
nvidia-smi -L | tee "$OUT/device.txt"
status=0
run() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -Ei "ratio|/s|mfu|tflop|error|match" || true
  local rc=${PIPESTATUS[0]}
  echo "   ($name: exit $rc, $((SECONDS - t0)) s)"
  [ "$rc" = 0 ] || status=1
}
run clip_vitl14 150 $PY benchmarks/bench_clip.py --model ViT-L-14 --device cuda --images 2048 --batch 256 \
  --master "local[4]" --repeats 3
run recaption 170 $PY benchmarks/bench_recaption.py --vlm-size bench --device cuda --images 256 --batch 32 \
  --new-tokens 32 --master "local[2]" --repeats 2
run train_mfu 150 $PY benchmarks/train_gpu.py --steps 60 --samples 4000 --workers 8
echo "logs: $OUT"
exit $status
