"""``softrdma srp``: SRP, the SCSI RDMA Protocol.

One subparser per subcommand, registered in :data:`SUBCOMMANDS` with the
function that adds its options to its parser and the one that runs it
(``run_<name>(args, out, err)`` → exit status): ``target`` (below),
``initiator`` (:mod:`softrdma.cli.srp_initiator`: log in to a target as
``ib_srp`` does and read, write or verify its disk) and ``demo``
(:mod:`softrdma.cli.srp_demo`: both ends on every device pairing in one
process).

``softrdma srp target IMAGE --ip ADDR`` serves a disk image to SRP
initiators — Linux's ``ib_srp`` among them — the way LIO's ``ib_srpt``
does with a ``fileio`` backstore: it opens the device (``--ib-dev``) on
``ADDR`` over UDP (:mod:`softrdma.cli.netdev`), a
:class:`~softrdma.ulp.scsi.FileBackstore` over ``IMAGE`` (created sparse
with ``--create-size``; ``--read-only`` write-protects it), a
:class:`~softrdma.ulp.scsi.ScsiTarget` with it as LUN 0, and an
:class:`~softrdma.ulp.srp.target.SrpTarget` listening on the RDMA CM at
``ADDR:--port`` (5555, ``ib_srpt``'s). The target port identifier
(``--id-ext``, ``--ioc-guid``) defaults to the device's node GUID for both
halves, as ``ib_srpt`` derives it (``srpt_service_guid``). At start it
prints what it serves and the ``add_target`` line a Linux initiator writes
to ``/sys/class/infiniband_srp/srp-<device>-<port>/add_target``::

    add_target: id_ext=00007ffffe000002,ioc_guid=00007ffffe000002,dest=127.0.0.2:5555

then serves until SIGINT or SIGTERM, logging each login, logout and
rejected login on one line with its time and initiator (port ID, address)::

    2025-01-31 12:00:00.123 login: initiator 0x0000000000000000505400fffe770001 from 10.77.0.1:40493 (channel 1)
    2025-01-31 12:00:09.456 logout: initiator 0x0000000000000000505400fffe770001 from 10.77.0.1:40493 (channel 1): disconnected by the initiator

(Linux's ``ib_srp`` logs in once per completion vector: one channel, and
one line, each.)

On SIGINT or SIGTERM it logs every initiator out (a CM DREQ each, waiting
up to :data:`LOGOUT_GRACE` seconds for the DREPs), flushes the image and
exits 0. Errors — bad arguments, an image that is missing or of the wrong
size, an address not on this host, UDP port 4791 taken — are one line on
stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from softrdma.cli.netdev import OpenDevice
from softrdma.cli.target_common import (
    LOGOUT_GRACE,
    LogLines,
    OneLineParser,
    add_image_target_options,
    one_line_errors,
    parse_guid,
    parse_port,
    parse_size,
    run_image_target,
    serve_until_stopped,
    start_image_target,
)
from softrdma.cm.cma import RdmaCmEvent, RdmaCmEventType
from softrdma.ulp.scsi import VERSION_SRP, FileBackstore, ScsiTarget
from softrdma.ulp.srp.proto import SrpError, SrpLoginReq
from softrdma.ulp.srp.target import SRPT_DEFAULT_PORT, ChState, SrpChannel, SrpTarget

__all__ = [
    "LOGOUT_GRACE",
    "SUBCOMMANDS",
    "build_parser",
    "build_target_parser",
    "parse_guid",
    "parse_size",
    "run",
    "run_target",
]


# -- the command line ------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """``softrdma srp`` and its subcommands."""
    p = parser or argparse.ArgumentParser(prog="softrdma srp")
    p.description = (
        "SRP (SCSI RDMA Protocol) over softrdma's RDMA CM: a target and an initiator on the "
        "real network, and a demo on the simulated fabric."
    )
    one_line_errors(p)
    sub = p.add_subparsers(
        dest="srp_command", metavar="SUBCOMMAND", required=True, parser_class=OneLineParser
    )
    for name, (build, _, text) in SUBCOMMANDS.items():
        build(sub.add_parser(name, help=text, description=text))
    return p


def build_target_parser(p: argparse.ArgumentParser) -> None:
    """The options of ``softrdma srp target``."""
    add_image_target_options(p)
    p.add_argument(
        "--port",
        type=parse_port,
        default=SRPT_DEFAULT_PORT,
        help=f"RDMA CM port to listen on (default {SRPT_DEFAULT_PORT}, as ib_srpt)",
    )
    p.add_argument(
        "--id-ext",
        type=parse_guid,
        metavar="HEX",
        help="target port ID extension (default: the device's node GUID, as ib_srpt)",
    )
    p.add_argument(
        "--ioc-guid",
        type=parse_guid,
        metavar="HEX",
        help="I/O controller GUID (default: the device's node GUID, as ib_srpt)",
    )


def run(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the subcommand ``args`` names; its exit status."""
    _, run_sub, _ = SUBCOMMANDS[args.srp_command]
    return run_sub(args, sys.stdout if out is None else out, sys.stderr if err is None else err)


