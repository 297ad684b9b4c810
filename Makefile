# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo image lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[cpu,train,test]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/python -m training.demo --out demo

BUNDLE ?= demo/bundle
image:
	docker build --build-arg BUNDLE=$(BUNDLE) -t flare22:latest .

lint: setup
	$(BIN)/hadolint Dockerfile
	sh -n predict.sh

clean:
	rm -rf $(VENV) demo .pytest_cache
