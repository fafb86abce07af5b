#!/usr/bin/env bash
# The svff demo. Runs inside the lab's L1 (started by `make demo`): svff's two functions, init
# and reconf, on the real kernel with two VMs that svff starts and supervises (svff-vmm):
#   vm "test":  svff-vmm's built-in test guest, reading its VFs' BAR0 in a loop;
#   vm "linux": the lab's Debian kernel with a busybox init that watches its VFs.
# The nvme PF (nvme profile: VFs are NVMe secondary controllers, online, BAR0 = CAP) gives 4 VFs,
# two to each VM. Then a reconf in pause mode (4 -> 5 VFs: the guests keep their VFs) and one
# in detach mode (5 -> 4, the paper's baseline: every VF removed and added back), each guest's
# own view of both from its serial console, and the timings side by side.
set -euo pipefail
[ "${SVFF_LAB:-}" = 1 ] || { echo "demo.sh runs inside the lab: use 'make demo'" >&2; exit 2; }
command -v svff >/dev/null || { echo "svff is not built: make build" >&2; exit 1; }
VMM=$(dirname "$(command -v svff)")/svff-vmm
[ -x "$VMM" ] || { echo "$VMM is not built: make build" >&2; exit 1; }

step() { printf '\n=== %s\n' "$*"; }
PF=$SVFF_LAB_NVME_PF
D=/sys/bus/pci/devices/$PF
KERNEL=/boot/vmlinuz-$(uname -r)
echo "svff demo in L1: kernel $(uname -r), $(nproc) vCPU(s); nvme PF $PF ($(cat "$D/sriov_totalvfs") VFs max)"

