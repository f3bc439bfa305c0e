"""``softrdma srp demo``: SRP end to end on every pairing of device kinds, in
one process on the simulated fabric.

For each initiator kind × target kind — a CPU-copy device (rxe's model:
virtual DMA) and a hardware HCA with direct DMA, with every mapping bounced
through swiotlb, or behind an IOMMU — two hosts on a fresh
:class:`~softrdma.fabric.inproc.Fabric`: the target host runs an
:class:`~softrdma.ulp.srp.target.SrpTarget` (``ib_srpt``) over a
``fileio`` backstore on a sparse image in a temporary directory, the
initiator host an :class:`~softrdma.ulp.srp.initiator.SrpInitiator`
(``ib_srp``, its defaults: fast registration of every data buffer). The
initiator logs in, writes the pattern of ``softrdma srp initiator``
(:func:`~softrdma.cli.srp_initiator.pattern`) with its queue depth of
commands in flight, sends SYNCHRONIZE CACHE, reads the range back and
verifies it; then it logs out, the target closes, both devices are
released and the DMA-API debug checker of each host is asked what it saw
(leaks included).

One row per pairing: throughput (bytes over the wall-clock time the
simulation took, so it measures this Python stack, not a network), the
RDMA READs and WRITEs the target posted (it fetches write data by RDMA
READ and returns read data by RDMA WRITE), the bytes swiotlb bounced, the
IOVA ranges the IOMMU mapped, the initiator's memory registrations and
invalidations, and the debug checker's reports. Exit status 0 when every
pairing verified its data with no report.

The hosts get 64 MiB of DMA32 memory, so their swiotlb pool (an eighth of
it, 8 MiB) holds what ``ib_srp``'s and ``ib_srpt``'s default queue depths
keep mapped at once. With a smaller pool a swiotlb target cannot map the
IU rings of its default 128 credits (it rejects the login), and with a
shallower ring it answers BUSY to the commands it has no room for (the
initiator sends them again).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from softrdma.cli.srp import parse_size
from softrdma.cli.srp_initiator import IoMismatch, first_mismatch, pattern, stream_blocks
from softrdma.dma.iova import IovaDomain
from softrdma.dma.platform import Platform
from softrdma.dma.types import DmaBackend
from softrdma.drivers.hca import HwHca
from softrdma.drivers.roce import RoceDevice
from softrdma.drivers.rxe import SoftRoce
from softrdma.errors import SoftRdmaError
from softrdma.fabric.inproc import Fabric
from softrdma.memory.host import Host, MiB
from softrdma.ulp.scsi import VERSION_SRP, FileBackstore, ScsiTarget
from softrdma.ulp.srp.initiator import SrpInitiator
from softrdma.ulp.srp.target import SrpTarget

__all__ = ["KINDS", "PairingResult", "build_demo_parser", "run_demo", "run_pairing"]

#: The device kinds, as the tests name them.
KINDS = ("cpu", "hw-direct", "hw-swiotlb", "hw-iommu")
_BACKENDS = {
    "hw-direct": DmaBackend.DIRECT,
    "hw-swiotlb": DmaBackend.SWIOTLB,
    "hw-iommu": DmaBackend.IOMMU,
}
IMAGE_SIZE = 64 * MiB
"""The sparse image behind each target."""
SEED = 1
NETDEV_MTU = 4200
"""Jumbo frames: the path MTU is 4096, so an RDMA transfer takes a quarter of
the packets it would at 1500."""
INITIATOR_IP, TARGET_IP = "10.0.0.1", "10.0.0.2"


def make_device(kind: str, fabric: Fabric, ip: str) -> RoceDevice:
    """A host with the DMA-API debug checker on and a device of ``kind``
    (MTU 4096): 128 MiB, 64 MiB of it DMA32 (so an 8 MiB swiotlb pool),
    32 MiB highmem."""
    host = Host(128 * MiB, dma32_limit=64 * MiB, lowmem_limit=96 * MiB, name=f"host-{ip}")
    if kind == "cpu":
        return SoftRoce(Platform(host, dma_debug=True), fabric, ip, netdev_mtu=NETDEV_MTU)
    backend = _BACKENDS[kind]
    platform = Platform(
        host,
        iommu=backend is DmaBackend.IOMMU,
        swiotlb_force=backend is DmaBackend.SWIOTLB,
        dma_debug=True,
    )
    return HwHca(platform, fabric, ip, backend=backend, netdev_mtu=NETDEV_MTU)


class _IovaCounter:
    """Counts the IOVA ranges a device's IOMMU domain hands out (one per
    ``dma_map_sg`` / ``dma_map_page``), by wrapping its allocator."""

    def __init__(self, dev: RoceDevice) -> None:
        self.count = 0
        domain = dev.dma_device.iommu_domain
        if domain is not None:
            self._wrap(domain.iovad)

    def _wrap(self, iovad: IovaDomain) -> None:
        alloc: Callable[[int], int | None] = iovad.alloc

        def counting(npages: int) -> int | None:
            pfn = alloc(npages)
            self.count += pfn is not None
            return pfn

        iovad.alloc = counting  # type: ignore[method-assign]


@dataclass
class PairingResult:
    """What one pairing did."""

    initiator: str
    target: str
    nbytes: int
    write_seconds: float
    read_seconds: float
    verified: bool
    rdma_reads: int
    rdma_writes: int
    bounced: int
    iovas: int
    reg_mr: int
    local_inv: int
    remote_inv: int
    busy: int
    debug_reports: list[str]
    error: str = ""

    @property
    def ok(self) -> bool:
        """Verified, with nothing for the debug checker to report."""
        return self.verified and not self.debug_reports and not self.error


def run_pairing(
    ikind: str, tkind: str, workdir: Path, nbytes: int, offset: int, seed: int = SEED
) -> PairingResult:
    """One initiator of ``ikind`` and target of ``tkind``: write, sync, read
    back, verify, tear down, collect the counters."""
    fabric = Fabric(seed=seed)
    idev = make_device(ikind, fabric, INITIATOR_IP)
    tdev = make_device(tkind, fabric, TARGET_IP)
    counters = [_IovaCounter(idev), _IovaCounter(tdev)]
    backstore = FileBackstore(workdir / f"{ikind}-{tkind}.img", 512, size=IMAGE_SIZE, create=True)
    scsi = ScsiTarget(transport_version=VERSION_SRP)
    scsi.add_lun(0, backstore)
    target = SrpTarget(tdev.host, scsi, addr=TARGET_IP)
    ini = SrpInitiator(idev, TARGET_IP, id_ext=target.id_ext, ioc_guid=target.ioc_guid)
    verified, error = False, ""
    t_write = t_read = 0.0
    try:
        ini.login()
        size = ini.block_size
        first, nblocks = offset // size, nbytes // size
        start = time.perf_counter()
        stream_blocks(
            ini, first, nblocks, produce=lambda lba, n: pattern(seed, lba * size, n * size)
        )
        ini.sync()
        t_write = time.perf_counter() - start

        def check(lba: int, data: bytes) -> None:
            want = pattern(seed, lba * size, len(data))
            bad = first_mismatch(data, want)
            if bad is not None:
                raise IoMismatch(lba * size + bad, data[bad], want[bad])

        start = time.perf_counter()
        stream_blocks(ini, first, nblocks, consume=check)
        t_read = time.perf_counter() - start
        verified = True
    except (SoftRdmaError, IoMismatch) as e:
        error = str(e)
    finally:
        ini.close()
        target.close()
        backstore.close()
    reports: list[str] = []
    bounced = 0
    for dev in (idev, tdev):
        dev.unregister()
        dev.dma_device.release()  # the checker reports what is still mapped
        platform = dev.dma_device.platform
        reports += [str(r) for r in platform.dma_debug.reports]
        if platform.iommu is not None:
            reports += [str(f) for f in platform.iommu.faults]
        if platform.swiotlb is not None:
            bounced += platform.swiotlb.bounced_bytes
    st = ini.stats
    return PairingResult(
        ikind,
        tkind,
        nbytes,
        t_write,
        t_read,
        verified,
        target.stats["rdma_reads"],
        target.stats["rdma_writes"],
        bounced,
        sum(c.count for c in counters),
        st.reg_mr,
        st.local_inv,
        st.remote_inv,
        target.stats["busy"],
        reports,
        error,
    )


def _mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.1f}" if seconds > 0 else "-"


def _bytes(n: int) -> str:
    if not n:
        return "-"
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


#: (header, alignment, width) of each column.
_COLUMNS = (
    ("initiator", "<", 10),
    ("target", "<", 10),
    ("wr MB/s", ">", 7),
    ("rd MB/s", ">", 7),
    ("RDMA rd/wr", ">", 10),
    ("bounced", ">", 9),
    ("IOVAs", ">", 5),
    ("reg/linv/rinv", ">", 13),
    ("DMA debug", "<", 9),
    ("data", "<", 8),
)


def _row(r: PairingResult) -> tuple[str, ...]:
    return (
        r.initiator,
        r.target,
        _mbps(r.nbytes, r.write_seconds),
        _mbps(r.nbytes, r.read_seconds),
        f"{r.rdma_reads}/{r.rdma_writes}",
        _bytes(r.bounced),
        str(r.iovas or "-"),
        f"{r.reg_mr}/{r.local_inv}/{r.remote_inv}",
        "clean" if not r.debug_reports else f"{len(r.debug_reports)} reports",
        ("verified" if r.verified else "FAILED") + (f" ({r.busy} BUSY)" if r.busy else ""),
    )


def _line(cells: tuple[str, ...]) -> str:
    return "  ".join(
        f"{cell:{align}{width}}" for cell, (_, align, width) in zip(cells, _COLUMNS, strict=True)
    ).rstrip()


def build_demo_parser(p: argparse.ArgumentParser) -> None:
    """The options of ``softrdma srp demo``."""
    p.add_argument(
        "--size",
        type=parse_size,
        default=MiB,
        metavar="SIZE",
        help="bytes written and read back on each pairing (default 1M; whole 512-byte blocks)",
    )


def run_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``softrdma srp demo``: every pairing, one table row each; 0 when all
    verified their data and no debug checker reported anything."""
    nbytes: int = getattr(args, "size", MiB)
    if nbytes % 512 or nbytes > IMAGE_SIZE - MiB:
        err.write(
            f"softrdma srp demo: --size {nbytes}: whole 512-byte blocks, at most "
            f"{(IMAGE_SIZE - MiB) >> 20} MiB\n"
        )
        return 1
    offset = MiB
    out.write(
        "softrdma srp demo: an SRP initiator (ib_srp's model) and target (ib_srpt's, fileio "
        "backstore\non a sparse image) on a simulated fabric, for every pairing of device "
        f"kinds: {_bytes(nbytes)} of\npattern written at offset {offset >> 20} MiB, "
        "SYNCHRONIZE CACHE, read back and verified.\n\n"
    )
    out.write(_line(tuple(name for name, _, _ in _COLUMNS)) + "\n")
    out.flush()
    ok = True
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="softrdma-srp-demo-") as tmp:
        for ikind, tkind in itertools.product(KINDS, KINDS):
            r = run_pairing(ikind, tkind, Path(tmp), nbytes, offset)
            out.write(_line(_row(r)) + "\n")
            for problem in ([r.error] if r.error else []) + r.debug_reports[:5]:
                out.write(f"    {problem}\n")
            out.flush()
            ok &= r.ok
    out.write(
        f"\n{len(KINDS) ** 2} pairings in {time.perf_counter() - start:.1f} s. "
        "MB/s: bytes over the wall-clock time of the simulation.\n"
        "RDMA rd/wr: RDMA READs (the target fetching write data) and RDMA WRITEs (it "
        "returning read data).\n"
        "bounced: bytes swiotlb copied through bounce slots. IOVAs: IOVA ranges the "
        "IOMMU mapped (both hosts).\n"
        "reg/linv/rinv: the initiator's fast registrations (IB_WR_REG_MR), LOCAL_INVs and "
        "remote invalidations.\n"
        "DMA debug: the checker's reports (CONFIG_DMA_API_DEBUG's, leaks at release "
        "included) and IOMMU\nfaults, both hosts.\n"
    )
    return 0 if ok else 1
