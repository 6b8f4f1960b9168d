# `make quickstart` and `make test` create .venv on first use and install everything from requirements.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-fast lint clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The main job on built-in digits (no downloads): shards -> EDM teacher -> TRACT, consistency and f-distill students
# -> metrics table in runs/quickstart/results.md (13-40 min on 2 idle CPU cores, by core speed; re-running resumes finished stages).
quickstart: $(STAMP)
	$(BIN)/lit-gen quickstart --out runs/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
