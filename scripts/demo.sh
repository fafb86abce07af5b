#!/usr/bin/env bash
# The svff demo. Runs inside the lab's L1 (started by `make demo`): shows the emulated SR-IOV
# PFs and changes their VF configuration on the real kernel, the way svff's helper does it.
set -euo pipefail
[ "${SVFF_LAB:-}" = 1 ] || { echo "demo.sh runs inside the lab: use 'make demo'" >&2; exit 2; }

step() { printf '\n=== %s\n' "$*"; }
ms() { date +%s%N; }
took() { echo "    ($(( ($(ms) - $1) / 1000000 )) ms)"; }
have_svff() { command -v svff >/dev/null 2>&1; }

PF=$SVFF_LAB_NVME_PF
IGB=$SVFF_LAB_IGB_PF
echo "svff demo in L1: kernel $(uname -r), $(nproc) vCPUs; emulated PFs: igb $IGB, nvme $PF"

step "Load the kernel modules svff uses (pci-pf-stub, vfio-pci)"
modprobe pci-pf-stub; modprobe vfio-pci
echo "    loaded: $(lsmod | awk '$1 ~ /^(pci_pf_stub|vfio_pci|vfio)$/ {print $1}' | tr '\n' ' ')"

if have_svff; then
    dir=$(mktemp -d /tmp/svff-demo.XXXXXX)
    sock=$dir/helper.sock
    cat > "$dir/helper.toml" <<TOML
socket = "$sock"
allowed_uids = [0]
vf_drivers = ["vfio-pci"]

[[pf]]
bdf = "$PF"
driver = "pci-pf-stub"

[[pf]]
bdf = "$IGB"
driver = "igb"
TOML
    step "Start the privileged helper daemon (svff helper), config:"
    sed 's/^/    /' "$dir/helper.toml"
    svff helper --config "$dir/helper.toml" 2> "$dir/helper.log" &
    helper=$!
    # The helper dies of the SIGTERM, so `wait` returns 143: under `set -e` a bare `wait` would
    # end the trap (and the demo) with that status after a successful run.
    stop_helper() { kill "$helper" 2>/dev/null || true; wait "$helper" 2>/dev/null || true; rm -rf "$dir"; }
    trap stop_helper EXIT
    for _ in $(seq 100); do [ -S "$sock" ] && break; kill -0 $helper 2>/dev/null || break; sleep 0.1; done
    [ -S "$sock" ] || { echo "helper did not start:"; cat "$dir/helper.log"; exit 1; }
    S=(--socket "$sock")

    step "svff status (through the daemon)"
    svff "${S[@]}" status
    for n in 4 8 2; do
        step "svff vfs set --pf $PF $n --bind vfio-pci   (through 0 when VFs exist)"
        t=$(ms); svff "${S[@]}" vfs set --pf "$PF" "$n" --bind vfio-pci; took "$t"
    done
    step "svff status (after)"
    svff "${S[@]}" status --pf "$PF"
    step "Ask for more VFs than the PF has: a clear error, nothing changed"
    svff "${S[@]}" vfs set --pf "$PF" 65 || true
    echo "    sriov_numvfs is still $(cat "/sys/bus/pci/devices/$PF/sriov_numvfs")"
    step "Clean up: back to 0 VFs"
    svff "${S[@]}" vfs set --pf "$PF" 0
    step "What the daemon logged (per-step timings)"
    sed 's/^/    /' "$dir/helper.log" | tail -n 12
    exit 0
fi

# The same steps straight on sysfs, as the kernel sees them.
D=/sys/bus/pci/devices/$PF
step "Bind the nvme PF to pci-pf-stub"
echo pci-pf-stub > "$D/driver_override"; echo "$PF" > /sys/bus/pci/drivers_probe
echo "    $PF driver: $(basename "$(readlink "$D/driver")"), sriov_totalvfs=$(cat "$D/sriov_totalvfs")"
echo 0 > "$D/sriov_drivers_autoprobe"
for n in 4 8 2; do
    cur=$(cat "$D/sriov_numvfs")
    step "Change the VF count $cur -> $n (through 0: the kernel refuses non-zero -> non-zero)"
    if [ "$cur" != 0 ]; then
        if echo "$n" > "$D/sriov_numvfs" 2>/dev/null; then echo "    unexpected: direct change accepted"; else echo "    direct $cur -> $n: refused by the kernel (EBUSY), as expected"; fi
        t=$(ms); echo 0 > "$D/sriov_numvfs"; echo -n "    $cur -> 0"; took "$t"
    fi
    t=$(ms); echo "$n" > "$D/sriov_numvfs"; echo -n "    0 -> $n"; took "$t"
    t=$(ms)
    for l in "$D"/virtfn*; do
        vf=$(basename "$(readlink "$l")")
        echo vfio-pci > "/sys/bus/pci/devices/$vf/driver_override"; echo "$vf" > /sys/bus/pci/drivers_probe
    done
    echo -n "    bound $n VFs to vfio-pci"; took "$t"
    for l in "$D"/virtfn*; do
        vf=$(basename "$(readlink "$l")")
        g=$(basename "$(readlink "/sys/bus/pci/devices/$vf/iommu_group")")
        echo "    $(basename "$l") = $vf  driver=$(basename "$(readlink "/sys/bus/pci/devices/$vf/driver")")  /dev/vfio/$g $([ -e "/dev/vfio/$g" ] && echo present)"
    done
done
step "Clean up: back to 0 VFs"
echo 0 > "$D/sriov_numvfs"
echo "    sriov_numvfs=$(cat "$D/sriov_numvfs")"
