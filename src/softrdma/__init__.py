"""softrdma: the Linux kernel's RDMA model — host memory, the DMA-mapping API,
RDMA verbs, the InfiniBand transport and RoCEv2 — as ordinary Python objects.

The names a consumer of the verbs reaches for are importable from here::

    from softrdma import Host, MiB, Platform, Fabric, SoftRoce, RdmaWR, Sge

Everything else lives in the layer packages, each importing only the ones
below it::

    memory, time -> dma -> verbs -> transport -> fabric, mad -> cm, drivers -> cli

and each package exports its own public names (``softrdma.dma``,
``softrdma.verbs``, ...).
"""

import logging as _logging

from softrdma.cm import RdmaCmEventType, RdmaCmId, RdmaConnParam, RdmaEventChannel
from softrdma.dma import (
    DMA_BIDIRECTIONAL,
    DMA_BIT_MASK,
    DMA_FROM_DEVICE,
    DMA_MAPPING_ERROR,
    DMA_TO_DEVICE,
    DmaDirection,
    DmaError,
    Platform,
)
from softrdma.drivers import HwHca, SoftRoce
from softrdma.errors import AddressError, SoftRdmaError
from softrdma.fabric import Fabric, UdpNetwork
from softrdma.memory import GiB, Host, MiB, Scatterlist
from softrdma.verbs import (
    AhAttr,
    AtomicWR,
    CompChannel,
    IbAccess,
    IbMtu,
    IbPdFlags,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbSendFlags,
    IbSigType,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
    MrKeyError,
    PostError,
    QpAttr,
    QpCap,
    QpInitAttr,
    RdmaWR,
    RecvWR,
    RegWR,
    SendWR,
    Sge,
    UdWR,
    VerbsError,
    WorkCompletion,
    connect_qp,
    ib_dma_map_sg,
    ib_dma_map_single,
    ib_dma_mapping_error,
    ib_dma_sync_single_for_cpu,
    ib_dma_sync_single_for_device,
    ib_dma_unmap_sg,
    ib_dma_unmap_single,
    ib_inc_rkey,
)

__version__ = "0.1.0"

__all__ = [
    "DMA_BIDIRECTIONAL",
    "DMA_BIT_MASK",
    "DMA_FROM_DEVICE",
    "DMA_MAPPING_ERROR",
    "DMA_TO_DEVICE",
    "AddressError",
    "AhAttr",
    "AtomicWR",
    "CompChannel",
    "DmaDirection",
    "DmaError",
    "Fabric",
    "GiB",
    "Host",
    "HwHca",
    "IbAccess",
    "IbMtu",
    "IbPdFlags",
    "IbQpAttrMask",
    "IbQpState",
    "IbQpType",
    "IbSendFlags",
    "IbSigType",
    "IbWcOpcode",
    "IbWcStatus",
    "IbWrOpcode",
    "MiB",
    "MrKeyError",
    "Platform",
    "PostError",
    "QpAttr",
    "QpCap",
    "QpInitAttr",
    "RdmaCmEventType",
    "RdmaCmId",
    "RdmaConnParam",
    "RdmaEventChannel",
    "RdmaWR",
    "RecvWR",
    "RegWR",
    "Scatterlist",
    "SendWR",
    "Sge",
    "SoftRdmaError",
    "SoftRoce",
    "UdWR",
    "UdpNetwork",
    "VerbsError",
    "WorkCompletion",
    "__version__",
    "connect_qp",
    "ib_dma_map_sg",
    "ib_dma_map_single",
    "ib_dma_mapping_error",
    "ib_dma_sync_single_for_cpu",
    "ib_dma_sync_single_for_device",
    "ib_dma_unmap_sg",
    "ib_dma_unmap_single",
    "ib_inc_rkey",
]

# A library logs; the application decides where it goes.
_logging.getLogger("softrdma").addHandler(_logging.NullHandler())
