from __future__ import annotations

from softrdma.memory.host import Host


def test_cpu_writes_stay_in_cache_until_cleaned(host: Host) -> None:
    cache = host.enable_cpu_cache()
    k = host.kmalloc(256)
    phys = host.virt_to_phys(k)
    host.cpu_write(k + 3, b"dirty")
    assert bytes(host.bus_read(phys + 3, 5, snoop=False)) == bytes(5), "RAM not updated"
    assert bytes(host.bus_read(phys + 3, 5, snoop=True)) == b"dirty", "a snooping master sees it"
    host.cpu_write(k + 64, b"later")
    assert cache.dirty_bytes(phys, 256) == 64
    cache.clean(phys, 256)
    assert bytes(host.ram[phys + 64 : phys + 69]) == b"later"


def test_stale_lines_and_partial_line_invalidate(host: Host) -> None:
    cache = host.enable_cpu_cache()
    k = host.kmalloc(256)
    phys = host.virt_to_phys(k)
    assert bytes(host.cpu_read(k, 8)) == bytes(8)  # the line is now cached
    host.bus_write(phys, b"DEVICE!!", snoop=False)
    assert bytes(host.cpu_read(k, 8)) == bytes(8), "CPU sees its stale line"
    host.cpu_write(k + 60, b"cpu!")  # dirty bytes in the same line, outside the range
    cache.invalidate(phys + 8, 8)  # partial line: cleaned first, then dropped
    assert bytes(host.cpu_read(k + 60, 4)) == b"cpu!"
    cache.invalidate(phys, 64)
    assert bytes(host.cpu_read(k, 8)) == bytes(8), (
        "cleaning the shared line wrote the stale copy over the device data"
    )


def test_eviction_writes_back(host: Host) -> None:
    cache = host.enable_cpu_cache(capacity_pages=4)
    pages = [host.alloc_pages(0) for _ in range(6)]
    for i, p in enumerate(pages):
        host.cpu_write_phys(p.phys, bytes([i + 1]) * 8)
    assert bytes(host.ram[pages[0].phys : pages[0].phys + 8]) == b"\x01" * 8
    assert bytes(host.ram[pages[5].phys : pages[5].phys + 8]) == bytes(8)
    assert cache.dirty_bytes(pages[5].phys, 8) == 64


def test_uncached_pages_bypass(host: Host) -> None:
    cache = host.enable_cpu_cache()
    p = host.alloc_pages(0)
    host.cpu_write_phys(p.phys, b"before")
    cache.set_uncached(p.pfn, 1, True)
    assert bytes(host.ram[p.phys : p.phys + 6]) == b"before", "dirty lines written back"
    host.cpu_write_phys(p.phys, b"direct")
    assert bytes(host.ram[p.phys : p.phys + 6]) == b"direct"
