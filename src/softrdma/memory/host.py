"""A host: physical memory, the page allocator and the kernel address space.

Physical memory is one anonymous ``mmap``: pages nobody touches cost no
resident memory, so a 1 GiB host that uses 10 MiB stays near 10 MiB RSS.
Frames are grouped into zones (``ZONE_DMA32`` below ``dma32_limit``,
``ZONE_NORMAL``, ``ZONE_HIGHMEM`` above ``lowmem_limit``), each with a
buddy allocator. The kernel address space has the direct map
(``PAGE_OFFSET + phys``, lowmem only), the vmalloc area and the kmap
window; the CPU reads and writes through them, and through
:class:`~softrdma.memory.cache.CpuCache` once a non-coherent device asks
for it.

Kernel counterparts: ``mm/page_alloc.c``, ``mm/slab_common.c``,
``mm/vmalloc.c``, ``mm/highmem.c``, ``arch/x86/include/asm/page.h``.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable

from softrdma.memory.buddy import BuddyAllocator
from softrdma.memory.cache import CpuCache
from softrdma.memory.errors import (
    BadFreeError,
    DoubleFreeError,
    KvaError,
    OutOfMemoryError,
    PhysAddressError,
)
from softrdma.memory.highmem import PkmapWindow
from softrdma.memory.layout import (
    MAX_ORDER,
    PAGE_OFFSET,
    PAGE_SHIFT,
    PAGE_SIZE,
    VMALLOC_END,
    VMALLOC_START,
    BytesLike,
    PhysAddr,
    VirtAddr,
    get_order,
)
from softrdma.memory.page import GFP_KERNEL, Gfp, Page, Zone, zonelist
from softrdma.memory.slab import (
    KMALLOC_MAX_CACHE_SIZE,
    KMALLOC_SIZES,
    KmemCache,
    Slab,
    kmalloc_index,
)
from softrdma.memory.vmalloc import VmallocSpace

MiB = 1 << 20
GiB = 1 << 30

# Per-frame allocation state, one byte a frame.
_UNUSED, _HEAD, _TAIL, _FREED, _RESERVED = range(5)


class Host:
    """One machine's memory and kernel address space.

    ``dma32_limit`` bounds ``ZONE_DMA32``; frames at or above
    ``lowmem_limit`` are ``ZONE_HIGHMEM`` (None: no highmem). Frame 0 is
    reserved, as firmware keeps it on a PC, so no allocation has physical
    address 0.
    """

    def __init__(
        self,
        mem_size: int,
        *,
        dma32_limit: int = 4 * GiB,
        lowmem_limit: int | None = None,
        name: str = "host0",
    ) -> None:
        if mem_size < 16 * PAGE_SIZE or mem_size % PAGE_SIZE:
            raise ValueError(f"mem_size must be a multiple of {PAGE_SIZE} and >= 64 KiB")
        lowmem = mem_size if lowmem_limit is None else min(lowmem_limit, mem_size)
        if lowmem % PAGE_SIZE or dma32_limit % PAGE_SIZE:
            raise ValueError("zone limits must be page aligned")
        if lowmem < min(dma32_limit, mem_size):
            raise ValueError("lowmem_limit must not be below dma32_limit")
        self.name = name
        self.mem_size = mem_size
        self.nr_pages = mem_size >> PAGE_SHIFT
        self.lowmem_pfn = lowmem >> PAGE_SHIFT
        self._lowmem_bytes = lowmem
        self._mmap = mmap.mmap(-1, mem_size)
        self.ram = memoryview(self._mmap)
        """RAM as the memory bus sees it (no CPU cache in between)."""
        self._ram_ro = self.ram.toreadonly()
        dma32_pfn = min(dma32_limit >> PAGE_SHIFT, self.nr_pages)
        self._zone_ranges: dict[Zone, tuple[int, int]] = {}
        for zone, lo, hi in (
            (Zone.DMA32, 0, dma32_pfn),
            (Zone.NORMAL, dma32_pfn, self.lowmem_pfn),
            (Zone.HIGHMEM, self.lowmem_pfn, self.nr_pages),
        ):
            if lo < hi:
                self._zone_ranges[zone] = (lo, hi)
        self._buddy = {
            zone: BuddyAllocator(lo, hi, MAX_ORDER) for zone, (lo, hi) in self._zone_ranges.items()
        }
        self._state = bytearray(self.nr_pages)
        self._allocs: dict[int, tuple[int, str]] = {}  # head pfn -> (pages, owner)
        self._slabs: dict[int, Slab] = {}
        self._kmalloc_caches: dict[tuple[int, bool], KmemCache] = {}
        self._kmalloc_large: set[int] = set()
        self.vmalloc_space = VmallocSpace()
        self.pkmap = PkmapWindow()
        self.cache: CpuCache | None = None
        first = self._zone_for(0)
        first.alloc_contig(1, limit=1)
        self._state[0] = _RESERVED

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.mem_size // MiB} MiB)"

    # -- frames and zones ---------------------------------------------------

    def pfn_to_page(self, pfn: int) -> Page:
        """``pfn_to_page``."""
        if not 0 <= pfn < self.nr_pages:
            raise PhysAddressError(
                pfn << PAGE_SHIFT, f"pfn {pfn:#x} is beyond {self.name}'s memory"
            )
        return Page(self, pfn)

    def phys_to_page(self, phys: int) -> Page:
        """``phys_to_page``."""
        return self.pfn_to_page(phys >> PAGE_SHIFT)

    def pfn_zone(self, pfn: int) -> Zone:
        """``page_zonenum``."""
        for zone, (lo, hi) in self._zone_ranges.items():
            if lo <= pfn < hi:
                return zone
        raise PhysAddressError(pfn << PAGE_SHIFT, "no zone holds this frame")

    def zone_range(self, zone: Zone) -> tuple[PhysAddr, PhysAddr] | None:
        """``[start, end)`` physical range of a zone, or None if the host has none."""
        rng = self._zone_ranges.get(zone)
        return (
            None
            if rng is None
            else (PhysAddr(rng[0] << PAGE_SHIFT), PhysAddr(rng[1] << PAGE_SHIFT))
        )

    def _zone_for(self, pfn: int) -> BuddyAllocator:
        return self._buddy[self.pfn_zone(pfn)]

    def free_pages_count(self, zone: Zone | None = None) -> int:
        """Free frames in a zone, or in all zones (``nr_free_pages``)."""
        if zone is not None:
            buddy = self._buddy.get(zone)
            return 0 if buddy is None else buddy.nr_free
        return sum(b.nr_free for b in self._buddy.values())

    # -- the page allocator -----------------------------------------------------

    def alloc_pages(self, order: int, gfp: Gfp = GFP_KERNEL, *, owner: str = "alloc_pages") -> Page:
        """``alloc_pages(gfp, order)``: ``2**order`` contiguous frames from the
        first zone of the gfp's zonelist that has them."""
        if not 0 <= order <= MAX_ORDER:
            raise ValueError(f"order {order} outside 0..{MAX_ORDER}")
        for zone in zonelist(gfp):
            buddy = self._buddy.get(zone)
            pfn = None if buddy is None else buddy.alloc(order)
            if pfn is not None:
                return self._mark_allocated(pfn, 1 << order, gfp, owner)
        raise OutOfMemoryError(
            f"{self.name}: no free order-{order} block in {'/'.join(z.value for z in zonelist(gfp))}"
        )

    def alloc_contig_pages(
        self,
        count: int,
        gfp: Gfp = GFP_KERNEL,
        *,
        limit: int | None = None,
        owner: str = "alloc_contig",
    ) -> Page:
        """``alloc_contig_pages``: ``count`` contiguous frames of any size,
        ending at or below physical address ``limit``. For the boot-time
        swiotlb pool and large coherent buffers."""
        if count <= 0:
            raise ValueError("count must be positive")
        align = 1 << min(get_order(count * PAGE_SIZE), MAX_ORDER)
        limit_pfn = None if limit is None else limit >> PAGE_SHIFT
        for zone in zonelist(gfp):
            buddy = self._buddy.get(zone)
            pfn = None if buddy is None else buddy.alloc_contig(count, align, limit_pfn)
            if pfn is not None:
                return self._mark_allocated(pfn, count, gfp, owner)
        raise OutOfMemoryError(f"{self.name}: no {count} contiguous free frames")

    def _mark_allocated(self, pfn: int, count: int, gfp: Gfp, owner: str) -> Page:
        self._state[pfn] = _HEAD
        if count > 1:
            self._state[pfn + 1 : pfn + count] = bytes([_TAIL]) * (count - 1)
        self._allocs[pfn] = (count, owner)
        if gfp & Gfp.ZERO:
            self.cpu_write_phys(PhysAddr(pfn << PAGE_SHIFT), bytes(count * PAGE_SIZE))
        return Page(self, pfn)

    def free_pages(self, page: Page, order: int) -> None:
        """``__free_pages(page, order)``."""
        self._free_block(page, 1 << order, f"order {order}")

    def free_contig_pages(self, page: Page, count: int) -> None:
        """``free_contig_range`` of an :meth:`alloc_contig_pages` block."""
        self._free_block(page, count, f"{count} pages")

    def _free_block(self, page: Page, count: int, what: str) -> None:
        pfn = self._own_page(page).pfn
        state = self._state[pfn]
        phys = pfn << PAGE_SHIFT
        if state == _FREED:
            raise DoubleFreeError(f"{self.name}: double free of phys {phys:#x} ({what})")
        if state != _HEAD:
            why = {
                _TAIL: "is inside an allocation, not its first page",
                _RESERVED: "is reserved",
                _UNUSED: "was never allocated",
            }[state]
            raise BadFreeError(f"{self.name}: freeing phys {phys:#x} ({what}), which {why}")
        pages, owner = self._allocs[pfn]
        if pages != count:
            raise BadFreeError(
                f"{self.name}: freeing phys {phys:#x} as {what}, allocated as {pages} pages by {owner}"
            )
        del self._allocs[pfn]
        self._state[pfn : pfn + count] = bytes([_FREED]) * count
        buddy = self._zone_for(pfn)
        if count & (count - 1) == 0 and count <= 1 << MAX_ORDER:
            buddy.free(pfn, count.bit_length() - 1)
        else:
            buddy.free_contig(pfn, count)

    def _own_page(self, page: Page) -> Page:
        if page.host is not self:
            raise PhysAddressError(page.phys, f"page belongs to {page.host.name}, not {self.name}")
        if not 0 <= page.pfn < self.nr_pages:
            raise PhysAddressError(page.phys, "beyond the host's memory")
        return page

    def allocation_of(self, pfn: int) -> tuple[int, int, str] | None:
        """``(head_pfn, pages, owner)`` of the allocation holding a frame."""
        if self._state[pfn] not in (_HEAD, _TAIL):
            return None
        head = pfn
        while self._state[head] == _TAIL:
            head -= 1
        pages, owner = self._allocs[head]
        return head, pages, owner

    # -- kmalloc ---------------------------------------------------------------

    def kmalloc(self, size: int, gfp: Gfp = GFP_KERNEL) -> VirtAddr:
        """``kmalloc``: physically contiguous, direct-mapped memory."""
        if size <= 0:
            raise ValueError(f"kmalloc({size}): size must be positive")
        if gfp & Gfp.HIGHMEM:
            raise ValueError("kmalloc memory must be direct-mapped: __GFP_HIGHMEM is not allowed")
        if size > KMALLOC_MAX_CACHE_SIZE:
            page = self.alloc_pages(get_order(size), gfp, owner="kmalloc_large")
            self._kmalloc_large.add(page.pfn)
            return VirtAddr(PAGE_OFFSET + page.phys)
        key = (kmalloc_index(size), bool(gfp & Gfp.DMA32))
        cache = self._kmalloc_caches.get(key)
        if cache is None:
            cls = KMALLOC_SIZES[key[0]]
            name = f"kmalloc-{'dma32-' if key[1] else ''}{cls}"
            cache = self._kmalloc_caches[key] = KmemCache(self, name, cls, gfp & Gfp.DMA32)
        phys = cache.alloc()
        if gfp & Gfp.ZERO:
            self.cpu_write_phys(PhysAddr(phys), bytes(size))
        return VirtAddr(PAGE_OFFSET + phys)

    def kzalloc(self, size: int, gfp: Gfp = GFP_KERNEL) -> VirtAddr:
        """``kzalloc``: zeroed :meth:`kmalloc`."""
        return self.kmalloc(size, gfp | Gfp.ZERO)

    def kfree(self, kva: int) -> None:
        """``kfree``; ``kfree(0)`` does nothing, like ``kfree(NULL)``."""
        if kva == 0:
            return
        phys = self._direct_phys(kva, "kfree")
        pfn = phys >> PAGE_SHIFT
        slab = self._slabs.get(pfn)
        if slab is not None:
            slab.cache.free(slab, phys, kva)
        elif pfn in self._kmalloc_large and not phys & (PAGE_SIZE - 1):
            self._kmalloc_large.discard(pfn)
            self.free_pages(Page(self, pfn), self._allocs[pfn][0].bit_length() - 1)
        elif self._state[pfn] == _FREED:
            raise DoubleFreeError(f"kfree({kva:#x}): already freed")
        else:
            raise BadFreeError(f"kfree({kva:#x}): not allocated by kmalloc")

    def ksize(self, kva: int) -> int:
        """``ksize``: the usable size of a kmalloc object."""
        phys = self._direct_phys(kva, "ksize")
        slab = self._slabs.get(phys >> PAGE_SHIFT)
        if slab is not None:
            return slab.cache.size
        if phys >> PAGE_SHIFT in self._kmalloc_large:
            return self._allocs[phys >> PAGE_SHIFT][0] * PAGE_SIZE
        raise BadFreeError(f"ksize({kva:#x}): not a kmalloc object")

    def register_slab(self, slab: Slab) -> None:
        for pfn in range(slab.pfn, slab.pfn + (1 << slab.order)):
            self._slabs[pfn] = slab

    def unregister_slab(self, slab: Slab) -> None:
        for pfn in range(slab.pfn, slab.pfn + (1 << slab.order)):
            del self._slabs[pfn]

    # -- vmalloc and kmap ------------------------------------------------------

    def vmalloc(self, size: int, gfp: Gfp = GFP_KERNEL) -> VirtAddr:
        """``vmalloc``: virtually contiguous memory from single pages,
        highmem preferred, so physically scattered."""
        if size <= 0:
            raise ValueError(f"vmalloc({size}): size must be positive")
        pages: list[int] = []
        try:
            for _ in range((size + PAGE_SIZE - 1) >> PAGE_SHIFT):
                pages.append(self.alloc_pages(0, gfp | Gfp.HIGHMEM, owner="vmalloc").pfn)
        except OutOfMemoryError:
            for pfn in pages:
                self.free_pages(Page(self, pfn), 0)
            raise
        return VirtAddr(self.vmalloc_space.map(pages, owned=True).addr)

    def vzalloc(self, size: int, gfp: Gfp = GFP_KERNEL) -> VirtAddr:
        """``vzalloc``."""
        return self.vmalloc(size, gfp | Gfp.ZERO)

    def vfree(self, kva: int) -> None:
        """``vfree``."""
        area = self.vmalloc_space.unmap(kva)
        if not area.owned:
            raise BadFreeError(f"vfree({kva:#x}): area was vmap'ed; use vunmap")
        for pfn in area.pfns:
            self.free_pages(Page(self, pfn), 0)

    def vmap(self, pages: Iterable[Page]) -> VirtAddr:
        """``vmap``: map existing pages virtually contiguous."""
        pfns = [self._own_page(p).pfn for p in pages]
        return VirtAddr(self.vmalloc_space.map(pfns, owned=False).addr)

    def vunmap(self, kva: int) -> None:
        """``vunmap``: remove a :meth:`vmap` mapping (the pages stay allocated)."""
        area = self.vmalloc_space.unmap(kva)
        if area.owned:
            raise BadFreeError(f"vunmap({kva:#x}): area was vmalloc'ed; use vfree")

    def kmap(self, page: Page) -> VirtAddr:
        """``kmap``: a kernel address for any page; highmem pages get a
        reference-counted slot in the kmap window until :meth:`kunmap`."""
        self._own_page(page)
        if page.pfn < self.lowmem_pfn:
            return VirtAddr(PAGE_OFFSET + page.phys)
        return VirtAddr(self.pkmap.kmap(page.pfn))

    def kunmap(self, page: Page) -> None:
        """``kunmap``."""
        self._own_page(page)
        if page.pfn >= self.lowmem_pfn:
            self.pkmap.kunmap(page.pfn)

    # -- address translation -----------------------------------------------------

    def page_address(self, page: Page) -> VirtAddr | None:
        """``page_address``: the direct-map address, the kmap address of a
        kmapped highmem page, or None."""
        self._own_page(page)
        if page.pfn < self.lowmem_pfn:
            return VirtAddr(PAGE_OFFSET + page.phys)
        addr = self.pkmap.address_of(page.pfn)
        return None if addr is None else VirtAddr(addr)

    def is_vmalloc_addr(self, kva: int) -> bool:
        """``is_vmalloc_addr``."""
        return VMALLOC_START <= kva < VMALLOC_END

    def virt_addr_valid(self, kva: int) -> bool:
        """``virt_addr_valid``: a direct-map (linear) address of lowmem."""
        return 0 <= kva - PAGE_OFFSET < self._lowmem_bytes

    def _direct_phys(self, kva: int, what: str) -> int:
        phys = kva - PAGE_OFFSET
        if 0 <= phys < self._lowmem_bytes:
            return phys
        raise KvaError(
            kva, f"{what} needs a direct-mapped address; this is {self.describe_kva(kva)}"
        )

    def virt_to_phys(self, kva: int) -> PhysAddr:
        """``virt_to_phys``: valid only for the direct map (as with
        CONFIG_DEBUG_VIRTUAL, anything else is an error, not garbage)."""
        return PhysAddr(self._direct_phys(kva, "virt_to_phys"))

    def virt_to_page(self, kva: int) -> Page:
        """``virt_to_page``: direct-map addresses only."""
        return Page(self, self._direct_phys(kva, "virt_to_page") >> PAGE_SHIFT)

    def phys_to_virt(self, phys: int) -> VirtAddr:
        """``phys_to_virt``: lowmem only."""
        if not 0 <= phys < self._lowmem_bytes:
            raise PhysAddressError(phys, "not in lowmem, so not in the direct map")
        return VirtAddr(PAGE_OFFSET + phys)

    def vmalloc_to_page(self, kva: int) -> Page:
        """``vmalloc_to_page``."""
        pfn = self.vmalloc_space.translate(kva) if self.is_vmalloc_addr(kva) else None
        if pfn is None:
            raise KvaError(kva, f"vmalloc_to_page: {self.describe_kva(kva)}")
        return Page(self, pfn)

    def kva_to_phys(self, kva: int) -> PhysAddr:
        """Walk the kernel page tables: the physical address behind any
        mapped kernel address (direct map, vmalloc area, kmap window)."""
        phys = kva - PAGE_OFFSET
        if 0 <= phys < self._lowmem_bytes:
            return PhysAddr(phys)
        pfn = None
        if self.is_vmalloc_addr(kva):
            pfn = self.vmalloc_space.translate(kva)
        elif self.pkmap.contains(kva):
            pfn = self.pkmap.translate(kva)
        if pfn is None:
            raise KvaError(kva, f"page fault: {self.describe_kva(kva)}")
        return PhysAddr((pfn << PAGE_SHIFT) | (kva & (PAGE_SIZE - 1)))

    def describe_kva(self, kva: int) -> str:
        """Which part of the kernel address space ``kva`` falls in."""
        if self.virt_addr_valid(kva):
            return "a direct-map address"
        if 0 <= kva - PAGE_OFFSET < self.mem_size:
            return "a highmem address, which the direct map does not cover"
        if self.is_vmalloc_addr(kva):
            mapped = self.vmalloc_space.translate(kva) is not None
            return "a vmalloc address" + ("" if mapped else " with no page mapped")
        if self.pkmap.contains(kva):
            mapped = self.pkmap.translate(kva) is not None
            return "a kmap address" + ("" if mapped else " with no page kmapped")
        return "not a kernel address of this host"

    def kva_segments(self, kva: int, length: int) -> list[tuple[PhysAddr, int]]:
        """``[kva, kva + length)`` as physically contiguous ``(phys, length)``
        runs, or :class:`KvaError` if any byte is unmapped."""
        if length < 0:
            raise ValueError("negative length")
        phys = kva - PAGE_OFFSET
        if phys >= 0 and phys + length <= self._lowmem_bytes:
            return [(PhysAddr(phys), length)]
        runs: list[tuple[PhysAddr, int]] = []
        pos, end = kva, kva + length
        while pos < end:
            chunk = min(PAGE_SIZE - (pos & (PAGE_SIZE - 1)), end - pos)
            p = self.kva_to_phys(pos)
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1] = (runs[-1][0], runs[-1][1] + chunk)
            else:
                runs.append((p, chunk))
            pos += chunk
        return runs

    # -- access: the CPU and bus masters ----------------------------------------

    def enable_cpu_cache(self, capacity_pages: int = 4096) -> CpuCache:
        """Put the write-back cache model between the CPU and RAM (done
        when the first non-coherent device appears on the host)."""
        if self.cache is None:
            self.cache = CpuCache(self.ram, capacity_pages)
        return self.cache

    def check_phys(self, phys: int, length: int) -> None:
        """Raise :class:`PhysAddressError` unless the range is in memory."""
        if phys < 0 or length < 0 or phys + length > self.mem_size:
            raise PhysAddressError(
                phys, f"+{length:#x} is beyond {self.name}'s {self.mem_size:#x} bytes"
            )

    def cpu_read(self, kva: int, length: int) -> memoryview:
        """A CPU load of ``length`` bytes at a kernel address. Zero-copy
        (a read-only view of RAM) where the range is physically contiguous
        and no cache model is active."""
        phys = kva - PAGE_OFFSET
        if phys >= 0 and phys + length <= self._lowmem_bytes and length >= 0:
            if self.cache is None:
                return self._ram_ro[phys : phys + length]
            return memoryview(self.cache.read(phys, length))
        runs = self.kva_segments(kva, length)
        if len(runs) == 1:
            return self.cpu_read_phys(*runs[0])
        return memoryview(b"".join([self.cpu_read_phys(p, n) for p, n in runs]))

    def cpu_write(self, kva: int, data: BytesLike) -> None:
        """A CPU store at a kernel address."""
        length = len(data)
        phys = kva - PAGE_OFFSET
        if phys >= 0 and phys + length <= self._lowmem_bytes:
            if self.cache is None:
                self.ram[phys : phys + length] = data
            else:
                self.cache.write(phys, data)
            return
        view = memoryview(data).cast("B")
        pos = 0
        for p, n in self.kva_segments(kva, length):
            self.cpu_write_phys(p, view[pos : pos + n])
            pos += n

    def cpu_read_phys(self, phys: int, length: int) -> memoryview:
        """A CPU load by physical address (``memcpy_from_page`` after kmap)."""
        self.check_phys(phys, length)
        if self.cache is None:
            return self._ram_ro[phys : phys + length]
        return memoryview(self.cache.read(phys, length))

    def cpu_write_phys(self, phys: int, data: BytesLike) -> None:
        """A CPU store by physical address (``memcpy_to_page`` after kmap)."""
        self.check_phys(phys, len(data))
        if self.cache is None:
            self.ram[phys : phys + len(data)] = data
        else:
            self.cache.write(phys, data)

    def bus_read(self, phys: int, length: int, *, snoop: bool) -> memoryview:
        """A bus master's read of RAM. ``snoop`` (a coherent device) makes
        dirty CPU lines visible first; a non-coherent device reads RAM only."""
        self.check_phys(phys, length)
        if snoop and self.cache is not None:
            self.cache.clean(phys, length)
        return self._ram_ro[phys : phys + length]

    def bus_write(self, phys: int, data: BytesLike, *, snoop: bool) -> None:
        """A bus master's write to RAM; ``snoop`` invalidates the CPU's
        copies (after saving its dirty bytes outside the range)."""
        length = len(data)
        self.check_phys(phys, length)
        if snoop and self.cache is not None:
            self.cache.invalidate(phys, length)
        self.ram[phys : phys + length] = data
