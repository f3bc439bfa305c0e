"""``softrdma rping`` against rdma-core's real ``rping`` on Linux rxe.

The Linux side runs in the VM (rdma-core 44's ``rping``, kernel 6.1
``rdma_rxe`` and its RDMA CM, 10.77.0.1); softrdma runs on the host inside
the VM's namespace (10.77.0.2) with the same interpreter as pytest. Both
roles, both softrdma device kinds (``rxe0``, the CPU-copy device, and
``hca0``, a hardware HCA behind an IOMMU), three sizes: 64 bytes, a page,
and 65535 bytes — rping's largest, which at the RoCE MTU of 1024 makes every
RDMA READ and WRITE 64 packets. Each run has ``-v -V`` on both sides: both
exit 0, the ping lines each side prints are the ones the other side put on
the wire, and the validating client found no mismatch.

softrdma's ``--pcap`` records each exchange, which is then read back:
REQ / REP / RTU / DREQ / DREP in that order and direction, tied together by
their comm IDs and TIDs; the RC traffic on the QPNs the CM exchanged, the
requests of each side starting at the PSN the *other* side put in its REQ
or REP (the starting PSN a side sends in its REQ or REP is the one it
receives from), every request PSN used once in order, every ACK or READ
response carrying the PSN and MSN of what it answers, and the UDP source
port of both directions the one the REQ's flow label gives (which is how
Linux picks it too); the RETHs name the buffers the client advertised, and
the READ and WRITE payloads are the ping pattern. Where tshark is installed
it decodes the same file and must agree frame by frame.

The error path: a client asking for a port nobody listens on is rejected —
Linux's CM answers softrdma's REQ with a REJ, reason 8 (invalid service ID),
and softrdma's does the same for Linux's — and both clients print rping's
lines and exit 255.

The VM runs under TCG, yet each exchange takes well under a second of VM
time (the counts below are small); every process is bounded by
:data:`RUN_TIMEOUT` and stopped whatever happens.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from softrdma.cli.rping import ping_pattern
from softrdma.cm.cma_hdr import CmaHdr, RdmaPortSpace, rdma_ps_service_id
from softrdma.cm.messages import (
    CmDrep,
    CmDreq,
    CmMessage,
    CmMsgResponse,
    CmRej,
    CmRejReason,
    CmRep,
    CmReq,
    CmRtu,
    decode_cm_mad,
)
from softrdma.fabric.pcap import PcapReader
from softrdma.mad.header import MadHdr
from softrdma.transport.opcodes import Opcode, opcode_info
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_MASK
from softrdma.transport.roce import decode_roce_v2, rdma_get_udp_sport
from tests.interop.linuxvm import CommandResult, LinuxPeer, VmCommandTimeout

pytestmark = pytest.mark.interop

SRC = Path(__file__).resolve().parents[2] / "src"
RUN_TIMEOUT = 40.0
"""Bound on one process of an exchange, either side (they take about a second)."""
RPING_PORT = 7174
PATH_MTU = 1024
"""The RoCE path MTU of the tap link (MTU 1500)."""
AETH_ACK = 0x1F
"""AETH syndrome of a plain ACK with unlimited credits, as rxe sends it."""

READ_RESPONSES = frozenset({
    Opcode.RC_RDMA_READ_RESPONSE_FIRST, Opcode.RC_RDMA_READ_RESPONSE_MIDDLE,
    Opcode.RC_RDMA_READ_RESPONSE_LAST, Opcode.RC_RDMA_READ_RESPONSE_ONLY,
})  # fmt: skip

#: (size, count): 64 bytes, a page, and rping's largest (64 packets per READ and WRITE).
CASES: list[tuple[int, int]] = [(64, 20), (4096, 10), (65535, 4)]
DEVICES = ["rxe0", "hca0"]
ROLES = ["linux-server", "softrdma-server"]

_ports = itertools.count(7300)

SERVER_END = "server DISCONNECT EVENT...\nwait for RDMA_READ_ADV state 10\n"
"""What both rpings print on stderr when the client has disconnected."""
CLIENT_END = "client DISCONNECT EVENT...\n"
REJECTED = "cma event RDMA_CM_EVENT_REJECTED, error 8"
REJECTED_LINES = [REJECTED, "wait for CONNECTED state 4", "connect error -1"]
"""A rejected client's stderr: the CM thread's line, then the main thread's.
rping's CM thread ``exit()``s at once, racing the main thread, so Linux
prints a prefix of these (once even the middle line twice, once only a
fragment, "-", of the last); softrdma, whose
threads take turns, always prints all three."""


# --------------------------------------------------------------------------- running


def softrdma_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


def softrdma_argv(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "softrdma", "rping", *args]


def describe(who: str, result: CommandResult) -> str:
    return f"--- {who} exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def wait_rdma_listen(peer: LinuxPeer, port: int, timeout: float = 30.0) -> None:
    """Wait until an RDMA CM ID in the VM listens on ``port`` (``rdma res show cm_id``)."""
    deadline = time.monotonic() + timeout
    want = f"src-addr {peer.vm_ip}:{port} "
    while True:
        out = peer.run(["rdma", "res", "show", "cm_id"], timeout=30).stdout
        if any("state LISTEN" in line and want in line + " " for line in out.splitlines()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"rping in the VM never listened on port {port}:\n{out}")
        time.sleep(0.2)


def port_args(port: int) -> list[str]:
    return [] if port == RPING_PORT else ["-p", str(port)]


def linux_server_softrdma_client(
    peer: LinuxPeer, args: list[str], port: int, host_args: list[str]
) -> tuple[CommandResult, CommandResult]:
    """``rping -s -a VM ARGS`` in the VM, ``softrdma rping -c -a VM -I HOST ARGS`` on the host.

    Returns (softrdma client, Linux server)."""
    server = peer.spawn(["rping", "-s", "-a", peer.vm_ip, *args], timeout=RUN_TIMEOUT)
    try:
        wait_rdma_listen(peer, port)
        argv = softrdma_argv(["-c", "-a", peer.vm_ip, "-I", peer.host_ip, *args, *host_args])
        try:
            client = peer.host_run(argv, timeout=RUN_TIMEOUT, env=softrdma_env())
        except subprocess.TimeoutExpired as e:
            client = CommandResult(-9, _text(e.stdout), _text(e.stderr) + "\n[timed out]")
        try:
            linux = server.wait(RUN_TIMEOUT if client.returncode == 0 else 10.0)
        except VmCommandTimeout as e:
            linux = CommandResult(-9, e.stdout, e.stderr + "\n[timed out]")
        except TimeoutError:
            linux = server.stop() or CommandResult(-9, "", "[no result]")
    finally:
        server.stop()
    return client, linux


class SoftrdmaServer:
    """``softrdma rping -s -a HOST ARGS`` running on the host, its output
    going to files (a 64 KiB ``-v`` line would fill a pipe nobody reads
    until the client has finished, and stall the server in ``write``)."""

    def __init__(self, peer: LinuxPeer, args: list[str]) -> None:
        # closed by result(), which every user calls
        self.out = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")  # noqa: SIM115
        self.err = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")  # noqa: SIM115
        argv = softrdma_argv(["-s", "-a", peer.host_ip, *args])
        self.proc = peer.host_popen(argv, env=softrdma_env(), stdout=self.out, stderr=self.err)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (softrdma tears down as for a killed process), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def result(self, timeout: float) -> CommandResult:
        """Wait up to ``timeout`` s for it to end (stopping it after that)."""
        note = ""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            note = "\n[stopped: did not finish]"
        texts = []
        for f in (self.out, self.err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        return CommandResult(self.proc.returncode, texts[0], texts[1] + note)

    @classmethod
    def start(cls, peer: LinuxPeer, args: list[str]) -> SoftrdmaServer:
        """Start it and wait until its device is up. The device binds UDP
        4791 before the server listens; listening follows within the same
        step, so a short pause after the bind covers it (and
        :func:`linux_client` tries again should a request still come too
        early)."""
        server = cls(peer, args)
        deadline = time.monotonic() + 30.0
        while not peer.host_run(["ss", "-Hlun", "sport = :4791"], timeout=30).stdout.strip():
            if not server.running() or time.monotonic() > deadline:
                failed = server.result(0.0)
                pytest.fail(describe("softrdma server (never bound UDP 4791)", failed))
            time.sleep(0.1)
        time.sleep(0.5)
        return server


def linux_client(peer: LinuxPeer, args: list[str], server: SoftrdmaServer) -> CommandResult:
    """``rping -c -a HOST -I VM ARGS`` in the VM; tried again (up to twice)
    if it was rejected while the softrdma server had not listened yet."""
    for _ in range(3):
        try:
            result = peer.run(
                ["rping", "-c", "-a", peer.host_ip, "-I", peer.vm_ip, *args], timeout=RUN_TIMEOUT
            )
        except VmCommandTimeout as e:
            return CommandResult(-9, e.stdout, e.stderr + "\n[timed out]")
        if not (result.returncode == 255 and REJECTED in result.stderr and server.running()):
            return result
        time.sleep(1.0)
    return result


def softrdma_server_linux_client(
    peer: LinuxPeer, args: list[str], port: int, host_args: list[str]
) -> tuple[CommandResult, CommandResult]:
    """``softrdma rping -s -a HOST ARGS`` on the host, ``rping -c -a HOST ARGS`` in the VM.

    Returns (softrdma server, Linux client)."""
    server = SoftrdmaServer.start(peer, [*args, *host_args])
    try:
        linux = linux_client(peer, args, server)
    finally:
        ours = server.result(RUN_TIMEOUT if linux.returncode == 0 else 10.0)
    return ours, linux


# --------------------------------------------------------------------------- the pcap


@dataclass(frozen=True)
class Frame:
    """One RoCEv2 frame of softrdma's pcap, decoded (ICRC checked)."""

    index: int
    src: IPv4Address
    dst: IPv4Address
    sport: int
    packet: Packet
    mad: tuple[MadHdr, CmMessage] | None

    @property
    def opcode(self) -> int:
        return self.packet.bth.opcode

    @property
    def psn(self) -> int:
        return self.packet.bth.psn

    def __repr__(self) -> str:
        what = type(self.mad[1]).__name__ if self.mad else Opcode(self.opcode).name
        return f"#{self.index} {self.src}->{self.dst} {what} PSN {self.psn}"


