"""Memory windows end to end (rxe_mw.c): type 1 and type 2 windows on a
fast-registration MR bound by IB_WR_BIND_MW, remote WRITE / READ through
the window's key on every device pairing, violations of its range or
access NAKed as remote access errors, invalidation by LOCAL_INV and by a
peer's SEND_WITH_INVALIDATE, deallocation, and the bind errors that
complete with IB_WC_MW_BIND_ERR."""

from __future__ import annotations

import errno

import pytest

from softrdma.transport.memory_port import RemoteAccessError
from softrdma.verbs.enums import (
    IbAccess,
    IbMwType,
    IbQpState,
    IbQpType,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
)
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.mr import ib_inc_rkey
from softrdma.verbs.mw import MemoryWindow, MwState
from softrdma.verbs.qp import QpInitAttr, connect_qp
from softrdma.verbs.wr import BindMwWR, RdmaWR, RecvWR, SendWR, WorkCompletion
from tests.rdma.nodes import PAIRINGS, Buffer, FrBuffer, Node, pair

MR_ACCESS = IbAccess.LOCAL_WRITE | IbAccess.MW_BIND
W = IbAccess.REMOTE_WRITE
RW = IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ


def bind(node: Node, mw: MemoryWindow, target: FrBuffer, offset: int, length: int,
         access: IbAccess, wr_id: int = 0xB1) -> WorkCompletion:  # fmt: skip
    """Post IB_WR_BIND_MW on the node's QP and wait for its completion."""
    node.qp.post_send(
        BindMwWR(wr_id, Op.BIND_MW, (), mw=mw, mw_rkey=mw.rkey, rkey=ib_inc_rkey(mw.rkey),
                 mr=target.mr, addr=target.iova + offset, bind_length=length, mw_access=access)
    )  # fmt: skip
    (wc,) = node.wait(1)
    return wc


def write(a: Node, src: Buffer, rkey: int, addr: int, n: int, wr_id: int = 7) -> WorkCompletion:
    a.qp.post_send(
        RdmaWR(wr_id, Op.RDMA_WRITE, (src.sge(a.pd.local_dma_lkey, 0, n),), remote_addr=addr,
               rkey=rkey)
    )  # fmt: skip
    (wc,) = a.wait(1)
    return wc


@pytest.mark.parametrize(("kind_a", "kind_b"), PAIRINGS)
@pytest.mark.parametrize("mw_type", [IbMwType.TYPE_1, IbMwType.TYPE_2])
def test_write_and_read_through_a_window(kind_a: str, kind_b: str, mw_type: IbMwType) -> None:
    _, a, b = pair(kind_a, kind_b)
    target = FrBuffer(b, 3 * 4096, MR_ACCESS)
    mw = b.dev.alloc_mw(b.pd, mw_type)
    assert mw.state is (MwState.VALID if mw_type is IbMwType.TYPE_1 else MwState.FREE)
    wc = bind(b, mw, target, 1000, 6000, RW)
    assert (wc.status, wc.opcode, wc.wr_id) == (IbWcStatus.SUCCESS, IbWcOpcode.BIND_MW, 0xB1)
    assert mw.state is MwState.VALID and target.mr.num_mw == 1
    src = Buffer(a.dev, 8192)
    data = bytes(range(256)) * 24
    src.fill(data)
    assert write(a, src, mw.rkey, target.iova + 1000, 6000).status == IbWcStatus.SUCCESS
    assert target.cpu_read(6000, 1000) == data[:6000]
    a.qp.post_send(
        RdmaWR(8, Op.RDMA_READ, (src.sge(a.pd.local_dma_lkey, 0, 100),),
               remote_addr=target.iova + 2000, rkey=mw.rkey)
    )  # fmt: skip
    assert a.wait_ok(1)[0].opcode == IbWcOpcode.RDMA_READ
    assert src.read(100) == data[1000:1100]
    # The MR's own rkey grants nothing remote: its access is local only.
    assert write(a, src, target.rkey, target.iova, 8).status == IbWcStatus.REM_ACCESS_ERR


