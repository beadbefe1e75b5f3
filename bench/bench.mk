# Benchmarks: each writes its own section of BENCHMARKS.md (command, machine, date, commit, load average, figures)
# and prints `met` or `MISSED` for each of its targets, exiting 1 when it missed one. `make bench` (and
# `make bench-thermal`) goes on after a miss, so every figure is measured, and fails at the end.
ifneq ($(filter bench,$(MAKECMDGOALS)),)
MAKEFLAGS += --keep-going
endif

.PHONY: bench bench-decode

bench: bench-decode

bench-decode: venv speed-model
	$(PY) bench/decode.py --model $(SPEED_MODEL) --threads 2

.PHONY: bench-scheduling
bench: bench-scheduling

bench-scheduling: venv speed-model
	$(PY) bench/scheduling.py --model $(SPEED_MODEL)

# Governor (issue 4): the thermal a/b/c comparison with its plot, and the memory estimate against measured RSS.
.PHONY: bench-thermal bench-thermal-boards bench-memory bench-plotting
bench: bench-thermal bench-memory

SPEED_MODEL_25M := $(CACHE)/models/speed-25m-q4_k_m.gguf
SPEED_MODEL_85M := $(CACHE)/models/speed-85m-q4_k_m.gguf

$(SPEED_MODEL_25M) $(SPEED_MODEL_85M): model/speed.py model/gguf_llama.py model/data.py | $(GGUF_VENV)/.ok
	$(GGUF_VENV)/bin/python model/speed.py $@ \
	  --params $(subst m,M,$(word 2,$(subst -, ,$(notdir $@)))) --threads $(MODEL_THREADS)

# matplotlib draws the benchmark plots; a bench-only dependency, never part of the appliance.
bench-plotting: venv
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q matplotlib

# One run (about 20 min): the stock firmware, each static thread count, the firmware throttle at our ceiling and the
# governor take turns on one worker, each heating its own simulated Pi 5 (bench/thermal.py; its constants are fixed
# at the top of the script). `make bench-thermal-boards` shows the simulated temperatures alone, in seconds.
bench-thermal: venv speed-model bench-plotting
	$(PY) bench/thermal.py --model $(SPEED_MODEL) --threads 2 --write

bench-thermal-boards: venv
	$(PY) bench/thermal.py --boards-only --threads 2

bench-memory: venv speed-model $(SPEED_MODEL_25M) $(SPEED_MODEL_85M)
	$(PY) bench/memory.py --write

# Voice (issue 6): end of speech to the first audio of the answer, through the real supervisor and ALSA file devices.
.PHONY: bench-voice
bench: bench-voice

bench-voice: venv
	$(PY) bench/voice.py --rounds 10

# Voice (issue 6): command recognition on the development set the recogniser's limits were chosen on.
.PHONY: bench-voice-devset
bench: bench-voice-devset

bench-voice-devset: venv
	$(PY) bench/voice_devset.py --write

# Architecture matrix (issue 11): estimate vs peak RSS, load time and speed for each of model/arch_matrix.py's models.
.PHONY: bench-models
bench: bench-models

bench-models: venv arch-models
	LLMOS_ARCH_MODELS=$(ARCH_MODELS) $(PY) bench/models.py --write

# HTTP front-end (issue 13): 64 streaming clients for 60 s against the real supervisor and default model (about 2.5
# min with the idle memory rounds), and what the front-end adds to the supervisor's RSS.
.PHONY: bench-http bench-http-stack
bench: bench-http bench-http-stack

bench-http: venv
	$(PY) bench/http_load.py --write

# The server stacks compared (stdlib, aiohttp, starlette+uvicorn) need a venv of their own, outside the product's:
# the two candidates we did not pick must never become dependencies.
HTTP_STACK_VENV := $(CACHE)/http-stack-venv

$(HTTP_STACK_VENV)/.ok:
	@test -x $(HTTP_STACK_VENV)/bin/pip || $(PYTHON) -m venv $(HTTP_STACK_VENV)
	$(HTTP_STACK_VENV)/bin/pip install -q psutil sqlite-utils pyyaml pyserial prometheus_client aiohttp starlette uvicorn
	touch $@

