"""``softrdma srp initiator``: log in to an SRP target over the RDMA CM, as
Linux's ``ib_srp`` does when a line is written to its ``add_target`` file,
and do block I/O on LUN 0 — a small ``sg_dd`` / ``fio --verify`` for SRP.

::

    softrdma srp initiator --target ADDR[:PORT] [--ip LOCAL] [--id-ext HEX]
        [--ioc-guid HEX] [--initiator-ext HEX] [-d DEV] [...] OPERATION ...

    OPERATION:  info
                write  --offset O --length L [--seed S]
                verify --offset O --length L [--seed S]
                read   --offset O --length L            (raw bytes to stdout)

The options before the operation may also follow it. ``--target`` is the
target's RDMA CM address and port (5555, ``ib_srpt``'s, when left out).
The device options (``-d``, ``--ip``, ``--udp-port``) are every softrdma
tool's (:mod:`softrdma.cli.netdev`).

**The target port ID.** A login names the target port by ``id_ext`` and
``ioc_guid`` (``add_target``'s options of the same names), and a target
rejects any other. ``ib_srpt`` — and ``softrdma srp target`` — set both to
the node GUID of the target's RDMA device by default, and an RoCE
device's node GUID is the EUI-64 of its network interface's MAC address.
So when ``--id-ext`` or ``--ioc-guid`` is not given and ADDR is an address
of *this* host (a loopback address included), it is computed from that
interface's MAC, or for an interface without one (``lo``) from the MAC
softrdma derives from the address (``02:00:a:b:c:d``, what a softrdma
target on it uses). For a target on another host it cannot be known here:
give both options from the target's ``add_target`` line.

**The initiator port ID** is ``--initiator-ext`` (default 0) followed by
the interface ID of the device's GID, as ``ib_srp`` builds it; a rejected
login prints it, so it can be added to the target's ACL.

**The data.** ``write`` fills the range with a pattern that depends only on
the seed and the absolute byte offset (:func:`pattern`: each 4 KiB-aligned
chunk of the disk is SHAKE-128 of the seed and the chunk's index), so
``verify`` can check any sub-range of what was written. Offsets and
lengths take units (``4k``, ``1M``) and need not be multiples of the block
size: ``read`` and ``verify`` read the blocks that cover the range;
``write`` reads the partial blocks at its edges first and writes them back
with only the range's bytes changed (read-modify-write, as the block layer
does for a partial-block write; not atomic against another initiator
writing the same blocks). A write ends with SYNCHRONIZE CACHE. Transfers
are split into commands of at most :attr:`SrpInitiator.max_transfer_blocks`
and up to the queue depth of them are kept in flight.

**Output and exit status.** ``info`` prints ``key: value`` lines;
``write`` and ``verify`` print one ``dd``-like line (bytes, seconds, MB/s);
``read`` prints only the data. Exit status 0 on success; 1 after a
one-line error on stderr: bad arguments, a device that cannot be opened,
a rejected login (with both port IDs), a target that does not answer the
login within ``--timeout`` seconds, an I/O error, or, for ``verify``, the
first byte offset that does not match. A target that goes away fails the
I/O: a lost channel (a DREQ, an SRP_T_LOGOUT, a QP error) at once — the
tool does not wait for the target to come back (no ``reconnect_delay``,
``fast_io_fail_tmo`` 0) — and a silent one after ``--timeout`` and the
error handler's ABORT TASK and LUN RESET. SIGINT or SIGTERM stops issuing
I/O, lets what is in flight finish, logs out and exits with 128 + the
signal number.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from types import FrameType
from typing import Any, BinaryIO, TextIO

from softrdma.cli.netdev import DEVICES, OpenDevice, add_device_options, local_address, open_device
from softrdma.cli.srp import parse_guid, parse_size
from softrdma.cm.messages import CmRejReason
from softrdma.errors import SoftRdmaError
from softrdma.fabric.link import mac_for_ip
from softrdma.fabric.netif import interface_for
from softrdma.fabric.udp import UdpLink
from softrdma.ulp.scsi import AdditionalSense, SenseKey
from softrdma.ulp.srp.initiator import (
    SRP_DEFAULT_QUEUE_SIZE,
    SRP_RDMA_CM_PORT,
    SRP_RSP_SQ_SIZE,
    SRP_TSK_MGMT_SQ_SIZE,
    BlockIo,
    ScsiCheckCondition,
    SrpConnectError,
    SrpInitiator,
    SrpInitiatorError,
    SrpLoginRejected,
)
from softrdma.ulp.srp.proto import SrpLoginRejReason
from softrdma.verbs.device import node_guid_from_mac

__all__ = [
    "LOGOUT_GRACE",
    "PATTERN_CHUNK",
    "IoInterrupted",
    "IoMismatch",
    "build_initiator_parser",
    "default_target_guid",
    "first_mismatch",
    "pattern",
    "run_initiator",
    "stream_blocks",
]

PROG = "softrdma srp initiator"
PATTERN_CHUNK = 4096
"""The pattern is made of chunks of this many bytes, aligned on the disk."""
_PATTERN_TAG = b"softrdma-srp-pattern"
LOGOUT_GRACE = 5.0
"""Seconds the tool waits for the target to take its logout (SRP_I_LOGOUT's
SEND, the CM's DREP) before it lets the channel go anyway."""
WAIT_SLICE = 0.25
"""How long one wait for a command sleeps before the tool looks at its
signals again."""
DEFAULT_TIMEOUT = 15.0
_Handler = Callable[[int, FrameType | None], Any] | int | None
_REJECT_HINTS: dict[int, str] = {
    SrpLoginRejReason.UNABLE_ASSOCIATE_CHANNEL: "wrong --id-ext / --ioc-guid?",
    SrpLoginRejReason.CHANNEL_LIMIT_REACHED: "is the initiator port ID in the target's ACL?",
}


# -- the pattern ---------------------------------------------------------------------------


def pattern(seed: int, offset: int, length: int) -> bytes:
    """The test pattern of ``seed`` at bytes ``[offset, offset + length)`` of
    the disk. Chunk ``k`` (bytes ``4096 k`` to ``4096 k + 4095``) is the
    first 4096 bytes of SHAKE-128 over ``b"softrdma-srp-pattern"``, the seed
    as 8 bytes little-endian and ``k`` as 8 bytes little-endian — so any
    byte can be computed from its absolute offset alone (as ``fio``'s
    verify headers let a sub-range be checked)."""
    if length <= 0:
        return b""
    first = offset // PATTERN_CHUNK
    last = (offset + length + PATTERN_CHUNK - 1) // PATTERN_CHUNK
    base = hashlib.shake_128(_PATTERN_TAG + (seed & (1 << 64) - 1).to_bytes(8, "little"))
    chunks = []
    for k in range(first, last):  # one hash per 4 KiB chunk, no per-byte work
        h = base.copy()
        h.update(k.to_bytes(8, "little"))
        chunks.append(h.digest(PATTERN_CHUNK))
    start = offset - first * PATTERN_CHUNK
    data = b"".join(chunks)
    return data[start : start + length] if start or len(data) != length else data


def first_mismatch(
    data: bytes | bytearray | memoryview, expected: bytes | bytearray | memoryview
) -> int | None:
    """The index of the first byte where ``data`` and ``expected`` differ
    (the shorter one's length when one is a prefix of the other), or None."""
    a, b = memoryview(data).cast("B"), memoryview(expected).cast("B")
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return None if len(a) == len(b) else n
    step = PATTERN_CHUNK
    for pos in range(0, n, step):  # find the chunk, then the byte by XOR
        x, y = a[pos : pos + step], b[pos : pos + step]
        if x != y:
            diff = int.from_bytes(x, "big") ^ int.from_bytes(y, "big")
            return pos + (len(x) * 8 - diff.bit_length()) // 8
    raise AssertionError("unreachable: the slices differ")  # pragma: no cover


# -- block I/O with commands in flight ---------------------------------------------------


class IoInterrupted(Exception):
    """:func:`stream_blocks` stopped early because ``stop()`` turned true."""


class IoMismatch(Exception):
    """What was read is not the pattern: ``offset`` is the first byte (of
    the disk) that differs."""

    def __init__(self, offset: int, got: int, want: int) -> None:
        super().__init__(f"mismatch at offset {offset}: read {got:#04x}, expected {want:#04x}")
        self.offset = offset
        self.got = got
        self.want = want


def stream_blocks(
    ini: SrpInitiator,
    lba: int,
    nblocks: int,
    *,
    produce: Callable[[int, int], bytes] | None = None,
    consume: Callable[[int, bytes], None] | None = None,
    depth: int | None = None,
    stop: Callable[[], bool] = lambda: False,
    stall: float = 120.0,
) -> None:
    """Read (``consume(lba, data)``, in order) or write (``produce(lba, n)``
    gives the bytes of ``n`` blocks) ``nblocks`` blocks from ``lba``, in
    commands of at most :attr:`~SrpInitiator.max_transfer_blocks` with up to
    ``depth`` (the initiator's ``can_queue``) in flight — what the block
    layer does with a large request (``blk_rq_map_sg`` and the queue
    limits) and ``sg_dd``'s asynchronous mode. Raises the first command's
    error; a ``stop()`` that turns true stops new commands and raises
    ``IoInterrupted`` once those in flight are done. Whatever is raised,
    the commands in flight are waited for (their buffers belong to the
    device until then). ``stall`` bounds, in wall-clock seconds, the wait
    for any one command (the initiator's own timeouts end it sooner)."""
    if (produce is None) == (consume is None):
        raise ValueError("give one of produce (a write) or consume (a read)")
    step = ini.max_transfer_blocks
    depth = max(1, ini.can_queue if depth is None else depth)
    window: deque[tuple[int, BlockIo]] = deque()
    next_lba, end = lba, lba + nblocks
    try:
        while next_lba < end or window:
            while next_lba < end and len(window) < depth and not stop():
                n = min(step, end - next_lba)
                if produce is not None:
                    io = ini.submit_write(next_lba, produce(next_lba, n))
                else:
                    io = ini.submit_read(next_lba, n)
                window.append((next_lba, io))
                next_lba += n
            if not window:
                break
            first, io = window[0]
            _wait_io(ini, io, stall)
            window.popleft()
            data = io.result()
            if consume is not None:
                assert data is not None
                consume(first, data)
        if next_lba < end:
            raise IoInterrupted
    finally:
        if window:
            with contextlib.suppress(SrpInitiatorError):
                ini.wait_io([io for _, io in window], stall)


def _wait_io(ini: SrpInitiator, io: BlockIo, stall: float) -> None:
    """Wait for ``io``: on real time in short slices (signals are looked
    at between them), at most ``stall`` seconds; on simulated time until
    the simulation ends it."""
    if ini.dev.scheduler.simulated:
        # The simulation runs to the command's end (its timers included); a
        # False means nothing can happen any more.
        if not ini.wait_io(io, None):
            raise SrpInitiatorError(f"{io!r}: no progress is possible", errno.EIO)
        return
    give_up = time.monotonic() + stall
    while not io.done:
        if time.monotonic() > give_up:
            raise SrpInitiatorError(f"no answer to {io!r} in {stall:g} s", errno.ETIMEDOUT)
        ini.wait_io(io, WAIT_SLICE)


# -- the command line ----------------------------------------------------------------------


class _Failed(Exception):
    """A one-line error of the tool."""


def _parse_target(text: str) -> tuple[IPv4Address, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(SRP_RDMA_CM_PORT)
    try:
        ip = IPv4Address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid target {text!r} (an IPv4 address, optionally :PORT)"
        ) from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"invalid port in {text!r} (1..65535)")
    if ip.is_unspecified or ip.is_multicast or ip == IPv4Address("255.255.255.255"):
        raise argparse.ArgumentTypeError(f"{ip}: not an address a target can have")
    return ip, int(port)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text}: must be at least {low}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: outside 0.1..3600 seconds")
    return value


