"""The vmalloc area: virtually contiguous, physically scattered mappings
with their own page table (``mm/vmalloc.c``: ``struct vm_struct``,
``vmap``, ``vunmap``, ``vmalloc_to_page``).

Virtual space is handed out upwards and never reused, with a guard page
after each area, so a stale pointer into a freed area faults (a
:class:`KvaError`) instead of silently reaching a new owner.
"""

from __future__ import annotations

from dataclasses import dataclass

from softrdma.memory.errors import KvaError
from softrdma.memory.layout import PAGE_SHIFT, PAGE_SIZE, VMALLOC_END, VMALLOC_START


@dataclass(slots=True)
class VmArea:
    """``struct vm_struct``: one mapped area and the frames behind it."""

    addr: int
    pfns: list[int]
    owned: bool  # vmalloc'ed (pages freed with the area) or vmap'ed

    @property
    def size(self) -> int:
        return len(self.pfns) * PAGE_SIZE


class VmallocSpace:
    """The vmalloc area's allocator and page table."""

    def __init__(self) -> None:
        self._next = VMALLOC_START
        self._areas: dict[int, VmArea] = {}
        self._pte: dict[int, int] = {}  # virtual page number -> pfn

    def map(self, pfns: list[int], owned: bool) -> VmArea:
        """``vmap``: map frames at a fresh virtual range."""
        addr = self._next
        if addr + (len(pfns) + 1) * PAGE_SIZE > VMALLOC_END:
            raise KvaError(addr, "vmalloc area exhausted")
        self._next = addr + (len(pfns) + 1) * PAGE_SIZE  # + guard page
        vpn = addr >> PAGE_SHIFT
        for i, pfn in enumerate(pfns):
            self._pte[vpn + i] = pfn
        area = self._areas[addr] = VmArea(addr, pfns, owned)
        return area

    def unmap(self, addr: int) -> VmArea:
        """``vunmap``: remove the area that starts at ``addr``."""
        area = self._areas.pop(addr, None)
        if area is None:
            why = "inside a vmalloc area, not its start" if self.area_of(addr) else "not mapped"
            raise KvaError(addr, f"vfree/vunmap of an address {why}")
        vpn = addr >> PAGE_SHIFT
        for i in range(len(area.pfns)):
            del self._pte[vpn + i]
        return area

    def translate(self, addr: int) -> int | None:
        """The pfn behind a vmalloc address, or None if unmapped."""
        return self._pte.get(addr >> PAGE_SHIFT)

    def area_of(self, addr: int) -> VmArea | None:
        """``find_vm_area`` for any address inside an area (O(areas))."""
        for area in self._areas.values():
            if area.addr <= addr < area.addr + area.size:
                return area
        return None
