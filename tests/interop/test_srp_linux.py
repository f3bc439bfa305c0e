"""Linux's SRP initiator (``ib_srp``, kernel 6.1 on ``rdma_rxe``) against
``softrdma srp target``.

softrdma serves a sparse 64 MiB image on the host side of the VM's link
(10.77.0.2, RDMA CM port 5555); the VM loads ``ib_srp`` and writes the
``add_target`` line the target printed — exactly that line — to
``/sys/class/infiniband_srp/srp-rxe0-1/add_target``. Linux logs in over the
RDMA CM (one channel per completion vector: two on the VM's two CPUs),
scans the target and ``sd`` attaches the LUN as a disk. In the VM:
``mkfs.ext4``, mount, write files (8 MiB of random data and a small text
file: data written by immediate data and by target RDMA READ), ``sync``,
unmount, ``fsck -f -n`` clean, drop the caches, mount again and check every
file's SHA-256, unmount, and remove the target port
(``/sys/class/srp_remote_ports/port-<host>:1/delete``). On the host side:
the image is a valid ext4 (``e2fsck -fn``) holding the same files
(``debugfs``), the target logged each channel's login and logout, and its
pcap shows the SRP login in the CM REQ and data moved both ways by RDMA.
A second test stops the target (SIGTERM) while Linux is logged in: it logs
every channel out with a DREQ, Linux notices, and the target exits 0.

Every VM step has a timeout (:data:`STEP_TIMEOUT`); the target process is
stopped whatever happens. ``dmesg`` from the VM and the target's output are
in every failure message.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.ulp.srp.proto import SrpLoginReq, SrpLoginRsp
from tests.interop.host_process import STAMP, HostTarget, host_target
from tests.interop.linuxvm import LinuxPeer
from tests.interop.srp_wire import SrpWire, read_srp_pcap
from tests.interop.vm_disk import (
    check_image,
    check_pattern,
    make_ext4,
    read_back,
    vm_sums,
    write_pattern,
)

pytestmark = pytest.mark.interop

LOGIN_TIMEOUT = 60.0
"""Bound on the login and the SCSI scan that follows it."""
IMAGE_SIZE = 64 << 20
MNT = "/mnt/srp"
SUMS = "/tmp/srp.sums"

FIND_DISK = r"""
for h in /sys/class/scsi_host/host*; do
    [ "$(cat "$h/proc_name" 2>/dev/null)" = ib_srp ] || continue
    for b in "$h"/device/target*/*/block/*; do
        [ -e "$b" ] && echo "${h##*/host} ${b##*/}"
    done
done
"""
"""Prints ``<scsi host number> <disk name>`` for each disk behind ib_srp."""
CLEANUP = f"""
mountpoint -q {MNT} && umount {MNT}
for p in /sys/class/srp_remote_ports/port-*; do [ -e "$p/delete" ] && echo 1 > "$p/delete"; done
true
"""
"""Unmounts and removes every SRP target port in the VM."""


@dataclass
class Target(HostTarget):
    """``softrdma srp target`` on the host side, in the VM's namespace."""

    add_target: str = ""


@contextmanager
def softrdma_target(peer: LinuxPeer, tmp: Path, *args: str) -> Iterator[Target]:
    argv = ["srp", "target", "--ip", peer.host_ip, *args]
    # CLEANUP: whatever happened, no SRP port stays behind in the (shared) VM.
    with host_target(peer, tmp, Target, argv, CLEANUP) as target:
        line = target.wait_lines(r"add_target: .*", 1, 30.0)[0]
        target.add_target = line.removeprefix("add_target: ")
        yield target


def login(target: Target) -> tuple[str, str]:
    """ib_srp logs in with the target's ``add_target`` line; the new SCSI
    host's number and its disk."""
    peer = target.peer
    target.vm("modprobe", "modprobe ib_srp && modprobe sd_mod")
    before = set(peer.run(FIND_DISK, timeout=30).stdout.splitlines())
    sysfs = "/sys/class/infiniband_srp/srp-rxe0-1/add_target"
    target.vm("add_target", f"echo '{target.add_target}' > {sysfs}", timeout=LOGIN_TIMEOUT)
    end = time.monotonic() + LOGIN_TIMEOUT
    while True:
        found = set(peer.run(FIND_DISK, timeout=30).stdout.splitlines()) - before
        if found:
            host, disk = sorted(found)[0].split()
            return host, disk
        if time.monotonic() > end:
            pytest.fail(f"no disk behind ib_srp\n{target.describe()}")
        time.sleep(0.5)


def remove(target: Target, host: str) -> None:
    """Remove the target port as the kernel documents it, and wait until
    the SCSI host is gone."""
    target.vm(
        "remove target",
        f"echo 1 > /sys/class/srp_remote_ports/port-{host}:1/delete; "
        f"for i in $(seq 100); do [ -e /sys/class/scsi_host/host{host} ] || exit 0; "
        "sleep 0.2; done; exit 1",
    )


def pcap_summary(
    path: Path, host_ip: str
) -> tuple[list[SrpLoginReq], list[SrpLoginRsp], Counter[str]]:
    """The SRP logins and their responses in the CM REQs and REPs of the
    pcap, and the RC opcodes each side sent (``"<side> <OPCODE>"``), with
    Linux's SENDs of more than 68 bytes (SRP_CMDs with immediate data)."""

    def on_packet(wire: SrpWire, side: str, op: Opcode, p: Packet) -> None:
        if op in (Opcode.RC_SEND_ONLY, Opcode.RC_SEND_FIRST) and side == "linux":
            wire.opcodes["linux SRP IU over 68 bytes"] += len(bytes(p.payload)) > 68

    wire = read_srp_pcap(path, host_ip, ("target", "linux"), on_packet)
    return wire.logins, wire.responses, wire.opcodes


@pytest.mark.skipif(shutil.which("debugfs") is None, reason="needs e2fsprogs on the host")
def test_linux_ib_srp_makes_and_checks_ext4_on_a_softrdma_target(linux_peer: LinuxPeer) -> None:
    peer = linux_peer
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="softrdma-srp-") as d:
        tmp = Path(d)
        image, pcap = tmp / "disk.img", tmp / "target.pcap"
        args = (str(image), "--create-size", "64M", "--pcap", str(pcap))
        with softrdma_target(peer, tmp, *args) as target:
            assert re.fullmatch(
                rf"id_ext=([0-9a-f]{{16}}),ioc_guid=\1,dest={re.escape(peer.host_ip)}:5555",
                target.add_target,
            ), target.add_target
            assert image.stat().st_size == IMAGE_SIZE and image.stat().st_blocks == 0

            host, disk = login(target)
            who = rf"initiator 0x[0-9a-f]{{32}} from {re.escape(peer.vm_ip)}:\d+"
            logins = target.wait_lines(rf"{STAMP} login: {who} \(channel \d+\)", 1, 10.0)
            dev = f"/dev/{disk}"
            size = target.vm("size", f"blockdev --getsize64 {dev}").stdout.strip()
            assert int(size) == IMAGE_SIZE

            make_ext4(target, dev, MNT, "softrdma-srp", SUMS, "ib_srp")
            read_back(target, dev, MNT, SUMS)
            sums = vm_sums(target, SUMS)
            remove(target, host)
            logouts = target.wait_lines(
                rf"{STAMP} logout: {who} \(channel \d+\): disconnected by the initiator",
                len(logins),
                30.0,
            )
            dmesg = peer.run(["dmesg"], timeout=30).stdout
            status = target.stop()
            out = target.stdout()
        assert status == 0, out
        assert re.search(rf"^{STAMP} stopping \(SIGTERM\): logging out 0 initiators$", out, re.M)
        assert len(logins) == len(logouts) == out.count(" login: ")
        assert not re.search(r"BUG:|Oops|Call Trace|I/O error|abort", dmesg), dmesg
        assert re.search(rf"ib_srp: new target: id_ext {target.add_target[7:23]} ", dmesg), dmesg

        # The image, on the host: a clean ext4 with the files Linux wrote.
        check_image(image, sums, IMAGE_SIZE)

        # The wire: the login in each CM REQ, the response in each REP,
        # immediate data in Linux's SENDs, RDMA both ways from the target.
        reqs, reps, opcodes = pcap_summary(pcap, peer.host_ip)
        tpi = bytes.fromhex(target.add_target[7:23] * 2)
        assert len(reqs) == len(reps) == len(logins), (reqs, reps)
        assert all(r.target_port_id == tpi and r.req_it_iu_len == 8260 for r in reqs), reqs
        assert all(r.req_lim_delta == 128 and r.max_ti_iu_len == 8260 for r in reps), reps
        assert opcodes["linux SRP IU over 68 bytes"] > 0, opcodes
        assert opcodes["target RC_RDMA_READ_REQUEST"] > 0, opcodes
        assert opcodes["target RC_RDMA_WRITE_ONLY"] + opcodes["target RC_RDMA_WRITE_FIRST"] > 0
    total = time.monotonic() - t_start
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in target.timings.items())
    print(f"\nSRP interop: {len(logins)} channels; {steps}; total {total:.1f}s")


