"""DMA-layer benchmark: map/unmap rates per backend, IOVA allocator
scaling with live mappings, and device read bandwidth.

Prints a table and, last, one JSON object. Rates are also given as ratios
to limits measured in the same run (a plain memoryview copy, an empty
Python call), because the machines this runs on are shared and noisy.

    python bench/dma.py            # full run (1e6 live IOVAs: ~1 minute)
    python bench/dma.py --quick    # small sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypedDict

from softrdma.dma.device import Device
from softrdma.dma.platform import Platform
from softrdma.dma.types import DMA_BIDIRECTIONAL, DMA_TO_DEVICE, DmaBackend
from softrdma.memory.host import GiB, Host, MiB
from softrdma.memory.layout import PAGE_SIZE
from softrdma.memory.page import Page
from softrdma.memory.scatterlist import Scatterlist


class PlatformOptions(TypedDict, total=False):
    """The keyword arguments of :class:`Platform` that choose its DMA hardware."""

    swiotlb_force: bool
    iommu: bool


BACKENDS: dict[str, tuple[PlatformOptions, DmaBackend]] = {
    "direct": ({}, DmaBackend.DIRECT),
    "swiotlb": ({"swiotlb_force": True}, DmaBackend.SWIOTLB),
    "iommu": ({"iommu": True}, DmaBackend.IOMMU),
    "virtual": ({}, DmaBackend.VIRTUAL),
}


def best_rate(fn: Callable[[], None], ops: int, repeat: int = 5) -> float:
    """Operations per second of the fastest of ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return ops / best


def device(kind: str, host: Host | None = None) -> Device:
    kw, backend = BACKENDS[kind]
    platform = Platform(host or Host(512 * MiB), **kw)
    return platform.add_device(kind, backend=backend)


def _singles(dev: Device, buf: int, n: int) -> None:
    for _ in range(n):
        dma = dev.map_single(buf, PAGE_SIZE, DMA_TO_DEVICE)
        dev.unmap_single(dma, PAGE_SIZE, DMA_TO_DEVICE)


def _sg_lists(dev: Device, pages: list[Page], n: int) -> None:
    for _ in range(n):
        sgl = Scatterlist.from_pages([(p, 0, PAGE_SIZE) for p in pages])
        dev.map_sg(sgl, DMA_BIDIRECTIONAL)
        dev.unmap_sg(sgl, DMA_BIDIRECTIONAL)


def _page_cycles(dev: Device, page: Page, n: int) -> None:
    for _ in range(n):
        dma = dev.map_page(page, 0, PAGE_SIZE, DMA_TO_DEVICE)
        dev.unmap_page(dma, PAGE_SIZE, DMA_TO_DEVICE)


def _reads(dev: Device, dmas: Sequence[tuple[int, int]], dst: memoryview) -> None:
    for dma, length in dmas:
        dst[:length] = dev.dma_read(dma, length)


