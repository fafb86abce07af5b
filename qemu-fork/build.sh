#!/usr/bin/env bash
# Builds svff's QEMU: upstream QEMU (Debian's orig tarball, sha256 pinned below) + patches/series +
# vfio-pause's staticlib, configured for x86_64-softmmu with KVM only. The result is cached under
# ${SVFF_QEMU_CACHE:-~/.cache/svff-qemu}/<hash of the inputs>/ and its path printed on the last
# line of stdout. See README.md.
#
# Usage: build.sh            build (or reuse the cached build); prints the binary's path
#        build.sh --check    fetch, verify and check that the series applies; no build
#        build.sh --path     print the binary's path if it is cached, exit 1 otherwise (no build)
#        build.sh --key      print the hash of the inputs (no fetch, no build)
# Every build (or cache hit) also copies the binary to <workspace>/target/svff-qemu/, with the key
# beside it, where lab tests find it (L1 sees the workspace, not ~/.cache of root).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
mode=${1:-build}

# The source: QEMU 10.2.2, Debian's +ds orig tarball (sha256 from the .dsc of qemu 1:10.2.2+ds-1).
ver=10.2.2
debver=1:10.2.2+ds-1
tarball_name=qemu_${ver}+ds.orig.tar.xz
tarball_sha256=be05230fe47a6937cd29f28f562932c8125f9c93c2a82c625198f7a4aa601dfb

cache=${SVFF_QEMU_CACHE:-${HOME:-/root}/.cache/svff-qemu}
dl=$cache/downloads
log() { echo "qemu-fork: $*" >&2; }
[ "$mode" = --key ] || mkdir -p "$dl"

tarball=$dl/$tarball_name
if [ "$mode" = --key ]; then
    :
elif [ ! -f "$tarball" ] || ! echo "$tarball_sha256  $tarball" | sha256sum -c --status; then
    rm -f "$tarball"
    log "fetching $tarball_name (apt-get source qemu=$debver)"
    offered() { apt-cache showsrc qemu 2>/dev/null | grep " $tarball_sha256 .*$tarball_name" >/dev/null; }
    if ! offered; then
        # Enable deb-src (only) for the suites carrying 10.2.2 by copying the first stanza of
        # the machine's Debian source, as scripts/deps.sh does: svff never names a mirror.
        srcs=/etc/apt/sources.list.d/debian.sources
        mine=/etc/apt/sources.list.d/svff-qemu-src.sources
        if [ "$(id -u)" -eq 0 ] && [ -f "$srcs" ] && [ ! -f "$mine" ]; then
            awk 'BEGIN{RS=""; FS="\n"} NR==1 { for (i = 1; i <= NF; i++) {
                    if ($i ~ /^Suites:/) print "Suites: forky sid";
                    else if ($i ~ /^Types:/) print "Types: deb-src";
                    else if ($i ~ /^#/) continue;
                    else print $i } }' "$srcs" > "$mine"
            log "enabled deb-src for forky and sid in $mine"
            apt-get update -q >&2
        fi
    fi
    if ! offered; then
        log "no deb-src source offers $tarball_name (qemu $debver, forky/sid): copy the first"
        log "  stanza of /etc/apt/sources.list.d/debian.sources with 'Types: deb-src' and"
        log "  'Suites: forky sid' into a new .sources file, then apt-get update"
        exit 1
    fi
    tmp=$(mktemp -d "$dl/apt.XXXXXX")
    # Only the orig tarball is needed; the Debian packaging parts may be absent from the mirror,
    # so apt-get's status is not the test: the checksum of the tarball is.
    (cd "$tmp" && apt-get source --download-only "qemu=$debver" >&2) || true
    [ -f "$tmp/$tarball_name" ] && mv "$tmp/$tarball_name" "$tarball"
    rm -rf "$tmp"
    [ -f "$tarball" ] || { log "could not fetch $tarball_name"; exit 1; }
fi
[ "$mode" = --key ] || echo "$tarball_sha256  $tarball" | sha256sum -c --status ||
    { log "$tarball: sha256 differs from the pinned $tarball_sha256"; exit 1; }

