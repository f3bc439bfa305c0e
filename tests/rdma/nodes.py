"""Building blocks for end-to-end RDMA tests: hosts with a device of a
given kind on a shared fabric, connected RC QPs, DMA-mapped buffers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

from softrdma.dma.platform import Platform
from softrdma.dma.types import DMA_BIDIRECTIONAL, DmaBackend, DmaDirection
from softrdma.drivers.hca import HwHca
from softrdma.drivers.roce import RoceDevice
from softrdma.drivers.rxe import SoftRoce
from softrdma.fabric.inproc import Fabric
from softrdma.fabric.link import Network
from softrdma.memory.host import Host, MiB
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.dma import (
    ib_dma_map_single,
    ib_dma_mapping_error,
    ib_dma_sync_single_for_cpu,
    ib_dma_sync_single_for_device,
    ib_dma_unmap_single,
)
from softrdma.verbs.enums import IbAccess, IbMtu, IbQpType, IbWcStatus
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import QpCap, QpInitAttr, QueuePair, connect_qp
from softrdma.verbs.wr import Sge, WorkCompletion

#: Device kinds: a CPU-copy device and a hardware HCA on each DMA platform.
KINDS = ("cpu", "hw-direct", "hw-iommu", "hw-swiotlb")
#: Pairings every end-to-end operation runs on.
PAIRINGS = (
    ("cpu", "cpu"),
    ("hw-direct", "hw-iommu"),
    ("hw-swiotlb", "cpu"),
    ("hw-iommu", "hw-swiotlb"),
    ("cpu", "hw-direct"),
)


def make_device(
    kind: str,
    fabric: Network,
    ip: str,
    *,
    debug: bool = True,
    mem: int = 64 * MiB,
    netdev_mtu: int | None = 4200,
) -> RoceDevice:
    host = Host(mem, dma32_limit=16 * MiB, lowmem_limit=mem * 3 // 4, name=f"host-{ip}")
    if kind == "cpu":
        return SoftRoce(Platform(host, dma_debug=debug), fabric, ip, netdev_mtu=netdev_mtu)
    backend = {
        "hw-direct": DmaBackend.DIRECT,
        "hw-iommu": DmaBackend.IOMMU,
        "hw-swiotlb": DmaBackend.SWIOTLB,
    }[kind]
    platform = Platform(
        host,
        iommu=backend == DmaBackend.IOMMU,
        swiotlb_force=backend == DmaBackend.SWIOTLB,
        dma_debug=debug,
    )
    return HwHca(platform, fabric, ip, backend=backend, netdev_mtu=netdev_mtu)


@dataclass
class Buffer:
    """A kmalloc'ed buffer mapped for the device with ``ib_dma_map_single``
    — the way kernel consumers hand memory to RDMA (one code path for
    every device kind)."""

    dev: RoceDevice
    size: int
    direction: DmaDirection = DMA_BIDIRECTIONAL
    kva: int = field(init=False)
    dma: int = field(init=False)

    def __post_init__(self) -> None:
        self.kva = self.dev.host.kmalloc(self.size)
        self.dma = ib_dma_map_single(self.dev, self.kva, self.size, self.direction)
        assert not ib_dma_mapping_error(self.dev, self.dma)

    def sge(self, lkey: int, offset: int = 0, length: int | None = None) -> Sge:
        return Sge(self.dma + offset, self.size - offset if length is None else length, lkey)

    def fill(self, data: bytes, offset: int = 0) -> None:
        """CPU writes, then hands the buffer to the device."""
        ib_dma_sync_single_for_cpu(self.dev, self.dma, self.size, self.direction)
        self.dev.host.cpu_write(self.kva + offset, data)
        ib_dma_sync_single_for_device(self.dev, self.dma, self.size, self.direction)

    def read(self, length: int | None = None, offset: int = 0) -> bytes:
        """Take the buffer back for the CPU and read it."""
        ib_dma_sync_single_for_cpu(self.dev, self.dma, self.size, self.direction)
        data = bytes(
            self.dev.host.cpu_read(
                self.kva + offset, self.size - offset if length is None else length
            )
        )
        ib_dma_sync_single_for_device(self.dev, self.dma, self.size, self.direction)
        return data

    def unmap(self) -> None:
        ib_dma_unmap_single(self.dev, self.dma, self.size, self.direction)


@dataclass
class Node:
    dev: RoceDevice
    pd: ProtectionDomain
    cq: CompletionQueue
    qp: QueuePair

    @property
    def host(self) -> Host:
        return self.dev.host

    def wait(self, n: int = 1, cq: CompletionQueue | None = None) -> list[WorkCompletion]:
        """Poll until ``n`` completions arrived (the simulated hardware runs
        inside poll)."""
        cq = cq or self.cq
        got: list[WorkCompletion] = []
        for _ in range(100):
            got += cq.poll(n - len(got))
            if len(got) >= n:
                return got
            if not self.dev.scheduler.simulated:
                cq.wait(1.0)  # real time: sleep until the progress thread delivers
        raise AssertionError(f"{self.dev.name}: {len(got)} of {n} completions: {got}")

    def wait_ok(self, n: int = 1) -> list[WorkCompletion]:
        wcs = self.wait(n)
        bad = [wc for wc in wcs if wc.status != IbWcStatus.SUCCESS]
        assert not bad, bad
        return wcs


def make_node(
    dev: RoceDevice, *, cqe: int = 256, cap: QpCap | None = None, pd_flags: int = 0
) -> Node:
    pd = dev.alloc_pd(pd_flags)
    cq = dev.create_cq(cqe)
    qp = dev.create_qp(
        pd,
        QpInitAttr(
            IbQpType.RC,
            cq,
            cq,
            cap
            or QpCap(
                max_send_wr=128, max_recv_wr=128, max_send_sge=8, max_recv_sge=8, max_inline_data=64
            ),
        ),
    )
    return Node(dev, pd, cq, qp)


class QpOptions(TypedDict, total=False):
    """The RC attributes ``connect_qp`` takes beyond the addresses and PSNs."""

    access: IbAccess
    max_rd_atomic: int
    timeout: int
    retry_cnt: int
    rnr_retry: int
    min_rnr_timer: int


class ConnectOptions(QpOptions, total=False):
    """What :func:`pair` passes on to :func:`connect`."""

    mtu: IbMtu | None
    psn_a: int
    psn_b: int


def connect(
    a: Node,
    b: Node,
    *,
    mtu: IbMtu | None = None,
    psn_a: int = 0,
    psn_b: int = 0,
    **kw: Unpack[QpOptions],
) -> None:
    connect_qp(
        a.qp,
        dest_qp_num=b.qp.qp_num,
        dgid=b.dev.query_gid(),
        rq_psn=psn_b,
        sq_psn=psn_a,
        path_mtu=mtu,
        **kw,
    )
    connect_qp(
        b.qp,
        dest_qp_num=a.qp.qp_num,
        dgid=a.dev.query_gid(),
        rq_psn=psn_a,
        sq_psn=psn_b,
        path_mtu=mtu,
        **kw,
    )


def pair(
    kind_a: str,
    kind_b: str,
    *,
    seed: int = 0,
    pd_flags: int = 0,
    debug: bool = True,
    link_rate: float | None = None,
    offload: bool = True,
    **kw: Unpack[ConnectOptions],
) -> tuple[Fabric, Node, Node]:
    fabric = Fabric(seed=seed, offload=offload)
    if link_rate is not None:
        fabric.link_rate = link_rate
    a = make_node(make_device(kind_a, fabric, "10.0.0.1", debug=debug), pd_flags=pd_flags)
    b = make_node(make_device(kind_b, fabric, "10.0.0.2", debug=debug), pd_flags=pd_flags)
    connect(a, b, **kw)
    return fabric, a, b


def ram_digest(host: Host) -> str:
    """A hash of the host's whole RAM, to prove nothing changed."""
    return hashlib.sha256(host.ram).hexdigest()


