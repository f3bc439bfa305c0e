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

import dataclasses
import functools
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.pcap import LINKTYPE_ETHERNET, PcapReader
from softrdma.transport.opcodes import Opcode, opcode_info
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_MASK
from softrdma.transport.roce import (
    RoceFrame,
    decode_roce_v2,
    encode_roce_v2,
    rdma_get_udp_sport,
    rdma_ip2gid,
)
from softrdma.transport.roce_udp import decode_roce_udp, encode_roce_udp
from softrdma.verbs.enums import IbAccess, IbMtu, IbWcOpcode, IbWcStatus
from softrdma.verbs.mr import MemoryRegion
from softrdma.verbs.qp import connect_qp
from softrdma.verbs.wr import RecvWR, WorkCompletion
from tests.fabric.fakelink import FakeLink, FakeNetwork, Transmitted
from tests.rdma.nodes import Buffer, Node, make_device, make_node

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


# --- the replay ---------------------------------------------------------------------------


@dataclass
class Replay:
    scenario: Scenario
    kind: str
    node: Node
    link: FakeLink
    requests: list[Datagram]
    responses: list[Datagram]
    rxe: list[list[Datagram]]
    """rxe's answers, per request."""
    ours: list[list[Transmitted]]
    """The device's answers, per request."""
    buffer: Buffer | None
    mr: MemoryRegion | None
    """The DMA MR the translated RETH / AtomicETH name."""
    memory: tuple[bytearray, bytearray] | None
    """The remote buffer before and after, as the capture shows it."""
    recv_buffer: Buffer | None
    recv_wcs: list[WorkCompletion]

    @property
    def dev(self) -> RoceDevice:
        return self.node.dev

    @property
    def sent(self) -> list[Transmitted]:
        return self.link.sent


def _translate(rf: RoceFrame, base: int, rkey: int, buf: Buffer, mr: MemoryRegion) -> RoceFrame:
    """rxe's VA and rkey in a RETH / AtomicETH → the device's buffer and DMA
    MR, at the same offset from ``base`` (the VADDR rxe's side announced)."""
    p = rf.packet
    if p.reth is not None:
        assert p.reth.rkey == rkey
        reth = p.reth._replace(va=buf.dma + p.reth.va - base, rkey=mr.rkey)
        return dataclasses.replace(rf, packet=dataclasses.replace(p, reth=reth))
    if p.atmeth is not None:
        assert p.atmeth.rkey == rkey
        atmeth = p.atmeth._replace(va=buf.dma + p.atmeth.va - base, rkey=mr.rkey)
        return dataclasses.replace(rf, packet=dataclasses.replace(p, atmeth=atmeth))
    return rf


@functools.cache
def replay(scenario_id: str, kind: str = "cpu") -> Replay:
    """The replay of a scenario (shared by the tests that only look at it)."""
    return fresh_replay(scenario_id, kind)


