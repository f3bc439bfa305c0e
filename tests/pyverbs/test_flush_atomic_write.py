"""``ibv_wr_flush`` and ``ibv_wr_atomic_write`` on a QPEx, the flush access
flags of ``ibv_reg_mr`` and the device's caps, on every device kind — the
flows of rdma-core's ``test_qp_ex_rc_flush`` / ``_flush_type_violate`` /
``_atomic_write`` and their error cases."""

from __future__ import annotations

import errno

import pytest

from tests.pyverbs.conftest import KINDS

DEVICES = [pytest.param(f"dev0:{k}", id=k) for k in KINDS]


def _players(machine: str, mr_access: int) -> tuple[object, object]:
    """Client and server, each a QPEx with FLUSH / ATOMIC WRITE / RDMA WRITE
    and an MR with ``mr_access``; the QPs allow both flush placement types
    (as the upstream suite's ``create_qp_ex``)."""
    import pyverbs.enums as e
    from pyverbs.mr import MR
    from pyverbs.qp import QPAttr, QPEx

    from tests.pyverbs import helpers as h

    qp_access = h.ALL_ACCESS | e.IBV_ACCESS_FLUSH_GLOBAL | e.IBV_ACCESS_FLUSH_PERSISTENT
    ops = e.IBV_QP_EX_WITH_FLUSH | e.IBV_QP_EX_WITH_ATOMIC_WRITE | e.IBV_QP_EX_WITH_RDMA_WRITE
    out = []
    for _ in range(2):
        p = h.player(machine)
        p.qp.close()
        p.mr.close()
        init = h.qpex_init_attr(p, ops)
        attr = QPAttr(port_num=1)
        attr.qp_access_flags = qp_access
        out.append(h.Player(p.ctx, p.pd, p.cq, MR(p.pd, 4096, mr_access), QPEx(p.ctx, init, attr)))
    a, b = out
    for x, y in ((a, b), (b, a)):
        h.rc_to_rts(x.qp, x.ctx, y.qp.qp_num, qp_access)
    return a, b


