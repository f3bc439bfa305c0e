"""The RDMA core: devices, the ``ib_dma_*`` wrappers, protection domains,
memory regions, completion queues, queue pairs, work requests and
completions.

Kernel counterparts: ``drivers/infiniband/core``, ``include/rdma/ib_verbs.h``.

The package exports what a consumer of the verbs uses; the ``IB_*``
spellings of the enums stay in :mod:`softrdma.verbs.enums`.
"""

from softrdma.verbs.ah import AddressHandle, AhAttr
from softrdma.verbs.cq import CompChannel, CompletionQueue
from softrdma.verbs.device import DeviceAttr, IbDevice, IbEvent, PortAttr
from softrdma.verbs.dma import (
    ib_dma_alloc_coherent,
    ib_dma_free_coherent,
    ib_dma_map_page,
    ib_dma_map_sg,
    ib_dma_map_single,
    ib_dma_mapping_error,
    ib_dma_max_seg_size,
    ib_dma_sync_single_for_cpu,
    ib_dma_sync_single_for_device,
    ib_dma_unmap_page,
    ib_dma_unmap_sg,
    ib_dma_unmap_single,
    ib_uses_virt_dma,
)
from softrdma.verbs.enums import (
    IbAccess,
    IbEventType,
    IbFlushLevel,
    IbFlushType,
    IbMrType,
    IbMtu,
    IbMwType,
    IbPdFlags,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbSendFlags,
    IbSrqAttrMask,
    IbSrqType,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import PostError, VerbsError
from softrdma.verbs.mr import MemoryRegion, MrKeyError, ib_inc_rkey
from softrdma.verbs.mw import MemoryWindow
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import IbSigType, QpAttr, QpCap, QpInitAttr, QueuePair, connect_qp
from softrdma.verbs.srq import SharedReceiveQueue, SrqAttr, SrqInitAttr
from softrdma.verbs.wr import (
    AtomicWR,
    AtomicWriteWR,
    BindMwWR,
    FlushWR,
    RdmaWR,
    RecvWR,
    RegWR,
    SendWR,
    Sge,
    UdWR,
    WorkCompletion,
)
from softrdma.verbs.xrcd import XrcDomain, ib_alloc_xrcd_user, ib_dealloc_xrcd_user, ib_open_qp

__all__ = [
    "AddressHandle",
    "AhAttr",
    "AtomicWR",
    "AtomicWriteWR",
    "BindMwWR",
    "CompChannel",
    "CompletionQueue",
    "DeviceAttr",
    "FlushWR",
    "IbAccess",
    "IbDevice",
    "IbEvent",
    "IbEventType",
    "IbFlushLevel",
    "IbFlushType",
    "IbMrType",
    "IbMtu",
    "IbMwType",
    "IbPdFlags",
    "IbQpAttrMask",
    "IbQpState",
    "IbQpType",
    "IbSendFlags",
    "IbSigType",
    "IbSrqAttrMask",
    "IbSrqType",
    "IbWcFlags",
    "IbWcOpcode",
    "IbWcStatus",
    "IbWrOpcode",
    "MemoryRegion",
    "MemoryWindow",
    "MrKeyError",
    "PortAttr",
    "PostError",
    "ProtectionDomain",
    "QpAttr",
    "QpCap",
    "QpInitAttr",
    "QueuePair",
    "RdmaWR",
    "RecvWR",
    "RegWR",
    "SendWR",
    "Sge",
    "SharedReceiveQueue",
    "SrqAttr",
    "SrqInitAttr",
    "UdWR",
    "VerbsError",
    "WorkCompletion",
    "XrcDomain",
    "connect_qp",
    "ib_alloc_xrcd_user",
    "ib_dealloc_xrcd_user",
    "ib_dma_alloc_coherent",
    "ib_dma_free_coherent",
    "ib_dma_map_page",
    "ib_dma_map_sg",
    "ib_dma_map_single",
    "ib_dma_mapping_error",
    "ib_dma_max_seg_size",
    "ib_dma_sync_single_for_cpu",
    "ib_dma_sync_single_for_device",
    "ib_dma_unmap_page",
    "ib_dma_unmap_sg",
    "ib_dma_unmap_single",
    "ib_inc_rkey",
    "ib_open_qp",
    "ib_uses_virt_dma",
]
