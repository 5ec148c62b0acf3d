# Every target bootstraps .venv on its own: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgefleet-installed
# Installed first so that the project's torch range is already met by the local CPU build.
TORCH  ?= torch==2.13.0
EXTRAS ?= agent,control-plane,trainer,otel,dev
TFLITE ?= 'litert-torch>=0.10,<0.11' 'ai-edge-litert>=2.3,<2.4'

.PHONY: setup test test-fast fuzz lint protos check-protos demo demo-regression bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	# A second step: pip cannot resolve litert-torch together with model-signing (pyproject.toml).
	$(PY) -m pip install -q --disable-pip-version-check $(TFLITE)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The parsers of untrusted bytes, with many more Hypothesis examples than `make test` runs.
fuzz: setup
	EDGEFLEET_FUZZ=long $(PY) -m pytest -q tests/test_fuzz.py -o timeout=1800

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

protos: setup
	$(PY) -m scripts.gen_protos

demo: setup
	$(PY) -m scripts.demo

# A regression model (diabetes): rollout, then an experiment decided on absolute errors.
demo-regression: setup
	$(PY) -m scripts.demo_regression

bench: setup
	$(PY) -m scripts.bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info .bench demo-run
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
