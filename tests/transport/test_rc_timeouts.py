"""The local ACK timeout: retransmission from the oldest unacknowledged
PSN and the retry count.

Two RC engines back to back (:class:`.engine_harness.Pair`).
"""

from __future__ import annotations

import pytest

from softrdma.transport.psn import psn_add
from softrdma.transport.rc import local_ack_timeout
from softrdma.transport.wqe import CqSide
from softrdma.verbs.enums import IbQpState, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import RdmaWR, RecvWR

from .engine_harness import DropWhen, Pair, fatal_events, opnames, pattern


def test_retry_exhausted_under_total_loss() -> None:
    p = Pair(a_kw={"retry_cnt": 3, "timeout": 10}, ab=DropWhen(lambda q: True, times=None))
    src = p.mem_a.reg(600)
    dst = p.mem_b.reg(600)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.post(RdmaWR(2, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.post_recv(RecvWR(3, ()), side="a")
    p.run()
    timeout = local_ack_timeout(10)
    assert timeout is not None
    # Original at 0 plus retry_cnt retransmissions, one timeout apart.
    times = sorted({t for t, who, _ in p.log if who == "a"})
    assert times == [pytest.approx(k * timeout) for k in range(4)]
    assert p.now == pytest.approx(4 * timeout)
    assert fatal_events(p.events_a)[0].status is IbWcStatus.RETRY_EXC_ERR
    assert dst[0:600] == bytes(600)
    # The QP entered ERR by itself: the failed WQE, then the rest flushed,
    # sends then receives, in order.
    assert p.a.state is IbQpState.ERR
    assert [(c.side, c.wc.wr_id, c.wc.status) for c in p.comps_a] == [
        (CqSide.SEND, 1, IbWcStatus.RETRY_EXC_ERR),
        (CqSide.SEND, 2, IbWcStatus.WR_FLUSH_ERR),
        (CqSide.RECV, 3, IbWcStatus.WR_FLUSH_ERR),
    ]
    assert p.a.next_deadline() is None


def test_timeout_zero_is_infinite() -> None:
    p = Pair(a_kw={"timeout": 0}, ab=DropWhen(lambda q: True, times=None))
    src = p.mem_a.reg(10)
    dst = p.mem_b.reg(10)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.run()
    assert p.a.next_deadline() is None and not p.send_wcs() and not p.events_a


def test_timeout_retransmits_from_oldest_unacked() -> None:
    p = Pair(mtu=256)
    n = 6 * 256
    src = p.mem_a.reg(n, fill=pattern(n))
    dst = p.mem_b.reg(n)
    last = psn_add(p.pa.sq_psn, 5)
    # Lose the final packet (which carries AckReq) once: no NAK can happen.
    p.ab = DropWhen(lambda q: q.bth.psn == last, times=1)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.run_until_completions(1)
    assert p.now == pytest.approx(local_ack_timeout(p.pa.timeout) or 0)
    # Nothing was acknowledged, so everything is resent (duplicates re-ACKed).
    assert [q.bth.psn for q in p.sent_a[6:]] == [psn_add(p.pa.sq_psn, k) for k in range(6)]
    assert opnames(p.sent_a[6:7]) == ["RDMA_WRITE_FIRST"]
    assert p.mem_b.remote_writes == 6
    assert dst[0:n] == src[0:n]
