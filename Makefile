# The two commands: `make demo` and `make test`. Both bootstrap .venv from nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test fuzz venv clean

venv: $(STAMP)

# Re-install only when the dependency list changes; the package itself is editable.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tierfl demo $(ARGS)

# Two pytest-xdist workers: much of the suite waits on brokers and device processes, so a second worker uses the
# idle core. Every test owns its fleet name, state folder and ports, so tests may run side by side.
TEST_WORKERS ?= 2

# Debian packages the tests need, installed here when missing (CI runs as root): chromium for the status
# page's browser test, dataset-fashion-mnist for the Fashion-MNIST loader's tests.
TEST_DEBS := chromium:chromium dataset-fashion-mnist:/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
test: $(STAMP)
	@missing=""; for dep in $(TEST_DEBS); do pkg=$${dep%%:*}; probe=$${dep#*:}; \
	  { command -v "$$probe" >/dev/null || [ -e "$$probe" ]; } || missing="$$missing $$pkg"; done; \
	  [ -z "$$missing" ] || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; } \
	  || echo "make: could not install$$missing; the tests that need them fail (in CI too)"
	$(VENV)/bin/lint-imports --no-cache  # the import contracts of pyproject.toml: which package may import which
	$(VENV)/bin/isort --check-only --quiet aggregator edge_client models protocol tierfl tests scripts  # sorted imports
	$(PY) -m pytest -n $(TEST_WORKERS) --durations=15 $(ARGS)

# Structure-aware fuzzing (tests/test_fuzz.py, tests/test_fuzz_device.py): FUZZ_EXAMPLES cases for each of the five
# structure-aware properties (frames, chunk streams, secure-aggregation payloads, the aggregator's message handler,
# the device's downlink handler), counts printed per property; `make test` runs a few hundred of each. A property
# runs 3 to 10 minutes here, past the suite's 300 s per test: the timeout is an hour.
FUZZ_EXAMPLES ?= 34000
fuzz: $(STAMP)
	TIERFL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider --timeout 3600 tests/test_fuzz.py \
	  tests/test_fuzz_device.py -k structure_aware --hypothesis-show-statistics $(ARGS)

clean:
	rm -rf $(VENV) .venv-edge runs build *.egg-info .pytest_cache
