"""``softrdma demo rdma``: the problem softrdma is built around, end to end.

Two hosts on a lossy fabric: an rxe-like CPU-copy device and a hardware
HCA behind an IOMMU. The initiator maps a buffer with ``ib_dma_map_single``
and puts (DMA address, rkey, length) in a SEND — as SRP does — and the
target RDMA-WRITEs into it and RDMA-READs from it. The same consumer code
runs against each device kind; what the DMA address *is* differs. Then the
unsafe global rkey with and without an IOMMU, and a remote access
violation answered with a NAK. Every frame goes to a pcap.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TextIO

from softrdma.dma.platform import Platform
from softrdma.dma.types import DMA_BIDIRECTIONAL, DmaBackend
from softrdma.drivers.hca import HwHca
from softrdma.drivers.roce import RoceDevice
from softrdma.drivers.rxe import SoftRoce
from softrdma.fabric.inproc import Fabric
from softrdma.memory.host import Host, MiB
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.dma import (
    ib_dma_map_single,
    ib_dma_mapping_error,
    ib_dma_sync_single_for_cpu,
    ib_uses_virt_dma,
)
from softrdma.verbs.enums import IbPdFlags, IbQpType, IbWcStatus, IbWrOpcode
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import QpInitAttr, QueuePair, connect_qp
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR, Sge, WorkCompletion

DESC = struct.Struct(">QII")  # va, rkey, length — the shape of srp_direct_buf


@dataclass
class End:
    dev: RoceDevice
    pd: ProtectionDomain
    cq: CompletionQueue
    qp: QueuePair

    def buffer(self, size: int) -> tuple[int, int]:
        """The consumer's one code path: kmalloc + ib_dma_map_single."""
        kva = self.dev.host.kmalloc(size)
        dma = ib_dma_map_single(self.dev, kva, size, DMA_BIDIRECTIONAL)
        assert not ib_dma_mapping_error(self.dev, dma)
        return kva, dma

    def sge(self, dma: int, length: int) -> Sge:
        return Sge(dma, length, self.pd.local_dma_lkey)

    def wait(self) -> WorkCompletion:
        while True:
            wcs = self.cq.poll(1)
            if wcs:
                return wcs[0]


def end(dev: RoceDevice) -> End:
    pd = dev.alloc_pd(IbPdFlags.UNSAFE_GLOBAL_RKEY)
    cq = dev.create_cq(64)
    return End(dev, pd, cq, dev.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq)))


def link(a: End, b: End) -> None:
    connect_qp(a.qp, dest_qp_num=b.qp.qp_num, dgid=b.dev.query_gid(), timeout=8)
    connect_qp(b.qp, dest_qp_num=a.qp.qp_num, dgid=a.dev.query_gid(), timeout=8)


def _describe(dev: RoceDevice, kva: int, dma: int) -> str:
    if ib_uses_virt_dma(dev):
        return f"dma {dma:#x} = the kernel virtual address (virtual DMA)"
    backend = dev.dma_device.backend
    if backend == DmaBackend.IOMMU:
        return f"dma {dma:#x} = an IOVA (kva {kva:#x}, phys {dev.host.virt_to_phys(kva):#x})"
    return f"dma {dma:#x} = a bus address (phys {dev.host.virt_to_phys(kva):#x})"


def seed_scenario(ini: End, tgt: End, out: TextIO) -> bool:
    size = 64 * 1024
    kva, dma = ini.buffer(size)
    out.write(
        f"  initiator {ini.dev.name}: kmalloc({size}) at kva {kva:#x}; {_describe(ini.dev, kva, dma)}\n"
    )
    msg_kva, msg = ini.buffer(64)
    ini.dev.host.cpu_write(msg_kva, DESC.pack(dma, ini.pd.unsafe_global_rkey, size))
    inbox_kva, inbox = tgt.buffer(64)
    tgt.qp.post_recv(RecvWR(1, (tgt.sge(inbox, 64),)))
    ini.qp.post_send(SendWR(1, IbWrOpcode.SEND, (ini.sge(msg, DESC.size),)))
    ini.wait()
    tgt.wait()
    ib_dma_sync_single_for_cpu(tgt.dev, inbox, 64, DMA_BIDIRECTIONAL)
    va, rkey, length = DESC.unpack(bytes(tgt.dev.host.cpu_read(inbox_kva, DESC.size)))
    out.write(
        f"  target {tgt.dev.name} got the descriptor in a SEND: va {va:#x} rkey {rkey:#x} len {length}\n"
    )
    data = bytes((i * 131) & 0xFF for i in range(size))
    stage_kva, stage = tgt.buffer(size)
    tgt.dev.host.cpu_write(stage_kva, data)
    tgt.qp.post_send(
        RdmaWR(2, IbWrOpcode.RDMA_WRITE, (tgt.sge(stage, size),), remote_addr=va, rkey=rkey)
    )
    w = tgt.wait()
    back_kva, back = tgt.buffer(size)
    tgt.qp.post_send(
        RdmaWR(3, IbWrOpcode.RDMA_READ, (tgt.sge(back, size),), remote_addr=va, rkey=rkey)
    )
    r = tgt.wait()
    ib_dma_sync_single_for_cpu(tgt.dev, back, size, DMA_BIDIRECTIONAL)
    ib_dma_sync_single_for_cpu(ini.dev, dma, size, DMA_BIDIRECTIONAL)
    landed = bytes(ini.dev.host.cpu_read(kva, size)) == data
    read = bytes(tgt.dev.host.cpu_read(back_kva, size)) == data
    ok = landed and read and w.status == r.status == IbWcStatus.SUCCESS
    out.write(
        f"  RDMA WRITE {w.status.kernel_name}, data in the initiator's buffer: {landed}; "
        f"RDMA READ {r.status.kernel_name}, same bytes back: {read}\n"
    )
    return ok


