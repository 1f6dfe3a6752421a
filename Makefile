# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# the demo's FLARE server ports, FL and admin (default 8102,8103): `make demo DEMO_PORTS=9102,9103`
DEMO_PORTS ?=

.PHONY: install demo test test-fast lint clean

$(STAMP): setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 (CPU) lies on this machine's disk; a looser pin pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,notebook]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/consortium demo --out $(DEMO_DIR) --force $(if $(DEMO_PORTS),--ports $(DEMO_PORTS))  # a repeated demo replaces the last demo run

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