@pytest.mark.parametrize(
    ("offset", "length", "access", "op"),
    [
        (999, 10, RW, Op.RDMA_WRITE),  # starts before the window
        (6990, 20, RW, Op.RDMA_WRITE),  # runs past its end
        (1000, 10, W, Op.RDMA_READ),  # READ through a write-only window
    ],
)
def test_violations_are_remote_access_errors(
    offset: int, length: int, access: IbAccess, op: Op
) -> None:
    _, a, b = pair("cpu", "hw-iommu")
    target = FrBuffer(b, 3 * 4096, MR_ACCESS)
    target.cpu_write(bytes(8192))
    mw = b.dev.alloc_mw(b.pd, IbMwType.TYPE_2)
    assert bind(b, mw, target, 1000, 6000, access).status == IbWcStatus.SUCCESS
    src = Buffer(a.dev, 64)
    src.fill(b"\xee" * 64)
    a.qp.post_send(
        RdmaWR(9, op, (src.sge(a.pd.local_dma_lkey, 0, length),),
               remote_addr=target.iova + offset, rkey=mw.rkey)
    )  # fmt: skip
    (wc,) = a.wait(1)
    assert wc.status == IbWcStatus.REM_ACCESS_ERR
    assert target.cpu_read(8192) == bytes(8192)
    assert a.qp.state == IbQpState.ERR


def test_type2_local_and_remote_invalidation_and_dealloc() -> None:
    _, a, b = pair("cpu", "cpu")
    target = FrBuffer(b, 8192, MR_ACCESS)
    src = Buffer(a.dev, 64)
    src.fill(b"x" * 64)
    mws = [b.dev.alloc_mw(b.pd, IbMwType.TYPE_2) for _ in range(3)]
    for mw in mws:
        assert bind(b, mw, target, 0, 4096, W).status == IbWcStatus.SUCCESS
        assert write(a, src, mw.rkey, target.iova, 8).status == IbWcStatus.SUCCESS
    assert target.mr.num_mw == 3
    # LOCAL_INV on the window's own QP.
    b.qp.post_send(SendWR(0x11, Op.LOCAL_INV, invalidate_rkey=mws[0].rkey))
    assert b.wait_ok(1)[0].opcode == IbWcOpcode.LOCAL_INV
    assert mws[0].state is MwState.FREE and target.mr.num_mw == 2
    # The peer's SEND_WITH_INVALIDATE.
    rx = Buffer(b.dev, 64)
    b.qp.post_recv(RecvWR(0x22, (rx.sge(b.pd.local_dma_lkey),)))
    a.qp.post_send(SendWR(0x33, Op.SEND_WITH_INV, invalidate_rkey=mws[1].rkey))
    a.wait_ok(1)
    (wc,) = b.wait_ok(1)
    assert wc.wc_flags & IbWcFlags.WITH_INVALIDATE and wc.invalidate_rkey == mws[1].rkey
    assert mws[1].state is MwState.FREE
    # Deallocation.
    b.dev.dealloc_mw(mws[2])
    assert target.mr.num_mw == 0
    with pytest.raises(VerbsError):
        b.dev.dealloc_mw(mws[2])
    # Every key is dead for the responder now (rxe check_rkey).
    mem = b.qp.hw.mem  # type: ignore[attr-defined]
    for mw in mws:
        with pytest.raises(RemoteAccessError):
            mem.check_rkey(mw.rkey, target.iova, 8, int(W))
    wc = write(a, src, mws[0].rkey, target.iova, 8)
    assert wc.status == IbWcStatus.REM_ACCESS_ERR


def test_local_inv_of_unknown_or_type1_key_fails() -> None:
    _, _a, b = pair("cpu", "cpu")
    mw = b.dev.alloc_mw(b.pd, IbMwType.TYPE_1)
    b.qp.post_send(SendWR(0x44, Op.LOCAL_INV, invalidate_rkey=mw.rkey))
    (wc,) = b.wait(1)
    assert wc.status == IbWcStatus.LOC_QP_OP_ERR
    assert mw.state is MwState.VALID


def test_type1_unbind_and_its_rules() -> None:
    _, a, b = pair("cpu", "hw-direct")
    target = FrBuffer(b, 8192, MR_ACCESS)
    src = Buffer(a.dev, 64)
    src.fill(b"y" * 64)
    mw = b.dev.alloc_mw(b.pd, IbMwType.TYPE_1)
    assert bind(b, mw, target, 0, 4096, W).status == IbWcStatus.SUCCESS
    assert write(a, src, mw.rkey, target.iova, 16).status == IbWcStatus.SUCCESS
    # Rebinding a type 1 window moves it on; the old key stops working.
    old = mw.rkey
    assert bind(b, mw, target, 4096, 4096, W).status == IbWcStatus.SUCCESS
    assert mw.rkey != old and target.mr.num_mw == 1
    # A zero-length bind unbinds it; a type 1 window cannot be invalidated.
    b.qp.post_send(
        BindMwWR(0xB2, Op.BIND_MW, (), mw=mw, mw_rkey=mw.rkey, rkey=ib_inc_rkey(mw.rkey))
    )
    assert b.wait_ok(1)
    assert mw.length == 0 and target.mr.num_mw == 0
    assert write(a, src, mw.rkey, target.iova + 4096, 16).status == IbWcStatus.REM_ACCESS_ERR


