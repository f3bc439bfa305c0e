"""Receiver-not-ready: the NAK, its timer, and the retry count.

Two RC engines back to back (:class:`.engine_harness.Pair`).
"""

from __future__ import annotations

import pytest

from softrdma.transport.headers import AethType, rnr_timer_decode
from softrdma.verbs.enums import IbQpState, IbWcOpcode, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR

from .engine_harness import Pair, fatal_events, naks, pattern, wc_ok


@pytest.mark.parametrize("timer", [1, 12, 14, 0])
def test_rnr_nak_timer_and_retry(timer: int) -> None:
    p = Pair(b_kw={"min_rnr_timer": timer})
    src = p.mem_a.reg(100, fill=pattern(100))
    rbuf = p.mem_b.reg(100)
    p.post(SendWR(1, Op.SEND, (src.sge(),)))
    p.step()
    p.step()
    assert naks(p.sent_b) == [(AethType.RNR_NAK, timer, p.pa.sq_psn)]
    delay = rnr_timer_decode(timer) * 1e-6
    assert p.a.next_deadline() == pytest.approx(delay)
    p.post_recv(RecvWR(9, (rbuf.sge(),)))
    p.run_until_completions(1, 1)
    sends = [(t, q) for t, who, q in p.log if who == "a"]
    assert [t for t, _ in sends] == [0.0, pytest.approx(delay)]
    assert rbuf[0:100] == src[0:100]


def test_rnr_retry_exhausted() -> None:
    p = Pair(a_kw={"rnr_retry": 2}, b_kw={"min_rnr_timer": 3})
    src = p.mem_a.reg(100)
    p.post(SendWR(1, Op.SEND, (src.sge(),)))
    p.post(SendWR(2, Op.SEND, (src.sge(),)))
    p.run()
    # First try plus two retries: three RNR NAKs, then the error. (The second
    # SEND behind the first draws a PSN sequence NAK each round.)
    kinds = [k for k, _, _ in naks(p.sent_b)]
    assert kinds == [AethType.RNR_NAK, AethType.NAK] * 3
    assert p.now == pytest.approx(2 * rnr_timer_decode(3) * 1e-6)
    wcs = p.send_wcs()
    assert [(wc.wr_id, wc.status) for wc in wcs] == [
        (1, IbWcStatus.RNR_RETRY_EXC_ERR),
        (2, IbWcStatus.WR_FLUSH_ERR),
    ]
    assert fatal_events(p.events_a)[0].status is IbWcStatus.RNR_RETRY_EXC_ERR
    assert not fatal_events(p.events_b)  # RNR is class B: the responder is fine
    assert p.b.state is IbQpState.RTS


def test_rnr_retry_seven_is_infinite() -> None:
    p = Pair(a_kw={"rnr_retry": 7}, b_kw={"min_rnr_timer": 1})
    src = p.mem_a.reg(10)
    rbuf = p.mem_b.reg(10)
    p.post(SendWR(1, Op.SEND, (src.sge(),)))
    p.run(lambda: len(naks(p.sent_b)) >= 50)
    assert not p.send_wcs()
    p.post_recv(RecvWR(1, (rbuf.sge(),)))
    p.run_until_completions(1)
    wc_ok(p.send_wcs()[0], IbWcOpcode.SEND)


def test_rnr_on_write_with_immediate() -> None:
    p = Pair(mtu=256)
    src = p.mem_a.reg(1000, fill=pattern(1000))
    dst = p.mem_b.reg(1000)
    p.post(
        RdmaWR(
            1, Op.RDMA_WRITE_WITH_IMM, (src.sge(),), imm_data=5, remote_addr=dst.iova, rkey=dst.key
        )
    )
    p.run(lambda: bool(naks(p.sent_b)))
    # The data before the LAST packet was written; the LAST needs a WQE.
    assert naks(p.sent_b)[0][0] is AethType.RNR_NAK
    p.post_recv(RecvWR(4, ()))
    p.run_until_completions(1, 1)
    assert dst[0:1000] == src[0:1000]
    assert p.recv_wcs()[0].opcode is IbWcOpcode.RECV_RDMA_WITH_IMM
