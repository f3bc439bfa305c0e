"""IBTA transport header codecs: BTH and the extension headers.

Kernel counterpart: ``drivers/infiniband/sw/rxe/rxe_hdr.h`` (``struct rxe_bth``,
``rxe_reth``, ``rxe_aeth``, ``rxe_atmeth``, ``rxe_atmack``, ``rxe_immdt``,
``rxe_ieth``, ``rxe_deth`` and their ``*_set_*`` / ``*_*()`` accessors) and
``include/rdma/ib_pack.h``.

Each header is an immutable :class:`typing.NamedTuple` (cheap to build on
the data path) with a precompiled big-endian :class:`struct.Struct`. One
shared codec (``_WireHeader``, driven by each class's ``STRUCT`` / ``NAME``
/ ``BITS``) gives them all ``pack`` / ``pack_into`` that validate field
ranges and raise :class:`HeaderFieldError`, and an ``unpack_from``
classmethod that raises :class:`MalformedPacket` on short or invalid input.

Reserved bits are written as zero and ignored on receive, as rxe does.
The two errors live in :mod:`.errors` and are re-exported here.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any, ClassVar, NamedTuple, Self, TypeAlias, cast

# Re-exported: the codecs here raise them, and callers import them from here.
from softrdma.transport.errors import HeaderFieldError, MalformedPacket

BytesLike: TypeAlias = bytes | bytearray | memoryview
"""Input accepted by the decoders (``collections.abc.Buffer`` is 3.12+)."""
WritableBuffer: TypeAlias = bytearray | memoryview
"""Output buffer accepted by ``pack_into``."""

__all__ = [
    "AETH_CREDIT_INVALID",
    "AETH_SIZE",
    "ATMACK_SIZE",
    "ATMETH_SIZE",
    "BTH_DEF_PKEY",
    "BTH_SIZE",
    "CNP_RSVD_SIZE",
    "DETH_SIZE",
    "FETH_SIZE",
    "GSI_QKEY",
    "IETH_SIZE",
    "IMMDT_SIZE",
    "RETH_SIZE",
    "RNR_NAK_USEC",
    "XRCETH_SIZE",
    "Aeth",
    "AethType",
    "AtomicAckEth",
    "AtomicEth",
    "Bth",
    "BytesLike",
    "CnpRsvd",
    "Deth",
    "ExtHeader",
    "Feth",
    "HeaderFieldError",
    "Ieth",
    "ImmDt",
    "MalformedPacket",
    "NakCode",
    "Reth",
    "WritableBuffer",
    "XrcEth",
    "aeth_syndrome",
    "aeth_syndrome_parse",
    "rnr_timer_decode",
    "rnr_timer_encode",
]


# enum rxe_hdr_length / ib_pack.h IB_*_BYTES
BTH_SIZE = 12
RETH_SIZE = 16
AETH_SIZE = 4
ATMETH_SIZE = 28
ATMACK_SIZE = 8
IMMDT_SIZE = 4
IETH_SIZE = 4
DETH_SIZE = 8
CNP_RSVD_SIZE = 16
FETH_SIZE = 4
XRCETH_SIZE = 4

BTH_DEF_PKEY = 0xFFFF
"""rxe_hdr.h BTH_DEF_PKEY: the default (full member) partition key."""
GSI_QKEY = 0x80010000
"""ib_verbs.h IB_QP1_QKEY: Q_Key of the GSI QP (QP1), used by CM MADs."""

_U24 = 24
_BTH_STRUCT = struct.Struct(">BBHII")
# Decoders build a header with tuple.__new__(cls, values): the NamedTuple's
# __new__ is a Python-level function that does only that, with no checks.


def _bad(header: str, field: str, value: object, bits: int) -> HeaderFieldError:
    return HeaderFieldError(f"{header}.{field}={value!r} does not fit {bits} bits")


class _WireHeader(tuple[Any, ...]):
    """The codec every header shares, driven by the class variables each one
    sets. rxe_hdr.h has a getter and a setter per field of every header; here
    the fields are a NamedTuple and these few methods serve all of them.

    A header is ``class X(_XFields, _WireHeader)``, ``_XFields`` being the
    NamedTuple of its fields. By default the :attr:`STRUCT` values are the
    fields themselves, in order; headers whose fields share a word or sit next
    to reserved bits (BTH, AETH, DETH) override :meth:`wire_fields` and
    :meth:`from_wire`.
    """

    __slots__ = ()

    SIZE: ClassVar[int]
    """Bytes on the wire."""
    STRUCT: ClassVar[struct.Struct]
    """Precompiled big-endian layout; its values are :meth:`wire_fields`."""
    NAME: ClassVar[str]
    """The header's name in :class:`MalformedPacket` messages."""
    BITS: ClassVar[tuple[int, ...]]
    """Wire width of each field, in field order (for :class:`HeaderFieldError`)."""
    VERBATIM: ClassVar[bool] = True
    """The :attr:`STRUCT` values are the fields as they are, so a decoder may
    build the tuple straight from them (``tuple.__new__(cls, values)``);
    a header that overrides :meth:`from_wire` sets this to False."""

    def wire_fields(self) -> tuple[Any, ...]:
        """Values for :attr:`STRUCT`: the fields as they are (``struct`` itself
        range-checks a field that fills its word)."""
        return self

    def pack(self) -> bytes:
        """Encode to :attr:`SIZE` bytes (rxe_hdr.h ``*_set_*``); an out-of-range
        field raises :class:`HeaderFieldError`."""
        try:
            return self.STRUCT.pack(*self.wire_fields())
        except struct.error as e:
            raise self._field_error(e) from None

    def pack_into(self, buf: WritableBuffer, offset: int = 0) -> None:
        """Encode into ``buf`` at ``offset``."""
        try:
            self.STRUCT.pack_into(buf, offset, *self.wire_fields())
        except struct.error as e:
            raise self._field_error(e) from None

    @classmethod
    def from_wire(cls, *values: Any) -> Self:
        """Build from the :attr:`STRUCT` values."""
        return cls(*values)

    @classmethod
    def unpack_from(cls, buf: BytesLike, offset: int = 0) -> Self:
        """Decode :attr:`SIZE` bytes at ``offset`` (rxe_hdr.h field getters);
        a short buffer raises :class:`MalformedPacket`."""
        st = cls.STRUCT
        try:
            values = st.unpack_from(buf, offset)
        except struct.error:
            n = len(memoryview(buf))
            raise MalformedPacket(
                f"{cls.NAME} needs {st.size} bytes at offset {offset}, buffer has {n}",
                reason="truncated",
            ) from None
        return cls.from_wire(*values)

    def _field_error(self, cause: object) -> HeaderFieldError:
        """The error for a header that cannot be encoded: names the first
        field outside its :attr:`BITS`."""
        name = type(self).__name__
        fields = cast(NamedTuple, self)._fields  # the field names of the NamedTuple base
        for field, bits, v in zip(fields, self.BITS, self, strict=True):
            if not isinstance(v, int) or v >> bits:
                return _bad(name, field, v, bits)
        return HeaderFieldError(f"invalid {name} {self!r}: {cause}")


