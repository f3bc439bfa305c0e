"""The ib_dma wrappers: one consumer code path, the device decides what a
DMA address is — and the DMA-API debug checker works for every device
kind, CPU-copy devices included."""

from __future__ import annotations

import pytest

from softrdma.dma.debug import DebugKind
from softrdma.dma.types import DMA_BIDIRECTIONAL, DMA_FROM_DEVICE, DMA_TO_DEVICE, DmaBackend
from softrdma.fabric.inproc import Fabric
from softrdma.memory.layout import PAGE_OFFSET, PKMAP_BASE
from softrdma.memory.page import GFP_HIGHUSER
from softrdma.memory.scatterlist import Scatterlist
from softrdma.verbs.dma import (
    ib_dma_alloc_coherent,
    ib_dma_free_coherent,
    ib_dma_map_page,
    ib_dma_map_sg,
    ib_dma_map_single,
    ib_dma_mapping_error,
    ib_dma_max_seg_size,
    ib_dma_sync_single_for_cpu,
    ib_dma_sync_single_for_device,
    ib_dma_unmap_page,
    ib_dma_unmap_sg,
    ib_dma_unmap_single,
    ib_uses_virt_dma,
)
from tests.rdma.nodes import KINDS, make_device


@pytest.mark.parametrize("kind", KINDS)
def test_one_code_path_every_device(kind: str) -> None:
    dev = make_device(kind, Fabric(), "10.9.0.1")
    host = dev.host
    kva = host.kmalloc(4096)
    host.cpu_write(kva, b"consumer data")
    dma = ib_dma_map_single(dev, kva, 4096, DMA_BIDIRECTIONAL)
    assert not ib_dma_mapping_error(dev, dma)
    backend = dev.dma_device.backend
    if kind == "cpu":
        assert ib_uses_virt_dma(dev) and int(dma) == kva and ib_dma_max_seg_size(dev) == 1 << 31
    else:
        assert not ib_uses_virt_dma(dev) and int(dma) != kva
        if backend == DmaBackend.DIRECT:
            assert int(dma) == host.virt_to_phys(kva)
        elif backend == DmaBackend.SWIOTLB:
            assert dev.dma_device.platform.swiotlb is not None
            assert dev.dma_device.platform.swiotlb.is_swiotlb_buffer(dma)
        else:
            assert dma < 1 << 32 and int(dma) != host.virt_to_phys(kva)
    # the device sees the consumer's bytes and its writes come back after a sync
    assert bytes(dev.dma_device.dma_read(dma, 13)) == b"consumer data"
    dev.dma_device.dma_write(dma, b"DEVICE")
    ib_dma_sync_single_for_cpu(dev, dma, 4096, DMA_BIDIRECTIONAL)
    assert bytes(host.cpu_read(kva, 6)) == b"DEVICE"
    ib_dma_sync_single_for_device(dev, dma, 4096, DMA_BIDIRECTIONAL)
    ib_dma_unmap_single(dev, dma, 4096, DMA_BIDIRECTIONAL)

    high = host.alloc_pages(0, GFP_HIGHUSER)
    pdma = ib_dma_map_page(dev, high, 100, 200, DMA_TO_DEVICE)
    assert not ib_dma_mapping_error(dev, pdma)
    if kind == "cpu":
        assert pdma >= PKMAP_BASE, "a highmem page is kmapped while mapped"
    ib_dma_unmap_page(dev, pdma, 200, DMA_TO_DEVICE)

    sgl = Scatterlist.from_pages([(high, 0, 4096), (host.alloc_pages(0), 0, 4096)])
    n = ib_dma_map_sg(dev, sgl, DMA_FROM_DEVICE)
    assert n and len(sgl.dma_segments()) == n
    ib_dma_unmap_sg(dev, sgl, DMA_FROM_DEVICE)

    got = ib_dma_alloc_coherent(dev, 8192)
    assert got is not None
    ckva, cdma = got
    if kind == "cpu":
        assert int(cdma) == ckva and ckva >= PAGE_OFFSET
    ib_dma_free_coherent(dev, 8192, ckva, cdma)
    dev.dma_device.release()
    assert not dev.dma_device.platform.dma_debug.reports


@pytest.mark.parametrize("kind", KINDS)
def test_debug_checker_catches_consumer_bugs_on_every_device(kind: str) -> None:
    dev = make_device(kind, Fabric(), "10.9.0.2")
    host = dev.host
    debug = dev.dma_device.platform.dma_debug
    with debug.capture() as reports:
        kva = host.kmalloc(512)
        dma = ib_dma_map_single(dev, kva, 512, DMA_TO_DEVICE)  # mapping error never checked
        ib_dma_unmap_single(dev, dma, 256, DMA_TO_DEVICE)  # wrong size
        assert ib_dma_mapping_error(
            dev, ib_dma_map_single(dev, host.vmalloc(64), 64, DMA_TO_DEVICE)
        )
        leaked = ib_dma_map_single(dev, kva, 64, DMA_FROM_DEVICE)
        ib_dma_mapping_error(dev, leaked)
        dev.dma_device.release()
    kinds = [r.kind for r in reports]
    assert kinds == [
        DebugKind.UNMAP_SIZE_MISMATCH,
        DebugKind.MAP_ERROR_NOT_CHECKED,
        DebugKind.MAP_VMALLOC_AREA,
        DebugKind.LEAK,
    ]
    assert all("test_ib_dma.py" in r.location for r in reports), (
        "reports name the consumer, not the wrapper"
    )
