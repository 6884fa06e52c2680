# Everything a fresh machine needs (Python 3.10+, make, git): each target builds .venv itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The Triton interpreter (CPU tests, demo) needs PyTorch; 2.13.0 has a CPU build on the workplace disk.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[test,triton]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check bundler tests benchmarks examples
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(PY) -m ruff check bundler tests benchmarks examples
	$(PY) -m ruff format --check bundler tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/bench_archive.py
	$(PY) benchmarks/bench_push.py
	$(PY) benchmarks/bench_pull.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
