"""Errors of the DMA layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from softrdma.errors import AddressError, SoftRdmaError

if TYPE_CHECKING:
    from softrdma.dma.debug import DmaDebugReport


class DmaError(SoftRdmaError):
    """Base class of DMA-layer errors."""


class DmaApiError(DmaError, ValueError):
    """A call the DMA API cannot carry out (invalid direction, a device
    that was released, unmapping a bounce slot that is not in use, ...)."""


class DmaAccessError(DmaError, AddressError):
    """A device access that reaches no memory: an address beyond the
    device's mask or the host's memory, or an unmapped kernel address of
    a virtual-DMA device. Nothing was read or written."""

    def __init__(self, space: str, address: int, why: str) -> None:
        AddressError.__init__(self, space, address, why)


class IommuFaultError(DmaAccessError):
    """A device access the IOMMU blocked (unmapped IOVA or missing
    permission). The fault is also recorded in ``Iommu.faults``."""


class DmaDebugError(DmaError):
    """Raised by :meth:`DmaDebug.strict` when the checker reports."""

    def __init__(self, report: DmaDebugReport) -> None:
        self.report = report
        super().__init__(report.message)
