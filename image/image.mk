# The appliance image: included by the top-level Makefile (which defines CACHE, WHEELS, LLAMA_WHEEL_STAMP,
# PYTHON, VENV, PY).
#   make image-deps            host tools (mkosi 24, systemd 254, QEMU, OVMF, erofs-utils, bmaptool), idempotent
#   make image [MODEL=x.gguf]  build build/image/llmos-edge.raw (bakes MODEL as the default model)
#   make image VOICE=0         the same without the voice front-end (build/image-novoice/llmos-edge.raw): no
#                              espeak-ng, ALSA tools, onnxruntime or pocketsphinx; /status says voice is not installed
#   make image ARCH=arm64      the same for 64-bit ARM (build/image-arm64/llmos-edge.raw): built here through
#                              qemu-user-static, llama.cpp cross-compiled (docs/arm64.md); `make run ARCH=arm64` boots
#                              it in QEMU's virt machine with UEFI. BOARD=rpi: the same image, a Raspberry Pi 3 or 4's
#                              SD card; `make run BOARD=rpi` boots it in QEMU's raspi3b through U-Boot
#   make run [CPU=Nehalem] [SOUND=none|alsa] [STICK=stick.raw] [HTTP_PORT=8080]
#                              install what is missing (make deps), then boot a copy of it in QEMU, serial console
#                              on this terminal (Ctrl-A X quits); SOUND adds a sound card (silent, or this host's
#                              ALSA devices) for the voice front-end; STICK plugs in a USB stick image (see
#                              image/usbstick.py); HTTP_PORT adds a network card, the guest's HTTP API (with
#                              http.enabled) on 127.0.0.1:HTTP_PORT. With standard input not a terminal, the input is typed into the
#                              console as a script, a line per prompt, and the VM powers off at its end (CI does so)
#   make update-bundle IMAGE_VERSION=x [COMPRESS=xz|gz|none]
#                              a signed update (root slot image, UKI, SHA256SUMS) in build/update/x/ for devices
#                              running an earlier version: /update PATH on their console (docs/updates.md)
#   make flash DEVICE=/dev/sdX [FORCE=1]
#   make image-test            pytest tests/image (boots the image under QEMU), the arm64 image's tests aside
#   make image-test-arm64      the arm64 image's tests (tests/image/test_arm64.py) on `make image ARCH=arm64 VOICE=0`,
#                              all but the raspi3b boot; `make test-arm64` all of them

