"""SRP benchmark: a disk image served by the SRP target and used through the
SRP initiator (SCSI READ / WRITE over RDMA; the initiator with ib_srp's
defaults — every data buffer registered by fast registration, at most
``sg_tablesize`` 12 pages per command — and ``can_queue`` 32). Measured:

* 4 KiB random reads, IO/s, with 16 and then 32 reads in flight
  (``submit_read`` into a window kept full; ``wait_for`` any to finish);
* 1 MiB sequential reads, MB/s, two 1 MiB reads in flight (the initiator
  splits each into commands of at most ``max_transfer_blocks``: 48 KiB by
  default, 22 commands per MiB);
* 1 MiB sequential writes, MB/s, two in flight, the timed span ending with
  SYNCHRONIZE CACHE (``sync()``; the target turns it into an ``fsync`` of
  the image);

each on three set-ups: both ends on the simulated in-process fabric with
CPU-copy devices (``cpu``); the same with hardware HCAs behind IOMMUs
(``hw-iommu``); two processes over RoCEv2 on loopback UDP (``udp``:
``softrdma srp target IMAGE --ip ADDR`` in a child process, the initiator
on a CPU-copy device on a ``UdpNetwork`` in this one). In process the
initiator's waits run the simulation, target included, on this thread.

Every figure is also given as a ratio to plain system calls on the same
image file in the same run. The baselines (each the best of 3 runs) are
measured before the first set-up, between set-ups and after the last; a
set-up's figures are divided by the better of the measurements just
before and just after it, so that a load change on the shared machine
between set-ups moves both sides of its ratio:

* 4 KiB random reads: ``os.pread`` of 4 KiB at the same offsets (the same
  seeded sequence), one at a time, page cache warm;
* 1 MiB sequential reads: ``os.pread`` of 1 MiB in order over the whole
  image, page cache warm;
* 1 MiB sequential writes: ``os.pwrite`` of the same number of 1 MiB
  blocks in order, then one ``os.fsync`` of the image, timed together.

Every read's data is compared with what the image holds, SRP's and the
baseline's alike; the writes write back what is already there, so the
image stays known. Every measurement stops at its count or its time
budget (8 s; 2 s with ``--quick``), whichever comes first
(``truncated_by_time`` in the JSON). Prints a table and, last, one JSON
object.

    python bench/srp.py              # full run (~35 s on a quiet 2-core machine)
    python bench/srp.py --quick      # smaller counts, for a smoke test
    python bench/srp.py --profile    # also: cProfile of the in-process 1 MiB reads
    python bench/srp.py --only udp --sg-tablesize 256   # one set-up, 512 KiB commands
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import json
import math
import os
import pstats
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Protocol

import softrdma
from softrdma.dma.platform import Platform
from softrdma.dma.types import DmaBackend
from softrdma.drivers.hca import HwHca
from softrdma.drivers.roce import RoceDevice
from softrdma.drivers.rxe import SoftRoce
from softrdma.fabric.inproc import Fabric
from softrdma.fabric.link import Network
from softrdma.fabric.udp import UdpNetwork
from softrdma.memory.host import Host, MiB
from softrdma.ulp.scsi import VERSION_SRP, FileBackstore, ScsiTarget
from softrdma.ulp.srp.initiator import SRP_MAX_SECTORS, SrpInitiator
from softrdma.ulp.srp.target import SrpTarget

BLOCK = 512  # logical block size of the image
SMALL = 4096
BIG = 1 * MiB
HOST_MEMORY = 256 * MiB  # per simulated host: room for many 1 MiB buffers in flight
NETDEV_MTU = 9000  # in process: path MTU 4096, as on loopback (MTU 65536)
CAN_QUEUE = 32
WAIT = 20.0
"""Bound, in seconds, on every wait for a command (simulated seconds in
process) and for the target process."""
ADD_TARGET = re.compile(
    r"add_target: id_ext=([0-9a-f]{16}),ioc_guid=([0-9a-f]{16}),dest=([0-9.]+):(\d+)"
)


@dataclass(frozen=True)
class Plan:
    """How much each measurement does: it stops at ``count`` I/Os or at
    ``budget`` seconds, whichever comes first."""

    image_bytes: int
    random_ios: int
    seq_ios: int
    depths: tuple[int, ...]
    seq_depth: int
    budget: float
    baseline_random_ios: int
    sg_tablesize: int | None
    max_sectors: int | None


@dataclass
class Rate:
    """``ios`` I/Os of ``size`` bytes in ``seconds``."""

    ios: int
    size: int
    seconds: float
    truncated: bool = False

    @property
    def per_s(self) -> float:
        return self.ios / self.seconds

    @property
    def bytes_per_s(self) -> float:
        return self.ios * self.size / self.seconds


@dataclass
class Image:
    """The image file and what it holds (random bytes, filled once): all of
    it, and the same again as separate 1 MiB ``bytes`` objects, so that the
    1 MiB checks compare two ``bytes`` without making a third (a second
    1 MiB object alive at a time makes glibc's heap shrink and grow on every
    I/O: page faults costing more than the copy)."""

    path: Path
    data: bytes
    offsets: list[int] = field(default_factory=list)  # the random 4 KiB reads' offsets
    chunks: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.chunks = [self.data[i : i + BIG] for i in range(0, len(self.data), BIG)]

    @property
    def size(self) -> int:
        return len(self.data)

    def chunk(self, i: int) -> tuple[int, bytes]:
        """The i-th 1 MiB block of a sequential pass (wrapping): its offset
        and contents."""
        k = i % len(self.chunks)
        return k * BIG, self.chunks[k]


class Io(Protocol):
    """A block I/O in flight (SRP's ``BlockIo``, iSER's ``IserIo``)."""

    @property
    def done(self) -> bool: ...

    def result(self) -> bytes | None: ...


class BlockDevice(Protocol):
    """What the workloads use of an initiator: SRP's, or iSER's through an
    adapter (bench/iser.py)."""

    def read_capacity(self) -> tuple[int, int]: ...

    def submit_read(self, lba: int, nblocks: int) -> Io: ...

    def submit_write(self, lba: int, data: bytes) -> Io: ...

    def sync(self) -> None: ...

    def wait_for(self, pred: Callable[[], bool], timeout: float | None = None) -> bool: ...


# -- baselines: system calls on the image ------------------------------------------------


def pread_random(image: Image, count: int) -> Rate:
    """4 KiB ``os.pread`` at the random offsets, one at a time (each compared,
    as bytes, with what the image holds)."""
    fd = os.open(image.path, os.O_RDONLY)
    try:
        offsets = image.offsets[:count]
        t0 = time.perf_counter()
        for off in offsets:
            if os.pread(fd, SMALL, off) != image.data[off : off + SMALL]:
                raise RuntimeError(f"pread at {off}: wrong data")
        return Rate(len(offsets), SMALL, time.perf_counter() - t0)
    finally:
        os.close(fd)


def pread_sequential(image: Image, count: int) -> Rate:
    """1 MiB ``os.pread`` in order (wrapping at the end of the image)."""
    fd = os.open(image.path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for i in range(count):
            off, want = image.chunk(i)
            if os.pread(fd, BIG, off) != want:
                raise RuntimeError(f"pread at {off}: wrong data")
        return Rate(count, BIG, time.perf_counter() - t0)
    finally:
        os.close(fd)


def pwrite_sequential(image: Image, count: int) -> Rate:
    """1 MiB ``os.pwrite`` in order of what the image holds, then ``os.fsync``;
    the time includes the fsync."""
    fd = os.open(image.path, os.O_WRONLY)
    try:
        t0 = time.perf_counter()
        for i in range(count):
            off, data = image.chunk(i)
            if os.pwrite(fd, data, off) != BIG:
                raise RuntimeError(f"short pwrite at {off}")
        os.fsync(fd)
        return Rate(count, BIG, time.perf_counter() - t0)
    finally:
        os.close(fd)


def baselines(image: Image, plan: Plan, reps: int = 3) -> dict[str, float]:
    """The best of ``reps`` runs of each baseline."""
    random_ = max(pread_random(image, plan.baseline_random_ios).per_s for _ in range(reps))
    n = max(plan.seq_ios, image.size // BIG)
    read = max(pread_sequential(image, n).bytes_per_s for _ in range(reps))
    write = max(pwrite_sequential(image, plan.seq_ios).bytes_per_s for _ in range(reps))
    return {"pread_4KiB_random": random_, "pread_1MiB_seq": read, "pwrite_1MiB_seq_fsync": write}


# -- SRP workloads -----------------------------------------------------------------------


def _run_window(
    ini: BlockDevice,
    count: int,
    depth: int,
    size: int,
    budget: float,
    submit: Callable[[int], Io],
    check: Callable[[int, Io], None],
    finish: Callable[[], None] | None = None,
) -> Rate:
    """Keep ``depth`` I/Os in flight (``submit(i)`` makes the i-th) until
    ``count`` are done or ``budget`` seconds have passed; ``check`` each
    one as it completes; ``finish`` at the end, inside the timed span."""
    window: deque[tuple[int, Io]] = deque()
    submitted = done = 0
    t0 = time.perf_counter()
    stop = t0 + budget
    truncated = False
    while done < count:
        while submitted < count and len(window) < depth and not truncated:
            window.append((submitted, submit(submitted)))
            submitted += 1
        if not ini.wait_for(lambda: any(b.done for _, b in window), WAIT):
            raise RuntimeError(f"no I/O completed within {WAIT} s ({ini!r}, {len(window)} pending)")
        for item in [x for x in window if x[1].done]:
            window.remove(item)
            check(*item)
            done += 1
        if not truncated and time.perf_counter() > stop:
            truncated = True  # let what is in flight finish, submit nothing more
            count = submitted
    if finish is not None:
        finish()
    return Rate(done, size, time.perf_counter() - t0, truncated)


def srp_random_reads(ini: BlockDevice, image: Image, plan: Plan, depth: int) -> Rate:
    offsets = image.offsets

    def check(i: int, b: Io) -> None:
        off = offsets[i]
        data = b.result()
        if data is None or data != image.data[off : off + SMALL]:
            raise RuntimeError(f"SRP read at {off}: wrong data")

    return _run_window(
        ini,
        min(plan.random_ios, len(offsets)),
        depth,
        SMALL,
        plan.budget,
        lambda i: ini.submit_read(offsets[i] // BLOCK, SMALL // BLOCK),
        check,
    )


def srp_seq_reads(ini: BlockDevice, image: Image, plan: Plan) -> Rate:

    def check(i: int, b: Io) -> None:
        off, want = image.chunk(i)
        if b.result() != want:
            raise RuntimeError(f"SRP read at {off}: wrong data")

    return _run_window(
        ini,
        plan.seq_ios,
        plan.seq_depth,
        BIG,
        plan.budget,
        lambda i: ini.submit_read(image.chunk(i)[0] // BLOCK, BIG // BLOCK),
        check,
    )


def srp_seq_writes(ini: BlockDevice, image: Image, plan: Plan) -> Rate:
    def submit(i: int) -> Io:
        off, data = image.chunk(i)
        return ini.submit_write(off // BLOCK, data)

    def check(i: int, b: Io) -> None:
        b.result()

    return _run_window(
        ini, plan.seq_ios, plan.seq_depth, BIG, plan.budget, submit, check, finish=ini.sync
    )


def workloads(ini: BlockDevice, image: Image, plan: Plan) -> dict[str, Rate]:
    """Every measurement on a logged-in initiator (SRP or iSER)."""
    capacity = ini.read_capacity()
    if capacity != (image.size // BLOCK, BLOCK):
        raise RuntimeError(f"the target serves {capacity}, not the image")
    warm = dataclasses.replace(plan, random_ios=min(plan.random_ios, 200), budget=1.0)
    srp_random_reads(ini, image, warm, max(plan.depths))  # warm up
    out: dict[str, Rate] = {}
    for depth in plan.depths:
        out[f"read_4KiB_random_qd{depth}"] = srp_random_reads(ini, image, plan, depth)
    out["read_1MiB_seq"] = srp_seq_reads(ini, image, plan)
    out["write_1MiB_seq_sync"] = srp_seq_writes(ini, image, plan)
    return out


def make_initiator(
    dev: RoceDevice, ip: str, port: int, id_ext: int | bytes, ioc_guid: int | bytes, plan: Plan
) -> SrpInitiator:
    """ib_srp's defaults, but for ``can_queue``, the command timeout and the
    ``--sg-tablesize`` / ``--max-sectors`` options."""
    return SrpInitiator(
        dev,
        ip,
        port,
        id_ext=id_ext,
        ioc_guid=ioc_guid,
        can_queue=CAN_QUEUE,
        cmd_timeout=WAIT,
        sg_tablesize=plan.sg_tablesize,
        max_sectors=plan.max_sectors or SRP_MAX_SECTORS,
    )


def make_device(kind: str, net: Network, ip: str, netdev_mtu: int | None) -> RoceDevice:
    """A CPU-copy device (Soft-RoCE model) or a hardware HCA behind an IOMMU."""
    host = Host(HOST_MEMORY, name=f"host-{ip}")
    if kind == "cpu":
        return SoftRoce(Platform(host, swiotlb_size=None), net, ip, netdev_mtu=netdev_mtu)
    return HwHca(
        Platform(host, iommu=True), net, ip, backend=DmaBackend.IOMMU, netdev_mtu=netdev_mtu
    )


# -- in process ----------------------------------------------------------------------------


@contextlib.contextmanager
def inproc_pair(kind: str, image: Image, plan: Plan) -> Iterator[SrpInitiator]:
    """Target and initiator on one simulated fabric, logged in."""
    fabric = Fabric(link_rate=0, seed=3)
    tdev = make_device(kind, fabric, "10.0.0.1", NETDEV_MTU)
    idev = make_device(kind, fabric, "10.0.0.2", NETDEV_MTU)
    backstore = FileBackstore(image.path, BLOCK)
    tgt: SrpTarget | None = None
    ini: SrpInitiator | None = None
    try:
        core = ScsiTarget(transport_version=VERSION_SRP)
        core.add_lun(0, backstore)
        tgt = SrpTarget(tdev.host, core, addr="10.0.0.1")
        pid = tgt.target_port_id
        ini = make_initiator(idev, "10.0.0.1", tgt.port, pid[:8], pid[8:], plan)
        ini.login(timeout=WAIT)
        yield ini
        ini.logout(timeout=WAIT)
    finally:
        if ini is not None:
            ini.close()
        if tgt is not None:
            tgt.close()
        fabric.loop.run(max_events=100_000)
        for dev in (idev, tdev):
            dev.unregister()
        backstore.close()


def run_inproc(kind: str, image: Image, plan: Plan) -> tuple[dict[str, Rate], dict[str, int]]:
    with inproc_pair(kind, image, plan) as ini:
        rates = workloads(ini, image, plan)
        return rates, _stats(ini)


def _stats(ini: SrpInitiator) -> dict[str, int]:
    keep = (
        "commands",
        "completed",
        "direct",
        "indirect",
        "reg_mr",
        "local_inv",
        "retries",
        "reconnects",
        "wc_errors",
        "progress_errors",
    )
    s = ini.stats.as_dict()
    return {k: s[k] for k in keep} | {"max_transfer_bytes": ini.max_transfer_blocks * BLOCK}


# -- two processes over loopback UDP -------------------------------------------------------


def loopback_pair(second: int = 89) -> tuple[str, str]:
    """Two addresses in 127.0.0.0/8, from the process id (this bench uses
    127.89.*, bench/iser.py 127.90.*, bench/udp.py 127.88.*, the tests
    127.100-249.*)."""
    third = os.getpid() % 250
    ips = f"127.{second}.{third}.2", f"127.{second}.{third}.3"
    for ip in ips:
        if not IPv4Address(ip).is_loopback:
            raise AssertionError(ip)
    return ips


@contextlib.contextmanager
def child_process(argv: list[str], ready: re.Pattern[str], log: Path) -> Iterator[re.Match[str]]:
    """``argv`` (a Python process, with this softrdma on its path) running
    until its output, kept in ``log``, matches ``ready``: the match. Stopped
    (SIGTERM, then SIGKILL) on the way out."""
    env = dict(os.environ)
    src = str(Path(softrdma.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        end = time.monotonic() + WAIT
        while True:
            m = ready.search(log.read_text())
            if m:
                break
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(
                    f"the target did not start (exit {proc.poll()}):\n{log.read_text()}"
                )
            time.sleep(0.05)
        yield m
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(WAIT)


@contextlib.contextmanager
def target_process(image: Image, ip: str, tmp: Path) -> Iterator[tuple[int, int, int]]:
    """``softrdma srp target IMAGE --ip IP`` running: ``(id_ext, ioc_guid,
    port)`` from its ``add_target`` line."""
    argv = [sys.executable, "-m", "softrdma", "srp", "target", str(image.path), "--ip", ip]
    with child_process(argv, ADD_TARGET, tmp / "target.log") as m:
        yield int(m.group(1), 16), int(m.group(2), 16), int(m.group(4))


def run_udp(image: Image, plan: Plan, tmp: Path) -> tuple[dict[str, Rate], dict[str, int]]:
    ip_t, ip_i = loopback_pair()
    with target_process(image, ip_t, tmp) as (id_ext, ioc_guid, port):
        net = UdpNetwork()
        dev: RoceDevice | None = None
        ini: SrpInitiator | None = None
        try:
            dev = make_device("cpu", net, ip_i, None)
            ini = make_initiator(dev, ip_t, port, id_ext, ioc_guid, plan)
            ini.login(timeout=WAIT)
            rates = workloads(ini, image, plan)
            ini.logout(timeout=WAIT)
            return rates, _stats(ini)
        finally:
            if ini is not None:
                ini.close()
            if dev is not None:
                dev.unregister()
            net.close()


# -- profile ---------------------------------------------------------------------------------


def profile_read(image: Image, plan: Plan, top: int) -> dict[str, object]:
    """cProfile of the in-process (cpu pair) 1 MiB sequential reads: the
    ``top`` functions by own time, and own time summed by module."""
    with inproc_pair("cpu", image, plan) as ini:
        ini.read_capacity()
        prof = cProfile.Profile()
        prof.enable()
        rate = srp_seq_reads(ini, image, plan)
        prof.disable()
    st = pstats.Stats(prof, stream=io.StringIO())
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    root = str(Path(softrdma.__file__).resolve().parent.parent) + os.sep
    functions: list[dict[str, object]] = []
    by_own = sorted(raw.items(), key=lambda kv: -kv[1][2])
    for (file, line, func), (_cc, nc, tt, ct, _) in by_own[:top]:
        where = f"{file.removeprefix(root)}:{line}" if line else "builtin"
        functions.append(
            {
                "function": f"{func} ({where})",
                "calls": nc,
                "own_s": round(tt, 4),
                "cumulative_s": round(ct, 4),
                "share": round(tt / total, 4),
            }
        )
    modules: dict[str, float] = {}
    for (file, line, _func), v in raw.items():
        name = file.removeprefix(root) if line else "builtins (len, bytes, dict ...)"
        modules[name] = modules.get(name, 0.0) + v[2]
    return {
        "functions_by_own_time": functions,
        "modules_by_own_time": [
            {"module": k, "own_s": round(v, 4), "share": round(v / total, 4)}
            for k, v in sorted(modules.items(), key=lambda kv: -kv[1])[:top]
        ],
        "total_s": round(total, 4),
        "ios": rate.ios,
        "bytes_per_s_under_cprofile": rate.bytes_per_s,
    }


# -- main ------------------------------------------------------------------------------------

BASELINE_OF = {
    "read_4KiB_random": "pread_4KiB_random",
    "read_1MiB_seq": "pread_1MiB_seq",
    "write_1MiB_seq_sync": "pwrite_1MiB_seq_fsync",
}
BASELINE_TEXT = {
    "pread_4KiB_random": "os.pread of 4 KiB at the same seeded random 4 KiB-aligned offsets, one "
    "at a time, page cache warm, each result compared with the expected bytes; best of 3; IO/s",
    "pread_1MiB_seq": "os.pread of 1 MiB in order over the whole image, page cache warm, each "
    "result compared with the expected bytes; best of 3; bytes/s",
    "pwrite_1MiB_seq_fsync": "os.pwrite of the same number of 1 MiB blocks as the measured "
    "run, in order, then one os.fsync of the image, timed together (the SRP / iSER write run "
    "likewise ends with SYNCHRONIZE CACHE = the target's fsync); best of 3; bytes/s",
}


def _baseline_key(metric: str) -> str:
    return next(v for k, v in BASELINE_OF.items() if metric.startswith(k))


def make_image(tmp: Path, size: int, random_ios: int) -> Image:
    path = tmp / "disk.img"
    rng = random.Random(7)
    data = rng.randbytes(size)
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    slots = size // SMALL
    offsets = [rng.randrange(slots) * SMALL for _ in range(random_ios)]
    return Image(path, data, offsets)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts (under ~30 s)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the in-process 1 MiB reads (cProfile, top functions)",
    )
    parser.add_argument(
        "--only",
        choices=("cpu", "hw-iommu", "udp"),
        action="append",
        help="run only this set-up (repeatable)",
    )
    parser.add_argument(
        "--sg-tablesize",
        type=int,
        metavar="N",
        help="initiator sg_tablesize (default: ib_srp's, 12 pages per command)",
    )
    parser.add_argument(
        "--max-sectors",
        type=int,
        metavar="N",
        help="initiator max_sectors (default: ib_srp's, 1024)",
    )
    parser.add_argument(
        "--depths",
        type=_depths,
        default=(16, 32),
        metavar="N,N",
        help=f"4 KiB reads in flight, one measurement each (default 16,32; at most {CAN_QUEUE})",
    )
    parser.add_argument(
        "--seq-depth",
        type=int,
        choices=range(1, 9),
        default=2,
        metavar="N",
        help="1 MiB I/Os in flight (1..8, default 2)",
    )
    args = parser.parse_args()
    common = (args.depths, args.seq_depth)
    if args.quick:
        plan = Plan(32 * MiB, 600, 12, *common, 2.0, 20_000, args.sg_tablesize, args.max_sectors)
    else:
        plan = Plan(64 * MiB, 5000, 96, *common, 8.0, 100_000, args.sg_tablesize, args.max_sectors)
    setups = list(dict.fromkeys(args.only or ["cpu", "hw-iommu", "udp"]))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="softrdma-bench-srp-") as tmpdir:
        tmp = Path(tmpdir)
        image = make_image(tmp, plan.image_bytes, max(plan.random_ios, plan.baseline_random_ios))
        rounds, rates, stats = measure(
            image, plan, setups, lambda x: run_setup(x, image, plan, tmp)
        )
        profile = profile_read(image, plan, 12) if args.profile else None
    limits, metrics = ratios(rates, rounds)
    elapsed = time.perf_counter() - started
    print_table(metrics, limits, rounds)
    if profile is not None:
        print("profile: in-process cpu pair, 1 MiB sequential reads, by own time")
        for row in _rows(profile["functions_by_own_time"]):
            print(
                f"  {row['share']:6.1%} {row['own_s']:7.3f} s {row['calls']:>8,} calls  {row['function']}"
            )
        print("profile: own time by module")
        for row in _rows(profile["modules_by_own_time"]):
            print(f"  {row['share']:6.1%} {row['own_s']:7.3f} s  {row['module']}")
    config = {
        "image_bytes": plan.image_bytes,
        "block_size": BLOCK,
        "random_ios_per_depth": plan.random_ios,
        "seq_ios": plan.seq_ios,
        "seq_depth_1MiB": plan.seq_depth,
        "can_queue": CAN_QUEUE,
        "time_budget_per_measurement_s": plan.budget,
        "sg_tablesize": plan.sg_tablesize,
        "max_sectors": plan.max_sectors,
        "setups": {
            "cpu": "in process, simulated fabric, SoftRoce (CPU copy) both ends, netdev MTU 9000",
            "hw-iommu": "in process, simulated fabric, HwHca behind an IOMMU both ends, "
            "netdev MTU 9000",
            "udp": "target: `softrdma srp target IMAGE --ip 127.89.x.2` (rxe0, CPU copy) in a "
            "child process; initiator: SoftRoce on a UdpNetwork at 127.89.x.3 in this process "
            "(its own progress thread); RoCEv2 over loopback, path MTU 4096",
        },
        "baseline_rounds": ["start", *(f"after {x}" for x in setups)],
        "quick": args.quick,
        "elapsed_s": elapsed,
    }
    result: dict[str, object] = {
        "config": config,
        "baselines": baselines_json(limits, rounds),
        "metrics": metrics,
        "initiator_stats": stats,
    }
    if profile is not None:
        result["profile"] = profile
    print(json.dumps(result))


def run_setup(
    setup: str, image: Image, plan: Plan, tmp: Path
) -> tuple[dict[str, Rate], dict[str, int]]:
    if setup == "udp":
        return run_udp(image, plan, tmp)
    return run_inproc(setup, image, plan)


# -- shared with bench/iser.py: baselines around set-ups, ratios, table, JSON --------------

Stats = dict[str, int]
Rounds = list[dict[str, float]]


def measure(
    image: Image,
    plan: Plan,
    setups: list[str],
    run: Callable[[str], tuple[dict[str, Rate], Stats]],
) -> tuple[Rounds, dict[str, dict[str, Rate]], dict[str, Stats]]:
    """The baselines before the first set-up, between set-ups and after the
    last, and each set-up's rates and initiator statistics (``run(setup)``)."""
    rounds = [baselines(image, plan)]  # before, between and after the set-ups
    rates: dict[str, dict[str, Rate]] = {}
    stats: dict[str, Stats] = {}
    for setup in setups:
        rates[setup], stats[setup] = run(setup)
        rounds.append(baselines(image, plan))
    return rounds, rates, stats


