"""The host side of ``test_iser_lio.py``: softrdma's iSER initiator against
a target, run as its own process in the VM's network namespace.

Support code, not a test module. ``python3 -m tests.interop.iser_lio_host
--ip HOST --dest TARGET --iqn IQN [...]`` opens a softrdma device on
``HOST`` over UDP (as every ``softrdma`` tool does,
:func:`softrdma.cli.netdev.open_device`), makes an
:class:`~softrdma.ulp.iser.IserInitiator` for ``TARGET:--port`` and the
target name ``IQN``, and logs in. With ``--expect-reject`` that is all: the
refusal (or the login's terms, if it was accepted: then an INQUIRY and
the logout) is the result.
Otherwise it runs a workload fixed by ``--seed``: INQUIRY, READ CAPACITY,
a NOP-Out ping, writes of one block up to several MiB at random places
(one at a time, then a batch in flight together), reads of every written
extent and of random ranges, each compared with a local copy of the whole
disk, SYNCHRONIZE CACHE, and logout.

The result is one JSON object on stdout (see :func:`run`); progress and
the initiator's log go to stderr. Exit status 0 when the run did what was
asked (a login refused with ``--expect-reject``, every command successful
and every read equal to the reference otherwise), 1 if not, 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from typing import Any

from softrdma.cli.netdev import open_device
from softrdma.fabric.udp import UdpLink
from softrdma.ulp.iser import IserInitiator, IserInitiatorError, IserLoginRejected

log = logging.getLogger("iser_lio_host")

#: Writes done one at a time, in blocks of 512 bytes: a block, a page,
#: exactly the 8 KiB of immediate data, one block more (immediate data and
#: RDMA READ), 64 KiB (beyond LIO's FirstBurstLength), 1 MiB and 4 MiB
#: (each at a random LBA; split into commands of ``max_transfer``).
SERIAL_WRITES = (1, 8, 16, 17, 128, 2048, 8192)
#: A batch submitted together (queue depth > 1, the CmdSN window in use).
BATCH_WRITES = (3, 24, 100, 256, 1024, 7, 4096, 40)
#: Random reads of these sizes, besides reading back every write.
RANDOM_READS = (1, 9, 300, 4096, 16384)

LIO_POST_LOGIN_SETTLE = 1.0
"""Seconds between the login and the first PDU (see :func:`run`)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iser_lio_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--ip", required=True, help="this side's address (the device binds it)")
    p.add_argument("--dest", required=True, help="the target's address")
    p.add_argument("--port", type=int, default=3260, help="the target's RDMA CM port")
    p.add_argument("--iqn", required=True, help="the target name to log in to")
    p.add_argument("--initiator-name", default=None, help="InitiatorName (default open-iscsi's)")
    p.add_argument("-d", "--ib-dev", default="rxe0", help="softrdma device: rxe0 or hca0")
    p.add_argument("--no-send-w-inv", action="store_true", help="CM header 0xC0")
    p.add_argument("--can-queue", type=int, default=None, help="commands in flight at most")
    p.add_argument("--timeout", type=float, default=60.0, help="login and command timeout (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--expect-reject", action="store_true", help="only log in; expect a refusal")
    p.add_argument("--pcap", help="write every frame sent and received")
    return p


class Workload:
    """The I/O of one run and the local reference it is checked against."""

    def __init__(self, ini: IserInitiator, seed: int) -> None:
        self.ini = ini
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
        ios = [self.ini.submit_write(lba, data) for lba, data in batch]
        if not self.ini.wait_io(ios, 600.0):
            raise IserInitiatorError("the batch of writes did not complete")
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

    def settle(self) -> None:
        """Give each write extent the SHA-256 of what the disk now holds
        there (writes may overlap: a later one wins)."""
        for w in self.writes:
            start = int(w["lba"]) * self.bs
            end = start + int(w["blocks"]) * self.bs
            w["final_sha256"] = hashlib.sha256(self.ref[start:end]).hexdigest()

    def disk_sha256(self) -> str:
        return hashlib.sha256(self.ref).hexdigest()