dir=$(mktemp -d /tmp/svff-demo.XXXXXX)
state=$dir/state
# svff and svff-vmm copied into L1's RAM: from the 9p host root every call pages them in again.
mkdir "$dir/bin"; cp "$(command -v svff)" "$VMM" "$dir/bin/"
SVFF=$dir/bin/svff VMM=$dir/bin/svff-vmm
cleanup() {
    for vm in test linux; do
        pid=$(cut -d' ' -f1 "$state/vm-$vm.pid" 2>/dev/null || true)
        [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    done
    sleep 0.5
    [ -e "$D/driver" ] && echo 0 > "$D/sriov_numvfs" 2>/dev/null || true
    [ -e "$D/driver" ] && echo "$PF" > "$D/driver/unbind" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

step "Kernel modules: nvme (the PF's driver), vfio-pci, kvm-amd"
if [ -e "$D/driver" ]; then echo 0 > "$D/sriov_numvfs"; echo "$PF" > "$D/driver/unbind"; fi
modprobe vfio-pci; modprobe kvm-amd; modprobe nvme

step "The Linux guest's initramfs (busybox; its init watches every nvme VF it sees)"
root=$dir/linux-root
mkdir -p "$root"/{bin,proc,sys,dev,tmp}
cp /bin/busybox "$root/bin/busybox"
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "svff-linux: up, $(grep -c ^processor /proc/cpuinfo) cpu"
# Per VF: config space read live (all-ones: gone), BAR0 (from its live BAR register) read with
# devmem: CAP. One line when a VF's state changes, a summary every 10 rounds.
r=0
while :; do
  r=$((r+1))
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor):$(cat $d/device)" = 0x1b36:0x0010 ] || continue
    b=${d##*/}; b=${b#0000:}
    id=$(od -An -tx4 -N4 $d/config | tr -d ' ')
    if [ "$id" = ffffffff ]; then st=gone; cap=; else
      [ "$(cat /tmp/$b.st 2>/dev/null)" = present ] || printf '\006\000' | dd of=$d/config bs=1 seek=4 conv=notrunc 2>/dev/null
      lo=$(od -An -tx4 -j16 -N4 $d/config | tr -d ' '); hi=$(od -An -tx4 -j20 -N4 $d/config | tr -d ' ')
      a=$(( (0x$hi << 32) | (0x$lo & 0xfffffff0) ))
      cap=$(devmem $(printf 0x%x $a) 32 2>/dev/null || echo '?')
      st=present
    fi
    ok=$(cat /tmp/$b.ok 2>/dev/null || echo 0); ones=$(cat /tmp/$b.ones 2>/dev/null || echo 0)
    if [ $st = present ] && [ "$cap" != 0xFFFFFFFF ] && [ "$cap" != '?' ]; then ok=$((ok+1)); else ones=$((ones+1)); fi
    echo $ok > /tmp/$b.ok; echo $ones > /tmp/$b.ones
    if [ "$(cat /tmp/$b.st 2>/dev/null)" != $st ]; then
      echo "svff-linux: t=$(cut -d' ' -f1 /proc/uptime) dev=$b event=$st cap=${cap:-}"
      echo $st > /tmp/$b.st
    fi
    [ $((r % 10)) = 0 ] && echo "svff-linux: t=$(cut -d' ' -f1 /proc/uptime) dev=$b round=$r ok=$ok bad=$ones last=$st cap=${cap:-}"
  done
done
INIT
chmod 755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet > "$dir/linux.cpio")
echo "    $dir/linux.cpio ($(du -k "$dir/linux.cpio" | cut -f1) KiB), kernel $KERNEL"

cat > "$dir/helper.toml" <<TOML
allowed_uids = [0]
state_dir = "$state"

[[pf]]
bdf = "$PF"
profile = "nvme"                 # PF on the kernel's nvme driver, VFs online with 2 VQ / 1 VI
vfs = 4
nvme = { vq = 2, vi = 1 }

[[vm]]
name = "test"
kind = "svff-vmm"                # svff starts and supervises it
qmp = "$dir/test.qmp"
command = ["/usr/bin/nice", "-n", "19", "$VMM", "--memory", "32M", "--test-devices", "0", "--guest-report-every", "20"]
vfs = [{ pf = "$PF", count = 2 }]

[[vm]]
name = "linux"
kind = "svff-vmm"
qmp = "$dir/linux.qmp"
command = ["/usr/bin/nice", "-n", "19", "$VMM", "--memory", "256M", "--kernel", "$KERNEL", "--initrd", "$dir/linux.cpio"]
vfs = [{ pf = "$PF", count = 2 }]
TOML
step "Config ($dir/helper.toml)"
sed 's/^/    /' "$dir/helper.toml"
S=("$SVFF" --direct --config "$dir/helper.toml")

serial() { cat "$state/vm-$1.serial" 2>/dev/null || true; }
lines() { serial "$1" | wc -l; }
# wait_for VM REGEX SECONDS
wait_for() {
    for _ in $(seq $(( $3 * 10 ))); do serial "$1" | grep -Eq "$2" && return 0; sleep 0.1; done
    echo "    $1 did not print /$2/ within $3 s; its console:"; serial "$1" | tail -n 20 | sed 's/^/      /'
    return 1
}
# The guests' own view of what happened since line $2 of VM $1's console.
view() {
    local vm=$1 from=$2
    echo "  $vm (its serial console since the reconf began):"
    serial "$vm" | tail -n +"$((from + 1))" | grep -E 'event=' | sed 's/^/      /' | head -n 20 || true
    local ev; ev=$(serial "$vm" | tail -n +"$((from + 1))" | grep -c 'event=' || true)
    [ "$ev" = 0 ] && echo "      (no event: no VF went away)"
    for dev in $(serial "$vm" | grep -oE 'dev=00:[0-9a-f]{2}\.[0-7]' | sort -u | cut -d= -f2); do
        serial "$vm" | grep -E "dev=$dev (round|reads)=|dev=$dev round" | tail -n 1 | sed 's/^/      last: /'
    done
}

step "svff init: 4 VFs on vfio-pci, svff starts both VMMs with their VFs"
"${S[@]}" init
"${S[@]}" status --pf "$PF" | sed 's/^/    /'
echo "    waiting for the guests: the test guest's first reports, Linux's first look at its VFs ..."
wait_for test 'dev=00:02.0 round=' 120
t0=$(date +%s)
wait_for linux 'svff-linux: .*dev=00:02.0 event=present' 300
echo "    Linux guest up and reading its VFs ($(( $(date +%s) - t0 )) s after the test guest)"
echo "  test guest:"; serial test | grep -E '^svff-guest: (found|enumerated)' | sed 's/^/      /'
echo "  linux guest:"; serial linux | grep -E '^svff-linux: .*event=' | sed 's/^/      /'

step "svff init again: nothing to do"
"${S[@]}" init

reconf() { # MODE N -> JSON file
    local mode=$1 n=$2 out=$dir/reconf-$1.json
    local ft fl; ft=$(lines test); fl=$(lines linux)
    "${S[@]}" reconf --pf "$PF" --vfs "$n" --mode "$mode" --json > "$out"
    jq -r '.changes[] | "    " + .' "$out"
    # Let each guest report after it (its next lines), then show what it saw.
    local tr; tr=$(serial test | grep -c 'round=' || true)
    for _ in $(seq 600); do [ "$(serial test | grep -c 'round=')" -gt $((tr + 2)) ] && break; sleep 0.1; done
    local lr; lr=$(serial linux | grep -c 'round=' || true)
    for _ in $(seq 900); do [ "$(serial linux | grep -c 'round=')" -gt $((lr + 2)) ] && break; sleep 0.1; done
    view test "$ft"; view linux "$fl"
}

step "svff reconf --vfs 5 --mode pause: every VF paused, 4 -> 0 -> 5, unpaused onto its new VF"
reconf pause 5
step "svff reconf --vfs 4 --mode detach (the paper's baseline): device_del, 5 -> 0 -> 4, device_add"
reconf detach 4

step "Timings side by side (ms; a per-VM step: its slowest VM, the VMs run in parallel)"
sum() { jq -r --arg s "$2" '[.steps[] | select(.name == $s) | .ms] | if length == 0 then "-" else (max | floor | tostring) end' "$1"; }
# Steps only: a VM's `pause.*` / `unpause.*` entries are sub-steps (the VMM's own timings) inside its step.
total() { jq -r '[.steps[] | select(.name | contains(".") | not)] as $s | [$s[] | select(.vm == null) | .ms] as $g | [$s[] | select(.vm != null)] | group_by(.name) | map(map(.ms) | max) | add + ($g | add) | floor' "$1"; }
printf '    %-16s %10s %10s\n' step pause detach
for st in connect pause remove_vf change_numvfs bind_vfs unpause add_vf table; do
    printf '    %-16s %10s %10s\n' "$st" "$(sum "$dir/reconf-pause.json" $st)" "$(sum "$dir/reconf-detach.json" $st)"
done
printf '    %-16s %10s %10s\n' total "$(total "$dir/reconf-pause.json")" "$(total "$dir/reconf-detach.json")"
echo "    (pause/unpause/remove_vf/add_vf: the slowest VM; the guests kept their VFs only in pause mode)"

step "svff status: the assignment table with each VF's state as its VMM reports it"
"${S[@]}" status --pf "$PF" | sed 's/^/    /'
step "Clean up: VMMs stopped, the PF back to 0 VFs"
exit 0
