"""iSCSI connection and session state machines, sans-IO (h11 style).

Two machines, each fed received PDU bytes and returning the PDUs to send
and the events the caller must act on; neither does any I/O, RDMA or
timing, so the transport (iSER: the header with its STags is decoded by the
caller) and the SCSI core stay outside.

* :class:`IscsiTargetPortal` / :class:`IscsiTargetConnection` — the target
  side, after LIO's ``drivers/target/iscsi``: ``iscsi_target_login.c`` and
  ``iscsi_target_nego.c`` (login phase: stages, TSIH, StatSN, status
  classes), ``iscsi_target.c`` (full feature phase: ``iscsit_setup_scsi_cmd``
  checks, ``iscsit_sequence_cmd`` CmdSN ordering, NOP, TMF, Text,
  Logout, Reject), in iSER mode (no Data-Out, R2T or Data-In: data moves by
  RDMA, RFC 7145).
* :class:`IscsiInitiatorConnection` — the initiator side, after Linux's
  ``libiscsi.c`` with ``iscsi_iser`` and open-iscsi's login: the Login
  Request from :func:`~softrdma.ulp.iscsi.negotiate.linux_iser_initiator`,
  the login outcome (typed exceptions for redirect and failure), the
  CmdSN window, ITT allocation and matching of responses to tasks.

Numbering (what the capture of LIO shows, and ``iscsi_target_login.c`` /
``iscsi_target_util.c`` do): each connection's first StatSN is random
(``iscsi_login_set_conn_values``; :meth:`IscsiTargetPortal.connection`
takes it as a parameter); every Login Response, SCSI Response, NOP-In
answering a ping, TMF, Text and Logout Response and every Reject takes the
next one. During login ExpCmdSN = MaxCmdSN = the Login Request's CmdSN;
after the last Login Response MaxCmdSN = ExpCmdSN + depth - 1 (LIO's
``default_cmdsn_depth``, 64), and it moves on by one whenever a
non-immediate task is answered (``iscsit_increment_maxcmdsn``), before the
answer's header is filled. TSIHs come from a per-portal counter starting at
1 (``++tpg->ntsih``). Sequence numbers use RFC 1982 serial arithmetic on 32
bits (RFC 7143 §4.2.2.1; ``iscsi_sna_lt`` / ``iscsi_sna_gt``).

How the target answers what it must not accept — LIO's choices where
they are known (cited), the RFC's otherwise:

* during login, a PDU that is not a Login Request, or bytes that are not
  even a BHS: the connection is dropped without an answer
  (:class:`ConnectionDropped`; LIO's login thread closes the socket);
* a Login Request it refuses: a Login Response with the status class and
  detail, then the connection ends (:class:`LoginFailed`); the response is
  built as ``iscsit_tx_login_rsp`` builds it — a zeroed BHS with only the
  opcode, the status and the ITT. Missing InitiatorName, SessionType or
  (Normal) TargetName 0x0207, an unknown SessionType 0x0209, an unknown
  target 0x0301 "service unavailable" (LIO's ``iscsi_target_locate_portal``;
  the RFC has 0x0203 "not found", which open-iscsi does not retry, while it
  retries a target error), an initiator not in the ACL 0x0202, a disabled
  target 0x0301, unsupported versions 0x0205, no acceptable or a required
  authentication 0x0201, an unknown TSIH 0x020a, a connection for a live
  session 0x0206 (iSER sessions have one connection), too many sessions
  0x0302, bad flags, stages, text or keys 0x0200 (or the negotiator's
  status);
* in full feature phase, an opcode nobody defines: Reject "command not
  supported" (0x05) — LIO's ``isert_rx_opcode`` only logs it, the RFC
  asks for the Reject; a defined opcode iSER at ERL 0 never carries
  (Data-Out, SNACK, a target opcode, a Login): Reject "protocol error"
  (0x04); a PDU whose fields do not decode or break
  ``iscsit_setup_scsi_cmd``'s rules: Reject "invalid PDU field" (0x09,
  ``ISCSI_REASON_BOOKMARK_INVALID`` in iscsi_proto.h) or "protocol error"
  as LIO chooses (:class:`PduRejected`); a SCSI Command or TMF in a
  Discovery session, SendTargets=All in a Normal one, a NOP-Out answering
  a ping never sent: "protocol error"; a multi-PDU Text exchange: "command
  not supported". A rejected non-immediate PDU inside the window still
  uses up its CmdSN (in its turn), so the commands behind it run — a
  softrdma choice;
* a non-immediate PDU whose CmdSN is outside [ExpCmdSN, MaxCmdSN]:
  silently dropped (RFC 7143 §4.2.2.1, LIO's ``CMDSN_LOWER_THAN_EXP`` /
  ``CMDSN_MAXCMDSN_OVERRUN``), reported as :class:`PduDropped`; one ahead
  of ExpCmdSN inside the window waits until the gap is filled
  (``iscsit_handle_ooo_cmdsn``);
* fewer than 48 bytes in full feature phase: dropped connection (nothing
  to reject);
* ExpStatSN only acknowledges (``iscsit_ack_from_expstatsn``): a value
  ahead of the StatSNs sent, or older than the last, is ignored.

The initiator leaves out what the codec has no type for (Async Messages:
:class:`IscsiSessionError`, as for any PDU it cannot decode) and the
security stage (open-iscsi with ``AuthMethod=None`` goes straight to the
operational stage, as in the capture).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from softrdma.transport.headers import BytesLike
from softrdma.ulp.iscsi.negotiate import (
    ISCSI_KEYS,
    IscsiKeyKind,
    IscsiNegotiated,
    IscsiNegotiationError,
    KeyNegotiator,
    lio_iser_target,
)
from softrdma.ulp.iscsi.proto import (
    ISCSI_HDR_LEN,
    ISCSI_RESERVED_TAG,
    IscsiBhs,
    IscsiError,
    IscsiLoginRequest,
    IscsiLoginResponse,
    IscsiLoginStage,
    IscsiLoginStatusClass,
    IscsiLoginStatusDetail,
    IscsiLogoutReason,
    IscsiLogoutRequest,
    IscsiLogoutResponse,
    IscsiLogoutResponseCode,
    IscsiNopIn,
    IscsiNopOut,
    IscsiOpcode,
    IscsiPdu,
    IscsiProtocolError,
    IscsiReject,
    IscsiRejectReason,
    IscsiScsiCommand,
    IscsiScsiResponse,
    IscsiScsiResponseCode,
    IscsiTaskAttr,
    IscsiText,
    IscsiTextResponse,
    IscsiTmfFunc,
    IscsiTmfRequest,
    IscsiTmfResponse,
    IscsiTmfResponseCode,
    decode_iscsi_pdu,
)
from softrdma.ulp.iscsi.text import TextPairs, decode_text, encode_text

__all__ = [
    "ISCSI_DEFAULT_CMDSN_DEPTH",
    "CommandCompleted",
    "ConnectionClosed",
    "ConnectionDropped",
    "IscsiInitiatorConnection",
    "IscsiInitiatorState",
    "IscsiLoginError",
    "IscsiLoginRedirect",
    "IscsiSessionError",
    "IscsiStep",
    "IscsiTargetConnection",
    "IscsiTargetNode",
    "IscsiTargetPortal",
    "IscsiTargetSession",
    "IscsiTargetState",
    "IscsiUsageError",
    "IscsiWindowClosed",
    "LoggedOut",
    "LoginCompleted",
    "LoginFailed",
    "LogoutRequested",
    "NopInReceived",
    "PduDropped",
    "PduRejected",
    "PingAnswered",
    "RemoteBuffer",
    "ScsiCommandReceived",
    "SessionReinstated",
    "TaskRejected",
    "TextReceived",
    "TextResponseReceived",
    "TmfCompleted",
    "TmfRequested",
    "libiscsi_itt",
    "sn_add",
    "sn_lt",
]

ISCSI_DEFAULT_CMDSN_DEPTH: Final = 64
"""LIO's ``TA_DEFAULT_CMDSN_DEPTH``: MaxCmdSN runs this far ahead of
ExpCmdSN, less one."""

_SN_MASK: Final = 0xFFFFFFFF
_SN_HALF: Final = 1 << 31
_ISCSI_VERSION: Final = 0  # the only version there is (RFC 7143 §11.12.4)


def sn_add(a: int, n: int) -> int:
    """``a + n`` on 32-bit sequence numbers."""
    return (a + n) & _SN_MASK


def sn_lt(a: int, b: int) -> bool:
    """``a < b`` in RFC 1982 serial arithmetic (``iscsi_sna_lt``)."""
    return a != b and ((b - a) & _SN_MASK) < _SN_HALF


def _sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


# --- errors -------------------------------------------------------------------------------


class IscsiUsageError(IscsiError):
    """The caller used a machine wrongly: a response for a task it does not
    have, a command before login or after logout."""


class IscsiWindowClosed(IscsiError):
    """The initiator may not send another command now: its CmdSN would be
    past MaxCmdSN (libiscsi ``iscsi_check_cmdsn_window_closed``; the task
    waits in its queue)."""


class IscsiSessionError(IscsiError):
    """The target sent something the initiator cannot accept: a malformed
    PDU, one for no task of ours, one out of phase. libiscsi fails the
    connection (``iscsi_conn_failure`` with ``ISCSI_ERR_PROTO`` /
    ``ISCSI_ERR_BAD_ITT``)."""


class IscsiLoginError(IscsiError):
    """The target refused the login: ``status_class`` / ``status_detail``
    of its Login Response (open-iscsi's ``iscsi_login_rsp_*`` handling)."""

    def __init__(self, message: str, status_class: int, status_detail: int) -> None:
        super().__init__(message)
        self.status_class = status_class
        self.status_detail = status_detail


class IscsiLoginRedirect(IscsiLoginError):
    """Status class 1: log in again at ``target_address`` (the
    ``TargetAddress`` key, ``host:port,tpgt``); ``permanent`` for 0x0102."""

    def __init__(self, message: str, status_detail: int, target_address: str) -> None:
        super().__init__(message, IscsiLoginStatusClass.REDIRECT, status_detail)
        self.target_address = target_address
        self.permanent = status_detail == IscsiLoginStatusDetail.TGT_MOVED_PERM


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteBuffer:
    """An initiator buffer named in an iSER header: STag (rkey) and VA."""

    stag: int
    va: int


@dataclass(frozen=True, slots=True)
class LoginCompleted:
    """The connection entered full feature phase."""

    tsih: int
    isid: int
    initiator_name: str
    target_name: str | None
    session_type: str
    negotiated: IscsiNegotiated


@dataclass(frozen=True, slots=True)
class LoginFailed:
    """The target refused the login with this status; the connection ends."""

    status_class: int
    status_detail: int
    reason: str


@dataclass(frozen=True, slots=True)
class SessionReinstated:
    """A login with the ISID of a live session replaced it (RFC 7143 §6.3.5;
    LIO ``iscsi_check_for_session_reinstatement``): the old session's
    connections are closed; the caller tears their transport down."""

    old_tsih: int
    old_connections: tuple[IscsiTargetConnection, ...]


@dataclass(frozen=True, slots=True)
class ScsiCommandReceived:
    """A SCSI Command, delivered in CmdSN order: execute it (e.g. with
    :class:`~softrdma.ulp.scsi.ScsiTarget`) and answer with
    :meth:`IscsiTargetConnection.respond`. ``cdb`` is the 16-byte field
    plus any extended-CDB AHS; ``immediate_data`` the data segment;
    ``read_buf`` / ``write_buf`` the iSER read / write STag and VA the
    transport decoded."""

    itt: int
    lun: int
    cdb: bytes
    expected_length: int
    read: bool
    write: bool
    attr: int
    cmdsn: int
    immediate: bool
    immediate_data: bytes
    read_buf: RemoteBuffer | None
    write_buf: RemoteBuffer | None


@dataclass(frozen=True, slots=True)
class TmfRequested:
    """A Task Management Function Request: carry it out and answer with
    :meth:`IscsiTargetConnection.respond_tmf`."""

    itt: int
    function: int
    lun: int
    rtt: int
    refcmdsn: int


@dataclass(frozen=True, slots=True)
class TextReceived:
    """A Text Request the target answered (SendTargets)."""

    itt: int
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class LogoutRequested:
    """The initiator logged out; ``outstanding`` lists the ITTs of commands
    never answered (they are dropped)."""

    reason: int
    cid: int
    outstanding: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PduRejected:
    """A Reject PDU was sent for a received PDU."""

    reason: IscsiRejectReason
    header: bytes
    why: str


@dataclass(frozen=True, slots=True)
class PduDropped:
    """A received PDU was discarded without an answer (RFC 7143: a CmdSN
    outside the window, a duplicate)."""

    why: str


@dataclass(frozen=True, slots=True)
class ConnectionDropped:
    """The machine gave up on the connection (no answer possible): the
    transport disconnects."""

    why: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection ended in order (after a Logout or a refused login)."""

    why: str


@dataclass(frozen=True, slots=True)
class CommandCompleted:
    """Initiator: a SCSI Response for one of our commands."""

    itt: int
    response: int
    status: int
    sense: bytes
    residual_count: int
    underflow: bool
    overflow: bool


@dataclass(frozen=True, slots=True)
class NopInReceived:
    """Initiator: the target answered our NOP-Out ping."""

    itt: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TmfCompleted:
    """Initiator: the answer to our TMF request."""

    itt: int
    response: int


@dataclass(frozen=True, slots=True)
class LoggedOut:
    """Initiator: the Logout Response; the connection is over."""

    itt: int
    response: int
    t2wait: int
    t2retain: int


@dataclass(frozen=True, slots=True)
class TaskRejected:
    """Initiator: the target rejected one of our PDUs (``itt`` is the
    rejected header's, None if it names no task of ours)."""

    itt: int | None
    reason: int


@dataclass(frozen=True, slots=True)
class PingAnswered:
    """Target: the initiator answered our NOP-In ping (:meth:`IscsiTargetConnection.ping`)."""

    ttt: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TextResponseReceived:
    """Initiator: the answer to our Text Request (SendTargets …)."""

    itt: int
    pairs: tuple[tuple[str, str], ...]


Event = (
    LoginCompleted
    | LoginFailed
    | SessionReinstated
    | ScsiCommandReceived
    | TmfRequested
    | TextReceived
    | LogoutRequested
    | PduRejected
    | PduDropped
    | ConnectionDropped
    | ConnectionClosed
    | CommandCompleted
    | NopInReceived
    | TmfCompleted
    | LoggedOut
    | TaskRejected
    | PingAnswered
    | TextResponseReceived
)


@dataclass(slots=True)
class IscsiStep:
    """What one call produced: PDUs to send, in order, and events."""

    pdus: list[IscsiPdu] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def extend(self, other: IscsiStep) -> None:
        """Append ``other``'s PDUs and events."""
        self.pdus += other.pdus
        self.events += other.events


# --- target: portal, nodes, sessions ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IscsiTargetNode:
    """One target (LIO's ``iscsi_tiqn`` with its TPG's settings):
    ``allowed_initiators`` None lets any initiator in (LIO's
    ``generate_node_acls``), else only those names (``TGT_FORBIDDEN``);
    ``auth_required`` refuses logins that do not authenticate (CHAP is not
    modelled, so every login then fails with ``AUTH_FAILED``); ``enabled``
    False answers ``SVC_UNAVAILABLE``; ``redirect`` (a ``host:port,tpgt``)
    answers every login with "target moved temporarily" — a softrdma
    extension, LIO has no redirection."""

    name: str
    allowed_initiators: frozenset[str] | None = None
    auth_required: bool = False
    enabled: bool = True
    redirect: str | None = None


class IscsiTargetSession:
    """One session (LIO's ``iscsit_session``): its names, TSIH and the
    session-wide command numbering (ExpCmdSN, MaxCmdSN, the queue of
    commands that arrived ahead of their turn)."""

    def __init__(
        self, portal: IscsiTargetPortal, tsih: int, isid: int, initiator_name: str, cmdsn: int
    ) -> None:
        self.portal = portal
        self.tsih = tsih
        self.isid = isid
        self.initiator_name = initiator_name
        self.target_name: str | None = None
        self.session_type = "Normal"
        self.negotiated: IscsiNegotiated | None = None
        self.exp_cmdsn = cmdsn
        self.max_cmdsn = cmdsn
        self.connections: list[IscsiTargetConnection] = []
        self.live = False

    def __repr__(self) -> str:
        return f"<IscsiTargetSession tsih={self.tsih} isid={self.isid:#014x}>"


class IscsiTargetPortal:
    """A target portal group (LIO's ``iscsi_portal_group`` and its
    targets): the targets it serves, the TSIH counter, the live sessions,
    and the settings every connection shares.

    ``address`` / ``tpgt`` are what SendTargets reports; ``cmdsn_depth``
    LIO's per-initiator ``default_cmdsn_depth``; ``max_sessions`` (0: no
    limit) refuses logins past it with "out of resources" (0x0302);
    ``negotiator(leading)`` builds each login's
    :class:`~softrdma.ulp.iscsi.negotiate.KeyNegotiator` (default LIO's
    iSER keys)."""

    def __init__(
        self,
        targets: Iterable[IscsiTargetNode | str],
        *,
        address: str = "10.77.0.1:3260",
        tpgt: int = 1,
        cmdsn_depth: int = ISCSI_DEFAULT_CMDSN_DEPTH,
        max_sessions: int = 0,
        negotiator: Callable[[bool], KeyNegotiator] | None = None,
        seed: int | None = None,
    ) -> None:
        if not 1 <= cmdsn_depth <= 1 << 16:
            raise ValueError(f"cmdsn_depth {cmdsn_depth}: 1 .. 65536")
        self.targets: dict[str, IscsiTargetNode] = {}
        for t in targets:
            node = IscsiTargetNode(t) if isinstance(t, str) else t
            self.targets[node.name] = node
        self.address = address
        self.tpgt = tpgt
        self.cmdsn_depth = cmdsn_depth
        self.max_sessions = max_sessions
        self._negotiator = negotiator or (lambda leading: lio_iser_target(tpgt=tpgt))
        self._random = random.Random(seed)
        self._ntsih = 0
        self.sessions: dict[int, IscsiTargetSession] = {}

    def connection(self, *, initial_statsn: int | None = None) -> IscsiTargetConnection:
        """A new connection's machine, waiting for its first Login Request.
        ``initial_statsn`` is the StatSN of its first Login Response; LIO
        draws it at random (``get_random_bytes`` in
        ``iscsi_login_set_conn_values``), and so does this by default."""
        if initial_statsn is None:
            initial_statsn = self._random.getrandbits(32)
        return IscsiTargetConnection(self, initial_statsn & _SN_MASK)

    def _new_tsih(self) -> int:
        """The next TSIH (LIO: ``++tpg->ntsih``, never 0); unlike LIO, one
        still in use is skipped."""
        for _ in range(0x10000):
            self._ntsih = (self._ntsih + 1) & 0xFFFF
            if self._ntsih and self._ntsih not in self.sessions:
                return self._ntsih
        raise IscsiUsageError("no free TSIH")

    def send_targets(self, which: str, session: IscsiTargetSession) -> TextPairs:
        """The SendTargets answer (LIO ``iscsit_build_sendtargets_response``):
        ``TargetName`` and ``TargetAddress`` per target."""
        if session.session_type == "Discovery":
            names = list(self.targets) if which == "All" else [which]
        else:
            names = [session.target_name or ""] if which in ("", session.target_name) else []
        out: TextPairs = []
        for name in names:
            node = self.targets.get(name)
            if node is None or not node.enabled:
                continue
            allowed = node.allowed_initiators
            if allowed is not None and session.initiator_name not in allowed:
                continue
            out += [("TargetName", name), ("TargetAddress", f"{self.address},{self.tpgt}")]
        return out


class IscsiTargetState(enum.Enum):
    """A target connection's state (RFC 7143 §8.1.2's target states, the
    ones a sans-IO machine can be in)."""

    XPT_UP = "S3"  # transport up, waiting for the first Login Request
    IN_LOGIN = "S4"
    LOGGED_IN = "S5"
    FREE = "S1"  # ended: logout, refused login, dropped, reinstated


class _LoginFail(Exception):
    def __init__(self, status_class: int, status_detail: int, why: str) -> None:
        super().__init__(why)
        self.status_class = status_class
        self.status_detail = status_detail
        self.why = why


class _Reject(Exception):
    def __init__(self, reason: IscsiRejectReason, why: str) -> None:
        super().__init__(why)
        self.reason = reason
        self.why = why


class _Redirect(_LoginFail):
    def __init__(self, address: str) -> None:
        super().__init__(
            IscsiLoginStatusClass.REDIRECT,
            IscsiLoginStatusDetail.TGT_MOVED_TEMP,
            f"target moved to {address}",
        )
        self.address = address


_INIT: Final = IscsiLoginStatusClass.INITIATOR_ERR
_TGT: Final = IscsiLoginStatusClass.TARGET_ERR
_D = IscsiLoginStatusDetail
_R = IscsiRejectReason
_DECLARATIVE: Final = IscsiKeyKind.DECLARATIVE
_INVALID_FIELD: Final = IscsiRejectReason.BOOKMARK_INVALID  # RFC 7143: "Invalid PDU field"
_SECURITY: Final = IscsiLoginStage.SECURITY_NEGOTIATION
_OPERATIONAL: Final = IscsiLoginStage.OP_PARMS_NEGOTIATION
_FFP: Final = IscsiLoginStage.FULL_FEATURE_PHASE

# (state, opcode) → handler name; an opcode missing from a state's row gets
# the row's default (None: drop the connection; "_ignore": nothing).
_TARGET_TABLE: Final[dict[IscsiTargetState, tuple[dict[int, str], str | None]]] = {
    IscsiTargetState.XPT_UP: ({IscsiOpcode.LOGIN: "_on_login"}, None),
    IscsiTargetState.IN_LOGIN: ({IscsiOpcode.LOGIN: "_on_login"}, None),
    IscsiTargetState.LOGGED_IN: (
        {
            IscsiOpcode.SCSI_CMD: "_on_scsi_cmd",
            IscsiOpcode.NOOP_OUT: "_on_nop_out",
            IscsiOpcode.SCSI_TMFUNC: "_on_tmf",
            IscsiOpcode.TEXT: "_on_text",
            IscsiOpcode.LOGOUT: "_on_logout",
            IscsiOpcode.LOGIN: "_reject_protocol",
            IscsiOpcode.SCSI_DATA_OUT: "_reject_protocol",
            IscsiOpcode.SNACK: "_reject_protocol",
        },
        "_reject_unknown",
    ),
    IscsiTargetState.FREE: ({}, "_ignore"),
}


# Initiator opcodes whose bytes 24-27 are a CmdSN.
_CMDSN_OPCODES: Final = frozenset(
    {
        IscsiOpcode.SCSI_CMD,
        IscsiOpcode.NOOP_OUT,
        IscsiOpcode.SCSI_TMFUNC,
        IscsiOpcode.TEXT,
        IscsiOpcode.LOGOUT,
    }
)


@dataclass(slots=True)
class _Outstanding:
    itt: int
    immediate: bool


class IscsiTargetConnection:
    """One connection on the target side (LIO's ``iscsit_conn`` with its
    login (``iscsi_login``) and receive thread), sans-IO.

    Feed each received PDU's bytes (the iSCSI part of an iSER SEND) to
    :meth:`receive` with the iSER read / write buffers the transport
    decoded; send the returned PDUs in order; act on the events. Answer
    :class:`ScsiCommandReceived` with :meth:`respond` and
    :class:`TmfRequested` with :meth:`respond_tmf`. :meth:`receive` never
    raises: everything the peer can send has an answer (see the module
    docstring)."""

    def __init__(self, portal: IscsiTargetPortal, initial_statsn: int) -> None:
        self.portal = portal
        self.state = IscsiTargetState.XPT_UP
        self.statsn = initial_statsn  # the next StatSN to send
        self.exp_statsn: int | None = None  # the initiator's latest acknowledgement
        self.session: IscsiTargetSession | None = None
        self.cid = 0
        self.closed_why: str | None = None
        # login
        self._first: IscsiLoginRequest | None = None
        self._stage = _SECURITY
        self._negotiator: KeyNegotiator | None = None
        self._node: IscsiTargetNode | None = None
        self._text_buf = b""
        # full feature phase
        self._outstanding: dict[int, _Outstanding] = {}
        self._ooo: dict[int, Callable[[], IscsiStep]] = {}
        self._pings: set[int] = set()
        self._ttt = 0

    def __repr__(self) -> str:
        return f"<IscsiTargetConnection {self.state.name} statsn={self.statsn:#x}>"

    # --- numbering

    @property
    def exp_cmdsn(self) -> int:
        """The session's ExpCmdSN (0 before login)."""
        return self.session.exp_cmdsn if self.session else 0

    @property
    def max_cmdsn(self) -> int:
        """The session's MaxCmdSN (0 before login)."""
        return self.session.max_cmdsn if self.session else 0

    def _next_statsn(self) -> int:
        sn = self.statsn
        self.statsn = sn_add(sn, 1)
        return sn

    def _window_slot_freed(self, immediate: bool) -> None:
        """A non-immediate task ended: MaxCmdSN moves one on
        (``iscsit_increment_maxcmdsn``)."""
        if not immediate and self.session is not None:
            self.session.max_cmdsn = sn_add(self.session.max_cmdsn, 1)

    # --- the entry point

    def receive(
        self,
        data: BytesLike,
        *,
        read_buf: RemoteBuffer | None = None,
        write_buf: RemoteBuffer | None = None,
    ) -> IscsiStep:
        """Process one received PDU (LIO ``iscsi_target_rx_opcode`` /
        ``isert_rx_opcode``; during login ``iscsi_target_do_login``)."""
        if self.state is IscsiTargetState.FREE:
            return IscsiStep()
        raw = bytes(data)
        try:
            bhs = IscsiBhs.decode(raw)
        except IscsiProtocolError as e:
            return self._drop(f"not an iSCSI PDU: {e}")
        row, default = _TARGET_TABLE[self.state]
        name = row.get(bhs.opcode, default)
        if name is None:
            return self._drop(f"opcode {bhs.opcode:#04x} in state {self.state.name}")
        handler: Callable[[bytes, IscsiBhs, RemoteBuffer | None, RemoteBuffer | None], IscsiStep]
        handler = getattr(self, name)
        try:
            return handler(raw, bhs, read_buf, write_buf)
        except _Reject as r:
            if bhs.opcode in _CMDSN_OPCODES:
                cmdsn = int.from_bytes(raw[24:28], "big")
                return self._reject_in_order(raw, bhs.immediate, cmdsn, r.reason, r.why)
            return self._reject(raw, r.reason, r.why)

    def receive_pdu(
        self,
        pdu: IscsiPdu,
        *,
        read_buf: RemoteBuffer | None = None,
        write_buf: RemoteBuffer | None = None,
    ) -> IscsiStep:
        """:meth:`receive` of ``pdu.encode()``."""
        return self.receive(pdu.encode(), read_buf=read_buf, write_buf=write_buf)

    def _ignore(self, raw: bytes, bhs: IscsiBhs, *_: object) -> IscsiStep:
        return IscsiStep()

    def _drop(self, why: str) -> IscsiStep:
        self._end(why)
        return IscsiStep(events=[ConnectionDropped(why)])

    @property
    def first_login(self) -> IscsiLoginRequest | None:
        """The connection's first Login Request (who the initiator said it
        was, even when its login failed); None before one arrived."""
        return self._first

    def transport_closed(self, why: str = "transport closed") -> None:
        """The transport under this connection went away (a DREQ, an RDMA
        error): the connection ends and, with its last connection, the
        session leaves the portal (``iscsit_close_connection``)."""
        self._end(why)

    def _end(self, why: str) -> None:
        self.state = IscsiTargetState.FREE
        self.closed_why = why
        sess = self.session
        if sess is not None and self in sess.connections:
            sess.connections.remove(self)
            if not sess.connections and sess.live:
                sess.live = False
                self.portal.sessions.pop(sess.tsih, None)

    def _reject(self, raw: bytes, reason: IscsiRejectReason, why: str) -> IscsiStep:
        """A Reject carrying the offending header (LIO ``iscsit_add_reject``
        / ``iscsit_send_reject``: it takes a StatSN)."""
        pdu = IscsiReject.rejecting(
            raw,
            reason,
            statsn=self._next_statsn(),
            exp_cmdsn=self.exp_cmdsn,
            max_cmdsn=self.max_cmdsn,
        )
        return IscsiStep([pdu], [PduRejected(reason, pdu.data, why)])

    # --- login phase

    def _login_fail(self, itt: int, fail: _LoginFail) -> IscsiStep:
        """``iscsit_tx_login_rsp``: a zeroed header with the status and the
        ITT; the connection then ends."""
        data = b""
        if isinstance(fail, _Redirect):
            data = encode_text([("TargetAddress", fail.address)])
        rsp = IscsiLoginResponse(
            itt=itt, status_class=fail.status_class, status_detail=fail.status_detail, data=data
        )
        sess = self.session
        if sess is not None and not sess.live:
            self.session = None  # the half-made session goes with the login
        self._end(fail.why)
        return IscsiStep(
            [rsp],
            [
                LoginFailed(fail.status_class, fail.status_detail, fail.why),
                ConnectionClosed(fail.why),
            ],
        )

    def _on_login(self, raw: bytes, bhs: IscsiBhs, *_: object) -> IscsiStep:
        first = self.state is IscsiTargetState.XPT_UP
        itt = bhs.itt if first or self._first is None else self._first.itt
        try:
            return self._login(raw, first)
        except _LoginFail as f:
            return self._login_fail(itt, f)

    def _login(self, raw: bytes, first: bool) -> IscsiStep:
        try:
            req = IscsiLoginRequest.decode(raw)
        except IscsiProtocolError as e:
            raise _LoginFail(_INIT, _D.INIT_ERR, f"bad Login Request: {e}") from None
        if first:
            self._first = req
            self.state = IscsiTargetState.IN_LOGIN
            if req.min_version > _ISCSI_VERSION:
                raise _LoginFail(
                    _INIT, _D.NO_VERSION, f"versions {req.min_version}..{req.max_version}"
                )
            if req.csg not in (_SECURITY, _OPERATIONAL):
                raise _LoginFail(_INIT, _D.INIT_ERR, f"first Login Request with CSG {req.csg}")
            self._stage = IscsiLoginStage(req.csg)
        else:
            f = self._first
            assert f is not None
            same = (f.isid, f.tsih, f.itt, f.cid, f.max_version, f.min_version)
            now = (req.isid, req.tsih, req.itt, req.cid, req.max_version, req.min_version)
            if same != now:
                raise _LoginFail(_INIT, _D.INIT_ERR, "login fields changed between PDUs")
            if req.csg != self._stage:
                raise _LoginFail(_INIT, _D.INIT_ERR, f"CSG {req.csg} in stage {self._stage}")
        if req.transit and req.nsg <= req.csg:
            raise _LoginFail(_INIT, _D.INIT_ERR, f"transit from {req.csg} to {req.nsg}")
        self._text_buf += req.data
        if len(self._text_buf) > 65536:
            raise _LoginFail(_INIT, _D.INIT_ERR, "login text too long")
        if req.cont:
            # More text follows: an empty answer asks for it (RFC 7143 §6.1.1).
            return IscsiStep([self._login_rsp(req, transit=False, tsih=0, data=b"")])
        try:
            pairs = decode_text(self._text_buf)
        except IscsiError as e:
            raise _LoginFail(_INIT, _D.INIT_ERR, f"login text: {e}") from None
        self._text_buf = b""
        if self._negotiator is None:
            self._start_session(req, pairs)
        neg = self._negotiator
        sess = self.session
        assert neg is not None and sess is not None
        try:
            answers = neg.step(pairs, stage=self._stage)
        except IscsiNegotiationError as e:
            raise _LoginFail(e.status_class, e.status_detail, str(e)) from None
        node = self._node
        if ("AuthMethod", "Reject") in answers:
            raise _LoginFail(_INIT, _D.AUTH_FAILED, "no acceptable AuthMethod")
        if self._stage is _SECURITY:
            method = neg.values.get("AuthMethod")
            if node is not None and node.auth_required:
                if method is not None or req.transit:
                    raise _LoginFail(_INIT, _D.AUTH_FAILED, "authentication is not possible")
            elif req.transit and method not in (None, "None"):
                raise _LoginFail(_INIT, _D.AUTH_FAILED, f"AuthMethod={method}")
        elif node is not None and node.auth_required:
            raise _LoginFail(_INIT, _D.AUTH_FAILED, "the target requires authentication")
        tsih = req.tsih
        events: list[Event] = []
        offered = {k for k, _ in pairs}
        awaiting = [
            k
            for k, _ in answers
            if k not in offered and k in ISCSI_KEYS and ISCSI_KEYS[k].kind is not _DECLARATIVE
        ]
        transit = req.transit and not awaiting
        if transit:
            if req.nsg == _FFP:
                try:
                    sess.negotiated = neg.finish()
                except IscsiNegotiationError as e:
                    raise _LoginFail(e.status_class, e.status_detail, str(e)) from None
                events += self._complete_login(sess)
                tsih = sess.tsih
            self._stage = IscsiLoginStage(req.nsg)
        rsp = self._login_rsp(req, transit=transit, tsih=tsih, data=encode_text(answers))
        if transit and req.nsg == _FFP:
            # Full feature phase opens the command window (LIO adds the
            # queue depth after the last Login Response is built).
            sess.max_cmdsn = sn_add(sess.exp_cmdsn, self.portal.cmdsn_depth - 1)
        return IscsiStep([rsp], events)

    def _login_rsp(
        self, req: IscsiLoginRequest, *, transit: bool, tsih: int, data: bytes
    ) -> IscsiLoginResponse:
        """``iscsi_target_do_tx_login_io``'s header."""
        return IscsiLoginResponse(
            transit=transit,
            csg=req.csg,
            nsg=req.nsg if transit else 0,
            max_version=_ISCSI_VERSION,
            active_version=_ISCSI_VERSION,
            isid=req.isid,
            tsih=tsih,
            itt=req.itt,
            statsn=self._next_statsn(),
            exp_cmdsn=self.exp_cmdsn,
            max_cmdsn=self.max_cmdsn,
            data=data,
        )

    def _start_session(self, req: IscsiLoginRequest, pairs: TextPairs) -> None:
        """What the first Login Request's keys decide
        (``iscsi_target_locate_portal``, ``iscsi_login_zero_tsih_s1/s2``,
        ``iscsi_login_non_zero_tsih_s1``)."""
        keys: dict[str, str] = {}
        for k, v in pairs:
            keys.setdefault(k, v)
        initiator = keys.get("InitiatorName")
        if not initiator:
            raise _LoginFail(_INIT, _D.MISSING_FIELDS, "no InitiatorName")
        stype = keys.get("SessionType")
        if stype is None:
            raise _LoginFail(_INIT, _D.MISSING_FIELDS, "no SessionType")
        if stype not in ("Normal", "Discovery"):
            raise _LoginFail(_INIT, _D.NO_SESSION_TYPE, f"SessionType={stype}")
        portal = self.portal
        target = keys.get("TargetName")
        if stype == "Normal":
            if not target:
                raise _LoginFail(_INIT, _D.MISSING_FIELDS, "no TargetName")
            node = portal.targets.get(target)
            if node is None:
                # iscsi_target_locate_portal: "Unable to locate Target IQN",
                # a target error (open-iscsi logs "target error (03/01)").
                raise _LoginFail(_TGT, _D.SVC_UNAVAILABLE, f"no target {target}")
            if node.redirect is not None:
                raise _Redirect(node.redirect)
            if not node.enabled:
                raise _LoginFail(_TGT, _D.SVC_UNAVAILABLE, f"{target} is disabled")
            allowed = node.allowed_initiators
            if allowed is not None and initiator not in allowed:
                raise _LoginFail(_INIT, _D.TGT_FORBIDDEN, f"{initiator} may not log in")
            self._node = node
        if req.tsih != 0:
            old = portal.sessions.get(req.tsih)
            if old is None or old.isid != req.isid or old.initiator_name != initiator:
                raise _LoginFail(_INIT, _D.NO_SESSION, f"no session with TSIH {req.tsih}")
            # iSER sessions have MaxConnections=1: no connection can join.
            raise _LoginFail(_INIT, _D.ISID_ERROR, "the session has its connections")
        if portal.max_sessions and len(portal.sessions) >= portal.max_sessions:
            raise _LoginFail(_TGT, _D.NO_RESOURCES, "too many sessions")
        sess = IscsiTargetSession(portal, portal._new_tsih(), req.isid, initiator, req.cmdsn)
        sess.target_name = target if stype == "Normal" else None
        sess.session_type = stype
        self.session = sess
        self.cid = req.cid
        self._negotiator = portal._negotiator(True)

    def _complete_login(self, sess: IscsiTargetSession) -> list[Event]:
        events: list[Event] = []
        portal = self.portal
        if sess.session_type == "Normal":
            for old in list(portal.sessions.values()):
                same = (old.initiator_name, old.isid, old.target_name)
                if old.live and same == (sess.initiator_name, sess.isid, sess.target_name):
                    conns = tuple(old.connections)
                    for c in conns:
                        c._end("session reinstated")
                    old.live = False
                    portal.sessions.pop(old.tsih, None)
                    events.append(SessionReinstated(old.tsih, conns))
        sess.live = True
        sess.connections.append(self)
        portal.sessions[sess.tsih] = sess
        self.state = IscsiTargetState.LOGGED_IN
        assert sess.negotiated is not None
        events.append(
            LoginCompleted(
                sess.tsih,
                sess.isid,
                sess.initiator_name,
                sess.target_name,
                sess.session_type,
                sess.negotiated,
            )
        )
        return events

    # --- full feature phase: ordering

    def _ack(self, exp_statsn: int) -> None:
        """ExpStatSN acknowledges status (``iscsit_ack_from_expstatsn``); a
        value ahead of what was sent, or older than the last one, is
        ignored."""
        if not _sn_le(exp_statsn, self.statsn):
            return
        if self.exp_statsn is None or _sn_le(self.exp_statsn, exp_statsn):
            self.exp_statsn = exp_statsn

    def _outside_window(self, cmdsn: int, what: str) -> IscsiStep | None:
        """A PduDropped step if ``cmdsn`` is outside [ExpCmdSN, MaxCmdSN]."""
        sess = self.session
        assert sess is not None
        if _sn_le(cmdsn, sess.max_cmdsn) and _sn_le(sess.exp_cmdsn, cmdsn):
            return None
        why = f"{what}: CmdSN {cmdsn:#x} outside [{sess.exp_cmdsn:#x}, {sess.max_cmdsn:#x}]"
        return IscsiStep(events=[PduDropped(why)])

    def _sequence(
        self, immediate: bool, cmdsn: int, run: Callable[[], IscsiStep], what: str
    ) -> IscsiStep:
        """Run ``run`` now (immediate, or the expected CmdSN, then whatever
        waited behind it), later (ahead inside the window), or never
        (outside it) — ``iscsit_sequence_cmd``."""
        sess = self.session
        assert sess is not None
        if immediate:
            return run()
        dropped = self._outside_window(cmdsn, what)
        if dropped is not None:
            return dropped
        if cmdsn != sess.exp_cmdsn:
            if cmdsn in self._ooo:
                return IscsiStep(events=[PduDropped(f"{what}: CmdSN {cmdsn:#x} twice")])
            self._ooo[cmdsn] = run
            return IscsiStep()
        sess.exp_cmdsn = sn_add(sess.exp_cmdsn, 1)
        step = run()
        step.extend(self._drain())
        return step

    def _drain(self) -> IscsiStep:
        """Run the PDUs that waited for the CmdSNs now received
        (``iscsit_execute_ooo_cmdsns``)."""
        sess = self.session
        assert sess is not None
        step = IscsiStep()
        while self.state is IscsiTargetState.LOGGED_IN and sess.exp_cmdsn in self._ooo:
            nxt = self._ooo.pop(sess.exp_cmdsn)
            sess.exp_cmdsn = sn_add(sess.exp_cmdsn, 1)
            step.extend(nxt())
        return step

    def _reject_in_order(
        self, raw: bytes, immediate: bool, cmdsn: int, reason: IscsiRejectReason, why: str
    ) -> IscsiStep:
        """Reject a PDU that carries a CmdSN. A non-immediate one outside
        the window is dropped like any other; inside it, its CmdSN still
        counts as received (and its window slot as freed), so the commands
        behind it are not stuck — in its turn if it came early."""
        sess = self.session
        assert sess is not None
        if immediate:
            return self._reject(raw, reason, why)
        dropped = self._outside_window(cmdsn, "rejected PDU")
        if dropped is not None:
            return dropped

        def consume() -> IscsiStep:
            self._window_slot_freed(False)
            return IscsiStep()

        if cmdsn != sess.exp_cmdsn:
            step = self._reject(raw, reason, why)
            step.extend(self._sequence(False, cmdsn, consume, "rejected PDU"))
            return step
        sess.exp_cmdsn = sn_add(sess.exp_cmdsn, 1)
        consume()
        step = self._reject(raw, reason, why)
        step.extend(self._drain())
        return step

    def _decode(self, raw: bytes) -> IscsiPdu:
        try:
            return decode_iscsi_pdu(raw)
        except IscsiError as e:
            raise _Reject(_INVALID_FIELD, f"malformed PDU: {e}") from None

    # --- full feature phase: the PDUs

    def _reject_protocol(self, raw: bytes, bhs: IscsiBhs, *_: object) -> IscsiStep:
        return self._reject(raw, _R.PROTOCOL_ERROR, f"opcode {bhs.opcode:#04x} not allowed here")

    def _reject_unknown(self, raw: bytes, bhs: IscsiBhs, *_: object) -> IscsiStep:
        known = bhs.opcode in IscsiOpcode._value2member_map_
        if known:  # a target opcode coming from the initiator
            return self._reject_protocol(raw, bhs)
        return self._reject(raw, _R.CMD_NOT_SUPPORTED, f"unknown opcode {bhs.opcode:#04x}")

    def _on_scsi_cmd(
        self,
        raw: bytes,
        bhs: IscsiBhs,
        read_buf: RemoteBuffer | None,
        write_buf: RemoteBuffer | None,
    ) -> IscsiStep:
        cmd = self._decode(raw)
        assert isinstance(cmd, IscsiScsiCommand)
        self._ack(cmd.exp_statsn)
        sess = self.session
        assert sess is not None and sess.negotiated is not None
        neg = sess.negotiated
        why = self._check_scsi_cmd(cmd, neg)
        if why is not None:
            return self._reject_in_order(raw, cmd.immediate, cmd.cmdsn, why[0], why[1])
        if cmd.itt in self._outstanding or cmd.itt == ISCSI_RESERVED_TAG:
            return self._reject_in_order(
                raw, cmd.immediate, cmd.cmdsn, _R.TASK_IN_PROGRESS, f"ITT {cmd.itt:#x} in use"
            )
        cdb = cmd.cdb + b"".join(a.specific[1:] for a in cmd.ahs if a.ahs_type == 1)
        event = ScsiCommandReceived(
            itt=cmd.itt,
            lun=cmd.lun,
            cdb=cdb,
            expected_length=cmd.data_length,
            read=cmd.read,
            write=cmd.write,
            attr=cmd.attr,
            cmdsn=cmd.cmdsn,
            immediate=cmd.immediate,
            immediate_data=cmd.data,
            read_buf=read_buf,
            write_buf=write_buf,
        )

        def deliver() -> IscsiStep:
            if cmd.itt in self._outstanding:  # another task took the ITT meanwhile
                self._window_slot_freed(cmd.immediate)
                return self._reject(raw, _R.TASK_IN_PROGRESS, f"ITT {cmd.itt:#x} in use")
            self._outstanding[cmd.itt] = _Outstanding(cmd.itt, cmd.immediate)
            return IscsiStep(events=[event])

        return self._sequence(cmd.immediate, cmd.cmdsn, deliver, "SCSI Command")

    def _check_scsi_cmd(
        self, cmd: IscsiScsiCommand, neg: IscsiNegotiated
    ) -> tuple[IscsiRejectReason, str] | None:
        """``iscsit_setup_scsi_cmd``'s rules for the header and immediate
        data, in iSER terms (TargetRecvDataSegmentLength bounds the data
        segment)."""
        sess = self.session
        assert sess is not None
        imm = len(cmd.data)
        if sess.session_type == "Discovery":
            return _R.PROTOCOL_ERROR, "SCSI Command in a Discovery session"
        if not cmd.write and not cmd.final:
            return _INVALID_FIELD, "neither W nor F set"
        if not (cmd.read or cmd.write) and cmd.data_length:
            return _INVALID_FIELD, "expected data length without R or W"
        if cmd.read and cmd.write:
            return _INVALID_FIELD, "bidirectional commands are not supported"
        if imm and not neg.immediate_data:
            return _R.PROTOCOL_ERROR, "immediate data with ImmediateData=No"
        if imm and not cmd.write:
            return _INVALID_FIELD, "data segment without W"
        if imm > cmd.data_length:
            return _INVALID_FIELD, "more immediate data than the expected length"
        limit = (
            neg.target_recv_data_segment_length
            if neg.rdma_extensions
            else int(neg.values.get("MaxRecvDataSegmentLength", "8192"))
        )
        if imm > limit:
            return _R.PROTOCOL_ERROR, f"{imm} bytes of data segment, at most {limit}"
        if imm > neg.first_burst_length:
            return _INVALID_FIELD, "immediate data beyond FirstBurstLength"
        if imm == cmd.data_length and imm and not cmd.final:
            return _R.PROTOCOL_ERROR, "all the data is immediate but F is clear"
        return None

    def _on_nop_out(self, raw: bytes, bhs: IscsiBhs, *_: object) -> IscsiStep:
        nop = self._decode(raw)
        assert isinstance(nop, IscsiNopOut)
        self._ack(nop.exp_statsn)
        if nop.ttt != ISCSI_RESERVED_TAG:
            if nop.ttt not in self._pings:
                raise _Reject(_R.PROTOCOL_ERROR, f"NOP-Out for TTT {nop.ttt:#x}: no ping of ours")
            self._pings.discard(nop.ttt)
            return IscsiStep(events=[PingAnswered(nop.ttt, nop.data)])
        if nop.itt == ISCSI_RESERVED_TAG:
            if not nop.immediate:
                raise _Reject(_R.PROTOCOL_ERROR, "NOP-Out with reserved ITT without I bit")
            return IscsiStep()  # no answer wanted

        def answer() -> IscsiStep:
            self._window_slot_freed(nop.immediate)
            return IscsiStep(
                [
                    IscsiNopIn(
                        lun=nop.lun,
                        itt=nop.itt,
                        statsn=self._next_statsn(),
                        exp_cmdsn=self.exp_cmdsn,
                        max_cmdsn=self.max_cmdsn,
                        data=nop.data,
                    )
                ]
            )

        return self._sequence(nop.immediate, nop.cmdsn, answer, "NOP-Out")

    def _on_tmf(self, raw: bytes, bhs: IscsiBhs, *_: object) -> IscsiStep:
        tmf = self._decode(raw)
        assert isinstance(tmf, IscsiTmfRequest)
        self._ack(tmf.exp_statsn)
        sess = self.session
        assert sess is not None
        if sess.session_type == "Discovery":
            return self._reject_in_order(
                raw, tmf.immediate, tmf.cmdsn, _R.PROTOCOL_ERROR, "TMF in a Discovery session"
            )
        if tmf.itt in self._outstanding or tmf.itt == ISCSI_RESERVED_TAG:
            return self._reject_in_order(
                raw, tmf.immediate, tmf.cmdsn, _R.TASK_IN_PROGRESS, f"ITT {tmf.itt:#x} in use"
            )

        def deliver() -> IscsiStep:
            if tmf.itt in self._outstanding:  # another task took the ITT meanwhile
                self._window_slot_freed(tmf.immediate)
                return self._reject(raw, _R.TASK_IN_PROGRESS, f"ITT {tmf.itt:#x} in use")
            self._outstanding[tmf.itt] = _Outstanding(tmf.itt, tmf.immediate)
            func = tmf.function
            if func == IscsiTmfFunc.TASK_REASSIGN:  # needs ErrorRecoveryLevel 2
                return IscsiStep([self._tmf_rsp(tmf.itt, IscsiTmfResponseCode.TASK_ALLEGIANT)])
            if func not in IscsiTmfFunc._value2member_map_:
                return IscsiStep([self._tmf_rsp(tmf.itt, IscsiTmfResponseCode.REJECTED)])
            return IscsiStep(events=[TmfRequested(tmf.itt, func, tmf.lun, tmf.rtt, tmf.refcmdsn)])

        return self._sequence(tmf.immediate, tmf.cmdsn, deliver, "TMF Request")

    def _on_text(self, raw: bytes, bhs: IscsiBhs, *_: object) -> IscsiStep:
        text = self._decode(raw)
        assert isinstance(text, IscsiText)
        self._ack(text.exp_statsn)
        if text.ttt != ISCSI_RESERVED_TAG or text.cont or not text.final:
            raise _Reject(_R.CMD_NOT_SUPPORTED, "multi-PDU Text exchanges are not supported")
        try:
            pairs = decode_text(text.data)
        except IscsiError as e:
            raise _Reject(_INVALID_FIELD, f"Text data: {e}") from None
        sess = self.session
        assert sess is not None

        def answer() -> IscsiStep:
            out: TextPairs = []
            for key, value in pairs:
                if key == "SendTargets" and value == "All" and sess.session_type == "Normal":
                    # LIO: SendTargets=All belongs to discovery sessions.
                    self._window_slot_freed(text.immediate)
                    return self._reject(
                        raw, _R.PROTOCOL_ERROR, "SendTargets=All in a Normal session"
                    )
                if key == "SendTargets":
                    out += self.portal.send_targets(value, sess)
                else:
                    out.append((key, "NotUnderstood"))
            self._window_slot_freed(text.immediate)
            rsp = IscsiTextResponse(
                lun=text.lun,
                itt=text.itt,
                statsn=self._next_statsn(),
                exp_cmdsn=self.exp_cmdsn,
                max_cmdsn=self.max_cmdsn,
                data=encode_text(out),
            )
            return IscsiStep([rsp], [TextReceived(text.itt, tuple(pairs))])

        return self._sequence(text.immediate, text.cmdsn, answer, "Text Request")

    def _on_logout(self, raw: bytes, bhs: IscsiBhs, *_: object) -> IscsiStep:
        req = self._decode(raw)
        assert isinstance(req, IscsiLogoutRequest)
        self._ack(req.exp_statsn)
        reason = req.reason
        if reason not in (
            IscsiLogoutReason.CLOSE_SESSION,
            IscsiLogoutReason.CLOSE_CONNECTION,
            IscsiLogoutReason.RECOVERY,
        ):
            return self._reject_in_order(
                raw, req.immediate, req.cmdsn, _INVALID_FIELD, f"logout reason {reason}"
            )

        def answer() -> IscsiStep:
            if reason == IscsiLogoutReason.RECOVERY:
                code = IscsiLogoutResponseCode.RECOVERY_UNSUPPORTED  # ErrorRecoveryLevel 0
            elif reason == IscsiLogoutReason.CLOSE_CONNECTION and req.cid != self.cid:
                code = IscsiLogoutResponseCode.CID_NOT_FOUND
            else:
                code = IscsiLogoutResponseCode.SUCCESS
            self._window_slot_freed(req.immediate)
            rsp = IscsiLogoutResponse(
                response=code,
                itt=req.itt,
                statsn=self._next_statsn(),
                exp_cmdsn=self.exp_cmdsn,
                max_cmdsn=self.max_cmdsn,
            )
            if code != IscsiLogoutResponseCode.SUCCESS:
                return IscsiStep([rsp])
            outstanding = tuple(self._outstanding)
            self._outstanding.clear()
            self._ooo.clear()
            self._end("logout")
            return IscsiStep(
                [rsp],
                [LogoutRequested(reason, req.cid, outstanding), ConnectionClosed("logout")],
            )

        return self._sequence(req.immediate, req.cmdsn, answer, "Logout Request")

    # --- the caller's answers

    def _take_task(self, itt: int) -> _Outstanding:
        if self.state is not IscsiTargetState.LOGGED_IN:
            raise IscsiUsageError(f"connection is {self.state.name}")
        task = self._outstanding.pop(itt, None)
        if task is None:
            raise IscsiUsageError(f"no outstanding task with ITT {itt:#x}")
        return task

    def respond(
        self,
        itt: int,
        *,
        status: int = 0,
        sense: bytes = b"",
        underflow: int = 0,
        overflow: int = 0,
        response: int = IscsiScsiResponseCode.CMD_COMPLETED,
    ) -> IscsiScsiResponse:
        """The SCSI Response for command ``itt`` (LIO
        ``iscsit_build_rsp_pdu``): ``underflow`` / ``overflow`` are residual
        byte counts (as :class:`~softrdma.ulp.scsi.ScsiResult` gives them),
        ``sense`` the sense buffer. The command's window slot is freed
        before the header is filled, so MaxCmdSN already counts it."""
        task = self._take_task(itt)
        if underflow and overflow:
            raise IscsiUsageError("a residual is an underflow or an overflow, not both")
        self._window_slot_freed(task.immediate)
        return IscsiScsiResponse(
            underflow=bool(underflow),
            overflow=bool(overflow),
            response=response,
            status=status,
            itt=itt,
            statsn=self._next_statsn(),
            exp_cmdsn=self.exp_cmdsn,
            max_cmdsn=self.max_cmdsn,
            residual_count=underflow or overflow,
            sense=sense,
        )

    def respond_tmf(
        self,
        itt: int,
        response: int = IscsiTmfResponseCode.COMPLETE,
        *,
        aborted: Iterable[int] = (),
    ) -> IscsiTmfResponse:
        """The TMF Response for request ``itt`` (LIO
        ``iscsit_build_task_mgt_rsp``). ``aborted`` names the commands the
        function ended: they get no SCSI Response and their window slots
        are freed (a softrdma choice: the window never shrinks)."""
        task = self._take_task(itt)
        for a in aborted:
            gone = self._outstanding.pop(a, None)
            if gone is not None:
                self._window_slot_freed(gone.immediate)
        self._window_slot_freed(task.immediate)
        return IscsiTmfResponse(
            response=response,
            itt=itt,
            statsn=self._next_statsn(),
            exp_cmdsn=self.exp_cmdsn,
            max_cmdsn=self.max_cmdsn,
        )

    def ping(self, data: bytes = b"", *, lun: int = 0) -> IscsiNopIn:
        """A NOP-In asking the initiator for a NOP-Out (LIO's NopIn timer,
        ``iscsit_add_nopin`` with a response wanted): a fresh TTT, the
        reserved ITT, and the current StatSN, which it does not use up. The
        answer comes back as :class:`PingAnswered`."""
        if self.state is not IscsiTargetState.LOGGED_IN:
            raise IscsiUsageError(f"connection is {self.state.name}")
        while True:
            self._ttt = sn_add(self._ttt, 1)
            if self._ttt != ISCSI_RESERVED_TAG and self._ttt not in self._pings:
                break
        self._pings.add(self._ttt)
        return IscsiNopIn(
            lun=lun,
            itt=ISCSI_RESERVED_TAG,
            ttt=self._ttt,
            statsn=self.statsn,
            exp_cmdsn=self.exp_cmdsn,
            max_cmdsn=self.max_cmdsn,
            data=data,
        )

    def _tmf_rsp(self, itt: int, response: int) -> IscsiTmfResponse:
        return self.respond_tmf(itt, response)

    @property
    def outstanding(self) -> tuple[int, ...]:
        """ITTs of delivered commands and TMFs not answered yet."""
        return tuple(self._outstanding)


# --- initiator -----------------------------------------------------------------------------


class IscsiInitiatorState(enum.Enum):
    """An initiator connection's state (RFC 7143 §8.1.1)."""

    FREE = "S1"
    IN_LOGIN = "S4"
    LOGGED_IN = "S5"
    IN_LOGOUT = "S7"
    CLOSED = "closed"


@dataclass(slots=True)
class _Task:
    itt: int
    kind: Literal["cmd", "nop", "tmf", "logout", "text"]
    index: int


def libiscsi_itt(index: int) -> int:
    """The ITT libiscsi puts on the wire for task ``index``: the index in
    the host's (little-endian) byte order, read here as a big-endian
    number — task 1 is ``0x01000000``."""
    return int.from_bytes(index.to_bytes(4, "little"), "big")


class IscsiInitiatorConnection:
    """One leading connection on the initiator side (libiscsi's
    ``iscsi_conn`` + ``iscsi_session``, open-iscsi's login), sans-IO.

    ``negotiator`` makes the offer (default: :func:`linux_iser_initiator`
    built by the caller); ``isid`` the session's ISID; ``itt_pool`` the
    number of task slots (libiscsi's ``cmds_max`` plus management tasks),
    handed out first-in first-out by index; ``cmdsn`` the first CmdSN.

    :meth:`login` gives the first Login Request; :meth:`receive` each
    received PDU's bytes, returning the PDUs to send next and events, or
    raising :class:`IscsiLoginError` / :class:`IscsiLoginRedirect` (login
    refused) and :class:`IscsiSessionError` (the target broke the
    protocol: libiscsi would fail the connection). In full feature phase
    :meth:`send_command`, :meth:`nop_out`, :meth:`task_management` and
    :meth:`logout` build the PDUs, with ITT, CmdSN and ExpStatSN."""

    def __init__(
        self,
        negotiator: KeyNegotiator,
        *,
        isid: int = 0x00023D000001,
        tsih: int = 0,
        cid: int = 0,
        cmdsn: int = 0,
        itt_pool: int = 144,
    ) -> None:
        if negotiator.role != "initiator":
            raise ValueError("an initiator connection needs an initiator negotiator")
        self.negotiator = negotiator
        self.isid = isid
        self.tsih = tsih
        self.cid = cid
        self.cmdsn = cmdsn & _SN_MASK
        # libiscsi iscsi_session_setup: the window before any response
        # admits CmdSN and CmdSN + 1 (the login's own window is iscsid's).
        self.exp_cmdsn = sn_add(self.cmdsn, 1)
        self.max_cmdsn = sn_add(self.cmdsn, 1)
        self.exp_statsn = 0
        self.state = IscsiInitiatorState.FREE
        self.negotiated: IscsiNegotiated | None = None
        self._free = list(range(itt_pool))
        self._tasks: dict[int, _Task] = {}
        self._login_itt = 0
        self._login_index = 0

    def __repr__(self) -> str:
        return (
            f"<IscsiInitiatorConnection {self.state.name} cmdsn={self.cmdsn:#x} "
            f"window=[{self.exp_cmdsn:#x},{self.max_cmdsn:#x}]>"
        )

    # --- tasks

    def _alloc(self, kind: Literal["cmd", "nop", "tmf", "logout", "text"]) -> _Task:
        if not self._free:
            raise IscsiWindowClosed("no free task slot")
        index = self._free.pop(0)
        task = _Task(libiscsi_itt(index), kind, index)
        self._tasks[task.itt] = task
        return task

    def _release(self, itt: int) -> _Task:
        task = self._tasks.pop(itt)
        self._free.append(task.index)
        return task

    @property
    def outstanding(self) -> tuple[int, ...]:
        """ITTs of tasks awaiting their response."""
        return tuple(self._tasks)

    def window_open(self) -> bool:
        """Whether a non-immediate command may be sent now (CmdSN within
        MaxCmdSN)."""
        return _sn_le(self.cmdsn, self.max_cmdsn)

    def task_aborted(self, itt: int) -> None:
        """Free the ITT of a command a TMF took back (ABORT TASK, LOGICAL
        UNIT RESET answered "function complete": no response will come for
        it; libiscsi's ``iscsi_tmf_rsp`` + ``fail_scsi_task``)."""
        task = self._tasks.get(itt)
        if task is None or task.kind != "cmd":
            raise IscsiUsageError(f"no command with ITT {itt:#x}")
        self._release(itt)

    def _need(self, state: IscsiInitiatorState) -> None:
        if self.state is not state:
            raise IscsiUsageError(f"connection is {self.state.name}, not {state.name}")

    # --- login

    def login(self) -> IscsiLoginRequest:
        """The first Login Request: the operational stage straight to full
        feature phase with the negotiator's offer (open-iscsi with
        ``AuthMethod=None``: no security stage)."""
        self._need(IscsiInitiatorState.FREE)
        task = self._alloc("cmd")
        self._login_itt, self._login_index = task.itt, task.index
        self.state = IscsiInitiatorState.IN_LOGIN
        return self._login_req(encode_text(self.negotiator.step()))

    def _login_req(self, data: bytes) -> IscsiLoginRequest:
        return IscsiLoginRequest(
            transit=True,
            csg=_OPERATIONAL,
            nsg=_FFP,
            isid=self.isid,
            tsih=self.tsih,
            itt=self._login_itt,
            cid=self.cid,
            cmdsn=self.cmdsn,
            exp_statsn=self.exp_statsn,
            data=data,
        )

    def _on_login_rsp(self, rsp: IscsiLoginResponse) -> IscsiStep:
        if rsp.itt != self._login_itt:
            raise IscsiSessionError(f"Login Response for ITT {rsp.itt:#x}")
        cls_, detail = int(rsp.status_class), rsp.status_detail
        if cls_ != IscsiLoginStatusClass.SUCCESS:
            self.state = IscsiInitiatorState.CLOSED
            self._release(self._login_itt)
            if cls_ == IscsiLoginStatusClass.REDIRECT:
                try:
                    address = dict(decode_text(rsp.data)).get("TargetAddress", "")
                except IscsiError:
                    address = ""
                raise IscsiLoginRedirect(f"redirected to {address!r}", detail, address)
            raise IscsiLoginError(f"login refused: status {cls_:#04x}{detail:02x}", cls_, detail)
        if rsp.isid != self.isid:
            raise IscsiSessionError("Login Response for another ISID")
        if rsp.active_version != _ISCSI_VERSION:
            raise IscsiSessionError(f"active version {rsp.active_version}")
        self.exp_statsn = sn_add(rsp.statsn, 1)
        self._update_window(rsp.exp_cmdsn, rsp.max_cmdsn)
        try:
            answer = self.negotiator.step(decode_text(rsp.data))
        except IscsiError as e:
            raise IscsiSessionError(f"login keys: {e}") from None
        if not (rsp.transit and rsp.nsg == _FFP):
            # The target wants another round (or more text): answer it.
            return IscsiStep([self._login_req(encode_text(answer))])
        if answer:
            raise IscsiSessionError(f"keys left to answer after the last response: {answer}")
        try:
            self.negotiated = self.negotiator.finish()
        except IscsiError as e:
            raise IscsiSessionError(f"login keys: {e}") from None
        self.tsih = rsp.tsih
        self.state = IscsiInitiatorState.LOGGED_IN
        self._release(self._login_itt)
        values = self.negotiator.declared
        return IscsiStep(
            events=[
                LoginCompleted(
                    rsp.tsih,
                    self.isid,
                    values.get("InitiatorName", ""),
                    values.get("TargetName"),
                    values.get("SessionType", "Normal"),
                    self.negotiated,
                )
            ]
        )

    # --- numbering

    def _update_window(self, exp_cmdsn: int, max_cmdsn: int) -> None:
        """libiscsi ``iscsi_update_cmdsn``: ignore a window that is
        inverted (MaxCmdSN < ExpCmdSN - 1) or older than ours."""
        if sn_lt(max_cmdsn, sn_add(exp_cmdsn, -1)):
            return
        if sn_lt(self.exp_cmdsn, exp_cmdsn):
            self.exp_cmdsn = exp_cmdsn
        if sn_lt(self.max_cmdsn, max_cmdsn):
            self.max_cmdsn = max_cmdsn

    def _status(self, statsn: int, exp_cmdsn: int, max_cmdsn: int) -> None:
        self.exp_statsn = sn_add(statsn, 1)
        self._update_window(exp_cmdsn, max_cmdsn)

    # --- full feature phase: what we send

    def send_command(
        self,
        cdb: bytes,
        *,
        lun: int = 0,
        read_length: int = 0,
        write_data: bytes = b"",
        write_length: int | None = None,
        attr: int = IscsiTaskAttr.SIMPLE,
    ) -> IscsiScsiCommand:
        """A SCSI Command (libiscsi ``iscsi_prep_scsi_cmd_pdu`` with
        ib_iser's immediate data): a read of ``read_length`` bytes, or a
        write of ``write_length`` bytes (default ``len(write_data)``) whose
        first bytes travel as immediate data — as much as
        ``ImmediateData``, ``FirstBurstLength`` and
        ``TargetRecvDataSegmentLength`` allow; the caller RDMA-exposes the
        rest. Raises :class:`IscsiWindowClosed` outside the CmdSN window."""
        self._need(IscsiInitiatorState.LOGGED_IN)
        if len(cdb) > 16:
            raise IscsiUsageError("CDBs above 16 bytes are not supported")
        if read_length and (write_data or write_length):
            raise IscsiUsageError("bidirectional commands are not supported")
        if not self.window_open():
            raise IscsiWindowClosed(f"CmdSN {self.cmdsn:#x} beyond MaxCmdSN {self.max_cmdsn:#x}")
        length = write_length if write_length is not None else len(write_data)
        imm = b""
        neg = self.negotiated
        assert neg is not None
        if length and neg.immediate_data:
            cap = min(neg.first_burst_length, neg.target_recv_data_segment_length, length)
            imm = write_data[:cap]
        task = self._alloc("cmd")
        pdu = IscsiScsiCommand(
            final=True,
            read=bool(read_length),
            write=bool(length),
            attr=attr,
            lun=lun,
            itt=task.itt,
            data_length=read_length or length,
            cmdsn=self.cmdsn,
            exp_statsn=self.exp_statsn,
            cdb=cdb.ljust(16, b"\0"),
            data=imm,
        )
        self.cmdsn = sn_add(self.cmdsn, 1)
        return pdu

    def text(self, pairs: Iterable[tuple[str, str]]) -> IscsiText:
        """A Text Request, e.g. ``[("SendTargets", "All")]`` in a discovery
        session (open-iscsi's ``iscsi_make_text_pdu``): non-immediate, so it
        needs the window like a command."""
        self._need(IscsiInitiatorState.LOGGED_IN)
        if not self.window_open():
            raise IscsiWindowClosed(f"CmdSN {self.cmdsn:#x} beyond MaxCmdSN {self.max_cmdsn:#x}")
        task = self._alloc("text")
        pdu = IscsiText(
            itt=task.itt, cmdsn=self.cmdsn, exp_statsn=self.exp_statsn, data=encode_text(pairs)
        )
        self.cmdsn = sn_add(self.cmdsn, 1)
        return pdu

    def nop_out(self, data: bytes = b"") -> IscsiNopOut:
        """An immediate NOP-Out ping (libiscsi ``iscsi_send_nopout``)."""
        self._need(IscsiInitiatorState.LOGGED_IN)
        task = self._alloc("nop")
        return IscsiNopOut(
            immediate=True, itt=task.itt, cmdsn=self.cmdsn, exp_statsn=self.exp_statsn, data=data
        )

    def task_management(
        self,
        function: IscsiTmfFunc,
        *,
        lun: int = 0,
        rtt: int = ISCSI_RESERVED_TAG,
        refcmdsn: int = 0,
    ) -> IscsiTmfRequest:
        """An immediate TMF Request (libiscsi ``iscsi_exec_task_mgmt_fn``)."""
        self._need(IscsiInitiatorState.LOGGED_IN)
        task = self._alloc("tmf")
        return IscsiTmfRequest(
            function=function,
            lun=lun,
            itt=task.itt,
            rtt=rtt,
            cmdsn=self.cmdsn,
            exp_statsn=self.exp_statsn,
            refcmdsn=refcmdsn,
        )

    def logout(
        self, reason: IscsiLogoutReason = IscsiLogoutReason.CLOSE_SESSION
    ) -> IscsiLogoutRequest:
        """An immediate Logout Request (open-iscsi / libiscsi logout task)."""
        self._need(IscsiInitiatorState.LOGGED_IN)
        task = self._alloc("logout")
        self.state = IscsiInitiatorState.IN_LOGOUT
        return IscsiLogoutRequest(
            immediate=True,
            reason=reason,
            itt=task.itt,
            cid=self.cid,
            cmdsn=self.cmdsn,
            exp_statsn=self.exp_statsn,
        )

    # --- full feature phase: what we receive

    def receive(self, data: BytesLike) -> IscsiStep:
        """Process one received PDU (libiscsi ``iscsi_complete_pdu``)."""
        if self.state in (IscsiInitiatorState.FREE, IscsiInitiatorState.CLOSED):
            raise IscsiSessionError(f"PDU on a {self.state.name} connection")
        try:
            pdu = decode_iscsi_pdu(data)
        except IscsiError as e:
            raise IscsiSessionError(f"malformed PDU: {e}") from None
        if self.state is IscsiInitiatorState.IN_LOGIN:
            if not isinstance(pdu, IscsiLoginResponse):
                raise IscsiSessionError(f"{type(pdu).__name__} during login")
            return self._on_login_rsp(pdu)
        if isinstance(pdu, IscsiScsiResponse):
            task = self._task(pdu.itt, "cmd")
            self._status(pdu.statsn, pdu.exp_cmdsn, pdu.max_cmdsn)
            self._release(task.itt)
            done = CommandCompleted(
                pdu.itt,
                pdu.response,
                pdu.status,
                pdu.sense,
                pdu.residual_count,
                pdu.underflow,
                pdu.overflow,
            )
            return IscsiStep(events=[done])
        if isinstance(pdu, IscsiNopIn):
            if pdu.itt == ISCSI_RESERVED_TAG:
                # The target's ping: answer with its TTT, no StatSN taken.
                self._update_window(pdu.exp_cmdsn, pdu.max_cmdsn)
                if pdu.ttt == ISCSI_RESERVED_TAG:
                    return IscsiStep()
                reply = IscsiNopOut(
                    immediate=True,
                    lun=pdu.lun,
                    ttt=pdu.ttt,
                    cmdsn=self.cmdsn,
                    exp_statsn=self.exp_statsn,
                    data=pdu.data,
                )
                return IscsiStep([reply])
            task = self._task(pdu.itt, "nop")
            self._status(pdu.statsn, pdu.exp_cmdsn, pdu.max_cmdsn)
            self._release(task.itt)
            return IscsiStep(events=[NopInReceived(pdu.itt, pdu.data)])
        if isinstance(pdu, IscsiTmfResponse):
            task = self._task(pdu.itt, "tmf")
            self._status(pdu.statsn, pdu.exp_cmdsn, pdu.max_cmdsn)
            self._release(task.itt)
            return IscsiStep(events=[TmfCompleted(pdu.itt, pdu.response)])
        if isinstance(pdu, IscsiLogoutResponse):
            task = self._task(pdu.itt, "logout")
            self._status(pdu.statsn, pdu.exp_cmdsn, pdu.max_cmdsn)
            self._release(task.itt)
            if pdu.response == IscsiLogoutResponseCode.SUCCESS:
                self.state = IscsiInitiatorState.CLOSED
            else:
                self.state = IscsiInitiatorState.LOGGED_IN
            return IscsiStep(events=[LoggedOut(pdu.itt, pdu.response, pdu.t2wait, pdu.t2retain)])
        if isinstance(pdu, IscsiTextResponse):
            task = self._task(pdu.itt, "text")
            self._status(pdu.statsn, pdu.exp_cmdsn, pdu.max_cmdsn)
            self._release(task.itt)
            if pdu.cont or not pdu.final:
                raise IscsiSessionError("multi-PDU Text Responses are not supported")
            try:
                pairs = tuple(decode_text(pdu.data))
            except IscsiError as e:
                raise IscsiSessionError(f"Text Response: {e}") from None
            return IscsiStep(events=[TextResponseReceived(pdu.itt, pairs)])
        if isinstance(pdu, IscsiReject):
            self._status(pdu.statsn, pdu.exp_cmdsn, pdu.max_cmdsn)
            itt: int | None = None
            if len(pdu.data) >= ISCSI_HDR_LEN:
                rejected = IscsiBhs.decode(pdu.data).itt
                if rejected in self._tasks:
                    itt = rejected
                    task = self._release(rejected)
                    if task.kind == "logout":
                        self.state = IscsiInitiatorState.LOGGED_IN
            return IscsiStep(events=[TaskRejected(itt, pdu.reason)])
        raise IscsiSessionError(f"unexpected {type(pdu).__name__} in full feature phase")

    def _task(self, itt: int, kind: str) -> _Task:
        task = self._tasks.get(itt)
        if task is None or task.kind != kind:
            raise IscsiSessionError(f"response for ITT {itt:#x}: no such {kind} task")
        return task
