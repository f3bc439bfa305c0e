"""A user address space: the memory of one simulated process on a host
(``struct mm_struct``, ``struct vm_area_struct``; ``mmap`` / ``munmap`` of
anonymous memory, ``copy_from_user`` / ``copy_to_user``,
``pin_user_pages`` / ``unpin_user_pages``).

User virtual addresses are plain integers in the lower half of the
address space (below ``TASK_SIZE``), never mixed with kernel addresses:
each mapping (a VMA) is page-granular and backed by page frames of the
host, one order-0 page per user page, allocated when the mapping is made
(``MAP_POPULATE``: the model has no page faults). A page is freed when it
is unmapped *and* no longer pinned, so memory registered for RDMA stays
valid for the device even after the process unmaps it — as with
``FOLL_LONGTERM`` pins in the kernel.

A mapping change tells the MMU notifiers first
(:meth:`MmStruct.mmu_notifier_register`, ``mmu_interval_notifier``), so a
device that maps user pages without pinning them (on-demand paging) stops
using a page before it is freed.

A driver's or a dma-buf exporter's ``mmap`` maps frames it owns instead
(:meth:`MmStruct.mmap_pages`, ``remap_pfn_range``: a ``VM_PFNMAP`` VMA):
unmapping leaves them to their owner, and they cannot be pinned.

Kernel counterparts: ``mm/mmap.c``, ``mm/gup.c``, ``include/linux/mm_types.h``.
"""

from __future__ import annotations

import bisect
import errno
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from softrdma.errors import AddressError, SoftRdmaError
from softrdma.memory.host import Host
from softrdma.memory.layout import PAGE_SHIFT, PAGE_SIZE, BytesLike
from softrdma.memory.page import GFP_KERNEL, Gfp, Page

#: ``TASK_SIZE`` of x86-64 with 4-level paging: the end of user space.
TASK_SIZE = 0x0000_7FFF_FFFF_F000
#: Where ``mmap`` starts placing anonymous mappings (below the stack gap).
MMAP_BASE = 0x0000_7F00_0000_0000
#: The lowest address ``mmap`` hands out (``mmap_min_addr``).
MMAP_MIN_ADDR = 0x10000

__all__ = [
    "MMAP_BASE",
    "TASK_SIZE",
    "MmStruct",
    "UserAddressError",
    "VmArea",
    "VmError",
]


class UserAddressError(AddressError):
    """A user virtual address that no mapping covers (the kernel's
    ``-EFAULT`` of ``copy_from_user`` and ``SIGSEGV`` of a user access)."""

    def __init__(self, address: int, why: str) -> None:
        super().__init__("uva", address, why)


class VmError(SoftRdmaError):
    """``mmap`` / ``munmap`` / pinning failed; ``errno`` says why."""

    def __init__(self, err: int, why: str) -> None:
        super().__init__(why)
        self.errno = err


@dataclass(eq=False)
class VmArea:
    """``struct vm_area_struct``: ``[start, end)`` with one frame a page."""

    start: int
    end: int
    pages: list[Page] = field(default_factory=list)
    pfnmap: bool = False
    """``VM_PFNMAP``: the frames belong to whoever mapped them."""

    def __repr__(self) -> str:
        kind = ", pfnmap" if self.pfnmap else ""
        return f"VmArea({self.start:#x}-{self.end:#x}, {len(self.pages)} pages{kind})"


