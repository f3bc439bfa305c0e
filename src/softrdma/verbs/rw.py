"""The RDMA read/write API: move a mapped scatterlist to or from one remote
buffer with RDMA WRITEs or READs, as many work requests as the device's SGE
limits need.

Kernel counterpart: ``drivers/infiniband/core/rw.c`` (``rdma_rw_ctx_init``,
``rdma_rw_ctx_wrs``, ``rdma_rw_ctx_post``, ``rdma_rw_ctx_destroy``) — the
plain (non-MR) path targets use for iWARP-free RDMA: SRP's and iSER's
targets fetch write data with READs and return read data with WRITEs
through it.

The direction is the local buffer's: ``DMA_TO_DEVICE`` (the device reads
local memory: RDMA WRITE to the remote buffer), ``DMA_FROM_DEVICE`` (the
device writes local memory: RDMA READ from the remote buffer). Every SGE
uses the PD's ``local_dma_lkey``; each WR takes at most ``max_send_sge``
SGEs for a WRITE, ``max_sge_rd`` for a READ, and the remote address moves
on with the bytes.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from softrdma.dma.types import DmaDirection
from softrdma.memory.scatterlist import Scatterlist
from softrdma.verbs.enums import IbSendFlags, IbWrOpcode
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.qp import QueuePair
from softrdma.verbs.wr import RdmaWR, SendWR, Sge

__all__ = ["RdmaRwCtx", "rdma_rw_ctx_init"]


@dataclass(frozen=True, slots=True)
class RdmaRwCtx:
    """``struct rdma_rw_ctx``: the RDMA WRs that move ``length`` bytes
    between a mapped scatterlist and ``(remote_addr, rkey)``."""

    opcode: IbWrOpcode
    wrs: tuple[RdmaWR, ...]
    length: int

    @property
    def nr_ops(self) -> int:
        """How many send-queue entries posting it takes (``ctx->nr_ops``)."""
        return len(self.wrs)

    def chain(self, wr_id: int, chain_wr: SendWR | None = None) -> list[SendWR]:
        """``rdma_rw_ctx_wrs``: the WRs to post, ``chain_wr`` after them.
        Without ``chain_wr`` the last RDMA WR is signaled with ``wr_id`` (its
        completion ends the transfer); with one, only the chain decides."""
        wrs: list[SendWR] = list(self.wrs)
        if chain_wr is not None:
            wrs.append(chain_wr)
        else:
            last = self.wrs[-1]
            wrs[-1] = RdmaWR(
                wr_id,
                last.opcode,
                last.sg_list,
                last.send_flags | IbSendFlags.SIGNALED,
                remote_addr=last.remote_addr,
                rkey=last.rkey,
            )
        return wrs

    def post(self, qp: QueuePair, wr_id: int, chain_wr: SendWR | None = None) -> None:
        """``rdma_rw_ctx_post``: post :meth:`chain` on ``qp``."""
        qp.post_send(self.chain(wr_id, chain_wr))


def rdma_rw_ctx_init(
    qp: QueuePair,
    sgl: Scatterlist,
    remote_addr: int,
    rkey: int,
    direction: DmaDirection,
    *,
    sg_offset: int = 0,
    length: int | None = None,
) -> RdmaRwCtx:
    """``rdma_rw_ctx_init``: the WRs for ``sgl`` (mapped with
    ``ib_dma_map_sg``), from ``sg_offset`` bytes in and ``length`` bytes
    long (the rest of the list by default), against ``(remote_addr,
    rkey)``. Raises :class:`VerbsError` (``EINVAL``) for an unmapped list, a
    range outside it, or ``DMA_BIDIRECTIONAL``."""
    if direction is DmaDirection.TO_DEVICE:
        opcode, max_sge = IbWrOpcode.RDMA_WRITE, qp.cap.max_send_sge
    elif direction is DmaDirection.FROM_DEVICE:
        opcode, max_sge = IbWrOpcode.RDMA_READ, min(qp.cap.max_send_sge, qp.device.attrs.max_sge_rd)
    else:
        raise VerbsError(
            errno.EINVAL, f"rdma_rw needs TO_DEVICE or FROM_DEVICE, not {direction.name}"
        )
    segments = sgl.dma_segments()
    if not segments:
        raise VerbsError(errno.EINVAL, "the scatterlist is not mapped (ib_dma_map_sg first)")
    total = sum(n for _, n in segments)
    if length is None:
        length = total - sg_offset
    if sg_offset < 0 or length <= 0 or sg_offset + length > total:
        raise VerbsError(
            errno.EINVAL, f"range {sg_offset}+{length} outside a scatterlist of {total} bytes"
        )
    lkey = qp.pd.local_dma_lkey
    # The local SGEs of the range, in order.
    sges: list[Sge] = []
    skip, left = sg_offset, length
    for dma, n in segments:
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, left)
        sges.append(Sge(dma + skip, take, lkey))
        left -= take
        skip = 0
        if not left:
            break
    wrs = []
    addr = remote_addr
    for i in range(0, len(sges), max_sge):
        chunk = tuple(sges[i : i + max_sge])
        nbytes = sum(s.length for s in chunk)
        wrs.append(RdmaWR(0, opcode, chunk, remote_addr=addr, rkey=rkey))
        addr += nbytes
    return RdmaRwCtx(opcode, tuple(wrs), length)
