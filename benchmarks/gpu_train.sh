#!/usr/bin/env bash
# Run ON the GPU machine, in one call of the device tool, from the repository root (under 5 minutes):
#   benchmarks/gpu_wheels.sh here first; then run `bash benchmarks/gpu_train.sh` with carry [".whl"].
# Writes $OUT/gpu_train.json (or benchmarks/results/gpu_train.json) and prints one line per mode.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_train --out "$dest/gpu_train.json" "$@"
