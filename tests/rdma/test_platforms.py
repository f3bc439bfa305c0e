"""End to end on the platforms kernel RDMA really meets: an HCA that does
not snoop the CPU caches (the consumer's ``ib_dma_sync_*`` calls are what
make data visible), an IOMMU in lazy mode (``iommu.strict=0``: the IOTLB is
flushed in batches), and many QPs on one device sharing a CQ."""

from __future__ import annotations

import random
import struct

import pytest

from softrdma.dma.debug import DebugKind
from softrdma.dma.platform import Platform
from softrdma.dma.types import DMA_BIDIRECTIONAL, DmaBackend
from softrdma.drivers.hca import HwHca
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.memory.host import Host, MiB
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.dma import ib_dma_map_single, ib_dma_mapping_error, ib_dma_unmap_single
from softrdma.verbs.enums import (
    IbMtu,
    IbPdFlags,
    IbQpType,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import QpCap, QpInitAttr, QueuePair, connect_qp
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR, WorkCompletion
from tests.rdma.helpers_device import ALL_REMOTE, SIG, poll_all, settle, statuses
from tests.rdma.nodes import Buffer, FrBuffer, Node, connect, make_device, make_node

MTU = 1024


def new_host(name: str) -> Host:
    return Host(64 * MiB, dma32_limit=16 * MiB, lowmem_limit=48 * MiB, name=name)


def hca(
    fabric: Fabric,
    ip: str,
    backend: DmaBackend,
    *,
    coherent: bool = True,
    iommu_strict: bool = True,
) -> HwHca:
    platform = Platform(
        new_host(ip),
        iommu=backend == DmaBackend.IOMMU,
        iommu_strict=iommu_strict,
        swiotlb_force=backend == DmaBackend.SWIOTLB,
        dma_debug=True,
        clock=fabric.loop.time,
    )
    return HwHca(platform, fabric, ip, backend=backend, coherent=coherent, netdev_mtu=4200)


def no_debug_reports(*devs: RoceDevice) -> None:
    for dev in devs:
        assert not dev.dma_device.platform.dma_debug.reports, dev.dma_device.platform.dma_debug


# -- a non-coherent HCA: the write-back cache between CPU and RAM ----------------------

NON_COHERENT = {
    "direct": DmaBackend.DIRECT,
    "iommu": DmaBackend.IOMMU,
    "swiotlb": DmaBackend.SWIOTLB,
}


@pytest.mark.parametrize(
    ("backend_a", "backend_b", "vmalloc"),
    [
        pytest.param("direct", "iommu", False, id="direct-iommu-kmalloc"),
        pytest.param("direct", "iommu", True, id="direct-iommu-vmalloc"),
        pytest.param("iommu", "swiotlb", True, id="iommu-swiotlb-vmalloc"),
        pytest.param("swiotlb", "direct", True, id="swiotlb-direct-vmalloc"),
    ],
)
def test_non_coherent_hcas_every_operation(backend_a: str, backend_b: str, vmalloc: bool) -> None:
    """Both HCAs non-coherent; the consumer syncs as the DMA API says
    (``Buffer.fill`` / ``read`` and ``FrBuffer`` do): every operation moves
    exactly the bytes, and the DMA-API debug checker has nothing to say. The
    WRITE / READ / atomic target is a fast-registered MR over kmalloc
    (physically contiguous) or vmalloc (scattered) pages."""
    fabric = Fabric(seed=3)
    a = make_node(
        hca(fabric, "10.0.0.1", NON_COHERENT[backend_a], coherent=False),
        pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY,
    )
    b = make_node(
        hca(fabric, "10.0.0.2", NON_COHERENT[backend_b], coherent=False),
        pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY,
    )
    assert not a.dev.dma_device.coherent and not b.dev.dma_device.coherent
    connect(a, b, mtu=IbMtu.MTU_1024)
    la, lb = a.pd.local_dma_lkey, b.pd.local_dma_lkey
    rng = random.Random(9)
    msg, block = rng.randbytes(5000), rng.randbytes(3 * 4096)
    src, inbox, back = Buffer(a.dev, 32768), Buffer(b.dev, 32768), Buffer(a.dev, 32768)
    src.fill(msg + block)
    target = FrBuffer(b, 4 * 4096, ALL_REMOTE, vmalloc=vmalloc)
    target.cpu_write(struct.pack("<Q", 100), 3 * 4096 + 64)
    b.qp.post_recv(RecvWR(1, (inbox.sge(lb, 0, 2000), inbox.sge(lb, 8000, 3000))))
    a.qp.post_send(
        [
            SendWR(
                1, IbWrOpcode.SEND_WITH_IMM, (src.sge(la, 0, 5000),), send_flags=SIG, imm_data=9
            ),
            RdmaWR(
                2,
                IbWrOpcode.RDMA_WRITE,
                (src.sge(la, 5000, len(block)),),
                send_flags=SIG,
                remote_addr=target.iova,
                rkey=target.rkey,
            ),
            RdmaWR(
                3,
                IbWrOpcode.RDMA_READ,
                (back.sge(la, 0, len(block)),),
                send_flags=SIG,
                remote_addr=target.iova,
                rkey=target.rkey,
            ),
            AtomicWR(
                4,
                IbWrOpcode.ATOMIC_FETCH_AND_ADD,
                (back.sge(la, 32000, 8),),
                send_flags=SIG,
                remote_addr=target.iova + 3 * 4096 + 64,
                rkey=target.rkey,
                compare_add=5,
            ),
            AtomicWR(
                5,
                IbWrOpcode.ATOMIC_CMP_AND_SWP,
                (back.sge(la, 32008, 8),),
                send_flags=SIG,
                remote_addr=target.iova + 3 * 4096 + 64,
                rkey=target.rkey,
                compare_add=105,
                swap=7,
            ),
        ]
    )
    assert [wc.wr_id for wc in a.wait_ok(5)] == [1, 2, 3, 4, 5]
    (got,) = b.wait_ok()
    assert got.byte_len == 5000 and got.wc_flags & IbWcFlags.WITH_IMM and got.imm_data == 9
    assert inbox.read(2000) + inbox.read(3000, 8000) == msg
    assert target.cpu_read(len(block)) == block
    assert back.read(len(block)) == block
    assert struct.unpack("<QQ", back.read(16, 32000)) == (100, 105)
    assert struct.unpack("<Q", target.cpu_read(8, 3 * 4096 + 64))[0] == 7
    no_debug_reports(a.dev, b.dev)


@pytest.mark.parametrize("backend", ["direct", "iommu"])
def test_non_coherent_hca_without_syncs_sees_and_sends_stale_data(backend: str) -> None:
    """What the syncs are for. Receiving: the device wrote RAM, but a CPU
    read without ``ib_dma_sync_single_for_cpu`` hits the stale cache line.
    Sending: a CPU write without ``ib_dma_sync_single_for_device`` stays in
    the cache, and the HCA sends what RAM still holds."""
    fabric = Fabric(seed=4)
    a = make_node(make_device("cpu", fabric, "10.0.0.1"), pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    b = make_node(
        hca(fabric, "10.0.0.2", NON_COHERENT[backend], coherent=False),
        pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY,
    )
    connect(a, b)
    la, lb = a.pd.local_dma_lkey, b.pd.local_dma_lkey
    peer, mine = Buffer(a.dev, 4096), Buffer(b.dev, 4096)
    mine.fill(b"old!" * 1024)
    peer.fill(b"new!" * 1024)
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_WRITE,
            (peer.sge(la),),
            send_flags=SIG,
            remote_addr=mine.dma,
            rkey=b.pd.unsafe_global_rkey,
        )
    )
    a.wait_ok()
    assert bytes(b.host.cpu_read(mine.kva, 4)) == b"old!", "no sync_for_cpu: a stale line"
    assert mine.read(4) == b"new!", "after sync_for_cpu the CPU sees the device's write"
    # Sending from b: the CPU writes without giving the buffer back.
    peer.fill(b"zzzz" * 1024)
    b.host.cpu_write(mine.kva, b"CPU!" * 1024)
    b.qp.post_send(
        RdmaWR(
            2,
            IbWrOpcode.RDMA_WRITE,
            (mine.sge(lb),),
            send_flags=SIG,
            remote_addr=peer.dma,
            rkey=a.pd.unsafe_global_rkey,
        )
    )
    b.wait_ok()
    assert peer.read(4) == b"new!", "no sync_for_device: the HCA read RAM, not the cache"
    # done right
    mine.fill(b"CPU!" * 1024)
    b.qp.post_send(
        RdmaWR(
            3,
            IbWrOpcode.RDMA_WRITE,
            (mine.sge(lb),),
            send_flags=SIG,
            remote_addr=peer.dma,
            rkey=a.pd.unsafe_global_rkey,
        )
    )
    b.wait_ok()
    assert peer.read() == b"CPU!" * 1024


