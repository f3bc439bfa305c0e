"""Every DMA-API debug check fires on the misuse it names and stays silent
for correct code, on every backend."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest

from softrdma.dma.debug import DebugKind, DmaDebugReport
from softrdma.dma.device import Device
from softrdma.dma.errors import DmaAccessError, DmaApiError, DmaDebugError
from softrdma.dma.types import (
    DMA_BIDIRECTIONAL,
    DMA_FROM_DEVICE,
    DMA_MAPPING_ERROR,
    DMA_TO_DEVICE,
    DmaDirection,
)
from softrdma.memory.errors import BadFreeError
from softrdma.memory.layout import PAGE_SIZE
from softrdma.memory.page import GFP_HIGHUSER
from softrdma.memory.scatterlist import Scatterlist
from tests.conftest import make_device


def reports_of(dev: Device, action: Callable[[Device], object]) -> list[DmaDebugReport]:
    with dev.platform.dma_debug.capture() as got:
        action(dev)
    return got


def tolerate_backend(fn: Callable[..., object], *args: object) -> None:
    """Call a DMA API function whose backend may refuse after the report."""
    with contextlib.suppress(DmaApiError, DmaAccessError, BadFreeError):
        fn(*args)


def kinds(reports: list[DmaDebugReport]) -> list[DebugKind]:
    return [r.kind for r in reports]


def mapped(dev: Device, size: int = 256, direction: DmaDirection = DMA_BIDIRECTIONAL) -> int:
    dma = dev.map_single(dev.host.kmalloc(size), size, direction)
    assert not dev.mapping_error(dma)
    return dma


def test_unmap_of_address_never_mapped(backend_kind: str) -> None:
    dev = make_device(backend_kind)
    got = reports_of(dev, lambda d: tolerate_backend(d.unmap_single, 0x1234000, 64, DMA_TO_DEVICE))
    assert kinds(got) == [DebugKind.UNMAP_NOT_MAPPED]
    assert (
        "tries to free DMA memory it has not allocated [device address=0x0000000001234000] [size=64 bytes]"
        in got[0].message
    )
    assert got[0].message.startswith("DMA-API: softrdma " + dev.name + ": ")


def test_double_unmap(backend_kind: str) -> None:
    dev = make_device(backend_kind)
    dma = mapped(dev)
    dev.unmap_single(dma, 256, DMA_BIDIRECTIONAL)
    # The report comes first; swiotlb and the IOMMU then refuse as well.
    got = reports_of(dev, lambda d: tolerate_backend(d.unmap_single, dma, 256, DMA_BIDIRECTIONAL))
    assert kinds(got) == [DebugKind.UNMAP_NOT_MAPPED]


def test_unmap_mismatches(backend_kind: str) -> None:
    dev = make_device(backend_kind)
    host = dev.host
    k = host.kmalloc(512)

    def wrong_size(d: Device) -> None:
        dma = d.map_single(k, 512, DMA_TO_DEVICE)
        d.mapping_error(dma)
        d.unmap_single(dma, 256, DMA_TO_DEVICE)

    def wrong_direction(d: Device) -> None:
        dma = d.map_single(k, 512, DMA_TO_DEVICE)
        d.mapping_error(dma)
        d.unmap_single(dma, 512, DMA_FROM_DEVICE)

    def wrong_function(d: Device) -> None:
        got = d.alloc_coherent(PAGE_SIZE)
        assert got is not None
        d.unmap_single(got[1], PAGE_SIZE, DMA_BIDIRECTIONAL)

    def unchecked(d: Device) -> None:
        dma = d.map_single(k, 512, DMA_TO_DEVICE)
        d.unmap_single(dma, 512, DMA_TO_DEVICE)

    size = reports_of(dev, wrong_size)
    assert kinds(size) == [DebugKind.UNMAP_SIZE_MISMATCH]
    assert (
        size[0].map_size == 512
        and size[0].size == 256
        and "[map size=512 bytes] [unmap size=256 bytes]" in size[0].message
    )
    direction = reports_of(dev, wrong_direction)
    assert kinds(direction) == [DebugKind.UNMAP_DIRECTION_MISMATCH]
    assert "[mapped with DMA_TO_DEVICE] [unmapped with DMA_FROM_DEVICE]" in direction[0].message
    function = reports_of(dev, wrong_function)
    assert DebugKind.UNMAP_WRONG_FUNCTION in kinds(function)
    assert "[mapped as coherent] [unmapped as single]" in function[0].message
    not_checked = reports_of(dev, unchecked)
    assert kinds(not_checked) == [DebugKind.MAP_ERROR_NOT_CHECKED]
    assert "failed to check map error[device address=" in not_checked[0].message


def test_sg_checks(backend_kind: str) -> None:
    dev = make_device(backend_kind)
    host = dev.host
    pages = [host.alloc_pages(0) for _ in range(3)]
    sgl = Scatterlist.from_pages([(p, 0, 512) for p in pages])

    def wrong_count(d: Device) -> None:
        assert d.map_sg(sgl, DMA_TO_DEVICE)
        d.unmap_sg(sgl, DMA_TO_DEVICE, nents=2)

    got = reports_of(dev, wrong_count)
    assert DebugKind.UNMAP_SG_COUNT_MISMATCH in kinds(got)
    assert "[map count=3] [unmap count=2]" in got[0].message
    big = Scatterlist.from_pages([(host.alloc_pages(5), 0, 128 * 1024)])
    got = reports_of(dev, lambda d: d.map_sg(big, DMA_TO_DEVICE))
    assert kinds(got) == [DebugKind.SG_SEGMENT_TOO_LONG]


def test_sync_checks(backend_kind: str) -> None:
    dev = make_device(backend_kind)
    to_dev = mapped(dev, 256, DMA_TO_DEVICE)
    from_dev = mapped(dev, 256, DMA_FROM_DEVICE)
    cases = {
        DebugKind.SYNC_OUT_OF_RANGE: lambda d: d.sync_single_for_cpu(
            from_dev + 200, 100, DMA_FROM_DEVICE
        ),
        DebugKind.SYNC_NOT_MAPPED: lambda d: d.sync_single_for_device(0x7777000, 8, DMA_TO_DEVICE),
        DebugKind.SYNC_READ_ONLY_FOR_CPU: lambda d: d.sync_single_for_cpu(
            to_dev, 256, DMA_FROM_DEVICE
        ),
        DebugKind.SYNC_WRITE_ONLY_TO_DEVICE: lambda d: d.sync_single_for_device(
            from_dev, 256, DMA_TO_DEVICE
        ),
    }
    for kind, action in cases.items():
        got = reports_of(dev, action)
        assert kind in kinds(got), (kind, kinds(got))
    assert DebugKind.SYNC_DIRECTION_MISMATCH in kinds(
        reports_of(dev, lambda d: d.sync_single_for_cpu(to_dev, 256, DMA_FROM_DEVICE))
    )
    out = reports_of(dev, cases[DebugKind.SYNC_OUT_OF_RANGE])[0]
    assert "[allocation size=256 bytes] [sync offset+size=300]" in out.message


def test_map_single_of_non_linear_memory(backend_kind: str) -> None:
    dev = make_device(backend_kind)
    host = dev.host
    v = host.vmalloc(100)
    got = reports_of(dev, lambda d: d.map_single(v, 100, DMA_TO_DEVICE))
    assert (
        kinds(got) == [DebugKind.MAP_VMALLOC_AREA]
        and "maps memory from vmalloc area" in got[0].message
    )
    assert dev.map_single(v, 100, DMA_TO_DEVICE) == DMA_MAPPING_ERROR
    high = host.kmap(host.alloc_pages(0, GFP_HIGHUSER))
    got = reports_of(dev, lambda d: d.map_single(high, 100, DMA_TO_DEVICE))
    assert kinds(got) == [DebugKind.MAP_INVALID_AREA]


def test_coherent_free_mismatches(backend_kind: str) -> None:
    dev = make_device(backend_kind)
    got = dev.alloc_coherent(2 * PAGE_SIZE)
    assert got is not None
    kva, dma = got
    reps = reports_of(dev, lambda d: tolerate_backend(d.free_coherent, PAGE_SIZE, kva, dma))
    assert kinds(reps) == [DebugKind.UNMAP_SIZE_MISMATCH]
    got2 = dev.alloc_coherent(PAGE_SIZE)
    assert got2 is not None
    reps = reports_of(
        dev, lambda d: tolerate_backend(d.free_coherent, PAGE_SIZE, got2[0] + 64, got2[1])
    )
    assert kinds(reps) == [DebugKind.UNMAP_CPU_ADDRESS_MISMATCH]
    assert "[cpu alloc address=" in reps[0].message


def test_leak_report_at_release_counts_and_places(backend_kind: str) -> None:
    dev = make_device(backend_kind)
    for _ in range(3):
        mapped(dev)
    assert dev.alloc_coherent(64) is not None
    got = reports_of(dev, lambda d: d.release())
    assert kinds(got) == [DebugKind.LEAK]
    rep = got[0]
    assert rep.count == 4 and "[count=4]" in rep.message
    assert sum(n for _, n in rep.leaks) == 4
    assert all("test_debug.py" in where for where, _ in rep.leaks), rep.leaks
    assert max(n for _, n in rep.leaks) == 3


def test_device_access_outside_live_mappings(backend_kind: str) -> None:
    dev = make_device(backend_kind)
    dma = mapped(dev, 256, DMA_TO_DEVICE)
    got = reports_of(dev, lambda d: tolerate_backend(d.dma_read, dma + 200, 100))
    assert kinds(got) == [DebugKind.DEVICE_ACCESS_UNMAPPED]
    got = reports_of(
        dev, lambda d: tolerate_backend(d.dma_write, dma, b"x")
    )  # the IOMMU blocks it too
    assert kinds(got) == [DebugKind.DEVICE_ACCESS_DIRECTION]


def test_strict_mode_raises_at_the_faulty_call() -> None:
    dev = make_device("direct")
    dma = mapped(dev)
    with dev.platform.dma_debug.strict(), pytest.raises(DmaDebugError) as err:
        dev.unmap_single(dma, 100, DMA_BIDIRECTIONAL)
    assert err.value.report.kind is DebugKind.UNMAP_SIZE_MISMATCH
    assert "test_debug.py" in err.value.report.location


def test_correct_code_is_silent_and_debug_is_opt_in(backend_kind: str) -> None:
    from tests.dma.test_backends import driver_routine

    dev = make_device(backend_kind)
    with dev.platform.dma_debug.strict():
        driver_routine(dev)
        dma = mapped(dev, 300, DMA_FROM_DEVICE)
        dev.dma_write(dma, b"ok")
        dev.sync_single_for_cpu(dma + 100, 50, DMA_FROM_DEVICE)
        dev.sync_single_for_device(dma, 300, DMA_FROM_DEVICE)
        dev.unmap_single(dma, 300, DMA_FROM_DEVICE)
        dev.release()
    assert dev.platform.dma_debug.reports == []
    quiet = make_device(backend_kind, debug=False)
    k = quiet.host.kmalloc(64)
    quiet.unmap_single(quiet.map_single(k, 64, DMA_TO_DEVICE), 64, DMA_TO_DEVICE)
    assert quiet.debug is None and quiet.platform.dma_debug.reports == []
