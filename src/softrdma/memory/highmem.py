"""The persistent kmap window for highmem pages (``mm/highmem.c``:
``kmap``, ``kunmap``, ``page_address`` via the hashed page-address table).

A highmem page has no permanent kernel address; ``kmap`` gives it one of
``LAST_PKMAP`` slots, reference counted, until the last ``kunmap``.
"""

from __future__ import annotations

from softrdma.memory.errors import KvaError, OutOfMemoryError
from softrdma.memory.layout import LAST_PKMAP, PAGE_SHIFT, PAGE_SIZE, PKMAP_BASE


class PkmapWindow:
    """``pkmap_page_table`` and ``pkmap_count``."""

    def __init__(self) -> None:
        self._slot_pfn: list[int | None] = [None] * LAST_PKMAP
        self._count: list[int] = [0] * LAST_PKMAP
        self._by_pfn: dict[int, int] = {}
        self._free = list(range(LAST_PKMAP - 1, -1, -1))

    def kmap(self, pfn: int) -> int:
        """Map (or re-reference) a highmem frame; its kernel address."""
        slot = self._by_pfn.get(pfn)
        if slot is None:
            if not self._free:
                raise OutOfMemoryError(f"all {LAST_PKMAP} pkmap slots are in use")
            slot = self._free.pop()
            self._slot_pfn[slot] = pfn
            self._by_pfn[pfn] = slot
        self._count[slot] += 1
        return PKMAP_BASE + slot * PAGE_SIZE

    def kunmap(self, pfn: int) -> None:
        """Drop one reference; the slot is released with the last."""
        slot = self._by_pfn.get(pfn)
        if slot is None:
            raise KvaError(PKMAP_BASE, f"kunmap of pfn {pfn:#x}, which is not kmapped")
        self._count[slot] -= 1
        if not self._count[slot]:
            del self._by_pfn[pfn]
            self._slot_pfn[slot] = None
            self._free.append(slot)

    def address_of(self, pfn: int) -> int | None:
        """``page_address`` of a highmem frame: its kmap address or None."""
        slot = self._by_pfn.get(pfn)
        return None if slot is None else PKMAP_BASE + slot * PAGE_SIZE

    def translate(self, addr: int) -> int | None:
        """The pfn behind a kmap address, or None."""
        slot = (addr - PKMAP_BASE) >> PAGE_SHIFT
        return self._slot_pfn[slot] if 0 <= slot < LAST_PKMAP else None

    @staticmethod
    def contains(addr: int) -> bool:
        return PKMAP_BASE <= addr < PKMAP_BASE + LAST_PKMAP * PAGE_SIZE
