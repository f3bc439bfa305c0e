"""``softrdma iser``: iSER, iSCSI Extensions for RDMA.

``softrdma iser target IMAGE --ip ADDR`` serves a disk image to iSER
initiators — Linux's ``ib_iser`` under open-iscsi among them — the way LIO's
``ib_isert`` does with a ``fileio`` backstore: it opens the device
(``--ib-dev``) on ``ADDR`` over UDP (:mod:`softrdma.cli.netdev`), a
:class:`~softrdma.ulp.scsi.FileBackstore` over ``IMAGE`` (created sparse
with ``--create-size``; ``--read-only`` write-protects it), a
:class:`~softrdma.ulp.scsi.ScsiTarget` with it as LUN 0, and an
:class:`~softrdma.ulp.iser.IserTarget` listening on the RDMA CM at
``ADDR:--port`` (3260, iSCSI's) for the target name ``--iqn``. The name
defaults to LIO's style, ``iqn.2003-01.org.linux-iscsi.<hostname>.x8664:sn.<12 hex>``,
the serial derived from the device's node GUID so that it is the same on
every start (:func:`default_iqn`). At start it prints the name and the
``iscsiadm`` lines a Linux initiator uses (a static node entry on
open-iscsi's built-in iface ``iser``, whose transport is ``ib_iser``, and
the login)::

    iqn: iqn.2003-01.org.linux-iscsi.myhost.x8664:sn.3f2a9c01d4e7
    iscsiadm -m node -o new -T iqn.2003-01.org.linux-iscsi.myhost.x8664:sn.3f2a9c01d4e7 -p 10.77.0.2:3260 -I iser
    iscsiadm -m node -T iqn.2003-01.org.linux-iscsi.myhost.x8664:sn.3f2a9c01d4e7 -p 10.77.0.2:3260 -I iser --login

open-iscsi refuses to create or update an iface named ``iser`` ("a special
interface"): it is always there, so no ``-m iface`` step is needed. An
iface of another name with ``iface.transport_name=iser`` works the same.

then serves until SIGINT or SIGTERM, logging each login, logout and
rejected login on one line with its time, the initiator's name, its ISID
and its address::

    2025-01-31 12:00:00.123 login: initiator iqn.2005-03.org.open-iscsi:host ISID 0x00023d000001 from 10.77.0.1:40493 (connection 1)
    2025-01-31 12:00:09.456 logout: initiator iqn.2005-03.org.open-iscsi:host ISID 0x00023d000001 from 10.77.0.1:40493 (connection 1): logged out by the initiator

On SIGINT or SIGTERM it logs every initiator out (a CM DREQ each, waiting
up to :data:`LOGOUT_GRACE` seconds for the DREPs), flushes the image and
exits 0. Errors are one line on stderr and exit status 1, as for
``softrdma srp target`` (the helpers both share are in
:mod:`softrdma.cli.target_common`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import re
import socket
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
    parse_port,
    run_image_target,
    serve_until_stopped,
    start_image_target,
)
from softrdma.cm.cma import RdmaCmEvent, RdmaCmEventType
from softrdma.errors import SoftRdmaError
from softrdma.ulp.iscsi.proto import IscsiLoginRequest
from softrdma.ulp.iscsi.session import (
    ConnectionClosed,
    ConnectionDropped,
    IscsiUsageError,
    LoginCompleted,
    LoginFailed,
    LogoutRequested,
)
from softrdma.ulp.iscsi.text import decode_text
from softrdma.ulp.iser.target import ISERT_DEFAULT_PORT, ConnState, IserConn, IserTarget
from softrdma.ulp.scsi import VERSION_ISCSI, FileBackstore, ScsiTarget

__all__ = [
    "LOGOUT_GRACE",
    "build_parser",
    "build_target_parser",
    "default_iqn",
    "iscsiadm_lines",
    "run",
    "run_target",
]


_IQN = re.compile(r"(iqn\.\d{4}-\d\d\.[^\s:]+(:\S+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})")


def default_iqn(node_guid: int, hostname: str | None = None) -> str:
    """LIO's default target name, ``iqn.2003-01.org.linux-iscsi.<hostname>.x8664:sn.<12 hex>``,
    the serial derived from ``node_guid`` (LIO draws it at random; a
    derived one is the same on every start of the same device)."""
    host = (hostname if hostname is not None else socket.gethostname()).split(".")[0].lower()
    host = re.sub(r"[^a-z0-9-]", "-", host).strip("-") or "localhost"
    serial = hashlib.sha256(node_guid.to_bytes(8, "big")).hexdigest()[:12]
    return f"iqn.2003-01.org.linux-iscsi.{host}.x8664:sn.{serial}"


def iscsiadm_lines(iqn: str, addr: str, port: int) -> list[str]:
    """The open-iscsi commands that log a Linux initiator in over iSER: a
    static node entry on the built-in iface ``iser`` (open-iscsi 2.1
    creates it itself and refuses ``-m iface -I iser -o new``), then the
    login."""
    where = f"-T {iqn} -p {addr}:{port} -I iser"
    return [f"iscsiadm -m node -o new {where}", f"iscsiadm -m node {where} --login"]


def _parse_iqn(text: str) -> str:
    if not _IQN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid iSCSI name: {text!r} (iqn.YYYY-MM.reversed.domain[:id], eui.*, naa.*)"
        )
    return text


# -- the command line ------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """``softrdma iser`` and its subcommands."""
    p = parser or argparse.ArgumentParser(prog="softrdma iser")
    p.description = "iSER (iSCSI Extensions for RDMA) over softrdma's RDMA CM on the real network."
    one_line_errors(p)
    sub = p.add_subparsers(
        dest="iser_command", metavar="SUBCOMMAND", required=True, parser_class=OneLineParser
    )
    for name, (build, _, text) in SUBCOMMANDS.items():
        build(sub.add_parser(name, help=text, description=text))
    return p


def build_target_parser(p: argparse.ArgumentParser) -> None:
    """The options of ``softrdma iser target``."""
    add_image_target_options(p)
    p.add_argument(
        "--port",
        type=parse_port,
        default=ISERT_DEFAULT_PORT,
        help=f"RDMA CM port to listen on (default {ISERT_DEFAULT_PORT}, iSCSI's)",
    )
    p.add_argument(
        "--iqn",
        type=_parse_iqn,
        metavar="IQN",
        help="the target's iSCSI name (default: LIO's style, "
        "iqn.2003-01.org.linux-iscsi.<hostname>.x8664:sn.<12 hex> from the node GUID)",
    )


def run(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the subcommand ``args`` names; its exit status."""
    _, run_sub, _ = SUBCOMMANDS[args.iser_command]
    return run_sub(args, sys.stdout if out is None else out, sys.stderr if err is None else err)


