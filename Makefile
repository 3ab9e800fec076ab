# streamrec: two commands for a fresh machine (Python 3.11, no Docker):
#   make demo   set up, then run the whole pipeline on the embedded broker
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup system-deps demo test lint typecheck bench clean

setup: $(STAMP)

# Real servers the tests use: Prometheus + promtool (scrape and alert-rule tests) and
# docker-compose v1 (validates docker-compose.yml without a Docker engine). Debian/Ubuntu.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@if ! command -v promtool >/dev/null || ! command -v docker-compose >/dev/null; then \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus docker-compose; \
	fi

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

test: $(STAMP) system-deps
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy learners index monitoring modelstore features logs serving stream bench

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
