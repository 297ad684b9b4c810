#!/bin/sh
# Shared by `make image` and `make image-test` (sourced, POSIX sh): which container engine,
# with which flags, and how the image is built from a staged context.
#
# Docker where a daemon answers; otherwise podman, with the flags machines like these need
# (setrlimit is not permitted, crun rejects the hybrid cgroup layout):
#   podman --runtime=runc --storage-driver=D --root R --cgroup-manager=cgroupfs
#   ... build/run --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
# Storage D: overlay where the kernel mounts it on the store's file system (no copy per layer
# or per container, like Docker's overlay2), else vfs, which copies every layer and every
# container's root file system in full (3.4 GB per case for this image). Each driver has its
# own store R ($PODMAN_STORE-overlay or -vfs) so that neither trips over the other's
# database. Override with ENGINE=docker|podman, PODMAN_STORAGE=overlay|vfs, PODMAN_STORE=path.

HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
CONTAINER_CA=/etc/ssl/certs/host-ca.crt
LIMITS="--ulimit nofile=1024:1024 --ulimit nproc=1024:1024"

PODMAN_STORE=${PODMAN_STORE:-/var/lib/containers/flare22}

overlay_works() {  # can the kernel mount overlay on the store's file system?
  command -v unshare >/dev/null 2>&1 || return 1
  mkdir -p "$(dirname "$PODMAN_STORE")" 2>/dev/null || return 1
  _p=$(mktemp -d "$PODMAN_STORE.probe.XXXXXX" 2>/dev/null) || return 1
  mkdir "$_p/l" "$_p/u" "$_p/w" "$_p/m"
  unshare -m sh -c "mount -t overlay overlay -o lowerdir=$_p/l,upperdir=$_p/u,workdir=$_p/w $_p/m" >/dev/null 2>&1
  _ok=$?
  rm -rf "$_p"
  return $_ok
}

pick_engine() {
  if [ -z "${ENGINE:-}" ]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
      ENGINE=docker
    elif command -v podman >/dev/null 2>&1; then
      ENGINE=podman
    else
      echo "flare22 image: no container engine (no docker daemon answers and podman is not installed)" >&2
      return 2
    fi
  fi
  case "$ENGINE" in
    docker) ENGINE_CMD="docker"; RUN_FLAGS=""; BUILD_FLAGS="" ;;
    podman)
      if [ -z "${PODMAN_STORAGE:-}" ]; then
        if overlay_works; then PODMAN_STORAGE=overlay; else PODMAN_STORAGE=vfs; fi
      fi
      ENGINE_CMD="podman --runtime=runc --storage-driver=$PODMAN_STORAGE --root $PODMAN_STORE-$PODMAN_STORAGE"
      ENGINE_CMD="$ENGINE_CMD --runroot /run/flare22-podman-$PODMAN_STORAGE --cgroup-manager=cgroupfs"
      RUN_FLAGS="$LIMITS"; BUILD_FLAGS="$LIMITS --layers=false" ;;
    *) echo "flare22 image: ENGINE must be docker or podman, not '$ENGINE'" >&2; return 2 ;;
  esac
}

# stage_context BUNDLE DIR: exactly what the image needs, so that any bundle folder can go in.
stage_context() {
  if [ ! -f "$1/manifest.json" ]; then
    echo "flare22 image: $1 is not a bundle (no manifest.json); make demo, or pass BUNDLE=path" >&2
    return 2
  fi
  mkdir -p "$2/docker"
  cp Dockerfile requirements.txt predict.sh "$2/"
  cp -r app "$2/app"
  cp docker/predict.sh "$2/docker/"
  cp -rL "$1" "$2/bundle"
  find "$2" -name __pycache__ -prune -exec rm -rf {} +
}

# build_image BUNDLE TAG [BASE]: stage and build; the host's CA bundle is mounted read-only for
# pip (TLS-intercepting networks) where the engine can mount into a build (podman), never copied.
build_image() {
  _ctx=$(mktemp -d "${TMPDIR:-/tmp}/flare22-ctx.XXXXXX") || return 2
  stage_context "$1" "$_ctx" || { rm -rf "$_ctx"; return 2; }
  _base=${3:+--build-arg BASE=$3}
  _ca=""
  if [ "$ENGINE" = podman ] && [ -f "$HOST_CA" ]; then
    _ca="-v $HOST_CA:$CONTAINER_CA:ro --build-arg PIP_CERT=$CONTAINER_CA"
  fi
  # shellcheck disable=SC2086
  $ENGINE_CMD build $BUILD_FLAGS $_base $_ca --build-arg BUNDLE=bundle -t "$2" "$_ctx"
  _rc=$?
  rm -rf "$_ctx"
  return $_rc
}
