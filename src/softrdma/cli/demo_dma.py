"""``softrdma demo dma``: one buffer through every DMA backend.

A driver maps a kmalloc buffer on a direct, a swiotlb (forced bounce), an
IOMMU and a virtual-DMA device; a simulated device reads it and writes
into it; the CPU checks what came back. Then the fidelity that catches
bugs: an IOMMU blocking a stray write, stale data after a missing sync on
a non-coherent device, and the DMA-API debug checker's reports for a
buggy driver.
"""

from __future__ import annotations

from typing import TextIO

from softrdma.dma.device import Device
from softrdma.dma.errors import DmaAccessError
from softrdma.dma.platform import Platform
from softrdma.dma.types import DMA_BIDIRECTIONAL, DMA_FROM_DEVICE, DMA_TO_DEVICE, DmaBackend
from softrdma.memory.host import Host, MiB
from softrdma.memory.page import GFP_HIGHUSER
from softrdma.memory.scatterlist import Scatterlist


def _hex(x: int) -> str:
    return f"{x:#018x}"


def _roundtrip(dev: Device, kva: int, size: int, out: TextIO) -> None:
    host = dev.host
    pattern = bytes((i * 7) & 0xFF for i in range(size))
    host.cpu_write(kva, pattern)
    dma = dev.map_single(kva, size, DMA_BIDIRECTIONAL)
    if dev.mapping_error(dma):
        out.write(f"  {dev.backend.value:8s} mapping failed\n")
        return
    seen = bytes(dev.dma_read(dma, size))
    dev.dma_write(dma, b"DEVICE WAS HERE")
    dev.unmap_single(dma, size, DMA_BIDIRECTIONAL)
    back = bytes(host.cpu_read(kva, 15))
    space = {
        DmaBackend.DIRECT: f"phys {host.virt_to_phys(kva):#x} + bus offset {dev.bus_offset:#x}",
        DmaBackend.SWIOTLB: "a bounce slot in the swiotlb pool",
        DmaBackend.IOMMU: "an IOVA in the device's IO page table",
        DmaBackend.VIRTUAL: "the kernel virtual address itself",
    }[dev.backend]
    ok = "ok" if seen == pattern and back == b"DEVICE WAS HERE" else "MISMATCH"
    out.write(f"  {dev.backend.value:8s} dma {_hex(dma)}  = {space}\n")
    out.write(
        f"           device read {size} bytes: {'same as CPU wrote' if seen == pattern else 'DIFFERENT'};"
        f" device wrote 15 bytes, CPU reads {back!r}  [{ok}]\n"
    )


def run(size: int, out: TextIO) -> int:
    host = Host(256 * MiB, dma32_limit=64 * MiB, lowmem_limit=192 * MiB)
    out.write(f"softrdma demo dma: {host!r}, ZONE_DMA32 < 64 MiB, ZONE_HIGHMEM >= 192 MiB\n\n")
    kva = host.kmalloc(size)
    out.write(f"buffer: kmalloc({size}) -> kva {_hex(kva)}, phys {host.virt_to_phys(kva):#x}\n\n")

    out.write("1. one driver code path, four backends\n")
    plain = Platform(host, dma_debug=True)
    devices = [
        plain.add_device("nic-direct", bus_offset=0x8000_0000),
        plain.add_device("nic-swiotlb", backend=DmaBackend.SWIOTLB),
        Platform(host, swiotlb_size=None, iommu=True, dma_debug=True).add_device("nic-iommu"),
        plain.add_device("rxe0", backend=DmaBackend.VIRTUAL),
    ]
    for dev in devices:
        _roundtrip(dev, kva, size, out)
    pool = plain.swiotlb
    assert pool is not None
    out.write(
        f"  swiotlb copied {pool.bounced_bytes} bytes between the buffer and its bounce slots\n\n"
    )

    out.write("2. an IOMMU blocks what the driver did not map\n")
    iommu_dev = devices[2]
    iommu = iommu_dev.platform.iommu
    assert iommu is not None
    dma = iommu_dev.map_single(kva, size, DMA_TO_DEVICE)
    iommu_dev.mapping_error(dma)
    for what, addr in (
        ("write into a TO_DEVICE mapping", dma),
        ("write to an unmapped IOVA", dma + (1 << 20)),
    ):
        try:
            iommu_dev.dma_write(addr, b"stray")
            out.write(f"  {what}: went through?!\n")
        except DmaAccessError:
            out.write(f"  {what}: blocked, fault recorded: {iommu.faults[-1]}\n")
    iommu_dev.unmap_single(dma, size, DMA_TO_DEVICE)
    out.write(f"  buffer still reads {bytes(host.cpu_read(kva, 15))!r}\n\n")

    out.write("3. a non-coherent device and a missing dma_sync_single_for_cpu\n")
    arm = Platform(host, swiotlb_size=None).add_device("arm-dma", coherent=False)
    dma = arm.map_single(kva, 64, DMA_FROM_DEVICE)
    arm.mapping_error(dma)
    arm.dma_write(dma, b"fresh from the device")
    out.write(
        f"  CPU reads before sync_for_cpu: {bytes(host.cpu_read(kva, 21))!r} (stale cache line)\n"
    )
    arm.sync_single_for_cpu(dma, 64, DMA_FROM_DEVICE)
    out.write(f"  CPU reads after sync_for_cpu:  {bytes(host.cpu_read(kva, 21))!r}\n")
    arm.unmap_single(dma, 64, DMA_FROM_DEVICE)
    out.write("\n")

    out.write("4. highmem pages: an sg list with a HighMem page on every backend\n")
    high = host.alloc_pages(0, GFP_HIGHUSER)
    for dev in devices:
        sgl = Scatterlist.from_pages([(high, 0, 512)])
        n = dev.map_sg(sgl, DMA_TO_DEVICE)
        ((addr, _),) = sgl.dma_segments()
        out.write(f"  {dev.backend.value:8s} {n} segment at {_hex(addr)}\n")
        dev.unmap_sg(sgl, DMA_TO_DEVICE)
    out.write("\n")

    out.write("5. the DMA-API debug checker and a buggy driver\n")
    buggy = devices[0]
    debug = buggy.debug
    assert debug is not None
    with debug.capture() as reports:
        dma = buggy.map_single(kva, size, DMA_TO_DEVICE)  # never checked with mapping_error
        buggy.unmap_single(dma, size // 2, DMA_FROM_DEVICE)  # wrong size and direction
        buggy.map_single(host.vmalloc(100), 100, DMA_TO_DEVICE)  # vmalloc memory
        buggy.sync_single_for_cpu(0x1000, 64, DMA_FROM_DEVICE)  # never mapped
        leaked = buggy.map_single(kva, 128, DMA_TO_DEVICE)
        buggy.mapping_error(leaked)
        buggy.dma_read(leaked + 4096, 8)  # device reads outside every live mapping
        buggy.release()  # driver unbinds with a mapping still live
    for rep in reports:
        first_line = rep.message.splitlines()[0]
        out.write(f"  [{rep.kind.value}] {first_line}\n")
    out.write(
        f"\n{len(reports)} reports; each is a DmaDebugReport a test can collect, "
        "or raise with dma_debug.strict().\n"
    )
    return 0
