#!/usr/bin/env bash
# Fetches upstream QEMU 10.0.2 (Debian's orig tarball), applies svff's patch series and builds
# qemu-system-x86_64. See README.md. Usage: build.sh [--check]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ver=10.0.2
work=$here/build
src=$work/qemu-$ver
mode=${1:-build}

mkdir -p "$work"
tarball=$(ls "$work"/qemu_"$ver"*.orig.tar.xz 2>/dev/null | head -n1 || true)
if [ -z "$tarball" ]; then
    echo "qemu-fork: fetching Debian's qemu source package (orig tarball) ..."
    grep -rqs 'deb-src\|Types:.*deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/ ||
        { echo "qemu-fork: no deb-src source configured; run scripts/deps.sh first" >&2; exit 1; }
    # Only the orig tarball (upstream source) is needed; the Debian packaging parts may be absent
    # from the mirror, so apt-get's status is not the test: the tarball is.
    (cd "$work" && apt-get source --download-only -t bookworm-backports qemu) || true
    tarball=$(ls "$work"/qemu_"$ver"*.orig.tar.xz 2>/dev/null | head -n1 || true)
    [ -n "$tarball" ] || { echo "qemu-fork: could not fetch qemu_$ver*.orig.tar.xz" >&2; exit 1; }
fi
if [ ! -d "$src" ]; then
    echo "qemu-fork: unpacking $(basename "$tarball")"
    tar -C "$work" -xf "$tarball"
    [ -d "$src" ] || mv "$work"/qemu-"$ver"* "$src"
fi

applied=0
while read -r p; do
    case "$p" in ''|'#'*) continue ;; esac
    if patch -d "$src" -p1 --forward --dry-run -s < "$here/patches/$p" >/dev/null; then
        patch -d "$src" -p1 --forward -s < "$here/patches/$p"
    elif patch -d "$src" -p1 -R --dry-run -s < "$here/patches/$p" >/dev/null; then
        : # already applied
    else
        echo "qemu-fork: patch $p does not apply to QEMU $ver" >&2
        exit 1
    fi
    applied=$((applied + 1))
done < "$here/patches/series"
echo "qemu-fork: $applied patches in the series apply to QEMU $ver"
[ "$mode" = --check ] && exit 0

export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends libfdt-dev libglib2.0-dev libpixman-1-dev ninja-build \
    python3-venv pkg-config flex bison libslirp-dev
[ -x "$work/venv/bin/meson" ] || { python3 -m venv "$work/venv" && "$work/venv/bin/pip" install -q 'meson>=1.5' pycotap; }
# The +ds tarball drops prebuilt firmware that the build still lists: empty stand-ins.
for f in edk2-aarch64-code.fd edk2-arm-code.fd edk2-arm-vars.fd edk2-i386-code.fd edk2-i386-secure-code.fd \
         edk2-i386-vars.fd edk2-x86_64-code.fd edk2-x86_64-secure-code.fd edk2-riscv-code.fd edk2-riscv-vars.fd \
         edk2-loongarch64-code.fd edk2-loongarch64-vars.fd; do
    [ -e "$src/pc-bios/$f.bz2" ] || [ -e "$src/pc-bios/$f" ] || : > "$src/pc-bios/$f"
done
cd "$src"
PATH=$work/venv/bin:$PATH ./configure --target-list=x86_64-softmmu --disable-docs --disable-install-blobs \
    --disable-werror --enable-slirp
PATH=$work/venv/bin:$PATH ninja -C build qemu-system-x86_64
echo "qemu-fork: built $src/build/qemu-system-x86_64"