def fresh_replay(scenario_id: str, kind: str = "cpu") -> Replay:
    """Build the device, replay the scenario's requests into it, collect the
    answers (module docstring)."""
    s = BY_ID[scenario_id]
    requests = _requests(s)
    responses = _responses(s)
    assert requests and responses
    rxe = _rxe_answers(requests, responses)
    # The QP parameters, from the tool's TCP exchange, agree with the packets.
    dests = _oob(s.capture)
    me, peer = dests[s.responder], dests[s.peer]
    assert (me.gid, peer.gid) == (rdma_ip2gid(s.responder), rdma_ip2gid(s.peer))
    assert {q.packet.dest_qp for q in requests} == {me.qpn} == {QPN}
    assert {r.packet.dest_qp for r in responses} == {peer.qpn}
    assert requests[0].psn == peer.psn
    rd_atomic = _rd_atomic(s)
    assert rd_atomic >= _needed_rd_atomic(requests, responses)

    net = FakeNetwork()
    loop = net.scheduler
    dev = make_device(kind, net, str(s.responder), netdev_mtu=NETDEV_MTU)
    link = net.links[s.responder]
    assert dev.link is link
    node = make_node(dev)
    assert node.qp.qp_num == QPN  # a device's first QP, like rxe's
    assert dev.query_port().active_mtu == PATH_MTU
    connect_qp(
        node.qp,
        dest_qp_num=peer.qpn,
        dgid=peer.gid,
        rq_psn=peer.psn,
        sq_psn=me.psn,
        path_mtu=PATH_MTU,
        max_rd_atomic=rd_atomic,
    )  # timeout 14, retry_cnt 7, rnr_retry 7, min_rnr_timer 12: both tools' values

    # Memory: the remote buffer (READ / WRITE / atomic), or receives for SENDs.
    buf = mr = None
    memory = None
    remote = _remote_base(s)
    if remote is not None:
        base, size, _ = remote
        memory = _expected_memory(requests, responses, base, size)
        mr = dev.get_dma_mr(
            node.pd,
            IbAccess.LOCAL_WRITE
            | IbAccess.REMOTE_READ
            | IbAccess.REMOTE_WRITE
            | IbAccess.REMOTE_ATOMIC,
        )
        buf = Buffer(dev, size)
        buf.fill(bytes(memory[0]))
    recv_buf = None
    sends = {q.psn for q in requests if opcode_info(q.packet.opcode).consumes_recv_wqe}
    if sends:
        assert s.recv_size and all(len(q.packet.payload) <= s.recv_size for q in requests)
        recv_buf = Buffer(dev, s.recv_size * len(sends))
        node.qp.post_recv(
            [
                RecvWR(i, (recv_buf.sge(node.pd.local_dma_lkey, i * s.recv_size, s.recv_size),))
                for i in range(len(sends))
            ]
        )
    loop.run()  # the doorbells
    assert not link.sent

    for q in requests:
        rf = _decode_as_udp_socket(q)
        if remote is not None:
            assert buf is not None and mr is not None
            rf = _translate(rf, remote[0], remote[2], buf, mr)
        at = max(q.time, loop.time())
        link.deliver(rf, at)
        loop.run(until=at)
    loop.run(until=loop.time() + 10.0)  # any timer (there should be none)
    assert loop.idle, "the responder left something scheduled"

    ours: list[list[Transmitted]] = [[] for _ in requests]
    for t in link.sent:
        assert t.after > 0, f"{t.packet!r} sent before any request"
        ours[t.after - 1].append(t)
    wcs = node.cq.poll(len(sends) + 1) if sends else []
    return Replay(
        s, kind, node, link, requests, responses, rxe, ours, buf, mr, memory, recv_buf, wcs
    )


# --- comparing ------------------------------------------------------------------------------


def _summary(p: Packet) -> tuple[object, ...]:
    """What a reader checks first: opcode, PSN, QP, AckReq, AETH (syndrome,
    MSN), AtomicAckETH original value, payload length."""
    return (
        Opcode(p.opcode).name,
        p.psn,
        p.dest_qp,
        p.bth.ack_req,
        None if p.aeth is None else (hex(p.aeth.syndrome), p.aeth.msn),
        None if p.atmack is None else p.atmack.orig_data,
        len(p.payload),
    )


def _pairs(r: Replay) -> list[tuple[Transmitted, Datagram]]:
    ours = [t for ans in r.ours for t in ans]
    assert len(ours) == len(r.responses)
    return list(zip(ours, r.responses, strict=True))


SCENARIO_IDS = [s.id for s in SCENARIOS]


def test_responders_found_from_opcodes() -> None:
    """Which host to impersonate follows from the opcodes: A answers in the
    perftest captures, both hosts answer each other in rc_pingpong."""
    for s in SCENARIOS:
        assert s.responder in _responders(s.capture)
        if s.capture != "rc_pingpong.pcap":
            assert _responders(s.capture) == {HOST_A}
    assert _responders("rc_pingpong.pcap") == {HOST_A, HOST_B}


def test_capture_needs() -> None:
    """What the captures require of the responder, and where they repeat
    requests (only A's SENDs in rc_pingpong)."""
    needs = {
        s.id: (_needed_rd_atomic(_requests(s), _responses(s)), _rd_atomic(s)) for s in SCENARIOS
    }
    assert needs == {
        "rc_pingpong-A": (0, 1),
        "rc_pingpong-B": (0, 1),
        "write_bw": (0, 1),
        "read_bw": (17, RXE_MAX_QP_RD_ATOM),
        "atomic_bw": (20, RXE_MAX_QP_RD_ATOM),
    }
    repeated = {}
    for s in SCENARIOS:
        psns = Counter(q.psn for q in _requests(s))
        repeated[s.id] = sorted(p for p, n in psns.items() if n > 1)
    assert repeated == {
        "rc_pingpong-A": [],
        "rc_pingpong-B": [13057431, 13057432, 13057434, 13057436, 13057437, 13057439],
        "write_bw": [],
        "read_bw": [],
        "atomic_bw": [],
    }


