"""``ibv_wr_bind_mw`` on a QPEx (``IBV_QP_EX_WITH_BIND_MW``, RC and UC):
the bind goes in a batch with the other work requests, the window then
answers to the new key with the access it was bound with, and bad binds
end in an ``IBV_WC_MW_BIND_ERR`` completion or a typed error."""

from __future__ import annotations

import pytest

from tests.pyverbs.conftest import KINDS

DEVICES = [pytest.param(f"dev0:{k}", id=k) for k in KINDS]


def _qpex_player(machine: str, qp_type: int, ops: int) -> object:
    """A player whose QP is a QPEx with send ops ``ops``."""
    from pyverbs.qp import QPAttr, QPEx

    from tests.pyverbs import helpers as h

    p = h.player(machine, qp_type=qp_type)
    p.qp.close()
    init = h.qpex_init_attr(p, ops, qp_type)
    attr = QPAttr(port_num=1)
    attr.qp_access_flags = h.ALL_ACCESS
    return h.Player(p.ctx, p.pd, p.cq, p.mr, QPEx(p.ctx, init, attr))


def _write(a: object, rkey: int, addr: int, n: int) -> int:
    """A signalled RDMA WRITE of ``n`` bytes from ``a``'s MR; its status."""
    import pyverbs.enums as e
    from pyverbs.wr import SGE, SendWR

    w = SendWR(wr_id=9, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[SGE(a.mr.buf, n, a.mr.lkey)])  # type: ignore[attr-defined]
    w.set_wr_rdma(rkey, addr)
    a.qp.post_send(w)  # type: ignore[attr-defined]
    (c,) = a.poll()  # type: ignore[attr-defined]
    return int(c.status)


def _recv(p: object, wr_id: int) -> None:
    """A receive without SGEs: the immediate's completion proves delivery
    (a UC sender's completion does not)."""
    from pyverbs.wr import RecvWR

    p.qp.post_recv(RecvWR(wr_id=wr_id, num_sge=0, sg=[]))  # type: ignore[attr-defined]


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
@pytest.mark.parametrize("qp_type", ["rc", "uc"])
def test_wr_bind_mw_then_write_through_the_window(machine: str, qp_type: str) -> None:
    import pyverbs.enums as e
    from pyverbs.base import inc_rkey
    from pyverbs.mr import MR, MW, MWBindInfo
    from pyverbs.wr import SGE, SendWR

    from tests.pyverbs import helpers as h

    qpt = e.IBV_QPT_RC if qp_type == "rc" else e.IBV_QPT_UC
    ops = e.IBV_QP_EX_WITH_BIND_MW | e.IBV_QP_EX_WITH_RDMA_WRITE_WITH_IMM
    a, b = h.player(machine, qp_type=qpt), _qpex_player(machine, qpt, ops)
    h.connect(a, b)  # type: ignore[arg-type]
    qp = b.qp  # type: ignore[attr-defined]
    target = MR(b.pd, 8192, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_MW_BIND)  # type: ignore[attr-defined]
    mw = MW(b.pd, e.IBV_MW_TYPE_2)  # type: ignore[attr-defined]
    old = mw.rkey
    key = inc_rkey(mw.rkey)
    # the bind and a write of b's own, in one batch
    b.mr.write(b"q" * 8, 8)  # type: ignore[attr-defined]
    _recv(a, 7)
    qp.wr_start()
    qp.wr_id, qp.wr_flags = 0x51, e.IBV_SEND_SIGNALED
    info = MWBindInfo(target, target.buf + 1024, 2048, e.IBV_ACCESS_REMOTE_WRITE)
    qp.wr_bind_mw(mw, key, info)
    qp.wr_id = 0x52
    qp.wr_rdma_write_imm(a.mr.rkey, a.mr.buf + 4000, 1)
    qp.wr_set_sge(SGE(b.mr.buf, 8, b.mr.lkey))  # type: ignore[attr-defined]
    qp.wr_complete()
    wcs = b.poll(2)  # type: ignore[attr-defined]
    assert [(w.wr_id, w.status) for w in wcs] == [(0x51, 0), (0x52, 0)]
    assert wcs[0].opcode == e.IBV_WC_BIND_MW
    assert mw.rkey == old  # the user's copy: the key is the one passed
    assert a.poll()[0].wr_id == 7 and a.mr.read(8, 4000) == b"q" * 8
    # a writes through the window's new key
    a.mr.write(b"mw" * 1024, 2048)
    _recv(b, 8)
    w = SendWR(wr_id=9, opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1,
               sg=[SGE(a.mr.buf, 2048, a.mr.lkey)], imm_data=2)  # fmt: skip
    w.set_wr_rdma(key, target.buf + 1024)
    a.qp.post_send(w)
    assert a.poll()[0].status == e.IBV_WC_SUCCESS
    (wc,) = b.poll()  # type: ignore[attr-defined]
    assert (wc.wr_id, wc.status, wc.byte_len) == (8, e.IBV_WC_SUCCESS, 2048)
    assert target.read(2048, 1024) == b"mw" * 1024
    if qpt == e.IBV_QPT_RC:
        # the old key is gone
        assert _write(a, old, target.buf + 1024, 8) == e.IBV_WC_REM_ACCESS_ERR
    for p in (a, b):
        p.ctx.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("machine", ["dev0:cpu"], indirect=True)
