# homeport: two commands do all the set-up on a fresh machine.
#   make demo   creates .venv, installs homeport, runs the demo tunnel on loopback
#   make test   creates .venv, installs homeport with its test extras, runs every test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv system-deps demo test test-compiled test-fast lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "homeport needs Python 3.11 or newer"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages some tests drive (listed in scripts/system-packages.txt).
system-deps:
	./scripts/system-deps.sh

demo: venv
	$(BIN)/homeport demo

test: venv system-deps
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-compiled

# The protocol, exit-server and end-to-end tests again, against the compiled
# build (HOMEPORT_COMPILE=1, as the exit node installs homeport): a copy of
# the checkout in build/compiled with the compiled modules beside their sources.
test-compiled: venv system-deps
	$(BIN)/python scripts/compiled_tree.py build/compiled
	cd build/compiled && $(CURDIR)/$(BIN)/python -m pytest -p no:cacheprovider \
	  -m 'not topology' tests/tunnel tests/server tests/e2e tests/bench

test-fast: venv
	$(BIN)/python -m pytest -m 'not e2e'

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: venv
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
