"""The memory model behind pyverbs: user virtual addresses of a simulated
process, registration as pin + DMA map (``ib_umem_get``) that the DMA-API
debug checker tracks until deregistration, IOVAs on an IOMMU device, and
bounce slots on a swiotlb device."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.dma.types import MapType
from softrdma.memory.host import Host, MiB
from softrdma.memory.layout import PAGE_SIZE
from softrdma.memory.mm import MMAP_BASE, TASK_SIZE, MmStruct, UserAddressError, VmError


def test_mmap_gives_page_granular_user_addresses() -> None:
    host = Host(16 * MiB)
    mm = MmStruct(host)
    free = host.free_pages_count()
    a = mm.mmap(100)
    b = mm.mmap(3 * PAGE_SIZE + 1)
    assert MMAP_BASE <= a < b < TASK_SIZE and a % PAGE_SIZE == 0
    assert b - a == PAGE_SIZE and mm.total_vm == 5
    assert host.free_pages_count() == free - 5
    mm.write(b + PAGE_SIZE - 2, b"across")  # crosses a page boundary
    assert mm.read(b + PAGE_SIZE - 2, 6) == b"across"
    assert mm.read(a, 4) == bytes(4)  # anonymous memory starts zeroed
    with pytest.raises(UserAddressError):
        mm.read(b + 4 * PAGE_SIZE, 1)  # past the last mapping
    with pytest.raises(UserAddressError):
        mm.read(a - 1, 2)  # below the first
    mm.munmap(b + PAGE_SIZE, PAGE_SIZE)  # punch a hole in the middle of b
    with pytest.raises(UserAddressError):
        mm.write(b + PAGE_SIZE - 1, b"xx")
    assert mm.read(b + 2 * PAGE_SIZE, 1) == b"\0"
    mm.munmap(a, PAGE_SIZE)
    mm.munmap(b, 4 * PAGE_SIZE)
    assert mm.total_vm == 0 and host.free_pages_count() == free


def test_mmap_rejects_bad_requests() -> None:
    mm = MmStruct(Host(16 * MiB))
    for length, addr, err in ((0, None, errno.EINVAL), (100, 0x1001, errno.EINVAL)):
        with pytest.raises(VmError) as ex:
            mm.mmap(length, addr=addr)
        assert ex.value.errno == err
    a = mm.mmap(PAGE_SIZE)
    with pytest.raises(VmError) as ex:
        mm.mmap(PAGE_SIZE, addr=a)
    assert ex.value.errno == errno.EEXIST
    with pytest.raises(VmError) as ex:
        mm.mmap(64 * MiB)  # more than the host has
    assert ex.value.errno == errno.ENOMEM
    with pytest.raises(VmError):
        mm.pin_user_pages(a + PAGE_SIZE, 1)


def test_pinned_pages_outlive_munmap() -> None:
    host = Host(16 * MiB)
    mm = MmStruct(host)
    free = host.free_pages_count()
    a = mm.mmap(2 * PAGE_SIZE)
    pages = mm.pin_user_pages(a, 2)
    assert mm.pin_count(a) == 1 and mm.pinned_vm == 2
    mm.munmap(a, 2 * PAGE_SIZE)
    assert host.free_pages_count() == free - 2  # the device may still use them
    mm.unpin_user_pages(pages)
    assert host.free_pages_count() == free and mm.pinned_vm == 0
    with pytest.raises(VmError):
        mm.unpin_user_pages(pages)


@pytest.mark.parametrize("machine", ["hca0:iommu"], indirect=True)
def test_iommu_registration_is_tracked_until_dereg(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD

    from pyverbs import _softrdma as sim

    ctx = Context(name=machine)
    pd = PD(ctx)
    dev = ctx.device.dma_device
    debug = dev.debug
    assert debug is not None and dev.iommu_domain is not None
    before = len(debug.live_mappings(dev))
    mr = MR(pd, 5 * PAGE_SIZE + 10, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ)
    proc = sim.process()
    assert proc.mm.pin_count(mr.buf) == 1
    sg = [m for m in debug.live_mappings(dev) if m.type == MapType.SG]
    assert len(debug.live_mappings(dev)) > before and sg
    # the device's addresses are IOVAs that the IOMMU translates to the pages
    for dma, length in mr.umem.dma_segments():
        for off in range(0, length, PAGE_SIZE):
            phys = dev.iommu_domain.iova_to_phys(dma + off)
            assert phys is not None and phys != dma + off
            page = (off // PAGE_SIZE) + (dma - mr.umem.dma_segments()[0][0]) // PAGE_SIZE
            assert phys == mr.umem.pages[page].phys
    iovas = mr.umem.dma_segments()
    mr.close()
    assert len(debug.live_mappings(dev)) == before
    assert all(dev.iommu_domain.iova_to_phys(d) is None for d, _ in iovas)
    assert proc.mm.find_vma(mr.buf) is None  # the MR's own buffer is freed
    assert not debug.reports
    ctx.close()


@pytest.mark.parametrize("machine", ["hca0:swiotlb"], indirect=True)
def test_bounce_device_moves_data_through_bounce_slots(machine: str) -> None:
    import pyverbs.enums as e
    import pyverbs.mem_alloc as mem
    from pyverbs.wr import SGE, SendWR

    from pyverbs import _softrdma as sim
    from tests.pyverbs import helpers as h

    a, b = h.player(machine), h.player(machine)
    h.connect(a, b)
    swiotlb = sim.process().platform.swiotlb
    assert swiotlb is not None
    # b's memory is mapped for the device as bounce slots, not as its pages
    for dma, _ in b.mr.umem.dma_segments():
        assert swiotlb.is_swiotlb_buffer(dma)
    b.mr.write(b"old!", 4, 0)  # MR.write syncs the slots for the device
    # a CPU store that bypasses the DMA sync stays invisible to the device
    mem.write(b.mr.buf, b"new!", 4)
    r = SendWR(wr_id=1, opcode=e.IBV_WR_RDMA_READ, num_sge=1, sg=[SGE(a.mr.buf, 4, a.mr.lkey)])
    r.set_wr_rdma(b.mr.rkey, b.mr.buf)
    a.qp.post_send(r)
    assert a.poll()[0].status == e.IBV_WC_SUCCESS
    assert a.mr.read(4, 0) == b"old!"
    # an RDMA WRITE lands in the slots; MR.read syncs them to the CPU
    a.mr.write(b"data", 4, 100)
    w = SendWR(
        wr_id=2, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[SGE(a.mr.buf + 100, 4, a.mr.lkey)]
    )
    w.set_wr_rdma(b.mr.rkey, b.mr.buf + 200)
    a.qp.post_send(w)
    assert a.poll()[0].status == e.IBV_WC_SUCCESS
    assert mem.read(b.mr.buf + 200, 4) == bytes(4)  # still only in the bounce slot
    assert b.mr.read(4, 200) == b"data"
    used = swiotlb.used
    b.ctx.close()
    assert swiotlb.used < used  # deregistration released b's slots
    a.ctx.close()


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_registering_caller_memory(machine: str) -> None:
    import pyverbs.enums as e
    import pyverbs.mem_alloc as mem
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError

    from pyverbs import _softrdma as sim

    with Context(name=machine) as ctx, PD(ctx) as pd:
        addr = mem.posix_memalign(3 * PAGE_SIZE)
        mem.write(addr, b"abc", 3, 10)
        mr = MR(pd, 2 * PAGE_SIZE, e.IBV_ACCESS_LOCAL_WRITE, address=addr + 10)
        assert mr.buf == addr + 10 and mr.read(3, 0) == b"abc"
        assert sim.process().mm.pin_count(addr) == 1
        mr.close()
        assert sim.process().mm.pin_count(addr) == 0
        assert mem.read(addr, 3, 10) == b"abc"  # caller memory is the caller's
        mem.free(addr)
        with pytest.raises(PyverbsRDMAError) as ex:
            MR(pd, PAGE_SIZE, e.IBV_ACCESS_LOCAL_WRITE, address=addr)  # unmapped now
        assert ex.value.error_code == errno.EFAULT


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["map", "unmap", "write", "read"]),
            st.integers(0, 7),
            st.integers(0, 3 * PAGE_SIZE),
            st.integers(1, 2 * PAGE_SIZE),
        ),
        max_size=25,
    )
)
def test_mm_matches_a_byte_model(ops: list[tuple[str, int, int, int]]) -> None:
    """Random mmap / munmap / write / read against a dictionary of bytes:
    the address space returns what was stored, faults exactly where
    nothing is mapped, and gives every page back at the end."""
    host = Host(16 * MiB)
    mm = MmStruct(host)
    free = host.free_pages_count()
    model: dict[int, int] = {}  # address -> byte, for every mapped byte
    maps: list[int] = []
    for op, which, offset, length in ops:
        if op == "map" or not maps:
            start = mm.mmap(length)
            size = -(-length // PAGE_SIZE) * PAGE_SIZE
            model.update(dict.fromkeys(range(start, start + size), 0))
            maps.append(start)
            continue
        base = maps[which % len(maps)]
        addr = base + offset
        if op == "unmap":
            page = addr & ~(PAGE_SIZE - 1)
            mm.munmap(page, length)
            end = page + -(-length // PAGE_SIZE) * PAGE_SIZE
            for a in range(page, end):
                model.pop(a, None)
            continue
        mapped = all(a in model for a in range(addr, addr + length))
        if op == "write":
            data = bytes((addr + i) % 251 for i in range(length))
            if mapped:
                mm.write(addr, data)
                model.update(zip(range(addr, addr + length), data, strict=True))
            else:
                with pytest.raises(UserAddressError):
                    mm.write(addr, data)
        elif mapped:
            assert mm.read(addr, length) == bytes(model[a] for a in range(addr, addr + length))
        else:
            with pytest.raises(UserAddressError):
                mm.read(addr, length)
    for start in maps:
        mm.munmap(start, 8 * PAGE_SIZE)
    assert mm.total_vm == 0 and host.free_pages_count() == free
