# The team's vocabulary: make demo | test | lint | lock | clean
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RLHF := $(BIN)/rlhf
DEMO_DIR ?= .demo

# Everything built once per machine (bundled data, tiny models, tokenised data, DeepSpeed's compiled
# ops) lives in one cache inside the checkout.
export RLHF_CACHE_DIR ?= $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR ?= $(RLHF_CACHE_DIR)/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

# No GPU here → DeepSpeed's CPU accelerator and the CPU build of torch (installed before the rest, so
# nothing pulls a multi-GB CUDA build).
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),)
export DS_ACCELERATOR ?= cpu
TORCH_FIRST := torch==2.13.0
endif

.PHONY: help install demo test lint lock clean

help:
	@echo "make demo   - create .venv, then run the main job end to end on the bundled tiny models and data"
	@echo "make test   - create .venv, then run the whole test suite"
	@echo "make lint   - ruff and mypy"
	@echo "make lock   - re-pin constraints.txt from the current .venv"
	@echo "make clean  - remove .venv, .cache and $(DEMO_DIR)"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(if $(TORCH_FIRST),$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_FIRST))
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[all,dev]'
	$(BIN)/python -m rlhf_engine.engine.ops
	touch $@

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(RLHF) data list
	HF_HUB_OFFLINE=1 $(RLHF) models tiny --arch opt --size s --pretrain-steps 300 --out $(DEMO_DIR)/models/actor --overwrite
	HF_HUB_OFFLINE=1 $(RLHF) models tiny --arch opt --size xs --pretrain-steps 200 --out $(DEMO_DIR)/models/reward --overwrite
	HF_HUB_OFFLINE=1 $(RLHF) data preview --tokenizer $(DEMO_DIR)/models/actor
	HF_HUB_OFFLINE=1 $(RLHF) sft --model $(DEMO_DIR)/models/actor --output-dir $(DEMO_DIR)/run \
	  --per-device-train-batch-size 16 --gradient-accumulation-steps 1 --learning-rate 5e-4 --max-seq-len 128
	HF_HUB_OFFLINE=1 $(RLHF) reward --model $(DEMO_DIR)/models/reward --output-dir $(DEMO_DIR)/run \
	  --per-device-train-batch-size 8 --gradient-accumulation-steps 1 --learning-rate 1e-3 --weight-decay 0 \
	  --num-train-epochs 3 --max-seq-len 128

lint: $(STAMP)
	$(BIN)/ruff check rlhf_engine service workers tests
	$(BIN)/mypy rlhf_engine service workers

lock: $(STAMP)
	{ echo "# Exact versions of every dependency (pip install -c constraints.txt). Regenerate with 'make lock'."; \
	  echo "# torch==2.13.0 is the CPU build on machines without CUDA (the Makefile installs it first)."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^-e' | sed 's/+cpu$$//' | sort -f; } > constraints.txt

clean:
	rm -rf $(VENV) .cache $(DEMO_DIR)
