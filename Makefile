# ssr-cli developer commands. Every target creates .venv and installs on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ssr-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install test lint format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check ssr_cli tests benchmarks examples scripts
	$(BIN)/ruff format --check ssr_cli tests benchmarks examples scripts
	$(BIN)/mypy ssr_cli

format: install
	$(BIN)/ruff format ssr_cli tests benchmarks examples scripts
	$(BIN)/ruff check --fix ssr_cli tests benchmarks examples scripts

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

bench: install
	$(BIN)/python benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