@dataclass
class FrBuffer:
    """Memory registered the way kernel ULPs do without a global rkey: a
    scatterlist mapped with ``ib_dma_map_sg``, a fast-registration MR from
    ``ib_alloc_mr`` + ``ib_map_mr_sg``, made valid by an ``IB_WR_REG_MR``
    posted on the node's QP. ``vmalloc`` memory gives a list of pages."""

    node: Node
    size: int
    access: IbAccess
    vmalloc: bool = True

    def __post_init__(self) -> None:
        from softrdma.memory.scatterlist import Scatterlist
        from softrdma.verbs.dma import ib_dma_map_sg
        from softrdma.verbs.enums import IbWrOpcode
        from softrdma.verbs.mr import ib_inc_rkey
        from softrdma.verbs.wr import RegWR

        dev = self.node.dev
        host = dev.host
        self.kva = host.vmalloc(self.size) if self.vmalloc else host.kmalloc(self.size)
        self.sgl = Scatterlist.from_buffer(host, self.kva, self.size)
        n = ib_dma_map_sg(dev, self.sgl, DMA_BIDIRECTIONAL)
        assert n
        pages = (self.size + 4095) // 4096 + 1
        self.mr = dev.alloc_mr(self.node.pd, pages)
        assert self.mr.map_sg(self.sgl, n) == n
        key = ib_inc_rkey(self.mr.rkey)
        self.node.qp.post_send(
            RegWR(0xFEE, IbWrOpcode.REG_MR, mr=self.mr, key=key, access=self.access)
        )
        (wc,) = self.node.wait(1)
        assert wc.status == IbWcStatus.SUCCESS, wc

    @property
    def rkey(self) -> int:
        return self.mr.rkey

    @property
    def iova(self) -> int:
        return self.mr.iova

    def cpu_read(self, length: int | None = None, offset: int = 0) -> bytes:
        self.node.dev.dma_device.sync_sg_for_cpu(self.sgl, DMA_BIDIRECTIONAL)
        data = bytes(self.node.host.cpu_read(self.kva + offset, (length or self.size - offset)))
        self.node.dev.dma_device.sync_sg_for_device(self.sgl, DMA_BIDIRECTIONAL)
        return data

    def cpu_write(self, data: bytes, offset: int = 0) -> None:
        self.node.dev.dma_device.sync_sg_for_cpu(self.sgl, DMA_BIDIRECTIONAL)
        self.node.host.cpu_write(self.kva + offset, data)
        self.node.dev.dma_device.sync_sg_for_device(self.sgl, DMA_BIDIRECTIONAL)
