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
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# The main job on its built-in default: tiny model, synthetic video prompt, 2 CPU ranks
# through the DeepSpeed launcher (launch/README.md has torchrun and SLURM too).
demo: $(VENV)/.installed
	NPROC=2 bash launch/deepspeed_cpu.sh configs/tiny_cpu.yaml --compare dense

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests
