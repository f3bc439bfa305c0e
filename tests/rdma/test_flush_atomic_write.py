"""RC FLUSH and ATOMIC WRITE between two hosts, on every device pairing: the
CPU-copy device and the HCA behind direct DMA, an IOMMU and bounce buffers."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from softrdma.drivers.roce import RoceDevice
from softrdma.verbs.enums import (
    IB_DEVICE_ATOMIC_WRITE,
    IB_DEVICE_FLUSH_GLOBAL,
    IB_DEVICE_FLUSH_PERSISTENT,
    IbAccess,
    IbQpAttrMask,
    IbQpState,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import PostError, VerbsError
from softrdma.verbs.mr import ib_check_mr_access
from softrdma.verbs.qp import QpAttr
from softrdma.verbs.wr import AtomicWriteWR, FlushWR, RdmaWR
from tests.rdma.nodes import KINDS, PAIRINGS, Buffer, FrBuffer, Node, make_device, pair

TARGET = IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ
QP_ACCESS = TARGET | IbAccess.REMOTE_ATOMIC | IbAccess.FLUSH_GLOBAL | IbAccess.FLUSH_PERSISTENT


def _flush(wr_id: int, t: FrBuffer, off: int, n: int, *, plt: int = 1, level: int = 0) -> FlushWR:
    return FlushWR(
        wr_id,
        IbWrOpcode.FLUSH,
        remote_addr=t.iova + off,
        rkey=t.rkey,
        flush_len=n,
        placement_type=plt,
        level=level,
    )


def _awrite(wr_id: int, t: FrBuffer, off: int, data: bytes) -> AtomicWriteWR:
    return AtomicWriteWR(
        wr_id, IbWrOpcode.ATOMIC_WRITE, remote_addr=t.iova + off, rkey=t.rkey, atomic_wr=data
    )


@pytest.mark.parametrize(("kind_a", "kind_b"), PAIRINGS)
def test_write_flush_atomic_write(kind_a: str, kind_b: str) -> None:
    _f, a, b = pair(kind_a, kind_b, access=QP_ACCESS)
    t = FrBuffer(b, 3 * 4096, TARGET | IbAccess.FLUSH_GLOBAL)
    src = Buffer(a.dev, 8192)
    data = bytes(range(256)) * 24
    src.fill(data)
    lk = a.pd.local_dma_lkey
    a.qp.post_send(
        RdmaWR(1, IbWrOpcode.RDMA_WRITE, (src.sge(lk, 0, 6000),), remote_addr=t.iova, rkey=t.rkey)
    )
    a.qp.post_send(_flush(2, t, 0, 6000))
    a.qp.post_send(_awrite(3, t, 8192, b"\x01\x02\x03\x04\x05\x06\x07\x08"))
    a.qp.post_send(_flush(4, t, 1 << 30, 1 << 20, level=1))  # whole MR: the range is not used
    wcs = a.wait_ok(4)
    assert [(w.wr_id, w.opcode, w.byte_len) for w in wcs] == [
        (1, IbWcOpcode.RDMA_WRITE, 6000),
        (2, IbWcOpcode.FLUSH, 6000),
        (3, IbWcOpcode.ATOMIC_WRITE, 8),
        (4, IbWcOpcode.FLUSH, 1 << 20),
    ]
    assert t.cpu_read(6000) == data[:6000]
    assert t.cpu_read(8, 8192) == bytes(range(1, 9))
    # the same ATOMIC WRITE over it again: a single 8-byte store each time
    a.qp.post_send(_awrite(5, t, 8192, b"ZYXWVUTS"))
    a.wait_ok(1)
    assert t.cpu_read(16, 8192) == b"ZYXWVUTS" + bytes(8)


def _fails(a: Node, wr: FlushWR | AtomicWriteWR) -> IbWcStatus:
    a.qp.post_send(wr)
    (wc,) = a.wait(1)
    return wc.status


@pytest.mark.parametrize(("kind_a", "kind_b"), PAIRINGS[:3])
def test_remote_errors(kind_a: str, kind_b: str) -> None:
    cases: list[
        tuple[IbAccess, IbAccess, Callable[[FrBuffer], FlushWR | AtomicWriteWR], IbWcStatus]
    ]
    cases = [
        # (MR access, QP access at the target, the WR, the status)
        (TARGET, QP_ACCESS, lambda t: _flush(1, t, 0, 64), IbWcStatus.REM_ACCESS_ERR),
        (TARGET | IbAccess.FLUSH_GLOBAL, QP_ACCESS, lambda t: _flush(1, t, 0, 64, plt=2),
         IbWcStatus.REM_ACCESS_ERR),
        (TARGET | IbAccess.FLUSH_GLOBAL, TARGET, lambda t: _flush(1, t, 0, 64),
         IbWcStatus.REM_INV_REQ_ERR),
        (TARGET | IbAccess.FLUSH_GLOBAL, QP_ACCESS, lambda t: _flush(1, t, 4000, 200),
         IbWcStatus.REM_ACCESS_ERR),
        (TARGET, QP_ACCESS, lambda t: _awrite(1, t, 12, b"12345678"), IbWcStatus.REM_INV_REQ_ERR),
        (IbAccess.LOCAL_WRITE | IbAccess.REMOTE_READ, QP_ACCESS,
         lambda t: _awrite(1, t, 16, b"12345678"), IbWcStatus.REM_ACCESS_ERR),
        (TARGET, QP_ACCESS, lambda t: _awrite(1, t, 4096, b"12345678"),
         IbWcStatus.REM_ACCESS_ERR),
    ]  # fmt: skip
    for mr_access, qp_access, make, status in cases:
        _f, a, b = pair(kind_a, kind_b, access=QP_ACCESS)
        if qp_access != QP_ACCESS:
            b.qp.modify(QpAttr(qp_access_flags=qp_access), IbQpAttrMask.ACCESS_FLAGS)
        t = FrBuffer(b, 4096, mr_access)
        before = t.cpu_read()
        assert _fails(a, make(t)) is status
        assert t.cpu_read() == before  # nothing was written
        assert a.qp.query()[0].qp_state is IbQpState.ERR


@pytest.mark.parametrize("kind", KINDS)
def test_caps_and_registration(kind: str) -> None:
    from softrdma.fabric.inproc import Fabric

    dev: RoceDevice = make_device(kind, Fabric(), "10.0.0.9")
    caps = dev.query_device().device_cap_flags
    assert caps & IB_DEVICE_FLUSH_GLOBAL and caps & IB_DEVICE_ATOMIC_WRITE
    # rxe claims persistence and refuses it per MR (no page is pmem); the
    # HCA does not claim it
    assert bool(caps & IB_DEVICE_FLUSH_PERSISTENT) == (kind == "cpu")
    ib_check_mr_access(TARGET | IbAccess.FLUSH_GLOBAL, caps)
    with pytest.raises(VerbsError) as ei:
        ib_check_mr_access(TARGET | IbAccess.FLUSH_PERSISTENT, caps)
    assert ei.value.errno == (errno.EINVAL if kind == "cpu" else errno.EOPNOTSUPP)
    with pytest.raises(VerbsError) as ei:
        ib_check_mr_access(IbAccess.FLUSH_GLOBAL, 0)
    assert ei.value.errno == errno.EOPNOTSUPP


def test_posting_checks() -> None:
    _f, a, _b = pair("cpu", "hw-iommu", access=QP_ACCESS)
    bad = [
        FlushWR(1, IbWrOpcode.FLUSH, remote_addr=0, rkey=1, flush_len=8, placement_type=0),
        FlushWR(2, IbWrOpcode.FLUSH, remote_addr=0, rkey=1, flush_len=8, level=3),
        AtomicWriteWR(3, IbWrOpcode.ATOMIC_WRITE, remote_addr=0, rkey=1, atomic_wr=b"short"),
        RdmaWR(4, IbWrOpcode.ATOMIC_WRITE, remote_addr=0, rkey=1),
    ]
    for wr in bad:
        with pytest.raises(PostError) as ei:
            a.qp.post_send(wr)
        assert ei.value.errno == errno.EINVAL and ei.value.bad_wr is wr
    assert a.qp.query()[0].qp_state is IbQpState.RTS
