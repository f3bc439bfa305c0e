"""iSCSI login key negotiation, sans-IO.

RFC 7143 §6 (negotiation rules) and §13 (the keys), RFC 7145 §6 (the iSER
keys); kernel counterparts: LIO's ``iscsi_target_parameters.c``
(``iscsi_decode_text_input``, ``iscsi_check_acceptor_state``,
``iscsi_encode_text_output``) and open-iscsi's ``usr/login.c`` on the
initiator side.

One :class:`KeyNegotiator` per connection login plays both roles, as the
RFC's negotiation is symmetric: it *proposes* its own keys (an initiator's
offer, a target's declarations or counter-offers) and *answers* the
peer's. :meth:`KeyNegotiator.step` takes the pairs of one received Login or
Text PDU and returns the pairs to send back; :meth:`KeyNegotiator.finish`
checks that every proposal was answered and returns the negotiated values.

How a key is answered (RFC 7143 §6.2, §13):

* a key this side does not know: ``NotUnderstood``;
* a known key with a value outside its syntax or range, a list with no
  acceptable value, a key the peer may not send: ``Reject``;
* a key that other keys make meaningless (session keys of a Discovery
  session, the iSER keys without ``RDMAExtensions=Yes``,
  ``MaxRecvDataSegmentLength`` with it, ``FirstBurstLength`` with
  ``InitialR2T=Yes`` and ``ImmediateData=No``, a leading-only key on a
  non-leading connection): ``Irrelevant``;
* Boolean keys: the AND / OR of both values; numerical keys: minimum or
  maximum (``InitiatorRecvDataSegmentLength`` and
  ``TargetRecvDataSegmentLength`` too, as RFC 7145 negotiates them — LIO
  echoes the offer instead, which agrees whenever the offer is not above
  its own value); list keys: the first offered value this side supports;
  declarative keys (the names, aliases, ``TargetPortalGroupTag``,
  ``MaxRecvDataSegmentLength``, ``MaxOutstandingUnexpectedPDUs``): no
  answer, the value recorded as the peer's;
* the obsolete marker keys: ``IFMarker`` / ``OFMarker`` get ``No`` (the
  answer RFC 7143 §13 allows for these obsoleted keys and LIO gives), ``IFMarkInt`` /
  ``OFMarkInt`` get ``Reject``;
* ``HeaderDigest`` / ``DataDigest`` under ``RDMAExtensions=Yes``: ``None``,
  the only value RFC 7145 §6 leaves them;
* the answers RFC 7143 §6.2.2 makes optional (an OR key offered ``Yes``,
  an AND key offered ``No``) are left out, as LIO does, unless
  ``omit_optional_answers=False``.

A key offered twice in one login, a reserved answer value (``Reject``,
``Irrelevant``, ``NotUnderstood``) offered as a value, an answer outside
what was offered, a missing answer, or a missing ``InitiatorName`` /
``TargetName`` raise :class:`IscsiNegotiationError`, carrying the login
status class and detail a target answers with.

:func:`lio_iser_target` and :func:`linux_iser_initiator` build the two
negotiators of the Linux iSER session in ``captures/iser_login.pcap``:
LIO's defaults and output order, and open-iscsi's offer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from softrdma.ulp.iscsi.proto import (
    IscsiError,
    IscsiLoginStage,
    IscsiLoginStatusClass,
    IscsiLoginStatusDetail,
)
from softrdma.ulp.iscsi.text import TextPairs

__all__ = [
    "IRRELEVANT",
    "ISCSI_KEYS",
    "LINUX_ISER_OFFER",
    "LIO_KEY_ORDER",
    "NOT_UNDERSTOOD",
    "REJECT",
    "IscsiKey",
    "IscsiKeyKind",
    "IscsiKeyUse",
    "IscsiNegotiated",
    "IscsiNegotiationError",
    "KeyNegotiator",
    "KeySender",
    "linux_iser_initiator",
    "lio_iser_target",
]

REJECT: Final = "Reject"
IRRELEVANT: Final = "Irrelevant"
NOT_UNDERSTOOD: Final = "NotUnderstood"
_RESERVED_VALUES: Final = frozenset({REJECT, IRRELEVANT, NOT_UNDERSTOOD})


class IscsiNegotiationError(IscsiError):
    """The login cannot go on: a protocol error in the keys. ``status_class``
    and ``status_detail`` are what a target puts in its Login Response
    (RFC 7143 §11.13)."""

    def __init__(
        self,
        message: str,
        status_class: IscsiLoginStatusClass = IscsiLoginStatusClass.INITIATOR_ERR,
        status_detail: int = IscsiLoginStatusDetail.INIT_ERR,
    ) -> None:
        super().__init__(message)
        self.status_class = status_class
        self.status_detail = status_detail


class IscsiKeyKind(enum.Enum):
    """How a key's value is negotiated (RFC 7143 §6.2; LIO's ``TYPE_*``)."""

    BOOL_AND = "and"
    BOOL_OR = "or"
    NUM_MIN = "min"
    NUM_MAX = "max"
    LIST = "list"
    DECLARATIVE = "declarative"  # a string, or a number when lo/hi are set
    OBSOLETE_BOOL = "obsolete-bool"  # IFMarker / OFMarker
    OBSOLETE = "obsolete"  # IFMarkInt / OFMarkInt


class IscsiKeyUse(enum.Enum):
    """When a key may be sent (RFC 7143 §13: LO, IO, ALL)."""

    LEADING_ONLY = "LO"
    INITIAL_ONLY = "IO"
    ALL = "ALL"


class KeySender(enum.Flag):
    """Who may send a key (RFC 7143 §13 "Senders")."""

    INITIATOR = 1
    TARGET = 2
    BOTH = 3


@dataclass(frozen=True, slots=True)
class IscsiKey:
    """One login key's definition: ``kind``, RFC default, numerical range
    ``lo`` .. ``hi`` (``zero_ok``: 0 is also legal, meaning "no limit"),
    legal ``values`` for list and string-choice keys, ``use``, ``senders``,
    ``security`` (negotiated in the security stage), and what makes it
    irrelevant (``discovery_irrelevant``; ``iser``: ``True`` for the keys
    that need ``RDMAExtensions=Yes``, ``False`` for those it replaces)."""

    name: str
    kind: IscsiKeyKind
    default: str | None
    lo: int = 0
    hi: int = 0
    values: tuple[str, ...] = ()
    use: IscsiKeyUse = IscsiKeyUse.LEADING_ONLY
    senders: KeySender = KeySender.BOTH
    security: bool = False
    discovery_irrelevant: bool = False
    iser: bool | None = None
    zero_ok: bool = False

    @property
    def numerical(self) -> bool:
        """Whether values are numbers (checked against ``lo`` .. ``hi``)."""
        return self.hi > 0


_NUM_MAX_DSL: Final = (1 << 24) - 1
_K = IscsiKeyKind
_U = IscsiKeyUse
_S = KeySender


def _keys(*keys: IscsiKey) -> dict[str, IscsiKey]:
    return {k.name: k for k in keys}


ISCSI_KEYS: Final[Mapping[str, IscsiKey]] = _keys(
    IscsiKey(
        "AuthMethod",
        _K.LIST,
        "None",
        values=("KRB5", "SRP", "CHAP", "None"),
        use=_U.INITIAL_ONLY,
        security=True,
    ),
    IscsiKey(
        "HeaderDigest", _K.LIST, "None", values=("None", "CRC32C"), use=_U.INITIAL_ONLY, iser=False
    ),
    IscsiKey(
        "DataDigest", _K.LIST, "None", values=("None", "CRC32C"), use=_U.INITIAL_ONLY, iser=False
    ),
    IscsiKey("MaxConnections", _K.NUM_MIN, "1", 1, 65535, discovery_irrelevant=True),
    IscsiKey("TargetName", _K.DECLARATIVE, None, use=_U.INITIAL_ONLY),
    IscsiKey("InitiatorName", _K.DECLARATIVE, None, use=_U.INITIAL_ONLY, senders=_S.INITIATOR),
    IscsiKey("TargetAlias", _K.DECLARATIVE, None, use=_U.ALL, senders=_S.TARGET),
    IscsiKey("InitiatorAlias", _K.DECLARATIVE, None, use=_U.ALL, senders=_S.INITIATOR),
    IscsiKey(
        "TargetPortalGroupTag",
        _K.DECLARATIVE,
        None,
        0,
        65535,
        use=_U.INITIAL_ONLY,
        senders=_S.TARGET,
    ),
    IscsiKey("InitialR2T", _K.BOOL_OR, "Yes", discovery_irrelevant=True),
    IscsiKey("ImmediateData", _K.BOOL_AND, "Yes", discovery_irrelevant=True),
    IscsiKey(
        "MaxRecvDataSegmentLength",
        _K.DECLARATIVE,
        "8192",
        512,
        _NUM_MAX_DSL,
        use=_U.ALL,
        iser=False,
    ),
    IscsiKey("MaxBurstLength", _K.NUM_MIN, "262144", 512, _NUM_MAX_DSL, discovery_irrelevant=True),
    IscsiKey("FirstBurstLength", _K.NUM_MIN, "65536", 512, _NUM_MAX_DSL, discovery_irrelevant=True),
    IscsiKey("DefaultTime2Wait", _K.NUM_MAX, "2", 0, 3600),
    IscsiKey("DefaultTime2Retain", _K.NUM_MIN, "20", 0, 3600),
    IscsiKey("MaxOutstandingR2T", _K.NUM_MIN, "1", 1, 65535, discovery_irrelevant=True),
    IscsiKey("DataPDUInOrder", _K.BOOL_OR, "Yes", discovery_irrelevant=True),
    IscsiKey("DataSequenceInOrder", _K.BOOL_OR, "Yes", discovery_irrelevant=True),
    IscsiKey("ErrorRecoveryLevel", _K.NUM_MIN, "0", 0, 2),
    IscsiKey(
        "SessionType",
        _K.DECLARATIVE,
        "Normal",
        values=("Discovery", "Normal"),
        senders=_S.INITIATOR,
    ),
    IscsiKey("IFMarker", _K.OBSOLETE_BOOL, "No", use=_U.INITIAL_ONLY),
    IscsiKey("OFMarker", _K.OBSOLETE_BOOL, "No", use=_U.INITIAL_ONLY),
    IscsiKey("IFMarkInt", _K.OBSOLETE, None, use=_U.INITIAL_ONLY),
    IscsiKey("OFMarkInt", _K.OBSOLETE, None, use=_U.INITIAL_ONLY),
    IscsiKey("RDMAExtensions", _K.BOOL_AND, "No", discovery_irrelevant=True),
    IscsiKey(
        "InitiatorRecvDataSegmentLength",
        _K.NUM_MIN,
        "8192",
        512,
        _NUM_MAX_DSL,
        use=_U.INITIAL_ONLY,
        iser=True,
    ),
    IscsiKey(
        "TargetRecvDataSegmentLength",
        _K.NUM_MIN,
        "8192",
        512,
        _NUM_MAX_DSL,
        use=_U.INITIAL_ONLY,
        iser=True,
    ),
    IscsiKey(
        "MaxOutstandingUnexpectedPDUs",
        _K.DECLARATIVE,
        "0",
        2,
        (1 << 32) - 1,
        iser=True,
        zero_ok=True,
    ),
)
"""Every key the negotiator understands, by name (RFC 7143 §13, RFC 7145
§6)."""

LIO_KEY_ORDER: Final[tuple[str, ...]] = (
    "AuthMethod",
    "HeaderDigest",
    "DataDigest",
    "MaxConnections",
    "SendTargets",
    "TargetName",
    "InitiatorName",
    "TargetAlias",
    "InitiatorAlias",
    "TargetAddress",
    "TargetPortalGroupTag",
    "InitialR2T",
    "ImmediateData",
    "MaxXmitDataSegmentLength",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "SessionType",
    "IFMarker",
    "OFMarker",
    "IFMarkInt",
    "OFMarkInt",
    "RDMAExtensions",
    "InitiatorRecvDataSegmentLength",
    "TargetRecvDataSegmentLength",
)
"""The order LIO writes its keys in (``iscsi_create_default_params``'s
list, which ``iscsi_encode_text_output`` walks)."""

LINUX_ISER_OFFER: Final[tuple[tuple[str, str], ...]] = (
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("ErrorRecoveryLevel", "0"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "16776192"),
    ("FirstBurstLength", "262144"),
    ("MaxOutstandingR2T", "1"),
    ("MaxConnections", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("InitiatorRecvDataSegmentLength", "262144"),
    ("TargetRecvDataSegmentLength", "8192"),
    ("RDMAExtensions", "Yes"),
)
"""open-iscsi 2.1's operational offer on an iSER interface, in its order,
after the declarations InitiatorName, InitiatorAlias, TargetName,
SessionType (``usr/login.c`` defaults; no digests, no
MaxRecvDataSegmentLength)."""

# LIO's iSER defaults (iscsi_target_parameters.h INITIAL_*, with isert's
# RDMAExtensions=Yes) and the keys it proposes itself in the operational
# stage (iscsi_set_keys_to_negotiate with iser=true).
_LIO_DEFAULTS: Final[Mapping[str, str]] = {
    "AuthMethod": "None",
    "HeaderDigest": "CRC32C,None",
    "DataDigest": "CRC32C,None",
    "MaxConnections": "1",
    "InitialR2T": "Yes",
    "ImmediateData": "Yes",
    "MaxRecvDataSegmentLength": "8192",
    "MaxBurstLength": "262144",
    "FirstBurstLength": "65536",
    "DefaultTime2Wait": "2",
    "DefaultTime2Retain": "20",
    "MaxOutstandingR2T": "1",
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
    "ErrorRecoveryLevel": "0",
    "IFMarker": "No",
    "OFMarker": "No",
    "RDMAExtensions": "Yes",
    "InitiatorRecvDataSegmentLength": "262144",
    "TargetRecvDataSegmentLength": "8192",
}
_LIO_ISER_PROPOSALS: Final[tuple[str, ...]] = (
    "MaxConnections",
    "TargetAlias",
    "TargetPortalGroupTag",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "RDMAExtensions",
    "InitiatorRecvDataSegmentLength",
    "TargetRecvDataSegmentLength",
)


def _parse_number(value: str) -> int | None:
    """An RFC 7143 §6.1 numerical value (decimal, or hex with 0x), or None."""
    if value.startswith(("0x", "0X")):
        digits = value[2:]
        if digits and all(c in "0123456789abcdefABCDEF" for c in digits) and len(digits) <= 16:
            return int(digits, 16)
        return None
    if value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    return None


@dataclass(frozen=True, slots=True)
class IscsiNegotiated:
    """The operational values a login settled on (LIO's ``iscsi_sess_ops``
    and ``iscsi_conn_ops``; libiscsi's session and connection params),
    RFC defaults where nothing was negotiated: ``values`` holds the
    negotiated results and the peer's declarations (its names, alias,
    MaxRecvDataSegmentLength …), ``declared`` this side's own."""

    values: Mapping[str, str]
    declared: Mapping[str, str] = field(default_factory=dict)

    def _num(self, name: str) -> int:
        raw = self.values.get(name, ISCSI_KEYS[name].default)
        return _parse_number(raw or "0") or 0

    def _bool(self, name: str) -> bool:
        return self.values.get(name, ISCSI_KEYS[name].default) == "Yes"

    @property
    def rdma_extensions(self) -> bool:
        """``RDMAExtensions``: iSER is in use."""
        return self._bool("RDMAExtensions")

    @property
    def initial_r2t(self) -> bool:
        """``InitialR2T``."""
        return self._bool("InitialR2T")

    @property
    def immediate_data(self) -> bool:
        """``ImmediateData``."""
        return self._bool("ImmediateData")

    @property
    def max_burst_length(self) -> int:
        """``MaxBurstLength``."""
        return self._num("MaxBurstLength")

    @property
    def first_burst_length(self) -> int:
        """``FirstBurstLength``."""
        return self._num("FirstBurstLength")

    @property
    def initiator_recv_data_segment_length(self) -> int:
        """``InitiatorRecvDataSegmentLength`` (iSER)."""
        return self._num("InitiatorRecvDataSegmentLength")

    @property
    def target_recv_data_segment_length(self) -> int:
        """``TargetRecvDataSegmentLength`` (iSER): the largest data segment
        the initiator may send, immediate data included."""
        return self._num("TargetRecvDataSegmentLength")

    @property
    def max_connections(self) -> int:
        """``MaxConnections``."""
        return self._num("MaxConnections")

    @property
    def error_recovery_level(self) -> int:
        """``ErrorRecoveryLevel``."""
        return self._num("ErrorRecoveryLevel")

    @property
    def max_outstanding_unexpected_pdus(self) -> int:
        """The peer's declared ``MaxOutstandingUnexpectedPDUs`` (iSER): how
        many unexpected control PDUs this side may have outstanding towards
        it (0: no limit)."""
        return self._num("MaxOutstandingUnexpectedPDUs")


class _State(enum.Enum):
    PROPOSED = "proposed"  # we sent it, awaiting an answer (or none needed)
    ANSWERED = "answered"  # the peer answered our proposal
    ACCEPTED = "accepted"  # the peer offered it and we answered (or need not)


class KeyNegotiator:
    """Both sides of one connection's key negotiation (LIO's
    ``iscsi_param_list`` with its ``PSTATE_*`` flags; open-iscsi's login
    text handling), sans-IO.

    ``role`` is ``"initiator"`` or ``"target"``; ``local`` the values this
    side supports or prefers (for list keys, a comma-separated list in
    preference order); ``propose`` the keys it sends on its own, in the
    operational or security stage they belong to; ``order`` the order it
    writes keys in (default: ``propose`` order, then the peer's); ``leading``
    whether this is the session's first connection (TSIH 0)."""

    def __init__(
        self,
        role: Literal["initiator", "target"],
        local: Mapping[str, str],
        propose: Sequence[str] = (),
        *,
        order: Sequence[str] | None = None,
        leading: bool = True,
        omit_optional_answers: bool = True,
    ) -> None:
        if role not in ("initiator", "target"):
            raise ValueError(f"role {role!r}: 'initiator' or 'target'")
        self.role = role
        self._me = KeySender.INITIATOR if role == "initiator" else KeySender.TARGET
        self.local = dict(local)
        self.propose = tuple(propose)
        for name in self.propose:
            if name not in ISCSI_KEYS:
                raise ValueError(f"cannot propose unknown key {name!r}")
            if name not in self.local:
                raise ValueError(f"no local value for proposed key {name!r}")
        self.order = tuple(order) if order is not None else self.propose
        self.leading = leading
        self.omit_optional_answers = omit_optional_answers
        self.values: dict[str, str] = {}  # negotiated values and the peer's declarations
        self.declared: dict[str, str] = {}  # this side's own declarations
        self._state: dict[str, _State] = {}
        self._sent: dict[str, str] = {}  # our proposals' values

    # --- context

    def _current(self, name: str) -> str | None:
        if name in self.values:
            return self.values[name]
        return self.local.get(name, ISCSI_KEYS[name].default)

    def _discovery(self) -> bool:
        return self._current("SessionType") == "Discovery"

    def _rdma(self) -> bool:
        return not self._discovery() and self._current("RDMAExtensions") == "Yes"

    # --- answering an offer

    def _valid(self, key: IscsiKey, value: str) -> bool:
        if key.kind in (_K.BOOL_AND, _K.BOOL_OR, _K.OBSOLETE_BOOL):
            return value in ("Yes", "No")
        if key.numerical:
            n = _parse_number(value)
            return n is not None and (key.lo <= n <= key.hi or (key.zero_ok and n == 0))
        if key.kind is _K.LIST:
            return all(v for v in value.split(","))
        if key.values:
            return value in key.values
        return value != ""

    def _irrelevant(self, key: IscsiKey) -> bool:
        if key.discovery_irrelevant and self._discovery():
            return True
        if key.iser is True and not self._rdma():
            return True
        if key.name == "MaxRecvDataSegmentLength" and self._rdma():
            return True
        if key.use is _U.LEADING_ONLY and not self.leading and not key.security:
            return True
        if key.name == "FirstBurstLength":
            return self._current("InitialR2T") == "Yes" and self._current("ImmediateData") == "No"
        return False

    def _answer(self, key: IscsiKey, offered: str) -> str | None:
        """The answer to ``key=offered`` (None: no answer is sent), with the
        negotiated value recorded."""
        if key.kind is _K.OBSOLETE:
            return REJECT
        if not (key.senders & self._peer()):
            return REJECT
        if not self._valid(key, offered):
            if key.kind is _K.DECLARATIVE and key.name == "SessionType":
                raise IscsiNegotiationError(
                    f"SessionType={offered}", status_detail=IscsiLoginStatusDetail.NO_SESSION_TYPE
                )
            return REJECT
        if key.kind is _K.DECLARATIVE:
            self.values[key.name] = offered
            return IRRELEVANT if self._irrelevant(key) else None
        if self._irrelevant(key):
            return IRRELEVANT
        mine = self.local.get(key.name, key.default)
        if key.kind is _K.OBSOLETE_BOOL:
            self.values[key.name] = "No"
            return "No"
        if key.kind in (_K.BOOL_AND, _K.BOOL_OR):
            yes = (offered == "Yes", mine == "Yes")
            result = all(yes) if key.kind is _K.BOOL_AND else any(yes)
            value = "Yes" if result else "No"
            self.values[key.name] = value
            optional = (key.kind is _K.BOOL_AND and offered == "No") or (
                key.kind is _K.BOOL_OR and offered == "Yes"
            )
            return None if optional and self.omit_optional_answers else value
        if key.kind is _K.LIST:
            if key.iser is False and self._rdma():
                supported: tuple[str, ...] = ("None",)
            else:
                supported = tuple((mine or "").split(","))
            for choice in offered.split(","):
                if choice in supported and choice in key.values:
                    self.values[key.name] = choice
                    return choice
            return REJECT
        n = _parse_number(offered)
        m = _parse_number(mine or "")
        assert n is not None
        if m is None:
            m = n
        result_n = max(n, m) if key.kind is _K.NUM_MAX else min(n, m)
        if key.name == "FirstBurstLength":
            mbl = _parse_number(self._current("MaxBurstLength") or "")
            if mbl is not None:
                result_n = min(result_n, mbl)
        self.values[key.name] = str(result_n)
        return str(result_n)

    def _peer(self) -> KeySender:
        return KeySender.TARGET if self._me is KeySender.INITIATOR else KeySender.INITIATOR

    # --- checking an answer to our proposal

    def _take_answer(self, key: IscsiKey, answer: str) -> None:
        sent = self._sent[key.name]
        self._state[key.name] = _State.ANSWERED
        if answer in (REJECT, IRRELEVANT):
            self.values.pop(key.name, None)  # back to the default
            return
        if answer == NOT_UNDERSTOOD:
            raise IscsiNegotiationError(f"{key.name}: a standard key answered NotUnderstood")
        if not self._valid(key, answer):
            raise IscsiNegotiationError(f"{key.name}={answer}: not a legal answer")
        ok = True
        if key.kind is _K.BOOL_AND:
            ok = sent == "Yes" or answer == "No"
        elif key.kind is _K.BOOL_OR:
            ok = sent == "No" or answer == "Yes"
        elif key.kind is _K.OBSOLETE_BOOL:
            ok = answer == "No" or sent == "Yes"
        elif key.kind is _K.LIST:
            ok = answer in sent.split(",")
        elif key.kind in (_K.NUM_MIN, _K.NUM_MAX):
            a, s = _parse_number(answer), _parse_number(sent)
            assert a is not None and s is not None
            ok = a <= s if key.kind is _K.NUM_MIN else a >= s
        if not ok:
            raise IscsiNegotiationError(f"{key.name}={answer}: not a result of offering {sent}")
        self.values[key.name] = answer

    # --- one exchange

    def step(
        self,
        received: Iterable[tuple[str, str]] = (),
        stage: IscsiLoginStage = IscsiLoginStage.OP_PARMS_NEGOTIATION,
    ) -> TextPairs:
        """Process the pairs of one received PDU and return the pairs to
        send in this side's next PDU: answers to the peer's offers and this
        side's own proposals for ``stage`` not sent yet."""
        pairs = list(received)
        answers: dict[str, str | None] = {}
        extras: TextPairs = []
        seen: set[str] = set()
        for name, _value in pairs:
            if name in seen:
                raise IscsiNegotiationError(f"key {name} sent twice in one PDU")
            seen.add(name)
        # Keys others depend on first, so that "Irrelevant" is judged on results.
        first = ("SessionType", "RDMAExtensions", "MaxBurstLength", "InitialR2T", "ImmediateData")
        ranked = sorted(pairs, key=lambda p: first.index(p[0]) if p[0] in first else len(first))
        for name, value in ranked:
            key = ISCSI_KEYS.get(name)
            if key is None:
                extras.append((name, NOT_UNDERSTOOD))
                continue
            state = self._state.get(name)
            if state is _State.PROPOSED and key.kind is not _K.DECLARATIVE:
                self._take_answer(key, value)
                continue
            if state is _State.ACCEPTED or state is _State.ANSWERED:
                raise IscsiNegotiationError(f"key {name} negotiated twice in one login")
            # Otherwise a new offer, or the peer's own declaration of a key
            # this side declared too (both sides may send TargetName).
            if value in _RESERVED_VALUES:
                raise IscsiNegotiationError(f"{name}={value}: an answer value offered as a value")
            if key.security and stage is not IscsiLoginStage.SECURITY_NEGOTIATION:
                raise IscsiNegotiationError(f"{name} outside the security stage")
            self._state[name] = _State.ACCEPTED
            answers[name] = self._answer(key, value)
        out: TextPairs = []
        offered_order = [n for n, _ in pairs]
        for name in list(self.order) + [n for n in offered_order if n not in self.order]:
            if name in answers:
                ans = answers.pop(name)
                if ans is not None:
                    out.append((name, ans))
            if name in self.propose and name not in self._sent:
                key = ISCSI_KEYS[name]
                if name in self._state and key.kind is not _K.DECLARATIVE:
                    continue  # the peer offered it first: answered above
                if out and out[-1][0] == name:
                    continue  # never a key twice in one PDU: declare it next time
                if key.security != (stage is IscsiLoginStage.SECURITY_NEGOTIATION):
                    continue
                if self._irrelevant(key):
                    continue
                value = self.local[name]
                self._state.setdefault(name, _State.PROPOSED)
                self._sent[name] = value
                out.append((name, value))
                if key.kind is _K.DECLARATIVE:
                    self.declared[name] = value
        return out + extras

    def finish(self) -> IscsiNegotiated:
        """Check the login's negotiation is complete — every proposal that
        needs an answer got one, the target knows who logs in to what —
        and return the negotiated values (open-iscsi's end-of-login check;
        LIO's ``iscsi_check_negotiated_keys``)."""
        if self.role == "target" and self.leading:
            if "InitiatorName" not in self.values:
                raise IscsiNegotiationError(
                    "no InitiatorName", status_detail=IscsiLoginStatusDetail.MISSING_FIELDS
                )
            if not self._discovery() and "TargetName" not in self.values:
                raise IscsiNegotiationError(
                    "no TargetName", status_detail=IscsiLoginStatusDetail.MISSING_FIELDS
                )
        for name, state in self._state.items():
            if state is not _State.PROPOSED:
                continue
            key = ISCSI_KEYS[name]
            sent = self._sent[name]
            if key.kind is _K.DECLARATIVE or self._irrelevant(key):
                continue  # no answer expected
            if (key.kind is _K.BOOL_AND and sent == "No") or (
                key.kind is _K.BOOL_OR and sent == "Yes"
            ):
                self.values[name] = sent  # the answer was optional: the result is the offer
                continue
            raise IscsiNegotiationError(f"no answer to {name}={sent}")
        return IscsiNegotiated(dict(self.values), dict(self.declared))


