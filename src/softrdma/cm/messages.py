"""Byte-exact codecs for the IB CM messages (IBTA vol. 1 ch. 12).

Kernel counterparts: ``include/rdma/ibta_vol1_c12.h`` (the field table of
every message: ``CM_REQ_*``, ``CM_REP_*``, ...), ``include/rdma/iba.h``
(``IBA_GET`` / ``IBA_SET``), the ``cm_format_*`` / ``cm_*_handler``
functions of ``drivers/infiniband/core/cm.c`` and the enums of
``include/rdma/ib_cm.h``.

Every CM message is the class data of a 256-byte MAD (management class
0x07, class version 2): the 232 bytes after the common MAD header
(:mod:`softrdma.mad.header`). Fields are big-endian bit fields, numbered as
the IBTA tables do: *byte offset* into the class data, *bit offset* below
the most significant bit of that byte, *width*. Each message class below
lists its layout in that form (``_Int(name, byte, bit, width)``) next to
its fields, and one shared codec (``_Layout``) turns the table into a
precompiled :class:`struct.Struct` plus shifts and masks.

Private data, ARI and additional information are fixed-size on the wire:
a shorter value given to a constructor is zero-padded to the full size
there and then (so a message compares equal to its decoded encoding); a
longer one makes :meth:`encode` raise :class:`MadError`.

Reserved bits are kept, not dropped: each message has a ``reserved`` field
holding whatever the reserved positions carried (an integer over the 232
data bytes, big-endian, with only reserved bit positions set). Conforming
senders leave it zero; keeping it makes *any* 232 bytes decode and
re-encode byte for byte.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self, TypeAlias

from softrdma.mad.header import (
    IB_MGMT_BASE_VERSION,
    MAD_DATA_SIZE,
    MAD_HDR_SIZE,
    MAD_SIZE,
    MadError,
    MadHdr,
    MalformedMad,
    MgmtClass,
    make_mad,
)
from softrdma.transport.headers import BytesLike

__all__ = [
    "CM_CLASS_VERSION",
    "CmApr",
    "CmAprStatus",
    "CmAttrId",
    "CmDrep",
    "CmDreq",
    "CmLap",
    "CmMessage",
    "CmMra",
    "CmMsgResponse",
    "CmRej",
    "CmRejReason",
    "CmRep",
    "CmReq",
    "CmRtu",
    "CmSidrRep",
    "CmSidrReq",
    "CmSidrStatus",
    "cm_message_class",
    "decode_cm_mad",
    "encode_cm_mad",
]

CM_CLASS_VERSION: Final = 2
"""``IB_CM_CLASS_VERSION``: the class version of every CM MAD."""

_GID_SIZE = 16
_ALL_ONES = (1 << (8 * MAD_DATA_SIZE)) - 1


class CmAttrId(enum.IntEnum):
    """CM attribute IDs (``CM_*_ATTR_ID`` in ``cm.c`` / ``ib_cm.h``)."""

    CLASS_PORT_INFO = 0x0001
    REQ = 0x0010
    MRA = 0x0011
    REJ = 0x0012
    REP = 0x0013
    RTU = 0x0014
    DREQ = 0x0015
    DREP = 0x0016
    SIDR_REQ = 0x0017
    SIDR_REP = 0x0018
    LAP = 0x0019
    APR = 0x001A


class CmRejReason(enum.IntEnum):
    """REJ reason codes (IBTA Table 109, ``enum ib_cm_rej_reason``)."""

    NO_QP = 1
    NO_EEC = 2
    NO_RESOURCES = 3
    TIMEOUT = 4
    UNSUPPORTED_REQ = 5
    INVALID_COMM_ID = 6
    INVALID_COMM_INSTANCE = 7
    INVALID_SERVICE_ID = 8
    INVALID_TRANSPORT_TYPE = 9
    STALE_CONN = 10
    RDC_NOT_EXIST = 11
    INVALID_GID = 12
    INVALID_LID = 13
    INVALID_SL = 14
    INVALID_TRAFFIC_CLASS = 15
    INVALID_HOP_LIMIT = 16
    INVALID_PACKET_RATE = 17
    INVALID_ALT_GID = 18
    INVALID_ALT_LID = 19
    INVALID_ALT_SL = 20
    INVALID_ALT_TRAFFIC_CLASS = 21
    INVALID_ALT_HOP_LIMIT = 22
    INVALID_ALT_PACKET_RATE = 23
    PORT_CM_REDIRECT = 24
    PORT_REDIRECT = 25
    INVALID_MTU = 26
    INSUFFICIENT_RESP_RESOURCES = 27
    CONSUMER_DEFINED = 28
    INVALID_RNR_RETRY = 29
    DUPLICATE_LOCAL_COMM_ID = 30
    INVALID_CLASS_VERSION = 31
    INVALID_FLOW_LABEL = 32
    INVALID_ALT_FLOW_LABEL = 33
    VENDOR_OPTION_NOT_SUPPORTED = 35


class CmMsgResponse(enum.IntEnum):
    """Which message a REJ rejects / an MRA acknowledges (the 2-bit
    ``Message REJected`` / ``Message MRAed`` field; ``enum cm_msg_response``
    in ``cm.c``). For an MRA, ``OTHER`` means a LAP."""

    REQ = 0
    REP = 1
    OTHER = 2


class CmAprStatus(enum.IntEnum):
    """APR ``AP Status`` (IBTA Table 117, ``enum ib_cm_apr_status``)."""

    SUCCESS = 0
    INVALID_COMM_ID = 1
    UNSUPPORTED = 2
    REJECT = 3
    REDIRECT = 4
    IS_CURRENT = 5
    INVALID_QPN_EECN = 6
    INVALID_LID = 7
    INVALID_GID = 8
    INVALID_FLOW_LABEL = 9
    INVALID_TCLASS = 10
    INVALID_HOP_LIMIT = 11
    INVALID_PACKET_RATE = 12
    INVALID_SL = 13


class CmSidrStatus(enum.IntEnum):
    """SIDR_REP ``Status`` (IBTA Table 120, ``enum ib_cm_sidr_status``)."""

    SUCCESS = 0
    UNSUPPORTED = 1
    REJECT = 2
    NO_QP = 3
    REDIRECT = 4
    UNSUPPORTED_VERSION = 5


# --------------------------------------------------------------------------
# The layout engine: an IBTA-style field table -> one Struct + shifts/masks.


@dataclass(frozen=True, slots=True)
class _Int:
    """An integer field: ``width`` bits starting ``bit`` bits below the MSB
    of byte ``byte`` (``IBA_FIELD_BLOC``). ``more`` continues the value in
    further (byte, bit, width) pieces, most significant first (the ECE
    vendor ID is split over several bytes). ``conv`` turns the decoded
    integer into the field's Python value (``bool``, an enum)."""

    name: str
    byte: int
    bit: int
    width: int
    more: tuple[tuple[int, int, int], ...] = ()
    conv: Callable[[int], Any] | None = None


