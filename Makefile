# Two commands for a new user: `make run` (set up + start the appliance) and `make test` (set up + pass the tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-slow lint bench dcmtk clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# DCMTK (storescu, echoscu, storescp, ...) is the real DICOM peer of the tests and the benchmarks.
dcmtk:
	@command -v storescu >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dcmtk >/dev/null; }

run: $(STAMP)
	$(BIN)/appliance serve

test: $(STAMP) dcmtk
	$(BIN)/ruff check appliance tiering bench tests
	$(BIN)/mypy appliance bench
	$(BIN)/lint-imports
	$(BIN)/pytest -q

test-slow: $(STAMP) dcmtk
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check appliance tiering bench tests
	$(BIN)/mypy appliance bench
	$(BIN)/lint-imports

bench: $(STAMP) dcmtk
	$(BIN)/python -m bench.compare

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
