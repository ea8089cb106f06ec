# unclip: `make demo` and `make test` work on a fresh machine (they create .venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
PROMPT ?= a red apple, noto style

.PHONY: demo test test-fast lint format clean help train-default train-clip-vit

help:
	@echo "make demo       create .venv, install, generate an image with the default model"
	@echo "make test       create .venv, install with test extras, run the whole suite"
	@echo "make test-fast  the suite without the slow training checks"
	@echo "make lint       ruff check + format check"
	@echo "make train-default  rebuild the emoji data and train every stage of emoji-small"
	@echo "make train-clip-vit  train and evaluate the ViT CLIP of the README's CLIP table (~90 min)"

# torch is installed first and pinned, so that the package's range (torch>=2.4)
# is already satisfied and pip never pulls a CUDA build.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	@touch $@

$(VENV)/.core: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e .
	@touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e ".[test,dev]"
	@touch $@ $(VENV)/.core

demo: $(VENV)/.core
	@$(PY) -m unclip.demo "$(PROMPT)"

test: $(VENV)/.test
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected; a suite must exist" >&2; exit 1; fi; \
	exit $$rc

test-fast: $(VENV)/.test
	$(PY) -m pytest -m "not slow"

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: $(VENV)/.test
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

# --- the default model: data, tokenizer, CLIP, embeddings, prior, decoder, upsampler --------
# Every step resumes: run it again after an interruption and it goes on where it stopped.
RUN    ?= runs/emoji-small
CONFIGS = configs/emoji-small
UNCLIP := $(VENV)/bin/unclip
SHIP   ?= src/unclip/weights/emoji-small

$(VENV)/.data: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e ".[data]"
	@touch $@ $(VENV)/.core

data/emoji/manifest.jsonl: | $(VENV)/.data
	$(UNCLIP) data emoji --out data/emoji --sheet docs/emoji-contact-sheet.png

$(RUN)/tokenizer/tokenizer.json: data/emoji/manifest.jsonl
	$(UNCLIP) train tokenizer data/emoji --split train --out $(RUN)/tokenizer \
		--vocab-size 4096 --context-length 32

train-default: $(RUN)/tokenizer/tokenizer.json
	$(UNCLIP) train clip --config $(CONFIGS)/clip.json --run-dir $(RUN)/clip --resume
	for split in train val test; do \
		$(UNCLIP) embed data/emoji --split $$split --clip $(RUN)/clip/final \
			--out $(RUN)/embeddings/$$split || exit 1; \
	done
	$(UNCLIP) train prior --config $(CONFIGS)/prior.json --run-dir $(RUN)/prior --resume
	$(UNCLIP) train decoder --config $(CONFIGS)/decoder.json --run-dir $(RUN)/decoder --resume
	$(UNCLIP) train upsampler --config $(CONFIGS)/upsampler.json --run-dir $(RUN)/upsampler --resume
	$(UNCLIP) train pipeline --clip $(RUN)/clip/final --prior $(RUN)/prior/final \
		--decoder $(RUN)/decoder/final --upsampler $(RUN)/upsampler/final \
		--sampling $(CONFIGS)/sampling.json --out $(SHIP) --overwrite

# The ViT CLIP of the README's CLIP table (the first pipeline's; not in the shipped one): ~90 min.
train-clip-vit: $(RUN)/tokenizer/tokenizer.json
	$(UNCLIP) train clip --config $(CONFIGS)/clip-vit.json --run-dir $(RUN)/clip-vit --resume
	$(UNCLIP) eval clip --clip $(RUN)/clip-vit/final --data data/emoji --split val --split test
