"""Device memory (``struct ib_dm``: ``ops.alloc_dm`` / ``ops.dealloc_dm``,
``ops.reg_dm_mr``; in user space ``ibv_alloc_dm``, ``ibv_memcpy_to_dm``,
``ibv_memcpy_from_dm``, ``ibv_reg_dm_mr``).

Device memory is memory of the device itself (mlx5's MEMIC): the device
reaches it without the host's DMA mapping, the CPU through a window the
device exposes, 4 bytes at a time. softrdma backs a device's memory with a
coherent allocation of its bus device — one DMA address range the device
reaches directly — and caps it at :data:`DM_MAX_SIZE` per device. An MR on
device memory is zero-based (its iova 0 is the first byte registered), as
mlx5 requires of DM MRs.
"""

from __future__ import annotations

import errno
import weakref
from dataclasses import dataclass, field

from softrdma.memory.layout import PAGE_SIZE, BytesLike
from softrdma.memory.scatterlist import Scatterlist
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import ib_dma_alloc_coherent, ib_dma_free_coherent
from softrdma.verbs.enums import IbAccess, IbMrType
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.mr import MemoryRegion, MrState, ib_check_mr_access
from softrdma.verbs.pd import ProtectionDomain

__all__ = [
    "DM_ACCESS_ALIGN",
    "DM_MAX_SIZE",
    "IbDm",
    "dm_available",
    "ib_alloc_dm",
    "ib_dereg_dm_mr",
    "ib_reg_dm_mr",
]

#: Device memory per device (``max_dm_size``): a MEMIC-sized window.
DM_MAX_SIZE = 256 * 1024
#: CPU accesses to device memory are whole 32-bit words.
DM_ACCESS_ALIGN = 4

_USED: weakref.WeakKeyDictionary[IbDevice, int] = weakref.WeakKeyDictionary()


def dm_available(device: IbDevice) -> int:
    """Bytes of device memory not allocated."""
    return DM_MAX_SIZE - _USED.get(device, 0)


@dataclass(eq=False)
class IbDm:
    """``struct ib_dm``: ``length`` bytes of ``device``'s memory at DMA
    address ``dma`` (``size`` allocated, whole pages)."""

    device: IbDevice
    length: int
    size: int
    kva: int
    dma: int
    usecnt: int = 0
    freed: bool = field(default=False)

    def _check(self, offset: int, length: int, what: str) -> None:
        if self.freed:
            raise VerbsError(errno.EINVAL, f"{what}: device memory is freed")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise VerbsError(
                errno.EINVAL, f"{what}: {length} bytes at {offset} outside {self.length}"
            )
        if offset % DM_ACCESS_ALIGN or length % DM_ACCESS_ALIGN:
            raise VerbsError(errno.EINVAL, f"{what}: offset and length must be 4-byte multiples")

    def copy_to(self, offset: int, data: BytesLike) -> None:
        """``ibv_memcpy_to_dm``: store ``data`` at ``offset``."""
        self._check(offset, len(data), "memcpy to device memory")
        self.device.host.cpu_write(self.kva + offset, data)

    def copy_from(self, offset: int, length: int) -> bytes:
        """``ibv_memcpy_from_dm``: ``length`` bytes at ``offset``."""
        self._check(offset, length, "memcpy from device memory")
        return bytes(self.device.host.cpu_read(self.kva + offset, length))

    def free(self) -> None:
        """``ops.dealloc_dm``: no MR may still use it (idempotent)."""
        if self.freed:
            return
        if self.usecnt:
            raise VerbsError(errno.EBUSY, f"device memory still has {self.usecnt} MRs")
        self.freed = True
        ib_dma_free_coherent(self.device, self.size, self.kva, self.dma)
        _USED[self.device] = _USED.get(self.device, 0) - self.size


def ib_alloc_dm(device: IbDevice, length: int) -> IbDm:
    """``ops.alloc_dm``: ``length`` bytes of device memory, zeroed. Raises
    :class:`VerbsError`: ``EINVAL`` for a length that is not positive,
    ``ENOMEM`` beyond what is left of :data:`DM_MAX_SIZE`."""
    if length <= 0:
        raise VerbsError(errno.EINVAL, f"device memory of {length} bytes")
    size = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if size > dm_available(device):
        raise VerbsError(
            errno.ENOMEM, f"{length} bytes of device memory: {dm_available(device)} available"
        )
    got = ib_dma_alloc_coherent(device, size)
    if got is None:
        raise VerbsError(errno.ENOMEM, f"no memory behind {length} bytes of device memory")
    kva, dma = got
    _USED[device] = _USED.get(device, 0) + size
    return IbDm(device, length, size, kva, dma)


def ib_reg_dm_mr(
    pd: ProtectionDomain, dm: IbDm, offset: int, length: int, access: IbAccess
) -> MemoryRegion:
    """``ops.reg_dm_mr``: a zero-based MR over ``length`` bytes (0 allowed,
    as mlx5 allows it) of ``dm`` from ``offset`` (page aligned). Raises :class:`VerbsError` (``EINVAL``)
    for a range outside the allocation, an unaligned offset, access flags
    without ``IB_ACCESS_ZERO_BASED`` or that ``ib_check_mr_access`` refuses."""
    ib_check_mr_access(access)
    if not access & IbAccess.ZERO_BASED:
        raise VerbsError(errno.EINVAL, "a device-memory MR is zero-based")
    if dm.freed or dm.device is not pd.device:
        raise VerbsError(errno.EINVAL, "device memory freed, or of another device")
    if length < 0 or offset < 0 or offset + length > dm.length or offset % PAGE_SIZE:
        raise VerbsError(
            errno.EINVAL, f"DM MR of {length} bytes at {offset} in {dm.length} (page aligned)"
        )
    device = pd.device
    # the device reaches its memory directly: one segment at its address
    sgl = Scatterlist.from_buffer(device.host, dm.kva, dm.size)
    if len(sgl) != 1:
        raise VerbsError(errno.EINVAL, "device memory is not contiguous")
    sgl.entries[0].dma_address = dm.dma
    sgl.entries[0].dma_length = dm.size
    sgl.nents = 1
    npages = (dm.size - offset) // PAGE_SIZE
    with device.lock:
        if len(device.mr_table) >= device.attrs.max_mr:
            raise VerbsError(errno.ENOMEM, "max_mr reached")
        mr = device.mr_table.add(pd, IbMrType.MEM_REG, access, max_num_sg=npages)
        try:
            if mr.map_sg(sgl, sg_offset=offset) != 1:
                raise VerbsError(errno.EINVAL, "device memory does not form a page list")
        except VerbsError:
            device.mr_table.remove(mr)
            raise
        mr.iova = 0
        mr.length = length
        mr.state = MrState.VALID
        pd.usecnt += 1
        dm.usecnt += 1
    return mr


def ib_dereg_dm_mr(mr: MemoryRegion, dm: IbDm) -> None:
    """``ib_dereg_mr`` of a device-memory MR."""
    mr.device.dereg_mr(mr)
    dm.usecnt -= 1
