"""The root of softrdma's exception hierarchy.

Every error the stack raises on purpose derives from :class:`SoftRdmaError`,
so a caller can tell the model's typed errors from bugs in its own code.
Errors about an address carry the address space they violate (``phys``,
``kva``, ``dma``, ``iova``), as DESIGN.md asks.
"""

from __future__ import annotations


class SoftRdmaError(Exception):
    """Base class of every error softrdma raises deliberately."""


class AddressError(SoftRdmaError, ValueError):
    """An address that is not valid in its address space.

    ``space`` names the address space: ``"phys"``, ``"kva"``, ``"dma"`` or
    ``"iova"``.
    """

    def __init__(self, space: str, address: int, why: str) -> None:
        self.space = space
        self.address = address
        self.why = why
        super().__init__(f"{space} address {address:#x}: {why}")
