"""``softrdma srp target`` in its own process on a loopback address, over
real UDP, with a raw SRP initiator in the test process (hand-built IUs, as
in ``tests/ulp/test_srp_target.py``, but on a :class:`UdpNetwork` device that
sleeps in ``cq.wait`` / ``get_cm_event`` with a bound): the ``add_target``
line, the login / logout / rejection log lines, INQUIRY, READ CAPACITY,
WRITE (immediate data and RDMA READ) and READ through the served image and
the bytes in the image file, SIGTERM logging the initiator out and exiting
0, a read-only target, and bad arguments as one line with exit status 1.
Every wait is bounded and every process stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from softrdma.cli.srp import parse_guid, parse_size
from softrdma.cm.cma import RdmaCmEventType, RdmaCmId, RdmaConnParam, RdmaEventChannel
from softrdma.dma.types import DMA_FROM_DEVICE, DMA_TO_DEVICE
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.link import mac_for_ip
from softrdma.fabric.pcap import PcapReader
from softrdma.fabric.udp import UdpNetwork
from softrdma.transport.roce import ROCE_V2_UDP_DPORT
from softrdma.ulp.iu import IuBuf, alloc_iu_ring, free_iu_ring
from softrdma.ulp.scsi import ScsiStatus, SenseData, SenseKey
from softrdma.ulp.srp.proto import (
    SrpCmd,
    SrpDataBuf,
    SrpDirectBuf,
    SrpILogout,
    SrpImmBuf,
    SrpIu,
    SrpLoginRej,
    SrpLoginRejReason,
    SrpLoginReq,
    SrpLoginRsp,
    SrpLoginRspFlag,
    SrpRsp,
    decode_srp_iu,
)
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.device import node_guid_from_mac
from softrdma.verbs.enums import (
    IbPdFlags,
    IbQpType,
    IbSendFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import RecvWR, SendWR
from tests.fabric.netaddr import loopback_addresses
from tests.rdma.nodes import Buffer, make_device

E = RdmaCmEventType
TIMEOUT = 20.0
"""Bound on every wait for the target process or the network."""
IMM_OFFSET = 68
ADD_TARGET = re.compile(
    r"add_target: id_ext=([0-9a-f]{16}),ioc_guid=([0-9a-f]{16}),dest=([0-9.]+):(\d+)"
)
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"


def softrdma(*args: str) -> list[str]:
    return [sys.executable, "-m", "softrdma", "srp", *args]


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])
READ_CAPACITY_10 = bytes([0x25]) + bytes(9)


# --------------------------------------------------------------------------- the target


@dataclass
class TargetProcess:
    """``softrdma srp target`` running, its output going to files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    add_target: str = ""
    target_port_id: bytes = b""
    port: int = 0

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_line(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first stdout line matching ``pattern`` (a regex, whole line),
        waiting up to ``timeout`` seconds for it."""
        end = time.monotonic() + timeout
        while True:
            for line in self.stdout().splitlines():
                m = re.fullmatch(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(
                    f"no line {pattern!r} from the target (exit {self.proc.poll()}):\n"
                    f"{self.stdout()}\n{self.stderr()}"
                )
            time.sleep(0.05)

    def terminate(self) -> int:
        """SIGTERM; its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(TIMEOUT)


@contextlib.contextmanager
def target_process(tmp: Path, *args: str) -> Iterator[TargetProcess]:
    """The target started with ``args`` and up (its ``add_target`` line
    printed); killed if the test leaves it running."""
    out, err = tmp / "target.out", tmp / "target.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(softrdma("target", *args), stdout=o, stderr=e)
    try:
        t = TargetProcess(proc, out, err)
        m = t.wait_line(ADD_TARGET.pattern)
        t.add_target = m.group(0).removeprefix("add_target: ")
        t.target_port_id = bytes.fromhex(m.group(1) + m.group(2))
        t.port = int(m.group(4))
        yield t
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# --------------------------------------------------------------------------- the initiator


@dataclass
class UdpInitiator:
    """An SRP initiator that logs in over the RDMA CM and sends hand-built
    IUs one at a time, with the unsafe global rkey for its buffers, on a
    device of its own on a :class:`UdpNetwork` (real time: it sleeps in
    ``cq.wait`` and ``get_cm_event``, never longer than :data:`TIMEOUT`)."""

    dev: RoceDevice
    ch: RdmaEventChannel
    cid: RdmaCmId
    pd: ProtectionDomain
    cq: CompletionQueue
    qp: QueuePair
    recv: list[IuBuf]
    send: list[IuBuf]
    login_event: RdmaCmEventType = E.ESTABLISHED
    login_data: bytes = b""
    replies: deque[SrpIu] = field(default_factory=deque)
    sending: int = 0

    @property
    def port_id(self) -> bytes:
        return bytes(8) + self.dev.node_guid.to_bytes(8, "big")

    @classmethod
    def login(
        cls, dev: RoceDevice, target: TargetProcess, ip: str, **fields: object
    ) -> UdpInitiator:
        ch = RdmaEventChannel(dev.host)
        cid = RdmaCmId(ch)
        cid.resolve_addr(ip, target.port)
        assert ch.get_cm_event(TIMEOUT).event is E.ADDR_RESOLVED
        cid.resolve_route()
        assert ch.get_cm_event(TIMEOUT).event is E.ROUTE_RESOLVED
        pd = dev.alloc_pd(IbPdFlags.UNSAFE_GLOBAL_RKEY)
        cq = dev.create_cq(256)
        cap = QpCap(max_send_wr=64, max_recv_wr=64)
        qp = cid.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq, cap))
        recv = alloc_iu_ring(dev, 16, 256, DMA_FROM_DEVICE)
        for i, iu in enumerate(recv):
            qp.post_recv(RecvWR(i, (iu.sge(pd.local_dma_lkey),)))
        send = alloc_iu_ring(dev, 1, 8260, DMA_TO_DEVICE)
        req = SrpLoginReq(
            tag=7,
            req_it_iu_len=8260,
            req_flags=0x80,  # SRP_IMMED_REQUESTED
            imm_data_offset=IMM_OFFSET,
            initiator_port_id=bytes(8) + dev.node_guid.to_bytes(8, "big"),
            target_port_id=target.target_port_id,
        )
        req = dataclasses.replace(req, **fields)  # type: ignore[arg-type]
        cid.connect(RdmaConnParam(private_data=req.encode_rdma()))
        ev = ch.get_cm_event(TIMEOUT)
        data = ev.param.private_data if ev.param else b""
        return cls(dev, ch, cid, pd, cq, qp, recv, send, ev.event, data)

    def _poll(self, until: float) -> None:
        """Take what completed (waiting until some did, or ``until``)."""
        wcs = self.cq.poll(16)
        if not wcs:
            left = until - time.monotonic()
            if left <= 0:
                raise AssertionError("no answer from the target")
            self.cq.wait(min(left, 1.0))
            return
        for wc in wcs:
            assert wc.status is IbWcStatus.SUCCESS, wc
            if wc.opcode is IbWcOpcode.RECV:
                iu = self.recv[wc.wr_id]
                data = iu.read(wc.byte_len)
                self.qp.post_recv(RecvWR(wc.wr_id, (iu.sge(self.pd.local_dma_lkey),)))
                self.replies.append(decode_srp_iu(data))
            else:
                self.sending -= 1

    def post(self, iu: bytes) -> None:
        """SEND an IU (once the previous SEND has completed: one send buffer)."""
        until = time.monotonic() + TIMEOUT
        while self.sending:
            self._poll(until)
        self.send[0].write(iu)
        sge = self.send[0].sge(self.pd.local_dma_lkey, len(iu))
        self.qp.post_send(SendWR(1, IbWrOpcode.SEND, (sge,), IbSendFlags.SIGNALED))
        self.sending += 1

    def reply(self) -> SrpIu:
        """The next IU from the target."""
        until = time.monotonic() + TIMEOUT
        while not self.replies:
            self._poll(until)
        return self.replies.popleft()

    def command(
        self,
        tag: int,
        cdb: bytes,
        *,
        data_in: SrpDataBuf | None = None,
        data_out: SrpDataBuf | None = None,
        imm: bytes = b"",
    ) -> SrpRsp:
        cmd = SrpCmd(
            tag=tag,
            cdb=cdb.ljust(16, b"\0"),
            data_in=data_in,
            data_out=SrpImmBuf(len(imm)) if imm else data_out,
            imm_data=imm,
        )
        self.post(cmd.encode(imm_data_offset=IMM_OFFSET) if imm else cmd.encode())
        rsp = self.reply()
        assert isinstance(rsp, SrpRsp) and rsp.tag == tag, rsp
        return rsp

    def desc(self, buf: Buffer, length: int) -> SrpDirectBuf:
        return SrpDirectBuf(buf.dma, self.pd.unsafe_global_rkey, length)

    def wait_disconnected(self) -> None:
        """The target's DREQ: DISCONNECTED, answered with a DREP."""
        assert self.ch.get_cm_event(TIMEOUT).event is E.DISCONNECTED
        self.cid.disconnect()

    def close(self) -> None:
        self.cid.destroy_qp()
        self.cid.destroy()
        free_iu_ring(self.recv)
        free_iu_ring(self.send)

    def logout(self) -> None:
        """Disconnect (a DREQ), wait for the DREP, let go of everything."""
        self.cid.disconnect()
        assert self.ch.get_cm_event(TIMEOUT).event is E.DISCONNECTED
        self.close()


