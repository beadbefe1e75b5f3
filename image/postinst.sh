#!/bin/bash
# mkosi post-installation script: install the product into the image tree ($BUILDROOT).
# Inputs come from `make image` as build sources: $SRCDIR/wheels (the project and every dependency, including the
# `voice` extra, as wheels built on the host, so the image needs no compiler) and $SRCDIR/model/default.gguf.
# LLMOS_VOICE=1 (from image/voice.conf, left out by `make image VOICE=0`): install the `voice` extra too.
set -euo pipefail

wheels="$SRCDIR/wheels"
model="$SRCDIR/model/default.gguf"
venv=/usr/lib/llmos/venv

echo "llmos postinst: installing the llmos-edge wheels into $venv"
ls "$wheels"/llmos_edge-*.whl >/dev/null
pip_wheel=$(ls "$wheels"/pip-*.whl | sort -V | tail -n 1)
# Debian's python3 with a venv of our own: no pip, no compiler in the image. pip runs straight from its wheel,
# offline; it byte-compiles everything now, since the read-only root can't take __pycache__ at run time.
project=llmos-edge
if [ "${LLMOS_VOICE:-0}" = 1 ]; then project="llmos-edge[voice]"; fi
mkosi-chroot python3 -m venv --without-pip "$venv"
mkosi-chroot "$venv/bin/python" "${pip_wheel/#$SRCDIR/$CHROOT_SRCDIR}/pip" install \
    --no-index --no-cache-dir --disable-pip-version-check --no-warn-script-location \
    --find-links "${wheels/#$SRCDIR/$CHROOT_SRCDIR}" "$project"
ln -sf "$venv/bin/llmos" "$BUILDROOT/usr/bin/llmos"
site=$(echo "$BUILDROOT$venv"/lib/python3*/site-packages)
# sqlite-utils depends on pip only for its `sqlite-utils install` command; an appliance installs nothing at run time.
rm -rf "$site"/pip "$site"/pip-*.dist-info "$BUILDROOT$venv"/bin/pip*
# What only a developer uses (image size, issue 14): the packages' own test suites, C headers and CMake/pkg-config
# files for building against them, type stubs. Nothing imports these at run time.
find "$site" -type d \( -name tests -o -name include -o -name cmake -o -name pkgconfig \) -prune \
    -exec rm -rf {} +
find "$site" \( -name '*.pyi' -o -name '*.a' \) -delete
# llama-cpp-python's wheel also installs llama.cpp's libraries for C++ programs in site-packages/lib (libllama-common
# among them, 34 MB); the bindings load their own copies from llama_cpp/lib, and the CPU variants from
# site-packages/bin. And a wheel cannot hold symlinks, so each library comes as three identical files
# (libllama.so, .so.0, .so.0.5.0): the versioned file stays, the other two become the links they were meant to be.
if [ -e "$site/lib/libllama.so" ] && [ -e "$site/llama_cpp/lib/libllama.so" ]; then rm -rf "$site/lib"; fi
for f in "$site"/llama_cpp/lib/lib*.so.*.*.*; do
    [ -f "$f" ] || continue
    name=$(basename "$f")
    for link in "${name%%.so.*}.so" "${name%.*.*}"; do
        if cmp -s "$f" "$(dirname "$f")/$link"; then ln -sf "$name" "$(dirname "$f")/$link"; fi
    done
done
if [ "${LLMOS_VOICE:-0}" != 1 ]; then
    # the voice activity detector's model, shipped in the package's data; without voice nothing loads it
    rm -f "$site"/llmos_edge/data/silero_vad.onnx
fi
echo "llmos postinst: $project into the venv, $(du -sh "$BUILDROOT$venv" | cut -f1)"

# The public half of the build host's update key (image/bundle.py): `llmos update` accepts bundles it signed.
if [ -f "$SRCDIR/keys/update-pubring.gpg" ]; then
    install -D -m 0644 "$SRCDIR/keys/update-pubring.gpg" "$BUILDROOT/usr/share/llmos/update-pubring.gpg"
else
    echo "llmos postinst: no update key given: this image accepts no update" >&2
fi

echo "llmos postinst: installing the model ($(du -h "$model" | cut -f1))"
install -D -m 0644 "$model" "$BUILDROOT/usr/share/llmos/models/default.gguf"

# The service user; created now because /etc is read-only on the device. dialout: the UART; audio: the sound
# card for voice (/dev/snd/*, and ALSA's dmix/dsnoop shared memory, which alsa.conf gives to group audio).
if ! mkosi-chroot getent passwd llmos >/dev/null; then
    mkosi-chroot useradd --system --home-dir /var/lib/llmos --no-create-home --shell /usr/sbin/nologin \
        --user-group --groups dialout,audio llmos
fi
# Root stays locked: nobody logs in to an appliance; the product talks on the console.
mkosi-chroot passwd --lock root >/dev/null

mkosi-chroot systemctl enable llmos.service llmos-var.service llmos-test-sigstop.service llmos-test-gadget.service \
    llmos-factory-reset.path llmos-boot-analysis.service llmos-io-report.service llmos-health.service llmos-update.path