# -- the target --------------------------------------------------------------------------


@dataclass(eq=False)
class _Session:
    """A connection the log has seen."""

    number: int
    address: str
    who: str = ""
    live: bool = False
    rejected: bool = False
    reason: str | None = None
    """Why it ended (the initiator's Logout, a refused login, the tool)."""


def _login_who(conn: IserConn, address: str) -> str:
    """The initiator of a connection that did not log in: what its first
    Login Request said, when there is one."""
    first = conn.conn.first_login
    name, isid = "?", None
    if isinstance(first, IscsiLoginRequest):
        isid = first.isid
        with contextlib.suppress(ValueError, SoftRdmaError):
            name = dict(decode_text(first.data)).get("InitiatorName", "?")
    isid_text = f"0x{isid:012x}" if isid is not None else "?"
    return f"initiator {name} ISID {isid_text} from {address}"


class _SessionLog:
    """Logs logins, logouts and rejected logins, one line each.

    It wraps the target's RDMA CM handler and is the target's observer of
    its connections' iSCSI events (both on the progress thread holding the
    device's lock): a :class:`LoginCompleted` is a login, a
    :class:`LoginFailed` a rejected login, a :class:`LogoutRequested` or
    the end of the connection a logout. Warnings of ``softrdma.isert`` are
    printed too (:meth:`emit`)."""

    def __init__(self, target: IserTarget, out: TextIO) -> None:
        self.target = target
        self.lines = LogLines(out)
        self._known: dict[IserConn, _Session] = {}
        self._count = 0
        self._handler = target.channel.handler
        target.channel.handler = self._event
        target.observer = self._observe

    def line(self, text: str) -> None:
        self.lines.line(text)

    def _event(self, ev: RdmaCmEvent) -> None:
        E = RdmaCmEventType
        c = next((x for x in self.target.conns if x.cm_id is ev.id), None)
        session = self._known.get(c) if c is not None else None
        if session is not None and c is not None and c.state is not ConnState.CLOSING:
            if ev.event is E.DISCONNECTED:
                session.reason = session.reason or "disconnected by the initiator"
            elif ev.event in (E.REJECTED, E.UNREACHABLE, E.DEVICE_REMOVAL):
                session.reason = session.reason or f"connection lost ({ev.event.name})"
        assert self._handler is not None
        self._handler(ev)
        self.sync()
        dev = ev.id.device
        if dev is not None:
            dev.lock.notify_all()  # wake the main thread waiting for the connections to go

    def _watch(self, c: IserConn) -> _Session:
        self._count += 1
        address = f"{c.cm_id.dst_addr}:{c.cm_id.dst_port}"
        session = self._known[c] = _Session(self._count, address)
        return session

    def _observe(self, c: IserConn, ev: object) -> None:
        """The target's observer: one connection's iSCSI events."""
        session = self._known.get(c) or self._watch(c)
        if isinstance(ev, LoginCompleted):
            session.who = (
                f"initiator {ev.initiator_name} ISID 0x{ev.isid:012x} from {session.address}"
            )
            session.live = True
            kind = "" if ev.session_type == "Normal" else f", {ev.session_type} session"
            self.line(f"login: {session.who} (connection {session.number}{kind})")
        elif isinstance(ev, LoginFailed):
            session.rejected = True
            self.line(f"login rejected: {_login_who(c, session.address)}: {ev.reason}")
        elif isinstance(ev, LogoutRequested):
            session.reason = session.reason or "logged out by the initiator"
        elif isinstance(ev, ConnectionClosed | ConnectionDropped):
            session.reason = session.reason or ev.why

    def sync(self, reason: str | None = None) -> None:
        """Watch the new connections, log those that are gone (call holding
        the device's lock)."""
        current = set(self.target.conns)
        for c in self.target.conns:
            session = self._known.get(c) or self._watch(c)
            if reason is not None and session.reason is None:
                session.reason = reason
        for c, session in list(self._known.items()):
            if c in current and c.state is not ConnState.RELEASED:
                continue
            del self._known[c]
            if session.live:
                why = session.reason or reason or "closed by the target"
                self.line(f"logout: {session.who} (connection {session.number}): {why}")

    def detach(self) -> None:
        self.target.channel.handler = self._handler
        self.target.observer = None