@contextlib.contextmanager
def network(*ips: str) -> Iterator[list[RoceDevice]]:
    """A UDP network in the test process with one device per address
    (the first a hardware HCA behind an IOMMU, the others CPU-copy)."""
    net = UdpNetwork()
    devs: list[RoceDevice] = []
    try:
        for i, ip in enumerate(ips):
            devs.append(make_device("hw-iommu" if i == 0 else "cpu", net, ip, netdev_mtu=None))
        yield devs
    finally:
        for dev in devs:
            dev.unregister()
        net.close()


def node_guid(ip: str) -> int:
    """The node GUID of a softrdma device on a loopback address (its MAC
    comes from the address)."""
    return node_guid_from_mac(mac_for_ip(IPv4Address(ip)))


def who(ini: UdpInitiator, ip: str) -> str:
    return rf"initiator 0x{ini.port_id.hex()} from {re.escape(ip)}:\d+"


# --------------------------------------------------------------------------- tests


def test_serves_the_image_and_logs_logins_and_logouts(tmp_path: Path) -> None:
    ip_t, ip_a, ip_b = loopback_addresses(3)
    image = tmp_path / "disk.img"
    pcap = tmp_path / "target.pcap"
    args = (str(image), "--ip", ip_t, "--create-size", "8M", "--pcap", str(pcap))
    with target_process(tmp_path, *args) as target, network(ip_a, ip_b) as (dev_a, dev_b):
        guid = f"{node_guid(ip_t):016x}"
        assert target.add_target == f"id_ext={guid},ioc_guid={guid},dest={ip_t}:5555"
        out = target.stdout()
        assert re.search(
            rf"^{STAMP} serving {re.escape(str(image))} as LUN 0: 16384 blocks of 512 bytes "
            r"\(8 MiB, read-write\)$", out, re.M)  # fmt: skip
        assert re.search(rf"listening on rxe0 {re.escape(ip_t)}:5555 \(RDMA CM\)", out)
        assert image.stat().st_size == 8 << 20 and image.stat().st_blocks == 0  # sparse

        a = UdpInitiator.login(dev_a, target, ip_t)
        assert a.login_event is E.ESTABLISHED, SrpLoginRej.decode(a.login_data)
        rsp = SrpLoginRsp.decode(a.login_data)
        assert rsp.req_lim_delta == 128 and rsp.rsp_flags & SrpLoginRspFlag.IMMED_SUPP
        target.wait_line(rf"{STAMP} login: {who(a, ip_a)} \(channel 1\)")

        buf = Buffer(dev_a, 65536)
        r = a.command(1, INQUIRY, data_in=a.desc(buf, 96))
        assert r.status == ScsiStatus.GOOD
        assert buf.read(16)[8:16] == b"SOFTRDMA"
        r = a.command(2, READ_CAPACITY_10, data_in=a.desc(buf, 8))
        assert r.status == ScsiStatus.GOOD
        assert struct.unpack(">II", buf.read(8)) == (16383, 512)
        # A write as immediate data and one the target fetches by RDMA READ.
        block = bytes(range(256)) * 16
        assert a.command(3, write10(8, 8), imm=block).status == ScsiStatus.GOOD
        pattern = os.urandom(65536)
        buf.fill(pattern)
        r = a.command(4, write10(100, 128), data_out=a.desc(buf, 65536))
        assert r.status == ScsiStatus.GOOD
        data = image.read_bytes()
        assert data[8 * 512 : 16 * 512] == block
        assert data[100 * 512 : 228 * 512] == pattern
        # Reads back by RDMA WRITE.
        buf.fill(bytes(65536))
        assert a.command(5, read10(8, 8), data_in=a.desc(buf, 4096)).status == ScsiStatus.GOOD
        assert buf.read(4096) == block
        assert a.command(6, read10(100, 128), data_in=a.desc(buf, 65536)).status == 0
        assert buf.read() == pattern
        buf.unmap()

        # A second initiator, then the first disconnects (a DREQ), the
        # second logs out with SRP_I_LOGOUT (the target disconnects it).
        b = UdpInitiator.login(dev_b, target, ip_t)
        assert b.login_event is E.ESTABLISHED
        target.wait_line(rf"{STAMP} login: {who(b, ip_b)} \(channel 2\)")
        a.logout()
        target.wait_line(
            rf"{STAMP} logout: {who(a, ip_a)} \(channel 1\): disconnected by the initiator"
        )
        b.post(SrpILogout(tag=9).encode())
        b.wait_disconnected()
        b.close()
        target.wait_line(rf"{STAMP} logout: {who(b, ip_b)} \(channel 2\): initiator logout")
        assert target.terminate() == 0, target.stderr()
    assert target.stderr() == ""
    stopping, stopped = target.stdout().splitlines()[-2:]
    assert re.fullmatch(rf"{STAMP} stopping \(SIGTERM\): logging out 0 initiators", stopping)
    assert re.fullmatch(rf"{STAMP} stopped", stopped)
    with PcapReader(pcap) as reader:
        assert sum(1 for _ in reader) > 20


