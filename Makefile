PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-dates lint unit soak browser demo bench clean

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

# Debian's chromium for the report's browser test; installed when missing and we may (root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "note: chromium is missing and cannot be installed here (needs root or sudo and apt-get):" \
	         "the report's browser test will be skipped"; \
	  fi; }

unit: install browser
	$(BIN)/pytest -q

test: lint unit

# The suite on three more frozen dates (a month end, a Friday before a holiday, a Monday); `make test`
# freezes 2025-12-19 and keeps one test on the real clock. No expected count may depend on the day.
test-dates: install browser
	for day in 2025-10-31 2026-01-16 2025-12-15; do KAPMAN_TEST_TODAY=$$day $(BIN)/pytest -q || exit 1; done

# The slow tests `make test` leaves out (pyproject: -m 'not slow'): the 20-day soak under random faults.
soak: install
	$(BIN)/pytest -q -m slow

demo: install
	$(BIN)/kapman demo

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf .kapman report
