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

# The status page's browser test needs Debian's chromium: installed here when missing (CI runs as root).
test: $(STAMP)
	@command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; } \
	  || echo "make: could not install chromium; the status page's browser test needs it (it fails in CI)"
	$(PY) -m pytest $(ARGS)

# Structure-aware fuzzing of the decoders (tests/test_fuzz.py): FUZZ_EXAMPLES cases for each of its three
# structure-aware properties (frames, chunk streams, secure-aggregation payloads), counts printed per property.
FUZZ_EXAMPLES ?= 34000
fuzz: $(STAMP)
	TIERFL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py \
	  -k structure_aware --hypothesis-show-statistics $(ARGS)

clean:
	rm -rf $(VENV) .venv-edge runs build *.egg-info .pytest_cache
