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
import time
from typing import Any

from softrdma.drivers.roce import RoceDevice
from softrdma.ulp.iser import IserInitiator, IserInitiatorError, IserLoginRejected
from tests.interop.initiator_host import (
    Status,
    Workload,
    add_common_args,
    can_queue,
    inquiry_result,
    opened_initiator,
    script_main,
)

LIO_POST_LOGIN_SETTLE = 1.0
"""Seconds between the login and the first PDU (see :func:`run`)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iser_lio_host", description=__doc__.split("\n\n")[0])
    add_common_args(p, port=3260)
    p.add_argument("--iqn", required=True, help="the target name to log in to")
    p.add_argument("--initiator-name", default=None, help="InitiatorName (default open-iscsi's)")
    p.add_argument("--no-send-w-inv", action="store_true", help="CM header 0xC0")
    return p


def make_initiator(args: argparse.Namespace, device: RoceDevice) -> IserInitiator:
    """The initiator of ``args``."""
    return IserInitiator(
        device,
        args.dest,
        args.port,
        target_name=args.iqn,
        initiator_name=args.initiator_name,
        send_w_inv=not args.no_send_w_inv,
        timeout=args.timeout,
        **can_queue(args),
    )


def run(args: argparse.Namespace) -> Status:
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
    with opened_initiator(args, lambda device: make_initiator(args, device)) as ini:
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
        out["inquiry"] = inquiry_result(ini.inquiry())
        out["capacity"] = list(ini.read_capacity())
        out["max_transfer"] = ini.max_transfer
        out["nop"] = ini.nop(b"softrdma ping").decode(errors="replace")
        timings["inquiry+capacity+nop"] = time.monotonic() - t
        work = Workload(ini, args.seed, IserInitiatorError)
        work.run(timings)
        t = time.monotonic()
        ini.logout()
        timings["logout"] = time.monotonic() - t
        out.update(work.result())
        out["stats"] = dict(ini.stats)
    timings["total"] = time.monotonic() - t0
    return (0 if work.ok else 1), out


def main(argv: list[str] | None = None) -> int:
    return script_main(build_parser(), run, IserInitiatorError, argv)


if __name__ == "__main__":
    raise SystemExit(main())
