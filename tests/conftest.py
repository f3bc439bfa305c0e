"""Shared fixtures: small hosts with every zone, platforms per backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict, Unpack

import pytest

from softrdma.dma.device import Device
from softrdma.dma.platform import Platform
from softrdma.dma.types import DMA_BIT_MASK, DmaBackend
from softrdma.memory.host import Host, MiB

#: The four backends, as (id, platform keyword arguments, device backend).


class PlatformOptions(TypedDict, total=False):
    """The keyword arguments of :class:`Platform` that choose its DMA hardware."""

    swiotlb_size: int | None
    swiotlb_force: bool
    iommu: bool
    iommu_strict: bool
    clock: Callable[[], float]


BACKENDS: dict[str, tuple[PlatformOptions, DmaBackend]] = {
    "direct": ({}, DmaBackend.DIRECT),
    "swiotlb": ({"swiotlb_force": True}, DmaBackend.SWIOTLB),
    "iommu": ({"iommu": True}, DmaBackend.IOMMU),
    "virtual": ({}, DmaBackend.VIRTUAL),
}


def make_host(name: str = "host0") -> Host:
    """64 MiB: 16 MiB DMA32, 32 MiB Normal, 16 MiB HighMem."""
    return Host(64 * MiB, dma32_limit=16 * MiB, lowmem_limit=48 * MiB, name=name)


@pytest.fixture
def host() -> Host:
    return make_host()


DeviceFactory = Callable[..., Device]


def make_device(
    kind: str,
    *,
    coherent: bool = True,
    debug: bool = True,
    dma_mask: int = DMA_BIT_MASK(64),
    **platform_kw: Unpack[PlatformOptions],
) -> Device:
    kw, backend = BACKENDS[kind]
    options: PlatformOptions = {**kw, **platform_kw}
    platform = Platform(make_host(), dma_debug=debug, **options)
    return platform.add_device(f"{kind}0", backend=backend, coherent=coherent, dma_mask=dma_mask)


@pytest.fixture(params=list(BACKENDS))
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)