def read_frames(path: Path) -> list[Frame]:
    frames = []
    with PcapReader(path) as reader:
        for index, rec in enumerate(reader):
            rf = decode_roce_v2(bytes(rec.data))
            p = rf.packet
            mad = decode_cm_mad(bytes(p.payload)) if p.bth.dest_qp == 1 else None
            src, dst = IPv4Address(rf.saddr), IPv4Address(rf.daddr)
            frames.append(Frame(index, src, dst, rf.sport, p, mad))
    return frames


@dataclass(frozen=True)
class Connection:
    """What the CM exchanged for the connection of a pcap."""

    req: CmReq
    rep: CmRep
    rejected: int
    """REQs rejected (reason 8) before the one that connected."""


def check_cm(
    frames: list[Frame], client: IPv4Address, server: IPv4Address, port: int
) -> Connection:
    """REQ, REP, RTU from the client's REQ to the RTU; DREQ from the client
    and DREP at the end; comm IDs and TIDs tying them together; the REQ's
    RDMA CM fields. Rejected attempts (REQ, REJ reason 8) may come first."""
    cm = [(f, *f.mad) for f in frames if f.mad is not None]
    rejected = 0
    while len(cm) >= 2 and isinstance(cm[1][2], CmRej):
        (f_req, _, req), (f_rej, _, rej) = cm[0], cm[1]
        assert isinstance(req, CmReq) and isinstance(rej, CmRej), cm[:2]
        assert (f_req.src, f_rej.src) == (client, server)
        assert rej.reason == CmRejReason.INVALID_SERVICE_ID
        assert rej.remote_comm_id == req.local_comm_id
        cm, rejected = cm[2:], rejected + 1
    kinds = [(type(msg), f.src) for f, _, msg in cm]
    assert kinds == [
        (CmReq, client), (CmRep, server), (CmRtu, client), (CmDreq, client), (CmDrep, server)
    ], cm  # fmt: skip
    (_, h_req, req), (_, h_rep, rep), (_, h_rtu, rtu), (_, h_dreq, dreq), (_, h_drep, drep) = cm
    assert isinstance(req, CmReq) and isinstance(rep, CmRep) and isinstance(rtu, CmRtu)
    assert isinstance(dreq, CmDreq) and isinstance(drep, CmDrep)
    # comm IDs: each side's own first; TIDs: REP and RTU reuse the REQ's, DREP its DREQ's
    assert rep.remote_comm_id == req.local_comm_id != rep.local_comm_id
    mine = (req.local_comm_id, rep.local_comm_id)
    assert (rtu.local_comm_id, rtu.remote_comm_id) == mine
    assert (dreq.local_comm_id, dreq.remote_comm_id) == mine
    assert (drep.local_comm_id, drep.remote_comm_id) == mine[::-1]
    assert h_req.tid == h_rep.tid == h_rtu.tid
    assert h_drep.tid == h_dreq.tid
    assert dreq.remote_qpn == rep.local_qpn
    # the RDMA CM's REQ: service ID of the port, cma_hdr, RoCE path, rping's depths
    assert req.service_id == rdma_ps_service_id(RdmaPortSpace.TCP, port)
    hdr = CmaHdr.decode(req.private_data)
    assert (hdr.src, hdr.dst) == (client, server)
    assert req.primary_flow_label == (hdr.src_port * 31 + port) & 0xFFFFF
    assert req.private_data[36:] == bytes(56)  # rping sends no private data
    assert req.primary_local_gid == bytes(10) + b"\xff\xff" + client.packed
    assert req.primary_remote_gid == bytes(10) + b"\xff\xff" + server.packed
    assert (req.path_mtu, req.transport_service_type, req.primary_hop_limit) == (3, 0, 64)
    assert (req.responder_resources, req.initiator_depth) == (1, 1)
    assert (req.retry_count, req.rnr_retry_count, req.max_cm_retries) == (7, 7, 15)
    assert (rep.responder_resources, rep.initiator_depth, rep.rnr_retry_count) == (1, 1, 7)
    assert rep.private_data == bytes(196)
    return Connection(req, rep, rejected)


