# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo demo-quick image image-test lint clean peers-setup

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[cpu,train,test,openvino]"
	touch $(STAMP)

# The whole suite, then the image built and run as the organisers run it (skips with one
# printed reason where no container engine can run: not root, no apt-get).
test: setup
	$(BIN)/python -m pytest -q
	@$(MAKE) --no-print-directory image-test

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Budgets are iterations (same models on any machine); the expected time is printed first.
demo: setup
	$(BIN)/python -m training.demo --out demo

# Small budgets (4 labelled phantoms, 120 + 120 iterations) into demo/quick: for CI.
demo-quick: setup
	$(BIN)/python -m training.demo --quick

# The image: docker where a daemon answers, else podman (docs/efficiency.md). BASE= picks the base.
BUNDLE ?= demo/bundle
image:
	BUNDLE=$(BUNDLE) sh docker/image.sh

# Build and run the image as the organisers do, on this kind of machine (installs podman,
# runc and debootstrap with apt when missing). Exit 77 from the script: cannot run here
# (one printed reason). A hard limit of 45 minutes: it never hangs CI.
image-test: setup
	@PY=$(abspath $(BIN))/python timeout --kill-after=900 2700 bash docker/image-test.sh; rc=$$?; \
	  [ $$rc -eq 0 ] || [ $$rc -eq 77 ] || { echo "image-test failed (exit $$rc)"; exit 1; }

# The peer of bench/peers.py (issue 18): nnU-Net v2 in its own environment, so that neither
# .venv nor the appliance ever holds it. torch first, pinned to the build the project uses,
# so that nnunetv2 cannot pull another one (checked at the end). Not the `train` extra: its
# timm==1.0.31 conflicts with dynamic-network-architectures 0.4.4 (timm<1.0.23); our side of
# the benchmark runs in .venv.
PEERS_VENV := .venv-peers
peers-setup: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PEERS_VENV)/bin/python -m pip install -q -e ".[cpu,peers,test]"
	$(PEERS_VENV)/bin/python -c "import torch, nnunetv2; v = torch.__version__; assert v.split('+')[0] == '2.14.1', v; print('peers: torch', v)"
	touch $@

lint: setup
	$(BIN)/hadolint Dockerfile
	sh -n predict.sh

clean:
	rm -rf $(VENV) $(PEERS_VENV) demo .pytest_cache
