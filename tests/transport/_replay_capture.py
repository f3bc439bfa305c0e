"""Replay real rxe requesters against softrdma's RC responder.

The captures (``tests/data/captures``, SUMMARY.md) hold Linux 6.1 rdma_rxe on
10.77.0.1 (A) and 10.77.0.2 (B, the client); both QPs are 0x11, the path MTU
is 1024. For each capture we take the host that *responds* (found from the
opcodes: it sends ACKs, READ responses or ATOMIC ACKs to a peer that sends it
requests), put a softrdma device with that host's address on a recording
fake link (:mod:`tests.fabric.fakelink`, so the device sees nothing but the
``Network`` / ``Link`` protocol), give it a QP 0x11 in RTS with the
capture's parameters and the memory the capture shows was there, feed it
every request of the capture in capture order and at the capture's
(relative) times, and compare what it transmits with what rxe transmitted.

The QP parameters are the ones the tools exchanged over TCP (port 18515,
also in the captures): the peer's QPN, PSN (our rq_psn) and GID, our own
PSN, perftest's out_reads (our max_dest_rd_atomic: 128 for READ and
atomic, 1 for WRITE; ibv_rc_pingpong uses 1), and the VADDR and RKEY the
responder announced; path MTU 1024, timeout 14, retry 7, RNR retry 7,
min RNR timer 12 as both tools set them. They are checked against the
packets (first request PSN, QPNs, RETH/AtomicETH rkey and addresses), and
max_dest_rd_atomic against what the capture needs (17 READs and 20
atomics were outstanding at once).

How a request reaches the device: from the capture we keep only what a UDP
socket would show — the UDP payload, addresses and ports — and decode it
with :func:`~softrdma.transport.roce_udp.decode_roce_udp`, which has to
solve for the IPv4 ID and DF the ICRC covers (checked against the real
header). RETH and AtomicETH carry rxe's virtual address and rkey; they are
rewritten to the device's DMA MR rkey and its buffer's DMA address plus the
same offset from the VADDR the responder announced. Responses carry neither, so the
comparison with rxe's responses stays exact: opcode, PSN, AETH syndrome and
MSN, AtomicAckETH and payload, indeed every transport byte.

Which response answers which request: rxe answers requests in order, so each
response of the capture is attributed to the first not yet answered request
(from the last fully answered one on) whose PSN range covers the response's
PSN; an ACK, ATOMIC ACK or READ RESPONSE LAST/ONLY finishes an answer. The
device's answers are attributed by the link: what it transmits after the
k-th delivery and before the next answers request k. The two lists must be
equal request by request, so a response sent late, early or coalesced
differently would show.

Retransmitted requests: only rc_pingpong has any. A retransmitted six of its
SEND_ONLYs (PSNs 13057431, 432, 434, 436, 437, 439), each right behind the
original and before B's ACK of it; B acknowledged both copies with the same
ACK (PSN of the SEND, MSN unchanged) and completed one receive. The
"rc_pingpong-B" case replays A's SENDs, duplicates included, into a B-like
device: the duplicates must hit ``DUPLICATE_REQUEST`` (counter
``duplicate_request``), be acknowledged again with PSN = the last PSN
executed and the current MSN (C9-105, rxe ``duplicate_request``:
``send_ack(qp, AETH_ACK_UNLIMITED, prev_psn)``) — here the same PSN as the
duplicate, since it is the latest — and consume no receive. write_bw,
read_bw and atomic_bw contain no repeated PSN (checked below), so READ
replay from a responder resource and atomic replay of a saved original value
are not exercised by these captures; the ``test_repeated_*`` tests inject
captured WRITE, READ and atomic requests a second time after the run and
check the answers against rxe's first answers and rxe_resp.c's duplicate
handling (expectations from the kernel source, not from a capture).

Frames (the last tests): rxe's responses are reproduced byte for byte, ICRC
included, by :func:`~softrdma.transport.roce.encode_roce_v2` of the device's
packet, its destination address and UDP source port (``rdma_get_udp_sport``
of the two QPNs, 0xC121), TTL 64, TOS 0 and DF, given the two things the
device does not choose: the Ethernet addresses and the IPv4 ID. The IP ID
comes from the kernel's per-destination counter (``__ip_select_ident``),
which rxe's own requests to the same peer also advance and which jumps by a
random amount after idle time (``ip_idents_reserve``: in read_bw A sends
nothing but READ responses, yet its IDs jump from 0x7c09 to 0x7c0c after a
pause), so no link can follow it; with
the fake link's own counter the frames differ from rxe's only in the IP ID,
the IP header checksum and the ICRC (and the MACs).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from softrdma.fabric.pcap import LINKTYPE_ETHERNET, PcapReader
from softrdma.transport.opcodes import Opcode, opcode_info
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_MASK
from softrdma.transport.roce import (
    RoceFrame,
    decode_roce_v2,
)
from softrdma.transport.roce_udp import decode_roce_udp
from softrdma.verbs.enums import IbMtu

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "captures"
HOST_A = IPv4Address("10.77.0.1")
HOST_B = IPv4Address("10.77.0.2")
QPN = 0x11
PATH_MTU = IbMtu.MTU_1024
MTU = PATH_MTU.size
NETDEV_MTU = 1500
RXE_MAX_QP_RD_ATOM = 128
"""rxe's ``max_qp_rd_atom``: perftest's out_reads for READ and atomic tests
on rxe (it is in the captures' key lines: 0x0080)."""
FILLER = 0x5A
"""Memory the capture says nothing about (write_bw's buffer before the first
WRITE) is preset to this byte, so that a WRITE that did not land shows."""

_ANSWER_ENDS = frozenset(
    {
        Opcode.RC_ACKNOWLEDGE,
        Opcode.RC_ATOMIC_ACKNOWLEDGE,
        Opcode.RC_RDMA_READ_RESPONSE_LAST,
        Opcode.RC_RDMA_READ_RESPONSE_ONLY,
    }
)
_ETH, _IP_ID, _IP_CSUM = range(0, 12), range(18, 20), range(24, 26)
_U64 = struct.Struct("<Q")  # an x86 host's u64, what rxe's atomics act on
OOB_PORT = 18515
PINGPONG_RD_ATOMIC = 1
"""ibv_rc_pingpong's max_rd_atomic and max_dest_rd_atomic (not exchanged)."""


# --- the capture, as datagrams ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Datagram:
    """One RoCEv2 packet of a capture: what a UDP socket would show (payload,
    addresses, ports), plus the whole frame and the decode of it for the
    comparisons. ``index`` counts RoCEv2 frames only; ``time`` is seconds
    since the capture's first frame."""

    index: int
    time: float
    frame: bytes
    saddr: bytes
    daddr: bytes
    sport: int
    dport: int
    payload: bytes
    ref: RoceFrame

    @property
    def packet(self) -> Packet:
        return self.ref.packet

    @property
    def psn(self) -> int:
        return self.ref.packet.psn

    @property
    def src(self) -> IPv4Address:
        return IPv4Address(self.saddr)

    def __repr__(self) -> str:
        return f"#{self.index} {Opcode(self.packet.opcode).name} PSN {self.psn} from {self.src}"


@functools.cache
def _capture(name: str) -> tuple[Datagram, ...]:
    """The IPv4 / UDP 4791 frames of ``name``, parsed without softrdma's
    framing code (``ref`` is :func:`decode_roce_v2` of the frame, which also
    checks the ICRC with the real IP header)."""
    out: list[Datagram] = []
    t0: float | None = None
    with PcapReader(CAPTURES / name) as r:
        assert r.linktype == LINKTYPE_ETHERNET
        for rec in r:
            f = bytes(rec.data)
            if f[12:14] != b"\x08\x00" or f[23] != 17:  # IPv4 / UDP only here
                continue
            ihl = (f[14] & 0x0F) * 4
            tot_len = struct.unpack_from(">H", f, 16)[0]
            l4 = 14 + ihl
            sport, dport, ulen = struct.unpack_from(">HHH", f, l4)
            if dport != 4791:
                continue
            assert ulen == tot_len - ihl
            if t0 is None:
                t0 = rec.timestamp
            out.append(
                Datagram(
                    len(out),
                    rec.timestamp - t0,
                    f,
                    f[26:30],
                    f[30:34],
                    sport,
                    dport,
                    f[l4 + 8 : 14 + tot_len],
                    decode_roce_v2(f),
                )
            )
    assert out, f"{name}: no RoCEv2 packets"
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Dest:
    """One host's side of the tool's TCP out-of-band exchange (port 18515):
    ibv_rc_pingpong's ``LID:QPN:PSN:GID`` or perftest's key line
    ``LID:out_reads:QPN:PSN:RKEY:VADDR:GID bytes:SRQN`` (research/perftest.md)."""

    qpn: int
    psn: int
    gid: bytes
    out_reads: int | None = None
    rkey: int | None = None
    vaddr: int | None = None


@functools.cache
def _oob(name: str) -> dict[IPv4Address, Dest]:
    """Each host's first key line in the capture's TCP exchange (the tools
    send each message as one segment, and repeat the same line)."""
    dests: dict[IPv4Address, Dest] = {}
    with PcapReader(CAPTURES / name) as r:
        for rec in r:
            f = bytes(rec.data)
            if f[12:14] != b"\x08\x00" or f[23] != 6:
                continue
            l4 = 14 + (f[14] & 0x0F) * 4
            if OOB_PORT not in struct.unpack_from(">HH", f, l4):
                continue
            data = f[l4 + (f[l4 + 12] >> 4) * 4 : 14 + struct.unpack_from(">H", f, 16)[0]]
            text = data.rstrip(b"\0").decode("ascii", "replace")
            fields = text.split(":")
            src = IPv4Address(f[26:30])
            if len(fields) == 4 and len(fields[3]) == 32:  # ibv_rc_pingpong
                dest = Dest(int(fields[1], 16), int(fields[2], 16), bytes.fromhex(fields[3]))
            elif len(fields) == 24 and fields[-1] == "":  # perftest
                out_reads, qpn, psn, rkey, vaddr = (int(x, 16) for x in fields[1:6])
                gid = bytes(int(x, 16) for x in fields[6:22])
                dest = Dest(qpn, psn, gid, out_reads, rkey, vaddr)
            else:
                continue
            assert dests.setdefault(src, dest) == dest, f"{src} changed its key line"
    return dests


def _decode_as_udp_socket(d: Datagram) -> RoceFrame:
    """What a UDP socket link gets: payload, addresses and ports — not the IP
    ID nor DF, which decode_roce_udp solves for from the ICRC."""
    rf = decode_roce_udp(d.payload, d.saddr, d.daddr, d.sport, d.dport)
    # The solved ID and DF are the real ones (the ICRC admits only one pair).
    assert (rf.ip_id, rf.df) == (d.ref.ip_id, d.ref.df), d
    assert rf.icrc == d.ref.icrc
    return rf


def _is_response(d: Datagram) -> bool:
    return opcode_info(d.packet.opcode).is_response


def _responders(name: str) -> set[IPv4Address]:
    """Hosts that sent responses, each to a peer that sent it requests."""
    dgrams = _capture(name)
    requested = {IPv4Address(d.daddr) for d in dgrams if not _is_response(d)}
    return {d.src for d in dgrams if _is_response(d) and d.src in requested}


def _psn_count(d: Datagram) -> int:
    """How many PSNs a request uses (a READ one per response packet)."""
    p = d.packet
    if p.reth is not None and opcode_info(p.opcode).is_read:
        return max(1, -(-p.reth.dma_len // MTU))
    return 1


def _covers(req: Datagram, psn: int) -> bool:
    return (psn - req.psn) & PSN_MASK < _psn_count(req)


def _rxe_answers(
    requests: Sequence[Datagram], responses: Sequence[Datagram]
) -> list[list[Datagram]]:
    """The capture's responses per request (module docstring): rxe answers in
    order, so each response belongs to the first request, from the one being
    answered on, that came before it and covers its PSN."""
    answers: list[list[Datagram]] = [[] for _ in requests]
    cur = 0
    for r in responses:
        for k in range(cur, len(requests)):
            q = requests[k]
            assert q.index < r.index, f"{r} answers no earlier request"
            if _covers(q, r.psn):
                break
        else:
            raise AssertionError(f"{r} answers no request")
        answers[k].append(r)
        cur = k + 1 if r.packet.opcode in _ANSWER_ENDS else k
    return answers


def _needed_rd_atomic(requests: Sequence[Datagram], responses: Sequence[Datagram]) -> int:
    """The most READ / atomic requests the capture has outstanding at once
    (sent, their last response not yet seen): what max_dest_rd_atomic must
    cover for rxe to keep a resource for each."""
    answers = _rxe_answers(requests, responses)
    events: list[tuple[int, int]] = []
    for q, ans in zip(requests, answers, strict=True):
        info = opcode_info(q.packet.opcode)
        if info.is_read or info.is_atomic:
            events += [(q.index, 1), (ans[-1].index, -1)]
    most = level = 0
    for _, step in sorted(events):
        level += step
        most = max(most, level)
    return most


# --- the scenarios ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    """Replay ``capture`` into a device with the address of ``responder``.
    ``recv_size``: receives to post for SENDs (``-s`` of the tool)."""

    id: str
    capture: str
    responder: IPv4Address
    recv_size: int = 0

    @property
    def peer(self) -> IPv4Address:
        return HOST_B if self.responder == HOST_A else HOST_A


SCENARIOS = (
    # B's SENDs into an A-like device, against A's ACKs.
    Scenario("rc_pingpong-A", "rc_pingpong.pcap", HOST_A, recv_size=1024),
    # A's SENDs, six of them retransmitted, into a B-like device: B's ACKs.
    Scenario("rc_pingpong-B", "rc_pingpong.pcap", HOST_B, recv_size=1024),
    Scenario("write_bw", "write_bw.pcap", HOST_A),
    Scenario("read_bw", "read_bw.pcap", HOST_A),
    Scenario("atomic_bw", "atomic_bw.pcap", HOST_A),
)
BY_ID = {s.id: s for s in SCENARIOS}
DEVICE_KINDS = ("cpu", "hw-iommu")
"""SoftRoce (the CPU-copy rxe model; its DMA address is the kernel virtual
address) and a hardware HCA behind an IOMMU: one transport engine, the same
answers whatever the device's way to memory."""


def _requests(s: Scenario) -> list[Datagram]:
    return [
        d
        for d in _capture(s.capture)
        if d.src == s.peer and IPv4Address(d.daddr) == s.responder and not _is_response(d)
    ]


def _responses(s: Scenario) -> list[Datagram]:
    return [d for d in _capture(s.capture) if d.src == s.responder and _is_response(d)]


def _remote_base(s: Scenario) -> tuple[int, int, int] | None:
    """(base VA, extent, rkey) of the responder's buffer that the requests'
    RETH / AtomicETH name: the VADDR and RKEY the responder announced in
    the TCP exchange, the extent from the requests."""
    ends = []
    rkeys = set()
    for q in _requests(s):
        p = q.packet
        if p.reth is not None:
            ends.append((p.reth.va, p.reth.va + p.reth.dma_len))
            rkeys.add(p.reth.rkey)
        elif p.atmeth is not None:
            ends.append((p.atmeth.va, p.atmeth.va + 8))
            rkeys.add(p.atmeth.rkey)
    if not ends:
        return None
    me = _oob(s.capture)[s.responder]
    assert me.vaddr is not None and me.rkey is not None
    assert rkeys == {me.rkey} and min(e[0] for e in ends) >= me.vaddr
    return me.vaddr, max(e[1] for e in ends) - me.vaddr, me.rkey


def _rd_atomic(s: Scenario) -> int:
    """max_dest_rd_atomic of the responder: its out_reads (perftest sets
    RTR max_dest_rd_atomic to its own out_reads, RTS max_rd_atomic to the
    peer's; they are equal in these captures), or ibv_rc_pingpong's 1."""
    dests = _oob(s.capture)
    mine, theirs = dests[s.responder].out_reads, dests[s.peer].out_reads
    assert mine == theirs
    return PINGPONG_RD_ATOMIC if mine is None else mine


def _expected_memory(
    requests: Sequence[Datagram], responses: Sequence[Datagram], base: int, size: int
) -> tuple[bytearray, bytearray]:
    """The remote buffer before and after the capture, as far as the capture
    shows it: READ responses reveal the bytes they read, each ATOMIC ACK the
    original value at its address (later atomics on the address must agree
    with the earlier ones), WRITEs what they leave behind; the rest is
    :data:`FILLER`. Duplicates (none in these captures) are not re-executed."""
    before = bytearray([FILLER]) * size
    after = bytearray(before)
    known = bytearray(size)  # 1 where ``before`` is known from the capture
    answers = _rxe_answers(requests, responses)
    done: set[int] = set()
    atomic_orig: dict[int, int] = {}
    write_off = 0
    for q, ans in zip(requests, answers, strict=True):
        p = q.packet
        info = opcode_info(p.opcode)
        dup = q.psn in done
        done.add(q.psn)
        if info.is_read:
            assert p.reth is not None
            for r in ans:
                off = p.reth.va - base + ((r.psn - q.psn) & PSN_MASK) * MTU
                data = bytes(r.packet.payload)
                end = off + len(data)
                if any(known[off:end]):
                    assert after[off:end] == data, f"{r}: a READ saw other bytes"
                else:
                    before[off:end] = after[off:end] = data
                    known[off:end] = b"\x01" * len(data)
        elif info.is_atomic:
            assert p.atmeth is not None and len(ans) == 1 and ans[0].packet.atmack is not None
            off = p.atmeth.va - base
            orig = ans[0].packet.atmack.orig_data
            if dup:  # answered with the saved original value, not executed
                assert atomic_orig[q.psn] == orig, f"{ans[0]}: not the saved value"
                continue
            atomic_orig[q.psn] = orig
            if any(known[off : off + 8]):
                assert _U64.unpack_from(after, off)[0] == orig, f"{ans[0]}: not the last value"
            else:
                _U64.pack_into(before, off, orig)
                _U64.pack_into(after, off, orig)
                known[off : off + 8] = b"\x01" * 8
            assert p.bth.opcode == Opcode.RC_FETCH_ADD
            _U64.pack_into(after, off, (orig + p.atmeth.swap_add) & (1 << 64) - 1)
        elif info.is_write and not dup:
            if p.reth is not None:
                write_off = p.reth.va - base
            data = bytes(p.payload)
            after[write_off : write_off + len(data)] = data
            write_off += len(data)
    return before, after
