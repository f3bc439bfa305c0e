"""The device models — the kernel's RDMA drivers: :class:`SoftRoce` (a
CPU-copy device like rxe), :class:`HwHca` (a DMA engine on a bus), and the
RoCEv2 driver they share (:class:`RoceDevice`).

Kernel counterparts: ``drivers/infiniband/sw/rxe``, ``drivers/infiniband/hw/*``.
"""

from softrdma.drivers.hca import HwHca
from softrdma.drivers.roce import RoceDevice
from softrdma.drivers.rxe import SoftRoce

__all__ = ["HwHca", "RoceDevice", "SoftRoce"]
