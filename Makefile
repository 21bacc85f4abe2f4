# `make demo` and `make test` each set up a fresh machine: they create the
# virtualenv and install the package before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-fast demo bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The whole suite: unit tests and the (few, tight) multi-process cluster
# tests. pytest exits 5 when it collects no test, which fails `make`.
test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider --timeout=600

# Unit tests only (no multi-process clusters).
test-fast: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider -m "not cluster" --timeout=300

# The main job: the quick benchmark (sync vs async vs GBA, healthy and with
# worker 1 at 1/4 speed, 4 workers + 2 PS on localhost), ~3 minutes.
demo: $(STAMP)
	$(PY) scripts/benchmark.py --quick

# The full benchmark (every mode, 3 conditions, 3 repeats), <= 20 minutes.
bench: $(STAMP)
	$(PY) scripts/benchmark.py

clean:
	rm -rf $(VENV) results build *.egg-info
