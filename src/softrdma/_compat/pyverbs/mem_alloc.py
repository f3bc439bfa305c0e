"""``pyverbs.mem_alloc``: memory of the process (``mmap``, ``munmap``,
``malloc``, ``posix_memalign``, ``free``) and raw access to it.

Every address is a user virtual address of the simulated process
(:mod:`pyverbs._softrdma`), so a buffer allocated here can be registered
with ``MR(pd, length, access, address=addr)`` and its pages are what the
device reaches. Allocations are page-granular mappings.
"""

from __future__ import annotations

import errno
import mmap as _mmap
import struct

from pyverbs import _softrdma as sim
from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError
from softrdma.memory.mm import UserAddressError, VmError

__all__ = [
    "MAP_ANONYMOUS_",
    "MAP_HUGETLB_",
    "MAP_PRIVATE_",
    "MAP_SHARED_",
    "PROT_READ_",
    "PROT_WRITE_",
    "free",
    "malloc",
    "mmap",
    "munmap",
    "posix_memalign",
    "read",
    "read32",
    "read64",
    "write",
    "writebe32",
    "writebe64",
]

PROT_NONE_ = _mmap.PROT_NONE if hasattr(_mmap, "PROT_NONE") else 0
PROT_READ_ = _mmap.PROT_READ
PROT_WRITE_ = _mmap.PROT_WRITE
PROT_EXEC_ = _mmap.PROT_EXEC
MAP_SHARED_ = _mmap.MAP_SHARED
MAP_PRIVATE_ = _mmap.MAP_PRIVATE
MAP_ANONYMOUS_ = _mmap.MAP_ANONYMOUS
MAP_FIXED_ = 0x10
MAP_GROWSDOWN_ = 0x100
MAP_LOCKED_ = 0x2000
MAP_NORESERVE_ = 0x4000
MAP_POPULATE_ = 0x8000
MAP_STACK_ = 0x20000
MAP_HUGETLB_ = 0x40000

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def mmap(
    addr: int | None = None,
    length: int = 0,
    prot: int = PROT_READ_ | PROT_WRITE_,
    flags: int = MAP_PRIVATE_ | MAP_ANONYMOUS_,
    fd: int = -1,
    offset: int = 0,
) -> int:
    """``mmap`` of anonymous memory; file and huge-page mappings are not
    supported (``EOPNOTSUPP``)."""
    if not flags & MAP_ANONYMOUS_ or fd != -1:
        raise PyverbsRDMAError("Failed to mmap: only anonymous memory", errno.EOPNOTSUPP)
    if flags & MAP_HUGETLB_:
        raise PyverbsRDMAError("Failed to mmap: no huge pages", errno.EOPNOTSUPP)
    try:
        return sim.process().mm.mmap(length, addr=addr if addr else None)
    except VmError as ex:
        raise PyverbsRDMAError("Failed to mmap memory", ex.errno) from None


def munmap(addr: int, length: int) -> None:
    """``munmap``."""
    try:
        sim.process().mm.munmap(addr, length)
    except VmError as ex:
        raise PyverbsRDMAError("Failed to munmap memory", ex.errno) from None


def malloc(size: int) -> int:
    """``malloc``: a page-granular allocation."""
    return posix_memalign(size)


def posix_memalign(size: int, alignment: int = 8) -> int:
    """``posix_memalign``: ``size`` bytes aligned to ``alignment`` (a power
    of two, at most a page: allocations are whole pages)."""
    if alignment <= 0 or alignment & (alignment - 1) or alignment > _mmap.PAGESIZE:
        raise PyverbsError(f"Failed to allocate memory: bad alignment {alignment}", errno.EINVAL)
    try:
        return sim.process().mm.mmap(max(size, 1))
    except VmError as ex:
        raise PyverbsError("Failed to allocate memory", ex.errno) from None


def free(ptr: int) -> None:
    """``free`` of :func:`malloc` / :func:`posix_memalign` memory."""
    mm = sim.process().mm
    vma = mm.find_vma(ptr)
    if vma is None or vma.start != ptr:
        raise PyverbsError(f"free({ptr:#x}): not an allocation", errno.EINVAL)
    mm.munmap(vma.start, vma.end - vma.start)


def _access(fn_name: str, addr: int, length: int) -> bytes:
    try:
        return sim.process().mm.read(addr, length)
    except UserAddressError as ex:
        raise PyverbsError(f"{fn_name}: {ex}", errno.EFAULT) from None


def read(addr: int, length: int, offset: int = 0) -> bytes:
    """``length`` bytes at ``addr + offset``."""
    return _access("read", addr + offset, length)


def write(addr: int, data: bytes | str, length: int, offset: int = 0) -> None:
    """Store the first ``length`` bytes of ``data`` at ``addr + offset``."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    try:
        sim.process().mm.write(addr + offset, raw[:length])
    except UserAddressError as ex:
        raise PyverbsError(f"write: {ex}", errno.EFAULT) from None


def read32(addr: int, offset: int = 0) -> int:
    """The host-order 32-bit value at ``addr + offset``."""
    return int(_U32.unpack(_access("read32", addr + offset, 4))[0])


def read64(addr: int, offset: int = 0) -> int:
    """The host-order 64-bit value at ``addr + offset``."""
    return int(_U64.unpack(_access("read64", addr + offset, 8))[0])


def writebe32(addr: int, val: int, offset: int = 0) -> None:
    """Store ``val`` big-endian in 32 bits at ``addr + offset``."""
    write(addr, _BE32.pack(val & 0xFFFFFFFF), 4, offset)


def writebe64(addr: int, val: int, offset: int = 0) -> None:
    """Store ``val`` big-endian in 64 bits at ``addr + offset``."""
    write(addr, _BE64.pack(val & 0xFFFFFFFFFFFFFFFF), 8, offset)
