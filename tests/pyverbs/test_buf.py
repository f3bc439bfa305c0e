"""Provider-aware buffers (``ibv_alloc_buf``, ``ibv_reg_buf_mr``) and the
device of a confidential-computing guest (``IBV_DEVICE_CC_DMA_BOUNCE``):
plain registrations refused, shared-heap buffers registered by import and
reached by the device without bouncing."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from tests.pyverbs.conftest import KINDS

PAGE = 4096
ALL_KINDS = [pytest.param(f"dev0:{k}", id=k) for k in (*KINDS, "coco")]


def _cc_pd(ctx: Any) -> Any:
    from pyverbs.libibverbs_enums import _IBV_PARENT_DOMAIN_INIT_ATTR_ALLOW_CC_UNPROTECTED_ALLOC
    from pyverbs.pd import PD, ParentDomain, ParentDomainInitAttr

    base = PD(ctx)
    attr = ParentDomainInitAttr(
        pd=base, comp_mask=_IBV_PARENT_DOMAIN_INIT_ATTR_ALLOW_CC_UNPROTECTED_ALLOC
    )
    return ParentDomain(ctx, attr=attr)


@pytest.mark.parametrize("machine", ALL_KINDS, indirect=True)
def test_buf_api_on_every_device(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.libibverbs_enums import _IBV_DEVICE_CC_DMA_BOUNCE
    from pyverbs.mr import MR, Buf, BufMR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError

    from pyverbs import _softrdma as sim

    ctx = Context(name=machine)
    coco = sim.process().kind(machine) == "coco"
    flags = ctx.query_device_ex().device_cap_flags_ex
    assert bool(flags & _IBV_DEVICE_CC_DMA_BOUNCE) == coco
    plain = PD(ctx)
    if coco:
        # pinned private memory cannot be bounce-buffered: refused
        with pytest.raises(PyverbsRDMAError) as ex:
            MR(plain, PAGE, e.IBV_ACCESS_LOCAL_WRITE)
        assert ex.value.error_code == errno.EOPNOTSUPP
        with pytest.raises(PyverbsRDMAError) as ex:
            BufMR(plain, Buf(plain, PAGE), PAGE, e.IBV_ACCESS_LOCAL_WRITE)
        assert ex.value.error_code == errno.EOPNOTSUPP
    pd = _cc_pd(ctx)
    buf = Buf(pd, 2 * PAGE)
    assert buf.addr == buf.buf and buf.length == 2 * PAGE
    mr1 = BufMR(pd, buf, PAGE, e.IBV_ACCESS_LOCAL_WRITE)
    mr2 = BufMR(pd, buf, PAGE, e.IBV_ACCESS_LOCAL_WRITE, offset=PAGE)
    assert mr1.lkey != mr2.lkey
    assert (mr1.buf, mr2.buf) == (buf.addr, buf.addr + PAGE)
    mr1.write("a" * PAGE, PAGE)
    mr2.write("b" * PAGE, PAGE)
    assert mr1.read(PAGE, 0) == b"a" * PAGE and mr2.read(PAGE, 0) == b"b" * PAGE
    # ibv_reg_buf_mr: the allocating PD only, a range inside the buffer
    other = _cc_pd(ctx)
    for args in ((other, buf, PAGE, 0), (pd, buf, 3 * PAGE, 0), (pd, buf, PAGE, 2 * PAGE)):
        with pytest.raises(PyverbsRDMAError) as ex:
            BufMR(args[0], args[1], args[2], e.IBV_ACCESS_LOCAL_WRITE, offset=args[3])
        assert ex.value.error_code == errno.EINVAL
    with pytest.raises(PyverbsRDMAError) as ex:
        Buf(pd, 0)
    assert ex.value.error_code == errno.EINVAL
    # ibv_free_buf closes the buffer's MRs first; closing twice is harmless
    buf.close()
    assert mr1.closed and mr2.closed
    buf.close()
    mr1.close()
    ctx.close()


@pytest.mark.parametrize("machine", ["hca0:coco"], indirect=True)
def test_shared_heap_buffers_are_imported_not_pinned_or_bounced(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import Buf, BufMR

    from pyverbs import _softrdma as sim
    from softrdma.dma.types import MapType

    ctx = Context(name=machine)
    dev = ctx.device.dma_device
    proc = sim.process()
    swiotlb = proc.platform.swiotlb
    assert swiotlb is not None and dev.debug is not None
    before = len(dev.debug.live_mappings(dev))
    pd = _cc_pd(ctx)
    buf = Buf(pd, 3 * PAGE)
    coherent = [m for m in dev.debug.live_mappings(dev) if m.type == MapType.COHERENT]
    assert len(coherent) == 1 and coherent[0].size == 3 * PAGE
    mr = BufMR(pd, buf, 2 * PAGE, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ, PAGE)
    assert proc.mm.pinned_vm == 0  # nothing pinned: a dma-buf import
    [(dma, length)] = mr.umem.dma_segments()
    assert dma == coherent[0].dma + PAGE and length == 2 * PAGE
    assert not swiotlb.is_swiotlb_buffer(dma)  # the device reaches it directly
    # the device's view is the process's view, with no sync in between
    mr.write(b"shared", 6)
    assert bytes(dev.ops.read(dev, dma, 6)) == b"shared"
    # a shared-heap mapping cannot be pinned (VM_PFNMAP)
    from pyverbs.pyverbs_error import PyverbsRDMAError

    with pytest.raises(PyverbsRDMAError) as ex:
        from pyverbs.mr import MR

        MR(pd, PAGE, e.IBV_ACCESS_LOCAL_WRITE, address=buf.addr)
    assert ex.value.error_code == errno.EOPNOTSUPP
    with pytest.raises(PyverbsRDMAError) as ex:
        mr.rereg(e.IBV_REREG_MR_CHANGE_TRANSLATION, addr=buf.addr, length=PAGE)
    assert ex.value.error_code == errno.EOPNOTSUPP
    buf.close()
    assert mr.closed and proc.mm.find_vma(buf.addr) is None
    assert len(dev.debug.live_mappings(dev)) == before
    assert not dev.debug.reports
    ctx.close()


@pytest.mark.parametrize("machine", ["hca0:coco"], indirect=True)
def test_rc_traffic_on_a_coco_device_through_shared_memory(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.addr import AHAttr, GlobalRoute
    from pyverbs.cq import CQEX, CqInitAttrEx, PollCqAttr
    from pyverbs.device import Context
    from pyverbs.mr import Buf, BufMR
    from pyverbs.pd import PD_RES_TYPE_CQ
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import SGE, RecvWR, SendWR

    from pyverbs import _softrdma as sim

    swiotlb = sim.process().platform.swiotlb
    assert swiotlb is not None
    sides = []
    for _ in range(2):
        ctx = Context(name=machine)
        pd = _cc_pd(ctx)
        cia = CqInitAttrEx(
            cqe=16,
            wc_flags=e.IBV_WC_STANDARD_FLAGS,
            parent_domain=pd,
            comp_mask=e.IBV_CQ_INIT_ATTR_MASK_PD,
        )
        cq = CQEX(ctx, cia)
        buf = Buf(pd, 2 * PAGE)
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        mr = BufMR(pd, buf, 2 * PAGE, access)
        qp = QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=QPCap(8, 8)))
        sides.append((ctx, pd, cq, buf, mr, qp))
    # every queue ring came from the shared heap, not pinned memory
    assert sim.process().mm.pinned_vm == 0
    assert all(r.shared is not None for r in sides[0][1]._rings)
    assert {r.resource_type for r in sides[0][1]._rings} >= {PD_RES_TYPE_CQ}
    for (ctx, _, _, _, _, qp), (_, _, _, _, _, peer) in (
        (sides[0], sides[1]),
        (sides[1], sides[0]),
    ):
        attr = QPAttr(port_num=1)
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        attr.path_mtu = e.IBV_MTU_1024
        attr.dest_qp_num = peer.qp_num
        attr.ah_attr = AHAttr(
            port_num=1, is_global=1, gr=GlobalRoute(dgid=ctx.query_gid(1, 0), sgid_index=0)
        )
        qp.to_rts(attr)
    a, b = sides
    bounced = swiotlb.bounced_bytes
    b[5].post_recv(RecvWR(1, 1, [SGE(b[4].buf, 5000, b[4].lkey)]))
    a[4].write(bytes(range(256)) * 20, 5000)
    a[5].post_send(SendWR(2, opcode=e.IBV_WR_SEND, num_sge=1, sg=[SGE(a[4].buf, 5000, a[4].lkey)]))
    write = SendWR(3, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[SGE(a[4].buf, 100, a[4].lkey)])
    write.set_wr_rdma(b[4].rkey, b[4].buf + 6000)
    a[5].post_send(write)
    got = []
    for cq in (b[2], a[2], a[2]):
        for _ in range(50):
            if cq.start_poll(PollCqAttr()) == 0:
                break
        else:
            raise AssertionError("no completion")
        got.append((cq.wr_id, cq.status))
        cq.end_poll()
    assert sorted(got) == [(1, e.IBV_WC_SUCCESS), (2, e.IBV_WC_SUCCESS), (3, e.IBV_WC_SUCCESS)]
    assert b[4].read(5000, 0) == (bytes(range(256)) * 20)[:5000]
    assert b[4].read(100, 6000) == (bytes(range(256)) * 20)[:100]
    assert swiotlb.bounced_bytes == bounced  # nothing went through bounce slots
    for side in sides:
        side[0].close()


def test_pfnmap_mappings_are_not_pinned_or_freed_by_munmap() -> None:
    from softrdma.memory.host import Host, MiB
    from softrdma.memory.mm import MmStruct, VmError

    host = Host(16 * MiB)
    mm = MmStruct(host)
    first = host.alloc_contig_pages(3, owner="exporter")
    pages = [host.pfn_to_page(first.pfn + i) for i in range(3)]
    addr = mm.mmap_pages(pages)
    assert mm.total_vm == 3 and mm.find_vma(addr + PAGE) is not None
    mm.write(addr + PAGE - 2, b"abcd")  # across two frames
    assert mm.read(addr + PAGE - 2, 4) == b"abcd"
    assert bytes(host.cpu_read_phys(pages[1].phys, 2)) == b"cd"
    with pytest.raises(VmError) as ex:
        mm.pin_user_pages(addr, 1)
    assert ex.value.errno == errno.EFAULT and mm.pinned_vm == 0
    free = host.free_pages_count()
    mm.munmap(addr + PAGE, PAGE)  # splits the mapping, keeps pfnmap on both sides
    assert all(v.pfnmap for v in (mm.find_vma(addr), mm.find_vma(addr + 2 * PAGE)) if v)
    mm.munmap(addr, 3 * PAGE)
    assert mm.total_vm == 0 and host.free_pages_count() == free  # the exporter's frames stay
    host.free_contig_pages(first, 3)
    with pytest.raises(VmError):
        mm.mmap_pages([])
