"""The MAD layer: management datagrams on the GSI QP (QP1) — agents,
request / response matching, timeouts and retries, and the buffers
mapped through the ``ib_dma_*`` wrappers.

Kernel counterparts: ``drivers/infiniband/core/mad.c``, ``include/rdma/ib_mad.h``.
"""

from softrdma.mad.agent import (
    MadAgent,
    MadPort,
    MadPortError,
    MadRecvWc,
    MadSendBuf,
    MadSendWc,
    ib_mad_port,
)
from softrdma.mad.header import (
    MAD_SIZE,
    MadHdr,
    MadMethod,
    MadStatus,
    MalformedMad,
    MgmtClass,
    make_mad,
)

__all__ = [
    "MAD_SIZE",
    "MadAgent",
    "MadHdr",
    "MadMethod",
    "MadPort",
    "MadPortError",
    "MadRecvWc",
    "MadSendBuf",
    "MadSendWc",
    "MadStatus",
    "MalformedMad",
    "MgmtClass",
    "ib_mad_port",
    "make_mad",
]
