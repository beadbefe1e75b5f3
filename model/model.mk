# llmos-tiny, the default model, built by the project itself (included by the top-level Makefile).
#   make model        retrain it and rewrite model/llmos-tiny-{q8_0,q4_k_m}.gguf, SHA256SUMS, heldout.jsonl
#   make speed-model  a random-weight ~50M-parameter Q4_K_M model for speed benchmarks, in $(CACHE)/models
#   make arch-models  16 tiny random-weight models of 15 llama.cpp architectures, real tokenizers, in $(ARCH_MODELS)
# The training environment lives in $(CACHE), outside the clone: torch is build-time only and never ships.

MODEL_VENV := $(CACHE)/model-venv
# The speed model needs no torch: a small venv of its own keeps it quick to set up.
GGUF_VENV := $(CACHE)/gguf-venv
SPEED_MODEL := $(CACHE)/models/speed-50m-q4_k_m.gguf
TORCH_VERSION := 2.13.0
GGUF_VERSION := 0.19.0
MODEL_THREADS ?= 2
# --only-binary: never fall back to the 15-minute sdist compile; the wheel comes from $(WHEELS).
LLAMA_PIP_ARGS := --find-links $(WHEELS) --only-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_VERSION)

.PHONY: model speed-model arch-models

$(MODEL_VENV)/.ok: $(LLAMA_WHEEL_STAMP)
	@test -x $(MODEL_VENV)/bin/pip || $(PYTHON) -m venv $(MODEL_VENV)
	@echo "== model venv: torch==$(TORCH_VERSION) (CPU build), gguf==$(GGUF_VERSION), numpy, llama-cpp-python"
	# torch==2.13.0 exactly: that CPU build is on this machine's disk; any other version downloads gigabytes.
	$(MODEL_VENV)/bin/pip install -q torch==$(TORCH_VERSION) gguf==$(GGUF_VERSION) numpy $(LLAMA_PIP_ARGS)
	touch $@

$(GGUF_VENV)/.ok: $(LLAMA_WHEEL_STAMP)
	@test -x $(GGUF_VENV)/bin/pip || $(PYTHON) -m venv $(GGUF_VENV)
	$(GGUF_VENV)/bin/pip install -q gguf==$(GGUF_VERSION) numpy $(LLAMA_PIP_ARGS)
	touch $@

# Training prints its progress (loss, ETA, held-out accuracy). Its defaults (2 processes x 1 thread, seed, steps)
# are the recipe of the committed files: the same settings rebuild them byte for byte.
model: $(MODEL_VENV)/.ok
	@echo "== training llmos-tiny (2 processes x 1 thread; see model/README.md for the time it takes)"
	$(MODEL_VENV)/bin/python model/train.py --out-dir model --work-dir $(CACHE)/model-build --eval-every 150

speed-model: $(SPEED_MODEL)

$(SPEED_MODEL): model/speed.py model/gguf_llama.py model/data.py | $(GGUF_VENV)/.ok
	$(GGUF_VENV)/bin/python model/speed.py $@ --params 50M --threads $(MODEL_THREADS)

# The architecture matrix (issue 11): each model borrows the tokenizer and chat template of one of llama.cpp's vocab
# files, so it needs the vocab stamp; about a minute on 2 cores.
ARCH_MODELS := $(CACHE)/models/archs
ARCH_MODELS_STAMP := $(ARCH_MODELS)/.ok

arch-models: $(ARCH_MODELS_STAMP)

$(ARCH_MODELS_STAMP): model/arch_matrix.py model/gguf_llama.py $(VOCAB_STAMP) | $(GGUF_VENV)/.ok
	$(GGUF_VENV)/bin/python model/arch_matrix.py $(ARCH_MODELS) --vocab-dir $(VOCAB_DIR) --threads $(MODEL_THREADS)
	touch $@
