#!/bin/busybox sh
# PID 1 of an svff lab L2 guest. Mounts the basics, runs the test's setup script, then serves
# commands on the control channel named by svff.ctl= (a virtio-serial port name or a tty):
#   host -> guest: "<nonce> <base64 of a sh script>"
#   guest -> host: "@@svff ready <uname -r>" once, then per command
#                  "@@<nonce> o <base64 line of stdout>" ..., "@@<nonce> e <base64 of stderr>" ...,
#                  "@@<nonce> x <exit status>".
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1
say() { echo "svff-l2: $*"; }
fail() { say "FATAL: $*"; poweroff -f; }
ctl=
for w in $(cat /proc/cmdline); do
    case "$w" in svff.ctl=*) ctl=${w#svff.ctl=} ;; esac
done
[ -n "$ctl" ] || fail "no svff.ctl= on the kernel command line"
dev=
case "$ctl" in
    virtio:*)
        # Ports appear once the VMM announces them: wait for it, bounded (20 s).
        name=${ctl#virtio:}
        i=0
        while [ -z "$dev" ] && [ $i -lt 200 ]; do
            for p in /sys/class/virtio-ports/*; do
                [ "$(cat "$p/name" 2>/dev/null)" = "$name" ] && dev=/dev/${p##*/}
            done
            [ -n "$dev" ] || { i=$((i + 1)); sleep 0.1; }
        done ;;
    *)
        dev=/dev/$ctl
        stty -F "$dev" raw -echo 2>/dev/null ;;
esac
[ -n "$dev" ] && [ -c "$dev" ] || fail "control channel $ctl not found"
exec 3<>"$dev"
if [ -f /svff-setup.sh ]; then
    sh /svff-setup.sh
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "@@svff failed $rc" >&3
        fail "setup script exited with $rc"
    fi
fi
echo "@@svff ready $(uname -r)" >&3
while :; do
    while read -r nonce b64 <&3; do
        [ -n "$nonce" ] || continue
        echo "$b64" | base64 -d >/tmp/.svff-cmd.sh
        sh /tmp/.svff-cmd.sh </dev/null >/tmp/.svff-out 2>/tmp/.svff-err
        rc=$?
        {
            base64 /tmp/.svff-out | sed "s/^/@@$nonce o /"
            base64 /tmp/.svff-err | sed "s/^/@@$nonce e /"
            echo "@@$nonce x $rc"
        } >&3
    done
    # End of file: the host side is not connected (yet, or any more). Look again shortly.
    sleep 1
done
