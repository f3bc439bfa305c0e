"""The problem softrdma is built around (the 2006 bus_to_virt thread): a
consumer maps a buffer with the ib_dma wrappers and puts (DMA address,
rkey, length) in a SEND; the peer RDMA-WRITEs into it and RDMA-READs from
it. One code path, every device kind — whatever a "DMA address" is there."""

from __future__ import annotations

import struct

import pytest

from softrdma.dma.types import DMA_BIDIRECTIONAL
from softrdma.verbs.dma import (
    ib_dma_map_single,
    ib_dma_mapping_error,
    ib_dma_sync_single_for_cpu,
    ib_dma_sync_single_for_device,
    ib_dma_unmap_single,
    ib_uses_virt_dma,
)
from softrdma.verbs.enums import IbPdFlags, IbWrOpcode
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR, Sge
from tests.rdma.nodes import KINDS, Buffer, Node, pair

DESC = struct.Struct(">QII")  # like srp_direct_buf: va, key, len


def initiator_exposes(node: Node, size: int) -> tuple[int, int, bytes]:
    """The consumer's one code path: kmalloc, ib_dma_map_single, describe."""
    dev, host = node.dev, node.host
    kva = host.kmalloc(size)
    host.cpu_write(kva, b"I" * size)
    dma = ib_dma_map_single(dev, kva, size, DMA_BIDIRECTIONAL)
    assert not ib_dma_mapping_error(dev, dma)
    return kva, dma, DESC.pack(dma, node.pd.unsafe_global_rkey, size)


@pytest.mark.parametrize("initiator_kind", KINDS)
@pytest.mark.parametrize("target_kind", ["cpu", "hw-iommu"])
def test_dma_address_in_a_message_is_used_by_the_peer(
    initiator_kind: str, target_kind: str
) -> None:
    _fabric, ini, tgt = pair(initiator_kind, target_kind, pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    size = 20000
    kva, dma, desc = initiator_exposes(ini, size)
    if ib_uses_virt_dma(ini.dev):
        assert dma == kva, "virtual DMA: the address on the wire is the kernel address"
    else:
        assert dma != kva
    # the descriptor travels in a SEND
    msg = Buffer(ini.dev, 64)
    msg.fill(desc)
    inbox = Buffer(tgt.dev, 64)
    tgt.qp.post_recv(RecvWR(1, (inbox.sge(tgt.pd.local_dma_lkey),)))
    ini.qp.post_send(SendWR(1, IbWrOpcode.SEND, (msg.sge(ini.pd.local_dma_lkey, 0, DESC.size),)))
    ini.wait_ok()
    tgt.wait_ok()
    va, rkey, length = DESC.unpack(inbox.read(DESC.size))
    assert (va, length) == (dma, size)
    # the target writes into it, then reads it back
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    staging = Buffer(tgt.dev, size)
    staging.fill(data)
    lkey = tgt.pd.local_dma_lkey
    tgt.qp.post_send(
        RdmaWR(2, IbWrOpcode.RDMA_WRITE, (Sge(staging.dma, size, lkey),), remote_addr=va, rkey=rkey)
    )
    tgt.wait_ok()
    back = Buffer(tgt.dev, size)
    tgt.qp.post_send(
        RdmaWR(3, IbWrOpcode.RDMA_READ, (Sge(back.dma, size, lkey),), remote_addr=va, rkey=rkey)
    )
    tgt.wait_ok()
    assert back.read() == data
    # the initiator gives the buffer back to the CPU and sees the data
    ib_dma_sync_single_for_cpu(ini.dev, dma, size, DMA_BIDIRECTIONAL)
    assert bytes(ini.host.cpu_read(kva, size)) == data
    ib_dma_sync_single_for_device(ini.dev, dma, size, DMA_BIDIRECTIONAL)
    ib_dma_unmap_single(ini.dev, dma, size, DMA_BIDIRECTIONAL)
    for node in (ini, tgt):
        assert not node.dev.dma_device.platform.dma_debug.reports
