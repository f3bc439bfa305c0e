"""PSNs, the send window, ACK cadence and the MSN, with and without wrap.

Two RC engines back to back (:class:`.engine_harness.Pair`).
"""

from __future__ import annotations

import random

import pytest

from softrdma.transport.opcodes import Opcode
from softrdma.transport.psn import PSN_MASK
from softrdma.transport.requester import MAX_PKT_PER_ACK, MAX_UNACKED_PSNS
from softrdma.verbs.enums import IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR

from .engine_harness import Lossy, Pair, pattern


@pytest.mark.parametrize("wire", [False, True])
def test_psn_wrap(wire: bool) -> None:
    p = Pair(mtu=256, psn_a=PSN_MASK - 2, psn_b=PSN_MASK, wire=wire)
    src = p.mem_a.reg(2000, fill=pattern(2000))
    dst = p.mem_b.reg(2000)
    back = p.mem_b.reg(2000)
    rbuf = p.mem_a.reg(2000)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.post(RdmaWR(2, Op.RDMA_READ, (rbuf.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.post_recv(RecvWR(3, (back.sge(),)))
    p.post(SendWR(3, Op.SEND, (src.sge(0, 1000),)))
    # B's requester wraps too.
    p.post_recv(RecvWR(9, (rbuf.sge(0, 600),)), side="a")
    p.post(SendWR(9, Op.SEND, (src.sge(0, 600),)), side="b")
    p.run_until_completions(3, 1)
    p.run()
    assert dst[0:2000] == src[0:2000] and rbuf[0:2000] == src[0:2000]
    psns = [q.bth.psn for q in p.sent_a]
    assert psns[:8] == [PSN_MASK - 2, PSN_MASK - 1, PSN_MASK, 0, 1, 2, 3, 4]
    assert p.recv_wcs("a")[0].status is IbWcStatus.SUCCESS
    assert [q.bth.psn for q in p.sent_b if q.bth.opcode == Opcode.RC_SEND_FIRST] == [PSN_MASK]


@pytest.mark.parametrize("seed", range(3))
def test_psn_wrap_under_loss(seed: int) -> None:
    rng = random.Random(seed)
    p = Pair(
        mtu=256,
        psn_a=PSN_MASK - 20,
        psn_b=PSN_MASK - 5,
        ab=Lossy(random.Random(rng.random()), drop=0.15, dup=0.1, reorder=0.3),
        ba=Lossy(random.Random(rng.random()), drop=0.15, dup=0.1, reorder=0.3),
    )
    src = p.mem_a.reg(20000, fill=pattern(20000, seed))
    dst = p.mem_b.reg(20000)
    rd = p.mem_a.reg(20000)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(0, 9000),), remote_addr=dst.iova, rkey=dst.key))
    p.post(RdmaWR(2, Op.RDMA_READ, (rd.sge(0, 9000),), remote_addr=dst.iova, rkey=dst.key))
    p.run_until_completions(2)
    assert [wc.status for wc in p.send_wcs()] == [IbWcStatus.SUCCESS] * 2
    assert dst[0:9000] == src[0:9000] == rd[0:9000]


def test_window_and_ack_request_cadence() -> None:
    """At most MAX_UNACKED_PSNS PSNs in flight; AckReq at least every
    MAX_PKT_PER_ACK packets and on the last; the responder ACKs only those."""
    p = Pair(mtu=256)
    n = 300 * 256
    src = p.mem_a.reg(n, fill=pattern(n))
    dst = p.mem_b.reg(n)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    first = [o.pkt for o in p.a.poll(0.0).packets]
    assert len(first) == MAX_UNACKED_PSNS
    assert not p.a.poll(0.0).packets  # window full until an ACK comes
    ackreq = [i for i, q in enumerate(first) if q.bth.ack_req]
    assert ackreq == [MAX_PKT_PER_ACK - 1, 2 * MAX_PKT_PER_ACK - 1]
    for q in first:
        p.b.receive(q, 0.0)
    acks = [o.pkt for o in p.b.poll(0.0).packets]
    # ACK coalescing: one ACK per AckReq packet, for that PSN.
    assert [q.bth.psn for q in acks] == [first[i].bth.psn for i in ackreq]
    p.a.receive(acks[0], 0.0)
    assert len(p.a.poll(0.0).packets) == MAX_PKT_PER_ACK  # the window slid by 64
    p.run_until_completions(1)
    assert dst[0:n] == src[0:n]
    assert all(q.bth.ack_req for q in p.sent_a if q.bth.opcode == Opcode.RC_RDMA_WRITE_LAST)
    gaps = [i for i, q in enumerate(p.sent_a) if q.bth.ack_req]
    assert max(b - a for a, b in zip([-1, *gaps], gaps, strict=False)) <= MAX_PKT_PER_ACK


def test_msn_counts_completed_messages() -> None:
    p = Pair(mtu=256)
    src = p.mem_a.reg(1000)
    dst = p.mem_b.reg(1000)
    for i in range(3):
        p.post(RdmaWR(i, Op.RDMA_WRITE, (src.sge(0, 600),), remote_addr=dst.iova, rkey=dst.key))
    p.post(RdmaWR(3, Op.RDMA_READ, (src.sge(0, 600),), remote_addr=dst.iova, rkey=dst.key))
    p.run_until_completions(4)
    acks = [q.aeth.msn for q in p.sent_b if q.aeth is not None]
    assert acks == [1, 2, 3, 4, 4]  # three WRITE ACKs, READ FIRST and LAST