def test_sigterm_logs_the_initiator_out_and_exits_0(tmp_path: Path) -> None:
    ip_t, ip_a = loopback_addresses(2)
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xa5" * (1 << 20))
    args = (str(image), "--ip", ip_t, "--ib-dev", "hca0", "--block-size", "4096",
            "--id-ext", "0x1234", "--ioc-guid", "5054:00ff:fe77:0001", "--port", "5600")  # fmt: skip
    with target_process(tmp_path, *args) as target, network(ip_a) as (dev,):
        assert (
            target.add_target
            == f"id_ext=0000000000001234,ioc_guid=505400fffe770001,dest={ip_t}:5600"
        )
        ini = UdpInitiator.login(dev, target, ip_t)
        assert ini.login_event is E.ESTABLISHED
        target.wait_line(rf"{STAMP} login: {who(ini, ip_a)} \(channel 1\)")
        buf = Buffer(dev, 4096)
        r = ini.command(1, READ_CAPACITY_10, data_in=ini.desc(buf, 8))
        assert struct.unpack(">II", buf.read(8)) == (255, 4096) and r.status == 0
        assert ini.command(2, read10(3, 1), data_in=ini.desc(buf, 4096)).status == 0
        assert buf.read() == b"\xa5" * 4096
        target.proc.send_signal(signal.SIGTERM)
        ini.wait_disconnected()  # the target's DREQ, answered
        assert target.proc.wait(TIMEOUT) == 0, target.stderr()
        ini.close()
    lines = target.stdout().splitlines()
    assert re.fullmatch(rf"{STAMP} stopping \(SIGTERM\): logging out 1 initiator", lines[-3])
    assert re.fullmatch(
        rf"{STAMP} logout: {who(ini, ip_a)} \(channel 1\): target stopping", lines[-2]
    ), lines
    assert re.fullmatch(rf"{STAMP} stopped", lines[-1])
    assert target.stderr() == ""


