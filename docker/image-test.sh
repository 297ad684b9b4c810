#!/usr/bin/env bash
# `make image-test`: build the image on this kind of machine and run it as the organisers do.
#
#  1. podman, runc and debootstrap from apt when missing (root + apt-get needed);
#  2. the local base localhost/flare22-base:bookworm (debootstrap minbase + python3, venv,
#     pip, CA certificates), made once and kept between runs;
#  3. the image from BUNDLE (default demo/bundle; without one, a random-weight `tiny` bundle
#     exported with PY), timed, its size read back;
#  4. every real CT of the shared data folder (FLARE22_SHARED_DATA, default ../shared/data;
#     phantom CTs where it is absent), one case at a time in a fresh inputs/, with the
#     organisers' FLARE22 command and their FLARE23/24 one (--shm-size=28gb -m 28G), minus
#     --gpus, plus --network=none: exit 0, <case>.nii.gz on the input's exact grid, mode 0644;
#     FLARE22's outputs/ is made as their script makes it (root, 0755), FLARE23/24's 0777;
#     then `flare22 efficiency --image` over the same cases (FLARE22 columns, $OUT/efficiency/);
#  5. one bad input (exit 1, one line, no traceback) and a read-only outputs/ (exit 2, one line);
#  6. removes its containers, its image and its work folder (the base stays, as a cache).
#
# Exit 0 passed, 1 failed, 77 cannot run here (not root, no apt-get, or the engine refuses to
# start a container): the reason is printed on one line. Figures go to $IMAGE_TEST_OUT/figures.txt
# (default build/image-test/figures.txt).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PY:-$REPO/.venv/bin/python}
BASE=${BASE_IMAGE:-localhost/flare22-base:bookworm}
TAG=localhost/flare22-imagetest:latest
NAME=flare22-imagetest
OUT=${IMAGE_TEST_OUT:-$REPO/build/image-test}
SHARED=${FLARE22_SHARED_DATA:-$REPO/../shared/data}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
ENGINE=podman  # what this test exercises; `make image` prefers docker when a daemon answers