def _post(a: object, build: object) -> object:
    import pyverbs.enums as e

    qp = a.qp  # type: ignore[attr-defined]
    qp.wr_start()
    qp.wr_id = 0x123
    qp.wr_flags = e.IBV_SEND_SIGNALED
    build(qp)  # type: ignore[operator]
    qp.wr_complete()
    (wc,) = a.poll()  # type: ignore[attr-defined]
    return wc


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_write_then_flush_range_and_mr(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.wr import SGE

    access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_FLUSH_GLOBAL
    a, b = _players(machine, access)
    a.mr.write(b"c" * 100, 100)  # type: ignore[attr-defined]
    rkey, raddr = b.mr.rkey, b.mr.buf  # type: ignore[attr-defined]
    qp = a.qp  # type: ignore[attr-defined]
    qp.wr_start()
    qp.wr_flags = e.IBV_SEND_SIGNALED
    qp.wr_id = 1
    qp.wr_rdma_write(rkey, raddr)
    qp.wr_set_sge(SGE(a.mr.buf, 100, a.mr.lkey))  # type: ignore[attr-defined]
    qp.wr_id = 2
    qp.wr_flush(rkey, raddr, 100, e.IBV_FLUSH_GLOBAL, e.IBV_FLUSH_RANGE)
    qp.wr_complete()
    w1, w2 = a.poll(2)  # type: ignore[attr-defined]
    assert (w1.wr_id, w1.status, w1.opcode) == (1, e.IBV_WC_SUCCESS, e.IBV_WC_RDMA_WRITE)
    assert (w2.wr_id, w2.status, w2.opcode) == (2, e.IBV_WC_SUCCESS, e.IBV_WC_FLUSH)
    assert b.mr.read(100, 0) == b"c" * 100  # type: ignore[attr-defined]
    wc = _post(a, lambda q: q.wr_flush(rkey, 0, 0, e.IBV_FLUSH_GLOBAL, e.IBV_FLUSH_MR))
    assert (wc.status, wc.opcode) == (e.IBV_WC_SUCCESS, e.IBV_WC_FLUSH)  # type: ignore[attr-defined]


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_flush_type_violate(machine: str) -> None:
    import pyverbs.enums as e

    access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_FLUSH_GLOBAL
    a, b = _players(machine, access)
    rkey, raddr = b.mr.rkey, b.mr.buf  # type: ignore[attr-defined]
    wc = _post(a, lambda q: q.wr_flush(rkey, raddr, 64, e.IBV_FLUSH_PERSISTENT, e.IBV_FLUSH_RANGE))
    assert wc.status == e.IBV_WC_REM_ACCESS_ERR  # type: ignore[attr-defined]


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_atomic_write(machine: str) -> None:
    import pyverbs.enums as e

    access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
    a, b = _players(machine, access)
    rkey, raddr = b.mr.rkey, b.mr.buf  # type: ignore[attr-defined]
    wc = _post(a, lambda q: q.wr_atomic_write(rkey, raddr + 64, b"abcdefgh"))
    assert (wc.status, wc.opcode) == (e.IBV_WC_SUCCESS, e.IBV_WC_ATOMIC_WRITE)  # type: ignore[attr-defined]
    assert b.mr.read(8, 64) == b"abcdefgh"  # type: ignore[attr-defined]
    wc = _post(a, lambda q: q.wr_atomic_write(rkey, raddr + 68, b"misalign"))
    assert wc.status == e.IBV_WC_REM_INV_REQ_ERR  # type: ignore[attr-defined]
    assert b.mr.read(16, 64) == b"abcdefgh" + bytes(8)  # type: ignore[attr-defined]


def test_bad_calls(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
    from pyverbs.qp import QPEx

    from tests.pyverbs import helpers as h

    a, _b = _players(machine, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
    qp = a.qp  # type: ignore[attr-defined]
    qp.wr_start()
    with pytest.raises(PyverbsUserError, match="8 bytes"):
        qp.wr_atomic_write(1, 0, b"1234")
    with pytest.raises(PyverbsUserError):
        qp.wr_atomic_write(1, 0, "abcdefgh")
    qp.wr_abort()
    # a placement type that is neither GLOBAL nor PERSISTENT: EINVAL at post
    qp.wr_start()
    qp.wr_flush(1, 0, 8, 0, e.IBV_FLUSH_RANGE)
    with pytest.raises(PyverbsRDMAError) as ei:
        qp.wr_complete()
    assert ei.value.error_code == errno.EINVAL
    # no such send op on the QP
    p = h.player(machine)
    init = h.qpex_init_attr(p, e.IBV_QP_EX_WITH_RDMA_WRITE)
    q2 = QPEx(p.ctx, init)
    q2.wr_start()
    with pytest.raises(PyverbsUserError, match="send op"):
        q2.wr_flush(1, 0, 8, e.IBV_FLUSH_GLOBAL, e.IBV_FLUSH_RANGE)
    q2.wr_abort()
    # RC only
    init.qp_type = e.IBV_QPT_UC
    init.send_ops_flags = e.IBV_QP_EX_WITH_FLUSH
    with pytest.raises(PyverbsRDMAError) as ei:
        QPEx(p.ctx, init)
    assert ei.value.error_code == errno.EOPNOTSUPP


@pytest.mark.parametrize(
    ("machine", "kind"), [(f"dev0:{k}", k) for k in KINDS], indirect=["machine"]
)
def test_mr_flush_access_and_caps(machine: str, kind: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError

    ctx = Context(name=machine)
    caps = ctx.query_device_ex().device_cap_flags_ex
    # IB_UVERBS_DEVICE_FLUSH_GLOBAL, _ATOMIC_WRITE on every kind;
    # IB_UVERBS_DEVICE_FLUSH_PERSISTENT only on rxe (the CPU-copy device)
    assert caps & (1 << 38) and caps & (1 << 40)
    assert bool(caps & (1 << 39)) == (kind == "cpu")
    pd = PD(ctx)
    with MR(pd, 4096, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_FLUSH_GLOBAL) as mr:
        assert mr.rkey
    with pytest.raises(PyverbsRDMAError) as ei:
        MR(pd, 4096, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_FLUSH_PERSISTENT)
    # rxe: the pages are not persistent memory; the HCA: not supported
    assert ei.value.error_code == (errno.EINVAL if kind == "cpu" else errno.EOPNOTSUPP)