class _WarningLog(logging.Handler):
    """Prints what ``softrdma.isert`` warns about."""

    def __init__(self, lines: LogLines) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a bad record must not stop the target
            return
        self.lines.line(f"isert: {text}")


def run_target(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``softrdma iser target``: serve until SIGINT or SIGTERM; 0, or 1 after
    a one-line error."""
    prog = "softrdma iser target"
    return run_image_target(args, err, prog, lambda b: _serve_image(args, b, out, err, prog))


def _serve_image(
    args: argparse.Namespace, backstore: FileBackstore, out: TextIO, err: TextIO, prog: str
) -> int:
    def make(opened: OpenDevice, scsi: ScsiTarget) -> IserTarget:
        dev = opened.device
        iqn: str = args.iqn or default_iqn(dev.node_guid)
        return IserTarget(dev.host, scsi, targets=(iqn,), addr=args.ip, port=args.port)

    started = start_image_target(
        args, backstore, err, prog, VERSION_ISCSI, make, errors=(IscsiUsageError,)
    )
    if started is None:
        return 1
    opened, target = started
    try:
        (iqn,) = target.portal.targets
        return _serve(target, iqn, opened, backstore, out)
    finally:
        opened.close()


def _serve(
    target: IserTarget, iqn: str, opened: OpenDevice, backstore: FileBackstore, out: TextIO
) -> int:
    dev = opened.device
    isert = logging.getLogger("softrdma.isert")
    old_propagate = isert.propagate
    log = _SessionLog(target, out)
    warnings = _WarningLog(log.lines)
    isert.addHandler(warnings)
    isert.propagate = False

    try:
        return serve_until_stopped(
            opened,
            backstore,
            log,
            listening=f"listening on {dev.name} {dev.ip}:{target.port} (RDMA CM, iSER)",
            banner=[f"iqn: {iqn}", *iscsiadm_lines(iqn, str(dev.ip), target.port)],
            live=lambda: sum(1 for s in log._known.values() if s.live),
            target=target,
        )
    finally:
        log.detach()
        isert.removeHandler(warnings)
        isert.propagate = old_propagate


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
        "serve a disk image to iSER initiators (Linux ib_iser among them), like LIO's ib_isert",
    ),
}