# -- the target --------------------------------------------------------------------------


def _who(port_id: bytes, addr: object, port: int) -> str:
    return f"initiator 0x{port_id.hex()} from {addr}:{port}"


@dataclass(eq=False)
class _Session:
    """A channel the log has seen."""

    number: int
    who: str
    live: bool = False
    reason: str | None = None
    """Why it ended, when the initiator or the tool ended it."""
    note: str | None = None
    """The last thing the target logged about it since it went live."""


class _SessionLog(logging.Handler):
    """Logs logins, logouts and rejected logins, one line each.

    It sits between the RDMA CM and the target (wrapping the target's event
    handler, on the progress thread holding the device's lock): after each
    event it compares the target's channels with those it knew, so a login
    is logged when its channel goes live and a logout when it is gone. The
    reasons come from the event (a DREQ from the initiator), from what the
    target logs about the channel (``softrdma.srpt``: an SRP_I_LOGOUT, a
    bad IU, an RDMA error) or from the tool (stopping). Warnings the target
    logs are printed too."""

    def __init__(self, target: SrpTarget, out: TextIO) -> None:
        super().__init__(logging.INFO)
        self.target = target
        self.lines = LogLines(out)
        self._known: dict[SrpChannel, _Session] = {}
        self._count = 0
        self._reject_reason: str | None = None
        self._handler = target.channel.handler
        target.channel.handler = self._event

    # -- output

    def line(self, text: str) -> None:
        self.lines.line(text)

    def emit(self, record: logging.LogRecord) -> None:
        """A record of ``softrdma.srpt``: a reason for a channel's end, the
        reason of a rejected login, or a warning to show."""
        try:
            msg = record.getMessage()
        except Exception:  # a bad record must not stop the target
            return
        subject = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if isinstance(subject, SrpChannel):
            session = self._known.get(subject)
            if session is not None and session.live:
                session.note = msg.split(": ", 1)[-1]
        elif msg.startswith("rejected SRP_LOGIN_REQ: "):
            self._reject_reason = msg.removeprefix("rejected SRP_LOGIN_REQ: ")
        if record.levelno >= logging.WARNING:
            self.line(f"srpt: {msg}")

    # -- events

    def _event(self, ev: RdmaCmEvent) -> None:
        E = RdmaCmEventType
        ch = next((c for c in self.target.channels if c.cm_id is ev.id), None)
        session = self._known.get(ch) if ch is not None else None
        if session is not None and ch is not None and ch.state is not ChState.DISCONNECTING:
            if ev.event is E.DISCONNECTED:
                session.reason = session.reason or "disconnected by the initiator"
            elif ev.event in (E.REJECTED, E.UNREACHABLE, E.DEVICE_REMOVAL):
                session.reason = session.reason or f"connection lost ({ev.event.name})"
        login: SrpLoginReq | None = None
        live_before = set()
        if ev.event is E.CONNECT_REQUEST:
            self._reject_reason = None
            live_before = {c for c in self.target.channels if c.state is ChState.LIVE}
            try:
                login = SrpLoginReq.decode_rdma(ev.param.private_data if ev.param else b"")
            except SrpError:
                login = None
        assert self._handler is not None
        self._handler(ev)
        if ev.event is E.CONNECT_REQUEST:
            for old in live_before:
                s = self._known.get(old)
                if s is not None and old.state is ChState.DISCONNECTING:
                    s.reason = s.reason or "replaced by a new login of the initiator"
            if not any(c.cm_id is ev.id for c in self.target.channels):
                who = _who(login.initiator_port_id if login else b"", ev.id.dst_addr,
                           ev.id.dst_port)  # fmt: skip
                why = self._reject_reason or "not accepted"
                self.line(f"login rejected: {who}: {why}")
        self.sync()
        dev = ev.id.device
        if dev is not None:
            dev.lock.notify_all()  # wake the main thread waiting for the channels to go

    def sync(self, reason: str | None = None) -> None:
        """Log the channels that went live and those that are gone (call
        holding the device's lock)."""
        current = set(self.target.channels)
        for ch in self.target.channels:
            session = self._known.get(ch)
            if session is None:
                self._count += 1
                session = self._known[ch] = _Session(
                    self._count, _who(ch.initiator_port_id, ch.cm_id.dst_addr, ch.cm_id.dst_port)
                )
            if not session.live and ch.state in (ChState.LIVE, ChState.DISCONNECTING):
                session.live = True
                self.line(f"login: {session.who} (channel {session.number})")
            if reason is not None and session.reason is None:
                session.reason = reason
        for ch, session in list(self._known.items()):
            if ch in current and ch.state is not ChState.RELEASED:
                continue
            del self._known[ch]
            if session.live:
                why = session.reason or session.note or reason or "closed by the target"
                self.line(f"logout: {session.who} (channel {session.number}): {why}")
            else:
                why = session.reason or session.note or reason or "no RTU"
                self.line(f"login failed: {session.who} (channel {session.number}): {why}")

    def detach(self) -> None:
        self.target.channel.handler = self._handler