@dataclass(frozen=True)
class Message:
    """One request message on the wire: its opcode (of the first packet),
    first and last PSN, RETH, and the payload of all its packets."""

    opcode: int
    first: int
    last: int
    reth: tuple[int, int, int] | None
    payload: bytes


def messages(requests: list[Frame], start: int) -> list[Message]:
    """The request messages of one requester, each PSN used once, in
    order from ``start`` (a retransmitted packet must repeat what was
    sent); a READ request takes as many PSNs as it has response packets."""
    out: list[Message] = []
    seen: dict[int, Frame] = {}
    expected = start
    open_msg: list[Frame] = []
    for f in requests:
        if f.psn in seen:  # a retransmission: the same packet again
            assert (seen[f.psn].opcode, bytes(seen[f.psn].packet.payload)) == (
                f.opcode, bytes(f.packet.payload)), f  # fmt: skip
            continue
        assert f.psn == expected, f"{f}: expected PSN {expected}"
        seen[f.psn] = f
        info = opcode_info(f.opcode)
        open_msg.append(f)
        npsn = math.ceil(f.packet.reth.dma_len / PATH_MTU) if info.is_read and f.packet.reth else 1
        expected = (expected + npsn) & PSN_MASK
        if info.is_last or info.is_only:
            first = open_msg[0]
            reth = first.packet.reth
            out.append(Message(
                first.opcode, first.psn, (expected - 1) & PSN_MASK,
                (reth.va, reth.rkey, reth.dma_len) if reth else None,
                b"".join(bytes(m.packet.payload) for m in open_msg),
            ))  # fmt: skip
            open_msg = []
    assert not open_msg, f"an unfinished message: {open_msg}"
    return out


