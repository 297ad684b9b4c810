#!/usr/bin/env bash
# The one prepared measurement for a lent GPU machine (the device tool): one command, under
# 10 minutes, JSON under $OUT. Nothing is installed there (no package registry); everything
# else it needs travels in the working tree. It uses the machine's own Python packages:
#   ONNX Runtime part (bench/io_binding.py): numpy, scipy, psutil, nvidia-ml-py (GPU memory
#     by NVML), onnxruntime-gpu 1.31 with CUDA 13 + cuDNN 9 (its nvidia-* wheels or the
#     system's), and torch + timm + segmentation-models-pytorch + onnx to export a random
#     `paper` bundle (or GPU_BUNDLE=DIR, a bundle carried along); SimpleITK for real CTs.
#   torch part (bench/gpu.py): torch with CUDA, timm, segmentation-models-pytorch.
# Wheels missing there (segmentation-models-pytorch is pure Python) may travel in .whl/.
# A part whose needs are missing is skipped with one line saying what is missing.
# It measures: the providers that really run, I/O binding on / off, the stcn_read graph
# against the numpy memory read, peak GPU memory (NVML), time per case on the real CTs
# (FLARE22_CASES=DIR of *_0000.nii.gz, default ../shared/data/images; a 200 x 512 x 512
# phantom where absent), and the torch backend's paper-size fp16 run.
#
#   bash bench/gpu.sh               # on the GPU machine
#   bash bench/gpu.sh --cpu-check   # dry run on a CPU: the same steps at tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
CHECK=0
if [ "${1:-}" = "--cpu-check" ]; then CHECK=1; shift; fi
PY="${PYTHON:-python3}"
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flare22-site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/flare22-site"
fi
status=0
step() {  # step NAME LIMIT_S CMD...: one line of outcome in $OUT/steps.txt
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@"; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0)) s" >> "$OUT/steps.txt"
  [ $rc -eq 0 ] || status=1
}
missing() {  # missing MODULE...: prints the ones this Python cannot import
  "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
: > "$OUT/steps.txt"

# what the machine has
"$PY" - "$OUT/env.json" <<'EOF'
import importlib, json, platform, subprocess, sys
env = {"python": platform.python_version(), "packages": {}}
for m in ("numpy", "scipy", "psutil", "pynvml", "SimpleITK", "onnxruntime", "torch", "timm", "segmentation_models_pytorch", "onnx"):
    try:
        env["packages"][m] = getattr(importlib.import_module(m), "__version__", "present")
    except Exception as exc:
        env["packages"][m] = f"missing ({type(exc).__name__})"
try:
    import onnxruntime as ort
    env["ort_available_providers"] = ort.get_available_providers()
except Exception:
    pass
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:
    env["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
open(sys.argv[1], "w").write(json.dumps(env, indent=1))
print(json.dumps(env))
EOF

if [ $CHECK -eq 1 ]; then
  DEVICE=cpu; CONFIG=tiny; SIZE=(--slices 8 --in-plane 64); REPEATS=1; TORCH=(--device cpu --config tiny --dtype fp32 --slices 8 --in-plane 64)
else
  DEVICE=cuda; CONFIG=paper; SIZE=(--slices 200 --in-plane 512); REPEATS=3; TORCH=(--device cuda --config paper --dtype fp16 --slices 200)
fi
CASES="${FLARE22_CASES:-../shared/data/images}"

# 1. ONNX Runtime: providers, I/O binding on/off x stcn_read graph / numpy read, NVML memory
need=$(missing numpy scipy psutil onnxruntime)
if [ -z "${GPU_BUNDLE:-}" ]; then need="$need $(missing torch timm segmentation_models_pytorch onnx)"; fi
need=$(echo $need)
if [ -n "$need" ]; then
  echo "ONNX Runtime part skipped: missing $need" | tee -a "$OUT/steps.txt"; status=1
else
  BUNDLE="${GPU_BUNDLE:-/tmp/flare22-gpu-bundle-$CONFIG}"  # outside $OUT: a paper bundle is ~700 MB
  if [ -z "${GPU_BUNDLE:-}" ] && [ ! -f "$BUNDLE/manifest.json" ]; then
    step export 180 "$PY" -c "from export.bundle import export_bundle; export_bundle('$BUNDLE', ref_config='$CONFIG', stcn_config='$CONFIG', seed=0, quiet=True)"
  fi
  SRC=(--bundle "$BUNDLE")
  if [ -d "$CASES" ] && [ -z "$(missing SimpleITK)" ]; then
    step ort-real-cts 100 "$PY" bench/io_binding.py "${SRC[@]}" --device $DEVICE --cases "$CASES" --repeats $REPEATS --out "$OUT/ort-real"
  fi
  step ort-phantom 130 "$PY" bench/io_binding.py "${SRC[@]}" --device $DEVICE "${SIZE[@]}" --repeats $REPEATS --out "$OUT/ort-phantom"
  # the default on CUDA alone in its process: its peak GPU memory, not mixed with other variants' sessions
  step ort-memory 60 "$PY" bench/io_binding.py "${SRC[@]}" --device $DEVICE "${SIZE[@]}" --repeats 1 --variants bound-graph --out "$OUT/ort-memory"
fi

# 2. torch backend, paper networks in fp16 (the previous GPU script)
need=$(echo $(missing numpy scipy psutil torch timm segmentation_models_pytorch))
if [ -n "$need" ]; then
  echo "torch part skipped: missing $need" | tee -a "$OUT/steps.txt"; status=1
else
  step torch 100 "$PY" bench/gpu.py "${TORCH[@]}" --out "$OUT/torch"
fi
cat "$OUT/steps.txt"
exit $status
