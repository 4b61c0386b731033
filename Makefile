# Every target sets itself up on a fresh machine: a venv with the CPU build of torch 2.13.0 and clipforge.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

# OpenAI's BPE merges are never committed; use the shared copy when it is there (see docs/tokenizer.md).
SHARED_BPE := $(abspath ../shared/assets/bpe_simple_vocab_16e6.txt.gz)
ifneq ($(wildcard $(SHARED_BPE)),)
export CLIPFORGE_BPE_PATH ?= $(SHARED_BPE)
endif

.PHONY: setup test lint demo pictext

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests bench scripts && $(BIN)/ruff format --check src tests bench scripts

demo: setup
	$(BIN)/clipforge train configs/quickstart.toml

# The real-data recipe (docs/learning.md): ViT-Mini on ../shared/data/pictext, then the emoji evaluation.
pictext: setup
	$(BIN)/clipforge train configs/pictext-tiny.toml
	$(BIN)/clipforge eval suite configs/eval-pictext.toml --model runs/pictext-tiny/step-00000600