def check_responses(responses: list[Frame], msgs: list[Message], start: int) -> list[bytes]:
    """Every ACK is a plain ACK whose MSN counts the messages up to the PSN
    it acknowledges; every READ response is for a READ's PSN range, its MSN
    counting that READ. Returns the data of each READ, from the responses."""

    def off(psn: int) -> int:
        return (psn - start) & PSN_MASK

    reads: dict[int, list[Frame]] = {}
    for f in responses:
        info = opcode_info(f.opcode)
        aeth = f.packet.aeth
        if info.is_ack:
            assert aeth is not None and aeth.syndrome == AETH_ACK, f
            assert aeth.msn == sum(off(m.last) <= off(f.psn) for m in msgs), f
            continue
        assert f.opcode in READ_RESPONSES, f
        (k,) = [
            k for k, m in enumerate(msgs)
            if opcode_info(m.opcode).is_read and off(m.first) <= off(f.psn) <= off(m.last)
        ]  # fmt: skip
        if aeth is not None:  # FIRST, LAST and ONLY carry one
            assert aeth.syndrome == AETH_ACK and aeth.msn == k + 1, f
        reads.setdefault(k, [])
        if f.psn not in {r.psn for r in reads[k]}:
            reads[k].append(f)
    out = []
    for k, m in enumerate(msgs):
        if opcode_info(m.opcode).is_read:
            got = sorted(reads.get(k, []), key=lambda r: off(r.psn))
            assert [off(r.psn) for r in got] == list(range(off(m.first), off(m.last) + 1)), m
            out.append(b"".join(bytes(r.packet.payload) for r in got))
    return out


