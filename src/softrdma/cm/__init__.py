"""Connection management: the IB CM (REQ / REP / RTU / REJ / MRA / DREQ /
DREP over the MAD layer) and the RDMA CM on top of it.

Kernel counterparts: ``drivers/infiniband/core/cm.c``, ``cma.c``,
``include/rdma/ib_cm.h``, ``rdma_cm.h``; librdmacm.

The package exports the RDMA CM (what a consumer uses, as librdmacm), the
IB CM's connection IDs and states, and the message codecs.
"""

from softrdma.cm.cm_port import CmIdError, CmPort, IbCmId, ib_cm_port
from softrdma.cm.cma import (
    RdmaCmError,
    RdmaCmEvent,
    RdmaCmEventType,
    RdmaCmId,
    RdmaConnParam,
    RdmaEventChannel,
)
from softrdma.cm.cma_hdr import CmaHdr, RdmaPortSpace, rdma_ps_service_id
from softrdma.cm.ib_cm import CmEvent, CmEventType, CmState
from softrdma.cm.messages import (
    CmDrep,
    CmDreq,
    CmMessage,
    CmMra,
    CmRej,
    CmRejReason,
    CmRep,
    CmReq,
    CmRtu,
    decode_cm_mad,
    encode_cm_mad,
)

__all__ = [
    "CmDrep",
    "CmDreq",
    "CmEvent",
    "CmEventType",
    "CmIdError",
    "CmMessage",
    "CmMra",
    "CmPort",
    "CmRej",
    "CmRejReason",
    "CmRep",
    "CmReq",
    "CmRtu",
    "CmState",
    "CmaHdr",
    "IbCmId",
    "RdmaCmError",
    "RdmaCmEvent",
    "RdmaCmEventType",
    "RdmaCmId",
    "RdmaConnParam",
    "RdmaEventChannel",
    "RdmaPortSpace",
    "decode_cm_mad",
    "encode_cm_mad",
    "ib_cm_port",
    "rdma_ps_service_id",
]