# VOICE=1 (the default): the voice front-end is in the image (image/voice.conf and the `voice` extra); VOICE=0 leaves
# it out (README: what voice costs). Each variant has its own output directory and mkosi tree cache.
VOICE ?= 1
VOICE_SUFFIX := $(if $(filter 0 no false,$(VOICE)),-novoice)
# ARCH: the image's architecture, in mkosi's names: x86-64 (the default) or arm64. Each has its own output
# directory, wheels and mkosi tree cache; image/arch/$(ARCH).conf holds what differs (kernel, console).
ARCH ?= x86-64
# BOARD=rpi: a Raspberry Pi 3 or 4's SD card, which is the arm64 image (its ESP carries the Pi's boot files).
ifeq ($(BOARD),rpi)
override ARCH := arm64
else ifneq ($(BOARD),)
$(error BOARD=$(BOARD) is not a board the image is built for (hint: BOARD=rpi, or no BOARD))
endif
ifeq ($(filter x86-64 arm64,$(ARCH)),)
$(error ARCH=$(ARCH) is not an architecture the image is built for (hint: ARCH=x86-64 or ARCH=arm64))
endif
ARCH_SUFFIX := $(if $(filter arm64,$(ARCH)),-arm64)
IMAGE_DIR := build/image$(VOICE_SUFFIX)$(ARCH_SUFFIX)
IMAGE := $(IMAGE_DIR)/llmos-edge.raw
IMAGE_CACHE := $(CACHE)/image
IMAGE_WHEELS := $(CACHE)/image-wheels
IMAGE_STAGE := $(IMAGE_CACHE)/stage
# The image's Debian release is the host's, so wheels built here match the image's Python ABI.
IMAGE_RELEASE = $(shell $(PYTHON) image/aptsources.py codename)
DEFAULT_MODEL := model/llmos-tiny-q8_0.gguf
# The image's version (IMAGE_VERSION in os-release; it names root slot A and the UKI, docs/updates.md): the
# project's version unless given. An update must carry a higher one: make image IMAGE_VERSION=0.1.0.1
# IMAGE_BROKEN=1: a build whose supervisor exits 1 at every start (image/postinst.sh), for the rollback test only.
IMAGE_BROKEN ?=
IMAGE_VERSION ?= $(shell $(PYTHON) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
IMAGE_MODEL = $(or $(MODEL),$(DEFAULT_MODEL))
IMAGE_SOURCES := mkosi.conf image/voice.conf $(shell find image/arch image/repart image/initrd rootfs-overlay -type f 2>/dev/null) image/postinst.sh \
	pyproject.toml $(wildcard llmos_edge/*.py llmos_edge/data/*)
CPU ?=
MEM ?= 1024
SOUND ?=
STICK ?=
HTTP_PORT ?=

.PHONY: image-deps image-wheels image image-xz update-bundle run flash image-test image-test-arm64 test-arm64

# `make deps` installs the image tools too.
deps: image-deps

image-deps:
	@ARCH=$(ARCH) bash image/hostdeps.sh

# The image's third-party requirements: the project's dependencies and its `voice` extra. The file is rewritten
# only when the list changes (not on every pyproject.toml edit), and the wheels below are resolved again exactly then.
IMAGE_REQUIREMENTS := $(IMAGE_WHEELS)/.requirements.txt
$(IMAGE_REQUIREMENTS): FORCE_CHECK
	@mkdir -p $(@D)
	@$(PYTHON) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  print("\n".join(p["dependencies"] + p["optional-dependencies"]["voice"]))' > $@.new
	@if cmp -s $@.new $@; then rm -f $@.new; else mv -f $@.new $@; fi

# Third-party wheels, resolved once per requirements change; the llama-cpp-python wheel comes from $(WHEELS)
# (all CPU variants, built once by `make wheel`). pip goes in as a wheel too: it runs the offline install.
$(IMAGE_WHEELS)/.deps.ok: $(IMAGE_REQUIREMENTS) $(LLAMA_WHEEL_STAMP) $(VENV)/.ok
	@mkdir -p $(IMAGE_WHEELS)
	@echo "== image wheels: dependencies of llmos-edge[voice] into $(IMAGE_WHEELS)"
	$(PY) -m pip wheel -q --wheel-dir $(IMAGE_WHEELS) --find-links $(WHEELS) --prefer-binary \
	  pip -r $(IMAGE_REQUIREMENTS)
	@ls $(IMAGE_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	  { echo "image-wheels: no llama-cpp-python wheel in $(IMAGE_WHEELS) (hint: run make wheel)"; exit 1; }
	@touch $@

# The project's own wheel, rebuilt whenever its sources change (same version, so the file is replaced).
$(IMAGE_WHEELS)/.project.ok: $(IMAGE_WHEELS)/.deps.ok pyproject.toml $(wildcard llmos_edge/*.py llmos_edge/data/*)
	@rm -f $(IMAGE_WHEELS)/llmos_edge-*.whl
	$(PY) -m pip wheel -q --no-deps --wheel-dir $(IMAGE_WHEELS) .
	@touch $@

# arm64: llama-cpp-python cross-compiled with Debian's aarch64 toolchain (image/arch/aarch64-linux-gnu.cmake), every
# ARM CPU variant but the two armv9.2 ones with SME, which bookworm's GCC 12 cannot compile (no Raspberry Pi has SME;
# docs/arm64.md). The image's other wheels: the host's set, same versions, the compiled ones downloaded for aarch64
# (image/foreignwheels.py).
WHEELS_ARM64 := $(CACHE)/wheels-arm64
LLAMA_WHEEL_ARM64_STAMP := $(WHEELS_ARM64)/.llama-cpp-python-$(LLAMA_CPP_VERSION).ok
CROSS_SRC := $(CACHE)/cross-src/llama_cpp_python-$(LLAMA_CPP_VERSION)
$(LLAMA_WHEEL_ARM64_STAMP): $(LLAMA_WHEEL_STAMP)
	@command -v aarch64-linux-gnu-g++ >/dev/null || { echo "wheel: no aarch64 cross compiler" \
	  "(hint: make image-deps ARCH=arm64 installs crossbuild-essential-arm64)"; exit 1; }
	@rm -rf $(dir $(CROSS_SRC)) && mkdir -p $(dir $(CROSS_SRC)) $(WHEELS_ARM64)
	@tar -xzf $(CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(dir $(CROSS_SRC))
	@f=$(CROSS_SRC)/vendor/llama.cpp/ggml/src/CMakeLists.txt; \
	  sed -i '/ggml_add_cpu_backend_variant(armv9\.2_[12] /d' $$f; \
	  ! grep -q 'ggml_add_cpu_backend_variant(armv9' $$f && grep -q 'ggml_add_cpu_backend_variant(armv8.0_1)' $$f \
	  || { echo "wheel: $$f no longer lists the ARM variants as expected (hint: check image/image.mk's sed)"; exit 1; }
	@echo "== building llama-cpp-python $(LLAMA_CPP_VERSION) for aarch64 with its ARM CPU variants (cross-compiled)"
	CMAKE_ARGS="-DCMAKE_TOOLCHAIN_FILE=$(CURDIR)/image/arch/aarch64-linux-gnu.cmake $(LLAMA_CMAKE_ARGS) -DLLAMA_OPENSSL=OFF" \
	  _PYTHON_HOST_PLATFORM=linux-aarch64 CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(CACHE)/build-venv/bin/pip wheel --no-deps -w $(WHEELS_ARM64) $(CROSS_SRC)
	@ls $(WHEELS_ARM64)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*linux_aarch64.whl >/dev/null \
	  || { echo "wheel: no linux_aarch64 wheel in $(WHEELS_ARM64) (hint: read the build output above)"; exit 1; }
	@rm -rf $(dir $(CROSS_SRC))
	touch $@

IMAGE_WHEELS_ARM64 := $(CACHE)/image-wheels-arm64
$(IMAGE_WHEELS_ARM64)/.ok: $(IMAGE_WHEELS)/.project.ok $(LLAMA_WHEEL_ARM64_STAMP)
	@echo "== image wheels for arm64 into $(@D)"
	$(PY) image/foreignwheels.py --arch arm64 --host-wheels $(IMAGE_WHEELS) --llama-wheels $(WHEELS_ARM64) --out $(@D)
	@touch $@

# arm64: the Raspberry Pi's boot firmware and U-Boot (image/rpiboot.sh), which image/postinst.sh puts on the ESP.
RPI_BOOT := $(IMAGE_CACHE)/rpi-boot
$(RPI_BOOT)/.ok: image/rpiboot.sh image/rpi/config.txt image/aptsources.py
	@echo "== image: the Raspberry Pi's boot firmware and U-Boot into $(@D)"
	@bash image/rpiboot.sh $(IMAGE_RELEASE) $(@D)
	@touch $@
comma := ,

# What the image build installs from: this architecture's wheel directory, and its stamp.
IMAGE_ARCH_WHEELS := $(if $(ARCH_SUFFIX),$(IMAGE_WHEELS_ARM64),$(IMAGE_WHEELS))
IMAGE_ARCH_WHEELS_OK := $(if $(ARCH_SUFFIX),$(IMAGE_WHEELS_ARM64)/.ok,$(IMAGE_WHEELS)/.project.ok)
ifeq ($(ARCH),arm64)
wheel: $(LLAMA_WHEEL_ARM64_STAMP)
endif

image-wheels: $(IMAGE_ARCH_WHEELS_OK)

# The version (and the test switch) is baked into the image: the stamp changes when it does.
$(IMAGE_STAGE)/.version: FORCE_CHECK
	@[[ "$(IMAGE_VERSION)" =~ ^[0-9][0-9A-Za-z.~^-]*$$ ]] || { echo "image: IMAGE_VERSION=$(IMAGE_VERSION) is not" \
	  "a version (hint: digits and dots, e.g. 0.1.0.1; it becomes part of a partition label and a file name)"; exit 1; }
	@mkdir -p $(@D)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(IMAGE_VERSION) $(IMAGE_BROKEN)" ]; then \
	  echo "$(IMAGE_VERSION) $(IMAGE_BROKEN)" > $@; fi

# Which model is baked in: the stamp changes when MODEL names another file or the file changes.
$(IMAGE_STAGE)/model/.source: FORCE_CHECK
	@test -f "$(IMAGE_MODEL)" || { echo "image: no model file at $(IMAGE_MODEL) (hint: run \`make model\`," \
	  "or pass MODEL=/path/to/any.gguf)"; exit 1; }
	@head -c 4 "$(IMAGE_MODEL)" | grep -q GGUF || { echo "image: $(IMAGE_MODEL) is not a GGUF file" \
	  "(hint: MODEL= takes a .gguf model file)"; exit 1; }
	@mkdir -p $(@D)
	@src="$$(realpath "$(IMAGE_MODEL)") $$(stat -c '%s %Y' "$(IMAGE_MODEL)")"; \
	if [ "$$(cat $@ 2>/dev/null)" != "$$src" ]; then \
	  echo "== image model: $(IMAGE_MODEL)"; \
	  ln -f "$(IMAGE_MODEL)" $(@D)/default.gguf 2>/dev/null || cp -f "$(IMAGE_MODEL)" $(@D)/default.gguf; \
	  echo "$$src" > $@; \
	fi

.PHONY: FORCE_CHECK
FORCE_CHECK:

# Debian 12's systemd 252 has no systemd-sysupdate (A/B updates, docs/updates.md), and its systemd-stub prints
# "Overlapping PE sections detected" in red on the product's console at every boot when the host's ukify 254
# assembles the UKI. So systemd comes from bookworm-backports (254, the host's own: see image/hostdeps.sh): every
# binary package of it that the image or mkosi's default initrd may install goes in as a local package (apt takes
# the higher version), all of one version since they depend on each other exactly; the rest stays plain Debian 12.
# The stamp holds the list, so a changed list downloads again.
IMAGE_DEBS := $(IMAGE_CACHE)/debs$(ARCH_SUFFIX)
IMAGE_BACKPORTS := systemd systemd-sysv systemd-dev udev libsystemd0 libsystemd-shared libudev1 libnss-systemd \
	libpam-systemd systemd-timesyncd systemd-container systemd-boot systemd-boot-efi
$(IMAGE_DEBS)/.ok: FORCE_CHECK
	@mkdir -p $(@D)
	@want="$(IMAGE_RELEASE) $(ARCH): $(IMAGE_BACKPORTS)"; \
	if [ "$$(cat $@ 2>/dev/null)" != "$$want" ]; then \
	  rm -f $(@D)/*.deb; \
	  if [ "$(IMAGE_RELEASE)" = bookworm ]; then \
	    echo "== image: systemd from bookworm-backports into $(@D)"; \
	    ( cd $(@D) && apt-get download -qq $(if $(ARCH_SUFFIX),-o APT::Architecture=arm64) \
	      $(addsuffix /bookworm-backports,$(IMAGE_BACKPORTS)) ) 2>&1 \
	      | grep -v '^W: Download is performed unsandboxed' || true; \
	    n=$$(ls $(@D)/*.deb 2>/dev/null | wc -l); \
	    [ "$$n" = $(words $(IMAGE_BACKPORTS)) ] || { echo "image: got $$n of the $(words $(IMAGE_BACKPORTS))" \
	      "systemd packages from bookworm-backports (hint: run make image-deps$(if $(ARCH_SUFFIX), ARCH=arm64)," \
	      "then apt-get update)"; exit 1; }; \
	  fi; \
	  echo "$$want" > $@; \
	fi

# The update signing key (image/bundle.py, docs/updates.md) stays on the build host, in $(CACHE), never in the
# repository; the image carries its public half, so it accepts the bundles this host signs.
UPDATE_KEY_DIR ?= $(CACHE)/update-key
$(IMAGE_STAGE)/keys/update-pubring.gpg: FORCE_CHECK
	@mkdir -p $(@D)
	@$(PYTHON) image/bundle.py key --dir $(UPDATE_KEY_DIR) >/dev/null
	@cmp -s $(UPDATE_KEY_DIR)/update-pubring.gpg $@ || cp -f $(UPDATE_KEY_DIR)/update-pubring.gpg $@

# mkosi's caches (packages, the incremental tree) live in $(CACHE); the apt sources come from this host.
IMAGE_TREE_CACHE := $(IMAGE_CACHE)/mkosi$(VOICE_SUFFIX)$(ARCH_SUFFIX)

$(IMAGE): $(IMAGE_SOURCES) $(IMAGE_ARCH_WHEELS_OK) $(IMAGE_STAGE)/model/.source $(IMAGE_DEBS)/.ok \
	  $(IMAGE_STAGE)/.version $(IMAGE_STAGE)/keys/update-pubring.gpg $(if $(ARCH_SUFFIX),$(RPI_BOOT)/.ok)
	@command -v mkosi >/dev/null || { echo "image: mkosi is not installed (hint: run make image-deps)"; exit 1; }
	@mkdir -p $(IMAGE_DIR) $(IMAGE_TREE_CACHE) $(IMAGE_CACHE)/packages
	@rm -rf $(IMAGE_CACHE)/pkgmngr && $(PYTHON) image/aptsources.py image --release $(IMAGE_RELEASE) \
	  --out $(IMAGE_CACHE)/pkgmngr
	@echo "== image: mkosi build (cold about 4-6 min, warm about 1-2 min); log in $(IMAGE_DIR)/build.log"
	@# mkosi's incremental cache does not notice changed apt sources or pins: rebuild it (-ff) when they change.
	@start=$$(date +%s); \
	sources=$$(cat $$(find $(IMAGE_CACHE)/pkgmngr -type f | sort) mkosi.conf image/voice.conf image/arch/$(ARCH).conf \
	  | sha256sum | cut -c1-16); \
	force=--force; \
	if [ "$$(cat $(IMAGE_TREE_CACHE)/.sources 2>/dev/null)" != "$$sources" ]; then force="--force --force"; fi; \
	if ! mkosi $$force \
	  --release=$(IMAGE_RELEASE) \
	  --include=image/arch/$(ARCH).conf \
	  $(if $(VOICE_SUFFIX),,--include=image/voice.conf) \
	  --image-version=$(IMAGE_VERSION) \
	  $(if $(filter 1,$(IMAGE_BROKEN)),--environment=LLMOS_TEST_BROKEN=1) \
	  --package-manager-tree=$(IMAGE_CACHE)/pkgmngr \
	  --cache-dir=$(IMAGE_TREE_CACHE) \
	  --package-cache-dir=$(IMAGE_CACHE)/packages \
	  --output-dir=$(IMAGE_DIR) \
	  $$(ls $(IMAGE_DEBS)/*.deb >/dev/null 2>&1 && echo --package-directory=$(IMAGE_DEBS)) \
	  --build-sources=$(IMAGE_ARCH_WHEELS):wheels,$(IMAGE_STAGE)/model:model,$(IMAGE_STAGE)/keys:keys$(if $(ARCH_SUFFIX),$(comma)$(RPI_BOOT)/tree:rpi) \
	  build 2>&1 | tee $(IMAGE_DIR)/build.log | { grep --line-buffered -E '^‣|llmos postinst' || true; }; then \
	  tail -n 30 $(IMAGE_DIR)/build.log; echo "image: mkosi failed (hint: the whole log is $(IMAGE_DIR)/build.log)"; \
	  exit 1; \
	fi; \
	test -f $@ || { echo "image: mkosi did not write $@ (hint: read $(IMAGE_DIR)/build.log)"; exit 1; }; \
	echo "$$sources" > $(IMAGE_TREE_CACHE)/.sources; \
	bmaptool create -o $@.bmap $@; \
	echo "== image: $@ version $(IMAGE_VERSION) built in $$(( $$(date +%s) - start )) s:" \
	  "$$(du -h --apparent-size $@ | cut -f1) apparent, $$(du -h $@ | cut -f1) on disk"
	@touch $@

image: $(IMAGE)

# An update for devices running an earlier version: the image built as IMAGE_VERSION (give a higher one than the
# devices run), then its root slot and UKI, SHA256SUMS and its signature in build/update/<version>/ (image/bundle.py).
# COMPRESS: the root image's compression: xz (the default: smallest), gz (seconds to make) or none (no
# decompression on the device; the image tests use it).
COMPRESS ?= xz
UPDATE_DIR := build/update
update-bundle: $(IMAGE)
	$(PYTHON) image/bundle.py make --image $(IMAGE) --key-dir $(UPDATE_KEY_DIR) --out $(UPDATE_DIR) \
	  --compress $(COMPRESS)

# Compressed copy for distribution (and the size measurement); flash.py writes .raw (with .bmap) only.
image-xz: $(IMAGE)
	xz -T0 -6 -k -f -v $(IMAGE)
	@ls -l $(IMAGE).xz

# `make run` boots a copy (kept between runs, like a device's card; renewed when the image is rebuilt), so the
# built image stays factory-fresh for flashing: no machine ID, no database, var not yet grown.
RUN_DISK := $(IMAGE_DIR)/run-disk.raw
RUN_DISK_SIZE ?= 4G

$(RUN_DISK): $(IMAGE)
	cp --sparse=always $(IMAGE) $@
	truncate -s $(RUN_DISK_SIZE) $@

# README's first command on a fresh machine: `deps` first (host packages, image tools, the wheel, the venv), so the
# image build below never meets a missing tool.
run: deps $(RUN_DISK)
	$(PYTHON) image/vm.py run --arch $(ARCH) $(if $(BOARD),--board raspi3b) --image $(RUN_DISK) --mem $(MEM) $(if $(CPU),--cpu $(CPU)) $(if $(SOUND),--sound $(SOUND)) \
	  $(if $(STICK),--usb-stick $(STICK)) $(if $(HTTP_PORT),--http-port $(HTTP_PORT))

flash: $(IMAGE)
	@test -n "$(DEVICE)" || { echo "flash: say where: make flash DEVICE=/dev/sdX" \
	  "(hint: lsblk shows the removable disks)"; exit 1; }
	$(PYTHON) image/flash.py --image $(IMAGE) --device "$(DEVICE)" $(if $(filter 1 yes true,$(FORCE)),--yes)

# The top-level `make test` runs $(IMAGE_TEST) last: the x86-64 image's tests, then the arm64 image's but its boot
# in QEMU's raspi3b (4-9 minutes more under emulation; `make test-arm64` runs it). Each image is (re)built first when
# its inputs changed.
IMAGE_TEST := image-test image-test-arm64

image-test: $(IMAGE) $(VENV)/.ok
	$(VENV)/bin/pytest -m "image and not soak and not arm64" --durations=12 tests/image

# The arm64 image's tests (docs/arm64.md): its layout as a Raspberry Pi's card, a boot in QEMU's raspi3b (test-arm64
# only), boots in QEMU's virt machine. On the image without voice: the voice front-end is the x86-64 image's to test,
# and leaving it out saves building it under emulation (test_arm64.py names the image).
test-arm64 image-test-arm64: $(VENV)/.ok
	$(MAKE) image-deps ARCH=arm64
	$(MAKE) image ARCH=arm64 VOICE=0
	$(VENV)/bin/pytest -m "image and arm64$(if $(filter image-test-arm64,$@), and not raspi3b)" --durations=8 \
	  tests/image/test_arm64.py
