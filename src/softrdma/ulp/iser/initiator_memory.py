"""The iSER initiator's data buffers: DMA mapping and fast registration.

Kernel counterpart: ``drivers/infiniband/ulp/iser/iser_memory.c`` —
``iser_dma_map_task_data`` (``ib_dma_map_sg`` of the block layer's pages),
``iser_fast_reg_mr``'s page list (``ib_map_mr_sg`` on an MR of the
connection's FR pool), ``iser_dma_unmap_task_data``; and the immediate
data's SGEs of ``iser_send_command``.
"""

from __future__ import annotations

from collections import Counter

from softrdma.dma.types import DMA_FROM_DEVICE, DMA_TO_DEVICE
from softrdma.ulp.iser.initiator_conn import MAX_SEND_SGE, IserConn
from softrdma.ulp.iser.initiator_task import IserRequest
from softrdma.ulp.srp.initiator_map import SrpBuffer
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_unmap_sg
from softrdma.verbs.wr import Sge

__all__ = ["imm_sges", "map_task_data", "unmap_task_data"]


def map_task_data(
    dev: IbDevice, ic: IserConn, req: IserRequest, length: int, highmem: bool, stats: Counter[str]
) -> bool:
    """``iser_dma_map_task_data`` + ``iser_fast_reg_mr``'s page list: the
    block layer's pages (highmem ones with ``highmem``), ``ib_dma_map_sg``,
    ``ib_map_mr_sg`` on a descriptor of ``ic``'s pool; False (everything
    undone, ``map_busy`` counted) if the DMA mapping fails (a full bounce
    pool) or the MR cannot take the mapped list."""
    assert ic.pool is not None
    buf = SrpBuffer(dev.host, length, highmem=highmem)
    direction = DMA_FROM_DEVICE if req.read_length else DMA_TO_DEVICE
    if req.write_data:
        buf.write(req.write_data)
    if not ib_dma_map_sg(dev, buf.sgl, direction):
        stats["map_busy"] += 1
        buf.free()
        return False
    fr = ic.pool.get()
    assert fr is not None
    nents = len(buf.sgl.dma_segments())
    if fr.mr.map_sg(buf.sgl) != nents:
        stats["map_busy"] += 1
        ic.pool.put([fr])
        ib_dma_unmap_sg(dev, buf.sgl, direction)
        buf.free()
        return False
    stats["highmem_pages"] += sum(page.is_highmem for page in buf.pages)
    req.buf, req.direction, req.fr = buf, direction, fr
    return True


def unmap_task_data(dev: IbDevice, req: IserRequest) -> None:
    """``iser_dma_unmap_task_data``: unmap (the CPU then sees what the device
    wrote), copy a read's data out if it completed, free the pages."""
    buf = req.buf
    if buf is None:
        return
    assert req.direction is not None
    ib_dma_unmap_sg(dev, buf.sgl, req.direction)
    rsp = req.response
    if req.read_length and rsp is not None and req.error is None:
        got = req.read_length - (rsp.residual_count if rsp.underflow else 0)
        req.data = buf.read(max(0, got))
    buf.free()
    req.buf = None


def imm_sges(req: IserRequest, imm: int, lkey: int) -> tuple[Sge, ...]:
    """The SGEs for the first ``imm`` bytes of the mapped buffer.

    ib_iser names them through the MR (``mem_reg->sge``, the MR's lkey).
    Here they are the DMA segments under the PD's ``local_dma_lkey``
    (``lkey``) instead: with SEND_WITH_INV the target may invalidate the MR
    while a retransmission of this SEND (its ACK lost) still has to read
    the data, which the MR's lkey would then refuse. Falls back to the MR
    when the segments exceed the SGEs."""
    assert req.buf is not None and req.fr is not None
    out: list[Sge] = []
    left = imm
    for dma, length in req.buf.sgl.dma_segments():
        n = min(length, left)
        out.append(Sge(dma, n, lkey))
        left -= n
        if not left:
            break
    if len(out) > MAX_SEND_SGE - 1:
        return (Sge(req.fr.mr.iova, imm, req.fr.key),)
    return tuple(out)
