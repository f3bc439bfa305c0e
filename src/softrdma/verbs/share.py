"""One device used by several processes: what each process's copy of the
device must agree on with the others.

Kernel counterpart: there is one ``struct ib_device`` however many
processes open it through uverbs, so its QP numbers (``rxe_pool``), the
IB CM's connection IDs (``cm.local_id_table``) and listened service IDs
(``cm.listen_service_table``) are device-wide (the CM's, host-wide). Here
each process that opens the device runs its own copy of it; the copies
share one address on the wire, and the :class:`DeviceShare` that joins
them gives each copy a *slot*, carried in the numbers it hands out, so
that a packet arriving at the shared address can be routed to the
process that owns its QP or its connection:

* QP numbers: the slot in bits 16–23 (:data:`QPN_SLOT_SHIFT`), so slot 0
  numbers its QPs as an unshared device does (rxe's 17, 18, ...);
* IB CM local comm IDs: the slot in bits 24–31 (:data:`COMM_ID_SLOT_SHIFT`).

A REQ names no connection yet: it goes to the process listening on its
service ID, which each copy claims through the share before it listens.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["COMM_ID_SLOT_SHIFT", "MAX_SLOTS", "QPN_SLOT_SHIFT", "DeviceShare"]

#: Where a shared device's QP numbers carry the slot.
QPN_SLOT_SHIFT = 16
#: Where a shared device's IB CM local comm IDs carry the slot.
COMM_ID_SLOT_SHIFT = 24
#: Slots a device has: the top byte of a 24-bit QPN.
MAX_SLOTS = 256


class DeviceShare(Protocol):
    """The link between one process's copy of a shared device and the
    others (implemented by the network the device is on)."""

    @property
    def slot(self) -> int:
        """This copy's slot (0 for the process that opened the device first)."""
        ...

    def claim_service(self, service_id: int) -> bool:
        """Note that this copy listens on ``service_id``; False when another
        process's copy does (``ib_cm_listen``'s ``-EBUSY``)."""
        ...

    def release_service(self, service_id: int) -> None:
        """This copy no longer listens on ``service_id``."""
        ...
