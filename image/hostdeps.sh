#!/bin/bash
# Install the host tools that build, boot and flash the image; idempotent (a second run changes nothing).
# Debian 12: mkosi 24 and systemd/systemd-container 254 (repart, ukify) come from bookworm-backports, added with
# the mirror the host already uses. Debian 13 and later: their own mkosi.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "image-deps: $1" >&2; [ -n "${2:-}" ] && echo "  hint: $2" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "installing host packages needs root" "run it as root: sudo make image-deps"
command -v apt-get >/dev/null || die "this is not a Debian host (no apt-get)" "build the image on Debian 12 or 13"
codename=$(python3 "$here/aptsources.py" codename)

# nbdkit: the image tests' disk whose unflushed writes a power cut loses (image/volatiledisk.py)
common=(bubblewrap fdisk e2fsprogs dosfstools mtools python3-pefile zstd xz-utils cpio debian-archive-keyring
        uidmap kmod erofs-utils qemu-system-x86 ovmf bmap-tools reprepro nbdkit)
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}
missing() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || echo "$p"
    done
}
mkosi_major() { mkosi --version 2>/dev/null | awk '{print int($2)}' || true; }
systemd_major() { dpkg-query -W -f='${Version}' systemd 2>/dev/null | cut -d. -f1 || true; }
updated=0
update_once() { [ "$updated" = 1 ] || { apt-get update -q; updated=1; }; }

if [ "$codename" = bookworm ]; then
    list=/etc/apt/sources.list.d/llmos-backports.sources
    want=$(python3 "$here/aptsources.py" host-backports)
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "== adding bookworm-backports (mirror taken from the host's apt sources) as $list"
        printf '%s\n' "$want" > "$list"
        apt-get update -q; updated=1
    fi
    if [ "$(mkosi_major)" != 24 ] || [ "$(systemd_major)" -lt 254 ] \
        || [ -n "$(missing systemd-container systemd-boot systemd-boot-efi)" ]; then
        echo "== installing mkosi 24 and systemd 254 from bookworm-backports"
        update_once
        apt_install -t bookworm-backports mkosi systemd systemd-container systemd-boot systemd-boot-efi
    fi
else
    need=$(missing mkosi systemd-container systemd-boot systemd-boot-efi systemd-repart systemd-ukify \
           | while read -r p; do apt-cache show "$p" >/dev/null 2>&1 && echo "$p"; done || true)
    if [ -n "$need" ]; then
        update_once
        apt_install $need
    fi
fi

need=$(missing "${common[@]}")
if [ -n "$need" ]; then
    echo "== installing host packages:" $need
    update_once
    apt_install $need
fi

# ARCH=arm64 (docs/arm64.md): the cross compiler for llama.cpp, qemu-user-static (mkosi runs the image's arm64
# package scripts and pip through it), QEMU's arm64 machine and its UEFI firmware (AAVMF), and arm64 package lists
# for the systemd packages from backports (image/image.mk downloads them like the amd64 ones).
if [ "${ARCH:-x86-64}" = arm64 ]; then
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        echo "== adding arm64 to dpkg's architectures (package lists only: nothing arm64 is installed on this host)"
        dpkg --add-architecture arm64
        updated=0 && update_once  # the arm64 lists
    fi
    need=$(missing crossbuild-essential-arm64 qemu-user-static binfmt-support qemu-system-arm qemu-efi-aarch64)
    if [ -n "$need" ]; then
        echo "== installing host packages for arm64:" $need
        update_once
        apt_install $need
    fi
    # mkosi runs the arm64 programs inside its sandbox, where the emulator's path does not exist: the kernel must
    # hold the interpreter open (binfmt_misc's F flag, which Debian's qemu-user-static entry sets).
    binfmt=/proc/sys/fs/binfmt_misc
    [ -e "$binfmt/status" ] || mount -t binfmt_misc binfmt_misc "$binfmt" \
        || die "cannot mount binfmt_misc at $binfmt" "run this as root on a host (or container) allowed to mount it"
    [ -e "$binfmt/qemu-aarch64" ] || update-binfmts --enable qemu-aarch64 \
        || die "cannot register qemu-aarch64 with binfmt_misc" "update-binfmts --display qemu-aarch64 says why"
    grep -q '^flags:.*F' "$binfmt/qemu-aarch64" \
        || die "qemu-aarch64 is registered without the F flag: mkosi's sandbox cannot run arm64 programs" \
               "update-binfmts --disable qemu-aarch64, then make image-deps ARCH=arm64 again"
fi

major=$(mkosi_major)
case "$major" in
    24) ;;
    25|26) echo "image-deps: mkosi $major: this config was written for 24.x; 25 parses it with warnings" ;;
    *) die "mkosi ${major:-missing} is not supported (need 24.x)" \
           "on Debian 12 install it from bookworm-backports: apt-get install -t bookworm-backports mkosi" ;;
esac
echo "image-deps: ok ($(mkosi --version), systemd $(dpkg-query -W -f='${Version}' systemd), Debian $codename)"
