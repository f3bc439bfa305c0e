"""What the target tools share (``softrdma srp target``, ``softrdma iser
target``): one-line argument errors, the parsers of sizes, identifiers,
ports and addresses, the disk image (opened or created), the device on the
UDP network, the timestamped log lines, and SIGINT / SIGTERM as a stop
request."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address
from types import FrameType
from typing import Any, NoReturn, Protocol, TextIO, TypeVar

from softrdma.cli.netdev import DEVICES, OpenDevice, add_device_options, open_device
from softrdma.errors import SoftRdmaError
from softrdma.fabric.udp import UdpLink
from softrdma.ulp.cm_target import CmTargetPort
from softrdma.ulp.scsi import BLOCK_SIZES, FileBackstore, ScsiTarget, ScsiUsageError

__all__ = [
    "LOGOUT_GRACE",
    "SYNC_INTERVAL",
    "Failed",
    "LogLines",
    "OneLineParser",
    "StopSignals",
    "add_image_target_options",
    "describe_image",
    "message",
    "one_line_errors",
    "open_image",
    "open_target_device",
    "parse_guid",
    "parse_ip",
    "parse_port",
    "parse_size",
    "run_image_target",
    "serve_until_stopped",
    "start_image_target",
    "stop_signals",
    "timestamp",
]

LOGOUT_GRACE = 5.0
"""Seconds a stopping target waits for its initiators' DREPs before it
releases what is left."""
SYNC_INTERVAL = 0.5
"""How often the serving loop looks for sessions that ended outside an RDMA
CM event (every ending it can see is logged at the event)."""

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class OneLineParser(argparse.ArgumentParser):
    """A subcommand's parser: a bad argument is one line on stderr
    (``softrdma srp target: ...``) and exit status 1, as every other error
    of the tools; arguments nobody takes are bad arguments too."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: {message}\n")

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` report its own errors (a missing or unknown
    subcommand) as :class:`OneLineParser` does."""

    def error(message: str) -> NoReturn:
        parser.exit(1, f"{parser.prog}: {message}\n")

    parser.error = error  # type: ignore[method-assign]


def parse_size(text: str) -> int:
    """A size in bytes: a number with an optional binary unit (``64M``,
    ``64MiB``, ``512k``, ``1G``, ``4096``)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"invalid size: {text!r} (e.g. 64M, 1G, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_guid(text: str) -> int:
    """A 64-bit identifier in hex (``505400fffe770001``, ``0x...``, or
    colon-separated groups)."""
    digits = text.strip().removeprefix("0x").removeprefix("0X").replace(":", "")
    if not re.fullmatch(r"[0-9a-fA-F]{1,16}", digits):
        raise argparse.ArgumentTypeError(f"invalid 64-bit hex identifier: {text!r}")
    return int(digits, 16)


def parse_port(text: str) -> int:
    """A TCP-style port number, 1..65535."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r} (1..65535)")
    return int(text)


def parse_ip(text: str) -> IPv4Address:
    """One unicast IPv4 address (a target serves on one address of its host)."""
    try:
        ip = IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid IPv4 address: {text!r}") from None
    if ip.is_unspecified or ip.is_multicast or ip == IPv4Address("255.255.255.255"):
        raise argparse.ArgumentTypeError(f"{ip}: a target needs one address of this host")
    return ip


def add_image_target_options(p: argparse.ArgumentParser) -> None:
    """``IMAGE``, the device options (``--ip`` required), ``--block-size``,
    ``--create-size``, ``--read-only`` and ``--pcap``: what every target
    serving a disk image takes (the caller adds ``--port`` and its own)."""
    p.add_argument("image", metavar="IMAGE", help="the disk image to serve as LUN 0 (a file)")
    add_device_options(p)
    for action in p._actions:  # a target has no peer to route to: --ip is required
        if action.dest == "ip":
            action.required = True
            action.type = parse_ip
            action.help = "local IPv4 address to serve on (the RoCE device's address)"
    p.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=512,
        help="logical block size in bytes (default 512)",
    )
    p.add_argument(
        "--create-size",
        type=parse_size,
        metavar="SIZE",
        help="create IMAGE (sparse) with SIZE bytes if it does not exist (64M, 1G, ...); "
        "an existing IMAGE must have that size",
    )
    p.add_argument("--read-only", action="store_true", help="serve the image write-protected")
    p.add_argument("--pcap", metavar="FILE", help="write every frame sent and received")


class Failed(Exception):
    """A one-line error of a tool."""


def timestamp() -> str:
    """The local time, to the millisecond, as the log lines start."""
    now = time.time()
    return (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
    )


def message(e: BaseException) -> str:
    """An exception as one line: an OSError's text without ``[Errno N]``."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    filename = e.filename if isinstance(e, OSError) else None
    text = f"{filename}: {text}" if filename else text
    return " ".join(str(text).split())


def open_image(args: argparse.Namespace) -> FileBackstore:
    """The backstore of ``args.image``: as it is, or created sparse with
    ``--create-size``. Raises :class:`Failed`, ``ScsiUsageError`` or
    ``OSError``."""
    path: str = args.image
    size: int | None = args.create_size
    bs: int = args.block_size
    if size is not None and size % bs:
        raise Failed(f"--create-size {size}: not a multiple of the {bs}-byte block size")
    if not os.path.exists(path):
        if size is None:
            raise Failed(f"{path}: no such image (--create-size SIZE makes one)")
        if args.read_only:
            raise Failed(f"{path}: no such image (a --read-only target does not create one)")
        FileBackstore(path, bs, size=size, create=True).close()
    if os.path.isdir(path):
        raise Failed(f"{path}: is a directory, not an image")
    backstore = FileBackstore(path, bs, read_only=args.read_only)
    length = os.stat(path).st_size
    if size is not None and os.path.isfile(path) and length != size:
        backstore.close()
        raise Failed(f"{path}: exists with {length} bytes, not the --create-size {size}")
    return backstore


def describe_image(backstore: FileBackstore) -> str:
    """``serving IMAGE as LUN 0: N blocks of B bytes (S MiB, read-write)``."""
    mode = "read-only" if backstore.read_only else "read-write"
    size = backstore.size
    human = f"{size >> 20} MiB" if size % (1 << 20) == 0 else f"{size} bytes"
    return (
        f"serving {backstore.path} as LUN 0: {backstore.num_blocks} blocks of "
        f"{backstore.block_size} bytes ({human}, {mode})"
    )


def open_target_device(args: argparse.Namespace) -> OpenDevice:
    """The device ``--ib-dev`` on ``--ip``, capturing to ``--pcap``. Raises
    :class:`Failed` with the one-line reason."""
    ip: IPv4Address = args.ip
    if args.ib_dev not in DEVICES:
        raise Failed(f"no device {args.ib_dev!r} (one of {', '.join(DEVICES)})")
    try:
        opened = open_device(args, ip)
    except (SoftRdmaError, OSError, ValueError) as e:
        raise Failed(message(e)) from None
    try:
        dev = opened.device
        if args.pcap and isinstance(dev.link, UdpLink):
            dev.link.capture(args.pcap)
    except (SoftRdmaError, OSError) as e:
        opened.close()
        raise Failed(message(e)) from None
    return opened


class LogLines:
    """Timestamped lines on ``out``, one writer at a time (``lock``)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            self.out.write(f"{timestamp()} {text}\n")
            self.out.flush()

    def raw(self, text: str) -> None:
        """A line without a timestamp (what an initiator's admin copies)."""
        with self.lock:
            self.out.write(f"{text}\n")
            self.out.flush()


class StopSignals:
    """SIGINT and SIGTERM caught: :attr:`stop` is set, :attr:`name` the
    first signal's name."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.caught: list[int] = []

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.caught.append(signum)
        self.stop.set()

    @property
    def name(self) -> str:
        return signal.Signals(self.caught[0]).name if self.caught else "stopped"


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """SIGINT and SIGTERM as a stop request while inside; the previous
    handlers back on leaving."""
    s = StopSignals()
    handlers = {n: signal.signal(n, s._note) for n in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield s
    finally:
        for signum, h in handlers.items():
            signal.signal(signum, h)


def run_image_target(
    args: argparse.Namespace,
    err: TextIO,
    prog: str,
    serve_image: Callable[[FileBackstore], int],
) -> int:
    """Open the image of ``args`` and ``serve_image`` it; 0, or 1 after a
    one-line error. The image is closed afterwards."""
    try:
        backstore = open_image(args)
    except Failed as e:
        err.write(f"{prog}: {e}\n")
        return 1
    except (ScsiUsageError, OSError) as e:
        err.write(f"{prog}: {message(e)}\n")
        return 1
    try:
        return serve_image(backstore)
    finally:
        backstore.close()


T = TypeVar("T", bound="CmTargetPort[Any]")


def start_image_target(
    args: argparse.Namespace,
    backstore: FileBackstore,
    err: TextIO,
    prog: str,
    transport_version: int,
    make: Callable[[OpenDevice, ScsiTarget], T],
    errors: tuple[type[Exception], ...] = (),
) -> tuple[OpenDevice, T] | None:
    """Open the device of ``args``, put ``backstore`` as LUN 0 of a SCSI
    target core (``transport_version``: the VPD page 0x83 / INQUIRY
    version descriptor), and ``make`` the target on them under the device's
    lock. None after a one-line error (``errors``: further exception types
    that are one); the device is closed then."""
    try:
        opened = open_target_device(args)
    except Failed as e:
        err.write(f"{prog}: {e}\n")
        return None
    one_line: tuple[type[Exception], ...] = (SoftRdmaError, OSError, *errors)
    try:
        scsi = ScsiTarget(transport_version=transport_version)
        scsi.add_lun(0, backstore)
        with opened.device.lock:
            return opened, make(opened, scsi)
    except one_line as e:
        err.write(f"{prog}: {message(e)}\n")
        opened.close()
        return None


class SessionLog(Protocol):
    """What :func:`serve_until_stopped` asks of a target tool's log."""

    @property
    def lines(self) -> LogLines:
        """Where the banner goes."""
        ...

    def line(self, text: str) -> None:
        """One timestamped line."""
        ...

    def sync(self, reason: str | None = None) -> None:
        """Log the sessions that began or ended (``reason``: why the ones
        ending now end), holding the device's lock."""
        ...


def serve_until_stopped(
    opened: OpenDevice,
    backstore: FileBackstore,
    log: SessionLog,
    *,
    listening: str,
    banner: Sequence[str],
    live: Callable[[], int],
    target: CmTargetPort[Any],
) -> int:
    """A target tool's life after start-up: the image and ``listening``
    lines, the ``banner`` (untimestamped), sessions logged until SIGINT or
    SIGTERM; then the target disconnects everyone (a DREQ each; ``live()``
    initiators are named in the stopping line), up to :data:`LOGOUT_GRACE`
    seconds until it is idle, it is closed, the device closed and the image
    flushed. Returns 0."""
    dev = opened.device
    with stop_signals() as signals:
        log.line(describe_image(backstore))
        log.line(listening)
        for text in banner:
            log.lines.raw(text)
        while not signals.stop.wait(SYNC_INTERVAL):
            with dev.lock:
                log.sync()
        with dev.lock:
            log.sync()
            n = live()
            log.line(f"stopping ({signals.name}): logging out {n} initiator{'s' * (n != 1)}")
            log.sync("target stopping")
            target.disconnect_all()
            log.sync()
        dev.wait(lambda: target.idle, LOGOUT_GRACE)
        with dev.lock:
            log.sync()
            target.close()
            log.sync("target stopping (no DREP from the initiator)")
        opened.close()  # the CM's last messages leave before the device goes
        backstore.flush()
        log.line("stopped")
        return 0
