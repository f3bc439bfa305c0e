from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.dma.debug import DebugKind
from softrdma.dma.pool import DmaPool
from softrdma.memory.errors import BadFreeError, DoubleFreeError
from tests.conftest import make_device


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 3000),
    align_log=st.integers(0, 7),
    boundary_log=st.integers(8, 13),
    kind=st.sampled_from(["direct", "iommu", "virtual", "swiotlb"]),
)
def test_blocks_are_aligned_and_never_cross_boundary(
    size: int, align_log: int, boundary_log: int, kind: str
) -> None:
    dev = make_device(kind)
    align, boundary = 1 << align_log, 1 << boundary_log
    if boundary < (max(size, 8) + align - 1) // align * align:
        with pytest.raises(ValueError):
            DmaPool("p", dev, size, align, boundary)
        return
    pool = DmaPool("p", dev, size, align, boundary)
    blocks = [pool.alloc() for _ in range(20)]
    seen = set()
    for kva, dma in blocks:
        assert dma % align == 0 and kva % align == 0
        assert dma // boundary == (dma + pool.size - 1) // boundary
        dev.host.cpu_write(kva, b"\x01" * size)
        assert bytes(dev.dma_read(dma, size)) == b"\x01" * size
        seen.add(dma)
    assert len(seen) == 20
    for kva, dma in blocks:
        pool.free(kva, dma)
    pool.destroy()
    assert not dev.platform.dma_debug.reports


def test_lifo_reuse_bad_frees_and_busy_destroy() -> None:
    dev = make_device("direct")
    pool = DmaPool("ring", dev, 64, 64, 4096)
    kva, dma = pool.alloc()
    _kva2, _dma2 = pool.alloc()
    pool.free(kva, dma)
    assert pool.alloc() == (kva, dma)
    with pytest.raises(BadFreeError, match="bad dma"):
        pool.free(kva, dma + 64)
    pool.free(kva, dma)
    with pytest.raises(DoubleFreeError):
        pool.free(kva, dma)
    with pytest.raises(BadFreeError, match="bad vaddr"):
        pool.free(kva + 8, dma + 8)
    pool.destroy()
    (report,) = dev.platform.dma_debug.reports
    assert report.kind is DebugKind.POOL_BUSY and report.count == 1
    assert "dma_pool_destroy ring busy" in report.message
    with pytest.raises(ValueError):
        DmaPool("bad", dev, 64, align=3)
