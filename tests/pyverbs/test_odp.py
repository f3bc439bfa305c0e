"""On-demand paging (``IBV_ACCESS_ON_DEMAND``): an ODP MR pins nothing;
the device faults a page in at its first access, loses it when the
process unmaps it (an access then is a remote access error), finds the
new page after a remap, and ``advise_mr`` maps ahead."""

from __future__ import annotations

import errno

import pytest

PAGE = 4096


def _write(a: object, b_addr: int, rkey: int, n: int, wr_id: int) -> None:
    import pyverbs.enums as e
    from pyverbs.wr import SGE, SendWR

    wr = SendWR(wr_id, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[SGE(a.mr.buf, n, a.mr.lkey)])  # type: ignore[attr-defined]
    wr.set_wr_rdma(rkey, b_addr)
    a.qp.post_send(wr)  # type: ignore[attr-defined]


@pytest.mark.parametrize("machine", ["dev0:cpu", "dev0:iommu"], indirect=True)
def test_odp_faults_in_invalidates_and_refaults(machine: str) -> None:
    import pyverbs.enums as e
    import pyverbs.mem_alloc as mem
    from pyverbs.mr import MR

    from pyverbs import _softrdma as sim
    from tests.pyverbs import helpers as h

    a, b = h.player(machine), h.player(machine)
    h.connect(a, b)
    proc = sim.process()
    dev = b.ctx.device.dma_device
    assert dev.debug is not None
    pinned, live = proc.mm.pinned_vm, len(dev.debug.live_mappings(dev))
    buf = mem.mmap(length=4 * PAGE)
    access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_ON_DEMAND
    odp_mr = MR(b.pd, 4 * PAGE, access, address=buf)
    odp = odp_mr.umem.odp
    assert odp is not None
    # nothing pinned, nothing mapped for the device at registration
    assert proc.mm.pinned_vm == pinned and len(dev.debug.live_mappings(dev)) == live
    assert odp.faults == 0 and odp_mr.umem.dma_segments() == []
    a.mr.write(b"A" * 100, 100)
    _write(a, buf + PAGE + 10, odp_mr.rkey, 100, 1)
    assert a.poll()[0].status == e.IBV_WC_SUCCESS
    assert odp.faults == 1 and len(odp_mr.umem.dma_segments()) == 1  # just that page
    assert odp_mr.read(100, PAGE + 10) == b"A" * 100
    # the process unmaps the page: the device loses it, the write fails
    mem.munmap(buf + PAGE, PAGE)
    assert odp.invalidations == 1 and odp_mr.umem.dma_segments() == []
    assert len(dev.debug.live_mappings(dev)) == live
    _write(a, buf + PAGE + 10, odp_mr.rkey, 100, 2)
    assert a.poll()[0].status == e.IBV_WC_REM_ACCESS_ERR
    # a new page there: the next access faults it in (a new connection:
    # the access error broke the old one)
    assert mem.mmap(addr=buf + PAGE, length=PAGE) == buf + PAGE
    a2, b2 = h.player(machine), h.player(machine)
    b2.qp.close()
    b2.pd, b2.ctx = b.pd, b.ctx
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

    attr = QPAttr(port_num=1)
    attr.qp_access_flags = h.ALL_ACCESS
    init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=b.cq, rcq=b.cq, cap=QPCap(16, 16))
    b2.qp, b2.cq = QP(b.pd, init, attr), b.cq
    h.connect(a2, b2)
    a2.mr.write(b"B" * 50, 50)
    _write(a2, buf + PAGE, odp_mr.rkey, 50, 3)
    assert a2.poll()[0].status == e.IBV_WC_SUCCESS
    assert odp.faults == 2 and mem.read(buf + PAGE, 50) == b"B" * 50
    held = {d for d, _ in odp_mr.umem.dma_segments()}
    assert len(held) == 1
    odp_mr.close()
    assert not held & {m.dma for m in dev.debug.live_mappings(dev)}
    assert not dev.debug.reports
    for p in (a, b, a2, b2):
        p.ctx.close()


@pytest.mark.parametrize("machine", ["dev0:cpu"], indirect=True)
def test_advise_mr_prefetch(machine: str) -> None:
    import pyverbs.enums as e
    import pyverbs.mem_alloc as mem
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.wr import SGE

    ctx = Context(name=machine)
    pd = PD(ctx)
    buf = mem.mmap(length=3 * PAGE)
    mr = MR(pd, 3 * PAGE, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_ON_DEMAND, address=buf)
    odp = mr.umem.odp
    assert odp is not None
    flush = e._IBV_ADVISE_MR_FLAG_FLUSH
    pd.advise_mr(e._IBV_ADVISE_MR_ADVICE_PREFETCH_WRITE, flush, [SGE(buf, 2 * PAGE, mr.lkey)])
    assert odp.faults == 2 and len(mr.umem.dma_segments()) == 2
    mem.munmap(buf + 2 * PAGE, PAGE)
    # a faulting synchronous prefetch of an unmapped page fails...
    with pytest.raises(PyverbsRDMAError) as ex:
        pd.advise_mr(e._IBV_ADVISE_MR_ADVICE_PREFETCH, flush, [SGE(buf, 3 * PAGE, mr.lkey)])
    assert ex.value.error_code == errno.EFAULT
    # ...NO_FAULT maps only what is there; an asynchronous one reports nothing
    nofault = e._IBV_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT
    pd.advise_mr(nofault, flush, [SGE(buf, 3 * PAGE, mr.lkey)])
    pd.advise_mr(e._IBV_ADVISE_MR_ADVICE_PREFETCH, 0, [SGE(buf, 3 * PAGE, mr.lkey)])
    assert len(mr.umem.dma_segments()) == 2
    plain = MR(pd, PAGE, e.IBV_ACCESS_LOCAL_WRITE)
    for advice, flags, sges, err in (
        (nofault, flush, [SGE(plain.buf, PAGE, plain.lkey)], errno.EINVAL),  # not ODP
        (nofault, flush, [SGE(buf, 4 * PAGE, mr.lkey)], errno.EINVAL),  # past the MR
        (nofault, flush, [SGE(buf, PAGE, mr.lkey + 1)], errno.EINVAL),  # no such key
        (nofault, flush, [], errno.EINVAL),
        (7, flush, [SGE(buf, PAGE, mr.lkey)], errno.EINVAL),
        (nofault, 2, [SGE(buf, PAGE, mr.lkey)], errno.EOPNOTSUPP),
    ):
        with pytest.raises(PyverbsRDMAError) as ex:
            pd.advise_mr(advice, flags, sges)
        assert ex.value.error_code == err
    ctx.close()


@pytest.mark.parametrize("machine", ["dev0:swiotlb", "dev0:coco"], indirect=True)
def test_no_odp_where_dma_bounces(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError

    ctx = Context(name=machine)
    assert ctx.query_device_ex().odp_caps.general_caps == 0
    with pytest.raises(PyverbsRDMAError) as ex:
        MR(PD(ctx), PAGE, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_ON_DEMAND)
    assert ex.value.error_code == errno.EOPNOTSUPP
    ctx.close()
