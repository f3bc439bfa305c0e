"""What the host-side initiator scripts share (``srp_lio_host.py``,
``iser_lio_host.py``): their common options, the softrdma device they open,
the block workload they run against a target's LUN and the JSON result
they print.

Support code, not a test module. Each script adds its protocol's options,
makes its initiator on :func:`opened_initiator`, logs in, runs a
:class:`Workload` (:meth:`Workload.run`) and hands its result to
:func:`script_main`, which prints it as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from ipaddress import IPv4Address
from typing import Any, Protocol, TypeVar

from softrdma.cli.netdev import open_device
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.udp import UdpLink
from softrdma.ulp.srp.initiator_scsi import Inquiry

log = logging.getLogger("initiator_host")

#: Writes done one at a time, in blocks of 512 bytes: a block, a page,
#: exactly the 8 KiB of immediate data, one block more (immediate data and
#: the target's RDMA READ), 64 KiB (beyond LIO's FirstBurstLength), 1 MiB
#: and 4 MiB (each at a random LBA; the large ones split into commands of
#: the initiator's largest transfer).
SERIAL_WRITES = (1, 8, 16, 17, 128, 2048, 8192)
#: A batch submitted together (queue depth > 1: credits, the CmdSN window).
BATCH_WRITES = (3, 24, 100, 256, 1024, 7, 4096, 40)
#: Random reads of these sizes, besides reading back every write.
RANDOM_READS = (1, 9, 300, 4096, 16384)
BATCH_TIMEOUT = 600.0
"""Bound on the batch of writes in flight together (seconds)."""

#: What a script's ``run`` returns: its exit status and its JSON result.
Status = tuple[int, dict[str, Any]]


class BlockIo(Protocol):
    """A queued block I/O (``IserIo``, the SRP initiator's ``BlockIo``)."""

    def result(self) -> bytes | None: ...


class BlockInitiator(Protocol):
    """The disk interface both block initiators give (``sd`` over a SCSI
    host: ``SrpInitiator``, ``IserInitiator``)."""

    @property
    def block_size(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    def read(self, lba: int, nblocks: int) -> bytes: ...
    def write(self, lba: int, data: bytes) -> None: ...
    def submit_write(self, lba: int, data: bytes) -> Any: ...
    def wait_io(self, ios: Sequence[Any], timeout: float | None = None) -> bool: ...
    def sync(self) -> None: ...


def add_common_args(p: argparse.ArgumentParser, port: int) -> None:
    """The options every host-side initiator script takes; ``port`` is the
    target's default RDMA CM port."""
    p.add_argument("--ip", required=True, help="this side's address (the device binds it)")
    p.add_argument("--dest", required=True, help="the target's address")
    p.add_argument("--port", type=int, default=port, help="the target's RDMA CM port")
    p.add_argument("-d", "--ib-dev", default="rxe0", help="softrdma device: rxe0 or hca0")
    p.add_argument("--can-queue", type=int, default=None, help="commands in flight at most")
    p.add_argument("--timeout", type=float, default=60.0, help="login and command timeout (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--expect-reject", action="store_true", help="only log in; expect a refusal")
    p.add_argument("--pcap", help="write every frame sent and received")


def can_queue(args: argparse.Namespace) -> dict[str, Any]:
    """``can_queue`` for the initiator when ``--can-queue`` was given (else
    its own default stands)."""
    return {} if args.can_queue is None else {"can_queue": args.can_queue}


class Closable(Protocol):
    """What an initiator offers to end its session and free its resources."""

    def close(self) -> None: ...


Ini = TypeVar("Ini", bound=Closable)


@contextmanager
def opened_initiator(args: argparse.Namespace, make: Callable[[RoceDevice], Ini]) -> Iterator[Ini]:
    """The initiator ``make`` builds on the softrdma device ``--ib-dev`` on
    ``--ip`` over UDP port 4791 (as every ``softrdma`` tool opens it,
    :func:`softrdma.cli.netdev.open_device`), capturing to ``--pcap``; the
    initiator and the device closed afterwards."""
    dev = open_device(argparse.Namespace(ib_dev=args.ib_dev, udp_port=4791), IPv4Address(args.ip))
    try:
        if args.pcap and isinstance(dev.device.link, UdpLink):
            dev.device.link.capture(args.pcap)
        ini = make(dev.device)
        try:
            yield ini
        finally:
            ini.close()
    finally:
        dev.close()


def inquiry_result(inq: Inquiry) -> dict[str, Any]:
    """Standard INQUIRY data as the result carries it."""
    return {
        "peripheral_type": inq.peripheral_type,
        "vendor": inq.vendor,
        "product": inq.product,
        "revision": inq.revision,
    }


class Workload:
    """The I/O of one run and the local reference it is checked against."""

    def __init__(self, ini: BlockInitiator, seed: int, error: Callable[[str], Exception]) -> None:
        self.ini = ini
        self.error = error  # the initiator's own error type, for a batch left unfinished
        self.rng = random.Random(seed)
        self.bs = ini.block_size
        self.blocks = ini.capacity
        self.ref = bytearray(self.blocks * self.bs)  # a new backstore reads as zeros
        self.writes: list[dict[str, Any]] = []
        self.reads: list[dict[str, Any]] = []
        self.mismatches: list[dict[str, int]] = []

    def _data(self, nblocks: int) -> bytes:
        return self.rng.randbytes(nblocks * self.bs)

    def _place(self, nblocks: int) -> int:
        return self.rng.randrange(0, self.blocks - nblocks + 1)

    def _record_write(self, lba: int, data: bytes, seconds: float) -> None:
        self.ref[lba * self.bs : lba * self.bs + len(data)] = data
        self.writes.append(
            {
                "lba": lba,
                "blocks": len(data) // self.bs,
                "sha256": hashlib.sha256(data).hexdigest(),
                "seconds": round(seconds, 3),
            }
        )

    def write_serial(self) -> None:
        for n in SERIAL_WRITES:
            lba, data = self._place(n), self._data(n)
            t0 = time.monotonic()
            self.ini.write(lba, data)
            self._record_write(lba, data, time.monotonic() - t0)

    def write_batch(self) -> None:
        """Non-overlapping writes all submitted before any is waited for."""
        taken: list[tuple[int, int]] = []
        batch: list[tuple[int, bytes]] = []
        for n in BATCH_WRITES:
            while True:
                lba = self._place(n)
                if all(lba + n <= a or b <= lba for a, b in taken):
                    break
            taken.append((lba, lba + n))
            batch.append((lba, self._data(n)))
        t0 = time.monotonic()
        ios: list[BlockIo] = [self.ini.submit_write(lba, data) for lba, data in batch]
        if not self.ini.wait_io(ios, BATCH_TIMEOUT):
            raise self.error("the batch of writes did not complete")
        for io in ios:
            io.result()
        seconds = time.monotonic() - t0
        for lba, data in batch:
            self._record_write(lba, data, seconds)

    def _check_read(self, lba: int, nblocks: int, why: str) -> None:
        t0 = time.monotonic()
        got = self.ini.read(lba, nblocks)
        want = self.ref[lba * self.bs : (lba + nblocks) * self.bs]
        ok = got == want
        if not ok:
            first = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            self.mismatches.append({"lba": lba, "blocks": nblocks, "first_byte": first})
        self.reads.append(
            {
                "lba": lba,
                "blocks": nblocks,
                "why": why,
                "ok": ok,
                "seconds": round(time.monotonic() - t0, 3),
            }
        )

    def read_back(self) -> None:
        for w in self.writes:
            self._check_read(int(w["lba"]), int(w["blocks"]), "written")
        for n in RANDOM_READS:
            self._check_read(self._place(n), n, "random")

    def run(self, timings: dict[str, float]) -> None:
        """Serial writes, the batch, the reads, SYNCHRONIZE CACHE; each
        step's time in ``timings``."""
        for name, step in (
            ("serial writes", self.write_serial),
            ("batch writes", self.write_batch),
            ("reads", self.read_back),
            ("sync", self.ini.sync),
        ):
            t = time.monotonic()
            log.info("%s", name)
            step()
            timings[name] = time.monotonic() - t

    @property
    def ok(self) -> bool:
        """Every read equal to the reference."""
        return not self.mismatches and all(r["ok"] for r in self.reads)

    def result(self) -> dict[str, Any]:
        """Every write (LBA, blocks, SHA-256 of its data and of what the
        disk holds there at the end: writes may overlap, a later one wins),
        every read, the SHA-256 of the whole reference disk and the bytes
        moved."""
        for w in self.writes:
            start = int(w["lba"]) * self.bs
            end = start + int(w["blocks"]) * self.bs
            w["final_sha256"] = hashlib.sha256(self.ref[start:end]).hexdigest()
        return {
            "writes": self.writes,
            "reads": self.reads,
            "mismatches": self.mismatches,
            "disk_sha256": hashlib.sha256(self.ref).hexdigest(),
            "bytes_written": sum(int(w["blocks"]) for w in self.writes) * self.bs,
            "bytes_read": sum(int(r["blocks"]) for r in self.reads) * self.bs,
        }


def script_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Status],
    errors: type[Exception] | tuple[type[Exception], ...],
    argv: list[str] | None = None,
) -> int:
    """Parse ``argv`` (exit 2 on bad arguments), ``run`` it and print its
    result as one JSON line, ``timings`` rounded to milliseconds; the exit
    status ``run`` chose, 1 when it raised one of ``errors`` (a failed
    session is a result, not a traceback)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    args = parser.parse_args(argv)
    try:
        status, out = run(args)
    except errors as e:
        status, out = 1, {"error": f"{type(e).__name__}: {e}", "timings": {}}
    out["timings"] = {k: round(v, 3) for k, v in out["timings"].items()}
    print(json.dumps(out), flush=True)
    return status
