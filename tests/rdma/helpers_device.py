"""Helpers for the device-level tests (lifecycle, drops, faults, local
operations, deep queues, platforms): a raw port that puts hand-made
Ethernet frames on the in-process fabric, frame surgery that keeps the
checksums a receiver would verify first, and small bounded drivers of the
simulated loop. Everything goes through public API: the fabric, the
RoCEv2 codecs, the verbs and the device counters."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric, FabricPort, PortStats
from softrdma.memory.host import Host
from softrdma.transport.headers import AethType, NakCode, aeth_syndrome_parse
from softrdma.transport.icrc import icrc_compute, icrc_pack
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.roce import RoceFrame, decode_roce_v2, encode_roce_v2
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.enums import IbAccess, IbQpType, IbSendFlags, IbWcStatus
from softrdma.verbs.qp import IbSigType, QpCap, QpInitAttr
from softrdma.verbs.wr import WorkCompletion
from tests.rdma.nodes import Node

SIG = IbSendFlags.SIGNALED
UNSIG = IbSendFlags(0)
RW = IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ
ALL_REMOTE = RW | IbAccess.REMOTE_ATOMIC

READ_RESPONSES = frozenset(
    {
        Opcode.RC_RDMA_READ_RESPONSE_FIRST,
        Opcode.RC_RDMA_READ_RESPONSE_MIDDLE,
        Opcode.RC_RDMA_READ_RESPONSE_LAST,
        Opcode.RC_RDMA_READ_RESPONSE_ONLY,
    }
)

# Offsets in an untagged Ethernet / IPv4 / UDP / BTH frame.
IP = 14
IP_FRAG = IP + 6
IP_PROTO = IP + 9
IP_CSUM = IP + 10
UDP = IP + 20
UDP_DPORT = UDP + 2
UDP_LEN = UDP + 4
BTH = UDP + 8
BTH_OPCODE = BTH
BTH_FLAGS = BTH + 1  # SE, MigReq, PadCnt, TVer


# -- ports on the fabric -------------------------------------------------------------


@dataclass(eq=False)
class RawPort:
    """A port that sends hand-made frames and records what reaches it."""

    ip: IPv4Address | IPv6Address
    mac: bytes
    received: list[bytes] = field(default_factory=list)

    def receive_frame(self, frame: bytes) -> None:
        self.received.append(frame)


def attach_raw_port(fabric: Fabric, ip: str) -> RawPort:
    addr = ip_address(ip)
    port = RawPort(addr, b"\x02\xee" + addr.packed[-4:])
    fabric.attach(port)
    return port


def device_port(fabric: Fabric, dev: RoceDevice) -> FabricPort:
    """The fabric port a device is plugged in with (found by its address)."""
    for port in fabric.ports:
        if port.ip == dev.ip:
            return port
    raise AssertionError(f"{dev.name} ({dev.ip}) is not on the fabric")


def port_stats(fabric: Fabric, dev: RoceDevice) -> PortStats:
    """Frames and bytes the device's port sent and was delivered."""
    return fabric.attachment(device_port(fabric, dev)).stats


# -- frames ----------------------------------------------------------------------------


def roce_frame(packet: Packet, src: str, dst: str, sport: int = 0xC001) -> bytes:
    """A complete, valid RoCEv2 frame (Ethernet / IPv4 / UDP / BTH ... / ICRC)."""
    return encode_roce_v2(
        RoceFrame.build(
            packet, src, dst, sport, eth_src=b"\x02\xee\0\0\0\1", eth_dst=b"\x02\xee\0\0\0\2"
        )
    )


