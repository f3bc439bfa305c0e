"""Memory regions and their keys (``struct ib_mr``; ``ib_alloc_mr``,
``ib_map_mr_sg`` / ``ib_sg_to_pages``, ``ib_update_fast_reg_key``,
``ib_dereg_mr``; the HCA side of ``rxe_mr.c``: ``lookup_mr``,
``mr_check_range``, ``rxe_reg_fast_mr``, ``rxe_invalidate_mr``).

A key is ``index << 8 | key byte``: the index names the MR in the device's
table, the byte changes with each fast registration so a stale key stops
working. Two MR types matter to kernel consumers:

* ``IB_MR_TYPE_DMA``: the MR behind a PD's ``local_dma_lkey`` (when the
  device has no reserved one) and its ``unsafe_global_rkey``. Its iova *is*
  a DMA address of the device and every DMA address is inside it — which
  is why a global rkey on a direct-mapped device exposes all memory.
* ``IB_MR_TYPE_MEM_REG``: fast registration. ``map_mr_sg`` builds its page
  list from a DMA-mapped scatterlist; an ``IB_WR_REG_MR`` work request makes
  it valid with a key and access flags; ``IB_WR_LOCAL_INV`` or a peer's
  SEND_WITH_INVALIDATE makes it free again.
"""

from __future__ import annotations

import enum
import errno
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from softrdma.memory.scatterlist import Scatterlist
from softrdma.verbs.enums import (
    IB_DEVICE_FLUSH_GLOBAL,
    IB_DEVICE_FLUSH_PERSISTENT,
    IbAccess,
    IbMrType,
)
from softrdma.verbs.errors import VerbsError

if TYPE_CHECKING:
    from softrdma.verbs.device import IbDevice
    from softrdma.verbs.enums import IbMwType
    from softrdma.verbs.mw import MemoryWindow
    from softrdma.verbs.pd import ProtectionDomain


class MrState(enum.Enum):
    """``enum rxe_mr_state``."""

    INVALID = "invalid"
    FREE = "free"
    VALID = "valid"


