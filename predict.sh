#!/bin/sh
# Segment every *_0000.nii.gz in the input folder into <case>.nii.gz (13 FLARE22 organs).
# POSIX sh: the organisers run `sh predict.sh` in /workspace. In the image:
# /workspace/inputs -> /workspace/outputs with the baked-in bundle. Outside a container
# the same script runs with the paths overridden:
#   FLARE22_INPUT=in FLARE22_OUTPUT=out FLARE22_BUNDLE=bundle sh predict.sh
# Extra arguments go to `flare22 predict` (e.g. --device cpu --threads 4 --quiet).
# Exit status: 0 all cases written (or nothing to do), 1 some case failed (the others are
# still written), 2 nothing could run (bundle invalid, folder missing or not writable).
here=$(cd "$(dirname "$0")" && pwd)
home="${FLARE22_HOME:-$here}"
input="${FLARE22_INPUT:-/workspace/inputs}"
output="${FLARE22_OUTPUT:-/workspace/outputs}"
bundle="${FLARE22_BUNDLE:-$home/bundle}"
python="${FLARE22_PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$home/.venv/bin/python" ]; then python="$home/.venv/bin/python"; else python=python3; fi
fi
PYTHONPATH="$home${PYTHONPATH:+:$PYTHONPATH}"
# ONNX Runtime runs the networks on its own thread pool; numpy's BLAS (slice resizing)
# competing with it for the same cores slowed small cases several-fold.
OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
export PYTHONPATH OPENBLAS_NUM_THREADS
# Not `python -m app`: that puts the current folder first on the module path, so an app/
# package in whatever folder this runs from would run instead. The appliance beside this
# script comes first, whatever the current folder.
exec "$python" -c 'import sys; sys.path[0] = sys.argv.pop(1); from app.cli import main; sys.exit(main())' \
  "$home" predict -i "$input" -o "$output" --bundle "$bundle" "$@"
