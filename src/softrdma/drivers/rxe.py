"""A CPU-copy RDMA device, like Linux Soft-RoCE (rxe), siw or rdmavt — and
ipath, whose DMA-address problem started the ``ib_dma_*`` wrappers.

It is not a DMA engine: its "DMA addresses" are kernel virtual addresses
and it moves data with the CPU through the kernel's page tables. It gets a
bus device with the virtual DMA backend, so ``ib_dma_map_*`` return kernel
addresses and ``ib_uses_virt_dma`` is true. Like rxe it has no reserved
lkey: each PD gets an internal DMA MR whose lkey is ``local_dma_lkey``.

Kernel counterparts: ``drivers/infiniband/sw/rxe`` (``rxe_register_device``
with no DMA device), ``kernel/dma/virt.c``.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from softrdma.dma.platform import Platform
from softrdma.dma.types import DmaBackend
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.link import Network
from softrdma.verbs.device import IB_DEVICE_MEM_MGT_EXTENSIONS, IB_DEVICE_XRC, DeviceAttr
from softrdma.verbs.enums import (
    IB_DEVICE_ATOMIC_WRITE,
    IB_DEVICE_FLUSH_GLOBAL,
    IB_DEVICE_FLUSH_PERSISTENT,
)

RXE_DEVICE_CAP_FLAGS = (
    IB_DEVICE_MEM_MGT_EXTENSIONS
    | IB_DEVICE_FLUSH_GLOBAL
    | IB_DEVICE_FLUSH_PERSISTENT
    | IB_DEVICE_ATOMIC_WRITE
)
"""rxe_param.h ``RXE_DEVICE_CAP_FLAGS`` (the part softrdma implements): rxe
advertises FLUSH to persistence too, and refuses it per MR when the pages are
not persistent memory, as every page of softrdma's host is
(:func:`~softrdma.verbs.mr.ib_check_mr_access`)."""


class SoftRoce(RoceDevice):
    """An rxe-like device on ``platform``'s host."""

    def __init__(
        self,
        platform: Platform,
        network: Network,
        ip: str | IPv4Address,
        *,
        name: str = "rxe0",
        debug: bool | None = None,
        netdev_mtu: int | None = None,
    ) -> None:
        dma_device = platform.add_device(
            name,
            backend=DmaBackend.VIRTUAL,
            max_seg_size=1 << 31,
            debug=debug,
            driver="softrdma_rxe",
        )
        # XRC goes beyond rxe (its XRC series was never merged): the RC
        # engines serve XRC INI / TGT QPs on every softrdma device.
        attrs = DeviceAttr(
            vendor_id=0xFFFFFF,
            device_cap_flags=RXE_DEVICE_CAP_FLAGS | IB_DEVICE_XRC,
            max_xrcds=0x10000,
        )
        super().__init__(name, dma_device, attrs, network, ip, netdev_mtu=netdev_mtu)
