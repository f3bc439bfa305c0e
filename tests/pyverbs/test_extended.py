"""The extended APIs: the QPEx post-send API (``ibv_wr_*``) and device
memory (``ibv_alloc_dm``, ``ibv_reg_dm_mr``)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from softrdma.verbs.errors import VerbsError
from tests.pyverbs.conftest import KINDS

DEVICES = [pytest.param(f"dev0:{k}", id=k) for k in KINDS]


@pytest.mark.parametrize("machine", DEVICES[:2], indirect=True)
def test_qpex_batch_posts_every_operation(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.qp import QPAttr, QPEx
    from pyverbs.wr import SGE, RecvWR

    from tests.pyverbs import helpers as h

    ops = (
        e.IBV_QP_EX_WITH_SEND
        | e.IBV_QP_EX_WITH_SEND_WITH_IMM
        | e.IBV_QP_EX_WITH_RDMA_WRITE
        | e.IBV_QP_EX_WITH_RDMA_READ
        | e.IBV_QP_EX_WITH_ATOMIC_FETCH_AND_ADD
    )
    a, b = h.player(machine), h.player(machine)
    a.qp.close()
    init = h.qpex_init_attr(a, ops)
    qp = QPEx(a.ctx, init, QPAttr())
    a = h.Player(a.ctx, a.pd, a.cq, a.mr, qp)
    h.connect(a, b)
    b.qp.post_recv(RecvWR(wr_id=1, num_sge=1, sg=[SGE(b.mr.buf, 64, b.mr.lkey)]))
    a.mr.write(b"x" * 64, 64)
    b.mr.write(b"r" * 16, 16, 1024)
    b.mr.write(struct.pack("<Q", 5), 8, 2048)
    qp.wr_start()
    qp.wr_id, qp.wr_flags = 10, e.IBV_SEND_SIGNALED
    qp.wr_send_imm(0xBEEF)
    qp.wr_set_sge(SGE(a.mr.buf, 64, a.mr.lkey))
    qp.wr_id = 11
    qp.wr_rdma_write(b.mr.rkey, b.mr.buf + 512)
    qp.wr_set_sge(SGE(a.mr.buf, 32, a.mr.lkey))
    qp.wr_id = 12
    qp.wr_rdma_read(b.mr.rkey, b.mr.buf + 1024)
    qp.wr_set_sge(SGE(a.mr.buf + 128, 16, a.mr.lkey))
    qp.wr_id = 13
    qp.wr_atomic_fetch_add(b.mr.rkey, b.mr.buf + 2048, 3)
    qp.wr_set_sge(SGE(a.mr.buf + 256, 8, a.mr.lkey))
    qp.wr_complete()
    wcs = a.poll(4)
    assert [(w.wr_id, w.status) for w in wcs] == [(i, e.IBV_WC_SUCCESS) for i in (10, 11, 12, 13)]
    (recv,) = b.poll()
    assert socket.ntohl(recv.imm_data) == 0xBEEF and b.mr.read(64, 0) == b"x" * 64
    assert b.mr.read(32, 512) == b"x" * 32 and a.mr.read(16, 128) == b"r" * 16
    assert struct.unpack("<Q", a.mr.read(8, 256))[0] == 5
    assert struct.unpack("<Q", b.mr.read(8, 2048))[0] == 8
    # an operation the QP was not created for, and an aborted batch
    qp.wr_start()
    with pytest.raises(Exception, match="not created with send op"):
        qp.wr_rdma_write_imm(b.mr.rkey, b.mr.buf, 1)
    qp.wr_abort()
    a.ctx.close()
    b.ctx.close()


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_qpex_refuses_unsupported_send_ops(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.cq import CQ
    from pyverbs.device import Context
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.qp import QPEx, QPInitAttrEx

    with Context(name=machine) as ctx:
        pd, cq = PD(ctx), CQ(ctx, 8)
        for qpt, ops in (
            (e.IBV_QPT_UC, e.IBV_QP_EX_WITH_RDMA_READ),
            (e.IBV_QPT_RC, e.IBV_QP_EX_WITH_TSO),
            (e.IBV_QPT_UC, e.IBV_QP_EX_WITH_ATOMIC_WRITE),
            (e.IBV_QPT_UD, e.IBV_QP_EX_WITH_RDMA_WRITE),
        ):
            init = QPInitAttrEx(
                qp_type=qpt,
                scq=cq,
                rcq=cq,
                pd=pd,
                comp_mask=e.IBV_QP_INIT_ATTR_PD | e.IBV_QP_INIT_ATTR_SEND_OPS_FLAGS,
                send_ops_flags=ops,
            )
            with pytest.raises(PyverbsRDMAError) as ex:
                QPEx(ctx, init)
            assert ex.value.error_code == errno.EOPNOTSUPP


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_device_memory(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import DM, AllocDmAttr
    from pyverbs.mr import DMMR
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.wr import SGE, SendWR

    from pyverbs import _softrdma as sim
    from tests.pyverbs import helpers as h

    a, b = h.player(machine), h.player(machine)
    h.connect(a, b)
    max_dm = a.ctx.query_device_ex().max_dm_size
    assert max_dm > 0
    with pytest.raises(PyverbsRDMAError, match="Max available size") as ex:
        DM(b.ctx, AllocDmAttr(max_dm + 4))
    assert ex.value.error_code == errno.ENOMEM
    dm = DM(b.ctx, AllocDmAttr(8192))
    dm.copy_to_dm(4, b"abcd", 4)
    assert dm.copy_from_dm(0, 8) == b"\0\0\0\0abcd"
    for offset, length in ((1, 4), (0, 3), (8192, 4)):
        with pytest.raises(PyverbsRDMAError, match="Failed to copy to dm"):
            dm.copy_to_dm(offset, b"x" * length, length)
    access = e.IBV_ACCESS_ZERO_BASED | e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
    with pytest.raises(PyverbsRDMAError, match="Failed to register a device MR"):
        DMMR(b.pd, 8196, access, dm, 0)
    with pytest.raises(PyverbsRDMAError, match="Failed to register a device MR"):
        DMMR(b.pd, 64, e.IBV_ACCESS_LOCAL_WRITE, dm, 0)  # DM MRs are zero-based
    mr = DMMR(b.pd, 8192, access, dm, 0)
    assert mr.buf == 0
    # an RDMA WRITE to iova 4096 of the zero-based MR lands in device memory
    a.mr.write(b"dm" * 50, 100)
    w = SendWR(wr_id=1, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[SGE(a.mr.buf, 100, a.mr.lkey)])
    w.set_wr_rdma(mr.rkey, 4096)
    a.qp.post_send(w)
    assert a.poll()[0].status == e.IBV_WC_SUCCESS
    assert dm.copy_from_dm(4096, 100) == b"dm" * 50 == mr.read(100, 4096)
    with pytest.raises(VerbsError) as busy:
        dm.dm.free()  # still registered
    assert busy.value.errno == errno.EBUSY
    b.ctx.close()
    assert mr.closed and dm.closed
    from softrdma.verbs.dm import DM_MAX_SIZE, dm_available

    assert dm_available(sim.process().devices["dev0"]) == DM_MAX_SIZE
    a.ctx.close()