def test_wr_bind_mw_access_is_enforced(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.base import inc_rkey
    from pyverbs.mr import MR, MW, MWBindInfo

    from tests.pyverbs import helpers as h

    ops = e.IBV_QP_EX_WITH_BIND_MW
    a, b = h.player(machine), _qpex_player(machine, e.IBV_QPT_RC, ops)
    h.connect(a, b)  # type: ignore[arg-type]
    qp = b.qp  # type: ignore[attr-defined]
    target = MR(b.pd, 4096, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_MW_BIND)  # type: ignore[attr-defined]
    mw = MW(b.pd, e.IBV_MW_TYPE_2)  # type: ignore[attr-defined]
    key = inc_rkey(mw.rkey)
    qp.wr_start()
    qp.wr_id, qp.wr_flags = 1, e.IBV_SEND_SIGNALED
    qp.wr_bind_mw(mw, key, MWBindInfo(target, target.buf, 4096, e.IBV_ACCESS_LOCAL_WRITE))
    qp.wr_complete()
    assert b.poll()[0].status == e.IBV_WC_SUCCESS  # type: ignore[attr-defined]
    # bound without REMOTE_WRITE: a write through it is refused
    assert _write(a, key, target.buf, 8) == e.IBV_WC_REM_ACCESS_ERR
    # (the access error moved b's QP to the error state: a new pair)
    # a bind over an MR without MW_BIND access fails in its completion
    a2, b2 = h.player(machine), _qpex_player(machine, e.IBV_QPT_RC, ops)
    h.connect(a2, b2)  # type: ignore[arg-type]
    mw2 = MW(b2.pd, e.IBV_MW_TYPE_2)  # type: ignore[attr-defined]
    mr = b2.mr  # type: ignore[attr-defined]
    b2.qp.wr_start()  # type: ignore[attr-defined]
    b2.qp.wr_flags = e.IBV_SEND_SIGNALED  # type: ignore[attr-defined]
    info = MWBindInfo(mr, mr.buf, 64, e.IBV_ACCESS_REMOTE_READ)
    b2.qp.wr_bind_mw(mw2, inc_rkey(mw2.rkey), info)  # type: ignore[attr-defined]
    b2.qp.wr_complete()  # type: ignore[attr-defined]
    assert b2.poll()[0].status == e.IBV_WC_MW_BIND_ERR  # type: ignore[attr-defined]
    for p in (a, b, a2, b2):
        p.ctx.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("machine", ["dev0:cpu"], indirect=True)
def test_wr_bind_mw_errors(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.mr import MW, MWBindInfo
    from pyverbs.pyverbs_error import PyverbsUserError

    p = _qpex_player(machine, e.IBV_QPT_RC, e.IBV_QP_EX_WITH_BIND_MW)
    q = _qpex_player(machine, e.IBV_QPT_RC, e.IBV_QP_EX_WITH_SEND)
    mw = MW(p.pd, e.IBV_MW_TYPE_2)  # type: ignore[attr-defined]
    info = MWBindInfo(p.mr, p.mr.buf, 64, e.IBV_ACCESS_REMOTE_READ)  # type: ignore[attr-defined]
    with pytest.raises(PyverbsUserError, match="wr_start"):
        p.qp.wr_bind_mw(mw, 1, info)  # type: ignore[attr-defined]
    p.qp.wr_start()  # type: ignore[attr-defined]
    with pytest.raises(PyverbsUserError):
        p.qp.wr_bind_mw(info, 1, mw)  # type: ignore[attr-defined]
    p.qp.wr_abort()  # type: ignore[attr-defined]
    q.qp.wr_start()  # type: ignore[attr-defined]
    with pytest.raises(PyverbsUserError, match="not created with send op"):
        q.qp.wr_bind_mw(mw, 1, info)  # type: ignore[attr-defined]
    q.qp.wr_abort()  # type: ignore[attr-defined]
    for x in (p, q):
        x.ctx.close()  # type: ignore[attr-defined]