def check_rc(
    frames: list[Frame],
    conn: Connection,
    client: IPv4Address,
    server: IPv4Address,
    size: int,
    count: int,
) -> None:
    """The RC traffic against what the CM exchanged and what rping does."""
    req, rep = conn.req, conn.rep
    rc = [f for f in frames if f.mad is None]
    assert rc, "no RC traffic"
    sport = rdma_get_udp_sport(req.primary_flow_label, 0, 0)
    assert {f.sport for f in rc} == {sport}, "UDP source ports not from the REQ's flow label"
    c2s = [f for f in rc if f.src == client]
    s2c = [f for f in rc if f.src == server]
    assert len(c2s) + len(s2c) == len(rc)
    assert {f.packet.bth.dest_qp for f in c2s} == {rep.local_qpn}
    assert {f.packet.bth.dest_qp for f in s2c} == {req.local_qpn}

    def is_request(f: Frame) -> bool:
        return opcode_info(f.opcode).is_request

    # the client requests from the REP's PSN, the server from the REQ's
    c_msgs = messages([f for f in c2s if is_request(f)], rep.starting_psn)
    s_msgs = messages([f for f in s2c if is_request(f)], req.starting_psn)
    reads = check_responses([f for f in c2s if not is_request(f)], s_msgs, req.starting_psn)
    check_responses([f for f in s2c if not is_request(f)], c_msgs, rep.starting_psn)

    # client: per ping, an rping_rdma_info for its start buffer, then for its sink
    assert [m.opcode for m in c_msgs] == [Opcode.RC_SEND_ONLY] * 2 * count
    infos = [(int.from_bytes(m.payload[:8]), int.from_bytes(m.payload[8:12]),
              int.from_bytes(m.payload[12:16])) for m in c_msgs]  # fmt: skip
    assert all(len(m.payload) == 16 for m in c_msgs)
    start_adv, sink_adv = infos[0], infos[1]
    assert infos == [start_adv, sink_adv] * count
    assert start_adv[2] == sink_adv[2] == size and start_adv[:2] != sink_adv[:2]
    # server: per ping, READ the start buffer, go ahead, WRITE the sink, go ahead
    npkt = math.ceil(size / PATH_MTU)
    write_op = Opcode.RC_RDMA_WRITE_ONLY if npkt == 1 else Opcode.RC_RDMA_WRITE_FIRST
    assert [m.opcode for m in s_msgs] == [
        Opcode.RC_RDMA_READ_REQUEST, Opcode.RC_SEND_ONLY, write_op, Opcode.RC_SEND_ONLY
    ] * count  # fmt: skip
    pings = [ping_pattern(i, 65 + i % 58, size) for i in range(count)]
    for i in range(count):
        read, go1, write, go2 = s_msgs[4 * i : 4 * i + 4]
        assert read.reth == start_adv and write.reth == sink_adv
        assert (read.last - read.first) & PSN_MASK == npkt - 1
        assert (write.last - write.first) & PSN_MASK == npkt - 1
        assert reads[i] == write.payload == pings[i]
        # neither rping fills its server's message buffer: the go-aheads are zeros
        assert go1.payload == go2.payload == bytes(16)


