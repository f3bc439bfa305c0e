"""Protection domains (``struct ib_pd``, ``__ib_alloc_pd``,
``ib_dealloc_pd``).

Every PD has a ``local_dma_lkey``: an lkey under which an SGE may name any
DMA address of the device — the device's reserved key when it has one
(``IBK_LOCAL_DMA_LKEY``), else the lkey of an internal DMA MR (rxe).
``IB_PD_UNSAFE_GLOBAL_RKEY`` adds ``unsafe_global_rkey``: remote read and
write access to every DMA address of the device, the successor of
``ib_get_dma_mr``. On a direct-mapped device that is all of host memory; on
a device behind an IOMMU it is whatever is mapped at the time.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from softrdma.verbs.enums import IbAccess, IbPdFlags
from softrdma.verbs.errors import VerbsError

if TYPE_CHECKING:
    from softrdma.verbs.device import IbDevice
    from softrdma.verbs.mr import MemoryRegion

log = logging.getLogger("softrdma.verbs")


class ProtectionDomain:
    """``struct ib_pd``. Create with ``device.alloc_pd(flags)``."""

    def __init__(self, device: IbDevice, flags: IbPdFlags) -> None:
        from softrdma.verbs.device import IBK_LOCAL_DMA_LKEY

        self.device = device
        self.flags = flags
        self.unsafe_global_rkey = 0
        self.internal_mr: MemoryRegion | None = None
        self.usecnt = 0
        self.deallocated = False
        access = IbAccess(0)
        if device.attrs.kernel_cap_flags & IBK_LOCAL_DMA_LKEY:
            self.local_dma_lkey = device.local_dma_lkey
        else:
            access |= IbAccess.LOCAL_WRITE
        if flags & IbPdFlags.UNSAFE_GLOBAL_RKEY:
            log.warning("%s: enabling unsafe global rkey", device.name)
            access |= IbAccess.REMOTE_READ | IbAccess.REMOTE_WRITE | IbAccess.LOCAL_WRITE
        if access:
            mr = device.get_dma_mr(self, access)
            self.internal_mr = mr
            if not device.attrs.kernel_cap_flags & IBK_LOCAL_DMA_LKEY:
                self.local_dma_lkey = mr.lkey
            if flags & IbPdFlags.UNSAFE_GLOBAL_RKEY:
                self.unsafe_global_rkey = mr.rkey

    def __repr__(self) -> str:
        return f"ProtectionDomain({self.device.name}, local_dma_lkey={self.local_dma_lkey:#x})"

    def dealloc(self) -> None:
        """``ib_dealloc_pd``: every QP, MR and AH of the PD must be gone."""
        if self.deallocated:
            raise VerbsError(errno.EINVAL, "PD already deallocated")
        if self.usecnt:
            raise VerbsError(errno.EBUSY, f"PD still has {self.usecnt} objects")
        if self.internal_mr is not None:
            self.device.dereg_mr(self.internal_mr)
            self.internal_mr = None
        self.deallocated = True
        self.device._forget_pd(self)
