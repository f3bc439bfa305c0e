#!/bin/sh
# PID 1 of the softrdma interop VM (kernel command line: init=/usr/local/sbin/softrdma-vm-init).
#
# No systemd: mount the API file systems, configure the one NIC with a static
# address, load Soft-RoCE and add rxe0 on that NIC, then hand PID 1 over to
# tini running the command agent (vmagent.py) on the virtio-serial port.
# Parameters come from the kernel command line:
#   softrdma.ip=10.77.0.1/24 softrdma.mtu=1500 softrdma.rxe=rxe0
# Every step is logged to the console and to /run/softrdma-init.log; a failing
# step does not stop the agent, so the host can still look inside.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mountpoint -q /run || mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /dev/shm
mountpoint -q /dev/pts || mount -t devpts devpts /dev/pts
mountpoint -q /dev/shm || mount -t tmpfs tmpfs /dev/shm
mountpoint -q /tmp || mount -t tmpfs tmpfs /tmp
# configfs (LIO's configuration) may be a module: its mount point exists once it is loaded.
modprobe -q configfs 2>/dev/null
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config 2>/dev/null
mount -o remount,rw / 2>/dev/null

LOG=/run/softrdma-init.log
: >"$LOG"

say() {
    echo "softrdma-vm-init: $*" >/dev/console
    echo "$*" >>"$LOG"
}

step() {
    if out=$("$@" 2>&1); then
        say "ok: $*"
    else
        say "FAILED ($?): $* :: $out"
    fi
}

ADDR=10.77.0.1/24
MTU=1500
RXE=rxe0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    softrdma.ip=*) ADDR=${arg#softrdma.ip=} ;;
    softrdma.mtu=*) MTU=${arg#softrdma.mtu=} ;;
    softrdma.rxe=*) RXE=${arg#softrdma.rxe=} ;;
    esac
done

say "uptime $(cut -d' ' -f1 /proc/uptime)s, kernel $(uname -r)"
hostname softrdma-peer
echo softrdma-peer >/etc/hostname 2>/dev/null
ulimit -l unlimited

step modprobe virtio_console
step modprobe virtio_net
step ip link set lo up

IFACE=
for i in 1 2 3 4 5 6 7 8 9 10; do
    for dev in /sys/class/net/*; do
        name=${dev##*/}
        [ "$name" = lo ] && continue
        [ -e "$dev/device" ] || continue
        IFACE=$name
        break
    done
    [ -n "$IFACE" ] && break
    sleep 0.5
done
if [ -n "$IFACE" ]; then
    say "interface $IFACE"
    step ip link set "$IFACE" mtu "$MTU"
    step ip addr add "$ADDR" dev "$IFACE"
    step ip link set "$IFACE" up
    step modprobe rdma_rxe
    step modprobe ib_uverbs
    step modprobe rdma_ucm
    step rdma link add "$RXE" type rxe netdev "$IFACE"
else
    say "FAILED: no network interface"
fi
echo "$IFACE" >/run/softrdma-iface

say "starting agent at uptime $(cut -d' ' -f1 /proc/uptime)s"
exec /usr/bin/tini -s -- /usr/bin/python3 /opt/softrdma/vmagent.py
