"""Information-unit buffers: the small messages an upper-layer protocol
sends and receives (SRP IUs, iSER PDUs), each in ``kmalloc``'ed memory
mapped once for the device's lifetime of the buffer, synced around every
CPU access.

Kernel counterparts: ib_srp.c ``srp_alloc_iu`` / ``srp_free_iu`` and
ib_srpt.c ``srpt_alloc_ioctx`` / ``srpt_free_ioctx`` (``kmalloc`` +
``ib_dma_map_single``), with the syncs ib_srp does around an IU
(``ib_dma_sync_single_for_cpu`` before the CPU fills or reads it,
``ib_dma_sync_single_for_device`` before the device gets it). On a
non-coherent device or behind swiotlb, forgetting one of those syncs gives
stale bytes — which is why every access goes through :meth:`IuBuf.write`
and :meth:`IuBuf.read`.
"""

from __future__ import annotations

from softrdma.dma.types import DmaDirection
from softrdma.errors import SoftRdmaError
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import (
    ib_dma_map_single,
    ib_dma_mapping_error,
    ib_dma_sync_single_for_cpu,
    ib_dma_sync_single_for_device,
    ib_dma_unmap_single,
)
from softrdma.verbs.wr import Sge

__all__ = ["IuBuf", "IuMapError", "alloc_iu_ring", "free_iu_ring"]


class IuMapError(SoftRdmaError):
    """``ib_dma_map_single`` failed for an IU buffer (``-ENOMEM`` in the
    kernel): the buffer was freed again."""


class IuBuf:
    """``struct srp_iu`` / ``struct srpt_ioctx``: ``size`` bytes of
    ``kmalloc`` memory mapped ``direction`` for ``dev``."""

    def __init__(self, dev: IbDevice, size: int, direction: DmaDirection, index: int = 0) -> None:
        self.dev = dev
        self.size = size
        self.direction = direction
        self.index = index
        self.kva = dev.host.kmalloc(size)
        self.dma = ib_dma_map_single(dev, self.kva, size, direction)
        if ib_dma_mapping_error(dev, self.dma):
            dev.host.kfree(self.kva)
            raise IuMapError(f"{dev.name}: cannot map a {size}-byte IU buffer")
        self.freed = False

    def __repr__(self) -> str:
        return f"IuBuf({self.index}, {self.size} bytes, dma={self.dma:#x})"

    def sge(self, lkey: int, length: int | None = None) -> Sge:
        """The SGE for the first ``length`` bytes (all by default)."""
        return Sge(self.dma, self.size if length is None else length, lkey)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Fill the buffer for the device to send: sync for the CPU, write,
        sync for the device (ib_srp's ``srp_post_send`` path)."""
        if len(data) > self.size:
            raise ValueError(f"{len(data)} bytes do not fit an IU of {self.size}")
        ib_dma_sync_single_for_cpu(self.dev, self.dma, self.size, self.direction)
        self.dev.host.cpu_write(self.kva, data)
        ib_dma_sync_single_for_device(self.dev, self.dma, self.size, self.direction)

    def read(self, length: int) -> bytes:
        """What the device wrote (a receive completion of ``length``
        bytes): sync for the CPU, copy out, hand the buffer back to the
        device."""
        length = min(length, self.size)
        ib_dma_sync_single_for_cpu(self.dev, self.dma, self.size, self.direction)
        data = bytes(self.dev.host.cpu_read(self.kva, length))
        ib_dma_sync_single_for_device(self.dev, self.dma, self.size, self.direction)
        return data

    def free(self) -> None:
        """Unmap and ``kfree``; idempotent."""
        if not self.freed:
            self.freed = True
            ib_dma_unmap_single(self.dev, self.dma, self.size, self.direction)
            self.dev.host.kfree(self.kva)


def alloc_iu_ring(dev: IbDevice, count: int, size: int, direction: DmaDirection) -> list[IuBuf]:
    """``srp_alloc_iu`` / ``srpt_alloc_ioctx_ring``: ``count`` buffers;
    on a mapping failure the ones made so far are freed and
    :class:`IuMapError` raised."""
    ring: list[IuBuf] = []
    try:
        for i in range(count):
            ring.append(IuBuf(dev, size, direction, i))
    except IuMapError:
        free_iu_ring(ring)
        raise
    return ring


def free_iu_ring(ring: list[IuBuf]) -> None:
    """``srp_free_iu`` for each buffer."""
    for iu in ring:
        iu.free()
