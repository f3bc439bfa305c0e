"""Host memory: physical pages, zones, the kernel address space, scatterlists.

Kernel counterparts: ``mm/``, ``include/linux/scatterlist.h``.
"""

from softrdma.memory.errors import (
    BadFreeError,
    DoubleFreeError,
    KvaError,
    OutOfMemoryError,
    PhysAddressError,
)
from softrdma.memory.host import GiB, Host, MiB
from softrdma.memory.layout import PAGE_SHIFT, PAGE_SIZE, PhysAddr, VirtAddr
from softrdma.memory.scatterlist import Scatterlist, ScatterlistEntry

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "BadFreeError",
    "DoubleFreeError",
    "GiB",
    "Host",
    "KvaError",
    "MiB",
    "OutOfMemoryError",
    "PhysAddr",
    "PhysAddressError",
    "Scatterlist",
    "ScatterlistEntry",
    "VirtAddr",
]