def map_rates(n: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for kind in BACKENDS:
        dev = device(kind)
        host = dev.host
        buf = host.kmalloc(PAGE_SIZE)
        pages = [host.alloc_pages(0) for _ in range(16)]

        out[kind] = {
            "single_4k_ops_per_s": best_rate(partial(_singles, dev, buf, n), n),
            "sg16_ops_per_s": best_rate(partial(_sg_lists, dev, pages, n // 16), n // 16),
        }
    return out


def iommu_scaling(live_counts: list[int], n: int) -> tuple[dict[str, float], dict[str, float]]:
    """map+unmap cycles (the rcache path) and fresh maps that must come from
    the allocator itself, each with ``live`` mappings already in place."""
    cycles: dict[str, float] = {}
    fresh: dict[str, float] = {}
    for live in live_counts:
        host = Host(64 * MiB)
        dev = device("iommu", host)
        page = host.alloc_pages(0)
        for _ in range(live):
            dev.map_page(page, 0, PAGE_SIZE, DMA_TO_DEVICE)
        t0 = time.perf_counter()
        new = [dev.map_page(page, 0, 2 * PAGE_SIZE, DMA_TO_DEVICE) for _ in range(n)]
        fresh[f"{live:.0e}"] = n / (time.perf_counter() - t0)
        for dma in new:
            dev.unmap_page(dma, 2 * PAGE_SIZE, DMA_TO_DEVICE)

        cycles[f"{live:.0e}"] = best_rate(partial(_page_cycles, dev, page, n), n)
        del dev, host
    return cycles, fresh


def read_bandwidth(size: int) -> dict[str, float]:
    out: dict[str, float] = {}
    src = bytearray(size)
    dst = bytearray(size)
    view_src, view_dst = memoryview(src), memoryview(dst)

    def plain() -> None:
        view_dst[:] = view_src

    out["memoryview_copy_bytes_per_s"] = best_rate(plain, size, repeat=20)
    for kind in BACKENDS:
        dev = device(kind, Host(1 * GiB))
        buf = dev.host.kmalloc(size)
        if kind == "swiotlb":  # one mapping is at most 256 KiB: read the pieces
            step = 256 * 1024
            dmas = [
                (dev.map_single(buf + o, step, DMA_TO_DEVICE), step) for o in range(0, size, step)
            ]
        else:
            dmas = [(dev.map_single(buf, size, DMA_TO_DEVICE), size)]

        out[f"{kind}_bytes_per_s"] = best_rate(
            partial(_reads, dev, dmas, view_dst), size, repeat=20
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    args = parser.parse_args()
    n = 2000 if args.quick else 20000
    live_counts = [1000, 10000] if args.quick else [1000, 100000, 1000000]

    rates = map_rates(n)
    scaling, fresh = iommu_scaling(live_counts, n)
    bandwidth = read_bandwidth(MiB)
    limit = bandwidth["memoryview_copy_bytes_per_s"]
    lo, hi = f"{live_counts[0]:.0e}", f"{live_counts[-1]:.0e}"
    ratio_live = scaling[lo] / scaling[hi]
    ratio_fresh = fresh[lo] / fresh[hi]

    print(
        f"{'backend':10s} {'4K map+unmap/s':>16s} {'16-sg map+unmap/s':>18s} {'1 MiB read GB/s':>16s} {'vs memcpy':>10s}"
    )
    for kind in BACKENDS:
        bw = bandwidth[f"{kind}_bytes_per_s"]
        print(
            f"{kind:10s} {rates[kind]['single_4k_ops_per_s']:16,.0f} {rates[kind]['sg16_ops_per_s']:18,.0f} "
            f"{bw / 1e9:16.2f} {bw / limit:10.3f}"
        )
    print(f"{'memcpy':10s} {'':16s} {'':18s} {limit / 1e9:16.2f} {1.0:10.3f}")
    print(
        "IOMMU map+unmap/s by live mappings: "
        + ", ".join(f"{k}: {v:,.0f}" for k, v in scaling.items())
        + f"  (cost ratio {hi}/{lo} = {ratio_live:.2f}, limit 2)"
    )
    print(
        "IOMMU fresh map/s (allocator, no cache) by live mappings: "
        + ", ".join(f"{k}: {v:,.0f}" for k, v in fresh.items())
        + f"  (cost ratio {hi}/{lo} = {ratio_fresh:.2f})"
    )
    print(
        json.dumps(
            {
                "map_unmap": rates,
                "iommu_map_unmap_by_live": scaling,
                "iommu_cost_ratio_max_over_min_live": ratio_live,
                "iommu_fresh_map_by_live": fresh,
                "iommu_fresh_cost_ratio_max_over_min_live": ratio_fresh,
                "read_1MiB": bandwidth,
                "read_1MiB_vs_memoryview_copy": {
                    k: bandwidth[f"{k}_bytes_per_s"] / limit for k in BACKENDS
                },
            },
            indent=None,
        )
    )


if __name__ == "__main__":
    main()
