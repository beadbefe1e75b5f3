#!/bin/bash
# The Raspberry Pi's boot files for the arm64 image's ESP (docs/arm64.md): the GPU firmware of Pi 3 and Pi 4
# (Debian's raspi-firmware, in the non-free-firmware component), U-Boot for 64-bit Pis (Debian's u-boot-rpi,
# rpi_arm64) and image/rpi/config.txt, into OUT/tree (mkosi copies it to /boot, which image/repart/00-esp.conf puts
# on the ESP). The packages come from the host's own Debian mirror (image/aptsources.py) through a private apt state,
# so the host's apt configuration is neither needed nor changed.
#   rpiboot.sh RELEASE OUT
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
release=$1 out=$2

die() { echo "rpiboot: $1" >&2; [ -n "${2:-}" ] && echo "  hint: $2" >&2; exit 1; }

apt=$out/apt
rm -rf "$out/tree" "$out/debs" "$apt"
mkdir -p "$apt/sources.list.d" "$apt/lists/partial" "$apt/cache/archives/partial" "$out/debs" "$out/tree"
python3 "$here/aptsources.py" firmware --release "$release" > "$apt/sources.list.d/firmware.sources"
opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt/sources.list.d"
      -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o "Dir::State::status=/dev/null"
      -o "APT::Architecture=arm64" -o "APT::Architectures=arm64" -o "Debug::NoLocking=1")
apt-get "${opts[@]}" update -qq || die "apt-get update of $release non-free-firmware failed" \
    "check that the host reaches its Debian mirror (image/aptsources.py firmware shows the source)"
( cd "$out/debs" && apt-get "${opts[@]}" download -qq raspi-firmware u-boot-rpi ) 2>&1 \
    | { grep -v '^W: Download is performed unsandboxed' || true; }
for p in raspi-firmware u-boot-rpi; do
    deb=$(ls "$out/debs/${p}"_*.deb 2>/dev/null | head -n 1)
    [ -n "$deb" ] || die "could not download $p for $release" "apt-get's message above says why"
    dpkg-deb -x "$deb" "$out/x"
done
fw=$out/x/usr/lib/raspi-firmware
# Pi 3: bootcode.bin, start.elf, fixup.dat; Pi 4: start4.elf, fixup4.dat (the plain ones, not the cut-down or debug)
for f in bootcode.bin start.elf fixup.dat start4.elf fixup4.dat; do
    install -m 0644 "$fw/$f" "$out/tree/$f"
done
install -m 0644 "$out/x/usr/lib/u-boot/rpi_arm64/u-boot.bin" "$out/tree/u-boot.bin"
install -m 0644 "$here/rpi/config.txt" "$out/tree/config.txt"
versions=$(for d in "$out"/debs/*.deb; do dpkg-deb --showformat='${Package} ${Version}\n' -W "$d"; done \
    | paste -sd, | sed 's/,/, /g')
rm -rf "$out/x" "$apt"
echo "rpiboot: $(ls "$out/tree" | wc -l) files in $out/tree ($versions)"
