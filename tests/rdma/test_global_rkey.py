"""The unsafe global rkey (``IB_PD_UNSAFE_GLOBAL_RKEY``, once
``ib_get_dma_mr``): an rkey that admits any DMA address of the device. On a
direct-mapped HCA that is all host memory; behind an IOMMU, only what is
mapped right now."""

from __future__ import annotations

from softrdma.dma.debug import DebugKind
from softrdma.verbs.enums import IbPdFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.wr import RdmaWR
from tests.rdma.nodes import Buffer, pair

SECRET = b"kernel secret, never mapped for DMA"


def test_direct_mapped_hca_exposes_all_host_memory() -> None:
    _fabric, a, b = pair("cpu", "hw-direct", pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    rkey = b.pd.unsafe_global_rkey
    assert rkey
    secret = b.host.kmalloc(64)
    b.host.cpu_write(secret, SECRET)
    bus_address = b.host.virt_to_phys(secret) + b.dev.dma_device.bus_offset
    loot = Buffer(a.dev, 64)
    read = RdmaWR(
        1,
        IbWrOpcode.RDMA_READ,
        (loot.sge(a.pd.local_dma_lkey, 0, len(SECRET)),),
        remote_addr=bus_address,
        rkey=rkey,
    )
    with b.dev.dma_device.platform.dma_debug.capture() as reports:
        a.qp.post_send(read)
        a.wait_ok()
    assert loot.read(len(SECRET)) == SECRET, "the peer read memory nobody mapped"
    # Nothing stopped it, but the DMA-API debug checker saw the HCA touch
    # memory outside every live mapping.
    (report,) = reports
    assert report.kind is DebugKind.DEVICE_ACCESS_UNMAPPED and report.dma_address == bus_address
    # ... and can write it, too
    a.qp.post_send(
        RdmaWR(
            2,
            IbWrOpcode.RDMA_WRITE,
            (loot.sge(a.pd.local_dma_lkey, 0, 6),),
            remote_addr=bus_address,
            rkey=rkey,
        )
    )
    a.wait_ok()
    assert bytes(b.host.cpu_read(secret, 6)) == SECRET[:6]


def test_iommu_limits_the_global_rkey_to_live_mappings() -> None:
    _fabric, a, b = pair("cpu", "hw-iommu", pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    rkey = b.pd.unsafe_global_rkey
    iommu = b.dev.dma_device.platform.iommu
    assert iommu is not None
    shared = Buffer(b.dev, 4096)  # mapped: reachable through the global rkey
    shared.fill(b"shared on purpose")
    loot = Buffer(a.dev, 4096)
    lkey = a.pd.local_dma_lkey
    a.qp.post_send(
        RdmaWR(1, IbWrOpcode.RDMA_READ, (loot.sge(lkey, 0, 17),), remote_addr=shared.dma, rkey=rkey)
    )
    a.wait_ok()
    assert loot.read(17) == b"shared on purpose"
    secret = b.host.kmalloc(64)
    b.host.cpu_write(secret, SECRET)
    guess = b.host.virt_to_phys(secret)  # what a direct-mapped bus address would be
    a.qp.post_send(
        RdmaWR(2, IbWrOpcode.RDMA_READ, (loot.sge(lkey, 100, 64),), remote_addr=guess, rkey=rkey)
    )
    (wc,) = a.wait(1)
    assert wc.status == IbWcStatus.REM_ACCESS_ERR
    assert iommu.faults and iommu.faults[-1].iova == guess and iommu.faults[-1].access == "read"
    assert loot.read(64, 100) == bytes(64)


def test_cpu_copy_global_rkey_reaches_kernel_addresses() -> None:
    _fabric, a, b = pair("hw-direct", "cpu", pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    secret = b.host.kmalloc(64)
    b.host.cpu_write(secret, SECRET)
    loot = Buffer(a.dev, 64)
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_READ,
            (loot.sge(a.pd.local_dma_lkey, 0, len(SECRET)),),
            remote_addr=secret,
            rkey=b.pd.unsafe_global_rkey,
        )
    )
    a.wait_ok()
    assert loot.read(len(SECRET)) == SECRET, "a CPU-copy device's DMA address is the kernel address"
