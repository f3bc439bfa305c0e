"""``softrdma rping``: rdma-core's rping on the RDMA CM — client and server
on every pairing of device kinds over the in-process fabric (clean and
lossy), the DMA addresses that travel in ``rping_rdma_info``, the error
paths and their exact lines and exit statuses, ``-P``, no DMA leak; and two
processes over loopback UDP."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from softrdma.cli import main
from softrdma.cli.rping import (
    RPING_MIN_BUFSIZE,
    RpingOptions,
    RpingProcess,
    RpingRdmaInfo,
    ping_pattern,
    run_simulated,
)
from softrdma.cm.cm_port import ib_cm_port
from softrdma.cm.cma import RdmaCmEventType, RdmaCmId, RdmaEventChannel
from softrdma.dma.platform import Platform
from softrdma.dma.types import DmaBackend
from softrdma.drivers.roce import RoceDevice
from softrdma.drivers.rxe import SoftRoce
from softrdma.fabric.inproc import Fabric
from softrdma.fabric.udp import UdpNetwork
from softrdma.memory.host import Host, MiB
from tests.fabric.netaddr import loopback_addresses
from tests.rdma.nodes import KINDS, make_device

SERVER_IP, CLIENT_IP = "10.0.0.2", "10.0.0.1"
TIMEOUT = 60.0


def expected_pings(count: int, size: int = 64) -> list[bytes]:
    """What the client's start buffer holds on each ping."""
    return [ping_pattern(i, 65 + i % 58, size) for i in range(count)]


def ping_lines(count: int, prefix: str = "ping data: ", size: int = 64) -> str:
    return "".join(f"{prefix}{p[:-1].decode()}\n" for p in expected_pings(count, size))


@dataclass
class Side:
    """One rping process on its own simulated host."""

    dev: RoceDevice
    proc: RpingProcess
    out: io.StringIO
    err: io.StringIO

    @classmethod
    def start(cls, kind: str, fabric: Fabric, ip: str, opts: RpingOptions) -> Side:
        dev = make_device(kind, fabric, ip)  # the DMA-API debug checker is on
        out, err = io.StringIO(), io.StringIO()
        return cls(dev, RpingProcess(opts, dev, out, err, record=True), out, err)

    def release(self) -> None:
        """Unregister the device (the CM and MAD ports go) and release its
        bus device: the debug checker reports any mapping still live."""
        self.dev.unregister()
        self.dev.dma_device.release()
        debug = self.dev.dma_device.platform.dma_debug
        assert debug is not None and not debug.reports, debug.reports


def server_opts(**kw: object) -> RpingOptions:
    return RpingOptions(server=True, addr=SERVER_IP, **kw)  # type: ignore[arg-type]


def client_opts(**kw: object) -> RpingOptions:
    return RpingOptions(server=False, addr=SERVER_IP, source=CLIENT_IP, **kw)  # type: ignore[arg-type]


def pair(
    client_kind: str,
    server_kind: str,
    *,
    seed: int = 1,
    drop: float = 0.0,
    size: int = 64,
    **client: object,
) -> tuple[Fabric, Side, Side]:
    fabric = Fabric(seed=seed)
    if drop:
        fabric.set_faults(drop=drop)
    server = Side.start(server_kind, fabric, SERVER_IP, server_opts(verbose=True, size=size))
    opts = {"count": 5, "verbose": True, "validate": True, "size": size, **client}
    return fabric, server, Side.start(client_kind, fabric, CLIENT_IP, client_opts(**opts))


# -- the protocol's pieces --------------------------------------------------------------


def test_ping_pattern_is_rpings() -> None:
    first = ping_pattern(0, 65, 64)
    assert first == b"rdma-ping-0: ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqr\0"
    assert ping_pattern(1, 66, 64).startswith(b"rdma-ping-1: BCD")
    # the run wraps from 'z' to 'A'; the start moves on one per ping
    assert ping_pattern(57, 122, 64)[14:17] == b"zAB"
    assert [p[14] for p in expected_pings(60)][56:] == [121, 122, 65, 66]
    # the smallest size rping takes: the prefix, cut, then the NUL
    assert ping_pattern(1234567, 65, RPING_MIN_BUFSIZE) == b"rdma-ping-1234567: ABC\0"


def test_rdma_info_is_16_big_endian_bytes() -> None:
    info = RpingRdmaInfo(buf=0xFFFF888001234000, rkey=0x1A2B3C4D, size=64)
    wire = info.pack()
    assert wire == bytes.fromhex("ffff888001234000") + bytes.fromhex("1a2b3c4d00000040")
    assert RpingRdmaInfo.unpack(wire) == info