class _BthFields(NamedTuple):
    opcode: int
    dest_qp: int
    psn: int
    pkey: int = BTH_DEF_PKEY
    se: bool = False
    mig: bool = False
    pad: int = 0
    tver: int = 0
    fecn: bool = False
    becn: bool = False
    ack_req: bool = False


class Bth(_BthFields, _WireHeader):
    """Base Transport Header, 12 bytes (rxe_hdr.h ``struct rxe_bth``, built by
    ``bth_init`` and read by ``bth_opcode``, ``bth_psn``, …).

    Fields as in rxe/IBTA: ``opcode`` (8), ``se`` solicited event, ``mig``
    MigReq, ``pad`` PadCnt (0..3), ``tver`` (must be 0), ``pkey`` (16),
    ``fecn`` / ``becn``, ``dest_qp`` (24), ``ack_req``, ``psn`` (24).
    The tuple order is not the wire order: the three fields every packet sets
    (opcode, dest_qp, psn) come first, the rest have rxe's defaults
    (``bth_init``: P_Key 0xFFFF, everything else 0). Reserved bits (Resv6a,
    Resv7) are sent as zero and ignored on receive.
    """

    __slots__ = ()

    SIZE: ClassVar[int] = BTH_SIZE
    STRUCT: ClassVar[struct.Struct] = _BTH_STRUCT
    NAME: ClassVar[str] = "BTH"
    BITS: ClassVar[tuple[int, ...]] = (8, 24, 24, 16, 1, 1, 2, 0, 1, 1, 1)  # tver: only 0 exists
    VERBATIM: ClassVar[bool] = False

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT` (opcode, byte 1, P_Key, word 4, word 8),
        validating the bit-packed fields (rxe_hdr.h ``bth_init``)."""
        opcode, dest_qp, psn, pkey, se, mig, pad, tver, fecn, becn, ack_req = self
        # A negative value shifts to -1, so one shift test catches both ends.
        if (dest_qp | psn) >> _U24 or pad >> 2 or tver or (se | mig | fecn | becn | ack_req) >> 1:
            raise self._field_error("range")
        return (
            opcode,
            se << 7 | mig << 6 | pad << 4,
            pkey,
            fecn << 31 | becn << 30 | dest_qp,
            ack_req << 31 | psn,
        )

    @classmethod
    def from_wire(cls, opcode: int, b1: int, pkey: int, w4: int, w8: int) -> Self:
        """Build from the :attr:`STRUCT` values; checks TVer (rxe_recv.c
        ``hdr_check``: ``bth_tver(pkt) != BTH_TVER`` drops)."""
        if b1 & 0x0F:
            raise MalformedPacket(f"BTH TVer {b1 & 0x0F} is not 0", reason="bad_version")
        return cls(
            opcode,
            w4 & 0xFFFFFF,
            w8 & 0xFFFFFF,
            pkey,
            bool(b1 & 0x80),
            bool(b1 & 0x40),
            (b1 >> 4) & 3,
            0,
            bool(w4 & 0x80000000),
            bool(w4 & 0x40000000),
            bool(w8 & 0x80000000),
        )

    def _field_error(self, cause: object) -> HeaderFieldError:
        """As for any header, but a non-zero TVer gets its own message."""
        if self.tver != 0:
            return HeaderFieldError(f"Bth.tver={self.tver!r}: only transport version 0 exists")
        return super()._field_error(cause)


class _RethFields(NamedTuple):
    va: int
    rkey: int
    dma_len: int


class Reth(_RethFields, _WireHeader):
    """RDMA Extended Transport Header, 16 bytes (rxe_hdr.h ``struct rxe_reth``,
    ``reth_va`` / ``reth_rkey`` / ``reth_len`` and their setters): ``va`` (64),
    ``rkey`` (32), ``dma_len`` (32)."""

    __slots__ = ()

    SIZE: ClassVar[int] = RETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">QII")
    NAME: ClassVar[str] = "RETH"
    BITS: ClassVar[tuple[int, ...]] = (64, 32, 32)


class AethType(IntEnum):
    """AETH syndrome bits 7..5 (rxe_hdr.h ``enum aeth_syndrome`` ``AETH_TYPE_MASK``)."""

    ACK = 0
    RNR_NAK = 1
    NAK = 3


class NakCode(IntEnum):
    """AETH NAK codes, syndrome bits 4..0 when the type is NAK (rxe_hdr.h
    ``AETH_NAK_PSN_SEQ_ERROR`` …; IBTA table 44)."""

    PSN_SEQ_ERR = 0
    INVALID_REQUEST = 1
    REMOTE_ACCESS_ERR = 2
    REMOTE_OP_ERR = 3
    INVALID_RD_REQUEST = 4


AETH_CREDIT_INVALID = 31
"""rxe_hdr.h AETH_ACK_UNLIMITED: credit count 31 = "invalid" (no end-to-end flow
control); rxe puts it in every ACK, read response and atomic ACK."""


def aeth_syndrome(kind: AethType, value: int) -> int:
    """Build an AETH syndrome byte from its type and 5-bit value (credit count,
    RNR timer code or :class:`NakCode`). Kernel: rxe_resp.c builds it as
    ``AETH_ACK_UNLIMITED`` / ``AETH_RNR_NAK | timer`` / ``AETH_NAK_*``."""
    if not isinstance(value, int) or value >> 5:
        raise HeaderFieldError(f"AETH syndrome value {value!r} does not fit 5 bits")
    kind = AethType(kind)
    if kind is AethType.NAK and value > NakCode.INVALID_RD_REQUEST:
        raise HeaderFieldError(f"NAK code {value} is reserved")
    return kind << 5 | value


def aeth_syndrome_parse(syndrome: int) -> tuple[AethType, int]:
    """Split a syndrome byte into (type, value); the value is a
    :class:`NakCode` for NAKs. Reserved types and NAK codes raise
    :class:`MalformedPacket` (rxe_comp.c ``check_ack`` treats them as errors).
    """
    t = syndrome >> 5
    v = syndrome & 0x1F
    if t == 0:
        return AethType.ACK, v
    if t == 1:
        return AethType.RNR_NAK, v
    if t == 3:
        if v > NakCode.INVALID_RD_REQUEST:
            raise MalformedPacket(
                f"AETH NAK code {v} is reserved (syndrome {syndrome:#04x})", reason="bad_header"
            )
        return AethType.NAK, NakCode(v)
    raise MalformedPacket(
        f"AETH syndrome {syndrome:#04x} has a reserved type {t:#05b}", reason="bad_header"
    )


class _AethFields(NamedTuple):
    syndrome: int
    msn: int


class Aeth(_AethFields, _WireHeader):
    """ACK Extended Transport Header, 4 bytes (rxe_hdr.h ``struct rxe_aeth``,
    ``aeth_syn`` / ``aeth_msn`` and their setters): ``syndrome`` (8), ``msn`` (24)."""

    __slots__ = ()

    SIZE: ClassVar[int] = AETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">I")
    NAME: ClassVar[str] = "AETH"
    BITS: ClassVar[tuple[int, ...]] = (8, 24)
    VERBATIM: ClassVar[bool] = False

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT` (syndrome and MSN share one word)."""
        syndrome, msn = self
        if syndrome >> 8 or msn >> _U24:
            raise self._field_error("range")
        return (syndrome << 24 | msn,)

    @classmethod
    def from_wire(cls, word: int) -> Self:
        """Build from the :attr:`STRUCT` value."""
        return tuple.__new__(cls, (word >> 24, word & 0xFFFFFF))

    @classmethod
    def ack(cls, msn: int, credits: int = AETH_CREDIT_INVALID) -> Self:
        """An ACK syndrome with a credit count (rxe_resp.c ``send_ack``)."""
        return cls(aeth_syndrome(AethType.ACK, credits), msn)

    @classmethod
    def rnr_nak(cls, msn: int, timer: int) -> Self:
        """An RNR NAK carrying an RNR timer code (rxe_resp.c ``AETH_RNR_NAK``)."""
        return cls(aeth_syndrome(AethType.RNR_NAK, timer), msn)

    @classmethod
    def nak(cls, msn: int, code: NakCode) -> Self:
        """A NAK with a :class:`NakCode` (rxe_resp.c ``AETH_NAK_*``)."""
        return cls(aeth_syndrome(AethType.NAK, code), msn)

    @property
    def kind(self) -> AethType:
        """The syndrome type (raises :class:`MalformedPacket` if reserved)."""
        return aeth_syndrome_parse(self.syndrome)[0]

    @property
    def value(self) -> int:
        """The 5-bit syndrome value: credits, RNR timer code or NAK code."""
        return self.syndrome & 0x1F


class _AtomicEthFields(NamedTuple):
    va: int
    rkey: int
    swap_add: int
    compare: int


class AtomicEth(_AtomicEthFields, _WireHeader):
    """Atomic Extended Transport Header, 28 bytes (rxe_hdr.h ``struct
    rxe_atmeth``, ``atmeth_va`` / ``atmeth_rkey`` / ``atmeth_swap_add`` /
    ``atmeth_comp`` and their setters): ``va`` (64), ``rkey`` (32),
    ``swap_add`` (64), ``compare`` (64)."""

    __slots__ = ()

    SIZE: ClassVar[int] = ATMETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">QIQQ")
    NAME: ClassVar[str] = "AtomicETH"
    BITS: ClassVar[tuple[int, ...]] = (64, 32, 64, 64)


class _AtomicAckEthFields(NamedTuple):
    orig_data: int


class AtomicAckEth(_AtomicAckEthFields, _WireHeader):
    """Atomic Acknowledge Extended Transport Header, 8 bytes (rxe_hdr.h
    ``struct rxe_atmack``, ``atmack_orig`` / ``atmack_set_orig``):
    ``orig_data`` (64)."""

    __slots__ = ()

    SIZE: ClassVar[int] = ATMACK_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">Q")
    NAME: ClassVar[str] = "AtomicAckETH"
    BITS: ClassVar[tuple[int, ...]] = (64,)


class _ImmDtFields(NamedTuple):
    imm: int


class ImmDt(_ImmDtFields, _WireHeader):
    """Immediate data, 4 bytes (rxe_hdr.h ``struct rxe_immdt``, ``immdt_imm`` /
    ``immdt_set_imm``): ``imm`` (32), read as a big-endian integer."""

    __slots__ = ()

    SIZE: ClassVar[int] = IMMDT_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">I")
    NAME: ClassVar[str] = "ImmDt"
    BITS: ClassVar[tuple[int, ...]] = (32,)


class _IethFields(NamedTuple):
    inv_rkey: int


class Ieth(_IethFields, _WireHeader):
    """Invalidate Extended Transport Header, 4 bytes (rxe_hdr.h ``struct
    rxe_ieth``, ``ieth_rkey`` / ``ieth_set_rkey``): ``inv_rkey`` (32), the
    R_Key to invalidate."""

    __slots__ = ()

    SIZE: ClassVar[int] = IETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">I")
    NAME: ClassVar[str] = "IETH"
    BITS: ClassVar[tuple[int, ...]] = (32,)


class _DethFields(NamedTuple):
    qkey: int
    src_qp: int


class Deth(_DethFields, _WireHeader):
    """Datagram Extended Transport Header, 8 bytes (rxe_hdr.h ``struct
    rxe_deth``, ``deth_qkey`` / ``deth_sqp`` and their setters): ``qkey`` (32),
    reserved (8), ``src_qp`` (24)."""

    __slots__ = ()

    SIZE: ClassVar[int] = DETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">II")
    NAME: ClassVar[str] = "DETH"
    BITS: ClassVar[tuple[int, ...]] = (32, 24)
    VERBATIM: ClassVar[bool] = False

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT` (the reserved byte is the top of word 2)."""
        if self.src_qp >> _U24:
            raise self._field_error("range")
        return self

    @classmethod
    def from_wire(cls, qkey: int, word: int) -> Self:
        """Build from :attr:`STRUCT` values (reserved byte ignored)."""
        return tuple.__new__(cls, (qkey, word & 0xFFFFFF))


