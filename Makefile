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

# The main job on built-in data (no downloads). Until `lit-gen quickstart` exists this is the toy 2-D teacher:
# shards -> fit (~3 min on 2 CPU cores) -> 35-NFE samples (PNG density + .npy points).
quickstart: $(STAMP)
	$(BIN)/lit-gen shards builtin:toy2d:gmm8 --out runs/data/toy2d_gmm8
	$(BIN)/lit-gen fit -c recipes/toy2d/teacher.yaml
	$(BIN)/lit-gen sample --ckpt runs/toy2d/teacher/checkpoints/last.ckpt --n 8192 --out runs/toy2d/teacher/samples.png
	$(BIN)/lit-gen sample --ckpt runs/toy2d/teacher/checkpoints/last.ckpt --n 8192 --out runs/toy2d/teacher/samples.npy

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