# -- client and server on every pairing ---------------------------------------------------


def check_addresses(side: Side, infos: list[RpingRdmaInfo]) -> None:
    """The ``buf`` each ``rping_rdma_info`` advertised is the buffer's DMA
    address, of the kind its device's DMA API produces."""
    kvas = dict(side.proc.cb.addresses)
    start_kva, start_dma = kvas["start_buf"]
    sink_kva, sink_dma = kvas["rdma_buf"]
    assert [i.buf for i in infos] == [start_dma, sink_dma] * (len(infos) // 2)
    assert all(i.size == 64 for i in infos)
    assert len({i.rkey for i in infos}) == 2  # one fast-registration key per buffer
    dev = side.dev
    bus = dev.dma_device
    platform = bus.platform
    for kva, dma in ((start_kva, start_dma), (sink_kva, sink_dma)):
        phys = dev.host.virt_to_phys(kva)
        if bus.backend is DmaBackend.VIRTUAL:
            assert dma == kva  # a CPU-copy device: the kernel virtual address
        elif bus.backend is DmaBackend.DIRECT:
            assert dma == phys + bus.bus_offset  # the bus address
        elif bus.backend is DmaBackend.SWIOTLB:
            assert platform.swiotlb is not None  # a bounce slot
            assert platform.swiotlb.is_swiotlb_buffer(dma - bus.bus_offset)
            assert dma != phys
        else:
            assert bus.backend is DmaBackend.IOMMU
            assert dma != phys and dma != kva and dma < 1 << 32  # an IOVA


@pytest.mark.parametrize("server_kind", KINDS)
@pytest.mark.parametrize("client_kind", KINDS)
def test_rping_between_every_pairing(client_kind: str, server_kind: str) -> None:
    fabric, server, client = pair(client_kind, server_kind)
    seen_mapped: list[bool] = []

    def first_ping_done() -> bool:
        return len(client.proc.cb.data) >= 1

    run_simulated([server.proc, client.proc], fabric.loop, until=first_ping_done)
    # mid-run, behind the IOMMU, the advertised IOVAs translate to the buffers
    for side in (client, server):
        domain = side.dev.dma_device.iommu_domain
        if domain is not None:
            for kva, dma in side.proc.cb.addresses.values():
                seen_mapped.append(domain.iova_to_phys(dma) == side.dev.host.virt_to_phys(kva))
    assert all(seen_mapped)
    run_simulated([server.proc, client.proc], fabric.loop)

    assert client.proc.status == 0 and server.proc.status == 0
    assert client.out.getvalue() == ping_lines(5)
    assert client.err.getvalue() == "client DISCONNECT EVENT...\n"
    assert server.out.getvalue() == ping_lines(5, "server ping data: ")
    assert server.err.getvalue() == "server DISCONNECT EVENT...\nwait for RDMA_READ_ADV state 10\n"
    # what travelled, and what the RDMA READ and WRITE moved
    sent, received = client.proc.cb.sent, server.proc.cb.received
    assert sent == received and len(sent) == 10
    check_addresses(client, sent)
    assert server.proc.cb.data == expected_pings(5)  # READ: the client's start buffer
    assert client.proc.cb.data == expected_pings(5)  # WRITE: the server's buffer, back
    for side in (client, server):
        side.release()  # no DMA mapping leaked, no misuse reported


@pytest.mark.parametrize(
    ("client_kind", "server_kind", "seed"),
    [("cpu", "hw-iommu", 1), ("hw-swiotlb", "cpu", 2), ("hw-iommu", "hw-direct", 3)],
)
def test_rping_on_a_lossy_fabric(client_kind: str, server_kind: str, seed: int) -> None:
    """5% of the frames lost: the MAD layer resends the CM's messages, RC
    resends data, and every ping still arrives intact."""
    fabric, server, client = pair(client_kind, server_kind, seed=seed, drop=0.05, count=12)
    run_simulated([server.proc, client.proc], fabric.loop)
    assert fabric.stats.dropped > 0
    assert client.proc.status == 0, client.err.getvalue()
    assert server.proc.status == 0, server.err.getvalue()
    assert client.out.getvalue() == ping_lines(12)
    assert server.proc.cb.data == client.proc.cb.data == expected_pings(12)
    assert "server DISCONNECT EVENT..." in server.err.getvalue()
    for side in (client, server):
        side.release()


@pytest.mark.parametrize("size", [RPING_MIN_BUFSIZE, 65535])
def test_smallest_and_largest_size(size: int) -> None:
    """``-S`` at both ends of rping's range; 64 KiB spans 17 pages of a
    fast-registration MR, through swiotlb bounce slots on one side and
    IOMMU pages on the other."""
    fabric, server, client = pair("hw-swiotlb", "hw-iommu", count=3, size=size)
    run_simulated([server.proc, client.proc], fabric.loop)
    assert client.proc.status == 0 and server.proc.status == 0, client.err.getvalue()
    assert client.out.getvalue() == ping_lines(3, size=size)
    assert server.proc.cb.data == client.proc.cb.data == expected_pings(3, size)
    for side in (client, server):
        side.release()


def test_debug_lines_show_what_travels() -> None:
    """``-d``: rping's debug lines, among them the advertised address, key
    and length on the client and the same three received on the server."""
    fabric = Fabric(seed=5)
    server = Side.start("hw-iommu", fabric, SERVER_IP, server_opts(debug=True))
    client = Side.start("cpu", fabric, CLIENT_IP, client_opts(count=2, debug=True))
    run_simulated([server.proc, client.proc], fabric.loop)
    c_out, s_out = client.out.getvalue(), server.out.getvalue()
    for line in ("created cm_id 0x", "rdma_resolve_addr - rdma_resolve_route successful",
                 "cq_thread started.", "rdma_connect successful", "destroy cm_id 0x"):  # fmt: skip
        assert line in c_out
    for line in ("rdma_bind_addr successful\nrdma_listen\n", "accepting client connection request",
                 "server posted rdma read req \n", "server rdma write complete \n"):  # fmt: skip
        assert line in s_out
    advertised = re.findall(r"^RDMA addr ([0-9a-f]+) rkey ([0-9a-f]+) len (\d+)$", c_out, re.M)
    received = re.findall(r"^Received rkey ([0-9a-f]+) addr ([0-9a-f]+) len (\d+) from peer$",
                          s_out, re.M)  # fmt: skip
    assert [(a, k, n) for k, a, n in received] == advertised
    assert [int(a, 16) for a, _, _ in advertised] == [i.buf for i in client.proc.cb.sent]
    assert "cma_event type RDMA_CM_EVENT_CONNECT_REQUEST" in s_out
    for side in (client, server):
        side.release()


def test_persistent_server_serves_clients_at_once() -> None:
    """``-P``: a thread per connection; three clients of different kinds at
    the same time, each validated; the server goes on."""
    fabric = Fabric(seed=7)
    server = Side.start("hw-iommu", fabric, SERVER_IP, server_opts(persistent=True))
    clients = [
        Side.start(
            kind,
            fabric,
            f"10.0.0.{10 + i}",
            RpingOptions(server=False, addr=SERVER_IP, count=3 + i, validate=True, verbose=True),
        )
        for i, kind in enumerate(("cpu", "hw-swiotlb", "hw-direct"))
    ]
    procs = [server.proc, *(c.proc for c in clients)]
    run_simulated(procs, fabric.loop, until=lambda: all(c.proc.done for c in clients))
    for i, c in enumerate(clients):
        assert c.proc.status == 0 and c.out.getvalue() == ping_lines(3 + i)
    run_simulated([server.proc], fabric.loop, until=lambda: len(server.proc.threads) == 2)
    assert not server.proc.done  # main and CM threads: waiting for the next client
    assert server.err.getvalue().count("server DISCONNECT EVENT...\n") == 3
    server.proc.kill()
    for side in (server, *clients):
        side.release()


# -- error paths ----------------------------------------------------------------------------


def test_no_listener_is_rejected() -> None:
    """The CM answers a REQ for a port nobody listens on with a REJ
    (``INVALID_SERVICE_ID``, 8): rping's lines, exit status 255 (-1)."""
    fabric = Fabric(seed=1)
    server_dev = make_device("hw-direct", fabric, SERVER_IP)
    client = Side.start("cpu", fabric, CLIENT_IP, client_opts(count=3))
    run_simulated([client.proc], fabric.loop)
    assert client.proc.status == 255
    assert client.err.getvalue() == (
        "cma event RDMA_CM_EVENT_REJECTED, error 8\nwait for CONNECTED state 4\nconnect error -1\n"
    )
    assert client.out.getvalue() == ""
    # The server's CM opened on its first management datagram, as Linux's
    # is up on every device, and answered for the service.
    assert ib_cm_port(server_dev).stats["rx_no_listener"] == 1
    client.release()


def test_nobody_answers_is_unreachable() -> None:
    """No RDMA device at the address: the REQ is resent until the CM gives
    up (about 98 simulated seconds), then UNREACHABLE, -ETIMEDOUT."""
    fabric = Fabric(seed=1)
    client = Side.start("hw-iommu", fabric, CLIENT_IP, client_opts(count=3))
    run_simulated([client.proc], fabric.loop)
    assert client.proc.status == 255
    assert client.err.getvalue() == (
        "cma event RDMA_CM_EVENT_UNREACHABLE, error -110\n"
        "wait for CONNECTED state 4\n"
        "connect error -1\n"
    )
    assert 60 < fabric.loop.now < 200
    client.release()


def test_server_killed_mid_run() -> None:
    """The server process dies after three pings: the kernel destroys its
    CM ID (a DREQ) and QP. The client ends as rping does: DISCONNECTED
    instead of the server's answer — an error line, but exit status 0."""
    fabric, server, client = pair("cpu", "hw-iommu", count=0)
    procs = [server.proc, client.proc]
    run_simulated(procs, fabric.loop, until=lambda: len(client.proc.cb.data) >= 3)
    server.proc.kill()
    start = fabric.loop.now
    run_simulated([client.proc], fabric.loop)
    assert fabric.loop.now - start < 1.0
    assert client.proc.status == 0
    err = client.err.getvalue()
    assert re.fullmatch(
        r"client DISCONNECT EVENT\.\.\.\nwait for RDMA_WRITE_(ADV|COMPLETE) state 10\n", err
    ), err
    assert client.out.getvalue() == ping_lines(3)
    for side in (client, server):
        side.release()


def test_server_host_gone_mid_run() -> None:
    """The server's host vanishes (every frame to and from it lost): the
    client's SEND exhausts its retries (transport retry counter exceeded,
    12) within 7 retries of 2.1 s, and rping fails with exit status 255."""
    fabric, server, client = pair("hw-swiotlb", "cpu", count=0)
    run_simulated([server.proc, client.proc], fabric.loop,
                  until=lambda: len(client.proc.cb.data) >= 3)  # fmt: skip
    fabric.set_faults(src=SERVER_IP, drop=1.0)
    fabric.set_faults(dst=SERVER_IP, drop=1.0)
    start = fabric.loop.now
    run_simulated([client.proc], fabric.loop)
    assert 15 < fabric.loop.now - start < 20
    assert client.proc.status == 255
    assert client.err.getvalue() == (
        "cq completion failed status 12\n"
        "wait for RDMA_WRITE_ADV state 11\n"
        "rping client failed: -1\n"
    )
    client.release()  # the client cleaned up; the dead host is not asked


@pytest.mark.parametrize(
    ("argv", "status", "stdout", "stderr"),
    [
        (["-c", "-a", "127.0.0.1", "-S", "5"], 22, "", "Invalid size 5 (valid range is 23 to 65536)\n"),
        (["-s", "-S", "65536"], 22, "", "Invalid size 65536 (valid range is 23 to 65536)\n"),
        (["-c", "-a", "127.0.0.1", "-C", "-1"], 22, "", "Invalid count -1\n"),
        (["-v", "-V"], 22, "usage: softrdma rping [-h]", ""),  # neither -s nor -c
        (["-s", "-t", "1"], 22, "usage: softrdma rping [-h]", ""),  # -t: rping has no case for it
        (["-s", "-q"], 22, "", "softrdma rping: -q (a self-created QP) is not supported\n"),
        (["-s", "-a", "::1"], 22, "", "softrdma rping: ::1: IPv6 is not supported"),
        (["-d", "-s", "-S", "100", "-C", "x", "-a", "198.51.100.7"], 19,
         "server\nsize 100\ncount 0\n", "is not an address of this host"),
    ],
)  # fmt: skip
def test_bad_arguments(
    argv: list[str], status: int, stdout: str, stderr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """rping's checks, messages and statuses (22 is EINVAL, 19 ENODEV); a
    count that is not a number is ``atoi``'s 0."""
    assert main(["rping", *argv]) == status
    out, err = capsys.readouterr()
    assert stdout in out and stderr in err
    assert err.count("\n") <= 1


# -- two processes over loopback UDP -----------------------------------------------------


def test_cm_event_wakes_a_thread_waiting_on_real_time() -> None:
    """On the real-time loop an RDMA CM event is posted by the progress
    thread; ``get_cm_event`` returns as soon as it is there (it used not
    to be woken, and slept out its whole timeout)."""
    (ip,) = loopback_addresses(1)
    net = UdpNetwork()
    dev = SoftRoce(Platform(Host(64 * MiB)), net, ip)
    try:
        channel = RdmaEventChannel(dev.host)
        cm_id = RdmaCmId(channel)
        start = time.monotonic()
        cm_id.resolve_addr(ip, 7174)
        assert channel.get_cm_event(10.0).event is RdmaCmEventType.ADDR_RESOLVED
        assert time.monotonic() - start < 2.0
        cm_id.destroy()
    finally:
        dev.unregister()
        net.close()


def softrdma(*args: str) -> list[str]:
    return [sys.executable, "-m", "softrdma", "rping", *args]


@dataclass
class Spawned:
    """A process whose output goes to files (a full pipe would stall it)."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self) -> int:
        return self.proc.wait(TIMEOUT)


@contextlib.contextmanager
def spawned(tmp: Path, name: str, argv: list[str]) -> Iterator[Spawned]:
    """A process that is killed if the test leaves it running."""
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(argv, stdout=o, stderr=e)
    try:
        yield Spawned(proc, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def wait_bound(server: Spawned, ip: str) -> None:
    """Until the server has its RoCE socket (``ip``:4791 in /proc/net/udp);
    rping then listens at once, well before a new client is up."""
    want = f"{socket.inet_aton(ip)[::-1].hex().upper()}:12B7"
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            raise AssertionError(f"the server exited: {server.stderr()}")
        with open("/proc/net/udp") as f:
            if want in f.read():
                time.sleep(0.1)
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing bound {ip}:4791")


def wait_lines(proc: Spawned, n: int) -> None:
    end = time.monotonic() + TIMEOUT
    while proc.stdout().count("\n") < n:
        assert time.monotonic() < end and proc.proc.poll() is None, proc.stderr()
        time.sleep(0.02)


def test_two_processes_over_udp(tmp_path: Path) -> None:
    ip_s, ip_c = loopback_addresses(2)
    with spawned(tmp_path, "server", softrdma("-s", "-a", ip_s, "-v")) as srv:
        wait_bound(srv, ip_s)
        client = subprocess.run(
            softrdma("-c", "-a", ip_s, "-I", ip_c, "-C", "5", "-v", "-V"),
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert srv.wait() == 0, srv.stderr()
    assert client.returncode == 0, client.stderr
    assert client.stdout == ping_lines(5)
    assert client.stderr == "client DISCONNECT EVENT...\n"
    assert srv.stdout() == ping_lines(5, "server ping data: ")
    assert srv.stderr() == "server DISCONNECT EVENT...\nwait for RDMA_READ_ADV state 10\n"


def test_udp_no_listener_and_killed_server(tmp_path: Path) -> None:
    """Over UDP: a client of a port nobody listens on is rejected; a server
    killed (SIGTERM) mid-run disconnects its client, which ends at once."""
    ip_s, ip_c = loopback_addresses(2)
    server = softrdma("-s", "-a", ip_s, "-p", "7000", "--ib-dev", "hca0")
    with spawned(tmp_path, "server", server) as srv:
        wait_bound(srv, ip_s)
        rejected = subprocess.run(
            softrdma("-c", "-a", ip_s, "-I", ip_c, "-p", "7001", "-C", "1"),
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert rejected.returncode == 255
        assert rejected.stderr == (
            "cma event RDMA_CM_EVENT_REJECTED, error 8\n"
            "wait for CONNECTED state 4\n"
            "connect error -1\n"
        )
        client = softrdma("-c", "-a", ip_s, "-I", ip_c, "-p", "7000", "-v", "-V")
        with spawned(tmp_path, "client", client) as cli:
            wait_lines(cli, 3)
            os.kill(srv.proc.pid, signal.SIGTERM)
            assert srv.wait() == -signal.SIGTERM
            assert cli.wait() == 0, cli.stderr()
    assert re.fullmatch(
        r"client DISCONNECT EVENT\.\.\.\nwait for RDMA_WRITE_(ADV|COMPLETE) state 10\n",
        cli.stderr(),
    ), cli.stderr()
    out = cli.stdout()
    assert out == ping_lines(out.count("\n"))
