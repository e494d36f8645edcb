# Set-up is part of every target: the first call makes .venv and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2

.PHONY: demo test

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch (lies on local disk on our machines); GPU images bring their own torch.
	$(BIN)/pip install -q torch==2.13.0
	# setuptools boxes a warning about editable installs (a folder named like the package could shadow
	# it: kernels/ is installed as megatron_apbv.kernels on purpose); only that warning is silenced.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e ".[test]"
	touch $@

# The main job on its built-in default: tiny model, synthetic video prompt, 2 CPU ranks through the
# DeepSpeed launcher (launch/README.md has torchrun and SLURM too); then the project's trained needle
# model answers one held-out video question with APB-V across the ranks, next to dense's answer and the truth.
demo: $(VENV)/.installed
	NPROC=2 MASTER_PORT=29517 bash launch/deepspeed_cpu.sh configs/tiny_cpu.yaml --compare dense
	NPROC=2 MASTER_PORT=29518 APBV_COMMAND=eval bash launch/deepspeed_cpu.sh configs/needle_demo.yaml --demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests
