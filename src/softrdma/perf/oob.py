"""perftest's out-of-band exchange over TCP, sans I/O
(``perftest_communication.c``: ``exchange_versions``, ``check_sys_data``,
``check_mtu``, ``ctx_hand_shake`` / ``ethernet_write_keys`` /
``ethernet_read_keys``, ``ctx_check_gid_compatibility``,
``xchg_bw_reports``, ``ctx_close_connection``; the order of the calls in
each tool's ``main``).

Everything is lock-step: each message has a fixed size, the client writes
then reads, the server reads then writes. :class:`OobExchange` is fed the
bytes that arrived (:meth:`~OobExchange.receive_data`), gives the bytes to
send (:meth:`~OobExchange.data_to_send`) and returns events; it stops at
the points where the tool has work to do (connect the QPs, post receives,
run the test, produce its report) with a :class:`Checkpoint` and goes on
at :meth:`~OobExchange.resume`. Errors raise :class:`OobError` with
perftest's message.

The sequences (perftest 6.06, one entry per QP where marked):

* write_bw, read_bw, atomic_bw: version, page size, cache line, MTU,
  key lines per QP, *connect*, key lines per QP, key line, *test* (the
  client runs it; the server waits in the next read), key line, five
  report words, key line + ``"done"``.
* the same with ``--bidirectional``: ..., key lines per QP, *connect*, key
  lines per QP, key line, then for each size (one without ``-a``): key
  line, *test* (both sides run it), key line (``-a`` only), five report
  words; then key line + ``"done"``.
* over the RDMA CM (``-z``, ``-R``; :mod:`softrdma.perf.cm_comm` carries
  each message as one SEND): the same, but the key lines are perftest's
  binary ``struct pingpong_dest`` (56 bytes, fields big-endian) and there
  is no ``"done"``; with ``-R`` an empty key message is swapped before and
  after the test's QP is connected (``create_rdma_cm_connection``).
* send_bw: ..., key lines per QP, *connect*, key line, key lines per QP,
  *post receives*, key line, *test*, key line + ``"done"``; no reports
  (with ``--bidirectional``, both receive, and swap their five report
  words after the test).
  With ``-a``, *post receives*, key line, *test*, key line for each size.
* write_lat: ..., key line, key lines per QP, *connect*, key lines per QP,
  key line, *test*; then both close, without a last key line.
* read_lat: as write_lat, then key line + ``"done"`` (the server waits
  there while the client runs the test).
* send_lat: ..., key lines per QP, *connect*, key line, key lines per QP,
  *post receives*, key line, *test*, key line + ``"done"``; with ``-a``,
  *post receives*, key line, *test* for each size.
"""

from __future__ import annotations

import enum
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from softrdma.errors import SoftRdmaError
from softrdma.perf.params import TestKind, Tool, Verb

__all__ = [
    "DONE",
    "KEY_MSG_SIZE",
    "MIN_VERSION",
    "PERFTEST_VERSION",
    "PINGPONG_DEST_SIZE",
    "REPORT_WORDS",
    "VERSION_SIZE",
    "XCHG_ERROR",
    "BwReport",
    "Checkpoint",
    "Event",
    "Finished",
    "MtuAgreed",
    "OobError",
    "OobExchange",
    "PingpongDest",
    "RemoteDest",
    "ReportReceived",
    "Role",
    "SysData",
    "VersionReceived",
    "gid_is_v4mapped",
    "gid_text",
]

PERFTEST_VERSION = "6.06"
"""The version Debian bookworm's perftest sends (``VERSION``); 6.28 and
later switch to a parameter negotiation this exchange does not speak."""
MIN_VERSION = 5.70
VERSION_SIZE = 16  # MAX_VERSION
KEY_MSG_SIZE = 108  # KEY_MSG_SIZE_GID
DONE = b"done\0"
PINGPONG_DEST_SIZE = 56
"""``sizeof(struct pingpong_dest)`` on x86-64: the binary key message of
the RDMA CM exchange (``rdma_write_keys``)."""
_DEST_BIN = struct.Struct(">iiiiI4xQ16sIi")
REPORT_WORDS = 5
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_KEY_RE = re.compile(
    rb"([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+):"
    rb"([0-9a-fA-F]+):((?:[0-9a-fA-F]+:){16})([0-9a-fA-F]+)"
)
_ATOF_RE = re.compile(rb"\s*[-+]?(\d+\.?\d*|\.\d+)")