TSHARK_FIELDS = (
    "ip.src", "ip.dst", "udp.srcport", "infiniband.bth.opcode", "infiniband.bth.destqp",
    "infiniband.bth.psn", "infiniband.mad.attributeid", "infiniband.cm.req.localqpn",
    "infiniband.cm.req.startpsn", "infiniband.cm.rep.localqpn", "infiniband.cm.rep.startpsn",
    "infiniband.cm.rej.reason", "infiniband.reth.dmalen", "infiniband.aeth.msn",
)  # fmt: skip


def tshark_rows(path: Path) -> list[list[str]]:
    args = ["tshark", "-r", str(path), "--disable-protocol", "rpcordma", "-T", "fields",
            "-E", "separator=|", "-E", "occurrence=f"]  # fmt: skip
    for f in TSHARK_FIELDS:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


def our_row(f: Frame) -> list[str]:
    """What :func:`tshark_rows` should say for ``f``."""
    p = f.packet
    blank = [""] * 7
    if f.mad is not None:
        hdr, msg = f.mad
        cm = blank[:]
        cm[0] = f"{hdr.attr_id:#06x}"
        if isinstance(msg, CmReq):
            cm[1:3] = [f"{msg.local_qpn:#08x}", f"{msg.starting_psn:#08x}"]
        elif isinstance(msg, CmRep):
            cm[3:5] = [f"{msg.local_qpn:#08x}", f"{msg.starting_psn:#08x}"]
        elif isinstance(msg, CmRej):
            cm[5] = f"{int(msg.reason):#06x}"
    else:
        cm = blank[:]
        cm[6] = str(p.reth.dma_len) if p.reth else ""
    return [str(f.src), str(f.dst), str(f.sport), str(p.bth.opcode), f"{p.bth.dest_qp:#08x}",
            str(p.bth.psn), *cm[:6], cm[6], str(p.aeth.msn) if p.aeth else ""]  # fmt: skip


def check_with_tshark(path: Path, frames: list[Frame]) -> None:
    """Wireshark's InfiniBand dissector reads the same frames (where installed)."""
    if shutil.which("tshark") is None:
        return
    rows = tshark_rows(path)
    assert len(rows) == len(frames)
    for row, f in zip(rows, frames, strict=True):
        assert row == our_row(f), f"{f}: tshark {row}"


def check_pcap(
    path: Path, client: str, server: str, port: int, size: int, count: int
) -> Connection:
    assert path.exists(), f"no pcap at {path}"
    frames = read_frames(path)
    c, s = IPv4Address(client), IPv4Address(server)
    assert {(f.src, f.dst) for f in frames} <= {(c, s), (s, c)}
    conn = check_cm(frames, c, s, port)
    check_rc(frames, conn, c, s, size, count)
    check_with_tshark(path, frames)
    return conn


# --------------------------------------------------------------------------- output


def ping_lines(size: int, count: int, prefix: str) -> str:
    """The lines ``-v`` prints: the buffer as a C string."""
    return "".join(
        f"{prefix}{ping_pattern(i, 65 + i % 58, size)[:-1].decode()}\n" for i in range(count)
    )