def test_read_only_target_rejected_and_replaced_logins_and_sigint(tmp_path: Path) -> None:
    ip_t, ip_a = loopback_addresses(2)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    args = (str(image), "--ip", ip_t, "--read-only")
    with target_process(tmp_path, *args) as target, network(ip_a) as (dev,):
        assert "(1 MiB, read-only)" in target.stdout()
        bad = UdpInitiator.login(dev, target, ip_t, target_port_id=bytes(16))
        assert bad.login_event is E.REJECTED
        rej = SrpLoginRej.decode(bad.login_data)
        assert rej.reason == SrpLoginRejReason.UNABLE_ASSOCIATE_CHANNEL
        bad.close()
        target.wait_line(
            rf"{STAMP} login rejected: {who(bad, ip_a)}: an invalid target port identifier"
        )
        first = UdpInitiator.login(dev, target, ip_t)
        assert first.login_event is E.ESTABLISHED
        r = first.command(1, write10(0, 1), imm=b"x" * 512)
        sense = SenseData.decode(r.sense)
        assert r.status == ScsiStatus.CHECK_CONDITION and sense.key == SenseKey.DATA_PROTECT
        # The same initiator port logs in again (single channel): the first
        # channel is terminated.
        second = UdpInitiator.login(dev, target, ip_t)
        assert second.login_event is E.ESTABLISHED
        first.wait_disconnected()
        first.close()
        target.wait_line(
            rf"{STAMP} logout: {who(first, ip_a)} \(channel 1\): "
            "replaced by a new login of the initiator"
        )
        target.wait_line(rf"{STAMP} login: {who(second, ip_a)} \(channel 2\)")
        second.logout()
        target.wait_line(rf"{STAMP} logout: .* \(channel 2\): disconnected by the initiator")
        target.proc.send_signal(signal.SIGINT)
        assert target.proc.wait(TIMEOUT) == 0, target.stderr()
    assert re.search(rf"^{STAMP} stopping \(SIGINT\): logging out 0 initiators$",
                     target.stdout(), re.M)  # fmt: skip
    assert image.read_bytes() == bytes(1 << 20)


