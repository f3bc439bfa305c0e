"""Page size, the kernel virtual address layout and address types.

The layout follows x86-64 for the direct map and vmalloc area and borrows
the 32-bit HIGHMEM kernels' persistent-kmap window, so one host can show
every kind of kernel address (``arch/x86/include/asm/page_64_types.h``,
``pgtable_64_types.h``, ``highmem.h``).
"""

from __future__ import annotations

from typing import NewType, TypeAlias

PhysAddr = NewType("PhysAddr", int)
"""A physical address: an offset into a host's memory."""

VirtAddr = NewType("VirtAddr", int)
"""A kernel virtual address (direct map, vmalloc area or kmap window)."""

BytesLike: TypeAlias = bytes | bytearray | memoryview
"""Anything the model accepts as data to write."""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)

#: Start of the direct map: ``kva = PAGE_OFFSET + phys`` for lowmem.
PAGE_OFFSET = 0xFFFF_8880_0000_0000
#: The vmalloc area, with its own page table.
VMALLOC_START = 0xFFFF_C900_0000_0000
VMALLOC_END = 0xFFFF_E8FF_FFFF_FFFF
#: The persistent kmap window for highmem pages (``PKMAP_BASE``).
PKMAP_BASE = 0xFFFF_FE80_0000_0000
LAST_PKMAP = 1024

#: CPU cache line size used by the write-back cache model.
L1_CACHE_BYTES = 64

MAX_ORDER = 10
"""Largest buddy order the page allocator hands out (``MAX_PAGE_ORDER``)."""


def page_align(size: int) -> int:
    """``PAGE_ALIGN``: round ``size`` up to a whole number of pages."""
    return (size + PAGE_SIZE - 1) & PAGE_MASK


def get_order(size: int) -> int:
    """``get_order``: the smallest order whose block holds ``size`` bytes."""
    pages = max(1, (size + PAGE_SIZE - 1) >> PAGE_SHIFT)
    return (pages - 1).bit_length()
