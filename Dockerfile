# flare22 appliance. ONNX Runtime GPU 1.31 needs CUDA 13 and cuDNN 9: NVIDIA driver >= 580.
# Build: make image BUNDLE=path/to/bundle; run as the FLARE organisers do:
#   docker container run --gpus="device=0" --rm -v $PWD/inputs/:/workspace/inputs/ \
#     -v $PWD/outputs/:/workspace/outputs/ flare22:latest /bin/bash -c "sh predict.sh"
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

ARG BUNDLE=bundle
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLARE22_HOME=/opt/flare22 \
    FLARE22_PYTHON=/opt/venv/bin/python \
    FLARE22_BUNDLE=/opt/flare22/bundle

# The CUDA base image fixes the Ubuntu release, and with it these packages' versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/flare22
COPY requirements.txt .
RUN /opt/venv/bin/pip install --no-cache-dir -r requirements.txt

# The appliance only: no torch, no training or export code. Weights are baked in.
COPY app/ app/
COPY predict.sh .
COPY ${BUNDLE}/ bundle/

RUN useradd --create-home --uid 1000 flare \
    && mkdir -p /workspace/inputs /workspace/outputs \
    && cp /opt/flare22/predict.sh /workspace/predict.sh \
    && chown -R 1000:1000 /workspace
USER 1000
WORKDIR /workspace
CMD ["sh", "/workspace/predict.sh"]
