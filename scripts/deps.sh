#!/usr/bin/env bash
# Installs what svff's build, tests and lab need on Debian 12 (bookworm). Idempotent: when every
# package is already installed it does nothing and touches no apt state.
#
# QEMU 10.0 and Linux 6.12 come from the bookworm-backports suite. The suite is enabled by copying
# the machine's own Debian source stanza (so svff never names a mirror itself).
set -euo pipefail

# Packages from bookworm-backports (the lab's L0 QEMU and the L1 kernel).
BACKPORTS_PKGS=(qemu-system-x86 linux-image-amd64)
# Packages from the base suites.
BASE_PKGS=(busybox-static kmod python3 iverilog verilator tcl cpio gzip g++ util-linux systemd)
# libvirt 9.0 for VMs of kind `libvirt` (pf-helper feature `libvirt`, lab_libvirt): the daemon
# with its QEMU driver, virsh, and the headers the `virt` crate builds against. Not
# libvirt-daemon-system: the lab starts libvirtd itself (no systemd units, no default network).
BASE_PKGS+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config)

missing=()
for p in "${BACKPORTS_PKGS[@]}" "${BASE_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# The backports kernel/QEMU must be the 6.12 / 10.0 series, not bookworm's own.
if ! ls /boot/vmlinuz-6.12.* >/dev/null 2>&1; then missing+=(linux-image-amd64); fi
# libvirtd's state directories (libvirt-daemon-system would create them): L1 sees this root
# read-only and mounts a tmpfs on each, so they must exist as mount points.
libvirt_dirs() {
    for d in /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
        [ -d "$d" ] || mkdir -p "$d" 2>/dev/null || echo "deps: cannot create $d (run as root)" >&2
    done
}
if [ ${#missing[@]} -eq 0 ]; then
    libvirt_dirs
    echo "deps: all packages present"
    exit 0
fi

echo "deps: missing: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
    echo "deps: installing needs root; run: sudo bash scripts/deps.sh" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "deps: apt-get not found; svff's lab needs Debian 12 (bookworm) or install by hand:" >&2
    echo "      ${BACKPORTS_PKGS[*]} (>= QEMU 10.0, Linux 6.12) ${BASE_PKGS[*]}" >&2
    exit 1
fi

bp=/etc/apt/sources.list.d/svff-bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    src=/etc/apt/sources.list.d/debian.sources
    if [ -f "$src" ]; then
        # First stanza of the machine's Debian source, with the suite and types replaced.
        awk 'BEGIN{RS=""; FS="\n"} NR==1 {
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^Suites:/) print "Suites: bookworm-backports";
                    else if ($i ~ /^Types:/) print "Types: deb deb-src";
                    else if ($i ~ /^#/) continue;
                    else print $i
                }
            }' "$src" > "$bp"
    elif [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $0 ~ /bookworm/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' /etc/apt/sources.list)
        [ -n "$uri" ] || { echo "deps: no Debian bookworm source found in /etc/apt" >&2; exit 1; }
        printf 'Types: deb deb-src\nURIs: %s\nSuites: bookworm-backports\nComponents: main\n' "$uri" > "$bp"
    else
        echo "deps: no Debian apt source found to derive bookworm-backports from" >&2
        exit 1
    fi
    echo "deps: enabled bookworm-backports in $bp"
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends -t bookworm-backports "${BACKPORTS_PKGS[@]}"
apt-get install -y -q --no-install-recommends "${BASE_PKGS[@]}"
libvirt_dirs
echo "deps: installed"
