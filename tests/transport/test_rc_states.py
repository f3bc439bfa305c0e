"""QP states as the engines see them: SQ drain, the error state and its
flush, and which packets each state accepts.

Two RC engines back to back (:class:`.engine_harness.Pair`).
"""

from __future__ import annotations

from typing import Any

import pytest

from softrdma.transport.errors import LocalProtocolError
from softrdma.transport.headers import Deth
from softrdma.transport.opcodes import OPCODE_TABLE, Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.rc import RcQp
from softrdma.transport.wqe import CqSide, SendWqe, SqDrained
from softrdma.verbs.enums import IbQpState, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR

from .engine_harness import QPN_A, QPN_B, Pair, attr_for, opnames, pattern, to_state
from .fakemem import FakeMemory


def test_sqd_drains_started_wqes_only() -> None:
    p = Pair(mtu=256)
    src = p.mem_a.reg(2048, fill=pattern(2048))
    dst = p.mem_b.reg(2048)
    for i in range(4):
        p.post(
            RdmaWR(
                i,
                Op.RDMA_WRITE,
                (src.sge(i * 512, 512),),
                remote_addr=dst.iova + i * 512,
                rkey=dst.key,
            )
        )
    # Let only the first message's first packet out, then ask for SQD.
    out = p.a.poll(0.0).packets
    assert len(out) == 8
    to_state(p.a, p.pa, IbQpState.SQD)
    for o in out[:3]:  # the third message is also in flight: its packets went
        p.b.receive(o.pkt, 0.0)
    p.run()
    assert [type(e) for e in p.events_a] == [SqDrained]
    assert [wc.wr_id for wc in p.send_wcs()] == [0, 1, 2, 3]  # all four had started
    q = Pair(mtu=256)
    src = q.mem_a.reg(4096)
    dst = q.mem_b.reg(4096)
    q.post(RdmaWR(0, Op.RDMA_WRITE, (src.sge(0, 512),), remote_addr=dst.iova, rkey=dst.key))
    q.step()
    to_state(q.a, q.pa, IbQpState.SQD)
    q.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(0, 512),), remote_addr=dst.iova, rkey=dst.key))
    q.run()
    assert [wc.wr_id for wc in q.send_wcs()] == [0]  # the new one waits
    assert q.events_a.count(SqDrained()) == 1
    assert q.a.state is IbQpState.SQD and q.a.drained_sent
    to_state(q.a, q.pa, IbQpState.RTS)
    q.run()
    assert [wc.wr_id for wc in q.send_wcs()] == [0, 1]


def test_post_in_err_flushes_immediately_and_reset_rejects() -> None:
    rc = RcQp(5, FakeMemory())
    with pytest.raises(LocalProtocolError):
        rc.post_send(SendWqe.from_wr(SendWR(1, Op.SEND)))
    with pytest.raises(LocalProtocolError):
        rc.post_recv(RecvWR(1))
    attr = attr_for(6)
    to_state(rc, attr, IbQpState.INIT)
    rc.post_recv(RecvWR(1))
    rc.post_send(SendWqe.from_wr(SendWR(2, Op.SEND)))
    assert (rc.sq_outstanding, rc.rq_outstanding) == (1, 1)
    to_state(rc, attr, IbQpState.ERR)  # the engine flushes itself
    rc.post_send(SendWqe.from_wr(SendWR(3, Op.SEND)))
    rc.post_recv(RecvWR(4))
    flushed = rc.poll(0.0).completions
    assert [(c.side, c.wc.wr_id) for c in flushed] == [
        (CqSide.SEND, 2),
        (CqSide.RECV, 1),
        (CqSide.SEND, 3),
        (CqSide.RECV, 4),
    ]
    assert all(c.wc.status is IbWcStatus.WR_FLUSH_ERR for c in flushed)
    assert (rc.sq_outstanding, rc.rq_outstanding, rc.state) == (0, 0, IbQpState.ERR)
    with pytest.raises(LocalProtocolError):
        to_state(rc, attr, IbQpState.SQE)
    to_state(rc, attr, IbQpState.RESET)
    assert rc.state is IbQpState.RESET and not rc.poll(0.0)


def test_state_gating_of_packets() -> None:
    """The responder accepts requests from RTR, the completer responses from RTS."""
    rc = RcQp(QPN_B, FakeMemory())
    params = attr_for(QPN_A)
    rbuf = rc.mem.reg(64) if isinstance(rc.mem, FakeMemory) else None
    assert rbuf is not None
    send = Packet.build(Opcode.RC_SEND_ONLY, dest_qp=QPN_B, psn=0, payload=b"hi", ack_req=True)
    to_state(rc, params, IbQpState.INIT)
    rc.post_recv(RecvWR(1, (rbuf.sge(),)))
    rc.receive(send, 0.0)
    assert not rc.poll(0.0)  # INIT: dropped
    to_state(rc, params, IbQpState.RTR)
    rc.receive(send, 0.0)
    out = rc.poll(0.0)
    assert [c.wc.wr_id for c in out.completions] == [1]
    assert opnames([o.pkt for o in out.packets]) == ["ACKNOWLEDGE"]


@pytest.mark.parametrize("opcode", [Opcode.UD_SEND_ONLY, Opcode.UC_SEND_ONLY, Opcode.CNP])
def test_other_transport_opcodes_are_dropped(opcode: Opcode) -> None:
    p = Pair()
    info = OPCODE_TABLE[opcode]
    assert info is not None
    kw: dict[str, Any] = {}
    if opcode == Opcode.UD_SEND_ONLY:
        kw["deth"] = Deth(0, 1)
    pkt = Packet.build(opcode, dest_qp=QPN_B, psn=p.pb.rq_psn, **kw)
    p.b.receive(pkt, 0.0)
    assert not p.b.poll(0.0)