@dataclass(frozen=True, slots=True)
class _Bytes:
    """A byte-string field of ``size`` bytes at byte ``byte``. ``exact``:
    the value must be exactly ``size`` bytes (GIDs); otherwise shorter
    values are zero-padded (private data, ARI, additional information)."""

    name: str
    byte: int
    size: int
    exact: bool = False


def _enum_or_int(kind: type[enum.IntEnum]) -> Callable[[int], int]:
    """A decoder converter: the enum member for a known value, else the int."""
    members = kind._value2member_map_

    def conv(v: int) -> int:
        return kind(v) if v in members else v

    return conv


def _flag(v: int) -> bool:
    return bool(v)


class _Layout:
    """The codec of one message: a precompiled big-endian :class:`struct.Struct`
    over the 232 data bytes (``u8``/``u16``/``u32``/``u64`` containers and
    byte strings, reserved gaps as pad strings) and, per integer field, the
    container index, shift and mask of each piece."""

    __slots__ = (
        "_blobs",
        "_ints",
        "_struct",
        "_zero",
        "names",
        "padded",
        "reserved_mask",
        "what",
    )

    def __init__(self, what: str, fields: tuple[_Int | _Bytes, ...]) -> None:
        self.what = what
        # (start_byte, size, kind): kind "u" (integer container) or "s" (bytes).
        containers: list[tuple[int, int, str]] = []
        pieces: list[tuple[str, int, int, int]] = []  # name, start bit, width, piece no.
        for f in fields:
            if isinstance(f, _Bytes):
                containers.append((f.byte, f.size, "s"))
                continue
            for n, (byte, bit, width) in enumerate(((f.byte, f.bit, f.width), *f.more)):
                start = byte * 8 + bit
                pieces.append((f.name, start, width, n))
                containers.append(_container(what, f.name, start, width))
        # Keep outermost containers; nested ones fold into their parent.
        containers.sort(key=lambda c: (c[0], -c[1]))
        kept: list[tuple[int, int, str]] = []
        for c in containers:
            if kept and c[0] < kept[-1][0] + kept[-1][1]:
                outer = kept[-1]
                if c[0] + c[1] > outer[0] + outer[1] or "s" in (c[2], outer[2]):
                    raise AssertionError(f"{what}: overlapping fields at byte {c[0]}")
                continue
            kept.append(c)
        # Reserved gaps become pad strings; build the struct format.
        items: list[tuple[int, int, str]] = []
        pos = 0
        for c in [*kept, (MAD_DATA_SIZE, 0, "end")]:
            if c[0] > pos:
                items.append((pos, c[0] - pos, "pad"))
            if c[2] != "end":
                items.append(c)
            pos = c[0] + c[1]
        if pos != MAD_DATA_SIZE:
            raise AssertionError(f"{what}: fields run past {MAD_DATA_SIZE} bytes")
        codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
        self._struct = struct.Struct(
            ">" + "".join(codes[size] if kind == "u" else f"{size}s" for _, size, kind in items)
        )
        index = {start: i for i, (start, _, _) in enumerate(items)}
        # Per-field piece tables and the used bits of each container.
        used = [0] * len(items)
        by_name: dict[str, list[tuple[int, int, int, int]]] = {}
        for name, start, width, _ in pieces:
            i = max(j for j, (s, _, _) in enumerate(items) if s * 8 <= start)
            cstart, csize, _kind = items[i]
            shift = (cstart + csize) * 8 - start - width
            mask = (1 << width) - 1
            if used[i] & (mask << shift):
                raise AssertionError(f"{what}.{name}: overlaps another field")
            used[i] |= mask << shift
            by_name.setdefault(name, []).append((i, shift, mask, width))
        ints: list[
            tuple[str, tuple[tuple[int, int, int, int], ...], int, Callable[[int], Any]]
        ] = []
        blobs: list[tuple[str, int, int, bool]] = []
        for f in fields:
            if isinstance(f, _Int):
                ps = tuple(by_name[f.name])
                total = sum(p[3] for p in ps)
                ints.append((f.name, ps, (1 << total) - 1, f.conv or int))
            else:
                blobs.append((f.name, index[f.byte], f.size, f.exact))
        self._ints = tuple(ints)
        self._blobs = tuple(blobs)
        self.padded = tuple((name, size) for name, _, size, exact in blobs if not exact)
        """The zero-padded byte fields (private data, ARI, ...) and their sizes."""
        self.names = tuple(f.name for f in fields)
        self._zero = tuple(0 if kind == "u" else b"" for _, _, kind in items)
        rmask = [
            ((1 << (8 * size)) - 1) ^ used[i]
            if kind == "u"
            else (b"\xff" * size if kind == "pad" else b"")
            for i, (_, size, kind) in enumerate(items)
        ]
        self.reserved_mask = int.from_bytes(self._struct.pack(*rmask))
        """The reserved bit positions, as an integer over the 232 bytes."""

    def decode(self, data: BytesLike) -> dict[str, Any]:
        """The field values of ``data`` (at least 232 bytes) by name."""
        if len(data) < MAD_DATA_SIZE:
            raise MalformedMad(
                f"CM {self.what} of {len(data)} bytes: its class data is {MAD_DATA_SIZE} bytes"
            )
        vals = self._struct.unpack_from(data)
        out: dict[str, Any] = {}
        for name, pieces, _, conv in self._ints:
            v = 0
            for i, shift, mask, width in pieces:
                v = (v << width) | ((vals[i] >> shift) & mask)
            out[name] = conv(v)
        for name, i, _, _ in self._blobs:
            out[name] = vals[i]
        out["reserved"] = int.from_bytes(data[:MAD_DATA_SIZE]) & self.reserved_mask
        return out

    def encode(self, msg: object, reserved: int) -> bytes:
        """The 232 bytes of ``msg`` with ``reserved`` ORed in; :class:`MadError`
        for a field out of range."""
        vals: list[Any] = list(self._zero)
        for name, pieces, limit, _ in self._ints:
            v = getattr(msg, name)
            if not isinstance(v, int) or not 0 <= v <= limit:
                raise MadError(f"CM {self.what} {name}={v!r}: out of range (0..{limit:#x})")
            for i, shift, mask, width in reversed(pieces):
                vals[i] |= (v & mask) << shift
                v >>= width
        for name, i, size, exact in self._blobs:
            b = getattr(msg, name)
            if not isinstance(b, bytes | bytearray | memoryview):
                raise MadError(f"CM {self.what} {name}: bytes expected, got {type(b).__name__}")
            n = len(b)
            if n > size or (exact and n != size):
                need = f"exactly {size}" if exact else f"at most {size}"
                raise MadError(f"CM {self.what} {name} of {n} bytes: {need} bytes")
            vals[i] = bytes(b)
        out = self._struct.pack(*vals)
        if reserved:
            if not isinstance(reserved, int) or reserved < 0 or reserved & ~self.reserved_mask:
                raise MadError(
                    f"CM {self.what} reserved={reserved!r}: sets bits outside the reserved positions"
                )
            out = (int.from_bytes(out) | reserved).to_bytes(MAD_DATA_SIZE)
        return out


def _container(what: str, name: str, start: int, width: int) -> tuple[int, int, str]:
    """The integer container (start byte, size) that holds bits ``start`` ..
    ``start + width``: the smallest naturally aligned u8/u16/u32, as
    ``IBA_FIELD{8,16,32}_LOC`` do, or a u64 at the field's own (4-byte
    aligned) offset for 64-bit fields (``IBA_FIELD64_LOC``)."""
    for size in (1, 2, 4):
        byte = (start // 8) & ~(size - 1)
        if start + width <= (byte + size) * 8:
            return (byte, size, "u")
    if width == 64 and start % 8 == 0:
        return (start // 8, 8, "u")
    raise AssertionError(f"{what}.{name}: no container for {width} bits at bit {start}")


# --------------------------------------------------------------------------
# The messages.


class _CmMsg:
    """Shared ``encode`` / ``decode`` of the message dataclasses below."""

    __slots__ = ()

    ATTR_ID: ClassVar[CmAttrId]
    """The MAD attribute ID of this message."""
    PRIVATE_DATA_SIZE: ClassVar[int]
    """``IB_CM_*_PRIVATE_DATA_SIZE``: bytes of private data it carries."""
    _LAYOUT: ClassVar[_Layout]

    if TYPE_CHECKING:
        reserved: int

        def __init__(self, **kwargs: Any) -> None: ...

    def __post_init__(self) -> None:
        # Private data (and ARI / additional information) is a fixed-size
        # field on the wire: pad a shorter value now, so that a message equals
        # its own decoded encoding. Over-long values are left for encode().
        for name, size in self._LAYOUT.padded:
            v = getattr(self, name)
            if isinstance(v, bytes | bytearray | memoryview) and len(v) < size:
                object.__setattr__(self, name, bytes(v) + bytes(size - len(v)))

    def encode(self) -> bytes:
        """The 232 class-data bytes (``cm_format_*`` in cm.c): reserved bits as
        in ``reserved`` (zero unless decoded from a peer that set them). Raises :class:`MadError` for a field
        out of range, over-long private data or a GID that is not 16 bytes."""
        return self._LAYOUT.encode(self, self.reserved)

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The message in the first 232 bytes of ``data`` (``IBA_GET`` on a
        received MAD's data). Raises :class:`MalformedMad` if ``data`` is
        shorter than 232 bytes. Every bit pattern decodes: unknown enum values
        stay plain ints, reserved bits go to ``reserved``."""
        return cls(**cls._LAYOUT.decode(data))


def _layout(cls: type[_CmMsg], *fields: _Int | _Bytes) -> _Layout:
    """Build ``cls``'s layout and check it names exactly the dataclass fields."""
    layout = _Layout(cls.ATTR_ID.name, fields)
    names = {f.name for f in dataclasses.fields(cls)} - {"reserved"}  # type: ignore[arg-type]
    if names != set(layout.names):
        raise AssertionError(f"{cls.__name__}: layout names {set(layout.names) ^ names}")
    return layout


def _path(prefix: str, byte: int) -> tuple[_Int | _Bytes, ...]:
    """The 44-byte path block of a REQ (primary at 52, alternate at 96)."""
    return (
        _Int(f"{prefix}_local_lid", byte, 0, 16),
        _Int(f"{prefix}_remote_lid", byte + 2, 0, 16),
        _Bytes(f"{prefix}_local_gid", byte + 4, _GID_SIZE, exact=True),
        _Bytes(f"{prefix}_remote_gid", byte + 20, _GID_SIZE, exact=True),
        _Int(f"{prefix}_flow_label", byte + 36, 0, 20),
        _Int(f"{prefix}_packet_rate", byte + 39, 2, 6),
        _Int(f"{prefix}_traffic_class", byte + 40, 0, 8),
        _Int(f"{prefix}_hop_limit", byte + 41, 0, 8),
        _Int(f"{prefix}_sl", byte + 42, 0, 4),
        _Int(f"{prefix}_subnet_local", byte + 42, 4, 1, conv=_flag),
        _Int(f"{prefix}_local_ack_timeout", byte + 43, 0, 5),
    )


_ZERO_GID = bytes(_GID_SIZE)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmReq(_CmMsg):
    """REQ, request for communication (IBTA Table 106; ``struct cm_req_msg``,
    cm.c ``cm_format_req`` / ``cm_req_handler``).

    ``local_qpn`` is the sender's QP; ``starting_psn`` is the PSN the
    *sender's receive queue* expects first, i.e. the first PSN the passive
    side sends with (cm.c ``ib_send_cm_req`` stores it as ``rq_psn``; the
    Linux captures agree). ``transport_service_type``: 0 RC, 1 UC, 2 RD,
    3 extended (then ``extended_transport_type`` 1 = XRC). ``path_mtu`` is
    the ``enum ib_mtu`` value (1 = 256 ... 5 = 4096). The timeouts are the
    usual 4.096 µs × 2^n exponents. ``vendor_id`` is the ECE vendor ID
    (24 bits in bytes 5..7, ``CM_REQ_VENDOR_ID``). For RDMA CM the private
    data starts with a :class:`~softrdma.cm.cma_hdr.CmaHdr`.
    """

    ATTR_ID: ClassVar[CmAttrId] = CmAttrId.REQ
    PRIVATE_DATA_SIZE: ClassVar[int] = 92

    local_comm_id: int = 0
    vendor_id: int = 0
    service_id: int = 0
    local_ca_guid: int = 0
    local_qkey: int = 0
    local_qpn: int = 0
    responder_resources: int = 0
    local_eecn: int = 0
    initiator_depth: int = 0
    remote_eecn: int = 0
    remote_cm_response_timeout: int = 0
    transport_service_type: int = 0
    end_to_end_flow_control: bool = False
    starting_psn: int = 0
    local_cm_response_timeout: int = 0
    retry_count: int = 0
    partition_key: int = 0
    path_mtu: int = 0
    rdc_exists: bool = False
    rnr_retry_count: int = 0
    max_cm_retries: int = 0
    srq: bool = False
    extended_transport_type: int = 0
    primary_local_lid: int = 0
    primary_remote_lid: int = 0
    primary_local_gid: bytes = _ZERO_GID
    primary_remote_gid: bytes = _ZERO_GID
    primary_flow_label: int = 0
    primary_packet_rate: int = 0
    primary_traffic_class: int = 0
    primary_hop_limit: int = 0
    primary_sl: int = 0
    primary_subnet_local: bool = False
    primary_local_ack_timeout: int = 0
    alternate_local_lid: int = 0
    alternate_remote_lid: int = 0
    alternate_local_gid: bytes = _ZERO_GID
    alternate_remote_gid: bytes = _ZERO_GID
    alternate_flow_label: int = 0
    alternate_packet_rate: int = 0
    alternate_traffic_class: int = 0
    alternate_hop_limit: int = 0
    alternate_sl: int = 0
    alternate_subnet_local: bool = False
    alternate_local_ack_timeout: int = 0
    sap_supported: bool = False
    private_data: bytes = b""
    reserved: int = 0
    """Reserved bits as received (integer over the 232 bytes); 0 to send."""


CmReq._LAYOUT = _layout(
    CmReq,
    _Int("local_comm_id", 0, 0, 32),
    _Int("vendor_id", 5, 0, 24),
    _Int("service_id", 8, 0, 64),
    _Int("local_ca_guid", 16, 0, 64),
    _Int("local_qkey", 28, 0, 32),
    _Int("local_qpn", 32, 0, 24),
    _Int("responder_resources", 35, 0, 8),
    _Int("local_eecn", 36, 0, 24),
    _Int("initiator_depth", 39, 0, 8),
    _Int("remote_eecn", 40, 0, 24),
    _Int("remote_cm_response_timeout", 43, 0, 5),
    _Int("transport_service_type", 43, 5, 2),
    _Int("end_to_end_flow_control", 43, 7, 1, conv=_flag),
    _Int("starting_psn", 44, 0, 24),
    _Int("local_cm_response_timeout", 47, 0, 5),
    _Int("retry_count", 47, 5, 3),
    _Int("partition_key", 48, 0, 16),
    _Int("path_mtu", 50, 0, 4),
    _Int("rdc_exists", 50, 4, 1, conv=_flag),
    _Int("rnr_retry_count", 50, 5, 3),
    _Int("max_cm_retries", 51, 0, 4),
    _Int("srq", 51, 4, 1, conv=_flag),
    _Int("extended_transport_type", 51, 5, 3),
    *_path("primary", 52),
    *_path("alternate", 96),
    _Int("sap_supported", 139, 5, 1, conv=_flag),
    _Bytes("private_data", 140, CmReq.PRIVATE_DATA_SIZE),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmMra(_CmMsg):
    """MRA, message receipt acknowledgement (IBTA Table 107; ``struct
    cm_mra_msg``, cm.c ``cm_format_mra`` / ``cm_mra_handler``).
    ``message_mraed``: :class:`CmMsgResponse` (REQ, REP, OTHER = LAP);
    ``service_timeout``: 4.096 µs × 2^n the sender needs."""

    ATTR_ID: ClassVar[CmAttrId] = CmAttrId.MRA
    PRIVATE_DATA_SIZE: ClassVar[int] = 222

    local_comm_id: int = 0
    remote_comm_id: int = 0
    message_mraed: int = 0
    service_timeout: int = 0
    private_data: bytes = b""
    reserved: int = 0
    """Reserved bits as received (integer over the 232 bytes); 0 to send."""


CmMra._LAYOUT = _layout(
    CmMra,
    _Int("local_comm_id", 0, 0, 32),
    _Int("remote_comm_id", 4, 0, 32),
    _Int("message_mraed", 8, 0, 2, conv=_enum_or_int(CmMsgResponse)),
    _Int("service_timeout", 9, 0, 5),
    _Bytes("private_data", 10, CmMra.PRIVATE_DATA_SIZE),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmRej(_CmMsg):
    """REJ, reject (IBTA Table 108; ``struct cm_rej_msg``, cm.c
    ``cm_format_rej`` / ``cm_rej_handler``). ``message_rejected``:
    :class:`CmMsgResponse`; ``reason``: :class:`CmRejReason` (a plain int
    for codes it does not name); ``ari``: the additional reject information,
    of which ``reject_info_length`` bytes are meaningful."""

    ATTR_ID: ClassVar[CmAttrId] = CmAttrId.REJ
    PRIVATE_DATA_SIZE: ClassVar[int] = 148
    ARI_SIZE: ClassVar[int] = 72
    """``IB_CM_REJ_ARI_LENGTH``."""

    local_comm_id: int = 0
    remote_comm_id: int = 0
    message_rejected: int = 0
    reject_info_length: int = 0
    reason: int = 0
    ari: bytes = b""
    private_data: bytes = b""
    reserved: int = 0
    """Reserved bits as received (integer over the 232 bytes); 0 to send."""


CmRej._LAYOUT = _layout(
    CmRej,
    _Int("local_comm_id", 0, 0, 32),
    _Int("remote_comm_id", 4, 0, 32),
    _Int("message_rejected", 8, 0, 2, conv=_enum_or_int(CmMsgResponse)),
    _Int("reject_info_length", 9, 0, 7),
    _Int("reason", 10, 0, 16, conv=_enum_or_int(CmRejReason)),
    _Bytes("ari", 12, CmRej.ARI_SIZE),
    _Bytes("private_data", 84, CmRej.PRIVATE_DATA_SIZE),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmRep(_CmMsg):
    """REP, reply to request for communication (IBTA Table 110; ``struct
    cm_rep_msg``, cm.c ``cm_format_rep`` / ``cm_rep_handler``).

    ``starting_psn`` is the PSN the replier's receive queue expects, i.e. the
    first PSN the active side sends with. ``failover_accepted``: 0 accepted,
    1 rejected, 2 unsupported. ``vendor_id`` is the ECE vendor ID, whose
    three bytes sit at 15, 19 and 23 (``CM_REP_VENDOR_ID_H/M/L``).
    """

    ATTR_ID: ClassVar[CmAttrId] = CmAttrId.REP
    PRIVATE_DATA_SIZE: ClassVar[int] = 196

    local_comm_id: int = 0
    remote_comm_id: int = 0
    local_qkey: int = 0
    local_qpn: int = 0
    vendor_id: int = 0
    local_eecn: int = 0
    starting_psn: int = 0
    responder_resources: int = 0
    initiator_depth: int = 0
    target_ack_delay: int = 0
    failover_accepted: int = 0
    end_to_end_flow_control: bool = False
    rnr_retry_count: int = 0
    srq: bool = False
    local_ca_guid: int = 0
    private_data: bytes = b""
    reserved: int = 0
    """Reserved bits as received (integer over the 232 bytes); 0 to send."""


CmRep._LAYOUT = _layout(
    CmRep,
    _Int("local_comm_id", 0, 0, 32),
    _Int("remote_comm_id", 4, 0, 32),
    _Int("local_qkey", 8, 0, 32),
    _Int("local_qpn", 12, 0, 24),
    _Int("vendor_id", 15, 0, 8, more=((19, 0, 8), (23, 0, 8))),
    _Int("local_eecn", 16, 0, 24),
    _Int("starting_psn", 20, 0, 24),
    _Int("responder_resources", 24, 0, 8),
    _Int("initiator_depth", 25, 0, 8),
    _Int("target_ack_delay", 26, 0, 5),
    _Int("failover_accepted", 26, 5, 2),
    _Int("end_to_end_flow_control", 26, 7, 1, conv=_flag),
    _Int("rnr_retry_count", 27, 0, 3),
    _Int("srq", 27, 3, 1, conv=_flag),
    _Int("local_ca_guid", 28, 0, 64),
    _Bytes("private_data", 36, CmRep.PRIVATE_DATA_SIZE),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmRtu(_CmMsg):
    """RTU, ready to use (IBTA Table 111; ``struct cm_rtu_msg``, cm.c
    ``ib_send_cm_rtu`` / ``cm_rtu_handler``)."""

    ATTR_ID: ClassVar[CmAttrId] = CmAttrId.RTU
    PRIVATE_DATA_SIZE: ClassVar[int] = 224

    local_comm_id: int = 0
    remote_comm_id: int = 0
    private_data: bytes = b""
    reserved: int = 0
    """Reserved bits as received (integer over the 232 bytes); 0 to send."""


CmRtu._LAYOUT = _layout(
    CmRtu,
    _Int("local_comm_id", 0, 0, 32),
    _Int("remote_comm_id", 4, 0, 32),
    _Bytes("private_data", 8, CmRtu.PRIVATE_DATA_SIZE),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmDreq(_CmMsg):
    """DREQ, request for communication release (IBTA Table 112; ``struct
    cm_dreq_msg``, cm.c ``cm_format_dreq`` / ``cm_dreq_handler``).
    ``remote_qpn`` is the receiver's QPN (or EECN)."""

    ATTR_ID: ClassVar[CmAttrId] = CmAttrId.DREQ
    PRIVATE_DATA_SIZE: ClassVar[int] = 220

    local_comm_id: int = 0
    remote_comm_id: int = 0
    remote_qpn: int = 0
    private_data: bytes = b""
    reserved: int = 0
    """Reserved bits as received (integer over the 232 bytes); 0 to send."""


CmDreq._LAYOUT = _layout(
    CmDreq,
    _Int("local_comm_id", 0, 0, 32),
    _Int("remote_comm_id", 4, 0, 32),
    _Int("remote_qpn", 8, 0, 24),
    _Bytes("private_data", 12, CmDreq.PRIVATE_DATA_SIZE),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmDrep(_CmMsg):
    """DREP, reply to request for communication release (IBTA Table 113;
    ``struct cm_drep_msg``, cm.c ``cm_format_drep`` / ``cm_drep_handler``)."""

    ATTR_ID: ClassVar[CmAttrId] = CmAttrId.DREP
    PRIVATE_DATA_SIZE: ClassVar[int] = 224

    local_comm_id: int = 0
    remote_comm_id: int = 0
    private_data: bytes = b""
    reserved: int = 0
    """Reserved bits as received (integer over the 232 bytes); 0 to send."""


CmDrep._LAYOUT = _layout(
    CmDrep,
    _Int("local_comm_id", 0, 0, 32),
    _Int("remote_comm_id", 4, 0, 32),
    _Bytes("private_data", 8, CmDrep.PRIVATE_DATA_SIZE),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmSidrReq(_CmMsg):
    """SIDR_REQ, service ID resolution request (IBTA Table 119; ``struct
    cm_sidr_req_msg``, cm.c ``cm_format_sidr_req`` / ``cm_sidr_req_handler``).
    RDMA CM uses it for UD ports (``RDMA_PS_UDP``), with a CmaHdr at the
    start of the private data."""

    ATTR_ID: ClassVar[CmAttrId] = CmAttrId.SIDR_REQ
    PRIVATE_DATA_SIZE: ClassVar[int] = 216

    request_id: int = 0
    partition_key: int = 0
    service_id: int = 0
    private_data: bytes = b""
    reserved: int = 0
    """Reserved bits as received (integer over the 232 bytes); 0 to send."""


CmSidrReq._LAYOUT = _layout(
    CmSidrReq,
    _Int("request_id", 0, 0, 32),
    _Int("partition_key", 4, 0, 16),
    _Int("service_id", 8, 0, 64),
    _Bytes("private_data", 16, CmSidrReq.PRIVATE_DATA_SIZE),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmSidrRep(_CmMsg):
    """SIDR_REP, service ID resolution response (IBTA Table 120; ``struct
    cm_sidr_rep_msg``, cm.c ``cm_format_sidr_rep`` / ``cm_sidr_rep_handler``).
    ``status``: :class:`CmSidrStatus`; ``vendor_id``: the ECE vendor ID
    (16 bits at byte 6, 8 bits at byte 11)."""

    ATTR_ID: ClassVar[CmAttrId] = CmAttrId.SIDR_REP
    PRIVATE_DATA_SIZE: ClassVar[int] = 136
    INFO_SIZE: ClassVar[int] = 72
    """``IB_CM_SIDR_REP_INFO_LENGTH``."""

    request_id: int = 0
    status: int = 0
    additional_info_length: int = 0
    vendor_id: int = 0
    qpn: int = 0
    service_id: int = 0
    qkey: int = 0
    additional_info: bytes = b""
    private_data: bytes = b""
    reserved: int = 0
    """Reserved bits as received (integer over the 232 bytes); 0 to send."""


CmSidrRep._LAYOUT = _layout(
    CmSidrRep,
    _Int("request_id", 0, 0, 32),
    _Int("status", 4, 0, 8, conv=_enum_or_int(CmSidrStatus)),
    _Int("additional_info_length", 5, 0, 8),
    _Int("vendor_id", 6, 0, 16, more=((11, 0, 8),)),
    _Int("qpn", 8, 0, 24),
    _Int("service_id", 12, 0, 64),
    _Int("qkey", 20, 0, 32),
    _Bytes("additional_info", 24, CmSidrRep.INFO_SIZE),
    _Bytes("private_data", 96, CmSidrRep.PRIVATE_DATA_SIZE),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmLap(_CmMsg):
    """LAP, load alternate path (IBTA Table 115; ``struct cm_lap_msg``, cm.c
    ``cm_format_lap`` / ``cm_lap_handler``). ``remote_qpn`` is the
    receiver's QPN (or EECN)."""

    ATTR_ID: ClassVar[CmAttrId] = CmAttrId.LAP
    PRIVATE_DATA_SIZE: ClassVar[int] = 168

    local_comm_id: int = 0
    remote_comm_id: int = 0
    remote_qpn: int = 0
    remote_cm_response_timeout: int = 0
    alternate_local_lid: int = 0
    alternate_remote_lid: int = 0
    alternate_local_gid: bytes = _ZERO_GID
    alternate_remote_gid: bytes = _ZERO_GID
    alternate_flow_label: int = 0
    alternate_traffic_class: int = 0
    alternate_hop_limit: int = 0
    alternate_packet_rate: int = 0
    alternate_sl: int = 0
    alternate_subnet_local: bool = False
    alternate_local_ack_timeout: int = 0
    private_data: bytes = b""
    reserved: int = 0
    """Reserved bits as received (integer over the 232 bytes); 0 to send."""


CmLap._LAYOUT = _layout(
    CmLap,
    _Int("local_comm_id", 0, 0, 32),
    _Int("remote_comm_id", 4, 0, 32),
    _Int("remote_qpn", 12, 0, 24),
    _Int("remote_cm_response_timeout", 15, 0, 5),
    _Int("alternate_local_lid", 20, 0, 16),
    _Int("alternate_remote_lid", 22, 0, 16),
    _Bytes("alternate_local_gid", 24, _GID_SIZE, exact=True),
    _Bytes("alternate_remote_gid", 40, _GID_SIZE, exact=True),
    _Int("alternate_flow_label", 56, 0, 20),
    _Int("alternate_traffic_class", 59, 0, 8),
    _Int("alternate_hop_limit", 60, 0, 8),
    _Int("alternate_packet_rate", 61, 2, 6),
    _Int("alternate_sl", 62, 0, 4),
    _Int("alternate_subnet_local", 62, 4, 1, conv=_flag),
    _Int("alternate_local_ack_timeout", 63, 0, 5),
    _Bytes("private_data", 64, CmLap.PRIVATE_DATA_SIZE),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmApr(_CmMsg):
    """APR, alternate path response (IBTA Table 116; ``struct cm_apr_msg``,
    cm.c ``cm_format_apr`` / ``cm_apr_handler``). ``ap_status``:
    :class:`CmAprStatus`."""

    ATTR_ID: ClassVar[CmAttrId] = CmAttrId.APR
    PRIVATE_DATA_SIZE: ClassVar[int] = 148
    INFO_SIZE: ClassVar[int] = 72
    """``IB_CM_APR_INFO_LENGTH``."""

    local_comm_id: int = 0
    remote_comm_id: int = 0
    additional_info_length: int = 0
    ap_status: int = 0
    additional_info: bytes = b""
    private_data: bytes = b""
    reserved: int = 0
    """Reserved bits as received (integer over the 232 bytes); 0 to send."""


CmApr._LAYOUT = _layout(
    CmApr,
    _Int("local_comm_id", 0, 0, 32),
    _Int("remote_comm_id", 4, 0, 32),
    _Int("additional_info_length", 8, 0, 8),
    _Int("ap_status", 9, 0, 8, conv=_enum_or_int(CmAprStatus)),
    _Bytes("additional_info", 12, CmApr.INFO_SIZE),
    _Bytes("private_data", 84, CmApr.PRIVATE_DATA_SIZE),
)


CmMessage: TypeAlias = (
    CmReq | CmMra | CmRej | CmRep | CmRtu | CmDreq | CmDrep | CmSidrReq | CmSidrRep | CmLap | CmApr
)
"""Any CM message this module encodes and decodes."""

_BY_ATTR: dict[int, type[CmMessage]] = {
    cls.ATTR_ID: cls
    for cls in (
        CmReq,
        CmMra,
        CmRej,
        CmRep,
        CmRtu,
        CmDreq,
        CmDrep,
        CmSidrReq,
        CmSidrRep,
        CmLap,
        CmApr,
    )
}


def cm_message_class(attr_id: int) -> type[CmMessage]:
    """The message class for a CM attribute ID (the ``switch`` on
    ``attr_id`` in cm.c ``cm_recv_handler``). Raises :class:`MalformedMad`
    for ClassPortInfo (a MAD-layer attribute, not a connection message) and
    for IDs the CM class does not define."""
    cls = _BY_ATTR.get(attr_id)
    if cls is None:
        if attr_id == CmAttrId.CLASS_PORT_INFO:
            raise MalformedMad("CM attribute ClassPortInfo (0x0001) is not a connection message")
        raise MalformedMad(f"unknown CM attribute ID {attr_id:#06x}")
    return cls


def decode_cm_mad(mad: BytesLike) -> tuple[MadHdr, CmMessage]:
    """Header and message of a whole 256-byte CM MAD (cm.c
    ``cm_recv_handler`` + the message's handler). Raises :class:`MalformedMad`
    if it is not 256 bytes, not base version 1, not the CM class (0x07), not
    class version 2, or not a CM message attribute. The method is not checked
    (CM messages are SENDs; the MAD layer routes by method)."""
    if len(mad) != MAD_SIZE:
        raise MalformedMad(f"CM MAD of {len(mad)} bytes: a CM MAD is exactly {MAD_SIZE} bytes")
    hdr = MadHdr.decode(mad)
    if hdr.base_version != IB_MGMT_BASE_VERSION:
        raise MalformedMad(
            f"MAD base version {hdr.base_version}: CM MADs have base version {IB_MGMT_BASE_VERSION}"
        )
    if hdr.mgmt_class != MgmtClass.CM:
        raise MalformedMad(
            f"MAD management class {hdr.mgmt_class:#04x}: not the CM class ({MgmtClass.CM:#04x})"
        )
    if hdr.class_version != CM_CLASS_VERSION:
        raise MalformedMad(
            f"CM MAD class version {hdr.class_version}: only class version "
            f"{CM_CLASS_VERSION} is defined"
        )
    cls = cm_message_class(hdr.attr_id)
    return hdr, cls.decode(memoryview(mad)[MAD_HDR_SIZE:])


def encode_cm_mad(hdr: MadHdr, msg: CmMessage) -> bytes:
    """The 256-byte MAD carrying ``msg`` (cm.c ``cm_format_mad_hdr`` +
    ``cm_format_*``): ``hdr`` with ``attr_id`` set to the message's, then its
    232 data bytes. Raises :class:`MadError` for a field out of range."""
    if hdr.attr_id != msg.ATTR_ID:
        hdr = dataclasses.replace(hdr, attr_id=msg.ATTR_ID)
    return make_mad(hdr, msg.encode())
