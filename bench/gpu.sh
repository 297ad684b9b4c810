#!/usr/bin/env bash
# The prepared GPU measurement for a lent machine (device tool): one command, < 6 minutes.
# Wheels missing there (segmentation-models-pytorch) travel in .whl/ (see README, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
export PYTHONUNBUFFERED=1 OUT="${OUT:-bench/out/gpu}"
timeout 330 python3 bench/gpu.py --device cuda --config paper --dtype fp16 --slices 200 "$@"
