#!/usr/bin/env bash
# Installs the host packages kiosk needs on Debian/Ubuntu and makes foreign-arch
# binaries runnable (binfmt_misc). Idempotent: does nothing that is already done.
#   scripts/install-deps.sh build   what `kiosk build` and `kiosk flash` need
#   scripts/install-deps.sh test    that, plus what the test suite needs
set -euo pipefail
mode=${1:-build}

build_pkgs=(mmdebstrap qemu-user-static binfmt-support arch-test dosfstools mtools fdisk
            e2fsprogs zstd xz-utils ca-certificates tzdata dpkg-dev cpio kmod python3-venv
            python3-pip git openssh-client bmap-tools util-linux python3-yaml uidmap
            rauc casync squashfs-tools openssl grub-common u-boot-tools
            device-tree-compiler)
# casync: kiosk update ships only the changed chunks of a system (rauc convert).
# u-boot-tools: mkimage and mkenvimage for the Raspberry Pis' U-Boot boot script and environment.
# device-tree-compiler: fdtput adds the Pi 4's mmc aliases to its device trees on the FAT.
# GRUB for the qemu target's EFI boot loader (grub-mkimage; Debian builds it for x86 hosts only).
case "$(dpkg --print-architecture)" in amd64|i386) build_pkgs+=(grub-efi-amd64-bin) ;; esac
# ovmf: the UEFI firmware kiosk run boots the qemu target with.
test_pkgs=(qemu-system-arm qemu-system-x86 qemu-utils openssh-server dnsutils avahi-utils
           iproute2 procps python3-zeroconf ovmf)

pkgs=("${build_pkgs[@]}")
[ "$mode" = test ] && pkgs+=("${test_pkgs[@]}")

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else
        echo "kiosk: needs root for: $*" >&2
        sudo "$@"
    fi
}

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "kiosk: installing ${missing[*]}" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Foreign-arch maintainer scripts run under qemu-user: binfmt_misc must be mounted and enabled.
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    as_root mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || true
fi
for fmt in qemu-aarch64 qemu-arm; do
    if [ ! -e "/proc/sys/fs/binfmt_misc/$fmt" ]; then
        as_root update-binfmts --enable "$fmt" >/dev/null 2>&1 || true
    fi
done
for arch in arm64 armhf armel; do
    if ! arch-test "$arch" >/dev/null 2>&1; then
        echo "kiosk: warning: cannot run $arch binaries here (binfmt_misc/qemu-user); builds for that arch will fail" >&2
    fi
done

# raspberryPi4 boots on QEMU's raspi4b (QEMU 9.0 and later); bookworm's QEMU is 7.2. kiosk run takes
# bookworm-backports' QEMU for that board only (hardware/raspberryPi4.json qemu.release), unpacked here
# rather than installed, so that every other board keeps the system's QEMU. The apt lists for it are
# private to this step: the system's sources stay as they are.
unpack_qemu() {
    local release=$1 dest=/opt/kiosk/qemu/$1
    [ -x "$dest/usr/bin/qemu-system-aarch64" ] && return 0
    echo "kiosk: unpacking QEMU from $release into $dest (for raspberryPi4's raspi4b machine)" >&2
    local tmp
    tmp=$(mktemp -d)
    mkdir -p "$tmp/lists/partial" "$tmp/debs"
    echo "deb http://deb.debian.org/debian $release main" > "$tmp/sources.list"
    local apt=(apt-get -q -o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=$tmp/none"
               -o "Dir::State::Lists=$tmp/lists" -o "APT::Sandbox::User=root")
    as_root "${apt[@]}" update >/dev/null
    (cd "$tmp/debs" && as_root "${apt[@]}" download qemu-system-arm/"$release" qemu-system-common/"$release" \
        qemu-system-data/"$release" qemu-system-modules-opengl/"$release" qemu-system-modules-spice/"$release")
    as_root rm -rf "$dest.partial"
    as_root mkdir -p "$dest.partial"
    for deb in "$tmp"/debs/*.deb; do as_root dpkg-deb -x "$deb" "$dest.partial"; done
    as_root mv "$dest.partial" "$dest"
    as_root rm -rf "$tmp"
}
if [ "$mode" = test ]; then unpack_qemu bookworm-backports; fi