def global_rkey(kind: DmaBackend, out: TextIO) -> None:
    fabric = Fabric()
    reader = end(SoftRoce(Platform(Host(32 * MiB)), fabric, "10.1.0.1"))
    host = Host(32 * MiB)
    victim = end(
        HwHca(Platform(host, iommu=kind == DmaBackend.IOMMU), fabric, "10.1.0.2", backend=kind)
    )
    link(reader, victim)
    secret = host.kmalloc(64)
    host.cpu_write(secret, b"not mapped for anyone")
    guess = host.virt_to_phys(secret)
    kva, loot = reader.buffer(64)
    reader.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_READ,
            (reader.sge(loot, 21),),
            remote_addr=guess,
            rkey=victim.pd.unsafe_global_rkey,
        )
    )
    wc = reader.wait()
    got = bytes(reader.dev.host.cpu_read(kva, 21))
    if wc.status == IbWcStatus.SUCCESS:
        out.write(
            f"  {kind.value:6s}: READ of bus address {guess:#x} with the global rkey: "
            f"{wc.status.kernel_name}, got {got!r}\n"
        )
    else:
        iommu = victim.dev.dma_device.platform.iommu
        fault = iommu.faults[-1] if iommu and iommu.faults else None
        out.write(
            f"  {kind.value:6s}: READ of {guess:#x} with the global rkey: {wc.status.kernel_name}; "
            f"IOMMU: {fault}\n"
        )


def run(out: TextIO, pcap: str | None = "softrdma-demo.pcap", drop: float = 0.1) -> int:
    fabric = Fabric(seed=2026)
    fabric.set_faults(drop=drop, reorder=drop)
    tap = fabric.tap(pcap) if pcap else None
    ok = True
    out.write(
        f"softrdma demo rdma: two hosts on a fabric dropping and reordering {drop:.0%} of frames\n\n"
    )
    a = end(SoftRoce(Platform(Host(64 * MiB, name="hostA")), fabric, "10.0.0.1"))
    b = end(HwHca(Platform(Host(64 * MiB, name="hostB"), iommu=True), fabric, "10.0.0.2"))
    link(a, b)
    out.write("1. a DMA address in a message, used by the peer (one consumer code path)\n")
    ok &= seed_scenario(a, b, out)
    ok &= seed_scenario(b, a, out)
    s = fabric.stats
    out.write(
        f"  fabric: {s.sent} frames sent, {s.dropped} dropped, {s.reordered} reordered; "
        f"{fabric.loop.now * 1e3:.3f} ms of simulated time\n\n"
    )
    out.write("2. the unsafe global rkey: all of memory, or only what is mapped\n")
    global_rkey(DmaBackend.DIRECT, out)
    global_rkey(DmaBackend.IOMMU, out)
    out.write(
        "\n3. a remote access violation (on a clean fabric: a lost NAK would end in a retry timeout)\n"
    )
    fabric.clear_all_faults()
    _kva, src = a.buffer(4096)
    a.qp.post_send(
        RdmaWR(9, IbWrOpcode.RDMA_WRITE, (a.sge(src, 4096),), remote_addr=0x1000, rkey=0xBAD00)
    )
    wc = a.wait()
    out.write(
        f"  WRITE with a bogus rkey: {wc.status.kernel_name}; QPs now {a.qp.state.name} / "
        f"{b.qp.state.name}\n"
    )
    if tap is not None:
        tap.close()
        out.write(f"\nevery frame is in {pcap} (tshark -r {pcap} decodes it as InfiniBand)\n")
    return 0 if ok else 1
