# streamrec: two commands for a fresh machine (Python 3.11, no Docker):
#   make demo   set up, then run the whole pipeline on the embedded broker
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test lint typecheck bench clean

setup: $(STAMP)

# torch first, pinned: this installs the local CPU build; an open range would pull a
# multi-GB CUDA build. The project's torch>=2.13 range is then already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/streamrec demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy learners index monitoring stream

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
