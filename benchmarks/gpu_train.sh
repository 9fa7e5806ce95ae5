#!/usr/bin/env bash
# Run ON the GPU machine, in one call of the device tool, from the repository root (under 5 minutes):
#   benchmarks/gpu_wheels.sh here first; then run `bash benchmarks/gpu_train.sh` with carry [".whl"].
# Writes $OUT/gpu_train.json (or benchmarks/results/gpu_train.json) and prints one line per mode.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/_gpu_env.sh
. benchmarks/_gpu_env.sh
PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_train --out "$dest/gpu_train.json" "$@"
