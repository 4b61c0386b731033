# Every target sets itself up on a fresh machine: a venv with the CPU build of torch 2.13.0 and clipforge.
PY ?= python3
TORCH := torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
# A second venv with every other dependency at the floor pyproject.toml declares: the floors are tested.
FLOORS := .venv-floors
# A side venv with open_clip for the OpenCLIP parity tests (open_clip needs torchvision, which does not
# install beside the CPU build of torch 2.13); tests/test_convert_openclip.py runs it by subprocess.
REF := .venv-ref
export CLIPFORGE_REF_PYTHON ?= $(abspath $(REF)/bin/python)

# OpenAI's BPE merges are never committed; use the shared copy when it is there (see docs/tokenizer.md).
SHARED_BPE := $(abspath ../shared/assets/bpe_simple_vocab_16e6.txt.gz)
ifneq ($(wildcard $(SHARED_BPE)),)
export CLIPFORGE_BPE_PATH ?= $(SHARED_BPE)
endif

.PHONY: setup setup-floors setup-ref test lint demo pictext pictext-recipe finetune-pictext browser

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,apps,interop]'
	touch $@

# Built afresh whenever the floors change, so nothing newer lingers from an earlier install. torch comes
# from the same constraints, so pip refuses it unless pyproject.toml's torch floor is $(TORCH).
$(FLOORS)/.installed: pyproject.toml .ci/floors.py
	rm -rf $(FLOORS)
	$(PY) -m venv $(FLOORS)
	$(FLOORS)/bin/pip install -q --upgrade pip
	$(FLOORS)/bin/python .ci/floors.py pyproject.toml > $(FLOORS)/constraints.txt
	$(FLOORS)/bin/pip install -q -c $(FLOORS)/constraints.txt $(TORCH)
	$(FLOORS)/bin/pip install -q -c $(FLOORS)/constraints.txt --build-constraint $(FLOORS)/constraints.txt -e '.[dev,apps,interop]'
	touch $@

setup: $(VENV)/.installed

setup-floors: $(FLOORS)/.installed

$(REF)/.installed:
	rm -rf $(REF)
	$(PY) -m venv $(REF)
	$(REF)/bin/pip install -q torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 'setuptools<80'
	touch $@

setup-ref: $(REF)/.installed

# Debian's chromium for the serve page's browser test (Playwright drives it; no browser download). CI runs as root.
browser:
	command -v chromium || (apt-get update && apt-get install -y chromium)

# The suite with the current releases, then again at the floors; either failing fails the target.
test: setup setup-floors browser setup-ref
	@$(BIN)/python -m pytest; current=$$?; \
	echo "--- the same suite at the dependency floors ($(FLOORS): $(TORCH) + $(FLOORS)/constraints.txt)"; \
	$(FLOORS)/bin/python -m pytest; floors=$$?; \
	test $$current -eq 0 -a $$floors -eq 0

# With the ruff the main venv resolved and with the floor's, which must agree (the `ruff>=` in pyproject.toml).
lint: setup setup-floors
	for r in $(BIN)/ruff $(FLOORS)/bin/ruff; do \
		$$r --version && $$r check src tests bench scripts && $$r format --check src tests bench scripts || exit 1; \
	done

demo: setup
	$(BIN)/clipforge train configs/quickstart.toml

# The real-data recipe (docs/learning.md): ViT-Mini on ../shared/data/pictext, then the emoji evaluation.
pictext: setup
	$(BIN)/clipforge train configs/pictext-tiny.toml
	$(BIN)/clipforge eval suite configs/eval-pictext.toml --model runs/pictext-tiny/step-00000600

# The recipe at OpenCLIP's reference wall-clock (docs/learning.md): bf16, batch 256, on a CPU with native bf16.
pictext-recipe: setup
	$(BIN)/clipforge train configs/pictext-recipe.toml
	$(BIN)/clipforge eval suite configs/eval-pictext.toml --model runs/pictext-recipe/step-00001000 \
		--out runs/pictext-recipe/eval

# The fine-tuning recipe (docs/fine-tuning.md): the pictext model (trained first when missing), fine-tuned
# on the Google emoji style three ways, each merged back at several WiSE-FT weights and evaluated.
finetune-pictext: setup
	test -f runs/pictext-tiny/step-00000600/config.json || $(BIN)/clipforge train configs/pictext-tiny.toml
	$(BIN)/python -m bench.finetune --base runs/pictext-tiny/step-00000600 --out runs/finetune-pictext
