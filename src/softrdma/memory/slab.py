"""``kmalloc`` size classes over slabs of physically contiguous pages.

Kernel counterparts: ``mm/slab_common.c`` (the ``kmalloc-<size>`` caches,
``kmalloc_large`` above 8 KiB), ``mm/slub.c`` (objects carved from a slab,
LIFO free list). Objects sit at multiples of their size class, so a
``kmalloc(64)`` object is cache-line aligned as on x86-64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from softrdma.memory.errors import BadFreeError, DoubleFreeError
from softrdma.memory.layout import PAGE_SHIFT, PAGE_SIZE, get_order
from softrdma.memory.page import Gfp

if TYPE_CHECKING:
    from softrdma.memory.host import Host

#: ``kmalloc_info[]``: the generic size classes; larger requests take pages.
KMALLOC_SIZES = (8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192)
KMALLOC_MAX_CACHE_SIZE = KMALLOC_SIZES[-1]


class Slab:
    """One slab: a block of pages carved into equal objects (``struct slab``)."""

    __slots__ = ("allocated", "cache", "free", "order", "pfn")

    def __init__(self, cache: KmemCache, pfn: int, order: int) -> None:
        self.cache = cache
        self.pfn = pfn
        self.order = order
        count = (PAGE_SIZE << order) // cache.size
        self.free = list(range(count - 1, -1, -1))  # pop() gives index 0 first
        self.allocated = bytearray(count)

    @property
    def capacity(self) -> int:
        return len(self.allocated)


class KmemCache:
    """A ``struct kmem_cache`` of one object size."""

    def __init__(self, host: Host, name: str, size: int, gfp: Gfp) -> None:
        self.host = host
        self.name = name
        self.size = size
        self.gfp = gfp
        # At least eight objects a slab, as SLUB's calculate_order aims for.
        self.order = get_order(size * 8) if size > PAGE_SIZE // 8 else 0
        self._partial: list[Slab] = []
        self.active_objects = 0

    def alloc(self) -> int:
        """``kmem_cache_alloc``: the physical address of a free object.

        Every slab on the partial list has a free object.
        """
        if not self._partial:
            page = self.host.alloc_pages(self.order, self.gfp, owner=self.name)
            slab = Slab(self, page.pfn, self.order)
            self.host.register_slab(slab)
            self._partial.append(slab)
        slab = self._partial[-1]
        index = slab.free.pop()
        if not slab.free:
            self._partial.pop()  # full slabs leave the partial list
        slab.allocated[index] = 1
        self.active_objects += 1
        return (slab.pfn << PAGE_SHIFT) + index * self.size

    def free(self, slab: Slab, phys: int, kva: int) -> None:
        """``kmem_cache_free``: return the object at ``phys`` to its slab."""
        offset = phys - (slab.pfn << PAGE_SHIFT)
        index, rest = divmod(offset, self.size)
        if rest:
            raise BadFreeError(f"kfree({kva:#x}): points {rest} bytes into a {self.name} object")
        if not slab.allocated[index]:
            raise DoubleFreeError(f"kfree({kva:#x}): {self.name} object already free")
        slab.allocated[index] = 0
        if not slab.free:
            self._partial.append(slab)
        slab.free.append(index)
        self.active_objects -= 1
        if len(slab.free) == slab.capacity and len(self._partial) > 1:
            # discard_slab: keep one empty slab around, give the rest back.
            self._partial.remove(slab)
            self.host.unregister_slab(slab)
            self.host.free_pages(self.host.pfn_to_page(slab.pfn), slab.order)


def kmalloc_index(size: int) -> int:
    """``kmalloc_index``: the size class for ``size`` bytes."""
    for i, cls in enumerate(KMALLOC_SIZES):
        if size <= cls:
            return i
    raise ValueError(f"{size} bytes is above KMALLOC_MAX_CACHE_SIZE")
