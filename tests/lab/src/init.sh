#!/bin/busybox sh
# PID 1 of the svff lab's L1 host. Mounts the L0 root (read-only 9p) and runs the svff-lab
# agent chrooted in it, so L1 uses L0's userland and freshly built binaries at the same paths.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
fail() { echo "svff-lab-init: $*"; echo "svff-lab-init: FATAL"; poweroff -f; }
for m in $(cat /modules.order); do insmod "/modules/$m" || fail "insmod $m failed"; done
agent=; mode=run; keep=
for w in $(cat /proc/cmdline); do
    case "$w" in
        svff.agent=*) agent=${w#svff.agent=} ;;
        svff.mode=*) mode=${w#svff.mode=} ;;
        svff.keep=*) keep="$keep ${w#svff.keep=}" ;;
    esac
done
R=/host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 host $R || fail "cannot mount the L0 root over 9p"
mount -t proc proc $R/proc || fail "mount proc"
mount -t sysfs sysfs $R/sys || fail "mount sysfs"
mount -o bind /dev $R/dev || fail "bind /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts $R/dev/pts || fail "mount devpts"
mount -t tmpfs tmpfs $R/dev/shm || fail "mount /dev/shm"
# A second view of the L0 root that the tmpfs mounts below do not cover.
mkdir -p /l0 && mount -o bind $R /l0 || fail "bind the L0 root"
for d in /tmp /run /var/tmp /root; do mount -t tmpfs -o mode=1777 tmpfs $R$d || fail "tmpfs $d"; done
# The host's workspace (and cwd) may live under one of those, e.g. a clone in /tmp: show it again.
for k in $keep; do
    case "$k" in
        /tmp/*|/run/*|/var/tmp/*|/root/*)
            [ -d "/l0$k" ] || continue
            mkdir -p "$R$k" && mount -o bind "/l0$k" "$R$k" || fail "bind $k" ;;
    esac
done
[ -x "$R$agent" ] || fail "agent $agent not found in the L0 root"
echo "svff-lab-init: starting agent $agent"
HOME=/root chroot $R "$agent" agent &
if [ "$mode" = shell ]; then
    echo "svff-lab: L1 shell (the L0 root, read-only, with fresh /tmp). Exit the shell to power off."
    setsid cttyhack chroot $R /bin/bash -l
    poweroff -f
fi
while :; do sleep 3600; done
