"""UC QPs through the pyverbs API on every device kind: created in RESET
or INIT, connected with pyverbs' UC attribute masks, SEND with immediate
and RDMA WRITE with immediate carried end to end, READ refused."""

from __future__ import annotations

import errno
import socket

import pytest

from tests.pyverbs.conftest import KINDS

DEVICES = [pytest.param(f"dev0:{k}", id=k) for k in KINDS]


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_uc_traffic(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.wr import SGE, RecvWR, SendWR

    from tests.pyverbs import helpers as h

    a, b = h.player(machine, e.IBV_QPT_UC), h.player(machine, e.IBV_QPT_UC)
    assert a.qp.qp_state == e.IBV_QPS_INIT
    h.connect(a, b)
    assert a.qp.qp_state == e.IBV_QPS_RTS
    attr, init = a.qp.query(e.IBV_QP_STATE | e.IBV_QP_DEST_QPN)
    assert (init.qp_type, attr.dest_qp_num) == (e.IBV_QPT_UC, b.qp.qp_num)

    b.qp.post_recv(RecvWR(wr_id=1, num_sge=1, sg=[SGE(b.mr.buf, 4096, b.mr.lkey)]))
    b.qp.post_recv(RecvWR(wr_id=2, num_sge=1, sg=[SGE(b.mr.buf, 16, b.mr.lkey)]))
    a.mr.write(b"uc!" * 1000, 3000)
    a.qp.post_send(
        SendWR(wr_id=3, opcode=e.IBV_WR_SEND_WITH_IMM, num_sge=1,
               sg=[SGE(a.mr.buf, 3000, a.mr.lkey)], imm_data=socket.htonl(0x77))
    )  # fmt: skip
    (wc,) = a.poll()
    assert (wc.status, wc.opcode) == (e.IBV_WC_SUCCESS, e.IBV_WC_SEND)
    (wc,) = b.poll()
    assert (wc.status, wc.wr_id, wc.byte_len) == (e.IBV_WC_SUCCESS, 1, 3000)
    assert wc.wc_flags & e.IBV_WC_WITH_IMM and socket.ntohl(wc.imm_data) == 0x77
    assert b.mr.read(3000, 0) == b"uc!" * 1000

    wr = SendWR(wr_id=4, opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1,
                sg=[SGE(a.mr.buf, 100, a.mr.lkey)], imm_data=socket.htonl(5))  # fmt: skip
    wr.set_wr_rdma(b.mr.rkey, b.mr.buf + 5000)
    a.qp.post_send(wr)
    (wc,) = a.poll()
    assert wc.status == e.IBV_WC_SUCCESS
    (wc,) = b.poll()
    assert (wc.opcode, wc.wr_id, wc.byte_len) == (e.IBV_WC_RECV_RDMA_WITH_IMM, 2, 100)
    assert b.mr.read(100, 5000) == (b"uc!" * 34)[:100]

    read = SendWR(wr_id=5, opcode=e.IBV_WR_RDMA_READ, num_sge=1,
                  sg=[SGE(a.mr.buf, 8, a.mr.lkey)])  # fmt: skip
    read.set_wr_rdma(b.mr.rkey, b.mr.buf)
    with pytest.raises(PyverbsRDMAError) as exc:
        a.qp.post_send(read)
    assert exc.value.error_code == errno.EINVAL
    a.ctx.close()
    b.ctx.close()


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_uc_created_in_reset(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.cq import CQ
    from pyverbs.device import Context
    from pyverbs.pd import PD
    from pyverbs.qp import QP, QPCap, QPInitAttr

    ctx = Context(name=machine)
    pd = PD(ctx)
    cq = CQ(ctx, 16)
    qp = QP(pd, QPInitAttr(qp_type=e.IBV_QPT_UC, scq=cq, rcq=cq, cap=QPCap()))
    assert qp.qp_state == e.IBV_QPS_RESET
    attr, init = qp.query(e.IBV_QP_STATE | e.IBV_QP_CAP)
    assert attr.qp_state == e.IBV_QPS_RESET and init.cap.max_send_wr >= 1
    ctx.close()