def ratios(
    rates: dict[str, dict[str, Rate]], rounds: Rounds
) -> tuple[dict[str, float], dict[str, dict[str, object]]]:
    """The best baselines, and every figure with its ratio to the better of
    the baselines measured just before and just after its set-up."""
    limits = {k: max(r[k] for r in rounds) for k in rounds[0]}
    metrics: dict[str, dict[str, object]] = {}
    for i, (setup, rs) in enumerate(rates.items()):
        around = {k: max(rounds[i][k], rounds[i + 1][k]) for k in limits}
        for name, r in rs.items():
            base = _baseline_key(name)
            per_io = name.startswith("read_4KiB")
            value = r.per_s if per_io else r.bytes_per_s
            metrics[f"{setup}.{name}"] = {
                "value": value,
                "unit": "IO/s" if per_io else "bytes/s",
                "baseline": base,
                "baseline_value": around[base],
                "ratio": value / around[base],
                "ios": r.ios,
                "seconds": r.seconds,
                "truncated_by_time": r.truncated,
            }
    return limits, metrics


def print_table(
    metrics: dict[str, dict[str, object]], limits: dict[str, float], rounds: Rounds
) -> None:
    print(f"{'setup':9s} {'metric':26s} {'value':>14s} {'baseline':>16s} {'ratio':>8s}")
    for key, m in metrics.items():
        setup, name = key.split(".", 1)
        ratio = m["ratio"]
        assert isinstance(ratio, float)
        print(
            f"{setup:9s} {name:26s} {_show(m['value'], m['unit'])} "
            f"{_show(m['baseline_value'], m['unit']):>16s} {ratio:8.4f}"
        )
    for k, v in limits.items():
        unit = "IO/s" if k.startswith("pread_4KiB") else "bytes/s"
        each = ", ".join(_show(r[k], unit).split()[0] for r in rounds)
        print(f"{'baseline':9s} {k:26s} {_show(v, unit)}  (best; rounds: {each})")


def baselines_json(limits: dict[str, float], rounds: Rounds) -> dict[str, object]:
    return {
        k: {
            "value": v,
            "unit": "IO/s" if k.startswith("pread_4KiB") else "bytes/s",
            "rounds": [r[k] for r in rounds],
            "includes": BASELINE_TEXT[k],
        }
        for k, v in limits.items()
    }


def _depths(text: str) -> tuple[int, ...]:
    try:
        depths = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not depths or not all(1 <= d <= CAN_QUEUE for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be in 1..{CAN_QUEUE}: {text!r}")
    return depths


def _rows(value: object) -> list[dict[str, object]]:
    assert isinstance(value, list)
    return value


def _show(value: object, unit: object) -> str:
    assert isinstance(value, float) and math.isfinite(value)
    if unit == "IO/s":
        return f"{value:9,.0f} IO/s"
    return f"{value / 1e6:9.1f} MB/s"


if __name__ == "__main__":
    main()
