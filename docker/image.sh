#!/bin/sh
# `make image`: build flare22:latest (TAG=...) from BUNDLE (default demo/bundle) with docker, or
# with podman where no docker daemon answers. BASE=... picks the base image (default: the
# Dockerfile's python:3.11-slim-bookworm; localhost/flare22-base:bookworm is the local one that
# `make image-test` makes on machines without an image registry).
set -u
cd "$(dirname "$0")/.." || exit 2
. docker/engine.sh
pick_engine || exit 2
bundle=${BUNDLE:-demo/bundle}
tag=${TAG:-flare22:latest}
echo "flare22 image: building $tag from $bundle with $ENGINE" >&2
build_image "$bundle" "$tag" "${BASE:-}" || exit $?
$ENGINE_CMD image ls "$tag"
