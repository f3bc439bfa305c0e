"""RDMA READ and atomic depth: max_rd_atomic, max_dest_rd_atomic, and
long READ replies sent in bursts.

Two RC engines back to back (:class:`.engine_harness.Pair`).
"""

from __future__ import annotations

from softrdma.transport.opcodes import Opcode
from softrdma.transport.responder import READ_BURST
from softrdma.verbs.enums import IbWcOpcode, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import RdmaWR

from .engine_harness import Pair, opnames, pattern


def test_max_rd_atomic_limits_outstanding_reads() -> None:
    p = Pair(a_kw={"max_rd_atomic": 2})
    remote = p.mem_b.reg(4096, fill=pattern(4096))
    local = p.mem_a.reg(4096)
    for i in range(6):
        p.post(
            RdmaWR(
                i,
                Op.RDMA_READ,
                (local.sge(i * 512, 512),),
                remote_addr=remote.iova + i * 512,
                rkey=remote.key,
            )
        )
    p.post(RdmaWR(9, Op.RDMA_WRITE, (local.sge(0, 8),), remote_addr=remote.iova, rkey=remote.key))
    peak = 0
    for _ in range(1000):
        busy = p.step()
        reqs = sum(1 for q in p.sent_a if q.bth.opcode == Opcode.RC_RDMA_READ_REQUEST)
        done = sum(1 for wc in p.send_wcs() if wc.opcode is IbWcOpcode.RDMA_READ)
        peak = max(peak, reqs - done)
        if not busy:
            break
    # Two READs at a time; the WRITE behind them waits its turn in order.
    assert opnames(p.sent_a[:2]) == ["RDMA_READ_REQUEST"] * 2
    assert peak <= 2
    assert [wc.wr_id for wc in p.send_wcs()] == [0, 1, 2, 3, 4, 5, 9]
    assert local[0:3072] == remote[0:3072]


def test_max_dest_rd_atomic_zero_rejects_reads() -> None:
    p = Pair(b_kw={"max_dest_rd_atomic": 0})
    remote = p.mem_b.reg(64)
    local = p.mem_a.reg(64)
    p.post(RdmaWR(1, Op.RDMA_READ, (local.sge(),), remote_addr=remote.iova, rkey=remote.key))
    p.run()
    assert p.send_wcs()[0].status is IbWcStatus.REM_INV_REQ_ERR


def test_long_read_reply_is_generated_in_bursts() -> None:
    p = Pair(mtu=256)
    n = 3 * READ_BURST * 256 + 100
    remote = p.mem_b.reg(n, fill=pattern(n))
    local = p.mem_a.reg(n)
    p.post(RdmaWR(1, Op.RDMA_READ, (local.sge(),), remote_addr=remote.iova, rkey=remote.key))
    (req,) = p.a.poll(0.0).packets
    p.b.receive(req.pkt, 0.0)  # the first burst
    assert len(p.b.poll(0.0).packets) == 2 * READ_BURST  # ... and one more per poll
    assert p.b.reply_pending()  # more once the link has carried these
    # A request arriving meanwhile waits for the reply to finish.
    p.run_until_completions(1)
    assert local[0:n] == remote[0:n]