XCHG_ERROR = " Failed to exchange data between server and clients"


class OobError(SoftRdmaError):
    """The exchange failed: ``message`` is what perftest prints on stderr
    (possibly several lines), ``status`` its exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Role(enum.Enum):
    """perftest's ``MachineType``."""

    CLIENT = "client"
    SERVER = "server"


def gid_is_v4mapped(gid: bytes) -> bool:
    """``ipv6_addr_v4mapped``: ``::ffff:a.b.c.d``."""
    return gid[:10] == bytes(10) and gid[10:12] == b"\xff\xff"


@dataclass(frozen=True)
class PingpongDest:
    """``struct pingpong_dest`` as ``KEY_PRINT_FMT_GID`` carries it: LID,
    out_reads, QPN, PSN, RKEY, VADDR, GID and SRQN."""

    lid: int
    out_reads: int
    qpn: int
    psn: int
    rkey: int
    vaddr: int
    gid: bytes
    srqn: int = 0

    def pack(self) -> bytes:
        """The 108-byte key line (``ethernet_write_keys``)."""
        gid = "".join(f"{b:02x}:" for b in self.gid)
        text = (
            f"{self.lid:04x}:{self.out_reads:04x}:{self.qpn:06x}:{self.psn:06x}:"
            f"{self.rkey:08x}:{self.vaddr:016x}:{gid}{self.srqn:08x}:"
        )
        raw = text.encode("ascii")
        if len(raw) >= KEY_MSG_SIZE:
            raise ValueError(f"key line too long ({len(raw)} bytes): {text}")
        return raw.ljust(KEY_MSG_SIZE, b"\0")

    def pack_binary(self, gid_index: int = 0) -> bytes:
        """``rdma_write_keys``: the struct with each field big-endian (the
        padding before VADDR zeroed)."""
        return _DEST_BIN.pack(self.lid, self.out_reads, self.qpn, self.psn, self.rkey,
                              self.vaddr, self.gid, self.srqn, gid_index)  # fmt: skip

    @classmethod
    def unpack_binary(cls, msg: bytes) -> PingpongDest:
        """``rdma_read_keys`` (which takes neither the SRQ number nor the GID
        index from the peer)."""
        if len(msg) < PINGPONG_DEST_SIZE:
            raise OobError(f"Bad key message of {len(msg)} bytes\n{XCHG_ERROR}")
        lid, out_reads, qpn, psn, rkey, vaddr, gid, _srqn, _gix = _DEST_BIN.unpack_from(msg)
        return cls(lid & 0xFFFF, out_reads, qpn & 0xFFFFFF, psn & 0xFFFFFF, rkey, vaddr, gid)

    @classmethod
    def unpack(cls, msg: bytes) -> PingpongDest:
        """``sscanf(msg, KEY_PRINT_FMT_GID, ...)``; raises :class:`OobError`
        with perftest's "Couldn't parse line" when the fields are not there."""
        text = msg.split(b"\0", 1)[0]
        m = _KEY_RE.match(text)
        if m is None:
            shown = text.decode("ascii", "replace")
            raise OobError(f"Couldn't parse line <{shown}>\n{XCHG_ERROR}")
        lid, out_reads, qpn, psn, rkey, vaddr = (int(g, 16) for g in m.groups()[:6])
        gid = bytes(int(x, 16) & 0xFF for x in m.group(7).split(b":")[:16])
        return cls(lid, out_reads, qpn, psn, rkey, vaddr & (1 << 64) - 1, gid, int(m.group(8), 16))