def test_a_stopping_target_logs_linux_out_and_linux_reconnects(linux_peer: LinuxPeer) -> None:
    """SIGTERM with Linux logged in: a DREQ per channel, every channel
    logged out, exit 0; Linux blocks the port (``received DREQ``). The
    target restarted on the same image with the same identifiers: ib_srp
    reconnects on its own (``reconnect_delay``, 10 s) and reads what it
    wrote before the restart."""
    peer = linux_peer
    with tempfile.TemporaryDirectory(prefix="softrdma-srp-") as d:
        tmp = Path(d)
        (tmp / "1").mkdir()
        (tmp / "2").mkdir()
        image = str(tmp / "disk.img")
        with softrdma_target(peer, tmp / "1", image, "--create-size", "16M") as first:
            host, disk = login(first)
            who = rf"initiator 0x[0-9a-f]{{32}} from {re.escape(peer.vm_ip)}:\d+"
            n = len(first.wait_lines(rf"{STAMP} login: {who} \(channel \d+\)", 1, 10.0))
            write_pattern(first, f"/dev/{disk}", "srp")
            assert first.stop() == 0, first.stdout()
            out = first.stdout()
            assert re.search(
                rf"^{STAMP} stopping \(SIGTERM\): logging out {n} initiators?$", out, re.M
            ), out
            stopped = re.findall(rf"^{STAMP} logout: {who} \(channel \d+\): target stopping$",
                                 out, re.M)  # fmt: skip
            assert len(stopped) == n, out
            dreq = f"scsi host{host}: ib_srp: received DREQ"
            first.wait_dmesg(lambda log: log.count(dreq) >= n, 30.0)

            with softrdma_target(peer, tmp / "2", image) as second:
                assert second.add_target == first.add_target
                check_pattern(second, f"/dev/{disk}", "srp", "read after the reconnect")
                second.wait_lines(rf"{STAMP} login: {who} \(channel \d+\)", n, 10.0)
                dmesg = peer.run(["dmesg"], timeout=30).stdout
                assert f"scsi host{host}: ib_srp: reconnect succeeded" in dmesg, dmesg
                remove(second, host)
                second.wait_lines(
                    rf"{STAMP} logout: {who} \(channel \d+\): disconnected by the initiator",
                    n,
                    30.0,
                )
                assert second.stop() == 0
