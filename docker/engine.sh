#!/bin/sh
# Shared by `make image` and `make image-test` (sourced, POSIX sh): which container engine,
# with which flags, and how the image is built from a staged context.
#
# Docker where a daemon answers; otherwise podman, with the flags machines like these need
# (setrlimit is not permitted, crun rejects the hybrid cgroup layout, overlay is unavailable):
#   podman --runtime=runc --storage-driver=vfs --cgroup-manager=cgroupfs
#   ... build/run --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
# Override with ENGINE=docker|podman.

HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
CONTAINER_CA=/etc/ssl/certs/host-ca.crt
LIMITS="--ulimit nofile=1024:1024 --ulimit nproc=1024:1024"

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
    podman) ENGINE_CMD="podman --runtime=runc --storage-driver=vfs --cgroup-manager=cgroupfs"
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
