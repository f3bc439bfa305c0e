"""Each backend moves bytes exactly, and the driver-visible fidelity
(bouncing, IOMMU permissions, cache coherence) behaves as the kernel's."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softrdma.dma.device import Device
from softrdma.dma.errors import DmaAccessError, IommuFaultError
from softrdma.dma.platform import Platform
from softrdma.dma.types import (
    DMA_BIDIRECTIONAL,
    DMA_BIT_MASK,
    DMA_FROM_DEVICE,
    DMA_MAPPING_ERROR,
    DMA_TO_DEVICE,
    DmaBackend,
    DmaDirection,
)
from softrdma.memory.host import Host
from softrdma.memory.layout import PAGE_OFFSET, PAGE_SIZE, PKMAP_BASE
from softrdma.memory.page import GFP_HIGHUSER, GFP_KERNEL
from softrdma.memory.scatterlist import Scatterlist
from tests.conftest import BACKENDS, make_device, make_host

KINDS = [(k, c) for k in BACKENDS for c in (True, False) if not (k == "virtual" and not c)]


@pytest.mark.parametrize(("kind", "coherent"), KINDS)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(1, 3 * PAGE_SIZE),
    offset=st.integers(0, 200),
    direction=st.sampled_from([DMA_TO_DEVICE, DMA_FROM_DEVICE, DMA_BIDIRECTIONAL]),
    seed=st.binary(min_size=1, max_size=16),
)
def test_map_single_round_trip(
    kind: str, coherent: bool, size: int, offset: int, direction: DmaDirection, seed: bytes
) -> None:
    dev = make_device(kind, coherent=coherent)
    host = dev.host
    buf = host.kmalloc(offset + size + 64)
    cpu_data = (seed * (size // len(seed) + 1))[:size]
    dev_data = bytes(b ^ 0x5A for b in cpu_data)
    with dev.platform.dma_debug.strict():
        host.cpu_write(buf + offset, cpu_data)  # before the device owns it
        dma = dev.map_single(buf + offset, size, direction)
        assert not dev.mapping_error(dma)
        if direction.device_may_read:
            assert bytes(dev.dma_read(dma, size)) == cpu_data
        if direction.device_may_write:
            dev.dma_write(dma, dev_data)
            dev.sync_single_for_cpu(dma, size, direction)
            assert bytes(host.cpu_read(buf + offset, size)) == dev_data
            dev.sync_single_for_device(dma, size, direction)
        dev.unmap_single(dma, size, direction)
    expect = dev_data if direction.device_may_write else cpu_data
    assert bytes(host.cpu_read(buf + offset, size)) == expect


@pytest.mark.parametrize(("kind", "coherent"), KINDS)
@settings(max_examples=15, deadline=None)
@given(
    chunks=st.lists(
        st.tuples(st.integers(0, 300), st.integers(1, 5000), st.booleans()), min_size=1, max_size=6
    )
)
def test_map_sg_round_trip(kind: str, coherent: bool, chunks: list[tuple[int, int, bool]]) -> None:
    dev = make_device(kind, coherent=coherent)
    host = dev.host
    pages = []
    for offset, length, high in chunks:
        order = (offset + length - 1) // PAGE_SIZE
        page = host.alloc_pages(
            order.bit_length(), GFP_HIGHUSER if high and not order else GFP_KERNEL
        )
        pages.append((page, offset, length))
    sgl = Scatterlist.from_pages(pages)
    pattern = bytes(range(7, 250)) * 100
    for e in sgl:
        host.cpu_write_phys(e.phys, pattern[: e.length])
    with dev.platform.dma_debug.strict():
        count = dev.map_sg(sgl, DMA_BIDIRECTIONAL)
        if kind == "virtual" and any(
            e.page.is_highmem and e.offset + e.length > PAGE_SIZE for e in sgl
        ):
            assert count == 0
            return
        assert 1 <= count <= len(sgl)
        segs = sgl.dma_segments()
        gathered = b"".join(bytes(dev.dma_read(a, n)) for a, n in segs)
        assert gathered == b"".join(pattern[: e.length] for e in sgl)
        for a, n in segs:
            dev.dma_write(a, b"\xee" * n)
        dev.unmap_sg(sgl, DMA_BIDIRECTIONAL)
    for e in sgl:
        assert bytes(host.cpu_read_phys(e.phys, e.length)) == b"\xee" * e.length


def driver_routine(dev: Device) -> bytes:
    """One driver code path for every backend: a kmalloc buffer, an sg list
    of pages with a highmem page, a coherent buffer; device reads and
    writes; unmap. Returns everything the CPU sees afterwards."""
    host = dev.host
    buf = host.kmalloc(3000)
    host.cpu_write(buf, b"kmalloc " * 375)
    low = host.alloc_pages(1)
    high = host.alloc_pages(0, GFP_HIGHUSER)
    host.cpu_write_phys(low.phys, b"L" * 2 * PAGE_SIZE)
    host.cpu_write_phys(high.phys, b"H" * PAGE_SIZE)
    sgl = Scatterlist.from_pages([(low, 100, 5000), (high, 0, 1000)])
    out = bytearray()

    tx = dev.map_single(buf, 3000, DMA_TO_DEVICE)
    assert not dev.mapping_error(tx)
    out += dev.dma_read(tx, 3000)
    dev.unmap_single(tx, 3000, DMA_TO_DEVICE)

    n = dev.map_sg(sgl, DMA_BIDIRECTIONAL)
    assert n
    for i, (addr, length) in enumerate(sgl.dma_segments()):
        out += dev.dma_read(addr, length)
        dev.dma_write(addr, bytes([0x30 + i]) * length)
    dev.unmap_sg(sgl, DMA_BIDIRECTIONAL)

    got = dev.alloc_coherent(2 * PAGE_SIZE)
    assert got is not None
    kva, dma = got
    host.cpu_write(kva, b"ring")
    out += dev.dma_read(dma, 4)
    dev.dma_write(dma + 100, b"completion")
    out += host.cpu_read(kva + 100, 10)
    dev.free_coherent(2 * PAGE_SIZE, kva, dma)

    out += host.cpu_read_phys(low.phys, 2 * PAGE_SIZE)
    out += host.cpu_read_phys(high.phys, PAGE_SIZE)
    host.kfree(buf)
    return bytes(out)


def test_driver_routine_is_byte_identical_on_every_backend() -> None:
    results = {}
    for kind in BACKENDS:
        for coherent in (True, False):
            dev = make_device(kind, coherent=coherent)
            with dev.platform.dma_debug.strict():
                results[kind, coherent] = driver_routine(dev)
                dev.release()
            assert not dev.platform.dma_debug.reports
    assert len(set(results.values())) == 1, {
        k: hashlib.sha1(v).hexdigest()[:8] for k, v in results.items()
    }


# -- direct and swiotlb ---------------------------------------------------------


def test_direct_bus_offset_and_mask() -> None:
    host = make_host()
    platform = Platform(host, swiotlb_size=None)
    dev = platform.add_device("nic", bus_offset=0x8000_0000, dma_mask=DMA_BIT_MASK(32))
    k = host.kmalloc(64)
    dma = dev.map_single(k, 64, DMA_TO_DEVICE)
    assert dma == host.virt_to_phys(k) + 0x8000_0000
    narrow = platform.add_device("old", dma_mask=DMA_BIT_MASK(24))
    high = host.kmalloc(64)  # ZONE_NORMAL, above 16 MiB
    assert narrow.map_single(high, 64, DMA_TO_DEVICE) == DMA_MAPPING_ERROR
    with pytest.raises(DmaAccessError) as err:
        narrow.dma_read(1 << 30, 4)
    assert err.value.space == "dma"


def test_direct_bounces_what_the_mask_cannot_reach() -> None:
    host = make_host()
    platform = Platform(host)
    dev = platform.add_device("old", dma_mask=DMA_BIT_MASK(24))
    pool = platform.swiotlb
    assert pool is not None
    k = host.kmalloc(8192)  # above 16 MiB
    host.cpu_write(k, b"bounce me")
    dma = dev.map_single(k, 8192, DMA_BIDIRECTIONAL)
    assert pool.is_swiotlb_buffer(dma) and dma % PAGE_SIZE == 0
    assert bytes(dev.dma_read(dma, 9)) == b"bounce me"
    dev.dma_write(dma, b"DEVICE")
    assert bytes(host.cpu_read(k, 6)) == b"bounce", "not copied back before sync_for_cpu"
    dev.sync_single_for_cpu(dma, 8192, DMA_BIDIRECTIONAL)
    assert bytes(host.cpu_read(k, 6)) == b"DEVICE"
    dev.unmap_single(dma, 8192, DMA_BIDIRECTIONAL)
    assert pool.used == 0


def test_swiotlb_exhaustion_is_a_mapping_error() -> None:
    dev = make_device("swiotlb", swiotlb_size=256 * 1024)
    host, pool = dev.host, dev.platform.swiotlb
    assert pool is not None and pool.nslabs == 128
    live = []
    while True:
        d = dev.map_single(host.kmalloc(8192), 8192, DMA_TO_DEVICE)
        if dev.mapping_error(d):
            break
        live.append(d)
    assert len(live) == 128 // 4 and pool.used == 128 == pool.used_hiwater
    assert dev.max_mapping_size() == 256 * 1024
    too_big = host.kmalloc(300 * 1024)
    assert dev.mapping_error(dev.map_single(too_big, 300 * 1024, DMA_TO_DEVICE))
    for d in live:
        dev.unmap_single(d, 8192, DMA_TO_DEVICE)
    assert pool.used == 0


def test_swiotlb_missing_sync_leaves_stale_data() -> None:
    dev = make_device("swiotlb", debug=False)
    host = dev.host
    k = host.kmalloc(4096)
    dma = dev.map_single(k, 4096, DMA_FROM_DEVICE)
    dev.dma_write(dma, b"x" * 4096)
    assert bytes(host.cpu_read(k, 4)) != b"xxxx", "without sync the CPU sees the original"
    host.cpu_write(k, b"cpu")  # CPU scribbles while the device owns it (a bug) ...
    dev.unmap_single(dma, 4096, DMA_FROM_DEVICE)
    assert bytes(host.cpu_read(k, 4)) == b"xxxx", "... and unmap's copy-back overwrites it"


def test_swiotlb_to_device_sync_refreshes_bounce_buffer() -> None:
    dev = make_device("swiotlb")
    host = dev.host
    k = host.kmalloc(100)
    dma = dev.map_single(k, 100, DMA_TO_DEVICE)
    host.cpu_write(k, b"new")
    assert bytes(dev.dma_read(dma, 3)) != b"new"
    dev.sync_single_for_device(dma, 100, DMA_TO_DEVICE)
    assert bytes(dev.dma_read(dma, 3)) == b"new"
    dev.unmap_single(dma, 100, DMA_TO_DEVICE)


# -- IOMMU ----------------------------------------------------------------------


def whole_memory(host: Host) -> str:
    return hashlib.sha256(host.ram).hexdigest()


def test_iommu_blocks_stray_write_and_records_fault() -> None:
    dev = make_device("iommu", debug=False)
    host, iommu = dev.host, dev.platform.iommu
    assert iommu is not None
    k = host.kmalloc(4096)
    dma = dev.map_single(k, 4096, DMA_FROM_DEVICE)
    before = whole_memory(host)
    for stray in (dma + 2 * PAGE_SIZE, 0x1000, (1 << 32) + 0x5000):
        with pytest.raises(IommuFaultError) as err:
            dev.dma_write(stray, b"evil" * 100)
        assert err.value.space == "iova"
    # a write that starts mapped and runs off the end moves nothing either
    with pytest.raises(IommuFaultError):
        dev.dma_write(dma + 4000, b"y" * 200)
    assert whole_memory(host) == before
    assert [f.access for f in iommu.faults] == ["write"] * 4
    assert iommu.faults[0].iova == dma + 2 * PAGE_SIZE and iommu.faults[0].device == "iommu0"
    assert iommu.faults[0].reason == "not mapped"
    with pytest.raises(IommuFaultError, match="no read permission"):
        dev.dma_read(dma, 4)  # FROM_DEVICE is write-only to the device
    ro = dev.map_single(host.kmalloc(64), 64, DMA_TO_DEVICE)
    with pytest.raises(IommuFaultError, match="no write permission"):
        dev.dma_write(ro, b"z")
    assert whole_memory(host) == before


def test_iova_allocation_policy() -> None:
    dev = make_device("iommu", debug=False)
    host = dev.host
    a = dev.map_single(host.kmalloc(64), 64, DMA_TO_DEVICE)
    assert a >> 12 == 0xFFFFF, "top-down, below 4 GiB first"
    big = host.kmalloc(5 * PAGE_SIZE)
    b = dev.map_single(big, 5 * PAGE_SIZE, DMA_TO_DEVICE)
    assert (b >> 12) % 8 == 0, "size-aligned to the power of two"
    assert b < a < 1 << 32


def test_iommu_sg_merges_contiguous_pages() -> None:
    dev = make_device("iommu")
    host = dev.host
    pages = [host.alloc_pages(0, GFP_HIGHUSER) for _ in range(4)]
    sgl = Scatterlist.from_pages([(p, 0, PAGE_SIZE) for p in pages])
    assert dev.map_sg(sgl, DMA_TO_DEVICE) == 1
    ((_addr, length),) = sgl.dma_segments()
    assert length == 4 * PAGE_SIZE
    dev.unmap_sg(sgl, DMA_TO_DEVICE)
    direct = make_device("direct")
    pages = [direct.host.alloc_pages(0) for _ in range(4)]
    sgl = Scatterlist.from_pages([(p, 0, PAGE_SIZE) for p in pages])
    assert direct.map_sg(sgl, DMA_TO_DEVICE) == 4


def test_iommu_lazy_mode_stale_iotlb_window() -> None:
    now = [0.0]
    strict = make_device("iommu", debug=False)
    lazy = make_device("iommu", debug=False, iommu_strict=False, clock=lambda: now[0])
    for dev in (strict, lazy):
        k = dev.host.kmalloc(64)
        dma = dev.map_single(k, 64, DMA_BIDIRECTIONAL)
        dev.dma_write(dma, b"warm")  # fills the IOTLB
        dev.unmap_single(dma, 64, DMA_BIDIRECTIONAL)
        if dev is strict:
            with pytest.raises(IommuFaultError):
                dev.dma_write(dma, b"late")
            continue
        dev.dma_write(dma, b"late")  # stale IOTLB entry still translates
        assert bytes(dev.host.cpu_read(k, 4)) == b"late"
        iommu = dev.platform.iommu
        assert iommu is not None and iommu.pending_flush == 1
        again = dev.map_single(dev.host.kmalloc(64), 64, DMA_TO_DEVICE)
        assert again != dma, "the IOVA is not reused before the flush"
        now[0] = 0.02
        dev.unmap_single(again, 64, DMA_TO_DEVICE)  # timeout passed: flush
        assert iommu.pending_flush == 0
        with pytest.raises(IommuFaultError):
            dev.dma_write(dma, b"gone")


# -- virtual ----------------------------------------------------------------------


def test_virtual_dma_address_is_the_kernel_address() -> None:
    dev = make_device("virtual")
    host = dev.host
    k = host.kmalloc(100)
    assert int(dev.map_single(k, 100, DMA_TO_DEVICE)) == k
    assert dev.alloc_coherent(64) is not None
    high = host.alloc_pages(1, GFP_HIGHUSER)  # two frames: the mapping may not spill over
    dma = dev.map_page(high, 8, 100, DMA_FROM_DEVICE)
    assert not dev.mapping_error(dma)
    assert dma >= PKMAP_BASE and host.page_address(high) == dma - 8, "kmapped while mapped"
    dev.dma_write(dma, b"through the kmap window")
    dev.unmap_page(dma, 100, DMA_FROM_DEVICE)
    assert host.page_address(high) is None, "kunmapped at unmap"
    assert bytes(host.cpu_read_phys(high.phys + 8, 7)) == b"through"
    assert dev.mapping_error(dev.map_page(high, 4000, 200, DMA_TO_DEVICE)), "highmem maps one page"
    with pytest.raises(DmaAccessError, match="page fault"):
        dev.dma_write(PAGE_OFFSET + host.mem_size + 4096, b"x")


def test_virtual_kmap_exhaustion_is_a_mapping_error() -> None:
    dev = make_device("virtual", debug=False)
    host = dev.host
    pages = [host.alloc_pages(0, GFP_HIGHUSER) for _ in range(1025)]
    dmas = [dev.map_page(p, 0, 16, DMA_TO_DEVICE) for p in pages]
    assert sum(dev.mapping_error(d) for d in dmas) == 1


# -- non-coherent devices ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["direct", "iommu", "swiotlb"])
def test_noncoherent_missing_syncs_are_visible(kind: str) -> None:
    dev = make_device(kind, coherent=False, debug=False)
    host = dev.host
    k = host.kmalloc(256)
    dma = dev.map_single(k, 256, DMA_BIDIRECTIONAL)
    host.cpu_write(k, b"after map")  # no sync_for_device
    assert bytes(dev.dma_read(dma, 9)) != b"after map"
    dev.sync_single_for_device(dma, 256, DMA_BIDIRECTIONAL)
    assert bytes(dev.dma_read(dma, 9)) == b"after map"
    dev.dma_write(dma, b"from the device")
    assert bytes(host.cpu_read(k, 15)) != b"from the device", "stale without sync_for_cpu"
    dev.sync_single_for_cpu(dma, 256, DMA_BIDIRECTIONAL)
    assert bytes(host.cpu_read(k, 15)) == b"from the device"
    dev.unmap_single(dma, 256, DMA_BIDIRECTIONAL)


def test_coherent_memory_needs_no_syncs_even_on_noncoherent_devices() -> None:
    for kind in BACKENDS:
        dev = make_device(kind, coherent=False)
        got = dev.alloc_coherent(3 * PAGE_SIZE)
        assert got is not None
        kva, dma = got
        assert bytes(dev.host.cpu_read(kva, 3 * PAGE_SIZE)) == bytes(3 * PAGE_SIZE)
        dev.host.cpu_write(kva + 5, b"cpu")
        assert bytes(dev.dma_read(dma + 5, 3)) == b"cpu"
        dev.dma_write(dma + 9000, b"dev")
        assert bytes(dev.host.cpu_read(kva + 9000, 3)) == b"dev"
        dev.free_coherent(3 * PAGE_SIZE, kva, dma)


def test_coherent_mask_picks_the_zone() -> None:
    host = make_host()
    dev = Platform(host).add_device(
        "d", dma_mask=DMA_BIT_MASK(64), coherent_dma_mask=DMA_BIT_MASK(24)
    )
    got = dev.alloc_coherent(PAGE_SIZE)
    assert got is not None and got[1] < 1 << 24


def test_invalid_api_arguments() -> None:
    from softrdma.dma.errors import DmaApiError

    dev = make_device("direct")
    k = dev.host.kmalloc(64)
    with pytest.raises(DmaApiError, match="direction"):
        dev.map_single(k, 64, DmaDirection.NONE)
    with pytest.raises(DmaApiError, match="positive"):
        dev.map_single(k, 0, DMA_TO_DEVICE)
    dev.release()
    with pytest.raises(DmaApiError, match="released"):
        dev.map_single(k, 64, DMA_TO_DEVICE)
    with pytest.raises(ValueError, match="IOMMU"):
        Platform(make_host()).add_device("x", backend=DmaBackend.IOMMU)


@pytest.mark.parametrize(("kind", "coherent"), KINDS)
def test_sync_sg_hands_buffers_back_and_forth(kind: str, coherent: bool) -> None:
    dev = make_device(kind, coherent=coherent)
    host = dev.host
    pages = [host.alloc_pages(0) for _ in range(3)]
    sgl = Scatterlist.from_pages([(p, 16, 1000) for p in pages])
    with dev.platform.dma_debug.strict():
        assert dev.map_sg(sgl, DMA_BIDIRECTIONAL)
        for e in sgl:
            host.cpu_write_phys(e.phys, b"cpu-data")
        dev.sync_sg_for_device(sgl, DMA_BIDIRECTIONAL)
        for addr, _ in sgl.dma_segments():
            assert bytes(dev.dma_read(addr, 8)) == b"cpu-data"
            dev.dma_write(addr, b"dev-data")
        dev.sync_sg_for_cpu(sgl, DMA_BIDIRECTIONAL)
        for e in sgl:
            assert bytes(host.cpu_read_phys(e.phys, 8)) == b"dev-data"
        dev.unmap_sg(sgl, DMA_BIDIRECTIONAL)
