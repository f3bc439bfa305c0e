"""Shared receive queues through the pyverbs API (``pyverbs.srq``): two RC
QPs of one context receiving from one SRQ on every device kind, the limit
event through ``get_async_event``, ``query`` / ``modify`` /
``get_srq_num``, and the errors C gives."""

from __future__ import annotations

import errno

import pytest

from tests.pyverbs.conftest import KINDS

DEVICES = [pytest.param(f"dev0:{k}", id=k) for k in KINDS]


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_two_qps_receive_from_one_srq(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.srq import SRQ, SrqAttr, SrqInitAttr
    from pyverbs.wr import SGE, RecvWR, SendWR

    from tests.pyverbs import helpers as h

    rx = h.player(machine)
    srq = SRQ(rx.pd, SrqInitAttr(SrqAttr(max_wr=8, max_sge=1, srq_limit=2)))
    assert srq.get_srq_num() > 0
    init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=rx.cq, rcq=rx.cq, srq=srq, cap=QPCap())
    rx_qps = [QP(rx.pd, init, QPAttr(port_num=1)) for _ in range(2)]
    senders = [h.player(machine) for _ in range(2)]
    for qp, tx in zip(rx_qps, senders, strict=True):
        rx.qp = qp
        h.connect(rx, tx)
    for i in range(4):
        srq.post_recv(RecvWR(wr_id=i, num_sge=1, sg=[SGE(rx.mr.buf + i * 2048, 2048, rx.mr.lkey)]))
    # A QP with an SRQ has no receive queue of its own.
    with pytest.raises(Exception) as exc:
        rx_qps[0].post_recv(RecvWR(wr_id=9, num_sge=1, sg=[SGE(rx.mr.buf, 8, rx.mr.lkey)]))
    assert getattr(exc.value, "error_code", None) == errno.EINVAL

    for n, tx in enumerate(senders * 2):
        msg = bytes([0x41 + n]) * (1500 if n < 2 else 16)  # 2 packets, then 1
        tx.mr.write(msg, len(msg))
        tx.qp.post_send(
            SendWR(
                wr_id=n, opcode=e.IBV_WR_SEND, num_sge=1, sg=[SGE(tx.mr.buf, len(msg), tx.mr.lkey)]
            )
        )
        (wc,) = tx.poll()
        assert wc.status == e.IBV_WC_SUCCESS
        (rwc,) = rx.poll()
        assert (rwc.status, rwc.wr_id, rwc.byte_len) == (e.IBV_WC_SUCCESS, n, len(msg))
        assert rwc.qp_num == rx_qps[n % 2].qp_num
        assert rx.mr.read(len(msg), n * 2048) == msg
    ev = rx.ctx.get_async_event()
    assert ev.event_type == e.IBV_EVENT_SRQ_LIMIT_REACHED
    ev.ack()
    attr = srq.query()
    assert (attr.max_wr, attr.max_sge, attr.srq_limit) == (8, 1, 0)
    srq.modify(SrqAttr(srq_limit=3), e.IBV_SRQ_LIMIT)
    assert srq.query().srq_limit == 3
    # Destroying the SRQ while QPs use it fails as in C; closing the PD
    # closes the QPs first.
    with pytest.raises(Exception) as exc:
        srq.close()
    assert getattr(exc.value, "error_code", None) == errno.EBUSY
    for qp in rx_qps:
        qp.close()
    srq.close()
    srq.close()
    rx.ctx.close()
    for tx in senders:
        tx.ctx.close()


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_srq_errors(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.srq import SRQ, SrqAttr, SrqInitAttr, SrqInitAttrEx
    from pyverbs.wr import SGE, RecvWR

    ctx = Context(name=machine)
    pd = PD(ctx)
    assert ctx.query_device().max_srq > 0
    with pytest.raises(PyverbsRDMAError) as exc:
        SRQ(pd, SrqInitAttr(SrqAttr(max_wr=0)))
    assert exc.value.error_code == errno.EINVAL
    ex = SrqInitAttrEx(max_wr=2)
    ex.comp_mask = e.IBV_SRQ_INIT_ATTR_TYPE | e.IBV_SRQ_INIT_ATTR_PD
    ex.srq_type = e.IBV_SRQT_TM
    ex.pd = pd
    with pytest.raises(PyverbsRDMAError) as exc:
        SRQ(ctx, ex)
    assert exc.value.error_code == errno.EOPNOTSUPP
    ex.srq_type = e.IBV_SRQT_BASIC
    srq = SRQ(ctx, ex)
    wr = RecvWR(wr_id=1, num_sge=1, sg=[SGE(0x1000, 8, pd.handle)])
    srq.post_recv(wr)
    srq.post_recv(RecvWR(wr_id=2, num_sge=1, sg=[SGE(0x1000, 8, 0)]))
    bad = RecvWR()
    with pytest.raises(PyverbsRDMAError) as exc:
        srq.post_recv(RecvWR(wr_id=3, num_sge=1, sg=[SGE(0x1000, 8, 0)]), bad)
    assert exc.value.error_code == errno.ENOMEM and bad.wr_id == 3
    with pytest.raises(PyverbsRDMAError) as exc:
        srq.modify(SrqAttr(max_wr=1), e.IBV_SRQ_MAX_WR)  # 2 queued
    assert exc.value.error_code == errno.EINVAL
    ctx.close()  # cascades to the SRQ
    assert srq.closed
    with pytest.raises(PyverbsRDMAError):
        srq.query()
