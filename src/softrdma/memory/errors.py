"""Errors of the memory layer: bad physical or kernel virtual addresses,
bad frees and exhausted allocators."""

from __future__ import annotations

from softrdma.errors import AddressError, SoftRdmaError


class PhysAddressError(AddressError):
    """A physical address outside the host's memory (``pfn_valid`` fails)."""

    def __init__(self, address: int, why: str) -> None:
        super().__init__("phys", address, why)


class KvaError(AddressError):
    """A kernel virtual address that is not mapped, or not mapped the way
    the caller assumed (e.g. ``virt_to_phys`` of a vmalloc address)."""

    def __init__(self, address: int, why: str) -> None:
        super().__init__("kva", address, why)


class BadFreeError(SoftRdmaError, ValueError):
    """Freeing something that was not allocated by that allocator, or with
    the wrong size or order."""


class DoubleFreeError(BadFreeError):
    """Freeing something that has already been freed."""


class OutOfMemoryError(SoftRdmaError):
    """An allocator could not satisfy a request (the kernel's NULL / -ENOMEM)."""
