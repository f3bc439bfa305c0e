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
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from softrdma.dma.types import DmaDirection
from softrdma.drivers.roce import RoceDevice
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
from tests.interop.initiator_host import (
    Status,
    Workload,
    add_common_args,
    can_queue,
    inquiry_result,
    opened_initiator,
    script_main,
)


def _hex64(text: str) -> int:
    return int(text, 16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srp_lio_host", description=__doc__.split("\n\n")[0])
    add_common_args(p, port=5555)
    p.add_argument("--id-ext", type=_hex64, required=True, help="target port ID, high half")
    p.add_argument("--ioc-guid", type=_hex64, required=True, help="target port ID, low half")
    p.add_argument("--initiator-ext", type=_hex64, default=0, help="initiator port ID, high half")
    p.add_argument("--never-register", action="store_true", help="global rkey, no FR")
    p.add_argument("--no-imm", action="store_true", help="do not ask for immediate data")
    p.add_argument("--sg-tablesize", type=int, default=None, help="ib_srp's sg_tablesize")
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


def make_initiator(args: argparse.Namespace, device: RoceDevice) -> RecordingInitiator:
    """The initiator of ``args``: no reconnection (a run is one session)."""
    ini = RecordingInitiator(
        device,
        args.dest,
        args.port,
        id_ext=args.id_ext,
        ioc_guid=args.ioc_guid,
        initiator_ext=args.initiator_ext,
        src=args.ip,
        **can_queue(args),
        sg_tablesize=args.sg_tablesize,
        use_imm_data=not args.no_imm,
        never_register=args.never_register,
        cmd_timeout=args.timeout,
        reconnect_delay=None,
        fast_io_fail_tmo=None,
    )
    ini.requests = []
    return ini


def run(args: argparse.Namespace) -> Status:
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
    with opened_initiator(args, lambda device: make_initiator(args, device)) as ini:
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
        out["inquiry"] = inquiry_result(ini.inquiry())
        out["capacity"] = list(ini.read_capacity())
        out["max_transfer_blocks"] = ini.max_transfer_blocks
        timings["inquiry+capacity"] = time.monotonic() - t
        work = Workload(ini, args.seed, SrpInitiatorError)
        work.run(timings)
        t = time.monotonic()
        ini.logout(timeout=args.timeout)
        timings["logout"] = time.monotonic() - t
        out.update(work.result())
        kinds = Counter(type(r.descriptor).__name__ for r in ini.requests if r.descriptor)
        out["keys"] = sorted({k for r in ini.requests for k in keys_of(r.descriptor)})
        out["descriptors"] = dict(kinds)
        out["stats"] = ini.stats.as_dict()
    timings["total"] = time.monotonic() - t0
    return (0 if work.ok else 1), out


def main(argv: list[str] | None = None) -> int:
    return script_main(build_parser(), run, SrpInitiatorError, argv)


if __name__ == "__main__":
    raise SystemExit(main())
