"""``pyverbs.dma_util``: DMA ordering barriers and MMIO writes. The
barriers order nothing a simulated device could observe (its engines run
under the device lock), so they are no-ops; there is no MMIO space to
write to (``EOPNOTSUPP``)."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_function

__all__ = [
    "mmio_write32_as_be",
    "mmio_write64_as_be",
    "udma_from_dev_barrier",
    "udma_to_dev_barrier",
]


def udma_to_dev_barrier() -> None:
    """``udma_to_device_barrier``."""


def udma_from_dev_barrier() -> None:
    """``udma_from_device_barrier``."""


mmio_write32_as_be = unsupported_function("mmio_write32_as_be", "MMIO")
mmio_write64_as_be = unsupported_function("mmio_write64_as_be", "MMIO")