def test_dereg_with_bound_window_and_alloc_errors() -> None:
    _, _a, b = pair("cpu", "cpu")
    target = FrBuffer(b, 8192, MR_ACCESS)
    mw = b.dev.alloc_mw(b.pd, IbMwType.TYPE_2)
    assert bind(b, mw, target, 0, 64, W).status == IbWcStatus.SUCCESS
    with pytest.raises(VerbsError) as e:
        b.dev.dereg_mr(target.mr)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(VerbsError) as e:
        b.dev.alloc_mw(b.pd, 3)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(VerbsError) as e:
        b.pd.dealloc()
    assert e.value.errno == errno.EBUSY
    b.dev.dealloc_mw(mw)
    b.dev.dereg_mr(target.mr)


@pytest.mark.parametrize(
    ("why", "mr_access", "mw_type", "offset", "length", "access"),
    [
        ("MR without MW_BIND", IbAccess.LOCAL_WRITE, IbMwType.TYPE_2, 0, 64, W),
        ("outside the MR", MR_ACCESS, IbMwType.TYPE_2, 8000, 4096, W),
        ("type 2 with length 0", MR_ACCESS, IbMwType.TYPE_2, 0, 0, W),
        ("zero based", MR_ACCESS, IbMwType.TYPE_1, 0, 64, W | IbAccess.ZERO_BASED),
        ("remote write, MR without local write", IbAccess.MW_BIND, IbMwType.TYPE_1, 0, 64, W),
    ],
)
def test_bind_errors_complete_with_mw_bind_err(
    why: str, mr_access: IbAccess, mw_type: IbMwType, offset: int, length: int, access: IbAccess
) -> None:
    _, _a, b = pair("cpu", "cpu")
    target = FrBuffer(b, 8192, mr_access)
    mw = b.dev.alloc_mw(b.pd, mw_type)
    before = (mw.rkey, mw.state)
    wc = bind(b, mw, target, offset, length, access)
    assert wc.status == IbWcStatus.MW_BIND_ERR, why
    assert (mw.rkey, mw.state) == before and target.mr.num_mw == 0
    assert b.qp.state == IbQpState.ERR


def test_type2_is_bound_to_its_qp() -> None:
    """Type 2B: only the QP that bound the window may be reached through it;
    a second connection into the same PD gets a remote access error."""
    _, a, b = pair("cpu", "cpu")
    target = FrBuffer(b, 8192, MR_ACCESS)
    mw = b.dev.alloc_mw(b.pd, IbMwType.TYPE_2)
    assert bind(b, mw, target, 0, 4096, W).status == IbWcStatus.SUCCESS
    assert mw.qp is b.qp
    qa = a.dev.create_qp(a.pd, QpInitAttr(IbQpType.RC, a.cq, a.cq))
    qb = b.dev.create_qp(b.pd, QpInitAttr(IbQpType.RC, b.cq, b.cq))
    connect_qp(qa, dest_qp_num=qb.qp_num, dgid=b.dev.query_gid())
    connect_qp(qb, dest_qp_num=qa.qp_num, dgid=a.dev.query_gid())
    src = Buffer(a.dev, 64)
    lkey = a.pd.local_dma_lkey
    qa.post_send(
        RdmaWR(1, Op.RDMA_WRITE, (src.sge(lkey, 0, 8),), remote_addr=target.iova, rkey=mw.rkey)
    )
    (wc,) = a.wait(1)
    assert (wc.qp_num, wc.status) == (qa.qp_num, IbWcStatus.REM_ACCESS_ERR)
    assert write(a, src, mw.rkey, target.iova, 8).status == IbWcStatus.SUCCESS
    # Binding it again while bound is an error.
    assert bind(b, mw, target, 0, 64, W).status == IbWcStatus.MW_BIND_ERR