class MrKeyError(VerbsError):
    """A key lookup or check failed (the reason is in the message)."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EINVAL, why)


def ib_inc_rkey(rkey: int) -> int:
    """``ib_inc_rkey``: the same MR index with the next key byte."""
    return ((rkey + 1) & 0xFF) | (rkey & ~0xFF & 0xFFFFFFFF)


def ib_check_mr_access(access: int, device_cap_flags: int | None = None) -> None:
    """``ib_check_mr_access``: known flags only; remote write or atomic needs
    local write; FLUSH access needs the device's ``IB_DEVICE_FLUSH_*`` cap
    (``EOPNOTSUPP``) when ``device_cap_flags`` is given (the registration
    paths that have a device).

    ``IB_ACCESS_FLUSH_PERSISTENT`` is refused with ``EINVAL`` on any device:
    softrdma's host memory has no persistent memory, and rxe refuses to
    register pages that are not pmem with that flag
    (``rxe_mr_fill_pages_from_sgt``: "Page can't be persistent")."""
    if access & ~(
        IbAccess.LOCAL_WRITE
        | IbAccess.REMOTE_WRITE
        | IbAccess.REMOTE_READ
        | IbAccess.REMOTE_ATOMIC
        | IbAccess.MW_BIND
        | IbAccess.ZERO_BASED
        | IbAccess.FLUSH_GLOBAL
        | IbAccess.FLUSH_PERSISTENT
    ):
        raise VerbsError(errno.EINVAL, f"unsupported access flags {access:#x}")
    if (
        access & (IbAccess.REMOTE_WRITE | IbAccess.REMOTE_ATOMIC)
        and not access & IbAccess.LOCAL_WRITE
    ):
        raise VerbsError(errno.EINVAL, "REMOTE_WRITE / REMOTE_ATOMIC need LOCAL_WRITE")
    if device_cap_flags is not None and (
        (access & IbAccess.FLUSH_GLOBAL and not device_cap_flags & IB_DEVICE_FLUSH_GLOBAL)
        or (
            access & IbAccess.FLUSH_PERSISTENT and not device_cap_flags & IB_DEVICE_FLUSH_PERSISTENT
        )
    ):
        raise VerbsError(errno.EOPNOTSUPP, "the device does not support this FLUSH access")
    if access & IbAccess.FLUSH_PERSISTENT:
        raise VerbsError(
            errno.EINVAL, "IB_ACCESS_FLUSH_PERSISTENT needs persistent memory; the host has none"
        )


class MemoryRegion:
    """``struct ib_mr`` with the HCA's state (``struct rxe_mr``)."""

    def __init__(
        self,
        pd: ProtectionDomain,
        mr_type: IbMrType,
        index: int,
        key: int,
        access: IbAccess,
        max_num_sg: int = 0,
    ) -> None:
        self.pd = pd
        self.device: IbDevice = pd.device
        self.type = mr_type
        self.index = index
        self.lkey = self.rkey = index << 8 | key
        self.access = access
        self.max_num_sg = max_num_sg
        self.iova = 0
        self.length = 0
        self.page_size = 0
        self.page_list: list[int] = []  # DMA address of each page
        self.state = MrState.VALID if mr_type == IbMrType.DMA else MrState.FREE
        self.need_inval = False
        self.deregistered = False
        self.num_mw = 0
        """Memory windows bound to it (``mr->num_mw``): no deregistration
        while any is."""

    def __repr__(self) -> str:
        return (
            f"MemoryRegion({self.type.name}, lkey={self.lkey:#x}, rkey={self.rkey:#x}, "
            f"iova={self.iova:#x}, length={self.length:#x}, {self.state.value})"
        )

    # -- ib_map_mr_sg ---------------------------------------------------------

    def map_sg(
        self,
        sgl: Scatterlist,
        sg_nents: int | None = None,
        sg_offset: int = 0,
        page_size: int = 4096,
    ) -> int:
        """``ib_map_mr_sg``: build the page list from the DMA segments of a
        mapped scatterlist (``ib_sg_to_pages``); returns how many segments
        were mapped (the largest prefix that fits). The MR must not be valid."""
        if self.type != IbMrType.MEM_REG:
            raise VerbsError(errno.EINVAL, "map_mr_sg needs an IB_MR_TYPE_MEM_REG MR")
        if self.state == MrState.VALID:
            raise VerbsError(errno.EINVAL, f"MR {self.rkey:#x} is still valid: invalidate it first")
        if page_size & (page_size - 1) or page_size < 4096:
            raise VerbsError(errno.EINVAL, f"bad page size {page_size}")
        segs = sgl.dma_segments()
        nents = len(segs) if sg_nents is None else min(sg_nents, len(segs))
        if nents <= 0 or sg_offset >= segs[0][1]:
            raise VerbsError(errno.EINVAL, "no DMA segments, or sg_offset beyond the first")
        mask = page_size - 1
        pages: list[int] = []
        self.page_size = page_size
        self.iova = segs[0][0] + sg_offset
        length = 0
        last_end = None
        mapped = 0
        for i, (dma, dma_len) in enumerate(segs[:nents]):
            if i == 0:
                dma, dma_len = dma + sg_offset, dma_len - sg_offset
            end = dma + dma_len
            if last_end is not None and (last_end & mask or dma & mask):
                if last_end != dma:
                    break  # a gap that is not page aligned ends the prefix
                # virtually contiguous with the previous segment: coalesce
                first_page = (dma + mask) & ~mask if dma & mask else dma
            else:
                first_page = dma & ~mask
            new = list(range(first_page, end, page_size))
            if len(pages) + len(new) > self.max_num_sg:
                break
            pages.extend(new)
            length += dma_len
            last_end = end
            mapped += 1
        self.page_list = pages
        self.length = length
        return mapped

    # -- translation (rxe_mr.c) -------------------------------------------------

    def check_range(self, iova: int, length: int) -> bool:
        """``mr_check_range``: a DMA MR covers every address."""
        if self.type == IbMrType.DMA:
            return True
        return self.iova <= iova and iova + length <= self.iova + self.length

    def dma_segments(self, iova: int, length: int) -> Iterator[tuple[int, int]]:
        """The DMA addresses behind ``[iova, iova + length)``, as runs that do
        not cross an MR page (``rxe_mr_copy`` walks the same way)."""
        if self.type == IbMrType.DMA:
            yield iova, length
            return
        size = self.page_size
        base = self.iova & ~(size - 1)
        pos, end = iova, iova + length
        pages = self.page_list
        while pos < end:
            index, offset = divmod(pos - base, size)
            chunk = min(size - offset, end - pos)
            start = pages[index] + offset
            yield start, chunk
            pos += chunk


