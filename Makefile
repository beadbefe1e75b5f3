# llmos-edge: everything a developer or CI needs, from a fresh Debian machine.
#   make run    build what is missing and start llmos-edge
#   make test   lint, unit, host integration and image tests
# Expensive outputs (the llama-cpp-python wheel, mkosi's caches, speed models) live in $(CACHE), outside the clone,
# so a second run is fast.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llmos-edge
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

LLAMA_CPP_VERSION := 0.3.36
WHEELS := $(CACHE)/wheels
# Every CPU variant plus runtime dispatch: one wheel runs on x86-64 without AVX2 and at full speed on AVX-512.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON
LLAMA_WHEEL_STAMP := $(WHEELS)/.llama-cpp-python-$(LLAMA_CPP_VERSION).ok

HOST_PACKAGES := python3-venv python3-dev build-essential cmake libgomp1 git espeak-ng alsa-utils sox
# For tests only: the status page's browser test (tests/integration/test_status_page.py) drives Debian's chromium.
HOST_PACKAGES += chromium chromium-driver

.PHONY: help deps host-deps wheel vocab venv lint typecheck unit integration test test-voice run-host docs clean

help:
	@echo "make run     install and build what is missing, then boot the image in QEMU, console on this terminal"
	@echo "             (stdin not a terminal: its lines are typed at the prompt one by one, then the VM powers off)"
	@echo "make run-host  the supervisor on this machine, console on this terminal"
	@echo "make test    everything: lint, types, unit, host integration, image tests"
	@echo "make image   the flashable disk image; make flash DEVICE=/dev/sdX writes it"
	@echo "make deps    host packages, the llama-cpp-python wheel (cached in $(CACHE)), the venv"
	@echo "make model   retrain the default model from model/ (PyTorch; took 40 min on 2 busy cores)"
	@echo "make bench   benchmarks; results go to BENCHMARKS.md"

deps: host-deps venv vocab

host-deps:
	@missing=$$(dpkg-query -W -f='$${db:Status-Abbrev} $${Package}\n' $(HOST_PACKAGES) 2>/dev/null \
	  | awk '$$1 != "ii" {print $$2}'; for p in $(HOST_PACKAGES); do dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done); \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$${missing// /}" ]; then \
	  echo "== installing host packages: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

wheel: $(LLAMA_WHEEL_STAMP)

# About 10 minutes on 2 cores, once; the wheel is then reused from $(CACHE) by every clone.
$(LLAMA_WHEEL_STAMP):
	@mkdir -p $(WHEELS) $(CACHE)/sdist
	@test -x $(CACHE)/build-venv/bin/pip || $(PYTHON) -m venv $(CACHE)/build-venv
	$(CACHE)/build-venv/bin/pip download -q --no-deps --no-binary :all: \
	  llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(CACHE)/sdist
	@echo "== building llama-cpp-python $(LLAMA_CPP_VERSION) with all CPU variants (about 10 min on 2 cores)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(CACHE)/build-venv/bin/pip wheel --no-deps -w $(WHEELS) \
	  $(CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
	touch $@

# Real converters' GGUF headers (llama.cpp's vocab-only files: real tokenizers and chat templates, no weights) and
# llama.cpp's chat templates, from the sdist the wheel is built from: test inputs nobody here made.
VOCAB_DIR := $(CACHE)/vocab
VOCAB_STAMP := $(VOCAB_DIR)/.ok
export LLMOS_VOCAB_DIR := $(VOCAB_DIR)

vocab: $(VOCAB_STAMP)

$(VOCAB_STAMP): $(LLAMA_WHEEL_STAMP)
	@mkdir -p $(VOCAB_DIR)
	tar -xzf $(CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(VOCAB_DIR) --strip-components=4 \
	  --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*.gguf' '*/vendor/llama.cpp/models/templates/*.jinja'
	@echo "== vocab: $$(ls $(VOCAB_DIR)/*.gguf | wc -l) vocab-only GGUFs in $(VOCAB_DIR)"
	touch $@

venv: $(VENV)/.ok

$(VENV)/.ok: pyproject.toml $(LLAMA_WHEEL_STAMP)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --find-links $(WHEELS) -e '.[dev]'
	touch $@

# model.mk: make model, speed-model, arch-models; image.mk: image, run, flash, image-test (sets IMAGE_TEST); bench.mk: bench
-include model/model.mk
-include image/image.mk
-include bench/bench.mk

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

unit: venv vocab
	$(VENV)/bin/pytest -q tests/unit

# The speed model (random weights, seconds to make) gives the exact-resume test a long generation.
# The architecture matrix's models (model/arch_matrix.py) are loaded by test_architectures.py.
integration: venv vocab speed-model arch-models
	LLMOS_SPEED_MODEL=$(SPEED_MODEL) LLMOS_ARCH_MODELS=$(ARCH_MODELS) \
	  $(VENV)/bin/pytest -q --durations=8 tests/integration

# Spoken-command recognition rates per voice alone (issue 16; `make test` runs them with the other integration tests)
test-voice: venv
	$(VENV)/bin/pytest -q -s tests/integration/test_voice.py -k test_commands_are_recognised

# Host checks first (seconds to a couple of minutes), then the image tests (image.mk) that boot QEMU.
test: deps lint typecheck unit integration $(IMAGE_TEST)

# The supervisor on this machine, its console on this terminal (no image needed).
run-host: venv
	@mkdir -p out
	$(VENV)/bin/llmos run --config examples/dev.yaml --console stdio


clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache

# docs/configuration.md's config reference is generated from the schema (a unit test fails when they differ).
docs: venv
	$(PY) -c 'import re, pathlib; from llmos_edge.config import reference; p = pathlib.Path("docs/configuration.md"); \
	  s = p.read_text(); \
	  p.write_text(re.sub(r"(<!-- config-reference:[^\n]*-->\n).*?(<!-- /config-reference -->)", \
	    lambda m: m.group(1) + reference() + m.group(2), s, flags=re.S))'