@dataclass(frozen=True)
class BwReport:
    """``struct bw_report_data`` as ``xchg_bw_reports`` sends it: size and
    iterations as big-endian u64, peak and average bandwidth and the
    message rate as big-endian doubles (5 × 8 bytes, one exchange each)."""

    size: int
    iters: int
    bw_peak: float
    bw_avg: float
    msg_rate: float

    def words(self) -> list[bytes]:
        """The five 8-byte messages."""
        return [
            _U64.pack(self.size & (1 << 64) - 1),
            _U64.pack(self.iters & (1 << 64) - 1),
            _F64.pack(self.bw_peak),
            _F64.pack(self.bw_avg),
            _F64.pack(self.msg_rate),
        ]

    @classmethod
    def from_words(cls, words: list[bytes]) -> BwReport:
        """The report from its five messages (NaN and infinities, which a
        peer's uninitialised words may hold, are kept as they are)."""
        size, iters = (_U64.unpack(w)[0] for w in words[:2])
        peak, avg, rate = (_F64.unpack(w)[0] for w in words[2:])
        return cls(size, iters, peak, avg, rate)

    @property
    def sane(self) -> bool:
        """Finite, non-negative numbers (a bookworm server's own report is
        uninitialised memory)."""
        return all(math.isfinite(x) and x >= 0 for x in (self.bw_peak, self.bw_avg, self.msg_rate))


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionReceived:
    """The peer's version string, accepted (≥ 5.70)."""

    version: str


@dataclass(frozen=True)
class SysData:
    """The page size (``cycle_buffer``) and cache line size both sides now
    use: the larger of each."""

    cycle_buffer: int
    cache_line_size: int


@dataclass(frozen=True)
class MtuAgreed:
    """The ``enum ibv_mtu`` value both use (the smaller valid one)."""

    mtu: int


@dataclass(frozen=True)
class RemoteDest:
    """The peer's key line for QP ``index``; ``first`` on the exchange
    before the QPs are connected (later ones repeat it)."""

    index: int
    dest: PingpongDest
    first: bool


@dataclass(frozen=True)
class Checkpoint:
    """The exchange waits for the tool: ``"setup"`` (create the resources
    now that the sizes are agreed), ``"connect"`` (connect the QPs to
    the remote dests), ``"post_receives"``, ``"run"`` (run the test) or
    ``"report"`` (give the report to send). Go on with
    :meth:`OobExchange.resume`."""

    name: str


@dataclass(frozen=True)
class ReportReceived:
    """The peer's BW report."""

    report: BwReport


@dataclass(frozen=True)
class Finished:
    """The exchange is over; the tool closes the socket."""


Event = VersionReceived | SysData | MtuAgreed | RemoteDest | Checkpoint | ReportReceived | Finished


# --- the script -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Msg:
    kind: str  # version | page | cache | mtu | sync | key | report
    size: int
    index: int = 0  # QP for key lines, word for reports
    error: str = XCHG_ERROR


@dataclass(frozen=True)
class _Pause:
    name: str


@dataclass(frozen=True)
class _Done:
    """``ctx_close_connection``'s ``write("done")``: written, never read."""


_Step = _Msg | _Pause | _Done


def _script(
    tool: Tool,
    num_qps: int,
    rounds: int = 0,
    duplex: bool = False,
    rdma_cm: bool = False,
    cm_qp: bool = False,
) -> list[_Step]:
    """The steps of one tool's ``main``, for either side; ``rounds``: the
    number of sizes of an ``-a`` run of send_bw / send_lat, which sync
    before (and send_bw also after) each size (0: not ``-a``), or of a
    ``--bidirectional`` write_bw / read_bw / atomic_bw, whose sides sync
    before each size (and after it with ``-a``) and swap reports. Over the
    RDMA CM (``rdma_cm``) the key messages are binary and there is no
    ``"done"``; with the test's QP connected by the CM (``cm_qp``, ``-R``)
    an empty key message is swapped before and after that connection."""
    pre: list[_Step] = [
        _Msg("version", VERSION_SIZE),
        _Msg("page", 4, error=" Failed to exchange Page Size data between server and client"),
        _Msg(
            "cache", 4, error=" Failed to exchange Cache Line Size data between server and client"
        ),
        _Msg("mtu", 2),
        _Pause("setup"),
    ]

    key_size = PINGPONG_DEST_SIZE if rdma_cm else KEY_MSG_SIZE
    if cm_qp:
        # create_rdma_cm_connection: a handshake of the still empty key
        # line before the test's QP is connected through the CM, and one after
        pre[-1:] = [_Msg("sync", key_size), pre[-1], _Msg("sync", key_size)]

    def per_qp() -> list[_Step]:
        return [_Msg("key", key_size, i) for i in range(num_qps)]

    key0: _Step = _Msg("key", key_size, 0)
    close_key = _Msg("key", key_size, 0, "Failed to close connection between server and client")
    steps = _steps(tool, pre, per_qp, key0, close_key, rounds, duplex)
    if rdma_cm:  # ctx_close_connection writes "done" on the socket only
        steps = [step for step in steps if not isinstance(step, _Done)]
    return steps