class _FethFields(NamedTuple):
    plt: int
    sel: int


class Feth(_FethFields, _WireHeader):
    """FLUSH Extended Transport Header, 4 bytes (IBTA vol. 1 annex A19;
    rxe_hdr.h ``struct rxe_feth``, ``feth_plt`` / ``feth_sel`` /
    ``feth_init``): reserved (26), ``sel`` — the selectivity level (2, bits
    5..4: ``IB_FLUSH_RANGE`` 0, ``IB_FLUSH_MR`` 1) — and ``plt`` — the
    placement type (4, bits 3..0: ``IB_FLUSH_GLOBAL`` 1 | ``IB_FLUSH_PERSISTENT``
    2). It precedes the RETH of an RC FLUSH request."""

    __slots__ = ()

    SIZE: ClassVar[int] = FETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">I")
    NAME: ClassVar[str] = "FETH"
    BITS: ClassVar[tuple[int, ...]] = (4, 2)
    VERBATIM: ClassVar[bool] = False

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT` (rxe ``feth_init``)."""
        plt, sel = self.plt, self.sel
        if not isinstance(plt, int) or plt >> 4 or plt < 0:
            raise _bad(self.NAME, "plt", plt, 4)
        if not isinstance(sel, int) or sel >> 2 or sel < 0:
            raise _bad(self.NAME, "sel", sel, 2)
        return (sel << 4 | plt,)

    @classmethod
    def from_wire(cls, word: int) -> Self:
        """Build from the :attr:`STRUCT` value (reserved bits ignored)."""
        return tuple.__new__(cls, (word & 0xF, (word >> 4) & 3))


class _XrcEthFields(NamedTuple):
    srqn: int


class XrcEth(_XrcEthFields, _WireHeader):
    """XRC Extended Transport Header, 4 bytes (IBTA vol. 1 §9.3.6 /
    ``IB_XRCETH_BYTES``; rxe's XRC series ``struct rxe_xrceth``): reserved (8),
    ``srqn`` (24), the XRC SRQ of the target that the request is for. It
    follows the BTH of every XRC request packet; responses carry none."""

    __slots__ = ()

    SIZE: ClassVar[int] = XRCETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">I")
    NAME: ClassVar[str] = "XRCETH"
    BITS: ClassVar[tuple[int, ...]] = (24,)
    VERBATIM: ClassVar[bool] = False

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT` (the reserved byte is the top of the word)."""
        srqn = self.srqn
        if not isinstance(srqn, int) or srqn >> _U24:
            raise self._field_error("range")
        return (srqn,)

    @classmethod
    def from_wire(cls, word: int) -> Self:
        """Build from the :attr:`STRUCT` value (reserved byte ignored)."""
        return tuple.__new__(cls, (word & 0xFFFFFF,))


class _CnpRsvdFields(NamedTuple):
    rsvd: bytes = bytes(CNP_RSVD_SIZE)


class CnpRsvd(_CnpRsvdFields, _WireHeader):
    """The 16 reserved bytes that follow the BTH of a RoCEv2 CNP (IBTA annex
    A17, opcode 0x81). rxe neither sends nor parses CNPs; the bytes are kept
    so a received CNP re-encodes exactly (senders write zeros)."""

    __slots__ = ()

    SIZE: ClassVar[int] = CNP_RSVD_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">16s")
    NAME: ClassVar[str] = "CNP reserved"
    BITS: ClassVar[tuple[int, ...]] = (128,)

    def wire_fields(self) -> tuple[bytes, ...]:
        """Values for :attr:`STRUCT` (``16s`` would pad or cut a wrong length
        silently, so the length is checked here)."""
        if not isinstance(self.rsvd, bytes | bytearray) or len(self.rsvd) != CNP_RSVD_SIZE:
            raise HeaderFieldError(f"CnpRsvd.rsvd must be {CNP_RSVD_SIZE} bytes, got {self.rsvd!r}")
        return self


ExtHeader = Reth | Aeth | AtomicEth | AtomicAckEth | ImmDt | Ieth | Deth | CnpRsvd | XrcEth | Feth
"""Any extension header instance."""


# IBTA vol.1 table 45 "RNR NAK timer field encodings", in microseconds; code 0
# is the longest (655.36 ms). Kernel: rxe_comp.c rnrnak_usec[].
RNR_NAK_USEC: tuple[int, ...] = (
    655360, 10, 20, 30, 40, 60, 80, 120,
    160, 240, 320, 480, 640, 960, 1280, 1920,
    2560, 3840, 5120, 7680, 10240, 15360, 20480, 30720,
    40960, 61440, 81920, 122880, 163840, 245760, 327680, 491520,
)  # fmt: skip


def rnr_timer_decode(code: int) -> int:
    """The RNR NAK delay in microseconds for a 5-bit timer code
    (rxe_comp.c ``rnrnak_usec[]`` / ``rnrnak_jiffies``)."""
    if not isinstance(code, int) or code >> 5:
        raise HeaderFieldError(f"RNR timer code {code!r} does not fit 5 bits")
    return RNR_NAK_USEC[code]


def rnr_timer_encode(usec: float) -> int:
    """The timer code of the shortest RNR delay that is >= ``usec``
    microseconds (what a responder would put in ``min_rnr_timer``).
    Durations above 655.36 ms cannot be encoded (:class:`HeaderFieldError`)."""
    for code in range(1, 32):
        if RNR_NAK_USEC[code] >= usec:
            return code
    if usec <= RNR_NAK_USEC[0]:
        return 0
    raise HeaderFieldError(f"RNR delay {usec} us exceeds the longest encoding (655360 us)")
