"""iSER benchmark: a disk image served by the iSER target (LIO's ``ib_isert``
model over the shared SCSI core) and used through the iSER initiator
(``ib_iser`` + libiscsi model: every data buffer registered by fast
registration, at most ``max_sectors`` 1024 = 512 KiB per command, read
data RDMA-WRITTEN and write data RDMA-READ by the target, keys invalidated
by the target's SEND_WITH_INV), ``can_queue`` 32. Measured, as in
bench/srp.py (whose workloads, baselines and reporting this reuses):

* 4 KiB random reads, IO/s, with 16 and then 32 reads in flight;
* 1 MiB sequential reads, MB/s, two 1 MiB reads in flight (two commands
  of 512 KiB each);
* 1 MiB sequential writes, MB/s, two in flight, the timed span ending with
  SYNCHRONIZE CACHE (the target's ``fsync`` of the image);

each on three set-ups: both ends on the simulated in-process fabric with
CPU-copy devices (``cpu``); the same with hardware HCAs behind IOMMUs
(``hw-iommu``); two processes over RoCEv2 on loopback UDP (``udp``: the
target on a CPU-copy device on a ``UdpNetwork`` in a child process,
started by this script's :func:`serve_target` through ``python -c``; the
initiator on a CPU-copy device on a ``UdpNetwork`` in this one).

Every figure is also given as a ratio to ``os.pread`` / ``os.pwrite`` on
the same image file in the same run, measured before, between and after
the set-ups (bench/srp.py's docstring says how). Prints a table and, last,
one JSON object.

    python bench/iser.py              # full run
    python bench/iser.py --quick      # smaller counts, for a smoke test
    python bench/iser.py --only udp --max-sectors 2048   # one set-up, 1 MiB commands
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import srp as bb
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.fabric.udp import UdpNetwork
from softrdma.memory.host import MiB
from softrdma.ulp.iser import IserInitiator, IserTarget
from softrdma.ulp.iser.initiator import ISER_DEF_MAX_SECTORS, IserIo
from softrdma.ulp.scsi import FileBackstore, ScsiTarget

IQN = "iqn.2003-01.org.linux-iscsi.softrdma:bench"
ISER_PORT = 3260
CAN_QUEUE = bb.CAN_QUEUE
READY = re.compile(r"iser target ready: ([0-9.]+):(\d+)")
TARGET_LIFETIME = 900.0
"""Bound, in seconds, on the target child's life (it also stops with its
parent, or at SIGTERM / SIGINT)."""


class IserBlockDevice:
    """An :class:`IserInitiator` as bench/srp.py's ``BlockDevice``: every
    call under the device's lock (over UDP the device's progress thread
    runs beside this one), as :class:`SrpInitiator` takes it itself."""

    def __init__(self, ini: IserInitiator) -> None:
        self.ini = ini
        self.lock = ini.dev.lock

    def read_capacity(self) -> tuple[int, int]:
        with self.lock:
            return self.ini.read_capacity()

    def submit_read(self, lba: int, nblocks: int) -> IserIo:
        with self.lock:
            return self.ini.submit_read(lba, nblocks)

    def submit_write(self, lba: int, data: bytes) -> IserIo:
        with self.lock:
            return self.ini.submit_write(lba, data)

    def sync(self) -> None:
        with self.lock:
            self.ini.sync()

    def wait_for(self, pred: Callable[[], bool], timeout: float | None = None) -> bool:
        """Drive progress until ``pred()`` holds (any I/O of a window done;
        :meth:`IserInitiator.wait_any` is the same for a list of I/Os)."""
        return self.ini.wait_for(pred, timeout)


def make_initiator(dev: RoceDevice, ip: str, port: int, plan: bb.Plan) -> IserInitiator:
    return IserInitiator(
        dev,
        ip,
        port,
        target_name=IQN,
        can_queue=CAN_QUEUE,
        max_sectors=plan.max_sectors or ISER_DEF_MAX_SECTORS,
        timeout=bb.WAIT,
    )


def _stats(ini: IserInitiator) -> dict[str, int]:
    return dict(sorted(ini.stats.items())) | {"max_transfer_bytes": ini.max_transfer}


# -- in process ----------------------------------------------------------------------------


@contextlib.contextmanager
def inproc_pair(kind: str, image: bb.Image, plan: bb.Plan) -> Iterator[IserInitiator]:
    """Target and initiator on one simulated fabric, logged in."""
    fabric = Fabric(link_rate=0, seed=3)
    tdev = bb.make_device(kind, fabric, "10.0.0.1", bb.NETDEV_MTU)
    idev = bb.make_device(kind, fabric, "10.0.0.2", bb.NETDEV_MTU)
    backstore = FileBackstore(image.path, bb.BLOCK)
    tgt: IserTarget | None = None
    ini: IserInitiator | None = None
    try:
        core = ScsiTarget()
        core.add_lun(0, backstore)
        tgt = IserTarget(tdev.host, core, (IQN,), addr="10.0.0.1", port=ISER_PORT)
        ini = make_initiator(idev, "10.0.0.1", tgt.port, plan)
        ini.login()
        yield ini
        ini.logout()
    finally:
        if ini is not None:
            ini.close()
        if tgt is not None:
            tgt.close()
        fabric.loop.run(max_events=100_000)
        for dev in (idev, tdev):
            dev.unregister()
        backstore.close()


def run_inproc(
    kind: str, image: bb.Image, plan: bb.Plan
) -> tuple[dict[str, bb.Rate], dict[str, int]]:
    with inproc_pair(kind, image, plan) as ini:
        rates = bb.workloads(IserBlockDevice(ini), image, plan)
    return rates, _stats(ini)  # after the logout


# -- two processes over loopback UDP -------------------------------------------------------


def serve_target(image: str, ip: str, port: int) -> None:
    """The target process: an :class:`IserTarget` serving ``image`` on a
    CPU-copy device at ``ip`` on a ``UdpNetwork`` until SIGTERM / SIGINT,
    its parent's end or :data:`TARGET_LIFETIME`; prints the ready line."""
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stop.set())
    parent = os.getppid()
    net = UdpNetwork()
    backstore = FileBackstore(Path(image), bb.BLOCK)
    dev: RoceDevice | None = None
    target: IserTarget | None = None
    try:
        dev = bb.make_device("cpu", net, ip, None)
        core = ScsiTarget()
        core.add_lun(0, backstore)
        with dev.lock:
            target = IserTarget(dev.host, core, (IQN,), addr=ip, port=port)
        print(f"iser target ready: {ip}:{port}", flush=True)
        end = time.monotonic() + TARGET_LIFETIME
        while not stop.wait(0.2) and os.getppid() == parent and time.monotonic() < end:
            pass
        with dev.lock:
            print(f"stopping: {dict(target.stats)}", flush=True)
            target.close()
    finally:
        if dev is not None:
            dev.unregister()
        net.close()
        backstore.flush()
        backstore.close()