def check_outputs(
    role: str, softrdma: CommandResult, linux: CommandResult, size: int, count: int
) -> None:
    """Both exit 0; the client's ``ping data:`` lines are the server's
    ``server ping data:`` lines (each the pattern of its ping), no ``data
    mismatch!``, and the teardown lines rping prints."""
    report = describe("softrdma", softrdma) + "\n" + describe("rping", linux)
    assert softrdma.returncode == 0 and linux.returncode == 0, report
    client, server = (softrdma, linux) if role == "linux-server" else (linux, softrdma)
    assert "data mismatch!" not in client.stderr, report
    assert client.stdout == ping_lines(size, count, "ping data: "), report
    assert server.stdout == ping_lines(size, count, "server ping data: "), report
    assert [line.removeprefix("server ") for line in server.stdout.splitlines()] == (
        client.stdout.splitlines()
    )
    assert server.stderr == SERVER_END, report
    if role == "linux-server":
        assert client.stderr == CLIENT_END, report
    else:  # rping's client races the DISCONNECTED event against its teardown
        assert client.stderr in ("", CLIENT_END), report


def exchange(
    peer: LinuxPeer, role: str, args: list[str], port: int, host_args: list[str]
) -> tuple[CommandResult, CommandResult]:
    """Returns (softrdma, Linux)."""
    if role == "linux-server":
        return linux_server_softrdma_client(peer, args, port, host_args)
    return softrdma_server_linux_client(peer, args, port, host_args)


def endpoints(peer: LinuxPeer, role: str) -> tuple[str, str]:
    """(client address, server address)."""
    return (peer.host_ip, peer.vm_ip) if role == "linux-server" else (peer.vm_ip, peer.host_ip)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("size", "count"), CASES, ids=[f"S{s}" for s, _ in CASES])
def test_rping(
    linux_peer: LinuxPeer, role: str, device: str, size: int, count: int, tmp_path: Path
) -> None:
    port = next(_ports)
    pcap = tmp_path / "rping.pcap"
    args = [*port_args(port), "-v", "-V", "-C", str(count), "-S", str(size)]
    softrdma, linux = exchange(
        linux_peer, role, args, port, ["--ib-dev", device, "--pcap", str(pcap)]
    )
    check_outputs(role, softrdma, linux, size, count)
    client, server = endpoints(linux_peer, role)
    check_pcap(pcap, client, server, port, size, count)


@pytest.mark.parametrize("role", ROLES)
def test_default_port_and_size(linux_peer: LinuxPeer, role: str, tmp_path: Path) -> None:
    """No ``-p``, no ``-S``: port 7174 (service ID 0x1061c06) and 64 bytes."""
    pcap = tmp_path / "rping.pcap"
    softrdma, linux = exchange(linux_peer, role, ["-v", "-V", "-C", "3"], RPING_PORT,
                               ["--pcap", str(pcap)])  # fmt: skip
    check_outputs(role, softrdma, linux, 64, 3)
    client, server = endpoints(linux_peer, role)
    conn = check_pcap(pcap, client, server, RPING_PORT, 64, 3)
    assert conn.req.service_id == 0x0000000001061C06


def check_rejected(result: CommandResult) -> None:
    """A rejected rping client: exit 255, nothing on stdout, the lines of a
    rejection (Linux's racing ``exit()`` may leave only a fragment of its
    last line)."""
    assert result.returncode == 255, describe("client", result)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and lines[0] == REJECTED, result.stderr
    assert set(lines[:-1]) <= set(REJECTED_LINES), result.stderr
    assert any(lines[-1] in line for line in REJECTED_LINES), result.stderr


def check_reject_pcap(path: Path, client: str, server: str, port: int) -> list[Frame]:
    """The client's REQ and the server's REJ (reason 8, for the REQ), then nothing else."""
    frames = read_frames(path)
    c, s = IPv4Address(client), IPv4Address(server)
    cm = [(f, *f.mad) for f in frames if f.mad is not None]
    assert len(cm) >= 2 and [(type(m), f.src) for f, _, m in cm[:2]] == [
        (CmReq, c), (CmRej, s)], cm  # fmt: skip
    (_, h_req, req), (_, h_rej, rej) = cm[0], cm[1]
    assert isinstance(req, CmReq) and isinstance(rej, CmRej)
    assert req.service_id == rdma_ps_service_id(RdmaPortSpace.TCP, port)
    assert rej.reason == CmRejReason.INVALID_SERVICE_ID and int(rej.reason) == 8
    # Linux's REJ for a REQ nobody listens for: no comm ID of its own, the
    # REQ's in remote, no ARI, no private data; softrdma's must be the same
    assert rej == CmRej(
        remote_comm_id=req.local_comm_id,
        message_rejected=CmMsgResponse.REQ,
        reason=CmRejReason.INVALID_SERVICE_ID,
    )
    assert h_rej == dataclasses.replace(h_req, attr_id=CmRej.ATTR_ID)  # the REQ's TID
    check_with_tshark(path, frames)
    return frames