bench-http-stack: $(HTTP_STACK_VENV)/.ok
	$(HTTP_STACK_VENV)/bin/python bench/http_stack.py --write

# Issue 14: image size (xz) and guest time to READY against a bare Debian image with the same kernel
# (bench/bare/), booted in turn in the same QEMU: the image without voice (VOICE=0, which the targets apply to) and
# the default one with voice (what voice costs: its size, and one boot). Not part of `make bench`'s default list:
# three image builds and five TCG boots take about 30 minutes.
.PHONY: bench-boot bare-image
BARE_DIR := build/bare
BARE_IMAGE := $(BARE_DIR)/llmos-bare.raw
BARE_CACHE := $(CACHE)/image-bare

bare-image: $(BARE_IMAGE)

# The same apt sources, package cache and UKI stub as the image; its own incremental cache (mkosi names the cache
# by distribution, release and architecture only, so it must not share the image's).
$(BARE_IMAGE): bench/bare/mkosi.conf $(shell find bench/bare/extra 2>/dev/null) $(IMAGE_DEBS)/.ok
	@mkdir -p $(BARE_DIR) $(BARE_CACHE) $(IMAGE_CACHE)/packages
	@rm -rf $(BARE_CACHE)/pkgmngr && $(PYTHON) image/aptsources.py image --release $(IMAGE_RELEASE) \
	  --out $(BARE_CACHE)/pkgmngr
	cd bench/bare && mkosi --force \
	  --release=$(IMAGE_RELEASE) \
	  --package-manager-tree=$(BARE_CACHE)/pkgmngr \
	  --cache-dir=$(BARE_CACHE) \
	  --package-cache-dir=$(IMAGE_CACHE)/packages \
	  --output-dir=$(CURDIR)/$(BARE_DIR) \
	  $$(ls $(IMAGE_DEBS)/*.deb >/dev/null 2>&1 && echo --package-directory=$(IMAGE_DEBS)) \
	  build > $(CURDIR)/$(BARE_DIR)/build.log 2>&1 || { tail -n 30 $(CURDIR)/$(BARE_DIR)/build.log; exit 1; }
	@touch $@

bench-boot: venv $(BARE_IMAGE)
	$(MAKE) image VOICE=0
	$(MAKE) image VOICE=1
	$(PY) bench/boot.py --image build/image-novoice/llmos-edge.raw --voice-image build/image/llmos-edge.raw \
	  --voice-rounds 1 --bare $(BARE_IMAGE) --rounds 3 --write

# Issue 17: the arm64 image's size, and tokens per second in its emulated guest beside the x86-64 guest's (minutes).
.PHONY: bench-arm64
bench: bench-arm64
bench-arm64: venv
	$(MAKE) image ARCH=arm64
	$(MAKE) image
	$(PY) bench/arm64.py --image build/image-arm64/llmos-edge.raw --x86-image build/image/llmos-edge.raw --write

# Issue 14: a hundred power cuts that lose the disk's write cache (about three hours under TCG; not in `make bench`).
.PHONY: bench-powercut
bench-powercut: venv $(IMAGE)
	$(PY) bench/powercut.py --image $(IMAGE) --cuts 100 --write
	# test_update.py whole: its soak test (a cut update) needs the good update's disk before it
	$(VENV)/bin/pytest -m image tests/image/test_update.py

# Issue 14: bytes written to the card, idle and per request, in the booted image (about 35 minutes under TCG).
.PHONY: bench-wear
bench: bench-wear
bench-wear: venv $(IMAGE)
	$(PY) bench/wear.py --image $(IMAGE) --write

# Learning (issue 15, point 4): consolidating 10 and 50 taught pairs into the default model, at Q8_0 and Q4_K_M.
.PHONY: bench-learning
bench: bench-learning

bench-learning: venv
	$(PY) bench/learning.py --counts 10 50 --threads 1 --write

# Issue 14: what the idle appliance's samples write, before and after sample rows, on a host ext4 loop device
# mounted like the image's var (root: losetup and mount; about 7 minutes, mostly waiting for ext4's journal).
# Not in `make bench`: it needs root.
.PHONY: bench-wear-host
bench-wear-host: venv
	$(PY) bench/wear_host.py --write