_CHILD = (
    "import sys; sys.path.insert(0, sys.argv[1]); import iser; "
    "iser.serve_target(sys.argv[2], sys.argv[3], int(sys.argv[4]))"
)


def run_udp(image: bb.Image, plan: bb.Plan, tmp: Path) -> tuple[dict[str, bb.Rate], dict[str, int]]:
    ip_t, ip_i = bb.loopback_pair(90)
    here = str(Path(__file__).resolve().parent)
    argv = [sys.executable, "-c", _CHILD, here, str(image.path), ip_t, str(ISER_PORT)]
    with bb.child_process(argv, READY, tmp / "iser-target.log") as m:
        net = UdpNetwork()
        dev: RoceDevice | None = None
        ini: IserInitiator | None = None
        try:
            dev = bb.make_device("cpu", net, ip_i, None)
            ini = make_initiator(dev, m.group(1), int(m.group(2)), plan)
            with dev.lock:
                ini.login()
            rates = bb.workloads(IserBlockDevice(ini), image, plan)
            with dev.lock:
                ini.logout()
            return rates, _stats(ini)
        finally:
            if ini is not None:
                with dev.lock if dev is not None else contextlib.nullcontext():
                    ini.close()
            if dev is not None:
                dev.unregister()
            net.close()


def run_setup(
    setup: str, image: bb.Image, plan: bb.Plan, tmp: Path
) -> tuple[dict[str, bb.Rate], dict[str, int]]:
    if setup == "udp":
        return run_udp(image, plan, tmp)
    return run_inproc(setup, image, plan)


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts (under ~30 s)")
    parser.add_argument(
        "--only",
        choices=("cpu", "hw-iommu", "udp"),
        action="append",
        help="run only this set-up (repeatable)",
    )
    parser.add_argument(
        "--max-sectors",
        type=int,
        metavar="N",
        help=f"initiator max_sectors (default: ib_iser's, {ISER_DEF_MAX_SECTORS})",
    )
    parser.add_argument(
        "--depths",
        type=bb._depths,
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
        plan = bb.Plan(32 * MiB, 600, 12, *common, 2.0, 20_000, None, args.max_sectors)
    else:
        plan = bb.Plan(64 * MiB, 5000, 96, *common, 8.0, 100_000, None, args.max_sectors)
    setups = list(dict.fromkeys(args.only or ["cpu", "hw-iommu", "udp"]))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="softrdma-bench-iser-") as tmpdir:
        tmp = Path(tmpdir)
        n = max(plan.random_ios, plan.baseline_random_ios)
        image = bb.make_image(tmp, plan.image_bytes, n)
        rounds, rates, stats = bb.measure(
            image, plan, setups, lambda x: run_setup(x, image, plan, tmp)
        )
    limits, metrics = bb.ratios(rates, rounds)
    elapsed = time.perf_counter() - started
    bb.print_table(metrics, limits, rounds)
    max_sectors = plan.max_sectors or ISER_DEF_MAX_SECTORS
    config = {
        "image_bytes": plan.image_bytes,
        "block_size": bb.BLOCK,
        "random_ios_per_depth": plan.random_ios,
        "seq_ios": plan.seq_ios,
        "seq_depth_1MiB": plan.seq_depth,
        "can_queue": CAN_QUEUE,
        "time_budget_per_measurement_s": plan.budget,
        "max_sectors": max_sectors,
        "target_name": IQN,
        "setups": {
            "cpu": "in process, simulated fabric, SoftRoce (CPU copy) both ends, netdev MTU 9000",
            "hw-iommu": "in process, simulated fabric, HwHca behind an IOMMU both ends, "
            "netdev MTU 9000",
            "udp": "target: IserTarget on a SoftRoce (CPU copy) on a UdpNetwork at 127.90.x.2 "
            "in a child process (bench/iser.py serve_target via python -c); initiator: "
            "SoftRoce on a UdpNetwork at 127.90.x.3 in this process (its own progress "
            "thread); RoCEv2 over loopback, path MTU 4096",
        },
        "baseline_rounds": ["start", *(f"after {x}" for x in setups)],
        "quick": args.quick,
        "elapsed_s": elapsed,
    }
    result: dict[str, object] = {
        "config": config,
        "baselines": bb.baselines_json(limits, rounds),
        "metrics": metrics,
        "initiator_stats": stats,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
