# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
LEGACY_VENV := .venv-legacy
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LEGACY_STAMP := $(LEGACY_VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-main test-legacy bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

# The legacy backend (tflite-runtime 2.14 needs NumPy < 2; wheels stop at CPython 3.11).
$(LEGACY_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LEGACY_VENV)
	$(LEGACY_VENV)/bin/python -m pip install -q --upgrade pip
	$(LEGACY_VENV)/bin/python -m pip install -q -e '.[legacy,modelgen,testtools]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/fleetctl demo

test: test-main test-legacy

# Three workers on CI's two cores (most tests wait on subprocesses and brokers, not the CPU:
# 6 min 15 s against 7 min 38 s with two), whole files per worker (module fixtures stay
# shared). A short basetemp keeps
# the Unix sockets under DATA_DIR within AF_UNIX's 108 bytes.
TEST_WORKERS ?= 3
test-main: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --basetemp=/tmp/edgefleet-pytest-$$(id -u) $(PYTEST_ARGS)

test-legacy:
	@if $(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info < (3, 12) else 1)'; then \
		$(MAKE) $(LEGACY_STAMP) && \
		EDGEFLEET_BACKEND=tflite_runtime $(LEGACY_VENV)/bin/python -m pytest -q -m legacy $(PYTEST_ARGS); \
	else echo "test-legacy: skipped, tflite-runtime has no wheels for this Python"; fi

# The full soak/scale runs (slow-marked tests), then every benchmark into bench/RESULTS.md.
bench: $(STAMP)
	EDGEFLEET_SLOW=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) $(LEGACY_VENV) build *.egg-info .pytest_cache
