"""``MREx`` (``ibv_reg_mr_ex``): ordinary memory with and without an iova,
a provider buffer (``buf=``, ``IBV_REG_MR_MASK_BUF``) on every device kind,
data moved into both by RDMA WRITE; the refusals (DMA handles, dma-buf
fds, bad ranges)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from tests.pyverbs.conftest import KINDS

PAGE = 4096
SPECS = [pytest.param(f"dev0:{k}", id=k) for k in KINDS]


def _rdma_write(src: Any, dst_rkey: int, dst_addr: int, data: bytes) -> None:
    """RDMA WRITE ``data`` from ``src``'s MR to ``dst_addr`` / ``dst_rkey``."""
    import pyverbs.enums as e
    from pyverbs.wr import SGE, SendWR

    src.mr.write(data, len(data))
    wr = SendWR(
        7, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[SGE(src.mr.buf, len(data), src.mr.lkey)]
    )
    wr.set_wr_rdma(dst_rkey, dst_addr)
    src.qp.post_send(wr)
    [wc] = src.poll()
    assert (wc.wr_id, wc.status) == (7, e.IBV_WC_SUCCESS)


@pytest.mark.parametrize("machine", SPECS, indirect=True)
def test_mrex_of_plain_memory_with_and_without_iova(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.mr import MREx
    from pyverbs.pyverbs_error import PyverbsRDMAError

    from tests.pyverbs.helpers import ALL_ACCESS, connect, player

    a, b = player(machine), player(machine)
    connect(a, b)
    own = MREx(b.pd, 2 * PAGE, ALL_ACCESS)  # no address: the MR allocates
    own.write(b"x" * 10, 10)
    assert own.read(10, 0) == b"x" * 10 and own.length == 2 * PAGE
    _rdma_write(a, own.rkey, own.buf + PAGE, b"into MREx")
    assert own.read(9, PAGE) == b"into MREx"
    # IBV_REG_MR_MASK_ADDR | _IOVA: the caller's memory, addressed by iova
    iova = 0x7000_0000
    at = MREx(b.pd, PAGE, ALL_ACCESS, address=own.buf, iova=iova)
    assert at.buf == own.buf
    _rdma_write(a, at.rkey, iova + 100, b"by iova")
    # read through the MR the device wrote by (on swiotlb each MR has its
    # own bounce slots for the pages)
    assert at.read(7, 100) == b"by iova"
    # the iova space ends where the MR does: a write past it fails remotely
    _bad = b"z" * 8
    a.mr.write(_bad, 8)
    from pyverbs.wr import SGE, SendWR

    wr = SendWR(8, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[SGE(a.mr.buf, 8, a.mr.lkey)])
    wr.set_wr_rdma(at.rkey, iova + PAGE - 4)
    a.qp.post_send(wr)
    [wc] = a.poll()
    assert wc.status == e.IBV_WC_REM_ACCESS_ERR
    for length in (0, -1):
        with pytest.raises(PyverbsRDMAError) as ex:
            MREx(b.pd, length, ALL_ACCESS)
        assert ex.value.error_code == errno.EINVAL
    with pytest.raises(PyverbsRDMAError) as ex:
        MREx(b.pd, PAGE, 1 << 12)  # not an ibv_access_flags bit
    assert ex.value.error_code == errno.EINVAL
    at.close()
    own.close()
    own.close()
    assert own.closed
    for p in (a, b):
        p.ctx.close()


def _cc_pd(ctx: Any) -> Any:
    from pyverbs.libibverbs_enums import _IBV_PARENT_DOMAIN_INIT_ATTR_ALLOW_CC_UNPROTECTED_ALLOC
    from pyverbs.pd import PD, ParentDomain, ParentDomainInitAttr

    attr = ParentDomainInitAttr(
        pd=PD(ctx), comp_mask=_IBV_PARENT_DOMAIN_INIT_ATTR_ALLOW_CC_UNPROTECTED_ALLOC
    )
    return ParentDomain(ctx, attr=attr)


@pytest.mark.parametrize("machine", [*SPECS, pytest.param("dev0:coco", id="coco")], indirect=True)
def test_mrex_of_a_buf(machine: str) -> None:
    """``buf=``: a subrange of a ``Buf`` of the PD, registered as
    ``ibv_reg_buf_mr`` registers it (shared-heap import on a CC device);
    an RDMA WRITE lands in the buffer."""
    import pyverbs.enums as e
    from pyverbs.mr import Buf, BufMR, MREx
    from pyverbs.pyverbs_error import PyverbsRDMAError

    from pyverbs import _softrdma as sim
    from tests.pyverbs.helpers import ALL_ACCESS, connect, player

    coco = sim.process().kind(machine) == "coco"
    a = player(machine, access=ALL_ACCESS) if not coco else None
    ctx_b = a.ctx if a is not None else None
    del ctx_b
    from pyverbs.device import Context

    ctx = Context(name=machine)
    pd = _cc_pd(ctx) if coco else __import__("pyverbs.pd", fromlist=["PD"]).PD(ctx)
    buf = Buf(pd, 3 * PAGE)
    mr = MREx(pd, length=PAGE, access=ALL_ACCESS, buf=buf, address=buf.addr + PAGE)
    assert mr.buf == buf.addr + PAGE and mr.length == PAGE
    twin = BufMR(pd, buf, PAGE, ALL_ACCESS, offset=PAGE)
    assert twin.lkey != mr.lkey
    mr.write(b"through MREx", 12)
    assert mr.read(12, 0) == b"through MREx"
    # EINVAL: no address, past the buffer, another PD, a freed buffer
    bad: list[dict[str, Any]] = [
        {"length": PAGE, "buf": buf},
        {"length": 2 * PAGE, "buf": buf, "address": buf.addr + 2 * PAGE},
        {"length": PAGE, "buf": buf, "address": buf.addr - PAGE},
    ]
    for kw in bad:
        with pytest.raises(PyverbsRDMAError) as ex:
            MREx(pd, access=ALL_ACCESS, **kw)
        assert ex.value.error_code == errno.EINVAL
    other = _cc_pd(ctx) if coco else __import__("pyverbs.pd", fromlist=["PD"]).PD(ctx)
    with pytest.raises(PyverbsRDMAError) as ex:
        MREx(other, length=PAGE, access=ALL_ACCESS, buf=buf, address=buf.addr)
    assert ex.value.error_code == errno.EINVAL
    if coco:
        # a dma-buf backed buffer: libibverbs derives the iova itself
        with pytest.raises(PyverbsRDMAError) as ex:
            MREx(pd, length=PAGE, access=ALL_ACCESS, buf=buf, address=buf.addr, iova=0x1000)
        assert ex.value.error_code == errno.EINVAL
        assert sim.process().mm.pinned_vm == 0  # imported, never pinned
    else:
        # traffic from another context into the buffer
        assert a is not None
        from pyverbs.cq import CQ
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

        from tests.pyverbs.helpers import Player

        cq = CQ(ctx, 16)
        attr = QPAttr(port_num=1)
        attr.qp_access_flags = ALL_ACCESS
        init = QPInitAttr(
            qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=QPCap(max_send_wr=4, max_recv_wr=4)
        )
        b = Player(ctx, pd, cq, mr, QP(pd, init, attr))
        connect(a, b)
        _rdma_write(a, mr.rkey, mr.buf + 20, b"remote")
        assert mr.read(6, 20) == b"remote"
        a.ctx.close()
    buf.close()  # ibv_free_buf closes its MRs first
    assert mr.closed and twin.closed
    ctx.close()


@pytest.mark.parametrize("machine", ["hca0:iommu"], indirect=True)
def test_mrex_buf_pages_are_iova_mappings_until_close(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import Buf, MREx
    from pyverbs.pd import PD

    from softrdma.dma.types import MapType

    ctx = Context(name=machine)
    dev = ctx.device.dma_device
    debug = dev.debug
    assert debug is not None and dev.iommu_domain is not None
    pd = PD(ctx)
    buf = Buf(pd, 4 * PAGE)
    before = len(debug.live_mappings(dev))
    mr = MREx(pd, 2 * PAGE, e.IBV_ACCESS_LOCAL_WRITE, buf=buf, address=buf.addr + PAGE)
    assert [m for m in debug.live_mappings(dev) if m.type == MapType.SG]
    segments = mr.umem.dma_segments()
    assert sum(n for _, n in segments) == 2 * PAGE
    for dma, _ in segments:
        assert dev.iommu_domain.iova_to_phys(dma) is not None
    mr.close()
    assert len(debug.live_mappings(dev)) == before
    assert all(dev.iommu_domain.iova_to_phys(d) is None for d, _ in segments)
    assert not debug.reports
    ctx.close()


@pytest.mark.parametrize("machine", SPECS[:1], indirect=True)
def test_dma_handles_and_dmabuf_fds_are_refused(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.libibverbs_enums import ibv_dmah_init_attr_mask, ibv_tph_mem_type
    from pyverbs.mr import DMAHandle, DmaHandleInitAttr, MREx
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError

    ctx = Context(name=machine)
    pd = PD(ctx)
    attr = DmaHandleInitAttr(
        cpu_id=0,
        tph_mem_type=ibv_tph_mem_type.IBV_TPH_MEM_TYPE_PM,
        comp_mask=ibv_dmah_init_attr_mask.IBV_DMAH_INIT_ATTR_MASK_TPH_MEM_TYPE,
    )
    with pytest.raises(PyverbsRDMAError) as ex:
        DMAHandle(ctx, attr)
    assert ex.value.error_code == errno.EOPNOTSUPP
    with pytest.raises(PyverbsUserError):
        MREx(pd, PAGE, e.IBV_ACCESS_LOCAL_WRITE, dmah=object())
    with pytest.raises(PyverbsRDMAError) as ex:
        MREx(pd, PAGE, e.IBV_ACCESS_LOCAL_WRITE, fd=3, fd_offset=0)
    assert ex.value.error_code == errno.EOPNOTSUPP
    with pytest.raises(PyverbsUserError):
        MREx(pd, PAGE, e.IBV_ACCESS_LOCAL_WRITE, color="red")
    ctx.close()