class MrTable:
    """A device's MR pool (``rxe_pool``): indices become key indices."""

    def __init__(self, first_index: int = 1, seed: int = 0) -> None:
        self._mrs: dict[int, MemoryRegion] = {}
        self._mws: dict[int, MemoryWindow] = {}
        """Memory windows, in the same index space (``rxe``'s MW pool)."""
        self._next = first_index
        self._rng = random.Random(seed)

    def new_key_byte(self, avoid: int | None = None) -> int:
        """``rxe_get_next_key``: a random key byte, not the last one."""
        while True:
            key = self._rng.randrange(256)
            if key != avoid:
                return key

    def add(
        self, pd: ProtectionDomain, mr_type: IbMrType, access: IbAccess, max_num_sg: int = 0
    ) -> MemoryRegion:
        index = self._next
        if index >= 1 << 24:
            raise VerbsError(errno.ENOMEM, "MR index space exhausted")
        self._next += 1
        mr = MemoryRegion(pd, mr_type, index, self.new_key_byte(), access, max_num_sg)
        self._mrs[index] = mr
        return mr

    def remove(self, mr: MemoryRegion) -> None:
        del self._mrs[mr.index]

    def add_mw(self, pd: ProtectionDomain, mw_type: IbMwType) -> MemoryWindow:
        """A new memory window (``rxe_alloc_mw``): the next index, a random
        key byte."""
        from softrdma.verbs.mw import MemoryWindow

        index = self._next
        if index >= 1 << 24:
            raise VerbsError(errno.ENOMEM, "key index space exhausted")
        self._next += 1
        mw = MemoryWindow(pd, mw_type, index, self.new_key_byte())
        self._mws[index] = mw
        return mw

    def remove_mw(self, mw: MemoryWindow) -> None:
        del self._mws[mw.index]

    def mw(self, key: int) -> MemoryWindow | None:
        """The memory window whose index ``key`` carries, if any (``rkey_is_mw``)."""
        return self._mws.get(key >> 8) if self._mws else None

    @property
    def num_mws(self) -> int:
        return len(self._mws)

    def __len__(self) -> int:
        return len(self._mrs)

    def lookup(self, key: int, pd: ProtectionDomain, access: int, remote: bool) -> MemoryRegion:
        """``lookup_mr``: the MR a key names, if the key matches, the PD is
        the QP's, the access is allowed and the MR is valid."""
        mr = self._mrs.get(key >> 8)
        kind = "rkey" if remote else "lkey"
        if mr is None or (mr.rkey if remote else mr.lkey) != key:
            raise MrKeyError(f"{kind} {key:#x} names no MR")
        # Plain ints here: IntFlag arithmetic costs on every packet.
        if mr.pd is not pd:
            raise MrKeyError(f"{kind} {key:#x} belongs to another PD")
        if int(access) & ~int(mr.access):
            missing = IbAccess(int(access) & ~int(mr.access))
            raise MrKeyError(f"{kind} {key:#x} lacks {missing!r}")
        if mr.state != MrState.VALID:
            raise MrKeyError(f"{kind} {key:#x} is {mr.state.value}")
        return mr

    def reg_fast_mr(
        self, pd: ProtectionDomain, mr: MemoryRegion | None, key: int, access: IbAccess
    ) -> None:
        """``rxe_reg_fast_mr`` (IB_WR_REG_MR)."""
        if mr is None or mr.deregistered or self._mrs.get(mr.index) is not mr:
            raise MrKeyError("REG_MR of an MR that does not exist")
        if mr.type != IbMrType.MEM_REG:
            raise MrKeyError("REG_MR needs a fast-registration MR")
        if mr.state != MrState.FREE:
            raise MrKeyError(f"REG_MR of MR {mr.rkey:#x} in state {mr.state.value}")
        if mr.pd is not pd:
            raise MrKeyError("REG_MR of an MR of another PD")
        if (key ^ mr.lkey) & ~0xFF:
            raise MrKeyError(f"REG_MR key {key:#x} changes more than the key byte of {mr.lkey:#x}")
        try:
            ib_check_mr_access(access)
        except VerbsError as e:  # a bad work request: it completes in error
            raise MrKeyError(f"REG_MR access: {e}") from None
        mr.access = access
        mr.lkey = mr.rkey = key
        mr.state = MrState.VALID

    def invalidate(self, pd: ProtectionDomain, key: int, remote: bool) -> MemoryRegion:
        """``rxe_invalidate_mr``: LOCAL_INV or SEND_WITH_INVALIDATE."""
        mr = self._mrs.get(key >> 8)
        if mr is None or key not in (mr.rkey, mr.lkey):
            raise MrKeyError(f"invalidate of key {key:#x}, which names no MR")
        if remote and mr.rkey != key:
            raise MrKeyError(f"remote invalidate with lkey {key:#x}")
        if mr.pd is not pd:
            raise MrKeyError(f"invalidate of key {key:#x} from another PD")
        if mr.type != IbMrType.MEM_REG:
            raise MrKeyError(f"key {key:#x} is not a fast-registration MR")
        mr.state = MrState.FREE
        return mr
