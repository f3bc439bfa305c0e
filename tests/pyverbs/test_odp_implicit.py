"""Implicit on-demand paging (``MR(..., implicit=True)``, ``ibv_reg_mr(pd,
NULL, SIZE_MAX, IBV_ACCESS_ON_DEMAND)``): one lkey / rkey reaches every
address of the process; pages fault in at the device's first access, an
address with nothing mapped is an access error, ``advise_mr`` prefetches,
and munmap / close take the device's mappings away."""

from __future__ import annotations

import errno

import pytest

PAGE = 4096
SIZE_MAX = 2**64 - 1
ODP = 0x40  # IBV_ACCESS_ON_DEMAND
RW = 0x1 | 0x2 | 0x4  # LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ


def _rdma(a: object, op: int, laddr: int, lkey: int, raddr: int, rkey: int, n: int) -> int:
    """One signalled RDMA WRITE / READ from ``a``; its completion status."""
    from pyverbs.wr import SGE, SendWR

    wr = SendWR(1, opcode=op, num_sge=1, sg=[SGE(laddr, n, lkey)])
    wr.set_wr_rdma(rkey, raddr)
    a.qp.post_send(wr)  # type: ignore[attr-defined]
    return int(a.poll()[0].status)  # type: ignore[attr-defined]


def _pair(machine: str) -> tuple[object, object]:
    from tests.pyverbs import helpers as h

    a, b = h.player(machine), h.player(machine)
    h.connect(a, b)
    return a, b


@pytest.mark.parametrize("machine", ["dev0:cpu", "dev0:iommu"], indirect=True)
def test_implicit_mr_covers_the_address_space(machine: str) -> None:
    import pyverbs.enums as e
    import pyverbs.mem_alloc as mem
    from pyverbs.mr import MR

    from pyverbs import _softrdma as sim

    a, b = _pair(machine)
    assert b.ctx.query_device_ex().odp_caps.general_caps & e.IBV_ODP_SUPPORT_IMPLICIT  # type: ignore[attr-defined]
    dev = b.ctx.device.dma_device  # type: ignore[attr-defined]
    assert dev.debug is not None
    live = len(dev.debug.live_mappings(dev))
    pinned = sim.process().mm.pinned_vm
    imr = MR(b.pd, PAGE, RW | ODP, implicit=True)  # type: ignore[attr-defined]
    odp = imr.umem.odp
    assert odp is not None and odp.implicit
    assert imr.length == SIZE_MAX and odp.faults == 0
    assert sim.process().mm.pinned_vm == pinned and len(dev.debug.live_mappings(dev)) == live
    # two buffers mapped after the registration, far apart: one rkey reaches both
    x, y = mem.mmap(length=3 * PAGE), mem.mmap(length=PAGE)
    a.mr.write(b"X" * 200, 200)  # type: ignore[attr-defined]
    w = e.IBV_WR_RDMA_WRITE
    assert _rdma(a, w, a.mr.buf, a.mr.lkey, x + PAGE - 100, imr.rkey, 200) == e.IBV_WC_SUCCESS  # type: ignore[attr-defined]
    assert _rdma(a, w, a.mr.buf, a.mr.lkey, y + 8, imr.rkey, 50) == e.IBV_WC_SUCCESS  # type: ignore[attr-defined]
    assert mem.read(x + PAGE - 100, 200) == b"X" * 200 and mem.read(y + 8, 50) == b"X" * 50
    assert odp.faults == 3 and len(imr.umem.dma_segments()) == 3  # two pages of x, one of y
    # the same pages again: no new faults
    assert _rdma(a, w, a.mr.buf, a.mr.lkey, y, imr.rkey, 64) == e.IBV_WC_SUCCESS  # type: ignore[attr-defined]
    assert odp.faults == 3
    # the implicit lkey as a local SGE: a READ lands in the other buffer
    mem.write(x, b"R" * 40, 40)
    b.mr.write(b"r" * 40, 40)  # type: ignore[attr-defined]
    rd = e.IBV_WR_RDMA_READ
    assert _rdma(b, rd, x + 2 * PAGE, imr.lkey, a.mr.buf, a.mr.rkey, 40) == e.IBV_WC_SUCCESS  # type: ignore[attr-defined]
    assert mem.read(x + 2 * PAGE, 40) == b"X" * 40 and odp.faults == 4
    # munmap takes only that range's pages from the device
    mem.munmap(y, PAGE)
    assert odp.invalidations == 1 and len(imr.umem.dma_segments()) == 3
    held = {d for d, _ in imr.umem.dma_segments()}
    imr.close()
    assert not held & {m.dma for m in dev.debug.live_mappings(dev)}
    assert len(dev.debug.live_mappings(dev)) == live and not dev.debug.reports
    for p in (a, b):
        p.ctx.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("machine", ["dev0:cpu"], indirect=True)