patches=()
while read -r p; do
    case "$p" in '' | '#'*) continue ;; esac
    [ -f "$here/patches/$p" ] || { log "patches/series names a missing patch $p"; exit 1; }
    patches+=("$here/patches/$p")
done < "$here/patches/series"

apply_series() { # $1: source dir
    local p
    for p in "${patches[@]}"; do
        patch -d "$1" -p1 --forward --quiet --no-backup-if-mismatch < "$p" >&2 ||
            { log "patch $(basename "$p") does not apply to QEMU $ver"; return 1; }
    done
}

if [ "$mode" = --check ]; then
    tmp=$(mktemp -d "$cache/check.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    tar -C "$tmp" -xf "$tarball"
    apply_series "$tmp/qemu-$ver"
    log "${#patches[@]} patches in the series apply to QEMU $ver"
    exit 0
fi

# The staticlib (crate-type includes "staticlib" in vfio-pause/Cargo.toml).
if [ "$mode" = build ]; then
    log "building libvfio_pause.a (cargo build -p vfio-pause --release)"
    (cd "$root" && ${CARGO:-cargo} build -q -p vfio-pause --release >&2)
fi
lib=$root/target/release/libvfio_pause.a
header=$root/vfio-pause/include/vfio_pause.h
schema=$root/qmp-ext/qapi/svff.json
[ -f "$lib" ] || { log "no $lib (build it with cargo build -p vfio-pause --release)"; exit 1; }

# Configure flags: x86_64-softmmu with KVM, nothing svff does not need. QEMU's own Rust stays off:
# a second Rust staticlib beside it would duplicate std's symbols.
flags=(--target-list=x86_64-softmmu --enable-kvm --disable-tcg --disable-rust --disable-docs --disable-tools
    --disable-guest-agent --disable-user --disable-gtk --disable-sdl --disable-vnc --disable-opengl
    --disable-spice --disable-curses --disable-xen --disable-libusb --disable-usb-redir
    --disable-install-blobs --disable-werror --disable-debug-info --enable-slirp
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu)

# Two keys: `tree` names a configured QEMU build tree (source tarball and configure flags), `key`
# the binary (everything: the tree's key, build.sh, the series, the schema, the library and its
# header). The tree is kept and the patched source synced into it by content, so a changed patch
# recompiles only the files it changes and a new libvfio_pause.a (every clone's differs: rustc
# records paths) only re-links.
tree_key=$( {
    echo "$tarball_sha256"
    printf '%s\n' "${flags[@]}"
    echo "tree layout 2: source synced by content"
} | sha256sum | cut -c1-16)
key=$( {
    echo "$tree_key"
    sha256sum "$here/build.sh" "$here/patches/series" "${patches[@]}" "$schema" "$lib" "$header" |
        cut -d' ' -f1
} | sha256sum | cut -c1-16)
[ "$mode" = --key ] && { echo "$key"; exit 0; }
out=$cache/$key
bin=$out/bin/qemu-system-x86_64
publish() { # copy for the lab tests, atomically
    local d=$root/target/svff-qemu
    mkdir -p "$d"
    cp "$bin" "$d/.qemu-system-x86_64.tmp" && mv "$d/.qemu-system-x86_64.tmp" "$d/qemu-system-x86_64"
    echo "$key" > "$d/key"
}
if [ -x "$bin" ]; then
    log "cached build $key"
    [ "$mode" = --path ] || publish
    echo "$bin"
    exit 0
fi
[ "$mode" = --path ] && { log "no cached build for these inputs ($key)"; exit 1; }

# Build needs (Debian packages, and meson>=1.5 + pycotap from PyPI: the +ds tarball drops the
# Python wheels QEMU bundles, and Debian 12's meson is 1.0; it also drops the prebuilt dtbs, which
# dtc from device-tree-compiler then builds).
need=()
for p in libfdt-dev libglib2.0-dev libpixman-1-dev ninja-build python3-venv pkg-config flex bison \
    device-tree-compiler \
    libslirp-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
venv=$cache/venv
[ -x "$venv/bin/meson" ] || {
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q 'meson>=1.5,<2' 'pycotap>=1.1' >&2
}

# The build tree: configured once per tree key and kept. Every build unpacks and patches a fresh
# source next to it and syncs it into the tree by content: only files whose bytes changed are
# written (so ninja rebuilds exactly what depends on them), files an earlier series added and this
# one does not are deleted (the manifest lists what the last sync wrote; configure's own files in
# the source dir are not in it). The library and header are copied to fixed paths inside the
# tree, also only when they differ.
tree=$cache/tree-$tree_key
src=$tree/qemu-$ver
exec 9>"$cache/tree-$tree_key.lock"
flock 9
[ -f "$tree/configured" ] || rm -rf "$tree"
mkdir -p "$tree/svff/include"
fresh=$tree/fresh
rm -rf "$fresh"
mkdir -p "$fresh"
log "unpacking $tarball_name and applying the series"
tar -C "$fresh" -xf "$tarball"
# The svff QMP schema is maintained in qmp-ext and included unchanged (patch 0003 includes it).
cp "$schema" "$fresh/qemu-$ver/qapi/svff.json"
apply_series "$fresh/qemu-$ver"
log "${#patches[@]} patches applied"
if [ ! -d "$src" ]; then
    mv "$fresh/qemu-$ver" "$src"
    (cd "$src" && find . -type f -o -type l | sort) > "$tree/manifest"
else
    python3 - "$fresh/qemu-$ver" "$src" "$tree/manifest" >&2 <<'PY'
import filecmp, os, shutil, sys
new, dst, manifest = sys.argv[1:4]
files = []
for d, dirs, names in os.walk(new):
    for n in names + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
        files.append(os.path.relpath(os.path.join(d, n), new))
files.sort()
changed = 0
for f in files:
    a, b = os.path.join(new, f), os.path.join(dst, f)
    if os.path.islink(a):
        if os.path.islink(b) and os.readlink(a) == os.readlink(b):
            continue
    elif os.path.isfile(b) and not os.path.islink(b) and filecmp.cmp(a, b, shallow=False):
        continue
    os.makedirs(os.path.dirname(b), exist_ok=True)
    if os.path.lexists(b):
        os.remove(b)
    shutil.copy2(a, b, follow_symlinks=False)
    os.utime(b, follow_symlinks=False)  # newer than every object built from the old bytes
    changed += 1
    print(f"qemu-fork: synced {f}", file=sys.stderr)
old = set(open(manifest).read().split("\n")) - {""} if os.path.exists(manifest) else set()
gone = sorted(old - {"./" + f for f in files})
for f in gone:
    p = os.path.join(dst, f)
    if os.path.lexists(p):
        os.remove(p)
        print(f"qemu-fork: removed {f}", file=sys.stderr)
with open(manifest, "w") as m:
    m.write("".join("./" + f + "\n" for f in files))
print(f"qemu-fork: {changed} files synced, {len(gone)} removed", file=sys.stderr)
PY
fi
rm -rf "$fresh"
cmp -s "$lib" "$tree/svff/libvfio_pause.a" || cp "$lib" "$tree/svff/libvfio_pause.a"
cmp -s "$header" "$tree/svff/include/vfio_pause.h" || cp "$header" "$tree/svff/include/vfio_pause.h"
if [ ! -f "$tree/configured" ]; then
    t0=$(date +%s)
    (cd "$src" && PATH=$venv/bin:$PATH ./configure "${flags[@]}" \
        "-Dsvff_vfio_pause=$tree/svff/libvfio_pause.a" "-Dsvff_vfio_pause_include=$tree/svff/include" >&2)
    t1=$(date +%s)
    printf 'configure_s=%s\n' "$((t1 - t0))" > "$tree/configure-time"
    touch "$tree/configured"
else
    log "reusing the configured build tree $tree"
fi
t1=$(date +%s)
PATH=$venv/bin:$PATH ninja -C "$src/build" qemu-system-x86_64 >&2
t2=$(date +%s)
log "ninja $((t2 - t1)) s ($(cat "$tree/configure-time"))"
work=$out.tmp
rm -rf "$work"
mkdir -p "$work/bin"
cp "$src/build/qemu-system-x86_64" "$work/bin/"
printf '%s\nninja_s=%s\nnproc=%s\nloadavg=%s\n' "$(cat "$tree/configure-time")" "$((t2 - t1))" \
    "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" > "$work/build-times"
rm -rf "$out"
mv "$work" "$out"
publish
echo "$bin"