@pytest.fixture
def taken(tmp_path: Path) -> Iterator[str]:
    """A loopback address whose UDP port 4791 another program holds."""
    (ip,) = loopback_addresses(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, ROCE_V2_UDP_DPORT))
        yield ip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], r"the following arguments are required: IMAGE, --ip"),
        (["IMG", "--ip", "IP", "--bogus"], r"unrecognized arguments: --bogus"),
        (["IMG", "--ip", "0.0.0.0"], r"argument --ip: 0\.0\.0\.0: a target needs one address .*"),
        (["IMG", "--ip", "IP", "--block-size", "1024"], r"argument --block-size: invalid choice.*"),
        (["IMG", "--ip", "IP", "--id-ext", "xyz"], r"argument --id-ext: invalid 64-bit hex .*"),
        (
            ["IMG", "--ip", "IP", "--port", "0"],
            r"argument --port: invalid port: '0' \(1\.\.65535\)",
        ),
        (["IMG", "--ip", "IP", "--create-size", "1x"], r"argument --create-size: invalid size.*"),
        (
            ["MISSING", "--ip", "IP"],
            r".*missing\.img: no such image \(--create-size SIZE makes one\)",
        ),
        (["IMG", "--ip", "IP", "--create-size", "1000"], r"--create-size 1000: not a multiple .*"),
        (
            ["IMG", "--ip", "IP", "--create-size", "2M"],
            r".*disk\.img: exists with 1048576 bytes, .*",
        ),
        (["IMG", "--ip", "IP", "-d", "mlx5_0"], r"no device 'mlx5_0' \(one of rxe0, hca0\)"),
        (["IMG", "--ip", "192.0.2.1"], r"192\.0\.2\.1 is not an address of this host"),
        (["IMG", "--ip", "TAKEN"], r"UDP port 4791 on [0-9.]+ is already in use: .*"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_1(
    tmp_path: Path, taken: str, args: list[str], message: str
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    (ip,) = loopback_addresses(1)
    subst = {"IMG": str(image), "MISSING": str(tmp_path / "missing.img"), "IP": ip, "TAKEN": taken}
    argv = softrdma("target", *(subst.get(a, a) for a in args))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    assert re.fullmatch(rf"softrdma srp target: {message}\n", proc.stderr), proc.stderr
    assert image.stat().st_size == 1 << 20


def test_a_missing_subcommand_is_one_line() -> None:
    proc = subprocess.run(softrdma(), capture_output=True, text=True, timeout=TIMEOUT)
    assert (proc.returncode, proc.stderr) == (
        1, "softrdma srp: the following arguments are required: SUBCOMMAND\n"
    )  # fmt: skip


def test_sizes_and_identifiers_parse_as_documented() -> None:
    assert parse_size("64M") == parse_size("64MiB") == parse_size("65536k") == 64 << 20
    assert parse_size("4096") == 4096 and parse_size("1G") == 1 << 30
    assert (
        parse_guid("505400fffe770001") == parse_guid("0x5054:00ff:fe77:0001") == 0x505400FFFE770001
    )
