#!/usr/bin/env bash
# Every GPU benchmark in one script, within ~8 minutes on one H100/H200, each printing its ratio:
#   1. CLIP ViT-L-14, bf16: the Spark `clip` step vs a plain open_clip loop (same images, same batch)
#   2. recaption: the Spark `recaption` step vs a plain transformers `generate` loop (a ~0.9B random
#      Qwen2.5-VL with realistic shapes; greedy on both sides, captions compared)
#   3. training MFU: the staged trainer on a ~0.7B ViT + projector + LLM, bf16, vision-tower FLOPs counted
# Random weights everywhere (nothing can be downloaded on the device machine); throughput does not
# depend on the weights. Usage: bash benchmarks/gpu.sh [OUT_DIR]   (figures also go to OUT_DIR/*.log)
# On a GPU machine with no network and no .venv (PyTorch and CUDA preinstalled, as on the lent device
# machines here), run `bash benchmarks/gpu_wheels.sh` beforehand where pip works and bring .whl/ along:
# the wheels install with --no-index into a scratch folder. Without Java or pyspark there, the CLIP and
# recaption benchmarks time the step's task path (benchmarks/task_engine.py) instead of a Spark job.
# ONLY="train_mfu" runs a subset; TRAIN_EXTRA="--steps 30 --profile 6" adds train_gpu.py arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT="${1:-${OUT:-bench-out/gpu}}"
mkdir -p "$OUT"
PY=.venv/bin/python
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "benchmarks/gpu.sh: no NVIDIA GPU here (nvidia-smi finds none); run it on a GPU machine." >&2
  exit 2
fi
if [ ! -x "$PY" ] && [ -d .whl ]; then  # offline GPU image: its python3 plus the carried wheels
  PY=python3
  site=$(mktemp -d /tmp/rf-site.XXXX) ns=$(mktemp -d /tmp/rf-ns.XXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
  mkdir -p "$ns/reelforge"  # the pyproject's package-dir mapping, without an install
  for d in curation filters mixers training jobs; do ln -s "$PWD/$d" "$ns/reelforge/$d"; done
  export PYTHONPATH="$site:$ns:$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif [ ! -x "$PY" ]; then
  make setup >/dev/null || exit 1
fi
nvidia-smi -L | tee "$OUT/device.txt"
"$PY" -c "import torch, transformers, open_clip, deepspeed; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| open_clip', open_clip.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 \
  | grep -v WARNING | tee -a "$OUT/device.txt"
status=0
run() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -Ei "ratio|/s|per_s|mfu|tflop|error|match|identical" || true
  local rc=${PIPESTATUS[0]}
  echo "   ($name: exit $rc, $((SECONDS - t0)) s)"
  [ "$rc" = 0 ] || status=1
}
run clip_vitl14 170 $PY benchmarks/bench_clip.py --model ViT-L-14 --device cuda --images 1536 --batch 256 \
  --master "local[4]" --repeats 3
run recaption 170 $PY benchmarks/bench_recaption.py --vlm-size bench --device cuda --images 256 --batch 32 \
  --new-tokens 32 --master "local[2]" --repeats 2
run train_mfu 200 $PY benchmarks/train_gpu.py --steps 60 --samples 4000 --workers 8 ${TRAIN_EXTRA:-}
echo "logs: $OUT"
exit $status