@pytest.mark.parametrize("where", ["unmapped", "past_task_size"])
def test_implicit_mr_unmapped_remote_address_is_access_error(machine: str, where: str) -> None:
    import pyverbs.enums as e
    import pyverbs.mem_alloc as mem
    from pyverbs.mr import MR

    a, b = _pair(machine)
    imr = MR(b.pd, PAGE, RW | ODP, implicit=True)  # type: ignore[attr-defined]
    if where == "unmapped":
        target = mem.mmap(length=PAGE)
        mem.munmap(target, PAGE)
    else:
        target = 1 << 63
    w = e.IBV_WR_RDMA_WRITE
    assert _rdma(a, w, a.mr.buf, a.mr.lkey, target, imr.rkey, 16) == e.IBV_WC_REM_ACCESS_ERR  # type: ignore[attr-defined]
    assert imr.umem.odp is not None and imr.umem.odp.faults == 0
    for p in (a, b):
        p.ctx.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("machine", ["dev0:cpu"], indirect=True)
def test_implicit_mr_unmapped_local_address_is_protection_error(machine: str) -> None:
    import pyverbs.enums as e
    import pyverbs.mem_alloc as mem
    from pyverbs.mr import MR

    a, b = _pair(machine)
    imr = MR(a.pd, PAGE, RW | ODP, implicit=True)  # type: ignore[attr-defined]
    gone = mem.mmap(length=PAGE)
    mem.munmap(gone, PAGE)
    w = e.IBV_WR_RDMA_WRITE
    status = _rdma(a, w, gone, imr.lkey, b.mr.buf, b.mr.rkey, 16)  # type: ignore[attr-defined]
    assert status == e.IBV_WC_LOC_PROT_ERR
    for p in (a, b):
        p.ctx.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("machine", ["dev0:cpu"], indirect=True)
def test_implicit_mr_prefetch(machine: str) -> None:
    import pyverbs.enums as e
    import pyverbs.mem_alloc as mem
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.wr import SGE

    ctx = Context(name=machine)
    pd = PD(ctx)
    imr = MR(pd, PAGE, 0x1 | ODP, implicit=True)
    odp = imr.umem.odp
    assert odp is not None
    buf = mem.mmap(length=4 * PAGE)
    flush = e._IBV_ADVISE_MR_FLAG_FLUSH
    pd.advise_mr(e._IBV_ADVISE_MR_ADVICE_PREFETCH_WRITE, flush, [SGE(buf, 3 * PAGE, imr.lkey)])
    assert odp.faults == 3 and len(imr.umem.dma_segments()) == 3
    mem.munmap(buf + 3 * PAGE, PAGE)
    with pytest.raises(PyverbsRDMAError) as ex:
        pd.advise_mr(e._IBV_ADVISE_MR_ADVICE_PREFETCH, flush, [SGE(buf, 4 * PAGE, imr.lkey)])
    assert ex.value.error_code == errno.EFAULT
    nofault = e._IBV_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT
    pd.advise_mr(nofault, flush, [SGE(buf + PAGE, 3 * PAGE, imr.lkey)])
    assert odp.faults == 3
    # an SGE is 32 bits long
    with pytest.raises(PyverbsRDMAError) as ex:
        pd.advise_mr(nofault, flush, [SGE(buf, 1 << 32, imr.lkey)])
    assert ex.value.error_code == errno.EINVAL
    ctx.close()


@pytest.mark.parametrize("machine", ["dev0:cpu"], indirect=True)
def test_implicit_mr_refusals(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError

    ctx = Context(name=machine)
    pd = PD(ctx)
    # without ON_DEMAND the whole address space would have to be pinned
    with pytest.raises(PyverbsRDMAError) as ex:
        MR(pd, PAGE, e.IBV_ACCESS_LOCAL_WRITE, implicit=True)
    assert ex.value.error_code == errno.EFAULT
    imr = MR(pd, PAGE, e.IBV_ACCESS_LOCAL_WRITE | ODP, implicit=True)
    with pytest.raises(PyverbsRDMAError) as ex:
        imr.rereg(e.IBV_REREG_MR_CHANGE_TRANSLATION, addr=imr.buf, length=PAGE)
    assert ex.value.error_code == errno.EOPNOTSUPP
    # the buffer pyverbs allocates still reads and writes through the MR
    imr.write(b"abc", 3, 5)
    assert imr.read(3, 5) == b"abc"
    imr.close()
    imr.close()
    ctx.close()


@pytest.mark.parametrize("machine", ["dev0:swiotlb"], indirect=True)
def test_no_implicit_odp_where_dma_bounces(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError

    ctx = Context(name=machine)
    assert not ctx.query_device_ex().odp_caps.general_caps & e.IBV_ODP_SUPPORT_IMPLICIT
    with pytest.raises(PyverbsRDMAError) as ex:
        MR(PD(ctx), PAGE, e.IBV_ACCESS_LOCAL_WRITE | ODP, implicit=True)
    assert ex.value.error_code == errno.EOPNOTSUPP
    ctx.close()