def lio_iser_target(
    *,
    target_alias: str | None = "LIO Target",
    tpgt: int = 1,
    leading: bool = True,
    overrides: Mapping[str, str] | None = None,
) -> KeyNegotiator:
    """A target negotiator with LIO's iSER defaults, proposals and key
    order (``iscsi_create_default_params`` + ``iscsi_set_keys_to_negotiate``
    with ``iser=true``): what ``ib_isert`` behind LIO answers."""
    local = dict(_LIO_DEFAULTS)
    propose = list(_LIO_ISER_PROPOSALS)
    if target_alias is None:
        propose.remove("TargetAlias")
    else:
        local["TargetAlias"] = target_alias
    local["TargetPortalGroupTag"] = str(tpgt)
    local.update(overrides or {})
    return KeyNegotiator("target", local, propose, order=LIO_KEY_ORDER, leading=leading)


def linux_iser_initiator(
    initiator_name: str,
    target_name: str,
    *,
    initiator_alias: str = "(none)",
    session_type: str = "Normal",
    overrides: Mapping[str, str] | None = None,
) -> KeyNegotiator:
    """An initiator negotiator making open-iscsi's iSER offer
    (:data:`LINUX_ISER_OFFER` after the declarations). A Discovery session
    names no target (RFC 7143: TargetName is only for Normal sessions)."""
    declared = ["InitiatorName", "InitiatorAlias", "TargetName", "SessionType"]
    if session_type == "Discovery":
        declared.remove("TargetName")
    local: dict[str, str] = {
        "InitiatorName": initiator_name,
        "InitiatorAlias": initiator_alias,
        "SessionType": session_type,
        **dict(LINUX_ISER_OFFER),
        **(overrides or {}),
    }
    if "TargetName" in declared:
        local["TargetName"] = target_name
    propose = declared + [name for name, _ in LINUX_ISER_OFFER]
    return KeyNegotiator("initiator", local, propose)