def test_softrdma_client_rejected_by_linux(linux_peer: LinuxPeer, tmp_path: Path) -> None:
    """Nothing listens on the port in the VM: Linux's CM answers the REQ
    with a REJ (invalid service ID), the client gets REJECTED, error 8, and
    prints what rping prints for it — the same as Linux's own rping, run in
    the VM against its own rxe0."""
    peer = linux_peer
    port = next(_ports)
    pcap = tmp_path / "rejected.pcap"
    argv = softrdma_argv(["-c", "-a", peer.vm_ip, "-I", peer.host_ip, "-p", str(port), "-C", "1",
                          "-v", "--pcap", str(pcap)])  # fmt: skip
    ours = peer.host_run(argv, timeout=RUN_TIMEOUT, env=softrdma_env())
    check_rejected(ours)
    assert ours.stderr.splitlines() == REJECTED_LINES  # softrdma's threads do not race
    frames = check_reject_pcap(pcap, peer.host_ip, peer.vm_ip, port)
    assert len(frames) == 2  # and nothing else: no RC traffic, no retry
    theirs = peer.run(["rping", "-c", "-a", peer.vm_ip, "-p", str(port), "-C", "1", "-v"],
                      timeout=RUN_TIMEOUT)  # fmt: skip
    check_rejected(theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_linux_client_rejected_by_softrdma(
    linux_peer: LinuxPeer, device: str, tmp_path: Path
) -> None:
    """A softrdma server on one port; Linux's rping asks for the next port:
    softrdma's CM rejects it (reason 8) and Linux's rping reports it as for
    Linux's own REJ. The server then serves a client on its port."""
    peer = linux_peer
    port = next(_ports)
    pcap = tmp_path / "server.pcap"
    server = SoftrdmaServer.start(
        peer, ["-p", str(port), "-v", "-C", "2", "--ib-dev", device, "--pcap", str(pcap)]
    )
    right = CommandResult(-1, "", "[not run]")
    try:
        wrong = peer.run(["rping", "-c", "-a", peer.host_ip, "-I", peer.vm_ip, "-p",
                          str(port + 1000), "-C", "1", "-v"], timeout=RUN_TIMEOUT)  # fmt: skip
        check_rejected(wrong)
        assert server.running(), "the server ended after a REQ for another port"
        right = linux_client(peer, ["-p", str(port), "-v", "-V", "-C", "2"], server)
    finally:
        ours = server.result(RUN_TIMEOUT if right.returncode == 0 else 10.0)
    check_outputs("softrdma-server", ours, right, 64, 2)
    frames = check_reject_pcap(pcap, peer.vm_ip, peer.host_ip, port + 1000)
    later = frames[2:]
    conn = check_cm(later, IPv4Address(peer.vm_ip), IPv4Address(peer.host_ip), port)
    check_rc(later, conn, IPv4Address(peer.vm_ip), IPv4Address(peer.host_ip), 64, 2)


def test_vm_is_still_healthy(linux_peer: LinuxPeer) -> None:
    """After the exchanges above, rxe0 is up, the kernel logged no warning,
    and no RDMA CM ID is left behind in the VM."""
    dmesg = linux_peer.run(["dmesg"], check=True).stdout
    assert "BUG:" not in dmesg and "Oops" not in dmesg and "Call Trace" not in dmesg, dmesg
    assert "PORT_ACTIVE" in linux_peer.run(["ibv_devinfo"], check=True).stdout
    cm_ids = linux_peer.run(["rdma", "res", "show", "cm_id"], check=True).stdout
    assert "rping" not in cm_ids, cm_ids
