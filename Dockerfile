# flare22 appliance: the ONNX bundle, the app/ package and predict.sh, nothing fetched at run time.
# Build: `make image BUNDLE=path/to/bundle` (docker, or podman where no docker daemon answers).
# Run as the FLARE organisers do (`--network=none` works too):
#   docker container run --gpus="device=0" --rm -v $PWD/inputs/:/workspace/inputs/ \
#     -v $PWD/outputs/:/workspace/outputs/ flare22:latest /bin/bash -c "sh predict.sh"
# BASE: any Debian/Ubuntu image with python3 (>= 3.11) and its venv module. The default is the
# official slim Python image; machines without an image registry build from a local debootstrap
# base (`make image-test` makes localhost/flare22-base:bookworm). CUDA and cuDNN come as pinned
# PyPI wheels (requirements.txt: CUDA 13.0.x, so NVIDIA driver >= 580), not from the base.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG BUNDLE=bundle
# Only at build time, for networks that intercept TLS: the path of a CA bundle mounted into the
# build (`-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/host-ca.crt:ro`); never copied in.
ARG PIP_CERT
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLARE22_HOME=/opt/flare22 \
    FLARE22_PYTHON=/opt/venv/bin/python \
    FLARE22_BUNDLE=/opt/flare22/bundle

WORKDIR /opt/flare22
COPY requirements.txt .
# Bytecode compiled here, once: without it every container start (every case) recompiled
# numpy, scipy and onnxruntime's Python files (10.7 s of imports instead of 4.8 s, measured).
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt

# The appliance only: no torch, no training or export code. Weights are baked in.
COPY app/ app/
COPY predict.sh .
COPY ${BUNDLE}/ bundle/
COPY docker/predict.sh /workspace/predict.sh

# Runs as root, as the organisers' own examples do: their FLARE22 script creates outputs/ as
# root with mode 0755, which no other user can write. Files are written 0644 (umask 022).
RUN /opt/venv/bin/python -m compileall -q /opt/flare22/app \
    && mkdir -p /workspace/inputs /workspace/outputs \
    && chmod -R a+rX /opt/flare22 /workspace
WORKDIR /workspace
CMD ["sh", "/workspace/predict.sh"]