@pytest.mark.parametrize("kind", DEVICE_KINDS)
@pytest.mark.parametrize("sid", SCENARIO_IDS)
def test_responses_match_rxe(sid: str, kind: str) -> None:
    """Every response, in order and request by request: opcode, PSN, AETH
    syndrome and MSN, atomic original data, and every transport byte
    (payloads included); sent to the peer from the QP's UDP source port."""
    r = replay(sid, kind)
    ours = [_summary(t.packet) for ans in r.ours for t in ans]
    theirs = [_summary(d.packet) for d in r.responses]
    assert ours == theirs
    for k, q in enumerate(r.requests):
        got = [_summary(t.packet) for t in r.ours[k]]
        want = [_summary(d.packet) for d in r.rxe[k]]
        assert got == want, f"answers to request {q}"
    for t, d in _pairs(r):
        assert t.packet.encode() == d.packet.encode(), f"transport bytes of {d}"
        assert bytes(t.packet.payload) == bytes(d.packet.payload)
        assert t.daddr == d.daddr
        assert t.sport == d.sport == rdma_get_udp_sport(0, QPN, QPN)
    assert r.dev.stats["rcvd_pkts"] == len(r.requests)
    assert r.dev.stats["sent_pkts"] == len(r.responses)
    drops = {k: v for k, v in r.dev.stats.items() if k.startswith("rx_") and v}
    assert not drops
    assert r.node.qp.state.name == "RTS"


@pytest.mark.parametrize("kind", DEVICE_KINDS)
@pytest.mark.parametrize("sid", SCENARIO_IDS)
def test_memory_and_completions(sid: str, kind: str) -> None:
    """The responder's side effects: WRITEs landed (write_bw), READs left
    memory alone, each FETCH_ADD added once; each SEND completed one receive
    with its bytes, duplicates none."""
    r = replay(sid, kind)
    if r.memory is not None:
        assert r.buffer is not None
        before, after = r.memory
        got = r.buffer.read()
        assert got == bytes(after)
        if sid == "write_bw":
            assert got != bytes(before)  # the check above is not vacuous
            last = r.requests[-8:]
            assert got == b"".join(bytes(q.packet.payload) for q in last)
    if r.recv_buffer is not None:
        firsts: dict[int, Datagram] = {}
        for q in r.requests:
            firsts.setdefault(q.psn, q)
        sends = list(firsts.values())
        assert [(wc.wr_id, wc.status, wc.opcode, wc.byte_len) for wc in r.recv_wcs] == [
            (i, IbWcStatus.SUCCESS, IbWcOpcode.RECV, len(q.packet.payload))
            for i, q in enumerate(sends)
        ]
        size = r.scenario.recv_size
        for i, q in enumerate(sends):
            n = len(q.packet.payload)
            assert r.recv_buffer.read(n, i * size) == bytes(q.packet.payload)
    else:
        assert not r.recv_wcs


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_retransmitted_sends_answered_like_rxe(kind: str) -> None:
    """rc_pingpong's six retransmitted SENDs: each is a duplicate (not
    executed again: no receive consumed), acknowledged again exactly as B
    did — same PSN, same MSN as the first ACK."""
    r = replay("rc_pingpong-B", kind)
    seen: dict[int, int] = {}
    dups = 0
    for k, q in enumerate(r.requests):
        (ack,) = r.ours[k]
        (rxe_ack,) = r.rxe[k]
        assert _summary(ack.packet) == _summary(rxe_ack.packet)
        assert ack.packet.opcode == Opcode.RC_ACKNOWLEDGE and ack.packet.psn == q.psn
        assert ack.packet.aeth is not None
        if q.psn in seen:
            dups += 1
            assert ack.packet.aeth.msn == seen[q.psn], "a duplicate must not count"
        seen[q.psn] = ack.packet.aeth.msn
    assert dups == 6
    assert r.dev.stats["duplicate_request"] == 6
    assert len(r.recv_wcs) == len(seen) == 10