# The ESP is written only to bless a new UKI and by updates (docs/updates.md): not at every boot for a random seed
# (systemd-boot passes the firmware's randomness to the kernel itself), and systemd-boot is updated by an update.
# Updates run when a person asks (`llmos update`), never by systemd's own timers (Debian's presets would enable them:
# a periodic update, and a reboot at a time nobody chose).
mkosi-chroot systemctl mask systemd-boot-random-seed.service systemd-boot-update.service \
    systemd-sysupdate.timer systemd-sysupdate-reboot.timer
# The product owns the kernel's console UART (llmos.yaml: console.device kernel; ttyS0, or ttyAMA0 on arm64: see
# image/arch/): no login prompt on any serial port (the template masked masks every instance), nor on the display
# (root is locked: nobody logs in). Nothing asks questions at boot. apt's timers would only fail on the read-only
# root. dpkg's database cannot change on it either, so its daily backup into /var/backups would only wear the card
# (issue 14: bytes written to var a day).
mkosi-chroot systemctl mask serial-getty@.service getty@tty1.service systemd-firstboot.service
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service dpkg-db-backup.timer; do
    if [ -e "$BUILDROOT/usr/lib/systemd/system/$unit" ] || [ -e "$BUILDROOT/lib/systemd/system/$unit" ]; then
        mkosi-chroot systemctl mask "$unit"
    fi
done

# The kernel boots from the UKI on the ESP: the root needs no copy of it (8 MB, incompressible). mkosi builds the UKI
# (after this script, and after the root partition) from /usr/lib/modules/KVER/vmlinuz, so that becomes a relative
# link to /boot/vmlinuz-KVER, which image/repart/10-root.conf keeps off the root.
for kernel in "$BUILDROOT"/boot/vmlinuz-*; do
    kver=${kernel##*/vmlinuz-}
    if [ -f "$kernel" ] && [ -d "$BUILDROOT/usr/lib/modules/$kver" ]; then
        ln -sfn "../../../../boot/vmlinuz-$kver" "$BUILDROOT/usr/lib/modules/$kver/vmlinuz"
    fi
done

# arm64: what a Raspberry Pi 3 or 4 boots from, on the ESP (image/repart/00-esp.conf copies /boot there): its GPU
# firmware, config.txt and U-Boot (image/rpiboot.sh), and the Pis' device trees from this kernel. The firmware loads
# the device tree and U-Boot; U-Boot's UEFI then runs systemd-boot and the UKI as on any other board (docs/arm64.md).
if [ "${ARCHITECTURE:-}" = arm64 ]; then
    install -m 0644 "$SRCDIR"/rpi/* "$BUILDROOT/boot/"
    for kernel in "$BUILDROOT"/boot/vmlinuz-*; do
        kver=${kernel##*/vmlinuz-}
        install -m 0644 "$BUILDROOT/usr/lib/linux-image-$kver"/broadcom/bcm2711-rpi-*.dtb \
            "$BUILDROOT/usr/lib/linux-image-$kver"/broadcom/bcm2837-rpi-*.dtb "$BUILDROOT/boot/"
    done
    echo "llmos postinst: Raspberry Pi boot files: $(cd "$BUILDROOT/boot" && ls -- *.dtb *.elf u-boot.bin config.txt | paste -sd' ')"
fi

# A deliberately broken build for the image tests of updates (make image IMAGE_BROKEN=1, tests/image/test_update.py):
# the supervisor exits 1 at every start, so the health gate fails and boot counting must roll the update back.
if [ "${LLMOS_TEST_BROKEN:-0}" = 1 ]; then
    mkdir -p "$BUILDROOT/usr/lib/systemd/system/llmos.service.d"
    printf '%s\n' "# image/postinst.sh, IMAGE_BROKEN=1: a broken build for the rollback test" "[Service]" "ExecStart=" \
        "ExecStart=/bin/sh -c 'echo llmos: this build is broken on purpose (IMAGE_BROKEN=1); exit 1'" \
        > "$BUILDROOT/usr/lib/systemd/system/llmos.service.d/90-test-broken.conf"
    echo "llmos postinst: BROKEN ON PURPOSE (IMAGE_BROKEN=1): the supervisor exits 1"
fi

# An empty machine-id file gives PID 1 something to bind-mount the run-time ID over on the read-only root.
: > "$BUILDROOT/etc/machine-id"

# What systemd would otherwise do at every fresh card's first boot, in sysinit's critical path (ConditionNeedsUpdate=
# /var: var has no stamp yet): rebuild the journal's message catalog (3.2 s under QEMU's software emulation) and write
# the stamp (1.5 s). Done here for the var partition (image/repart/20-var.conf copies /var), the stamp dated after
# /usr, so only the first boot of a newer root (an update) does it again.
mkosi-chroot journalctl --update-catalog
touch "$BUILDROOT/var/.updated"
echo "llmos postinst: done"