def fix_ipv4_checksum(frame: bytes) -> bytes:
    """Recompute the IPv4 header checksum (options included) of an
    untagged frame."""
    buf = bytearray(frame)
    buf[IP_CSUM : IP_CSUM + 2] = b"\0\0"
    end = IP + (buf[IP] & 0x0F) * 4
    total = sum(int.from_bytes(buf[i : i + 2], "big") for i in range(IP, end, 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    buf[IP_CSUM : IP_CSUM + 2] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(buf)


def fix_icrc(frame: bytes) -> bytes:
    """Recompute the ICRC of an untagged IPv4 frame after editing it."""
    return frame[:-4] + icrc_pack(icrc_compute(frame[IP:-4]))


def edit(frame: bytes, offset: int, value: int) -> bytes:
    buf = bytearray(frame)
    buf[offset] = value
    return bytes(buf)


def opcodes(frames: Iterable[bytes]) -> list[int]:
    return [decode_roce_v2(f).packet.bth.opcode for f in frames]


def nak_codes(frames: Iterable[bytes]) -> list[NakCode]:
    """The NAK codes of the ACKNOWLEDGE packets among ``frames``."""
    codes: list[NakCode] = []
    for f in frames:
        pkt = decode_roce_v2(f).packet
        if pkt.bth.opcode == Opcode.RC_ACKNOWLEDGE and pkt.aeth is not None:
            kind, value = aeth_syndrome_parse(pkt.aeth.syndrome)
            if kind == AethType.NAK:
                codes.append(NakCode(value))
    return codes


def record(fabric: Fabric) -> list[bytes]:
    """Every frame the fabric carries from now on (a filter that drops none)."""
    frames: list[bytes] = []

    def keep(frame: bytes) -> bool:
        frames.append(bytes(frame))
        return False

    fabric.drop_when(keep)
    return frames


# -- counters ------------------------------------------------------------------------


def counters(dev: RoceDevice) -> Counter[str]:
    return Counter({k: v for k, v in dev.stats.items() if v})


def delta(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after.keys() | before.keys() if after[k] != before[k]}


# -- running the simulation ------------------------------------------------------------


def run_until(fabric: Fabric, predicate: Callable[[], object], max_events: int = 100_000) -> None:
    """Run the simulated loop until ``predicate()`` holds (bounded)."""
    assert fabric.loop.run_until(predicate, max_events=max_events), "the condition never held"


def settle(fabric: Fabric) -> None:
    """Run every pending event (all the tests' QPs give up in bounded time)."""
    fabric.loop.run(max_events=2_000_000)
    assert fabric.loop.idle, "the simulation did not settle"


def poll_all(cq: CompletionQueue, limit: int = 100_000) -> list[WorkCompletion]:
    """Everything on ``cq`` now (the loop should have settled)."""
    out: list[WorkCompletion] = []
    while len(out) < limit:
        got = cq.poll(min(1024, limit - len(out)))
        if not got:
            return out
        out += got
    return out


def wait_n(node: Node, n: int, cq: CompletionQueue | None = None) -> list[WorkCompletion]:
    """Exactly ``n`` completions (bounded polling)."""
    cq = cq or node.cq
    got: list[WorkCompletion] = []
    for _ in range(20 * n + 100):
        got += cq.poll(n - len(got))
        if len(got) >= n:
            return got
    raise AssertionError(f"{len(got)} of {n} completions: {got[-5:]}")


def statuses(wcs: Sequence[WorkCompletion]) -> list[tuple[int, IbWcStatus]]:
    return [(wc.wr_id, wc.status) for wc in wcs]


# -- memory ----------------------------------------------------------------------------


def ram_digest_except(host: Host, *ranges: tuple[int, int]) -> str:
    """SHA-256 of the host's RAM with the physical ranges ``(start, length)``
    left out: proof that nothing outside them changed."""
    ram = memoryview(host.ram)
    h = hashlib.sha256()
    pos = 0
    for start, length in sorted(ranges):
        h.update(ram[pos:start])
        pos = start + length
    h.update(ram[pos:])
    return h.hexdigest()


# -- QPs -----------------------------------------------------------------------------------


def rc_node(
    node: Node,
    *,
    cqe: int = 256,
    cap: QpCap | None = None,
    sig: IbSigType = IbSigType.REQ_WR,
    pd_flags: int = 0,
) -> Node:
    """Another RC QP on ``node``'s device, with its own PD and CQ and an
    explicit signalling type."""
    dev = node.dev
    pd = dev.alloc_pd(pd_flags)
    cq = dev.create_cq(cqe)
    init = QpInitAttr(
        IbQpType.RC,
        cq,
        cq,
        cap or QpCap(max_send_wr=128, max_recv_wr=128, max_send_sge=4, max_recv_sge=4),
        sq_sig_type=sig,
    )
    return Node(dev, pd, cq, dev.create_qp(pd, init))