# -- an IOMMU in lazy mode -------------------------------------------------------------


def lazy_pair(strict: bool = False) -> tuple[Fabric, Node, Node]:
    fabric = Fabric(seed=6)
    a = make_node(make_device("cpu", fabric, "10.0.0.1"), pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    b = make_node(
        hca(fabric, "10.0.0.2", DmaBackend.IOMMU, iommu_strict=strict),
        pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY,
    )
    connect(a, b)
    return fabric, a, b


def test_lazy_iommu_through_many_map_unmap_cycles() -> None:
    """300 buffers mapped, written and read by the peer, unmapped: more
    than a flush queue holds (256), so the IOTLB is flushed in batches, and
    no IOVA is handed out again before the flush that retires it
    (``fq_ring_free`` frees IOVAs only after ``fq_flush_iotlb``)."""
    _fabric, a, b = lazy_pair()
    iommu = b.dev.dma_device.platform.iommu
    assert iommu is not None and not iommu.strict
    la, rkey = a.pd.local_dma_lkey, b.pd.unsafe_global_rkey
    src, back = Buffer(a.dev, 256), Buffer(a.dev, 256)
    retired: set[int] = set()  # IOVAs unmapped since the last IOTLB flush
    flushes = iommu.iotlb_flushes
    for i in range(300):
        kva = b.host.kmalloc(256)
        dma = ib_dma_map_single(b.dev, kva, 256, DMA_BIDIRECTIONAL)
        assert not ib_dma_mapping_error(b.dev, dma)
        if iommu.iotlb_flushes != flushes:
            flushes, retired = iommu.iotlb_flushes, set()
        assert dma not in retired, f"IOVA {dma:#x} reused before the IOTLB flush"
        data = bytes([i & 0xFF]) * 256
        src.fill(data)
        a.qp.post_send(
            [
                RdmaWR(
                    1,
                    IbWrOpcode.RDMA_WRITE,
                    (src.sge(la),),
                    send_flags=SIG,
                    remote_addr=dma,
                    rkey=rkey,
                ),
                RdmaWR(
                    2,
                    IbWrOpcode.RDMA_READ,
                    (back.sge(la),),
                    send_flags=SIG,
                    remote_addr=dma,
                    rkey=rkey,
                ),
            ]
        )
        assert statuses(a.wait_ok(2)) == [(1, IbWcStatus.SUCCESS), (2, IbWcStatus.SUCCESS)]
        assert back.read() == data
        ib_dma_unmap_single(b.dev, dma, 256, DMA_BIDIRECTIONAL)
        retired.add(dma)
        b.host.kfree(kva)
    assert iommu.iotlb_flushes >= 1
    no_debug_reports(b.dev)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lazy"])
def test_stale_iotlb_window_after_unmap(strict: bool) -> None:
    """Strict mode invalidates the IOTLB at unmap: the peer's next WRITE
    through the global rkey is blocked. Lazy mode leaves the entry until the
    flush: the same WRITE still lands (the trade-off ``iommu.strict=0``
    makes), and the DMA-API debug checker reports it."""
    _fabric, a, b = lazy_pair(strict)
    platform = b.dev.dma_device.platform
    src, tgt = Buffer(a.dev, 4096), Buffer(b.dev, 4096)
    tgt.fill(bytes(4096))

    def write(wr_id: int, data: bytes) -> WorkCompletion:
        src.fill(data)
        a.qp.post_send(
            RdmaWR(
                wr_id,
                IbWrOpcode.RDMA_WRITE,
                (src.sge(a.pd.local_dma_lkey),),
                send_flags=SIG,
                remote_addr=tgt.dma,
                rkey=b.pd.unsafe_global_rkey,
            )
        )
        (wc,) = a.wait(1)
        return wc

    assert write(1, b"1" * 4096).status == IbWcStatus.SUCCESS  # the IOTLB caches the pages
    tgt.unmap()
    with platform.dma_debug.capture() as reports:
        wc = write(2, b"2" * 4096)
    landed = bytes(b.host.cpu_read(tgt.kva, 4096))
    if strict:
        assert wc.status == IbWcStatus.REM_ACCESS_ERR
        assert landed == b"1" * 4096
        assert platform.iommu is not None and platform.iommu.faults
    else:
        assert wc.status == IbWcStatus.SUCCESS
        assert landed == b"2" * 4096
        assert [r.kind for r in reports] == [DebugKind.DEVICE_ACCESS_UNMAPPED]


def test_lazy_iotlb_entry_expires_with_the_flush_timer() -> None:
    fabric, a, b = lazy_pair()
    iommu = b.dev.dma_device.platform.iommu
    assert iommu is not None
    src, tgt = Buffer(a.dev, 4096), Buffer(b.dev, 4096)
    tgt.fill(bytes(4096))
    wr = RdmaWR(
        1,
        IbWrOpcode.RDMA_WRITE,
        (src.sge(a.pd.local_dma_lkey),),
        send_flags=SIG,
        remote_addr=tgt.dma,
        rkey=b.pd.unsafe_global_rkey,
    )
    src.fill(b"1" * 4096)
    a.qp.post_send(wr)
    a.wait_ok()
    tgt.unmap()
    fabric.loop.run(until=fabric.loop.now + 0.050)  # 5x IOVA_FQ_TIMEOUT, nothing else
    src.fill(b"2" * 4096)
    a.qp.post_send(wr)
    (wc,) = a.wait(1)
    assert bytes(b.host.cpu_read(tgt.kva, 4096)) == b"1" * 4096
    assert wc.status == IbWcStatus.REM_ACCESS_ERR


# -- many QPs on one device ----------------------------------------------------------------

NQP = 32


def test_32_rc_qps_between_two_devices_share_a_cq() -> None:
    """32 RC QPs per device, one PD and one CQ per device, all posting at
    once on a lossy fabric: every QP's completions arrive in its own order
    with its own QPN, every QP's data lands in its own slots, and 32
    FETCH_ADDs on one shared counter run exactly once each, in some serial
    order (their original values chain)."""
    fabric = Fabric(seed=32)
    dev_a = make_device("cpu", fabric, "10.0.0.1")
    dev_b = hca(fabric, "10.0.0.2", DmaBackend.IOMMU)
    cap = QpCap(max_send_wr=8, max_recv_wr=8, max_send_sge=2, max_recv_sge=2)
    pd_a, pd_b = dev_a.alloc_pd(), dev_b.alloc_pd(IbPdFlags.UNSAFE_GLOBAL_RKEY)
    cq_a, cq_b = dev_a.create_cq(1024), dev_b.create_cq(1024)

    def qp(dev: RoceDevice, pd: ProtectionDomain, cq: CompletionQueue) -> QueuePair:
        return dev.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq, cap))

    qps_a = [qp(dev_a, pd_a, cq_a) for _ in range(NQP)]
    qps_b = [qp(dev_b, pd_b, cq_b) for _ in range(NQP)]
    for qa, qb in zip(qps_a, qps_b, strict=True):
        connect_qp(qa, dest_qp_num=qb.qp_num, dgid=dev_b.query_gid(), path_mtu=IbMtu.MTU_1024)
        connect_qp(qb, dest_qp_num=qa.qp_num, dgid=dev_a.query_gid(), path_mtu=IbMtu.MTU_1024)
    b0 = Node(dev_b, pd_b, cq_b, qps_b[0])
    counter = FrBuffer(b0, 4096, ALL_REMOTE)
    counter.cpu_write(bytes(8))
    fabric.set_faults(drop=0.03, reorder=0.05)
    la, lb = pd_a.local_dma_lkey, pd_b.local_dma_lkey
    slot = 8192
    rng = random.Random(32)
    data = [rng.randbytes(slot) for _ in range(NQP)]
    src, back = Buffer(dev_a, NQP * slot), Buffer(dev_a, NQP * slot)
    inbox, dst = Buffer(dev_b, NQP * slot), Buffer(dev_b, NQP * slot)
    src.fill(b"".join(data))
    results = Buffer(dev_a, NQP * 8)
    for i, qb in enumerate(qps_b):
        qb.post_recv(RecvWR(i, (inbox.sge(lb, i * slot, slot),)))
    for i, qa in enumerate(qps_a):  # interleaved: each QP's WRs, QP after QP
        base = i * slot
        qa.post_send(
            [
                SendWR(10 * i + 1, IbWrOpcode.SEND, (src.sge(la, base, 3000),), send_flags=SIG),
                RdmaWR(
                    10 * i + 2,
                    IbWrOpcode.RDMA_WRITE,
                    (src.sge(la, base, slot),),
                    send_flags=SIG,
                    remote_addr=dst.dma + base,
                    rkey=pd_b.unsafe_global_rkey,
                ),
                RdmaWR(
                    10 * i + 3,
                    IbWrOpcode.RDMA_READ,
                    (back.sge(la, base, slot),),
                    send_flags=SIG,
                    remote_addr=dst.dma + base,
                    rkey=pd_b.unsafe_global_rkey,
                ),
                AtomicWR(
                    10 * i + 4,
                    IbWrOpcode.ATOMIC_FETCH_AND_ADD,
                    (results.sge(la, 8 * i, 8),),
                    send_flags=SIG,
                    remote_addr=counter.iova,
                    rkey=counter.rkey,
                    compare_add=i + 1,
                ),
            ]
        )
    settle(fabric)
    sent, received = poll_all(cq_a), poll_all(cq_b)
    assert len(sent) == 4 * NQP and len(received) == NQP
    assert {wc.status for wc in sent + received} == {IbWcStatus.SUCCESS}
    expected_ops = [
        IbWcOpcode.SEND,
        IbWcOpcode.RDMA_WRITE,
        IbWcOpcode.RDMA_READ,
        IbWcOpcode.FETCH_ADD,
    ]
    adds: list[tuple[int, int]] = []
    for i, (qa, qb) in enumerate(zip(qps_a, qps_b, strict=True)):
        mine = [wc for wc in sent if wc.qp_num == qa.qp_num]
        assert [wc.wr_id for wc in mine] == [10 * i + k for k in (1, 2, 3, 4)]
        assert [wc.opcode for wc in mine] == expected_ops
        (got,) = [wc for wc in received if wc.qp_num == qb.qp_num]
        assert (got.wr_id, got.byte_len) == (i, 3000)
        assert inbox.read(3000, i * slot) == data[i][:3000]
        assert dst.read(slot, i * slot) == data[i]
        assert back.read(slot, i * slot) == data[i]
        adds.append((struct.unpack("<Q", results.read(8, 8 * i))[0], i + 1))
    total = 0
    for orig, add in sorted(adds):
        assert orig == total, "each FETCH_ADD saw exactly the ones before it"
        total += add
    assert struct.unpack("<Q", counter.cpu_read(8))[0] == total == NQP * (NQP + 1) // 2
    assert fabric.stats.dropped and fabric.stats.reordered
    no_debug_reports(dev_b)
