from __future__ import annotations

import subprocess
import sys

import pytest

from softrdma.errors import AddressError
from softrdma.memory.errors import (
    BadFreeError,
    DoubleFreeError,
    KvaError,
    OutOfMemoryError,
    PhysAddressError,
)
from softrdma.memory.host import Host, MiB
from softrdma.memory.layout import PAGE_OFFSET, PAGE_SIZE, PKMAP_BASE, VMALLOC_START
from softrdma.memory.page import GFP_DMA32, GFP_HIGHUSER, GFP_KERNEL, Gfp, Zone
from softrdma.memory.scatterlist import Scatterlist


def test_zones_and_reserved_frame_zero(host: Host) -> None:
    assert host.zone_range(Zone.DMA32) == (0, 16 * MiB)
    assert host.zone_range(Zone.NORMAL) == (16 * MiB, 48 * MiB)
    assert host.zone_range(Zone.HIGHMEM) == (48 * MiB, 64 * MiB)
    assert host.free_pages_count() == host.nr_pages - 1
    with pytest.raises(BadFreeError, match="reserved"):
        host.free_pages(host.pfn_to_page(0), 0)
    no_high = Host(32 * MiB, dma32_limit=16 * MiB)
    assert no_high.zone_range(Zone.HIGHMEM) is None
    with pytest.raises(ValueError):
        Host(32 * MiB, dma32_limit=16 * MiB, lowmem_limit=8 * MiB)


def test_page_allocator_zones_and_frees(host: Host) -> None:
    normal = host.alloc_pages(2)
    assert normal.zone is Zone.NORMAL and normal.pfn % 4 == 0
    assert host.alloc_pages(0, GFP_DMA32).zone is Zone.DMA32
    high = host.alloc_pages(0, GFP_HIGHUSER)
    assert high.zone is Zone.HIGHMEM and high.is_highmem
    with pytest.raises(BadFreeError, match="allocated as 4 pages"):
        host.free_pages(normal, 1)
    with pytest.raises(BadFreeError, match="inside an allocation"):
        host.free_pages(normal + 1, 0)
    host.free_pages(normal, 2)
    with pytest.raises(DoubleFreeError):
        host.free_pages(normal, 2)
    with pytest.raises(BadFreeError, match="never allocated"):
        host.free_pages(host.pfn_to_page(100), 0)
    with pytest.raises(PhysAddressError):
        host.pfn_to_page(host.nr_pages)


def test_exhaustion_is_a_typed_error() -> None:
    small = Host(1 * MiB, dma32_limit=1 * MiB)
    pages = []
    with pytest.raises(OutOfMemoryError):
        for _ in range(1000):
            pages.append(small.alloc_pages(0))
    assert len(pages) == small.nr_pages - 1
    assert small.free_pages_count() == 0


def test_zeroing_and_reuse(host: Host) -> None:
    p = host.alloc_pages(0)
    host.cpu_write_phys(p.phys, b"\xaa" * PAGE_SIZE)
    host.free_pages(p, 0)
    again = host.alloc_pages(0)
    assert again == p and bytes(host.cpu_read_phys(p.phys, 4)) == b"\xaa" * 4
    host.free_pages(again, 0)
    zeroed = host.alloc_pages(0, GFP_KERNEL | Gfp.ZERO)
    assert bytes(host.cpu_read_phys(zeroed.phys, PAGE_SIZE)) == bytes(PAGE_SIZE)


def test_kmalloc_objects(host: Host) -> None:
    a, b = host.kmalloc(64), host.kmalloc(64)
    assert a != b and a % 64 == 0 and host.virt_addr_valid(a)
    assert host.ksize(host.kmalloc(100)) == 128
    host.cpu_write(a, b"x" * 64)
    host.kfree(a)
    assert host.kmalloc(64) == a, "slab free lists are LIFO"
    host.kfree(b)
    with pytest.raises(DoubleFreeError):
        host.kfree(b)
    c = host.kmalloc(256)
    with pytest.raises(BadFreeError, match="points 8 bytes into"):
        host.kfree(c + 8)
    big = host.kmalloc(3 * PAGE_SIZE)
    assert big % PAGE_SIZE == 0 and host.ksize(big) == 4 * PAGE_SIZE
    host.kfree(big)
    with pytest.raises(DoubleFreeError):
        host.kfree(big)
    low = host.kmalloc(32, GFP_DMA32)
    assert host.virt_to_phys(low) < 16 * MiB
    with pytest.raises(KvaError, match="vmalloc"):
        host.kfree(host.vmalloc(10))
    with pytest.raises(ValueError):
        host.kmalloc(16, GFP_HIGHUSER)
    host.kfree(0)


