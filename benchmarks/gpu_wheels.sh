#!/usr/bin/env bash
# Wheels for a GPU machine that has PyTorch, transformers' dependencies and CUDA but no network
# (the lent device machines here): what `benchmarks/gpu.sh` needs beyond that image, pinned to
# the versions this repo's .venv runs, into .whl/ (git-ignored). gpu.sh installs them with
# `pip --no-index --target` when it finds no .venv. Usage: bash benchmarks/gpu_wheels.sh [PYVER]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
PY=.venv/bin/python
[ -x "$PY" ] || make setup >/dev/null
ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
rm -rf .whl && mkdir -p .whl
PURE="transformers open_clip_torch ftfy wcwidth webdataset braceexpand hjson pydantic annotated-types
      typing-inspection dill"
pins=()
for p in $PURE; do pins+=("$p==$(ver "$p")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "${pins[@]}"
# compiled: the device's Python, manylinux x86-64
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "pydantic_core==$(ver pydantic_core)"
# DeepSpeed ships a source archive only: build its pure-Python wheel here (ops JIT-build on first use)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(ver deepspeed)"
ls -la .whl
du -sh .whl
