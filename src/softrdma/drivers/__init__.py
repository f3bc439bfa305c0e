"""The device models — the kernel's RDMA drivers: :class:`~softrdma.drivers.rxe.SoftRoce`
(a CPU-copy device like rxe), :class:`~softrdma.drivers.hca.HwHca` (a DMA
engine on a bus), and the RoCEv2 driver they share
(:class:`~softrdma.drivers.roce.RoceDevice`).

Kernel counterparts: ``drivers/infiniband/sw/rxe``, ``drivers/infiniband/hw/*``.
"""