def test_kmalloc_many_objects_free_empty_slabs(host: Host) -> None:
    before = host.free_pages_count()
    objs = [host.kmalloc(512) for _ in range(200)]
    assert len(set(objs)) == 200
    for o in objs:
        host.kfree(o)
    assert before - host.free_pages_count() <= 1, "empty slabs beyond one are given back"


def test_vmalloc_is_virtually_contiguous_physically_scattered(host: Host) -> None:
    v = host.vmalloc(5 * PAGE_SIZE)
    assert host.is_vmalloc_addr(v) and v >= VMALLOC_START
    runs = host.kva_segments(v, 5 * PAGE_SIZE)
    assert len(runs) > 1, "pages are not physically contiguous"
    assert all(host.pfn_zone(p >> 12) is Zone.HIGHMEM for p, _ in runs)
    data = bytes(range(256)) * 70
    host.cpu_write(v + 100, data)
    assert bytes(host.cpu_read(v + 100, len(data))) == data
    assert host.vmalloc_to_page(v + PAGE_SIZE).phys == host.kva_to_phys(v + PAGE_SIZE)
    with pytest.raises(KvaError) as err:
        host.virt_to_phys(v)
    assert err.value.space == "kva" and "vmalloc" in str(err.value)
    with pytest.raises(KvaError, match="not its start"):
        host.vfree(v + PAGE_SIZE)
    host.vfree(v)
    with pytest.raises(KvaError, match="page fault"):
        host.cpu_read(v, 1)
    with pytest.raises(KvaError):
        host.vfree(v)


def test_highmem_kmap(host: Host) -> None:
    page = host.alloc_pages(0, GFP_HIGHUSER)
    assert host.page_address(page) is None
    with pytest.raises(PhysAddressError, match="not in lowmem"):
        host.phys_to_virt(page.phys)
    addr = host.kmap(page)
    assert addr >= PKMAP_BASE and host.page_address(page) == addr
    assert host.kmap(page) == addr, "kmap is reference counted"
    host.cpu_write(addr + 10, b"highmem!")
    assert bytes(host.cpu_read_phys(page.phys + 10, 8)) == b"highmem!"
    host.kunmap(page)
    assert host.page_address(page) == addr
    host.kunmap(page)
    assert host.page_address(page) is None
    with pytest.raises(KvaError):
        host.cpu_read(addr, 1)
    with pytest.raises(KvaError):
        host.kunmap(page)
    low = host.alloc_pages(0)
    assert host.kmap(low) == PAGE_OFFSET + low.phys


def test_cpu_read_is_zero_copy_and_read_only(host: Host) -> None:
    k = host.kmalloc(4096)
    view = host.cpu_read(k, 16)
    host.cpu_write(k, b"0123456789abcdef")
    assert bytes(view) == b"0123456789abcdef", "the view aliases RAM"
    assert view.readonly


def test_bad_addresses_name_their_space(host: Host) -> None:
    for bad in (0x1234, PAGE_OFFSET + host.mem_size + 5, VMALLOC_START + 1 << 30):
        with pytest.raises(AddressError) as err:
            host.cpu_read(bad, 4)
        assert err.value.space == "kva"
    with pytest.raises(PhysAddressError) as perr:
        host.cpu_read_phys(host.mem_size - 2, 4)
    assert perr.value.space == "phys"


def test_scatterlists(host: Host) -> None:
    k = host.kmalloc(3 * PAGE_SIZE)
    one = Scatterlist.from_buffer(host, k + 5, 2 * PAGE_SIZE)
    assert len(one) == 1 and one[0].offset == 5 and one[0].virt() == k + 5
    v = host.vmalloc(4 * PAGE_SIZE)
    many = Scatterlist.from_buffer(host, v, 4 * PAGE_SIZE)
    assert len(many) > 1 and many.total_length == 4 * PAGE_SIZE
    high = host.alloc_pages(0, GFP_HIGHUSER)
    mixed = Scatterlist.from_pages([(high, 100, 200), (host.alloc_pages(1), 0, 2 * PAGE_SIZE)])
    assert mixed.total_length == 2 * PAGE_SIZE + 200
    with pytest.raises(KvaError):
        mixed[0].virt()
    with pytest.raises(ValueError):
        Scatterlist([])
    with pytest.raises(PhysAddressError):
        Scatterlist.from_pages([(host.pfn_to_page(host.nr_pages - 1), 0, 2 * PAGE_SIZE)])


def test_untouched_memory_costs_no_rss() -> None:
    """A 1 GiB host that touches 10 MiB stays near 10 MiB of RSS."""
    code = """
import resource, os
from softrdma.memory.host import Host, MiB, GiB
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
before = rss()
h = Host(1 * GiB)
for i in range(10):
    k = h.kmalloc(1 * MiB)
    h.cpu_write(k, b'x' * MiB)
print((rss() - before) // MiB)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown = int(out.stdout.strip())
    assert grown < 40, f"RSS grew by {grown} MiB for 10 MiB touched"
