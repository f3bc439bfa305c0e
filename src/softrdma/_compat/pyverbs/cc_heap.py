"""The ``system_cc_shared`` dma-buf heap of a confidential-computing guest:
memory shared with the host (decrypted), which a device whose DMA is
bounced (``IBV_DEVICE_CC_DMA_BOUNCE``) reaches directly.

In such a guest, private memory is invisible to devices: streaming DMA
bounces through swiotlb, which an RDMA device cannot use for registered
memory. What it can use is shared memory, which ``dma_alloc_coherent``
gives in the guest (``dma_set_decrypted``). A buffer of this heap is such
an allocation for the device, mapped into the process as a dma-buf's
``mmap`` does (a ``VM_PFNMAP`` mapping: the heap owns the frames) and
registered by import (:func:`~softrdma.verbs.umem.ib_umem_dmabuf_get`),
never by pinning. ``ibv_alloc_buf`` on a parent domain created with
``IBV_PARENT_DOMAIN_INIT_ATTR_ALLOW_CC_UNPROTECTED_ALLOC`` allocates here.

Kernel counterparts: ``drivers/dma-buf/heaps/``, ``kernel/dma/direct.c``
(``dma_direct_alloc`` with ``force_dma_unencrypted``).
"""

from __future__ import annotations

import errno

from pyverbs.pyverbs_error import PyverbsRDMAError
from softrdma.memory.layout import PAGE_SHIFT, PAGE_SIZE
from softrdma.memory.mm import MmStruct, VmError
from softrdma.memory.page import Page
from softrdma.verbs.device import IbDevice
from softrdma.verbs.enums import IbAccess
from softrdma.verbs.umem import IbUmem, ib_umem_dmabuf_get

__all__ = ["CcSharedBuffer"]


class CcSharedBuffer:
    """One heap buffer of ``size`` bytes (whole pages) for ``device``,
    mapped at user address :attr:`addr` of ``mm``. Raises
    :class:`PyverbsRDMAError` (``ENOMEM``) when the device cannot get the
    memory or the address space has no room."""

    def __init__(self, device: IbDevice, mm: MmStruct, size: int) -> None:
        self.device = device
        self.mm = mm
        self.length = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        dma_dev = device.dma_device
        got = dma_dev.alloc_coherent(self.length)
        if got is None:
            raise PyverbsRDMAError(
                f"Failed to allocate {self.length} bytes of the CC shared heap", errno.ENOMEM
            )
        self.kva, self.dma = got
        host = dma_dev.host
        first = host.virt_to_page(self.kva)
        self.pages: list[Page] = [
            host.pfn_to_page(first.pfn + i) for i in range(self.length >> PAGE_SHIFT)
        ]
        try:
            self.addr = mm.mmap_pages(self.pages)
        except VmError as ex:
            dma_dev.free_coherent(self.length, self.kva, self.dma)
            raise PyverbsRDMAError("Failed to map the CC shared buffer", ex.errno) from None
        self.freed = False

    def import_range(self, addr: int, length: int, access: IbAccess) -> IbUmem:
        """The device's dma-buf import of ``length`` bytes at user address
        ``addr`` inside the buffer (``ibv_reg_dmabuf_mr`` of its fd)."""
        offset = addr - self.addr
        if self.freed or offset < 0 or length <= 0 or offset + length > self.length:
            raise PyverbsRDMAError(
                f"{length} bytes at {addr:#x} are not in the CC shared buffer", errno.EINVAL
            )
        first = offset >> PAGE_SHIFT
        return ib_umem_dmabuf_get(
            self.device,
            self.mm,
            addr,
            length,
            access,
            self.pages[first:],
            self.dma + (first << PAGE_SHIFT),
        )

    def free(self) -> None:
        """Unmap the buffer and give its memory back (idempotent)."""
        if self.freed:
            return
        self.freed = True
        self.mm.munmap(self.addr, self.length)
        self.device.dma_device.free_coherent(self.length, self.kva, self.dma)