@contextmanager
def opened(args: argparse.Namespace) -> Iterator[IserInitiator]:
    dev_args = argparse.Namespace(ib_dev=args.ib_dev, udp_port=4791)
    dev = open_device(dev_args, IPv4Address(args.ip))
    try:
        if args.pcap and isinstance(dev.device.link, UdpLink):
            dev.device.link.capture(args.pcap)
        ini = IserInitiator(
            dev.device,
            args.dest,
            args.port,
            target_name=args.iqn,
            initiator_name=args.initiator_name,
            send_w_inv=not args.no_send_w_inv,
            timeout=args.timeout,
            **({} if args.can_queue is None else {"can_queue": args.can_queue}),
        )
        try:
            yield ini
        finally:
            ini.close()
    finally:
        dev.close()


def run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """Exit status and the result: the login's negotiated keys or the
    refusal (the Login Response's status class and detail), and for a
    workload the INQUIRY and READ CAPACITY data, every write (LBA, blocks,
    SHA-256 of its data and of what the disk holds there at the end),
    every read (and whether it equalled the reference), the SHA-256 of the
    whole reference disk, the initiator's counters and timings."""
    out: dict[str, Any] = {}
    timings: dict[str, float] = {}
    out["timings"] = timings
    t0 = time.monotonic()
    with opened(args) as ini:
        out["initiator_name"] = ini.initiator_name
        out["isid"] = f"0x{ini.isid:012x}"
        try:
            done = ini.login()
        except IserInitiatorError as e:
            out["login_error"] = {"type": type(e).__name__, "message": str(e), "errno": e.errno}
            if isinstance(e, IserLoginRejected):
                out["login_error"]["status_class"] = e.status_class
                out["login_error"]["status_detail"] = e.status_detail
            return (0 if args.expect_reject else 1), out
        timings["login"] = time.monotonic() - t0
        # LIO sets the connection's and session's negotiated parameters in
        # iscsi_post_login_handler, which its login thread runs only after
        # the final Login Response has gone out. A command ib_isert receives
        # before that meets zeroed conn_ops / sess_ops: DataPDUInOrder=0 and
        # MaxXmitDataSegmentLength=0 send iscsit_build_pdu_and_seq_lists into
        # an endless loop (a soft lockup of the VM), and a Logout is ignored
        # as "not in logged in state". open-iscsi never meets it: its first
        # command waits for iscsid and the SCSI scan. Give LIO that moment.
        time.sleep(LIO_POST_LOGIN_SETTLE)
        neg = done.negotiated
        out["login"] = {
            "tsih": done.tsih,
            "values": dict(sorted(neg.values.items())),
            "declared": dict(sorted(neg.declared.items())),
        }
        out["remote_inv"] = ini.remote_inv
        if args.expect_reject:
            ini.inquiry()
            ini.logout()
            return 1, out
        t = time.monotonic()
        inq = ini.inquiry()
        out["inquiry"] = {
            "peripheral_type": inq.peripheral_type,
            "vendor": inq.vendor,
            "product": inq.product,
            "revision": inq.revision,
        }
        out["capacity"] = list(ini.read_capacity())
        out["max_transfer"] = ini.max_transfer
        out["nop"] = ini.nop(b"softrdma ping").decode(errors="replace")
        timings["inquiry+capacity+nop"] = time.monotonic() - t
        work = Workload(ini, args.seed)
        for name, step in (
            ("serial writes", work.write_serial),
            ("batch writes", work.write_batch),
            ("reads", work.read_back),
            ("sync", ini.sync),
        ):
            t = time.monotonic()
            log.info("%s", name)
            step()
            timings[name] = time.monotonic() - t
        t = time.monotonic()
        ini.logout()
        timings["logout"] = time.monotonic() - t
        work.settle()
        out["writes"] = work.writes
        out["reads"] = work.reads
        out["mismatches"] = work.mismatches
        out["disk_sha256"] = work.disk_sha256()
        out["stats"] = dict(ini.stats)
        out["bytes_written"] = sum(int(w["blocks"]) for w in work.writes) * work.bs
        out["bytes_read"] = sum(int(r["blocks"]) for r in work.reads) * work.bs
    timings["total"] = time.monotonic() - t0
    ok = not work.mismatches and all(r["ok"] for r in work.reads)
    return (0 if ok else 1), out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        status, out = run(args)
    except IserInitiatorError as e:  # a failed session is a result, not a traceback
        status, out = 1, {"error": f"{type(e).__name__}: {e}", "timings": {}}
    out["timings"] = {k: round(v, 3) for k, v in out["timings"].items()}
    print(json.dumps(out), flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
