# Everything a fresh machine needs (Python 3.10+, make, git): each target builds .venv itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The Triton interpreter (CPU tests, demo) needs PyTorch; 2.13.0 has a CPU build on the workplace disk.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Users run Triton 3.6 on GPU machines and the newest Triton elsewhere: the Triton-facing tests
# run against both.
OLD_TRITON  ?= triton==3.6.0
VENV_OLD    ?= .venv-triton36
STAMP_OLD   := $(VENV_OLD)/.installed
TRITON_TESTS = tests/test_triton_integration.py tests/test_autotune.py tests/test_session.py \
               tests/test_artifacts.py tests/test_real_caches.py tests/test_keys.py

.PHONY: test test-triton-old demo lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[test,triton]"
	touch $(STAMP)

$(STAMP_OLD): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_OLD)
	$(VENV_OLD)/bin/python -m pip install -q --upgrade pip
	$(VENV_OLD)/bin/python -m pip install -q "$(TORCH)" "$(OLD_TRITON)" numpy -e ".[test]"
	touch $(STAMP_OLD)

test: $(STAMP) $(STAMP_OLD)
	$(PY) -m ruff check bundler tests benchmarks examples
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-triton-old

test-triton-old: $(STAMP_OLD)
	$(VENV_OLD)/bin/python -c "import triton; print('Triton-facing tests on Triton', triton.__version__)"
	$(VENV_OLD)/bin/python -m pytest -n 2 $(PYTEST_ARGS) $(TRITON_TESTS)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(PY) -m ruff check bundler tests benchmarks examples
	$(VENV)/bin/lint-imports
	$(PY) -m ruff format --check bundler tests benchmarks examples

# Benchmarks time whole `bundler` commands, so they run from a regular (non-editable) install, as
# users have it: the editable install's import hook alone adds ~9 ms to every process start.
VENV_BENCH  ?= .venv-bench
STAMP_BENCH := $(VENV_BENCH)/.installed

$(STAMP_BENCH): pyproject.toml Makefile $(wildcard bundler/*.py bundler/*/*.py)
	$(PYTHON) -m venv $(VENV_BENCH)
	$(VENV_BENCH)/bin/python -m pip install -q --upgrade pip
	$(VENV_BENCH)/bin/python -m pip install -q --force-reinstall --no-deps .
	$(VENV_BENCH)/bin/python -m pip install -q ".[test]"
	touch $(STAMP_BENCH)

bench: $(STAMP_BENCH)
	$(VENV_BENCH)/bin/python benchmarks/bench_archive.py
	$(VENV_BENCH)/bin/python benchmarks/bench_push.py
	$(VENV_BENCH)/bin/python benchmarks/bench_pull.py
	$(VENV_BENCH)/bin/python benchmarks/bench_fleet.py

clean:
	rm -rf $(VENV) $(VENV_OLD) $(VENV_BENCH) .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
