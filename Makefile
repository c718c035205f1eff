PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint unit demo bench clean

# Idempotent and fast when pyproject.toml has not changed since the last install.
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check loaders tests bench
	$(BIN)/sqlfluff lint dbt_project macros
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/ci.yml

unit: install
	$(BIN)/pytest -q

test: lint unit

demo: install
	$(BIN)/kapman demo

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf .kapman report