def _steps(
    tool: Tool,
    pre: list[_Step],
    per_qp: Callable[[], list[_Step]],
    key0: _Step,
    close_key: _Step,
    rounds: int,
    duplex: bool,
) -> list[_Step]:
    connect, run = _Pause("connect"), _Pause("run")
    if tool.kind == TestKind.BW and tool.verb != Verb.SEND and duplex:
        each_size: list[_Step] = [key0, run]
        if rounds:
            each_size.append(key0)  # -a: a sync after each size too
        each_size += [_Pause("report"), *(_Msg("report", 8, i) for i in range(REPORT_WORDS))]
        per_size = [step for _ in range(max(rounds, 1)) for step in each_size]
        return [*pre, *per_qp(), connect, *per_qp(), key0, *per_size, close_key, _Done()]
    if tool.kind == TestKind.BW and tool.verb != Verb.SEND:
        reports: list[_Step] = [_Msg("report", 8, i) for i in range(REPORT_WORDS)]
        return [
            *pre, *per_qp(), connect, *per_qp(), key0, run, key0, _Pause("report"), *reports,
            close_key, _Done(),
        ]  # fmt: skip
    if tool.verb == Verb.SEND:
        each: list[_Step] = [_Pause("post_receives"), key0, run]
        if rounds and tool.kind == TestKind.BW:
            each.append(key0)  # send_bw -a: a sync after each size too
        if duplex and tool.kind == TestKind.BW:  # then both swap their reports
            each += [_Pause("report"), *(_Msg("report", 8, i) for i in range(REPORT_WORDS))]
        sizes = [step for _ in range(max(rounds, 1)) for step in each]
        return [*pre, *per_qp(), connect, key0, *per_qp(), *sizes, close_key, _Done()]
    steps: list[_Step] = [*pre, key0, *per_qp(), connect, *per_qp(), key0, run]
    if tool.verb != Verb.WRITE:  # read_lat
        steps += [close_key, _Done()]
    return steps


def _atof(raw: bytes) -> float:
    """C's ``atof``: the leading decimal number, 0.0 when there is none."""
    m = _ATOF_RE.match(raw.split(b"\0", 1)[0])
    return float(m.group(0)) if m else 0.0


class OobExchange:
    """One side of perftest's TCP exchange, sans I/O.

    ``dests`` are this side's key lines (one per QP); ``mtu`` is the
    ``enum ibv_mtu`` value of this side's port or ``-m``; ``rounds`` the
    number of sizes of a send_bw / send_lat ``-a`` run (or of a
    ``duplex`` one: ``--bidirectional``).
    """

    def __init__(
        self,
        tool: Tool,
        role: Role,
        dests: list[PingpongDest],
        *,
        mtu: int = 3,
        cycle_buffer: int = 4096,
        cache_line_size: int = 64,
        version: str = PERFTEST_VERSION,
        rounds: int = 0,
        duplex: bool = False,
        rdma_cm: bool = False,
        gid_index: int = 0,
        cm_qp: bool = False,
    ) -> None:
        if not dests:
            raise ValueError("one key line per QP is needed")
        self.tool = tool
        self.role = role
        self.dests = list(dests)
        self.mtu = mtu
        self.cycle_buffer = cycle_buffer
        self.cache_line_size = cache_line_size
        self.version = version
        self.remote_version = ""
        self.remote_dests: list[PingpongDest | None] = [None] * len(dests)
        self.remote_report: BwReport | None = None
        self.report: BwReport | None = None
        self.duplex = duplex
        self.rdma_cm = rdma_cm
        self.gid_index = gid_index
        self.cm_qp = cm_qp
        self._steps = _script(tool, len(dests), rounds, duplex, rdma_cm, cm_qp)
        self._msgs: list[bytes] = []
        self._pos = 0
        self._sent_current = False
        self._resumed = False
        self._inbuf = bytearray()
        self._out = bytearray()
        self._report_words: list[bytes] = []
        self._seen_keys: set[int] = set()
        self.finished = False
        self.waiting: str | None = None
        """The checkpoint the exchange waits at, if any."""

    # -- the I/O side's interface ------------------------------------------------------

    def start(self) -> list[Event]:
        """Begin: the client's first message is then in :meth:`data_to_send`."""
        return self._advance()

    def data_to_send(self) -> bytes:
        """Bytes to write now, each message as one write (drains)."""
        out = bytes(self._out)
        self._out.clear()
        self._msgs.clear()
        return out

    def messages_to_send(self) -> list[bytes]:
        """The same as :meth:`data_to_send`, one item a message (over the
        RDMA CM each is one SEND)."""
        msgs = list(self._msgs)
        self._out.clear()
        self._msgs.clear()
        return msgs

    def receive_message(self, msg: bytes) -> list[Event]:
        """One whole message (a RECV over the RDMA CM): longer than the
        exchange expects is cut (perftest copies what it needs), shorter
        fails; ``b""``: the connection failed."""
        step = self._current()
        if msg and isinstance(step, _Msg) and not self._inbuf:
            if len(msg) < step.size:
                self._fail(step)
            msg = msg[: step.size]
        return self.receive_data(msg)

    @property
    def pending_read(self) -> int:
        """How many bytes the exchange is waiting for (0: none)."""
        step = self._current()
        if isinstance(step, _Msg) and (self.role == Role.SERVER or self._sent_current):
            return step.size - len(self._inbuf)
        return 0

    @property
    def partial(self) -> bool:
        """Part of a message has arrived and the rest has not."""
        return bool(self._inbuf) and self.pending_read > 0

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes that arrived; ``b""`` means the peer closed. Raises
        :class:`OobError` when the exchange fails."""
        if self.finished:
            return []  # the peer's "done", which nobody reads
        if not data:
            step = self._current()
            if isinstance(step, _Msg):
                self._fail(step)
            return []
        self._inbuf += data
        return self._advance()

    def short_read(self) -> None:
        """The rest of a message did not come (perftest does one ``read``
        and needs all of it): fail as perftest does."""
        step = self._current()
        if isinstance(step, _Msg):
            self._fail(step)

    def resume(
        self, report: BwReport | None = None, dests: list[PingpongDest] | None = None
    ) -> list[Event]:
        """Go on after a :class:`Checkpoint`. At ``"setup"`` (the page size,
        cache line and MTU are agreed: the tool can size its buffer),
        ``dests`` replaces this side's key lines; at ``"report"``,
        ``report`` is this side's report (a server without one sends zeros)."""
        step = self._current()
        if not isinstance(step, _Pause) or self.waiting != step.name:
            raise RuntimeError(f"resume() outside a checkpoint (at {step!r})")
        if dests is not None:
            if step.name != "setup" or len(dests) != len(self.dests):
                raise ValueError("key lines can change at setup only, one per QP")
            self.dests = list(dests)
        if step.name == "report":
            self.report = report or BwReport(0, 0, 0.0, 0.0, 0.0)
        self.waiting = None
        self._resumed = True
        return self._advance()

    def set_rounds(self, rounds: int) -> None:
        """Change the number of ``-a`` sizes before the first of them (a UD
        run learns them from the agreed MTU)."""
        steps = _script(self.tool, len(self.dests), rounds, self.duplex, self.rdma_cm, self.cm_qp)
        if steps[: self._pos + 1] != self._steps[: self._pos + 1]:
            raise RuntimeError("the rounds can change only before they start")
        self._steps = steps

    # -- the machine --------------------------------------------------------------------

    def _current(self) -> _Step | None:
        return self._steps[self._pos] if self._pos < len(self._steps) else None

    def _payload(self, step: _Msg) -> bytes:
        if step.kind == "version":
            return self.version.encode("ascii").ljust(VERSION_SIZE, b"\0")[:VERSION_SIZE]
        if step.kind == "page":
            return _I32.pack(self.cycle_buffer)
        if step.kind == "cache":
            return _I32.pack(self.cache_line_size)
        if step.kind == "mtu":
            return f"{self.mtu}".encode("ascii").ljust(2, b"\0")[:2]
        if step.kind == "sync":  # my_dest before set_up_connection: all zero
            return bytes(step.size)
        if step.kind == "key":
            dest = self.dests[step.index]
            return dest.pack_binary(self.gid_index) if self.rdma_cm else dest.pack()
        assert step.kind == "report" and self.report is not None
        return self.report.words()[step.index]

    def _emit(self, payload: bytes) -> None:
        self._out += payload
        self._msgs.append(payload)

    def _fail(self, step: _Msg) -> None:
        if step.kind == "key":
            read = "ethernet_read_keys: Couldn't read remote address"
            raise OobError(f"{read}\n{step.error}")
        raise OobError(step.error)

    def _advance(self) -> list[Event]:
        events: list[Event] = []
        while (step := self._current()) is not None:
            if isinstance(step, _Pause):
                if not self._resumed:
                    if self.waiting is None:
                        self.waiting = step.name
                        events.append(Checkpoint(step.name))
                    return events
                self._resumed = False
                self._pos += 1
                continue
            if isinstance(step, _Done):
                self._emit(DONE)
                self._pos += 1
                continue
            if self.role == Role.CLIENT and not self._sent_current:
                self._emit(self._payload(step))
                self._sent_current = True
            if len(self._inbuf) < step.size:
                return events
            msg = bytes(self._inbuf[: step.size])
            del self._inbuf[: step.size]
            events += self._received(step, msg)
            if self.role == Role.SERVER:
                self._emit(self._payload(step))
            self._sent_current = False
            self._pos += 1
        if not self.finished:
            self.finished = True
            self._inbuf.clear()
            events.append(Finished())
        return events

    def _received(self, step: _Msg, msg: bytes) -> list[Event]:
        if step.kind == "version":
            # check_version_compatibility
            if _atof(msg) < MIN_VERSION:
                raise OobError(
                    "Current implementation is not compatible with versions older than 5.70"
                )
            self.remote_version = msg.split(b"\0", 1)[0].decode("ascii", "replace")
            return [VersionReceived(self.remote_version)]
        if step.kind == "page":
            self.cycle_buffer = max(self.cycle_buffer, _I32.unpack(msg)[0])
            return []
        if step.kind == "cache":
            self.cache_line_size = max(self.cache_line_size, _I32.unpack(msg)[0])
            return [SysData(self.cycle_buffer, self.cache_line_size)]
        if step.kind == "mtu":
            try:
                rem = int(msg.split(b"\0", 1)[0] or b"0", 10)
            except ValueError:
                rem = 0
            if 1 <= rem <= 5 and rem < self.mtu:  # valid_mtu_size, the smaller wins
                self.mtu = rem
            return [MtuAgreed(self.mtu)]
        if step.kind == "sync":
            return []  # nothing in it
        if step.kind == "key":
            dest = PingpongDest.unpack_binary(msg) if self.rdma_cm else PingpongDest.unpack(msg)
            first = step.index not in self._seen_keys
            self._seen_keys.add(step.index)
            self.remote_dests[step.index] = dest
            if (
                first
                and not self.rdma_cm  # rdma_read_keys does not check (nor always fill) GIDs
                and step.index == 0
                and gid_is_v4mapped(dest.gid) != gid_is_v4mapped(self.dests[0].gid)
            ):
                raise OobError(
                    "\n Found Incompatibility issue with GID types.\n"
                    " Please Try to use a different IP version.\n"
                )
            return [RemoteDest(step.index, dest, first)]
        self._report_words.append(msg)
        if len(self._report_words) < REPORT_WORDS:
            return []
        self.remote_report = BwReport.from_words(self._report_words)
        self._report_words = []  # a --bidirectional -a run swaps one per size
        return [ReportReceived(self.remote_report)]


def gid_text(gid: bytes) -> str:
    """The GID as ``ctx_print_pingpong_data`` prints it (``%02d`` per byte)."""
    return ":".join(f"{b:02d}" for b in gid)
