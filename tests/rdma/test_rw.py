"""The RDMA read/write API (``rdma_rw_ctx``): a mapped scatterlist moved to
and from one remote buffer, split by the QP's SGE limit, on every device
kind."""

from __future__ import annotations

import pytest

from softrdma.dma.types import DMA_BIDIRECTIONAL, DMA_FROM_DEVICE, DMA_TO_DEVICE
from softrdma.fabric.inproc import Fabric
from softrdma.memory.scatterlist import Scatterlist
from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_unmap_sg
from softrdma.verbs.enums import IbPdFlags, IbQpType, IbWcStatus, IbWrOpcode
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.qp import IbSigType, QpCap, QpInitAttr, connect_qp
from softrdma.verbs.rw import rdma_rw_ctx_init
from tests.rdma.nodes import Buffer, make_device

PAGES = 7


@pytest.mark.parametrize(
    "kinds", [("cpu", "hw-iommu"), ("hw-iommu", "cpu"), ("hw-swiotlb", "hw-direct")], ids="-".join
)
def test_write_then_read_a_vmalloc_list_in_sge_chunks(kinds: tuple[str, str]) -> None:
    fabric = Fabric(seed=4)
    a = make_device(kinds[0], fabric, "10.0.0.1")
    b = make_device(kinds[1], fabric, "10.0.0.2")
    qps = []
    for dev in (a, b):
        pd = dev.alloc_pd(IbPdFlags.UNSAFE_GLOBAL_RKEY)
        cq = dev.create_cq(64)
        cap = QpCap(max_send_wr=32, max_send_sge=2)
        # As kernel ULPs create them: only WRs asking for it complete.
        attr = QpInitAttr(IbQpType.RC, cq, cq, cap, sq_sig_type=IbSigType.REQ_WR)
        qps.append((pd, cq, dev.create_qp(pd, attr)))
    (_, ca, qa), (pb, _, qb) = qps
    connect_qp(qa, dest_qp_num=qb.qp_num, dgid=b.query_gid())
    connect_qp(qb, dest_qp_num=qa.qp_num, dgid=a.query_gid())
    # Local: 7 scattered pages of vmalloc memory; remote: one buffer.
    kva = a.host.vmalloc(PAGES * 4096)
    data = bytes(range(256)) * 16 * PAGES
    a.host.cpu_write(kva, data)
    sgl = Scatterlist.from_buffer(a.host, kva, PAGES * 4096)
    assert ib_dma_map_sg(a, sgl, DMA_BIDIRECTIONAL)
    remote = Buffer(b, PAGES * 4096)
    write = rdma_rw_ctx_init(qa, sgl, remote.dma, pb.unsafe_global_rkey, DMA_TO_DEVICE,
                             sg_offset=100, length=PAGES * 4096 - 200)  # fmt: skip
    assert write.opcode is IbWrOpcode.RDMA_WRITE
    segs = len(sgl.dma_segments())
    assert write.nr_ops == -(-segs // 2)  # two SGEs a WR
    write.post(qa, wr_id=7)
    [wc] = ca.poll(1)
    assert wc.status is IbWcStatus.SUCCESS and wc.wr_id == 7
    assert remote.read(PAGES * 4096 - 200) == data[100:-100]
    # Back the other way: a READ into the list, over other bytes.
    a.host.cpu_write(kva, bytes(PAGES * 4096))
    read = rdma_rw_ctx_init(qa, sgl, remote.dma, pb.unsafe_global_rkey, DMA_FROM_DEVICE,
                            sg_offset=100, length=PAGES * 4096 - 200)  # fmt: skip
    read.post(qa, wr_id=8)
    [wc] = ca.poll(1)
    assert wc.status is IbWcStatus.SUCCESS and wc.opcode.name == "RDMA_READ"
    ib_dma_unmap_sg(a, sgl, DMA_BIDIRECTIONAL)
    assert bytes(a.host.cpu_read(kva + 100, PAGES * 4096 - 200)) == data[100:-100]


def test_bad_ranges_and_directions_are_refused() -> None:
    fabric = Fabric()
    a = make_device("cpu", fabric, "10.0.0.1")
    pd = a.alloc_pd()
    cq = a.create_cq(8)
    qp = a.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq))
    kva = a.host.kmalloc(4096)
    sgl = Scatterlist.from_buffer(a.host, kva, 4096)
    with pytest.raises(VerbsError, match="not mapped"):
        rdma_rw_ctx_init(qp, sgl, 0, 0, DMA_TO_DEVICE)
    ib_dma_map_sg(a, sgl, DMA_TO_DEVICE)
    with pytest.raises(VerbsError, match="outside"):
        rdma_rw_ctx_init(qp, sgl, 0, 0, DMA_TO_DEVICE, sg_offset=4000, length=200)
    with pytest.raises(VerbsError, match="TO_DEVICE or FROM_DEVICE"):
        rdma_rw_ctx_init(qp, sgl, 0, 0, DMA_BIDIRECTIONAL)