def run_target(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``softrdma srp target``: serve until SIGINT or SIGTERM; 0, or 1 after
    a one-line error."""
    prog = "softrdma srp target"
    return run_image_target(args, err, prog, lambda b: _serve_image(args, b, out, err, prog))


def _serve_image(
    args: argparse.Namespace, backstore: FileBackstore, out: TextIO, err: TextIO, prog: str
) -> int:
    def make(opened: OpenDevice, scsi: ScsiTarget) -> SrpTarget:
        return SrpTarget(
            opened.device.host, scsi, addr=args.ip, port=args.port, id_ext=args.id_ext,
            ioc_guid=args.ioc_guid,
        )  # fmt: skip

    started = start_image_target(args, backstore, err, prog, VERSION_SRP, make)
    if started is None:
        return 1
    opened, target = started
    try:
        return _serve(target, opened, backstore, out)
    finally:
        opened.close()


def _serve(target: SrpTarget, opened: OpenDevice, backstore: FileBackstore, out: TextIO) -> int:
    dev = opened.device
    srpt = logging.getLogger("softrdma.srpt")
    old_level, old_propagate = srpt.level, srpt.propagate
    log = _SessionLog(target, out)
    srpt.addHandler(log)
    srpt.setLevel(logging.INFO)
    srpt.propagate = False

    try:
        return serve_until_stopped(
            opened,
            backstore,
            log,
            listening=f"listening on {dev.name} {dev.ip}:{target.port} (RDMA CM), target port "
            f"ID 0x{target.target_port_id.hex()}",
            banner=[f"add_target: {target.add_target_line(str(dev.ip))}"],
            live=lambda: len(target.channels),
            target=target,
        )
    finally:
        log.detach()
        srpt.removeHandler(log)
        srpt.setLevel(old_level)
        srpt.propagate = old_propagate


# The initiator's and the demo's modules import this one's parsers, so they
# are imported when used.


def _build_initiator(p: argparse.ArgumentParser) -> None:
    from softrdma.cli.srp_initiator import build_initiator_parser

    build_initiator_parser(p)


def _run_initiator(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from softrdma.cli.srp_initiator import run_initiator

    return run_initiator(args, out, err)


def _build_demo(p: argparse.ArgumentParser) -> None:
    from softrdma.cli.srp_demo import build_demo_parser

    build_demo_parser(p)


def _run_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from softrdma.cli.srp_demo import run_demo

    return run_demo(args, out, err)


#: name -> (add its options to a parser, run it, one-line description).
SUBCOMMANDS: dict[
    str,
    tuple[
        Callable[[argparse.ArgumentParser], None],
        Callable[[argparse.Namespace, TextIO, TextIO], int],
        str,
    ],
] = {
    "target": (
        build_target_parser,
        run_target,
        "serve a disk image to SRP initiators (Linux ib_srp among them), like ib_srpt",
    ),
    "initiator": (
        _build_initiator,
        _run_initiator,
        "log in to an SRP target, like ib_srp's add_target, and read, write or verify its disk",
    ),
    "demo": (
        _build_demo,
        _run_demo,
        "an SRP initiator and target on every device pairing, in one process",
    ),
}
