"""A hardware RDMA HCA: a DMA engine on a bus.

Every byte it moves goes through its bus device's ``dma_read`` /
``dma_write``, so the platform decides what its DMA addresses are: bus
addresses (direct), bounce slots (swiotlb) or IOVAs (an IOMMU, which blocks
what the driver did not map and records the fault), and the DMA-API debug
checker sees every mapping and access. Like mlx5 it has a reserved
``local_dma_lkey`` valid in every PD (``IBK_LOCAL_DMA_LKEY``).

Kernel counterparts: ``drivers/infiniband/hw/*`` (mlx5's
``ib_register_device(…, &pdev->dev)``: the HCA's own DMA device).
"""

from __future__ import annotations

from ipaddress import IPv4Address

from softrdma.dma.platform import Platform
from softrdma.dma.types import DMA_BIT_MASK, DmaBackend
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.link import Network
from softrdma.verbs.device import (
    IB_DEVICE_MEM_MGT_EXTENSIONS,
    IB_DEVICE_XRC,
    IBK_LOCAL_DMA_LKEY,
    DeviceAttr,
)
from softrdma.verbs.enums import IB_DEVICE_ATOMIC_WRITE, IB_DEVICE_FLUSH_GLOBAL

HCA_DEVICE_CAP_FLAGS = (
    IB_DEVICE_MEM_MGT_EXTENSIONS | IB_DEVICE_FLUSH_GLOBAL | IB_DEVICE_ATOMIC_WRITE
)
"""What the HCA's transport executes: RC FLUSH to global visibility and ATOMIC
WRITE (IBTA annex A19), not FLUSH to persistence — it has no persistent memory
to place data in, so it does not claim ``IB_DEVICE_FLUSH_PERSISTENT``."""

#: The reserved lkey, as firmware hands one to mlx5 (index 1, key byte 0).
HCA_RESERVED_LKEY = 0x100


class HwHca(RoceDevice):
    """A hardware HCA on ``platform``: its DMA backend is the platform's
    default (IOMMU if it has one) unless ``backend`` says otherwise."""

    def __init__(
        self,
        platform: Platform,
        network: Network,
        ip: str | IPv4Address,
        *,
        name: str = "mlx0",
        backend: DmaBackend | None = None,
        dma_mask: int = DMA_BIT_MASK(64),
        coherent: bool = True,
        debug: bool | None = None,
        netdev_mtu: int | None = None,
    ) -> None:
        dma_device = platform.add_device(
            name,
            backend=backend,
            dma_mask=dma_mask,
            coherent=coherent,
            max_seg_size=1 << 31,
            debug=debug,
            driver="softrdma_hca",
        )
        attrs = DeviceAttr(
            vendor_id=0x02C9,
            kernel_cap_flags=IBK_LOCAL_DMA_LKEY,
            device_cap_flags=HCA_DEVICE_CAP_FLAGS | IB_DEVICE_XRC,
            max_xrcds=0x10000,
        )
        super().__init__(
            name,
            dma_device,
            attrs,
            network,
            ip,
            netdev_mtu=netdev_mtu,
            local_dma_lkey=HCA_RESERVED_LKEY,
        )