class MmStruct:
    """``struct mm_struct``: the address space of one process on ``host``.

    ``gfp`` is how its pages are allocated (``GFP_HIGHUSER_MOVABLE`` in the
    kernel; the default here is lowmem, a 64-bit host having no highmem)."""

    def __init__(self, host: Host, *, gfp: Gfp = GFP_KERNEL, name: str = "mm") -> None:
        self.host = host
        self.gfp = gfp
        self.name = name
        self._starts: list[int] = []  # sorted VMA starts
        self._vmas: dict[int, VmArea] = {}
        self._next = MMAP_BASE
        self._pins: Counter[int] = Counter()  # pfn -> pin count
        self._orphans: set[int] = set()  # unmapped but still pinned pfns
        # token -> (start, end, invalidate(start, end)) of interval notifiers
        self._notifiers: dict[int, tuple[int, int, Callable[[int, int], None]]] = {}
        self._tokens = itertools.count(1)
        self.total_vm = 0
        """Mapped pages (``mm->total_vm``)."""
        self.pinned_vm = 0
        """Pinned pages (``mm->pinned_vm``)."""

    def __repr__(self) -> str:
        return f"MmStruct({self.name!r}, {len(self._vmas)} VMAs, {self.total_vm} pages)"

    # -- mappings ------------------------------------------------------------

    def find_vma(self, addr: int) -> VmArea | None:
        """``find_vma`` narrowed to the VMA that contains ``addr``."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        vma = self._vmas[self._starts[i]]
        return vma if addr < vma.end else None

    def _free_range(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0 and self._vmas[self._starts[i]].end > start:
            return False
        j = bisect.bisect_left(self._starts, start)
        return j >= len(self._starts) or self._starts[j] >= end

    def mmap(self, length: int, *, addr: int | None = None, zero: bool = True) -> int:
        """``mmap(addr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE |
        MAP_ANONYMOUS | MAP_POPULATE)``: the start of a new mapping of
        ``length`` bytes rounded up to pages; with ``addr`` (page aligned),
        exactly there (``MAP_FIXED_NOREPLACE``). Raises :class:`VmError`
        (``EINVAL``, ``EEXIST``, ``ENOMEM``)."""
        if length <= 0 or length > TASK_SIZE:
            raise VmError(errno.EINVAL, f"mmap of {length} bytes")
        size = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if addr is None:
            start = self._get_unmapped_area(size)
        else:
            if addr % PAGE_SIZE or addr < MMAP_MIN_ADDR or addr + size > TASK_SIZE:
                raise VmError(errno.EINVAL, f"mmap at {addr:#x}: not a page-aligned user address")
            if not self._free_range(addr, addr + size):
                raise VmError(errno.EEXIST, f"mmap at {addr:#x}: range already mapped")
            start = addr
        npages = size >> PAGE_SHIFT
        pages: list[Page] = []
        gfp = self.gfp | Gfp.ZERO if zero else self.gfp
        try:
            for _ in range(npages):
                pages.append(self.host.alloc_pages(0, gfp, owner=f"{self.name} user page"))
        except SoftRdmaError as e:
            for p in pages:
                self.host.free_pages(p, 0)
            raise VmError(errno.ENOMEM, f"mmap of {size} bytes: {e}") from e
        vma = VmArea(start, start + size, pages)
        bisect.insort(self._starts, start)
        self._vmas[start] = vma
        self.total_vm += npages
        if addr is None:
            self._next = vma.end
        return start

    def _get_unmapped_area(self, size: int) -> int:
        """``get_unmapped_area``: the first free ``size`` bytes from the
        mmap base on. Raises :class:`VmError` (``ENOMEM``) when none is left."""
        start = self._next
        while not self._free_range(start, start + size):
            vma = self.find_vma(start)
            start = vma.end if vma is not None else start + PAGE_SIZE
            if start + size > TASK_SIZE:
                raise VmError(errno.ENOMEM, "no room in the user address space")
        return start

    def mmap_pages(self, pages: list[Page]) -> int:
        """``remap_pfn_range`` in a driver's ``mmap``: a new ``VM_PFNMAP``
        mapping of ``pages`` (owned by the caller, who frees them after the
        mapping is gone). Raises :class:`VmError` (``EINVAL``, ``ENOMEM``)."""
        if not pages:
            raise VmError(errno.EINVAL, "mmap of no pages")
        size = len(pages) << PAGE_SHIFT
        start = self._get_unmapped_area(size)
        self._insert(VmArea(start, start + size, list(pages), pfnmap=True))
        self.total_vm += len(pages)
        self._next = start + size
        return start

    def munmap(self, addr: int, length: int) -> None:
        """``munmap``: remove whole mappings or page ranges of them. Pinned
        pages stay allocated until :meth:`unpin_user_pages`."""
        if addr % PAGE_SIZE or length <= 0:
            raise VmError(errno.EINVAL, f"munmap({addr:#x}, {length}): bad range")
        end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        # mmu_notifier_invalidate_range_start: before any frame goes
        for lo, hi, invalidate in list(self._notifiers.values()):
            if lo < end and addr < hi:
                invalidate(max(lo, addr), min(hi, end))
        for start in [s for s in self._starts if s < end and self._vmas[s].end > addr]:
            vma = self._vmas.pop(start)
            self._starts.remove(start)
            lo, hi = max(vma.start, addr), min(vma.end, end)
            first, last = (lo - vma.start) >> PAGE_SHIFT, (hi - vma.start) >> PAGE_SHIFT
            if not vma.pfnmap:
                for page in vma.pages[first:last]:
                    self._release(page)
            self.total_vm -= last - first
            # keep what is left on either side as VMAs of their own
            if vma.start < lo:
                self._insert(VmArea(vma.start, lo, vma.pages[:first], vma.pfnmap))
            if hi < vma.end:
                self._insert(VmArea(hi, vma.end, vma.pages[last:], vma.pfnmap))

    def _insert(self, vma: VmArea) -> None:
        bisect.insort(self._starts, vma.start)
        self._vmas[vma.start] = vma

    def _release(self, page: Page) -> None:
        if self._pins[page.pfn]:
            self._orphans.add(page.pfn)
        else:
            self.host.free_pages(page, 0)

    # -- MMU notifiers and page walks (mm/mmu_notifier.c, mm/hmm.c) -------------

    def mmu_notifier_register(
        self, start: int, length: int, invalidate: Callable[[int, int], None]
    ) -> int:
        """``mmu_interval_notifier_insert``: ``invalidate(lo, hi)`` is called
        before any page of ``[start, start + length)`` is unmapped (with the
        part of the range that goes). Returns the token to unregister with."""
        if length <= 0:
            raise VmError(errno.EINVAL, f"notifier of {length} bytes")
        token = next(self._tokens)
        self._notifiers[token] = (start, start + length, invalidate)
        return token

    def mmu_notifier_unregister(self, token: int) -> None:
        """``mmu_interval_notifier_remove`` (idempotent)."""
        self._notifiers.pop(token, None)

    def follow_page(self, addr: int) -> Page | None:
        """``hmm_range_fault`` of one page, without pinning it: the frame
        behind ``addr``, or None when nothing (or a ``VM_PFNMAP`` mapping,
        which has no ``struct page``) is mapped there."""
        vma = self.find_vma(addr)
        if vma is None or vma.pfnmap:
            return None
        return vma.pages[(addr - vma.start) >> PAGE_SHIFT]

    # -- user access -----------------------------------------------------------

    def _runs(self, addr: int, length: int) -> list[tuple[int, int]]:
        """The physical runs behind ``[addr, addr + length)``, one per page."""
        if length < 0:
            raise UserAddressError(addr, f"negative length {length}")
        runs: list[tuple[int, int]] = []
        pos, end = addr, addr + length
        vma: VmArea | None = None
        while pos < end:
            if vma is None or not vma.start <= pos < vma.end:
                vma = self.find_vma(pos)
                if vma is None:
                    raise UserAddressError(pos, f"not mapped in {self.name}")
            index, offset = divmod(pos - vma.start, PAGE_SIZE)
            n = min(PAGE_SIZE - offset, end - pos)
            runs.append((vma.pages[index].phys + offset, n))
            pos += n
        return runs

    def access_ok(self, addr: int, length: int) -> bool:
        """Whether every byte of the range is mapped."""
        try:
            self._runs(addr, length)
        except UserAddressError:
            return False
        return True

    def read(self, addr: int, length: int) -> bytes:
        """``copy_from_user``: the bytes at a user address. Raises
        :class:`UserAddressError` for an unmapped byte."""
        host = self.host
        return b"".join([host.cpu_read_phys(p, n) for p, n in self._runs(addr, length)])

    def write(self, addr: int, data: BytesLike) -> None:
        """``copy_to_user``: store ``data`` at a user address (nothing is
        written when any byte of the range is unmapped)."""
        view = memoryview(data).cast("B")
        runs = self._runs(addr, len(view))
        pos = 0
        for p, n in runs:
            self.host.cpu_write_phys(p, view[pos : pos + n])
            pos += n

    # -- pinning (mm/gup.c) ------------------------------------------------------

    def pin_user_pages(self, addr: int, npages: int) -> list[Page]:
        """``pin_user_pages(FOLL_LONGTERM)``: the frames behind ``npages``
        pages from page-aligned ``addr``, each pinned once. Raises
        :class:`VmError` (``EFAULT``) when a page is not mapped or is in a
        ``VM_PFNMAP`` mapping (no ``struct page`` to pin, as GUP sees it)."""
        if addr % PAGE_SIZE or npages <= 0:
            raise VmError(errno.EINVAL, f"pin of {npages} pages at {addr:#x}")
        try:
            runs = self._runs(addr, npages << PAGE_SHIFT)
        except UserAddressError as e:
            raise VmError(errno.EFAULT, str(e)) from e
        pos = addr
        while pos < addr + (npages << PAGE_SHIFT):
            vma = self.find_vma(pos)
            assert vma is not None  # _runs found every page
            if vma.pfnmap:
                raise VmError(errno.EFAULT, f"pin at {pos:#x}: a VM_PFNMAP mapping")
            pos = vma.end
        pages = [self.host.phys_to_page(p) for p, _ in runs]
        for page in pages:
            self._pins[page.pfn] += 1
        self.pinned_vm += len(pages)
        return pages

    def unpin_user_pages(self, pages: list[Page]) -> None:
        """``unpin_user_pages``: drop one pin of each; a page that was
        unmapped meanwhile is freed with its last pin."""
        for page in pages:
            if self._pins[page.pfn] <= 0:
                raise VmError(errno.EINVAL, f"unpin of pfn {page.pfn:#x}, which is not pinned")
            self._pins[page.pfn] -= 1
            if not self._pins[page.pfn]:
                del self._pins[page.pfn]
                if page.pfn in self._orphans:
                    self._orphans.discard(page.pfn)
                    self.host.free_pages(page, 0)
        self.pinned_vm -= len(pages)

    def pin_count(self, addr: int) -> int:
        """How many pins the page at user address ``addr`` holds."""
        vma = self.find_vma(addr)
        if vma is None:
            raise UserAddressError(addr, f"not mapped in {self.name}")
        return self._pins[vma.pages[(addr - vma.start) >> PAGE_SHIFT].pfn]
