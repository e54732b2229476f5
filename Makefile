# Two commands for a new user: `make run` (set up + start the appliance) and `make test` (set up + pass the tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-slow fuzz lint bench dcmtk peers clean install uninstall

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The real DICOM peers of the tests and the benchmarks: DCMTK (storescu, findscu, movescu, getscu, storescp, ...) and
# Orthanc (queried, pulled from and moved to through its REST API); Prometheus and promtool (the tests scrape a real
# appliance and evaluate every dashboard and alert expression); systemd-analyze (the units are verified and scored).
# Debian packages; installed only when missing. --no-install-recommends: Prometheus recommends a node exporter
# and a web UI bundle the tests do not use.
peers:
	@{ command -v storescu >/dev/null 2>&1 && command -v Orthanc >/dev/null 2>&1 && \
	   command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 && \
	   command -v systemd-analyze >/dev/null 2>&1; } || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dcmtk orthanc >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    prometheus systemd >/dev/null; }
dcmtk: peers

run: $(STAMP)
	$(BIN)/appliance serve

test: $(STAMP) peers
	$(BIN)/ruff check appliance tiering bench tests
	$(BIN)/mypy appliance bench tiering
	$(BIN)/lint-imports
	$(BIN)/pytest -q

test-slow: $(STAMP) peers
	$(BIN)/pytest -q -m slow

# The network fuzzer (tests/fuzz/fuzzer.py, docs/testing.md) against a fresh server, bounded in time and cases.
# FUZZ_SEED= (default: from the clock, printed), FUZZ_ARGS="--keep-going --workers 2 ...". Failing cases go to
# var/fuzz/; replay one with `.venv/bin/python -m tests.fuzz.fuzzer --replay var/fuzz/fuzz-SEED-N.json`.
FUZZ_SECONDS ?= 180
FUZZ_CASES   ?= 100000
fuzz: $(STAMP) dcmtk
	$(BIN)/python -m tests.fuzz.fuzzer --seconds $(FUZZ_SECONDS) --cases $(FUZZ_CASES) \
	  $(if $(FUZZ_SEED),--seed $(FUZZ_SEED)) $(FUZZ_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check appliance tiering bench tests
	$(BIN)/mypy appliance bench tiering
	$(BIN)/lint-imports

# docs/conformance.md: the conformance statement of the built-in defaults (tests/unit/test_conformance_statement.py).
.PHONY: conformance
conformance: $(STAMP)
	$(BIN)/python -m appliance.conformance > docs/conformance.md

bench: $(STAMP) dcmtk
	$(BIN)/python -m bench.compare

# On a server, as root (docs/operations.md "Install on a server"): the program in its own venv under PREFIX (no
# dev tools), the units, the sysusers.d/tmpfiles.d snippets, /etc/appliance/appliance.toml (only if absent) with
# the data under /var/lib/appliance. DESTDIR=/some/root stages the same tree without touching the system.
# `make uninstall` keeps /etc/appliance and /var/lib/appliance. Logic in scripts/install.sh. WITH_BENCH=1: the
# benchmark harness too (`.[bench]`, for a hardware vendor); FORCE=1: reinstall although appliance.service runs.
DESTDIR     ?=
PREFIX      ?= /opt/appliance
UNITDIR     ?= /etc/systemd/system
SYSUSERSDIR ?= /etc/sysusers.d
TMPFILESDIR ?= /etc/tmpfiles.d
WITH_BENCH  ?=
FORCE       ?=
INSTALL_ENV  = DESTDIR='$(DESTDIR)' PREFIX='$(PREFIX)' UNITDIR='$(UNITDIR)' SYSUSERSDIR='$(SYSUSERSDIR)' \
               TMPFILESDIR='$(TMPFILESDIR)' PYTHON='$(PYTHON)' PIP_ARGS='$(PIP_ARGS)' WITH_BENCH='$(WITH_BENCH)' \
               FORCE='$(FORCE)'
install:
	$(INSTALL_ENV) sh scripts/install.sh install
uninstall:
	$(INSTALL_ENV) sh scripts/install.sh uninstall

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
