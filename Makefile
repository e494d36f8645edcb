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

# The main job on its built-in default: tiny model, synthetic video prompt, $(NPROC) CPU ranks.
demo: $(VENV)/.installed
	$(BIN)/torchrun --nproc_per_node $(NPROC) --master_port 29517 -m megatron_apbv run configs/tiny_cpu.yaml --compare dense

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests
