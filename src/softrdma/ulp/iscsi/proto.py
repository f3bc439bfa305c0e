"""iSCSI PDUs, byte for byte.

Kernel counterpart: ``include/scsi/iscsi_proto.h`` (``struct iscsi_hdr``,
``iscsi_scsi_req``, ``iscsi_scsi_rsp``, ``iscsi_login_req`` …, the
``ISCSI_OP_*`` and ``ISCSI_FLAG_*`` constants), as libiscsi / ib_iser and
LIO's ``iscsi_target`` / ``ib_isert`` fill and read them; RFC 7143 §11 for
the layouts and semantics.

Every PDU is a 48-byte Basic Header Segment (BHS), then the Additional
Header Segments (AHS, ``TotalAHSLength`` 4-byte words), then the data
segment (``DataSegmentLength`` bytes, padded with zeros to a multiple of
four). Digests are not modelled: iSER never uses them (RFC 7145 §6).

Conventions:

* One frozen, keyword-only dataclass per PDU type, its fields named after
  iscsi_proto.h; byte 1 is split into its flag fields (``final``,
  ``read``, ``transit``, ``csg`` …). Bits that the RFC fixes to one (the F
  bit of a NOP-Out, a response …) are sent set and not checked on
  receive.
* LUNs are Linux LUN numbers (``int_to_scsilun`` on the wire, as libiscsi
  and LIO do); the ISID is a 48-bit integer.
* Task tags (ITT, TTT) are opaque 32-bit values, read big-endian like every
  other field. libiscsi writes its task index in host byte order, so on
  x86 Linux's task 1 reads as ``0x01000000``: a target echoes tags and
  never interprets them.
* Reserved fields are sent as zero and ignored on receive (RFC 7143
  §11.2), so ``decode`` → ``encode`` is byte-exact for every PDU whose
  reserved bytes are zero, and ``decode(encode(pdu)) == pdu`` always.
* ``decode(data)`` reads the PDU at the start of ``data`` and ignores
  bytes after its padded end (receive buffers are bigger than the PDU);
  the padding itself need not be present.

Errors: :class:`IscsiProtocolError` for received bytes that are not a
valid PDU, :class:`IscsiEncodeError` for fields that cannot be encoded;
both are :class:`IscsiError` (a :class:`~softrdma.errors.SoftRdmaError`
and a :class:`ValueError`).
"""

from __future__ import annotations

import contextlib
import enum
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self, cast

from softrdma.errors import SoftRdmaError
from softrdma.transport.headers import BytesLike
from softrdma.ulp.srp.proto import int_to_scsilun, scsilun_to_int

__all__ = [
    "ISCSI_ATTR_ACA",
    "ISCSI_ATTR_HEAD_OF_QUEUE",
    "ISCSI_ATTR_ORDERED",
    "ISCSI_ATTR_SIMPLE",
    "ISCSI_ATTR_UNTAGGED",
    "ISCSI_FLAG_CMD_ATTR_MASK",
    "ISCSI_FLAG_CMD_BIDI_OVERFLOW",
    "ISCSI_FLAG_CMD_BIDI_UNDERFLOW",
    "ISCSI_FLAG_CMD_FINAL",
    "ISCSI_FLAG_CMD_OVERFLOW",
    "ISCSI_FLAG_CMD_READ",
    "ISCSI_FLAG_CMD_UNDERFLOW",
    "ISCSI_FLAG_CMD_WRITE",
    "ISCSI_FLAG_DATA_ACK",
    "ISCSI_FLAG_DATA_OVERFLOW",
    "ISCSI_FLAG_DATA_STATUS",
    "ISCSI_FLAG_DATA_UNDERFLOW",
    "ISCSI_FLAG_LOGIN_CONTINUE",
    "ISCSI_FLAG_LOGIN_CURRENT_STAGE_MASK",
    "ISCSI_FLAG_LOGIN_NEXT_STAGE_MASK",
    "ISCSI_FLAG_LOGIN_TRANSIT",
    "ISCSI_FLAG_TEXT_CONTINUE",
    "ISCSI_FULL_FEATURE_PHASE",
    "ISCSI_HDR_LEN",
    "ISCSI_OPCODE_MASK",
    "ISCSI_OP_ASYNC_EVENT",
    "ISCSI_OP_IMMEDIATE",
    "ISCSI_OP_LOGIN",
    "ISCSI_OP_LOGIN_RSP",
    "ISCSI_OP_LOGOUT",
    "ISCSI_OP_LOGOUT_RSP",
    "ISCSI_OP_NOOP_IN",
    "ISCSI_OP_NOOP_OUT",
    "ISCSI_OP_PARMS_NEGOTIATION_STAGE",
    "ISCSI_OP_R2T",
    "ISCSI_OP_REJECT",
    "ISCSI_OP_SCSI_CMD",
    "ISCSI_OP_SCSI_CMD_RSP",
    "ISCSI_OP_SCSI_DATA_IN",
    "ISCSI_OP_SCSI_DATA_OUT",
    "ISCSI_OP_SCSI_TMFUNC",
    "ISCSI_OP_SCSI_TMFUNC_RSP",
    "ISCSI_OP_SNACK",
    "ISCSI_OP_TEXT",
    "ISCSI_OP_TEXT_RSP",
    "ISCSI_RESERVED_TAG",
    "ISCSI_SECURITY_NEGOTIATION_STAGE",
    "ISCSI_STATUS_CLS_INITIATOR_ERR",
    "ISCSI_STATUS_CLS_REDIRECT",
    "ISCSI_STATUS_CLS_SUCCESS",
    "ISCSI_STATUS_CLS_TARGET_ERR",
    "IscsiAhs",
    "IscsiBhs",
    "IscsiDataIn",
    "IscsiDataOut",
    "IscsiEncodeError",
    "IscsiError",
    "IscsiLoginRequest",
    "IscsiLoginResponse",
    "IscsiLoginStage",
    "IscsiLoginStatusClass",
    "IscsiLoginStatusDetail",
    "IscsiLogoutReason",
    "IscsiLogoutRequest",
    "IscsiLogoutResponse",
    "IscsiLogoutResponseCode",
    "IscsiNopIn",
    "IscsiNopOut",
    "IscsiOpcode",
    "IscsiPdu",
    "IscsiProtocolError",
    "IscsiR2t",
    "IscsiReject",
    "IscsiRejectReason",
    "IscsiScsiCommand",
    "IscsiScsiResponse",
    "IscsiScsiResponseCode",
    "IscsiTaskAttr",
    "IscsiText",
    "IscsiTextResponse",
    "IscsiTmfFunc",
    "IscsiTmfRequest",
    "IscsiTmfResponse",
    "IscsiTmfResponseCode",
    "decode_iscsi_pdu",
    "iscsi_pad_len",
]


# --- errors ------------------------------------------------------------------------------


class IscsiError(SoftRdmaError, ValueError):
    """Base of the iSCSI codec's and negotiation's errors."""


class IscsiProtocolError(IscsiError):
    """Received bytes that are not a valid iSCSI PDU: too short, an unknown
    opcode, AHS or data segment lengths that do not fit, a reserved stage
    code (what a target answers with a Reject PDU, reason 0x04 "protocol
    error", or by dropping the connection)."""


class IscsiEncodeError(IscsiError):
    """A PDU field that cannot be encoded: out of range for its wire width
    or inconsistent with another field."""


# --- constants (include/scsi/iscsi_proto.h) --------------------------------------------

ISCSI_HDR_LEN: Final = 48
ISCSI_OP_IMMEDIATE: Final = 0x40
ISCSI_OPCODE_MASK: Final = 0x3F
ISCSI_RESERVED_TAG: Final = 0xFFFFFFFF

ISCSI_FLAG_CMD_FINAL: Final = 0x80
ISCSI_FLAG_CMD_READ: Final = 0x40
ISCSI_FLAG_CMD_WRITE: Final = 0x20
ISCSI_FLAG_CMD_ATTR_MASK: Final = 0x07
ISCSI_FLAG_CMD_BIDI_OVERFLOW: Final = 0x10
ISCSI_FLAG_CMD_BIDI_UNDERFLOW: Final = 0x08
ISCSI_FLAG_CMD_OVERFLOW: Final = 0x04
ISCSI_FLAG_CMD_UNDERFLOW: Final = 0x02
ISCSI_FLAG_LOGIN_TRANSIT: Final = 0x80
ISCSI_FLAG_LOGIN_CONTINUE: Final = 0x40
ISCSI_FLAG_LOGIN_CURRENT_STAGE_MASK: Final = 0x0C
ISCSI_FLAG_LOGIN_NEXT_STAGE_MASK: Final = 0x03
ISCSI_FLAG_TEXT_CONTINUE: Final = 0x40
ISCSI_FLAG_DATA_ACK: Final = 0x40
ISCSI_FLAG_DATA_OVERFLOW: Final = 0x04
ISCSI_FLAG_DATA_UNDERFLOW: Final = 0x02
ISCSI_FLAG_DATA_STATUS: Final = 0x01

ISCSI_ATTR_UNTAGGED: Final = 0
ISCSI_ATTR_SIMPLE: Final = 1
ISCSI_ATTR_ORDERED: Final = 2
ISCSI_ATTR_HEAD_OF_QUEUE: Final = 3
ISCSI_ATTR_ACA: Final = 4

_MAX_DLENGTH: Final = (1 << 24) - 1
_MAX_AHS_WORDS: Final = 255


class IscsiOpcode(enum.IntEnum):
    """Byte 0's low six bits (``ISCSI_OP_*``): initiator opcodes 0x00–0x1f,
    target opcodes 0x20–0x3f."""

    NOOP_OUT = 0x00
    SCSI_CMD = 0x01
    SCSI_TMFUNC = 0x02
    LOGIN = 0x03
    TEXT = 0x04
    SCSI_DATA_OUT = 0x05
    LOGOUT = 0x06
    SNACK = 0x10
    NOOP_IN = 0x20
    SCSI_CMD_RSP = 0x21
    SCSI_TMFUNC_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    SCSI_DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC_EVENT = 0x32
    REJECT = 0x3F


# iscsi_proto.h's own names for the enum members above and below.
ISCSI_OP_NOOP_OUT: Final = IscsiOpcode.NOOP_OUT
ISCSI_OP_SCSI_CMD: Final = IscsiOpcode.SCSI_CMD
ISCSI_OP_SCSI_TMFUNC: Final = IscsiOpcode.SCSI_TMFUNC
ISCSI_OP_LOGIN: Final = IscsiOpcode.LOGIN
ISCSI_OP_TEXT: Final = IscsiOpcode.TEXT
ISCSI_OP_SCSI_DATA_OUT: Final = IscsiOpcode.SCSI_DATA_OUT
ISCSI_OP_LOGOUT: Final = IscsiOpcode.LOGOUT
ISCSI_OP_SNACK: Final = IscsiOpcode.SNACK
ISCSI_OP_NOOP_IN: Final = IscsiOpcode.NOOP_IN
ISCSI_OP_SCSI_CMD_RSP: Final = IscsiOpcode.SCSI_CMD_RSP
ISCSI_OP_SCSI_TMFUNC_RSP: Final = IscsiOpcode.SCSI_TMFUNC_RSP
ISCSI_OP_LOGIN_RSP: Final = IscsiOpcode.LOGIN_RSP
ISCSI_OP_TEXT_RSP: Final = IscsiOpcode.TEXT_RSP
ISCSI_OP_SCSI_DATA_IN: Final = IscsiOpcode.SCSI_DATA_IN
ISCSI_OP_LOGOUT_RSP: Final = IscsiOpcode.LOGOUT_RSP
ISCSI_OP_R2T: Final = IscsiOpcode.R2T
ISCSI_OP_ASYNC_EVENT: Final = IscsiOpcode.ASYNC_EVENT
ISCSI_OP_REJECT: Final = IscsiOpcode.REJECT


class IscsiTaskAttr(enum.IntEnum):
    """A SCSI Command's task attribute (``ISCSI_ATTR_*``)."""

    UNTAGGED = ISCSI_ATTR_UNTAGGED
    SIMPLE = ISCSI_ATTR_SIMPLE
    ORDERED = ISCSI_ATTR_ORDERED
    HEAD_OF_QUEUE = ISCSI_ATTR_HEAD_OF_QUEUE
    ACA = ISCSI_ATTR_ACA


class IscsiLoginStage(enum.IntEnum):
    """CSG / NSG of a login PDU (``ISCSI_SECURITY_NEGOTIATION_STAGE``,
    ``ISCSI_OP_PARMS_NEGOTIATION_STAGE``, ``ISCSI_FULL_FEATURE_PHASE``); 2
    is reserved."""

    SECURITY_NEGOTIATION = 0
    OP_PARMS_NEGOTIATION = 1
    FULL_FEATURE_PHASE = 3


ISCSI_SECURITY_NEGOTIATION_STAGE: Final = IscsiLoginStage.SECURITY_NEGOTIATION
ISCSI_OP_PARMS_NEGOTIATION_STAGE: Final = IscsiLoginStage.OP_PARMS_NEGOTIATION
ISCSI_FULL_FEATURE_PHASE: Final = IscsiLoginStage.FULL_FEATURE_PHASE


class IscsiLoginStatusClass(enum.IntEnum):
    """Login Response status class (``ISCSI_STATUS_CLS_*``)."""

    SUCCESS = 0x00
    REDIRECT = 0x01
    INITIATOR_ERR = 0x02
    TARGET_ERR = 0x03


ISCSI_STATUS_CLS_SUCCESS: Final = IscsiLoginStatusClass.SUCCESS
ISCSI_STATUS_CLS_REDIRECT: Final = IscsiLoginStatusClass.REDIRECT
ISCSI_STATUS_CLS_INITIATOR_ERR: Final = IscsiLoginStatusClass.INITIATOR_ERR
ISCSI_STATUS_CLS_TARGET_ERR: Final = IscsiLoginStatusClass.TARGET_ERR


class IscsiLoginStatusDetail:
    """Login Response status details (``ISCSI_LOGIN_STATUS_*``), as plain
    ints: the values repeat across status classes (0 is ``ACCEPT``,
    ``INIT_ERR`` and ``TARGET_ERROR``), so no enum can name them. Success:
    ``ACCEPT``; redirect: ``TGT_MOVED_*``; initiator error: ``INIT_ERR`` …
    ``INVALID_REQUEST``; target error: ``TARGET_ERROR`` …
    ``NO_RESOURCES``."""

    ACCEPT: Final = 0x00
    TGT_MOVED_TEMP: Final = 0x01
    TGT_MOVED_PERM: Final = 0x02
    INIT_ERR: Final = 0x00
    AUTH_FAILED: Final = 0x01
    TGT_FORBIDDEN: Final = 0x02
    TGT_NOT_FOUND: Final = 0x03
    TGT_REMOVED: Final = 0x04
    NO_VERSION: Final = 0x05
    ISID_ERROR: Final = 0x06
    MISSING_FIELDS: Final = 0x07
    CONN_ADD_FAILED: Final = 0x08
    NO_SESSION_TYPE: Final = 0x09
    NO_SESSION: Final = 0x0A
    INVALID_REQUEST: Final = 0x0B
    TARGET_ERROR: Final = 0x00
    SVC_UNAVAILABLE: Final = 0x01
    NO_RESOURCES: Final = 0x02


class IscsiScsiResponseCode(enum.IntEnum):
    """SCSI Response ``response`` byte (``ISCSI_STATUS_CMD_COMPLETED`` …)."""

    CMD_COMPLETED = 0x00
    TARGET_FAILURE = 0x01
    SUBSYS_FAILURE = 0x02


class IscsiTmfFunc(enum.IntEnum):
    """Task management function (``ISCSI_TM_FUNC_*``)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class IscsiTmfResponseCode(enum.IntEnum):
    """Task management response (``ISCSI_TMF_RSP_*``)."""

    COMPLETE = 0x00
    NO_TASK = 0x01
    NO_LUN = 0x02
    TASK_ALLEGIANT = 0x03
    NO_FAILOVER = 0x04
    NOT_SUPPORTED = 0x05
    AUTH_FAILED = 0x06
    REJECTED = 0xFF


class IscsiLogoutReason(enum.IntEnum):
    """Logout Request reason (``ISCSI_LOGOUT_REASON_*``)."""

    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    RECOVERY = 2
    AEN_REQUEST = 3


class IscsiLogoutResponseCode(enum.IntEnum):
    """Logout Response ``response`` byte (``ISCSI_LOGOUT_SUCCESS`` …)."""

    SUCCESS = 0
    CID_NOT_FOUND = 1
    RECOVERY_UNSUPPORTED = 2
    CLEANUP_FAILED = 3


class IscsiRejectReason(enum.IntEnum):
    """Reject PDU reason (``ISCSI_REASON_*``)."""

    CMD_BEFORE_LOGIN = 1
    DATA_DIGEST_ERROR = 2
    DATA_SNACK_REJECT = 3
    PROTOCOL_ERROR = 4
    CMD_NOT_SUPPORTED = 5
    IMM_CMD_REJECT = 6
    TASK_IN_PROGRESS = 7
    INVALID_SNACK = 8
    BOOKMARK_INVALID = 9
    BOOKMARK_NO_RESOURCES = 10
    NEGOTIATION_RESET = 11
    WAITING_FOR_LOGOUT = 12


def iscsi_pad_len(length: int) -> int:
    """Bytes of zero padding after a segment of ``length`` bytes (RFC 7143
    §11.1: every segment ends on a 4-byte boundary)."""
    return -length % 4


# --- AHS and the common header ----------------------------------------------------------

_AHS_HDR: Final = struct.Struct(">HB")
_COMMON: Final = struct.Struct(">BBxxI")  # opcode byte, flags, TotalAHSLength << 24 | DSL
_OPFLAGS: Final = struct.Struct(">BB")
_LENGTHS: Final = struct.Struct(">I")
_ITT: Final = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class IscsiAhs:
    """One Additional Header Segment (RFC 7143 §11.2): ``ahs_type``
    (1 = extended CDB, 2 = bidirectional read expected data length) and
    ``specific``, the bytes after the type byte (``AHSLength`` of them),
    padded to 4 bytes on the wire."""

    ahs_type: int
    specific: bytes = b""

    def encode(self) -> bytes:
        """The AHS with its length, type and padding."""
        if not 0 <= self.ahs_type <= 0xFF:
            raise IscsiEncodeError(f"AHS type {self.ahs_type!r} is one byte")
        if len(self.specific) > 0xFFFF:
            raise IscsiEncodeError("AHSLength is 16 bits")
        raw = _AHS_HDR.pack(len(self.specific), self.ahs_type) + bytes(self.specific)
        return raw + bytes(iscsi_pad_len(len(raw)))


def _decode_ahs(region: bytes) -> tuple[IscsiAhs, ...]:
    out: list[IscsiAhs] = []
    pos = 0
    while pos < len(region):
        if len(region) - pos < _AHS_HDR.size:
            raise IscsiProtocolError("AHS region ends inside an AHS header")
        length, ahs_type = _AHS_HDR.unpack_from(region, pos)
        end = pos + _AHS_HDR.size + length
        if end > len(region):
            raise IscsiProtocolError(f"AHS of {length} bytes overruns TotalAHSLength")
        out.append(IscsiAhs(ahs_type, region[pos + _AHS_HDR.size : end]))
        pos = end + iscsi_pad_len(end)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class IscsiBhs:
    """The fields every BHS shares (``struct iscsi_hdr``): opcode and I
    bit, the opcode-specific flags byte, ``TotalAHSLength`` (in 4-byte
    words), ``DataSegmentLength`` and the Initiator Task Tag. Enough to
    route, reject or skip a PDU whose type is unknown or malformed."""

    opcode: int
    immediate: bool
    flags: int
    ahs_words: int
    dlength: int
    itt: int

    @property
    def pdu_length(self) -> int:
        """The whole PDU's length on the wire, padding included."""
        return ISCSI_HDR_LEN + 4 * self.ahs_words + self.dlength + iscsi_pad_len(self.dlength)

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The common fields of the BHS at the start of ``data``."""
        if len(data) < ISCSI_HDR_LEN:
            raise IscsiProtocolError(f"{len(data)} bytes: a BHS is {ISCSI_HDR_LEN}")
        op, flags, word = _COMMON.unpack_from(data)
        (itt,) = _ITT.unpack_from(data, 16)
        return cls(
            op & ISCSI_OPCODE_MASK,
            bool(op & ISCSI_OP_IMMEDIATE),
            flags,
            word >> 24,
            word & _MAX_DLENGTH,
            itt,
        )


# --- the PDU framework ------------------------------------------------------------------

# A field of bytes 2–3 or 8–47: (name, byte offset, struct code). "6s" is
# the 48-bit ISID (an int), "8s" a LUN (Linux LUN number), "16s" the CDB.
_Field = tuple[str, int, str]
_FlagSpec = tuple[str, int]  # (name, mask): a bool for one bit, an int otherwise


def _shift(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


@dataclass(frozen=True, kw_only=True)
class IscsiPdu:
    """Base of every PDU type: the I bit, the AHSs and the data segment
    (``data``; some types give it typed fields instead). Subclasses describe
    their BHS declaratively and share one encoder and decoder."""

    OPCODE: ClassVar[IscsiOpcode]
    _FIELDS: ClassVar[tuple[_Field, ...]] = ()
    _FLAGS: ClassVar[tuple[_FlagSpec, ...]] = ()
    _FIXED: ClassVar[int] = 0  # byte-1 bits always sent set
    _ENUMS: ClassVar[dict[str, type[enum.IntEnum]]] = {}
    _STRUCT: ClassVar[struct.Struct]
    _ORDERED: ClassVar[tuple[_Field, ...]]  # _FIELDS by offset: the order of _STRUCT
    _BY_OPCODE: ClassVar[dict[int, type[IscsiPdu]]] = {}

    immediate: bool = False
    ahs: tuple[IscsiAhs, ...] = ()
    data: bytes = b""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "OPCODE" not in cls.__dict__:
            return
        fmt = ">"
        pos = 0
        cls._ORDERED = tuple(sorted(cls._FIELDS, key=lambda f: f[1]))
        for _name, off, code in cls._ORDERED:
            if off < pos or off in (0, 1, 4, 5, 6, 7):
                raise TypeError(f"{cls.__name__}: field at byte {off} overlaps")
            fmt += (f"{off - pos}x" if off > pos else "") + code
            pos = off + struct.calcsize(">" + code)
        fmt += f"{ISCSI_HDR_LEN - pos}x"
        cls._STRUCT = struct.Struct(fmt)
        IscsiPdu._BY_OPCODE[cls.OPCODE] = cls

    # --- the data segment: subclasses with typed data override these two

    def _data_segment(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def _data_fields(cls, data: bytes) -> dict[str, Any]:
        return {"data": data}

    # --- encode / decode

    def encode(self) -> bytes:
        """The PDU on the wire: BHS, AHSs, data segment, zero padding."""
        name = type(self).__name__
        flags = self._FIXED
        for fname, mask in self._FLAGS:
            bits = getattr(self, fname)
            if not isinstance(bits, int) or not 0 <= bits <= mask >> _shift(mask):
                raise IscsiEncodeError(f"{name}.{fname}={bits!r} does not fit its bits")
            flags |= int(bits) << _shift(mask)
        values: list[Any] = []
        for fname, _off, code in self._ORDERED:
            value: Any = getattr(self, fname)
            if code == "6s":
                if not isinstance(value, int) or not 0 <= value < 1 << 48:
                    raise IscsiEncodeError(f"{name}.{fname}={value!r}: 48 bits")
                value = value.to_bytes(6, "big")
            elif code == "8s":
                if not isinstance(value, int) or not 0 <= value < 1 << 64:
                    raise IscsiEncodeError(f"{name}.{fname}={value!r}: a LUN is 64 bits")
                value = int_to_scsilun(value)
            elif code == "16s":
                if not isinstance(value, bytes | bytearray) or len(value) != 16:
                    raise IscsiEncodeError(f"{name}.{fname}: 16 bytes (zero-padded) needed")
            else:
                bits = 8 * struct.calcsize(code)
                if not isinstance(value, int) or not 0 <= value < 1 << bits:
                    raise IscsiEncodeError(f"{name}.{fname}={value!r}: {bits} bits")
            values.append(value)
        ahs = b"".join(a.encode() for a in self.ahs)
        if len(ahs) > 4 * _MAX_AHS_WORDS:
            raise IscsiEncodeError(f"{name}: {len(ahs)} bytes of AHS, at most 1020")
        seg = self._data_segment()
        if len(seg) > _MAX_DLENGTH:
            raise IscsiEncodeError(f"{name}: data segment of {len(seg)} bytes")
        op = self.OPCODE | (ISCSI_OP_IMMEDIATE if self.immediate else 0)
        bhs = bytearray(self._STRUCT.pack(*values))
        _OPFLAGS.pack_into(bhs, 0, op, flags)
        _LENGTHS.pack_into(bhs, 4, (len(ahs) // 4) << 24 | len(seg))
        return bytes(bhs) + ahs + seg + bytes(iscsi_pad_len(len(seg)))

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The PDU at the start of ``data`` (bytes after its padded end are
        ignored). Raises :class:`IscsiProtocolError` for anything else;
        ``IscsiPdu.decode`` is :func:`decode_iscsi_pdu`."""
        if cls is IscsiPdu:
            return cast(Self, decode_iscsi_pdu(data))
        bhs = IscsiBhs.decode(data)
        if bhs.opcode != cls.OPCODE:
            raise IscsiProtocolError(
                f"opcode {bhs.opcode:#04x} is not {cls.__name__} ({cls.OPCODE:#04x})"
            )
        end_ahs = ISCSI_HDR_LEN + 4 * bhs.ahs_words
        end = end_ahs + bhs.dlength
        if len(data) < end:
            raise IscsiProtocolError(
                f"{cls.__name__}: {len(data)} bytes, the header announces {end}"
            )
        raw = bytes(data[:end])
        kwargs: dict[str, Any] = {"immediate": bhs.immediate}
        for fname, mask in cls._FLAGS:
            value = (bhs.flags & mask) >> _shift(mask)
            kwargs[fname] = bool(value) if mask == 1 << _shift(mask) else value
        for (fname, _off, code), value in zip(
            cls._ORDERED, cls._STRUCT.unpack_from(raw), strict=True
        ):
            if code == "6s":
                value = int.from_bytes(value, "big")
            elif code == "8s":
                value = scsilun_to_int(value)
            kwargs[fname] = value
        for fname, enum_type in cls._ENUMS.items():
            # An unknown code stays an int: the receiver decides what to answer.
            with contextlib.suppress(ValueError):
                kwargs[fname] = enum_type(kwargs[fname])
        kwargs["ahs"] = _decode_ahs(raw[ISCSI_HDR_LEN:end_ahs])
        kwargs.update(cls._data_fields(raw[end_ahs:end]))
        pdu = cls(**kwargs)
        pdu._validate_decoded()
        return pdu

    def _validate_decoded(self) -> None:
        pass

    @property
    def opcode(self) -> IscsiOpcode:
        """The PDU's opcode."""
        return self.OPCODE


def decode_iscsi_pdu(data: BytesLike) -> IscsiPdu:
    """The PDU at the start of ``data``, as the type its opcode names
    (libiscsi ``iscsi_complete_pdu`` / LIO ``iscsi_target_rx_opcode``
    dispatch). Raises :class:`IscsiProtocolError` for an opcode this module
    does not know (SNACK, Async Message) or malformed bytes."""
    bhs = IscsiBhs.decode(data)
    cls = IscsiPdu._BY_OPCODE.get(bhs.opcode)
    if cls is None:
        raise IscsiProtocolError(f"unsupported iSCSI opcode {bhs.opcode:#04x}")
    return cls.decode(data)


# --- login and text ----------------------------------------------------------------------


def _check_stages(pdu: IscsiLoginRequest | IscsiLoginResponse) -> None:
    for name in ("csg", "nsg"):
        value = getattr(pdu, name)
        if value == 2:
            raise IscsiProtocolError(f"{type(pdu).__name__}.{name}=2 is a reserved stage")
    if pdu.transit and pdu.cont:
        raise IscsiProtocolError(f"{type(pdu).__name__}: T and C bits both set")


_LOGIN_FLAGS: Final[tuple[_FlagSpec, ...]] = (
    ("transit", ISCSI_FLAG_LOGIN_TRANSIT),
    ("cont", ISCSI_FLAG_LOGIN_CONTINUE),
    ("csg", ISCSI_FLAG_LOGIN_CURRENT_STAGE_MASK),
    ("nsg", ISCSI_FLAG_LOGIN_NEXT_STAGE_MASK),
)
_STAGE_ENUMS: Final[dict[str, type[enum.IntEnum]]] = {
    "csg": IscsiLoginStage,
    "nsg": IscsiLoginStage,
}


@dataclass(frozen=True, kw_only=True)
class IscsiLoginRequest(IscsiPdu):
    """Login Request (``struct iscsi_login_req``, RFC 7143 §11.12): the
    text keys travel in ``data`` (see :mod:`softrdma.ulp.iscsi.text`).
    Linux and LIO always set the I bit."""

    OPCODE: ClassVar = IscsiOpcode.LOGIN
    _FIELDS: ClassVar = (
        ("max_version", 2, "B"),
        ("min_version", 3, "B"),
        ("isid", 8, "6s"),
        ("tsih", 14, "H"),
        ("itt", 16, "I"),
        ("cid", 20, "H"),
        ("cmdsn", 24, "I"),
        ("exp_statsn", 28, "I"),
    )
    _FLAGS: ClassVar = _LOGIN_FLAGS
    _ENUMS: ClassVar = _STAGE_ENUMS

    immediate: bool = True
    transit: bool = False
    cont: bool = False
    csg: int = IscsiLoginStage.SECURITY_NEGOTIATION
    nsg: int = IscsiLoginStage.SECURITY_NEGOTIATION
    max_version: int = 0
    min_version: int = 0
    isid: int = 0
    tsih: int = 0
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0

    def _validate_decoded(self) -> None:
        _check_stages(self)


@dataclass(frozen=True, kw_only=True)
class IscsiLoginResponse(IscsiPdu):
    """Login Response (``struct iscsi_login_rsp``, RFC 7143 §11.13), with
    its status class and detail (:class:`IscsiLoginStatusClass`,
    :class:`IscsiLoginStatusDetail`)."""

    OPCODE: ClassVar = IscsiOpcode.LOGIN_RSP
    _FIELDS: ClassVar = (
        ("max_version", 2, "B"),
        ("active_version", 3, "B"),
        ("isid", 8, "6s"),
        ("tsih", 14, "H"),
        ("itt", 16, "I"),
        ("statsn", 24, "I"),
        ("exp_cmdsn", 28, "I"),
        ("max_cmdsn", 32, "I"),
        ("status_class", 36, "B"),
        ("status_detail", 37, "B"),
    )
    _FLAGS: ClassVar = _LOGIN_FLAGS
    _ENUMS: ClassVar = {**_STAGE_ENUMS, "status_class": IscsiLoginStatusClass}

    transit: bool = False
    cont: bool = False
    csg: int = IscsiLoginStage.SECURITY_NEGOTIATION
    nsg: int = IscsiLoginStage.SECURITY_NEGOTIATION
    max_version: int = 0
    active_version: int = 0
    isid: int = 0
    tsih: int = 0
    itt: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    status_class: int = IscsiLoginStatusClass.SUCCESS
    status_detail: int = 0

    def _validate_decoded(self) -> None:
        _check_stages(self)


@dataclass(frozen=True, kw_only=True)
class IscsiText(IscsiPdu):
    """Text Request (``struct iscsi_text``, RFC 7143 §11.10)."""

    OPCODE: ClassVar = IscsiOpcode.TEXT
    _FIELDS: ClassVar = (
        ("lun", 8, "8s"),
        ("itt", 16, "I"),
        ("ttt", 20, "I"),
        ("cmdsn", 24, "I"),
        ("exp_statsn", 28, "I"),
    )
    _FLAGS: ClassVar = (("final", 0x80), ("cont", ISCSI_FLAG_TEXT_CONTINUE))

    final: bool = True
    cont: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = ISCSI_RESERVED_TAG
    cmdsn: int = 0
    exp_statsn: int = 0


@dataclass(frozen=True, kw_only=True)
class IscsiTextResponse(IscsiPdu):
    """Text Response (``struct iscsi_text_rsp``, RFC 7143 §11.11)."""

    OPCODE: ClassVar = IscsiOpcode.TEXT_RSP
    _FIELDS: ClassVar = (
        ("lun", 8, "8s"),
        ("itt", 16, "I"),
        ("ttt", 20, "I"),
        ("statsn", 24, "I"),
        ("exp_cmdsn", 28, "I"),
        ("max_cmdsn", 32, "I"),
    )
    _FLAGS: ClassVar = (("final", 0x80), ("cont", ISCSI_FLAG_TEXT_CONTINUE))

    final: bool = True
    cont: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = ISCSI_RESERVED_TAG
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0


# --- SCSI command and response ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class IscsiScsiCommand(IscsiPdu):
    """SCSI Command (``struct iscsi_scsi_req``, RFC 7143 §11.3): flags F,
    R, W and the task attribute, the LUN, the expected data transfer
    length, CmdSN / ExpStatSN, the 16-byte CDB field (a shorter CDB
    zero-padded, as libiscsi does; a longer one puts the rest in an
    extended-CDB AHS), and immediate data in ``data``."""

    OPCODE: ClassVar = IscsiOpcode.SCSI_CMD
    _FIELDS: ClassVar = (
        ("lun", 8, "8s"),
        ("itt", 16, "I"),
        ("data_length", 20, "I"),
        ("cmdsn", 24, "I"),
        ("exp_statsn", 28, "I"),
        ("cdb", 32, "16s"),
    )
    _FLAGS: ClassVar = (
        ("final", ISCSI_FLAG_CMD_FINAL),
        ("read", ISCSI_FLAG_CMD_READ),
        ("write", ISCSI_FLAG_CMD_WRITE),
        ("attr", ISCSI_FLAG_CMD_ATTR_MASK),
    )
    _ENUMS: ClassVar = {"attr": IscsiTaskAttr}

    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = IscsiTaskAttr.SIMPLE
    lun: int = 0
    itt: int = 0
    data_length: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0
    cdb: bytes = bytes(16)


@dataclass(frozen=True, kw_only=True)
class IscsiScsiResponse(IscsiPdu):
    """SCSI Response (``struct iscsi_scsi_rsp``, RFC 7143 §11.4): response
    code, SCSI status, the residual flags and counts, and the data segment
    split into ``sense`` (after its 2-byte SenseLength) and
    ``response_data`` (what follows the sense data). An empty data segment
    is ``sense == response_data == b""``."""

    OPCODE: ClassVar = IscsiOpcode.SCSI_CMD_RSP
    _FIELDS: ClassVar = (
        ("response", 2, "B"),
        ("status", 3, "B"),
        ("itt", 16, "I"),
        ("snack_tag", 20, "I"),
        ("statsn", 24, "I"),
        ("exp_cmdsn", 28, "I"),
        ("max_cmdsn", 32, "I"),
        ("exp_datasn", 36, "I"),
        ("bi_residual_count", 40, "I"),
        ("residual_count", 44, "I"),
    )
    _FLAGS: ClassVar = (
        ("bidi_overflow", ISCSI_FLAG_CMD_BIDI_OVERFLOW),
        ("bidi_underflow", ISCSI_FLAG_CMD_BIDI_UNDERFLOW),
        ("overflow", ISCSI_FLAG_CMD_OVERFLOW),
        ("underflow", ISCSI_FLAG_CMD_UNDERFLOW),
    )
    _FIXED: ClassVar = 0x80
    _ENUMS: ClassVar = {"response": IscsiScsiResponseCode}
    _SENSE_LEN: ClassVar = struct.Struct(">H")

    bidi_overflow: bool = False
    bidi_underflow: bool = False
    overflow: bool = False
    underflow: bool = False
    response: int = IscsiScsiResponseCode.CMD_COMPLETED
    status: int = 0
    itt: int = 0
    snack_tag: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    exp_datasn: int = 0
    bi_residual_count: int = 0
    residual_count: int = 0
    sense: bytes = b""
    response_data: bytes = b""

    def _data_segment(self) -> bytes:
        if self.data:
            raise IscsiEncodeError("IscsiScsiResponse: use sense / response_data, not data")
        if not self.sense and not self.response_data:
            return b""
        if len(self.sense) > 0xFFFF:
            raise IscsiEncodeError("IscsiScsiResponse: SenseLength is 16 bits")
        return self._SENSE_LEN.pack(len(self.sense)) + self.sense + self.response_data

    @classmethod
    def _data_fields(cls, data: bytes) -> dict[str, Any]:
        if not data:
            return {}
        if len(data) < 2:
            raise IscsiProtocolError("SCSI Response data segment without its SenseLength")
        (sense_len,) = cls._SENSE_LEN.unpack_from(data)
        if 2 + sense_len > len(data):
            raise IscsiProtocolError(
                f"SenseLength {sense_len} overruns a {len(data)}-byte data segment"
            )
        return {"sense": data[2 : 2 + sense_len], "response_data": data[2 + sense_len :]}


# --- NOP, task management, logout, reject ---------------------------------------------


@dataclass(frozen=True, kw_only=True)
class IscsiNopOut(IscsiPdu):
    """NOP-Out (``struct iscsi_nopout``, RFC 7143 §11.18): a ping
    (``itt`` set, ``ttt`` reserved) or the answer to a NOP-In (``ttt``
    echoed)."""

    OPCODE: ClassVar = IscsiOpcode.NOOP_OUT
    _FIELDS: ClassVar = (
        ("lun", 8, "8s"),
        ("itt", 16, "I"),
        ("ttt", 20, "I"),
        ("cmdsn", 24, "I"),
        ("exp_statsn", 28, "I"),
    )
    _FIXED: ClassVar = 0x80

    lun: int = 0
    itt: int = ISCSI_RESERVED_TAG
    ttt: int = ISCSI_RESERVED_TAG
    cmdsn: int = 0
    exp_statsn: int = 0


@dataclass(frozen=True, kw_only=True)
class IscsiNopIn(IscsiPdu):
    """NOP-In (``struct iscsi_nopin``, RFC 7143 §11.19)."""

    OPCODE: ClassVar = IscsiOpcode.NOOP_IN
    _FIELDS: ClassVar = (
        ("lun", 8, "8s"),
        ("itt", 16, "I"),
        ("ttt", 20, "I"),
        ("statsn", 24, "I"),
        ("exp_cmdsn", 28, "I"),
        ("max_cmdsn", 32, "I"),
    )
    _FIXED: ClassVar = 0x80

    lun: int = 0
    itt: int = ISCSI_RESERVED_TAG
    ttt: int = ISCSI_RESERVED_TAG
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0


@dataclass(frozen=True, kw_only=True)
class IscsiTmfRequest(IscsiPdu):
    """Task Management Function Request (``struct iscsi_tm``, RFC 7143
    §11.5): ``function`` (:class:`IscsiTmfFunc`), the referenced task tag
    ``rtt`` and ``refcmdsn``."""

    OPCODE: ClassVar = IscsiOpcode.SCSI_TMFUNC
    _FIELDS: ClassVar = (
        ("lun", 8, "8s"),
        ("itt", 16, "I"),
        ("rtt", 20, "I"),
        ("cmdsn", 24, "I"),
        ("exp_statsn", 28, "I"),
        ("refcmdsn", 32, "I"),
        ("exp_datasn", 36, "I"),
    )
    _FLAGS: ClassVar = (("function", 0x7F),)
    _FIXED: ClassVar = 0x80
    _ENUMS: ClassVar = {"function": IscsiTmfFunc}

    immediate: bool = True
    function: int = IscsiTmfFunc.ABORT_TASK
    lun: int = 0
    itt: int = 0
    rtt: int = ISCSI_RESERVED_TAG
    cmdsn: int = 0
    exp_statsn: int = 0
    refcmdsn: int = 0
    exp_datasn: int = 0


@dataclass(frozen=True, kw_only=True)
class IscsiTmfResponse(IscsiPdu):
    """Task Management Function Response (``struct iscsi_tm_rsp``, RFC 7143
    §11.6)."""

    OPCODE: ClassVar = IscsiOpcode.SCSI_TMFUNC_RSP
    _FIELDS: ClassVar = (
        ("response", 2, "B"),
        ("itt", 16, "I"),
        ("statsn", 24, "I"),
        ("exp_cmdsn", 28, "I"),
        ("max_cmdsn", 32, "I"),
    )
    _FIXED: ClassVar = 0x80
    _ENUMS: ClassVar = {"response": IscsiTmfResponseCode}

    response: int = IscsiTmfResponseCode.COMPLETE
    itt: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0


@dataclass(frozen=True, kw_only=True)
class IscsiLogoutRequest(IscsiPdu):
    """Logout Request (``struct iscsi_logout``, RFC 7143 §11.14)."""

    OPCODE: ClassVar = IscsiOpcode.LOGOUT
    _FIELDS: ClassVar = (
        ("itt", 16, "I"),
        ("cid", 20, "H"),
        ("cmdsn", 24, "I"),
        ("exp_statsn", 28, "I"),
    )
    _FLAGS: ClassVar = (("reason", 0x7F),)
    _FIXED: ClassVar = 0x80
    _ENUMS: ClassVar = {"reason": IscsiLogoutReason}

    reason: int = IscsiLogoutReason.CLOSE_SESSION
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0


@dataclass(frozen=True, kw_only=True)
class IscsiLogoutResponse(IscsiPdu):
    """Logout Response (``struct iscsi_logout_rsp``, RFC 7143 §11.15), with
    Time2Wait and Time2Retain."""

    OPCODE: ClassVar = IscsiOpcode.LOGOUT_RSP
    _FIELDS: ClassVar = (
        ("response", 2, "B"),
        ("itt", 16, "I"),
        ("statsn", 24, "I"),
        ("exp_cmdsn", 28, "I"),
        ("max_cmdsn", 32, "I"),
        ("t2wait", 40, "H"),
        ("t2retain", 42, "H"),
    )
    _FIXED: ClassVar = 0x80
    _ENUMS: ClassVar = {"response": IscsiLogoutResponseCode}

    response: int = IscsiLogoutResponseCode.SUCCESS
    itt: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    t2wait: int = 0
    t2retain: int = 0


@dataclass(frozen=True, kw_only=True)
class IscsiReject(IscsiPdu):
    """Reject (``struct iscsi_reject``, RFC 7143 §11.17): ``reason`` and,
    in ``data``, the header of the rejected PDU. Bytes 16–19 are always
    0xffffffff."""

    OPCODE: ClassVar = IscsiOpcode.REJECT
    _FIELDS: ClassVar = (
        ("reason", 2, "B"),
        ("ffffffff", 16, "I"),
        ("statsn", 24, "I"),
        ("exp_cmdsn", 28, "I"),
        ("max_cmdsn", 32, "I"),
        ("datasn", 36, "I"),
    )
    _FIXED: ClassVar = 0x80
    _ENUMS: ClassVar = {"reason": IscsiRejectReason}

    reason: int = IscsiRejectReason.PROTOCOL_ERROR
    ffffffff: int = ISCSI_RESERVED_TAG
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    datasn: int = 0

    @classmethod
    def rejecting(
        cls,
        rejected: BytesLike,
        reason: IscsiRejectReason,
        *,
        statsn: int = 0,
        exp_cmdsn: int = 0,
        max_cmdsn: int = 0,
    ) -> Self:
        """The Reject for the PDU whose bytes start ``rejected``: its
        48-byte header is the data segment (RFC 7143 §11.17; LIO
        ``iscsit_reject_cmd``), zero-filled if fewer bytes arrived."""
        header = bytes(rejected[:ISCSI_HDR_LEN])
        header += bytes(ISCSI_HDR_LEN - len(header))
        return cls(
            reason=reason, statsn=statsn, exp_cmdsn=exp_cmdsn, max_cmdsn=max_cmdsn, data=header
        )


# --- data PDUs and R2T (iSCSI/TCP only: iSER moves data by RDMA) ---------------------


@dataclass(frozen=True, kw_only=True)
class IscsiDataOut(IscsiPdu):
    """SCSI Data-Out (``struct iscsi_data``, RFC 7143 §11.7). iSER never
    sends it (RFC 7145 §7: solicited data is RDMA-READ)."""

    OPCODE: ClassVar = IscsiOpcode.SCSI_DATA_OUT
    _FIELDS: ClassVar = (
        ("lun", 8, "8s"),
        ("itt", 16, "I"),
        ("ttt", 20, "I"),
        ("exp_statsn", 28, "I"),
        ("datasn", 36, "I"),
        ("offset", 40, "I"),
    )
    _FLAGS: ClassVar = (("final", 0x80),)

    final: bool = True
    lun: int = 0
    itt: int = 0
    ttt: int = ISCSI_RESERVED_TAG
    exp_statsn: int = 0
    datasn: int = 0
    offset: int = 0


@dataclass(frozen=True, kw_only=True)
class IscsiDataIn(IscsiPdu):
    """SCSI Data-In (``struct iscsi_data_rsp``, RFC 7143 §11.8). iSER
    never sends it (the target RDMA-WRITEs instead)."""

    OPCODE: ClassVar = IscsiOpcode.SCSI_DATA_IN
    _FIELDS: ClassVar = (
        ("status", 3, "B"),
        ("lun", 8, "8s"),
        ("itt", 16, "I"),
        ("ttt", 20, "I"),
        ("statsn", 24, "I"),
        ("exp_cmdsn", 28, "I"),
        ("max_cmdsn", 32, "I"),
        ("datasn", 36, "I"),
        ("offset", 40, "I"),
        ("residual_count", 44, "I"),
    )
    _FLAGS: ClassVar = (
        ("final", 0x80),
        ("ack", ISCSI_FLAG_DATA_ACK),
        ("overflow", ISCSI_FLAG_DATA_OVERFLOW),
        ("underflow", ISCSI_FLAG_DATA_UNDERFLOW),
        ("has_status", ISCSI_FLAG_DATA_STATUS),
    )

    final: bool = True
    ack: bool = False
    overflow: bool = False
    underflow: bool = False
    has_status: bool = False
    status: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = ISCSI_RESERVED_TAG
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    datasn: int = 0
    offset: int = 0
    residual_count: int = 0


@dataclass(frozen=True, kw_only=True)
class IscsiR2t(IscsiPdu):
    """Ready To Transfer (``struct iscsi_r2t_rsp``, RFC 7143 §11.9). iSER
    turns every R2T into an RDMA READ and never sends it."""

    OPCODE: ClassVar = IscsiOpcode.R2T
    _FIELDS: ClassVar = (
        ("lun", 8, "8s"),
        ("itt", 16, "I"),
        ("ttt", 20, "I"),
        ("statsn", 24, "I"),
        ("exp_cmdsn", 28, "I"),
        ("max_cmdsn", 32, "I"),
        ("r2tsn", 36, "I"),
        ("data_offset", 40, "I"),
        ("data_length", 44, "I"),
    )
    _FIXED: ClassVar = 0x80

    lun: int = 0
    itt: int = 0
    ttt: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    r2tsn: int = 0
    data_offset: int = 0
    data_length: int = 0
