"""Parent domains (``ibv_alloc_parent_domain``): objects on a parent domain
belong to its PD, and QP / extended-CQ rings come from the user's
allocators, pinned and DMA-mapped while the queue lives."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from tests.pyverbs.conftest import KINDS

DEVICES = [pytest.param(f"dev0:{k}", id=k) for k in KINDS]


class Allocator:
    """Python allocators that record every call (``mem_alloc`` memory)."""

    def __init__(self, answer: int | None = None) -> None:
        self.allocs: list[tuple[int, int, int, int]] = []
        self.frees: list[tuple[int, int]] = []
        self.answer = answer

    def alloc(self, pd: Any, context: Any, size: int, alignment: int, res_type: int) -> int:
        import pyverbs.mem_alloc as mem

        ptr = mem.posix_memalign(size, alignment) if self.answer is None else self.answer
        self.allocs.append((ptr, size, alignment, res_type))
        return ptr

    def free(self, pd: Any, context: Any, ptr: int, res_type: int) -> None:
        import pyverbs.mem_alloc as mem

        self.frees.append((ptr, res_type))
        mem.free(ptr)


def _no_free(pd: Any, context: Any, ptr: int, res_type: int) -> None:
    """The free of an allocator whose answers were never allocated."""


def _not_an_address(*args: Any) -> Any:
    return "nope"


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_rc_traffic_with_queues_from_the_allocator(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.cq import CQEX, CqInitAttrEx, PollCqAttr
    from pyverbs.pd import (
        PD_RES_TYPE_CQ,
        PD_RES_TYPE_QP,
        ParentDomain,
        ParentDomainContext,
        ParentDomainInitAttr,
    )
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import SGE, RecvWR, SendWR

    from pyverbs import _softrdma as sim
    from tests.pyverbs import helpers as h

    a, b = h.player(machine), h.player(machine)
    mm = sim.process().mm
    alloc = Allocator()
    pctx = ParentDomainContext(a.pd, alloc.alloc, alloc.free, None)
    attr = ParentDomainInitAttr(pd=a.pd, pd_context=pctx)
    assert attr.comp_mask == (
        e.IBV_PARENT_DOMAIN_INIT_ATTR_PD_CONTEXT | e.IBV_PARENT_DOMAIN_INIT_ATTR_ALLOCATORS
    )
    pdom = ParentDomain(a.ctx, attr=attr)
    cia = CqInitAttrEx(
        cqe=100,
        wc_flags=e.IBV_WC_STANDARD_FLAGS,
        parent_domain=pdom,
        comp_mask=e.IBV_CQ_INIT_ATTR_MASK_PD,
    )
    cq = CQEX(a.ctx, cia)
    assert [x[3] for x in alloc.allocs] == [PD_RES_TYPE_CQ]
    a.qp.close()
    init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=QPCap(16, 16, 2, 2))
    qattr = QPAttr(port_num=1)
    qattr.qp_access_flags = h.ALL_ACCESS
    a.qp = QP(pdom, init, qattr)
    ptr, size, align, res = alloc.allocs[-1]
    assert res == PD_RES_TYPE_QP and align == 4096 and ptr % align == 0 and size >= 16 * 64
    assert mm.pin_count(ptr) == 1  # the ring is pinned for the device
    h.connect(a, b)
    # an MR on the parent domain belongs to the PD under it
    b.qp.post_recv(RecvWR(1, 1, [SGE(b.mr.buf, 64, b.mr.lkey)]))
    a.mr.write(b"x" * 64, 64)
    a.qp.post_send(SendWR(7, opcode=e.IBV_WR_SEND, num_sge=1, sg=[SGE(a.mr.buf, 64, a.mr.lkey)]))
    assert b.poll()[0].status == e.IBV_WC_SUCCESS
    assert b.mr.read(64, 0) == b"x" * 64
    assert cq.start_poll(PollCqAttr()) == 0
    assert cq.status == e.IBV_WC_SUCCESS and cq.wr_id == 7
    cq.end_poll()
    # closing the PD under the parent domain closes the parent domain, its
    # QP and CQ first; every ring goes back to free() unpinned
    a.pd.close()
    assert pdom.closed and a.qp.closed and cq.closed
    assert sorted(f[0] for f in alloc.frees) == sorted(x[0] for x in alloc.allocs)
    assert all(mm.find_vma(x[0]) is None for x in alloc.allocs)
    a.ctx.close()
    b.ctx.close()


@pytest.mark.parametrize("machine", DEVICES[:2], indirect=True)
def test_default_allocation_when_the_allocator_declines(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.cq import CQ
    from pyverbs.device import Context
    from pyverbs.pd import PD, ParentDomain, ParentDomainContext, ParentDomainInitAttr
    from pyverbs.qp import QP, QPCap, QPInitAttr

    from pyverbs import _softrdma as sim

    ctx = Context(name=machine)
    pd = PD(ctx)
    alloc = Allocator(answer=e._IBV_ALLOCATOR_USE_DEFAULT)
    pdom = ParentDomain(
        ctx, ParentDomainInitAttr(pd, ParentDomainContext(pd, alloc.alloc, alloc.free))
    )
    cq = CQ(ctx, 16)
    mm = sim.process().mm
    mapped, pinned = mm.total_vm, mm.pinned_vm
    qp = QP(pdom, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=QPCap(4, 4)))
    assert len(alloc.allocs) == 1
    assert mm.total_vm > mapped and mm.pinned_vm > pinned  # a default ring, pinned
    qp.close()
    assert alloc.frees == []  # the provider's own allocation, freed by it
    assert (mm.total_vm, mm.pinned_vm) == (mapped, pinned)
    ctx.close()
    assert pdom.closed


@pytest.mark.parametrize("machine", DEVICES[:1], indirect=True)
def test_allocator_failures_fail_the_creation(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.cq import CQ, CQEX, CqInitAttrEx
    from pyverbs.device import Context
    from pyverbs.pd import PD, ParentDomain, ParentDomainContext, ParentDomainInitAttr
    from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
    from pyverbs.qp import QP, QPCap, QPInitAttr

    ctx = Context(name=machine)
    pd = PD(ctx)
    cq = CQ(ctx, 16)
    init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=QPCap(4, 4))
    cases = [(0, errno.ENOMEM), (0x1000_0010, errno.EINVAL), (0x7FFF_0000_0000, errno.EFAULT)]
    for answer, err in cases:
        alloc = Allocator(answer=answer)
        pdom = ParentDomain(
            ctx, ParentDomainInitAttr(pd, ParentDomainContext(pd, alloc.alloc, _no_free))
        )
        with pytest.raises(PyverbsRDMAError) as ex:
            QP(pdom, init)
        assert ex.value.error_code == err
        pdom.close()
    # an extended CQ's PD must be a parent domain of the same device
    cia = CqInitAttrEx(cqe=8, parent_domain=pd, comp_mask=e.IBV_CQ_INIT_ATTR_MASK_PD)
    with pytest.raises(PyverbsRDMAError) as ex:
        CQEX(ctx, cia)
    assert ex.value.error_code == errno.EINVAL
    # the allocator must answer an address
    bad = ParentDomainContext(pd, _not_an_address, _no_free)
    with pytest.raises(PyverbsUserError):
        QP(ParentDomain(ctx, ParentDomainInitAttr(pd, bad)), init)
    with pytest.raises(PyverbsRDMAError) as ex:
        ParentDomain(ctx, ParentDomainInitAttr(pd, ParentDomainContext(pd, None, None)))
    assert ex.value.error_code == errno.EINVAL
    ctx.close()


@pytest.mark.parametrize("machine", DEVICES[:2], indirect=True)
def test_srq_ring_from_the_allocator(machine: str) -> None:
    from pyverbs.device import Context
    from pyverbs.pd import (
        PD,
        PD_RES_TYPE_SRQ,
        ParentDomain,
        ParentDomainContext,
        ParentDomainInitAttr,
    )
    from pyverbs.srq import SRQ, SrqAttr, SrqInitAttr

    from pyverbs import _softrdma as sim

    ctx = Context(name=machine)
    pd = PD(ctx)
    alloc = Allocator()
    pdom = ParentDomain(
        ctx, ParentDomainInitAttr(pd, ParentDomainContext(pd, alloc.alloc, alloc.free))
    )
    srq = SRQ(pdom, SrqInitAttr(SrqAttr(max_wr=64, max_sge=4)))
    [(ptr, size, _, res)] = alloc.allocs
    assert res == PD_RES_TYPE_SRQ and size >= 64 * 4 * 16
    assert sim.process().mm.pin_count(ptr) == 1
    srq.close()
    assert alloc.frees == [(ptr, PD_RES_TYPE_SRQ)]
    ctx.close()
