"""Memory windows through the pyverbs API on every device kind: ``MW``
types 1 and 2, ``QP.bind_mw`` and ``IBV_WR_BIND_MW``, RDMA WRITE through
the window's key, a write past the window failing with a remote access
error, invalidation and the errors C gives."""

from __future__ import annotations

import errno

import pytest

from tests.pyverbs.conftest import KINDS

DEVICES = [pytest.param(f"dev0:{k}", id=k) for k in KINDS]


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
@pytest.mark.parametrize("mw_type", [1, 2])
def test_bind_write_invalidate(machine: str, mw_type: int) -> None:
    import pyverbs.enums as e
    from pyverbs.mr import MR, MW, MWBind, MWBindInfo
    from pyverbs.wr import SGE, SendWR

    from tests.pyverbs import helpers as h

    a, b = h.player(machine), h.player(machine)
    h.connect(a, b)
    target = MR(b.pd, 8192, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_MW_BIND)
    mw = MW(b.pd, mw_type)
    info = MWBindInfo(target, target.buf + 1024, 2048, e.IBV_ACCESS_REMOTE_WRITE)
    if mw_type == 1:
        old = mw.rkey
        b.qp.bind_mw(mw, MWBind(info, e.IBV_SEND_SIGNALED, wr_id=0x51))
        rkey = mw.rkey
        assert rkey != old and rkey >> 8 == old >> 8
    else:
        wr = SendWR(wr_id=0x51, opcode=e.IBV_WR_BIND_MW, send_flags=e.IBV_SEND_SIGNALED)
        wr.set_bind_wr(mw, info)
        b.qp.post_send(wr)
        rkey = wr.rkey
    (wc,) = b.poll()
    assert (wc.status, wc.opcode, wc.wr_id) == (e.IBV_WC_SUCCESS, e.IBV_WC_BIND_MW, 0x51)

    def write(offset: int, n: int) -> int:
        w = SendWR(wr_id=9, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1,
                   sg=[SGE(a.mr.buf, n, a.mr.lkey)])  # fmt: skip
        w.set_wr_rdma(rkey, target.buf + offset)
        a.qp.post_send(w)
        (c,) = a.poll()
        return int(c.status)

    a.mr.write(b"mw" * 1024, 2048)
    assert write(1024, 2048) == e.IBV_WC_SUCCESS
    assert target.read(2048, 1024) == b"mw" * 1024
    assert write(1024 + 2040, 16) == e.IBV_WC_REM_ACCESS_ERR  # past the window
    mw.close()
    mw.close()
    for p in (a, b):
        p.ctx.close()


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_mw_errors(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import MR, MW, MWBind, MWBindInfo
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError

    from tests.pyverbs import helpers as h

    ctx = Context(name=machine)
    assert ctx.query_device().max_mw > 0
    pd = PD(ctx)
    with pytest.raises(PyverbsRDMAError) as exc:
        MW(pd, 3)
    assert exc.value.error_code == errno.EINVAL
    p = h.player(machine)
    mr = MR(p.pd, 4096, e.IBV_ACCESS_LOCAL_WRITE)  # no MW_BIND
    mw2 = MW(p.pd, e.IBV_MW_TYPE_2)
    bind = MWBind(MWBindInfo(mr, mr.buf, 64, e.IBV_ACCESS_REMOTE_WRITE), e.IBV_SEND_SIGNALED)
    with pytest.raises(PyverbsRDMAError) as exc:
        p.qp.bind_mw(mw2, bind)  # ibv_bind_mw is for type 1 windows
    assert exc.value.error_code == errno.EINVAL
    ctx.close()
    p.ctx.close()
    assert mw2.closed