@pytest.mark.parametrize("sid", SCENARIO_IDS)
def test_response_frames_byte_identical(sid: str) -> None:
    """Each response as the link would frame it is rxe's frame byte for byte
    (IP and UDP headers, UDP source port, TTL, DF, ICRC) once the Ethernet
    addresses and the IPv4 ID — the host's, not the device's — are rxe's;
    and so is the UDP payload a socket link would send."""
    r = replay(sid)
    saddr = r.scenario.responder.packed
    for t, d in _pairs(r):
        frame = RoceFrame(
            t.packet,
            saddr,
            t.daddr,
            t.sport,
            eth_dst=d.ref.eth_dst,
            eth_src=d.ref.eth_src,
            ip_id=d.ref.ip_id,
        )
        assert encode_roce_v2(frame) == d.frame, d
        assert frame.icrc == d.ref.icrc
        udp = encode_roce_udp(t.packet, saddr, t.daddr, t.sport, ip_id=d.ref.ip_id, df=True)
        assert udp == d.payload, d


@pytest.mark.parametrize("sid", SCENARIO_IDS)
def test_link_frames_differ_only_in_ip_id(sid: str) -> None:
    """The frames the fake link built with its own MAC and IPv4 ID counter:
    every field equals rxe's but the MACs and the ID, so the bytes differ
    only in the MACs, the ID, the IP header checksum and the ICRC."""
    r = replay(sid)
    allowed = set(_ETH) | set(_IP_ID) | set(_IP_CSUM)
    for t, d in _pairs(r):
        mine = decode_roce_v2(t.frame)
        assert (
            dataclasses.replace(
                mine, eth_dst=d.ref.eth_dst, eth_src=d.ref.eth_src, ip_id=d.ref.ip_id
            )
            == d.ref
        )
        assert len(t.frame) == len(d.frame)
        n = len(d.frame)
        diff = {i for i in range(n) if t.frame[i] != d.frame[i]}
        assert diff - allowed <= set(range(n - 4, n)), d


def test_fake_link_datagram_path() -> None:
    """The fake link as a UDP-socket link: a request datagram is decoded and
    answered; a corrupted one is dropped with its reason, counted by the
    device and not answered."""
    s = BY_ID["atomic_bw"]
    q = _requests(s)[0]
    peer = _oob(s.capture)[s.peer]
    net = FakeNetwork()
    dev = make_device("cpu", net, str(s.responder), netdev_mtu=NETDEV_MTU)
    node = make_node(dev)
    connect_qp(
        node.qp,
        dest_qp_num=peer.qpn,
        dgid=peer.gid,
        rq_psn=peer.psn,
        path_mtu=PATH_MTU,
        max_rd_atomic=_rd_atomic(s),
    )
    link = net.links[s.responder]
    net.scheduler.run()
    bad = bytearray(q.payload)
    bad[40] ^= 0x01  # inside the AtomicETH swap/add value
    link.deliver_datagram(bytes(bad), q.saddr, q.sport)
    net.scheduler.run()
    assert dev.stats["rx_bad_icrc"] == 1 and not link.sent
    # The intact request reaches the responder (and fails its rkey check,
    # since rxe's rkey means nothing here: a NAK, as rxe would send).
    link.deliver_datagram(q.payload, q.saddr, q.sport)
    net.scheduler.run()
    assert dev.stats["rcvd_pkts"] == 1
    (nak,) = link.sent
    assert nak.packet.opcode == Opcode.RC_ACKNOWLEDGE and nak.packet.psn == q.psn
    assert nak.packet.aeth is not None and nak.packet.aeth.syndrome == 0x62  # NAK access


def _again(r: Replay, q: Datagram, **change: int) -> list[Transmitted]:
    """Inject captured request ``q`` once more, translated like the replay,
    with ``psn`` / RETH ``va`` / ``dma_len`` changed by the given offsets;
    return the answers."""
    remote = _remote_base(r.scenario)
    assert remote is not None and r.buffer is not None and r.mr is not None
    rf = _translate(_decode_as_udp_socket(q), remote[0], remote[2], r.buffer, r.mr)
    p = rf.packet
    if change:
        assert p.reth is not None
        p = dataclasses.replace(
            p,
            bth=p.bth._replace(psn=(p.psn + change.get("psn", 0)) & PSN_MASK),
            reth=p.reth._replace(
                va=p.reth.va + change.get("va", 0),
                dma_len=p.reth.dma_len + change.get("dma_len", 0),
            ),
        )
        rf = dataclasses.replace(rf, packet=p)
    n = len(r.sent)
    r.link.deliver(rf)
    r.link.scheduler.run()
    return r.sent[n:]