skip() { echo "image-test SKIPPED: $*"; exit 77; }
fail() { echo "image-test FAILED: $*"; FAILED=1; }
say() { echo "image-test: $*"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

FAILED=0
mkdir -p "$OUT"
FIG="$OUT/figures.txt"
: >"$FIG"
t_all=$(now)

# -- 1. the tools ---------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "needs root (podman with vfs storage, debootstrap, root-owned outputs/)"
missing=""
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"; done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null 2>&1 || skip "needs$missing and there is no apt-get to install them"
  say "installing$missing with apt-get"
  timeout 900 apt-get update -qq >/dev/null 2>&1
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq podman runc debootstrap >/dev/null 2>&1 \
    || skip "apt-get install podman runc debootstrap failed"
fi
. docker/engine.sh
pick_engine || exit 1
export PODMAN_STORAGE  # the build below picks the same store
P="$ENGINE_CMD"
say "engine: $P"
echo "engine $P" >>"$FIG"

cleanup() {
  $P rm -f -i "$NAME" >/dev/null 2>&1
  $P rmi -f "$TAG" >/dev/null 2>&1
  $P image prune -f >/dev/null 2>&1
  [ -n "${WORK:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# -- 2. the base ----------------------------------------------------------------------------
if ! $P image exists "$BASE"; then
  say "making the local base $BASE with debootstrap (a few minutes)"
  t0=$(now)
  root=$(mktemp -d /var/tmp/flare22-rootfs.XXXXXX)
  if ! timeout 1200 debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$root/rootfs" >"$OUT/debootstrap.log" 2>&1; then
    rm -rf "$root"
    skip "debootstrap of Debian bookworm failed (no Debian mirror?): see $OUT/debootstrap.log"
  fi
  tar -C "$root/rootfs" -c . | $P import - "$BASE" >"$OUT/import.log" 2>&1 || { rm -rf "$root"; fail "podman import of the base (see $OUT/import.log)"; exit 1; }
  rm -rf "$root"
  echo "base_seconds $(secs "$t0" "$(now)")" >>"$FIG"
fi
if ! err=$(timeout 300 $P run --rm --network=none $RUN_FLAGS "$BASE" true 2>&1); then
  skip "the container engine refuses to start a container: $(echo "$err" | tail -n 1)"
fi

# -- 3. the image ---------------------------------------------------------------------------
WORK=$(mktemp -d /var/tmp/flare22-imagetest.XXXXXX)
bundle=${BUNDLE:-demo/bundle}
if [ ! -f "$bundle/manifest.json" ]; then
  say "no bundle at $bundle: exporting a random-weight tiny bundle"
  bundle="$WORK/bundle"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} timeout 900 "$PY" -m flare22 export --random tiny --no-programs --out "$bundle" >"$OUT/export.log" 2>&1 \
    || { fail "bundle export (see $OUT/export.log)"; exit 1; }
fi
say "building $TAG from $bundle on $BASE"
t0=$(now)
if ! timeout 2400 sh -c ". docker/engine.sh; ENGINE=podman; pick_engine; build_image '$bundle' '$TAG' '$BASE'" >"$OUT/build.log" 2>&1; then
  tail -n 20 "$OUT/build.log"
  fail "image build (see $OUT/build.log)"
  exit 1
fi
build_s=$(secs "$t0" "$(now)")
size=$($P image inspect --format '{{.Size}}' "$TAG")
say "built in $build_s s, $(awk -v s="$size" 'BEGIN { printf "%.2f GB", s / 1e9 }')"
{ echo "build_seconds $build_s"; echo "image_bytes $size"; } >>"$FIG"

# -- 4. the cases ---------------------------------------------------------------------------
cases="$WORK/cases"
mkdir -p "$cases"
if ls "$SHARED"/images/*_0000.nii.gz >/dev/null 2>&1; then
  cp "$SHARED"/images/*_0000.nii.gz "$cases/"
  echo "cases real CT from $SHARED/images" >>"$FIG"
else
  say "no real CT at $SHARED/images: using two phantom CTs"
  "$PY" -c "from evaluation.phantom import write_dataset; write_dataset('$WORK/ph', 2, seed=0, shape_zyx=(24, 48, 48), unlabeled=True)" \
    && cp "$WORK"/ph/images/*_0000.nii.gz "$cases/" || { fail "phantom CTs"; exit 1; }
  echo "cases phantoms (no $SHARED/images)" >>"$FIG"
fi

# run_case EDITION CASE_FILE MOUNT_SUFFIX -> sets RC, DIR; the organisers' command minus --gpus
run_case() {
  local edition=$1 file=$2 ro=${3:-}
  DIR="$WORK/run-$edition-$(basename "$file" .nii.gz)${ro:+-ro}"
  mkdir -p "$DIR/inputs"
  cp "$file" "$DIR/inputs/"
  # outputs/ as their scripts make it: FLARE22 os.makedirs as root (0755); FLARE23/24 chmod 777
  (umask 022; mkdir "$DIR/outputs")
  [ "$edition" = 22 ] || chmod -R 777 "$DIR/outputs"
  local extra=""
  [ "$edition" = 22 ] || extra="--shm-size=28gb -m 28G"
  local t0
  t0=$(now)
  # shellcheck disable=SC2086
  (cd "$DIR" && timeout "$STEP_TIMEOUT" $P container run $RUN_FLAGS --network=none $extra --name "$NAME" --rm \
      -v "$PWD/inputs/:/workspace/inputs/" -v "$PWD/outputs/:/workspace/outputs/$ro" \
      "$TAG" /bin/bash -c "sh predict.sh") >"$DIR/log" 2>&1
  RC=$?
  SECONDS_CASE=$(secs "$t0" "$(now)")
  [ "$RC" = 124 ] && $P rm -f "$NAME" >/dev/null 2>&1
}

check_grid() {  # input, prediction: same size, spacing, origin, direction; labels 0..13
  "$PY" - "$1" "$2" <<'PYEOF'
import sys
import numpy as np
import SimpleITK as sitk
a, b = sitk.ReadImage(sys.argv[1]), sitk.ReadImage(sys.argv[2])
same = (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))
labels = sitk.GetArrayViewFromImage(b)
ok = same and labels.min() >= 0 and labels.max() <= 13
print(f"grid {'same' if same else 'DIFFERENT'}: {a.GetSize()} -> {b.GetSize()}, labels {labels.min()}..{labels.max()}")
sys.exit(0 if ok else 1)
PYEOF
}

for edition in 22 23; do
  for file in "$cases"/*_0000.nii.gz; do
    case_id=$(basename "$file" _0000.nii.gz)
    run_case "$edition" "$file"
    pred="$DIR/outputs/$case_id.nii.gz"
    echo "case FLARE$edition $case_id ${SECONDS_CASE}s exit $RC" >>"$FIG"
    if [ "$RC" != 0 ]; then
      tail -n 5 "$DIR/log"; fail "FLARE$edition $case_id: exit $RC"; continue
    fi
    [ -f "$pred" ] || { fail "FLARE$edition $case_id: no $case_id.nii.gz"; continue; }
    mode=$(stat -c %a "$pred")
    [ "$mode" = 644 ] || fail "FLARE$edition $case_id: prediction mode $mode, not 644"
    dmode=$(stat -c '%U %a' "$DIR/outputs")
    grid=$(check_grid "$file" "$pred") || fail "FLARE$edition $case_id: $grid"
    say "FLARE$edition $case_id: exit 0 in ${SECONDS_CASE} s (container start included), $grid, file $mode, outputs/ $dmode"
    rm -rf "$DIR"
  done
done

# -- 4b. the harness, measuring the organisers' FLARE22 command on the same cases --------------
say "flare22 efficiency --image $TAG --edition 22 (the organisers' command, measured as they do)"
if FLARE22_PODMAN="$P" OMP_NUM_THREADS=1 timeout "$STEP_TIMEOUT" "$PY" -m flare22 efficiency --input "$cases" \
    --output "$WORK/eff-out" --report "$OUT/efficiency" --image "$TAG" --engine podman --no-gpu --network-none \
    --edition 22 >"$OUT/efficiency.log" 2>&1; then
  say "harness: $(tr '\n' ' ' <"$OUT/efficiency/efficiency.csv" | cut -c1-400)"
else
  tail -n 5 "$OUT/efficiency.log"; fail "flare22 efficiency over the image (see $OUT/efficiency.log)"
fi
$P rm -f -i "$NAME" >/dev/null 2>&1

# -- 5. bad input, read-only outputs --------------------------------------------------------
head -c 4096 /dev/urandom >"$WORK/Broken_0001_0000.nii.gz"
run_case 22 "$WORK/Broken_0001_0000.nii.gz"
lines=$(grep -c . "$DIR/log")
if [ "$RC" != 1 ] || grep -q Traceback "$DIR/log" || [ -e "$DIR/outputs/Broken_0001.nii.gz" ]; then
  cat "$DIR/log"; fail "bad input: exit $RC (want 1, one message, no traceback, no output)"
else
  say "bad input: exit 1, no output, no traceback ($lines log lines): $(grep -m1 -i broken "$DIR/log")"
fi
echo "case bad-input exit $RC" >>"$FIG"
first=$(ls "$cases"/*_0000.nii.gz | head -n 1)
run_case 22 "$first" :ro
msg=$(grep -v '^$' "$DIR/log")
if [ "$RC" != 2 ] || [ "$(printf '%s\n' "$msg" | wc -l)" != 1 ] || ! printf '%s' "$msg" | grep -q "cannot be written"; then
  printf '%s\n' "$msg"; fail "read-only outputs/: exit $RC (want 2 and one line)"
else
  say "read-only outputs/: exit 2: $msg"
fi
echo "case read-only-outputs exit $RC" >>"$FIG"

echo "total_seconds $(secs "$t_all" "$(now)")" >>"$FIG"
if [ "$FAILED" = 0 ]; then say "passed ($(secs "$t_all" "$(now)") s; figures in $FIG)"; exit 0; fi
say "FAILED (figures in $FIG)"; exit 1
