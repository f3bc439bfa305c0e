"""Replaying a capture's scenarios through softrdma's RC responder, and the
helpers that compare its answers with rxe's (see ``_replay_capture``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from softrdma.drivers.roce import RoceDevice
from softrdma.transport.opcodes import Opcode, opcode_info
from softrdma.transport.packet import Packet
from softrdma.transport.roce import (
    RoceFrame,
    rdma_ip2gid,
)
from softrdma.verbs.enums import IbAccess
from softrdma.verbs.mr import MemoryRegion
from softrdma.verbs.qp import connect_qp
from softrdma.verbs.wr import RecvWR, WorkCompletion
from tests.fabric.fakelink import FakeLink, FakeNetwork, Transmitted
from tests.rdma.nodes import Buffer, Node, make_device, make_node
from tests.transport._replay_capture import (
    BY_ID,
    NETDEV_MTU,
    PATH_MTU,
    QPN,
    SCENARIOS,
    Datagram,
    Scenario,
    _decode_as_udp_socket,
    _expected_memory,
    _needed_rd_atomic,
    _oob,
    _rd_atomic,
    _remote_base,
    _requests,
    _responses,
    _rxe_answers,
)

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