def _with_msn(p: Packet, msn: int) -> tuple[object, ...]:
    """:func:`_summary` with the AETH MSN (if any) replaced."""
    out = list(_summary(p))
    if p.aeth is not None:
        out[4] = (hex(p.aeth.syndrome), msn)
    return tuple(out)


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_repeated_read_replayed_from_its_resource(kind: str) -> None:
    """Beyond the captures (they repeat no READ): a captured READ injected
    again after the run, as rxe's requester retransmits it, is answered
    from its responder resource as rxe_resp.c ``duplicate_request`` and
    ``read_reply`` do — the same packets and bytes as rxe's first answer,
    except that the AETH carries the current MSN (``prepare_ack_packet``
    sets ``qp->resp.msn``); a repeat of its tail (a PSN inside the READ, VA
    and length moved to match) restarts with MIDDLE. Nothing executes again:
    the MSN and the expected PSN stay."""
    r = fresh_replay("read_bw", kind)
    msn = len(r.requests)
    k = 5
    q = r.requests[k]
    got = _again(r, q)
    assert [_summary(t.packet) for t in got] == [_with_msn(d.packet, msn) for d in r.rxe[k]]
    assert [bytes(t.packet.payload) for t in got] == [bytes(d.packet.payload) for d in r.rxe[k]]
    tail = _again(r, q, psn=3, va=3 * MTU, dma_len=-3 * MTU)
    assert [_summary(t.packet) for t in tail] == [_with_msn(d.packet, msn) for d in r.rxe[k][3:]]
    assert Opcode(tail[0].packet.opcode) is Opcode.RC_RDMA_READ_RESPONSE_MIDDLE
    assert r.dev.stats["duplicate_request"] == 2
    # The next new READ is still answered with the next MSN.
    last = r.requests[-1]
    nxt = _again(r, last, psn=_psn_count(last))
    assert nxt[0].packet.psn == (last.psn + _psn_count(last)) & PSN_MASK
    assert nxt[0].packet.aeth is not None and nxt[0].packet.aeth.msn == msn + 1


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_repeated_atomic_replays_its_original_value(kind: str) -> None:
    """Beyond the captures (they repeat no atomic): a repeated FETCH_ADD is
    not executed again; it gets rxe's ATOMIC ACKNOWLEDGE again with the saved
    original value (the one rxe sent), with the current MSN."""
    r = fresh_replay("atomic_bw", kind)
    assert r.buffer is not None
    before = r.buffer.read()
    msn = len(r.requests)
    for k in (3, len(r.requests) - 1):
        (ack,) = _again(r, r.requests[k])
        (rxe_ack,) = r.rxe[k]
        assert _summary(ack.packet) == _with_msn(rxe_ack.packet, msn)
    assert r.buffer.read() == before
    assert r.dev.stats["duplicate_request"] == 2


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_repeated_write_acknowledged_not_executed(kind: str) -> None:
    """Beyond the captures (they repeat no WRITE): any repeated WRITE packet,
    AckReq or not, is acknowledged with the last PSN executed and the
    current MSN (C9-105; rxe ``duplicate_request``: ``send_ack(qp,
    AETH_ACK_UNLIMITED, prev_psn)``) and writes nothing."""
    r = fresh_replay("write_bw", kind)
    assert r.buffer is not None
    r.buffer.fill(bytes([FILLER]) * r.buffer.size)
    last_psn = r.requests[-1].psn
    for k in (0, 3, 7):  # WRITE_FIRST (RETH), a MIDDLE, a LAST with AckReq
        (ack,) = _again(r, r.requests[k])
        assert _summary(ack.packet) == (
            "RC_ACKNOWLEDGE", last_psn, QPN, False, ("0x1f", 20), None, 0
        )  # fmt: skip
    assert r.buffer.read() == bytes([FILLER]) * r.buffer.size