def _offset(text: str) -> int:
    return 0 if text.strip() == "0" else parse_size(text)


def _local_ip(text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid IPv4 address: {text!r}") from None


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed: {text!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"seed {text}: outside 0..2**64-1")
    return value


def _common_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options of the login, on the ``initiator`` parser and (with
    ``suppress``, so that they do not override it) on each operation's."""
    first = len(p._actions)
    p.add_argument(
        "--target",
        type=_parse_target,
        metavar="ADDR[:PORT]",
        help=f"the target's RDMA CM address and port (default port {SRP_RDMA_CM_PORT})",
    )
    add_device_options(p)
    p.add_argument(
        "--id-ext",
        type=parse_guid,
        metavar="HEX",
        help="target port ID extension (add_target's id_ext; default: the node GUID of the "
        "target's device, when ADDR is an address of this host)",
    )
    p.add_argument(
        "--ioc-guid",
        type=parse_guid,
        metavar="HEX",
        help="target I/O controller GUID (add_target's ioc_guid; default as --id-ext)",
    )
    p.add_argument(
        "--initiator-ext",
        type=parse_guid,
        metavar="HEX",
        help="the first half of the initiator port ID (add_target's initiator_ext; default 0)",
    )
    p.add_argument(
        "--queue-size",
        type=_at_least(3),
        metavar="N",
        help=f"add_target's queue_size: N - 2 commands in flight (default {SRP_DEFAULT_QUEUE_SIZE})",
    )
    p.add_argument(
        "--max-sect",
        type=_at_least(8),
        metavar="N",
        help="add_target's max_sect: 512-byte sectors per command at most (default 1024)",
    )
    p.add_argument(
        "--sg-tablesize",
        type=_at_least(1),
        metavar="N",
        help="add_target's sg_tablesize: pages per command at most (default 12)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help=f"login timeout and SCSI command timeout (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument("--pcap", metavar="FILE", help="write every frame sent and received")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="print the initiator's log on stderr"
    )
    for action in p._actions[first:]:
        if action.dest == "ip":
            action.type = _local_ip
        if suppress:
            action.default = argparse.SUPPRESS


_DEFAULTS = {
    "target": None,
    "id_ext": None,
    "ioc_guid": None,
    "initiator_ext": 0,
    "queue_size": SRP_DEFAULT_QUEUE_SIZE,
    "max_sect": 1024,
    "sg_tablesize": None,
    "timeout": DEFAULT_TIMEOUT,
    "pcap": None,
    "verbose": False,
}


def build_initiator_parser(p: argparse.ArgumentParser) -> None:
    """The options and operations of ``softrdma srp initiator``."""
    p.epilog = (
        "Without --id-ext / --ioc-guid, a target on this host is assumed to use its "
        "device's node GUID for both, as ib_srpt and softrdma srp target do."
    )
    _common_options(p, suppress=False)
    p.set_defaults(**_DEFAULTS)
    sub = p.add_subparsers(dest="srp_op", metavar="OPERATION", required=True, parser_class=type(p))
    ops = {
        "info": "capacity, block size, vendor, product and revision (INQUIRY, READ CAPACITY)",
        "write": "write the pattern of --seed to a byte range, then SYNCHRONIZE CACHE",
        "verify": "read a byte range back; exit 0 only if it is the pattern of --seed",
        "read": "read a byte range to stdout (raw bytes)",
    }
    for name, text in ops.items():
        op = sub.add_parser(name, help=text, description=text)
        if name != "info":
            op.add_argument(
                "--offset",
                type=_offset,
                default=0,
                metavar="O",
                help="first byte of the range (4k, 1M, ...; default 0)",
            )
            op.add_argument(
                "--length",
                type=parse_size,
                required=True,
                metavar="L",
                help="bytes in the range (4k, 1M, ...)",
            )
        if name in ("write", "verify"):
            op.add_argument(
                "--seed", type=_seed, default=0, metavar="S", help="pattern seed (default 0)"
            )
        _common_options(op, suppress=True)


def default_target_guid(ip: IPv4Address) -> int | None:
    """The node GUID an RDMA device on this host's address ``ip`` has —
    ``ib_srpt``'s and ``softrdma srp target``'s default for both halves of
    the target port ID — or None when ``ip`` is not an address of this
    host: the EUI-64 of the interface's MAC, or of the MAC softrdma derives
    from the address for an interface without one (loopback)."""
    itf = interface_for(ip)
    if itf is None:
        return None
    mac = itf.mac if any(itf.mac) else mac_for_ip(ip)
    return node_guid_from_mac(mac)


@dataclass
class _Plan:
    """What the command line asks for, checked."""

    dest: IPv4Address
    port: int
    local: IPv4Address
    id_ext: int
    ioc_guid: int


def _plan(args: argparse.Namespace) -> _Plan:
    if args.target is None:
        raise _Failed("the following arguments are required: --target")
    dest, port = args.target
    if args.ib_dev not in DEVICES:
        raise _Failed(f"no device {args.ib_dev!r} (one of {', '.join(DEVICES)})")
    id_ext, ioc_guid = args.id_ext, args.ioc_guid
    if id_ext is None or ioc_guid is None:
        guid = default_target_guid(dest)
        if guid is None:
            raise _Failed(
                f"{dest} is not an address of this host: give --id-ext and --ioc-guid "
                "(the target's add_target line shows them)"
            )
        id_ext = guid if id_ext is None else id_ext
        ioc_guid = guid if ioc_guid is None else ioc_guid
    try:
        local = local_address(args, str(dest))
    except (OSError, ValueError) as e:
        raise _Failed(f"no local address to reach {dest}: {_message(e)}") from None
    return _Plan(dest, port, local, id_ext, ioc_guid)


def _message(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return " ".join(str(text).split()) or type(e).__name__


# -- signals and the log ------------------------------------------------------------------


@dataclass
class _Signals:
    """SIGINT / SIGTERM: noted, so I/O stops at the next command boundary;
    while ``abrupt`` (the login) they raise :class:`KeyboardInterrupt`, so
    the login's own cleanup runs."""

    caught: list[int] = field(default_factory=list)
    abrupt: bool = False
    _saved: dict[signal.Signals, _Handler] = field(default_factory=dict)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.caught.append(signum)
        if self.abrupt:
            self.abrupt = False
            raise KeyboardInterrupt

    def stop(self) -> bool:
        return bool(self.caught)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers belong to the main thread
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._saved[signum] = signal.signal(signum, self)
        try:
            yield self
        finally:
            for signum, handler in self._saved.items():
                signal.signal(signum, handler)


@contextlib.contextmanager
def _log_to(err: TextIO, verbose: bool) -> Iterator[None]:
    """softrdma's log: on stderr (``logger: message``) with ``--verbose``, else
    silent — the tool's own lines say what went wrong."""
    logger = logging.getLogger("softrdma")
    handler: logging.Handler = logging.StreamHandler(err) if verbose else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.CRITICAL)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


# -- running -----------------------------------------------------------------------------


def run_initiator(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``softrdma srp initiator``: log in, run the operation, log out; 0, 1
    after a one-line error, or 128 + the signal number when interrupted."""
    for name, value in _DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    try:
        plan = _plan(args)
    except _Failed as e:
        err.write(f"{PROG}: {e}\n")
        return 1
    with _log_to(err, args.verbose), _Signals().installed() as signals:
        try:
            opened = open_device(args, plan.local)
        except (SoftRdmaError, OSError, ValueError) as e:
            err.write(f"{PROG}: {_message(e)}\n")
            return 1
        try:
            if args.pcap and isinstance(opened.device.link, UdpLink):
                opened.device.link.capture(args.pcap)
            status, message = _session(args, plan, opened, out, signals)
        finally:
            opened.close()
    if message:
        err.write(f"{PROG}: {message}\n")
    return status


def _session(
    args: argparse.Namespace,
    plan: _Plan,
    opened: OpenDevice,
    out: TextIO,
    signals: _Signals,
) -> tuple[int, str]:
    """Log in, run, log out: (exit status, one-line message or '')."""
    dev = opened.device
    where = f"{plan.dest}:{plan.port}"
    ini: SrpInitiator | None = None
    try:
        with dev.lock:
            ini = SrpInitiator(
                dev,
                str(plan.dest),
                plan.port,
                id_ext=plan.id_ext,
                ioc_guid=plan.ioc_guid,
                initiator_ext=args.initiator_ext,
                src=str(plan.local),
                can_queue=args.queue_size - SRP_RSP_SQ_SIZE - SRP_TSK_MGMT_SQ_SIZE,
                max_sectors=args.max_sect,
                sg_tablesize=args.sg_tablesize,
                cmd_timeout=args.timeout,
                # One run: no reconnecting to a target that went away, so
                # nothing to wait for; its I/O fails at once.
                reconnect_delay=None,
                fast_io_fail_tmo=0.0,
            )
        signals.abrupt = True
        try:
            ini.login(timeout=args.timeout)
        finally:
            signals.abrupt = False
        if signals.stop():
            raise IoInterrupted
        _OPERATIONS[args.srp_op](ini, args, out, signals)
        return 0, ""
    except (IoInterrupted, KeyboardInterrupt):
        signum = signals.caught[0] if signals.caught else int(signal.SIGINT)
        name = signal.Signals(signum).name
        return 128 + signum, f"interrupted by {name}"
    except SrpLoginRejected as e:
        assert ini is not None
        hint = _REJECT_HINTS.get(int(e.reason))
        return 1, (
            f"login to {where} rejected: {e} (initiator port ID 0x{ini.initiator_port_id.hex()}, "
            f"target port ID 0x{ini.target_port_id.hex()}){f'; {hint}' if hint else ''}"
        )
    except SrpConnectError as e:
        if e.errno == errno.ETIMEDOUT:
            return 1, f"cannot log in to {where}: no answer within {args.timeout:g} s"
        if e.cm_reason == CmRejReason.INVALID_SERVICE_ID:
            return 1, f"cannot log in to {where}: nothing listens on port {plan.port} (CM REJ)"
        try:
            why = f"CM REJ, reason {CmRejReason(e.cm_reason).name}" if e.cm_reason else ""
        except ValueError:
            why = ""
        return 1, f"cannot log in to {where}: {why or _message(e)}"
    except IoMismatch as e:
        return 1, str(e)
    except _Failed as e:
        return 1, str(e)
    except BrokenPipeError:
        # stdout's reader left (``| head``): quiet, as cat is; no flush at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1, ""
    except ScsiCheckCondition as e:
        return 1, f"{args.srp_op}: {_sense(e)}"
    except (SrpInitiatorError, SoftRdmaError, OSError) as e:
        return 1, f"{args.srp_op}: {_message(e)}"
    finally:
        if ini is not None:
            _close(ini)


def _sense(e: ScsiCheckCondition) -> str:
    """CHECK CONDITION with the names of its sense key and additional sense."""
    try:
        key = SenseKey(e.sense_key).name
    except ValueError:
        key = f"sense key {e.sense_key:#x}"
    try:
        asc = AdditionalSense((e.asc, e.ascq)).name
    except ValueError:
        asc = "ASC/ASCQ"
    return f"CHECK CONDITION, {key}, {asc} ({e.asc:#04x}/{e.ascq:#04x})"


def _close(ini: SrpInitiator) -> None:
    """Log out within :data:`LOGOUT_GRACE` (SRP_I_LOGOUT, a DREQ), then
    free everything (``srp_remove_target``)."""
    with contextlib.suppress(SrpInitiatorError, SoftRdmaError):
        ini.logout(timeout=LOGOUT_GRACE)
    with contextlib.suppress(SrpInitiatorError, SoftRdmaError):
        ini.close()


# -- the operations ------------------------------------------------------------------------


def _op_info(ini: SrpInitiator, args: argparse.Namespace, out: TextIO, sig: _Signals) -> None:
    """INQUIRY and READ CAPACITY, as ``sd`` probes a disk."""
    inq = ini.inquiry()
    blocks, size = ini.read_capacity()
    total = blocks * size
    human = f"{total >> 20} MiB" if total % (1 << 20) == 0 else f"{total / (1 << 20):.1f} MiB"
    rows = [
        ("target", f"{ini.dest}:{ini.port}"),
        ("target port ID", f"0x{ini.target_port_id.hex()}"),
        ("initiator port ID", f"0x{ini.initiator_port_id.hex()}"),
        ("vendor", inq.vendor),
        ("product", inq.product),
        ("revision", inq.revision),
        ("block size", f"{size} bytes"),
        ("capacity", f"{blocks} blocks, {total} bytes ({human})"),
        ("max transfer", f"{ini.max_transfer_blocks} blocks per command"),
        ("queue depth", f"{ini.can_queue} commands"),
    ]
    width = max(len(k) for k, _ in rows) + 1
    for key, value in rows:
        out.write(f"{key + ':':<{width}} {value}\n")
    out.flush()


def _range(ini: SrpInitiator, args: argparse.Namespace) -> tuple[int, int, int, int]:
    """The byte range and the blocks covering it: (offset, end, first
    block, blocks); one line when it does not fit the disk."""
    blocks, size = ini.read_capacity()
    offset, length = args.offset, args.length
    end = offset + length
    if end > blocks * size:
        raise _Failed(
            f"{args.srp_op}: bytes {offset}..{end - 1} are beyond the end of the disk "
            f"({blocks * size} bytes)"
        )
    first = offset // size
    return offset, end, first, (end + size - 1) // size - first


def _report(out: TextIO, what: str, length: int, offset: int, seconds: float) -> None:
    """A ``dd``-like summary line."""
    seconds = max(seconds, 1e-9)
    out.write(
        f"{length} bytes ({length / 1e6:.1f} MB, {length / (1 << 20):.1f} MiB) {what} at offset "
        f"{offset}, {seconds:.3f} s, {length / seconds / 1e6:.1f} MB/s\n"
    )
    out.flush()


def _op_write(ini: SrpInitiator, args: argparse.Namespace, out: TextIO, sig: _Signals) -> None:
    """The pattern over the range; partial blocks at the edges read first
    and merged (read-modify-write); then SYNCHRONIZE CACHE."""
    start = time.monotonic()
    offset, end, first, nblocks = _range(ini, args)
    size = ini.block_size
    last = first + nblocks - 1
    edges: dict[int, bytes] = {}
    for lba, partial in ((first, offset % size), (last, end % size)):
        if partial and lba not in edges:
            stream_blocks(ini, lba, 1, consume=edges.__setitem__, stop=sig.stop)

    def produce(lba: int, n: int) -> bytes:
        lo = lba * size
        data = pattern(args.seed, lo, n * size)
        head = first in edges and lba == first
        tail = last in edges and lba + n - 1 == last
        if head or tail:
            buf = bytearray(data)
            if head:
                buf[: offset - lo] = edges[first][: offset - lo]
            if tail:
                keep = end - last * size  # bytes of the last block inside the range
                at = last * size - lo
                buf[at + keep : at + size] = edges[last][keep:]
            data = bytes(buf)
        return data

    stream_blocks(ini, first, nblocks, produce=produce, stop=sig.stop)
    ini.sync()
    _report(out, "written", end - offset, offset, time.monotonic() - start)


def _read_range(
    ini: SrpInitiator,
    args: argparse.Namespace,
    sig: _Signals,
    take: Callable[[int, memoryview], None],
) -> tuple[int, int]:
    """Read the blocks covering the range; ``take(offset, bytes)`` gets the
    range's part of each command's data, in order."""
    offset, end, first, nblocks = _range(ini, args)
    size = ini.block_size

    def consume(lba: int, data: bytes) -> None:
        lo = lba * size
        a, b = max(offset, lo), min(end, lo + len(data))
        take(a, memoryview(data)[a - lo : b - lo])

    stream_blocks(ini, first, nblocks, consume=consume, stop=sig.stop)
    return offset, end


def _op_verify(ini: SrpInitiator, args: argparse.Namespace, out: TextIO, sig: _Signals) -> None:
    """Read back and compare with the pattern; the first mismatch raises."""
    start = time.monotonic()

    def check(at: int, data: memoryview) -> None:
        want = pattern(args.seed, at, len(data))
        bad = first_mismatch(data, want)
        if bad is not None:
            raise IoMismatch(at + bad, data[bad], want[bad])

    offset, end = _read_range(ini, args, sig, check)
    _report(out, "verified", end - offset, offset, time.monotonic() - start)


def _op_read(ini: SrpInitiator, args: argparse.Namespace, out: TextIO, sig: _Signals) -> None:
    """The range's bytes to stdout, as they arrive."""
    sink: BinaryIO | None = getattr(out, "buffer", None)
    if sink is None:
        raise _Failed("read: stdout takes no bytes")
    out.flush()

    def write(at: int, data: memoryview) -> None:
        sink.write(data)

    _read_range(ini, args, sig, write)
    sink.flush()


_OPERATIONS: dict[str, Callable[[SrpInitiator, argparse.Namespace, TextIO, _Signals], None]] = {
    "info": _op_info,
    "write": _op_write,
    "verify": _op_verify,
    "read": _op_read,
}
