"""The host side of ``test_srp_lio.py``: softrdma's SRP initiator against a
target, run as its own process in the VM's network namespace.

Support code, not a test module. ``python3 -m tests.interop.srp_lio_host
--ip HOST --dest TARGET --id-ext X --ioc-guid X [...]`` opens a softrdma
device on ``HOST`` over UDP (as every ``softrdma`` tool does,
:func:`softrdma.cli.netdev.open_device`), makes an
:class:`~softrdma.ulp.srp.initiator.SrpInitiator` for ``TARGET:--port``
and logs in. With ``--expect-reject`` that is all: the rejection (or the
login's terms, if it was accepted) is the result. Otherwise it runs a
workload fixed by ``--seed``: INQUIRY, READ CAPACITY, writes of one block
up to several MiB at random places (one at a time, then a batch in
flight together), reads of every written extent and of random ranges,
each compared with a local copy of the whole disk, SYNCHRONIZE CACHE,
and logout.

The result is one JSON object on stdout (see :func:`run`); progress
and the initiator's log go to stderr. Exit status 0 when the run did
what was asked (a login rejected with ``--expect-reject``, every command
successful and every read equal to the reference otherwise), 1 if not,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from typing import Any

from softrdma.cli.netdev import open_device
from softrdma.dma.types import DmaDirection
from softrdma.fabric.udp import UdpLink
from softrdma.memory.scatterlist import Scatterlist
from softrdma.ulp.srp.initiator import (
    SrpBuffer,
    SrpConnectError,
    SrpInitiator,
    SrpInitiatorError,
    SrpLoginRejected,
    SrpRequest,
)
from softrdma.ulp.srp.proto import (
    SrpDataBuf,
    SrpDirectBuf,
    SrpIndirectBuf,
    SrpLoginRejReason,
    SrpLoginRsp,
    SrpLoginRspFlag,
)

log = logging.getLogger("srp_lio_host")

#: Writes done one at a time, in blocks of 512 bytes: a block, a page,
#: exactly the 8 KiB of immediate data, one block more, 64 KiB, 1 MiB and
#: 4 MiB (each at a random LBA; the multi-MiB ones split into commands of
#: ``max_transfer_blocks``).
SERIAL_WRITES = (1, 8, 16, 17, 128, 2048, 8192)
#: A batch submitted together (queue depth > 1, credits in use).
BATCH_WRITES = (3, 24, 100, 256, 1024, 7, 4096, 40)
#: Random reads of these sizes, besides reading back every write.
RANDOM_READS = (1, 9, 300, 4096, 16384)


def _hex64(text: str) -> int:
    return int(text, 16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srp_lio_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--ip", required=True, help="this side's address (the device binds it)")
    p.add_argument("--dest", required=True, help="the target's address")
    p.add_argument("--port", type=int, default=5555, help="the target's RDMA CM port")
    p.add_argument("--id-ext", type=_hex64, required=True, help="target port ID, high half")
    p.add_argument("--ioc-guid", type=_hex64, required=True, help="target port ID, low half")
    p.add_argument("--initiator-ext", type=_hex64, default=0, help="initiator port ID, high half")
    p.add_argument("-d", "--ib-dev", default="rxe0", help="softrdma device: rxe0 or hca0")
    p.add_argument("--never-register", action="store_true", help="global rkey, no FR")
    p.add_argument("--no-imm", action="store_true", help="do not ask for immediate data")
    p.add_argument("--sg-tablesize", type=int, default=None, help="ib_srp's sg_tablesize")
    p.add_argument("--can-queue", type=int, default=None, help="commands in flight at most")
    p.add_argument("--timeout", type=float, default=60.0, help="login and command timeout (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--expect-reject", action="store_true", help="only log in; expect a REJ")
    p.add_argument("--pcap", help="write every frame sent and received")
    return p


def keys_of(desc: SrpDataBuf | None) -> list[int]:
    """The R_Keys a data descriptor hands the target."""
    if isinstance(desc, SrpDirectBuf):
        return [desc.key]
    if isinstance(desc, SrpIndirectBuf):
        return [d.key for d in desc.desc_list]
    return []


def login_terms(rsp: SrpLoginRsp) -> dict[str, int]:
    return {
        "req_lim_delta": rsp.req_lim_delta,
        "max_it_iu_len": rsp.max_it_iu_len,
        "max_ti_iu_len": rsp.max_ti_iu_len,
        "buf_fmt": int(rsp.buf_fmt),
        "rsp_flags": int(rsp.rsp_flags),
        "immed_supp": int(bool(rsp.rsp_flags & SrpLoginRspFlag.IMMED_SUPP)),
    }


class RecordingInitiator(SrpInitiator):
    """An initiator that keeps every command, to tell what its descriptors
    handed the target."""

    requests: list[SrpRequest]

    def submit(
        self,
        cdb: bytes,
        buf: SrpBuffer | Scatterlist | None = None,
        direction: DmaDirection = DmaDirection.NONE,
        *,
        lun: int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        on_done: Callable[[SrpRequest], None] | None = None,
    ) -> SrpRequest:
        req = super().submit(
            cdb, buf, direction, lun=lun, timeout=timeout, retries=retries, on_done=on_done
        )
        self.requests.append(req)
        return req


class Workload:
    """The I/O of one run and the local reference it is checked against."""

    def __init__(self, ini: SrpInitiator, seed: int) -> None:
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
            io = self.ini.submit_write(lba, data)
            self.ini.wait_io(io)
            io.result()
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
            raise SrpInitiatorError("the batch of writes did not complete")
        for io in ios:
            io.result()
        seconds = time.monotonic() - t0
        for lba, data in batch:
            self._record_write(lba, data, seconds)

    def _check_read(self, lba: int, nblocks: int, why: str) -> None:
        t0 = time.monotonic()
        io = self.ini.submit_read(lba, nblocks)
        self.ini.wait_io(io)
        got = io.result()
        assert got is not None
        want = self.ref[lba * self.bs : (lba + nblocks) * self.bs]
        ok = got == want
        if not ok:
            first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
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
def opened(args: argparse.Namespace) -> Iterator[RecordingInitiator]:
    dev_args = argparse.Namespace(ib_dev=args.ib_dev, udp_port=4791)
    dev = open_device(dev_args, IPv4Address(args.ip))
    try:
        if args.pcap and isinstance(dev.device.link, UdpLink):
            dev.device.link.capture(args.pcap)
        ini = RecordingInitiator(
            dev.device,
            args.dest,
            args.port,
            id_ext=args.id_ext,
            ioc_guid=args.ioc_guid,
            initiator_ext=args.initiator_ext,
            src=args.ip,
            **({} if args.can_queue is None else {"can_queue": args.can_queue}),
            sg_tablesize=args.sg_tablesize,
            use_imm_data=not args.no_imm,
            never_register=args.never_register,
            cmd_timeout=args.timeout,
            reconnect_delay=None,
            fast_io_fail_tmo=None,
        )
        ini.requests = []
        try:
            yield ini
        finally:
            ini.close()
    finally:
        dev.close()


def run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """Exit status and the result: the port IDs, the login's terms or
    rejection, and for a workload the INQUIRY and READ CAPACITY data,
    every write (LBA, blocks, SHA-256 of its data and of what the disk
    holds there at the end), every read (and whether it equalled the
    reference), the SHA-256 of the whole reference disk, the R_Keys every
    command's descriptor carried, the initiator's counters and timings."""
    out: dict[str, Any] = {}
    timings: dict[str, float] = {}
    out["timings"] = timings
    t0 = time.monotonic()
    with opened(args) as ini:
        out["initiator_port_id"] = "0x" + ini.initiator_port_id.hex()
        out["target_port_id"] = "0x" + ini.target_port_id.hex()
        out["use_fast_reg"] = ini.use_fast_reg
        out["global_rkey"] = ini.global_rkey
        out["req_it_iu_len"] = ini.max_iu_len
        try:
            rsp = ini.login(timeout=args.timeout)
        except SrpLoginRejected as e:
            reason = int(e.reason)
            name = SrpLoginRejReason(reason).name if reason in set(SrpLoginRejReason) else None
            out["rejected"] = {"reason": reason, "name": name, "cm_reason": e.cm_reason}
            return (0 if args.expect_reject else 1), out
        except SrpConnectError as e:
            out["connect_error"] = {"message": str(e), "errno": e.errno, "cm_reason": e.cm_reason}
            return (0 if args.expect_reject else 1), out
        timings["login"] = time.monotonic() - t0
        out["login"] = login_terms(rsp)
        out["imm_data_in_use"] = ini.imm_data_in_use
        out["max_it_iu_len"] = ini.max_it_iu_len
        out["req_lim_after_login"] = ini.req_lim
        if args.expect_reject:
            ini.logout(timeout=args.timeout)
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
        out["max_transfer_blocks"] = ini.max_transfer_blocks
        timings["inquiry+capacity"] = time.monotonic() - t
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
        ini.logout(timeout=args.timeout)
        timings["logout"] = time.monotonic() - t
        work.settle()
        out["writes"] = work.writes
        out["reads"] = work.reads
        out["mismatches"] = work.mismatches
        out["disk_sha256"] = work.disk_sha256()
        kinds = Counter(type(r.descriptor).__name__ for r in ini.requests if r.descriptor)
        out["keys"] = sorted({k for r in ini.requests for k in keys_of(r.descriptor)})
        out["descriptors"] = dict(kinds)
        out["stats"] = ini.stats.as_dict()
        out["bytes_written"] = sum(int(w["blocks"]) for w in work.writes) * work.bs
        out["bytes_read"] = sum(int(r["blocks"]) for r in work.reads) * work.bs
    timings["total"] = time.monotonic() - t0
    ok = not work.mismatches and all(r["ok"] for r in work.reads)
    return (0 if ok else 1), out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    args = build_parser().parse_args(argv)
    status, out = run(args)
    out["timings"] = {k: round(v, 3) for k, v in out["timings"].items()}
    print(json.dumps(out), flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
