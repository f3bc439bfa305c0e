"""IBTA transport header codecs: BTH and the extension headers.

Kernel counterpart: ``drivers/infiniband/sw/rxe/rxe_hdr.h`` (``struct rxe_bth``,
``rxe_reth``, ``rxe_aeth``, ``rxe_atmeth``, ``rxe_atmack``, ``rxe_immdt``,
``rxe_ieth``, ``rxe_deth`` and their ``*_set_*`` / ``*_*()`` accessors) and
``include/rdma/ib_pack.h``.

Each header is an immutable :class:`typing.NamedTuple` (cheap to build on
the data path) with a precompiled big-endian :class:`struct.Struct`,
``pack`` / ``pack_into`` that validate field ranges and raise
:class:`HeaderFieldError`, and an ``unpack_from`` classmethod that raises
:class:`MalformedPacket` on short or invalid input.

Reserved bits are written as zero and ignored on receive, as rxe does.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import ClassVar, NamedTuple, Self, TypeAlias

from softrdma.errors import SoftRdmaError

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
    "GSI_QKEY",
    "IETH_SIZE",
    "IMMDT_SIZE",
    "RETH_SIZE",
    "RNR_NAK_USEC",
    "Aeth",
    "AethType",
    "AtomicAckEth",
    "AtomicEth",
    "Bth",
    "BytesLike",
    "CnpRsvd",
    "Deth",
    "ExtHeader",
    "HeaderFieldError",
    "Ieth",
    "ImmDt",
    "MalformedPacket",
    "NakCode",
    "Reth",
    "WritableBuffer",
    "aeth_syndrome",
    "aeth_syndrome_parse",
    "rnr_timer_decode",
    "rnr_timer_encode",
]


class MalformedPacket(SoftRdmaError, ValueError):
    """A received packet (or frame) that cannot be parsed or violates the wire
    format. rxe drops such packets (``rxe_recv.c`` ``hdr_check`` and friends);
    softrdma raises this so the caller decides (drop, count, NAK).
    """


class HeaderFieldError(SoftRdmaError, ValueError):
    """A header field given for encoding is out of its wire range (for example a
    PSN that does not fit 24 bits). This is a caller bug, not bad wire input.
    """


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

BTH_DEF_PKEY = 0xFFFF
"""rxe_hdr.h BTH_DEF_PKEY: the default (full member) partition key."""
GSI_QKEY = 0x80010000
"""ib_verbs.h IB_QP1_QKEY: Q_Key of the GSI QP (QP1), used by CM MADs."""

_U24 = 24
_BTH_STRUCT = struct.Struct(">BBHII")


def _bad(header: str, field: str, value: object, bits: int) -> HeaderFieldError:
    return HeaderFieldError(f"{header}.{field}={value!r} does not fit {bits} bits")


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


class Bth(_BthFields):
    """Base Transport Header, 12 bytes (rxe_hdr.h ``struct rxe_bth``).

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

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT` (opcode, byte 1, P_Key, word 4, word 8),
        validating the bit-packed fields (rxe_hdr.h ``bth_init``)."""
        opcode, dest_qp, psn, pkey, se, mig, pad, tver, fecn, becn, ack_req = self
        # A negative value shifts to -1, so one shift test catches both ends.
        if (dest_qp | psn) >> _U24 or pad >> 2 or tver or (se | mig | fecn | becn | ack_req) >> 1:
            raise self._explain()
        return (
            opcode,
            se << 7 | mig << 6 | pad << 4,
            pkey,
            fecn << 31 | becn << 30 | dest_qp,
            ack_req << 31 | psn,
        )

    def _explain(self) -> HeaderFieldError:
        for name, bits in (("dest_qp", 24), ("psn", 24), ("pad", 2)):
            v = getattr(self, name)
            if not isinstance(v, int) or v >> bits:
                return _bad("Bth", name, v, bits)
        if self.tver != 0:
            return HeaderFieldError(f"Bth.tver={self.tver!r}: only transport version 0 exists")
        for name in ("se", "mig", "fecn", "becn", "ack_req"):
            v = getattr(self, name)
            if not isinstance(v, int) or v >> 1:
                return _bad("Bth", name, v, 1)
        return HeaderFieldError(f"invalid BTH {self!r}")

    def pack(self) -> bytes:
        """Encode to 12 bytes (rxe_hdr.h ``bth_init``)."""
        try:
            return _BTH_STRUCT.pack(*self.wire_fields())
        except struct.error as e:
            raise _bth_struct_error(self, e) from None

    def pack_into(self, buf: WritableBuffer, offset: int = 0) -> None:
        """Encode into ``buf`` at ``offset`` (rxe_hdr.h ``bth_init``)."""
        try:
            _BTH_STRUCT.pack_into(buf, offset, *self.wire_fields())
        except struct.error as e:
            raise _bth_struct_error(self, e) from None

    @classmethod
    def from_wire(cls, opcode: int, b1: int, pkey: int, w4: int, w8: int) -> Bth:
        """Build from the :attr:`STRUCT` values; checks TVer (rxe_recv.c
        ``hdr_check``: ``bth_tver(pkt) != BTH_TVER`` drops)."""
        if b1 & 0x0F:
            raise MalformedPacket(f"BTH TVer {b1 & 0x0F} is not 0")
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

    @classmethod
    def unpack_from(cls, buf: BytesLike, offset: int = 0) -> Bth:
        """Decode 12 bytes at ``offset`` (rxe_hdr.h ``bth_opcode``, ``bth_psn``, …)."""
        return cls.from_wire(*_unpack(_BTH_STRUCT, "BTH", buf, offset))


def _bth_struct_error(bth: Bth, e: struct.error) -> HeaderFieldError:
    for name, bits in (("opcode", 8), ("pkey", 16)):
        v = getattr(bth, name)
        if not isinstance(v, int) or v >> bits:
            return _bad("Bth", name, v, bits)
    return HeaderFieldError(f"invalid BTH {bth!r}: {e}")


def _unpack(st: struct.Struct, name: str, buf: BytesLike, offset: int) -> tuple[int, ...]:
    try:
        return st.unpack_from(buf, offset)
    except struct.error:
        n = len(memoryview(buf))
        raise MalformedPacket(
            f"{name} needs {st.size} bytes at offset {offset}, buffer has {n}"
        ) from None


def _explain_fields(header: Header, bits: tuple[int, ...], e: object) -> HeaderFieldError:
    for name, b, v in zip(header._fields, bits, header, strict=True):
        if not isinstance(v, int) or v >> b:
            return _bad(type(header).__name__, name, v, b)
    return HeaderFieldError(f"invalid {type(header).__name__} {header!r}: {e}")


class _RethFields(NamedTuple):
    va: int
    rkey: int
    dma_len: int


class Reth(_RethFields):
    """RDMA Extended Transport Header, 16 bytes (rxe_hdr.h ``struct rxe_reth``):
    ``va`` (64), ``rkey`` (32), ``dma_len`` (32)."""

    __slots__ = ()

    SIZE: ClassVar[int] = RETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">QII")
    NAME: ClassVar[str] = "RETH"
    BITS: ClassVar[tuple[int, ...]] = (64, 32, 32)

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT` (struct itself range-checks whole fields)."""
        return self

    def pack(self) -> bytes:
        """Encode (rxe_hdr.h ``reth_set_va``/``_rkey``/``_len``)."""
        return _pack(self)

    def pack_into(self, buf: WritableBuffer, offset: int = 0) -> None:
        """Encode into ``buf`` at ``offset``."""
        _pack_into(self, buf, offset)

    @classmethod
    def from_wire(cls, va: int, rkey: int, dma_len: int) -> Self:
        """Build from :attr:`STRUCT` values."""
        return cls(va, rkey, dma_len)

    @classmethod
    def unpack_from(cls, buf: BytesLike, offset: int = 0) -> Self:
        """Decode (rxe_hdr.h ``reth_va``/``reth_rkey``/``reth_len``)."""
        return cls(*_unpack(cls.STRUCT, cls.NAME, buf, offset))


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
            raise MalformedPacket(f"AETH NAK code {v} is reserved (syndrome {syndrome:#04x})")
        return AethType.NAK, NakCode(v)
    raise MalformedPacket(f"AETH syndrome {syndrome:#04x} has a reserved type {t:#05b}")


class _AethFields(NamedTuple):
    syndrome: int
    msn: int


class Aeth(_AethFields):
    """ACK Extended Transport Header, 4 bytes (rxe_hdr.h ``struct rxe_aeth``):
    ``syndrome`` (8), ``msn`` (24)."""

    __slots__ = ()

    SIZE: ClassVar[int] = AETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">I")
    NAME: ClassVar[str] = "AETH"
    BITS: ClassVar[tuple[int, ...]] = (8, 24)

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT` (syndrome and MSN share one word)."""
        syndrome, msn = self
        if syndrome >> 8 or msn >> _U24:
            raise _explain_fields(self, self.BITS, "range")
        return (syndrome << 24 | msn,)

    def pack(self) -> bytes:
        """Encode (rxe_hdr.h ``aeth_set_syn``, ``aeth_set_msn``)."""
        return _pack(self)

    def pack_into(self, buf: WritableBuffer, offset: int = 0) -> None:
        """Encode into ``buf`` at ``offset``."""
        _pack_into(self, buf, offset)

    @classmethod
    def from_wire(cls, word: int) -> Self:
        """Build from the :attr:`STRUCT` value."""
        return cls(word >> 24, word & 0xFFFFFF)

    @classmethod
    def unpack_from(cls, buf: BytesLike, offset: int = 0) -> Self:
        """Decode (rxe_hdr.h ``aeth_syn``, ``aeth_msn``)."""
        return cls.from_wire(*_unpack(cls.STRUCT, cls.NAME, buf, offset))

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


class AtomicEth(_AtomicEthFields):
    """Atomic Extended Transport Header, 28 bytes (rxe_hdr.h ``struct
    rxe_atmeth``): ``va`` (64), ``rkey`` (32), ``swap_add`` (64), ``compare`` (64)."""

    __slots__ = ()

    SIZE: ClassVar[int] = ATMETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">QIQQ")
    NAME: ClassVar[str] = "AtomicETH"
    BITS: ClassVar[tuple[int, ...]] = (64, 32, 64, 64)

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT`."""
        return self

    def pack(self) -> bytes:
        """Encode (rxe_hdr.h ``atmeth_set_va``/``_rkey``/``_swap_add``/``_comp``)."""
        return _pack(self)

    def pack_into(self, buf: WritableBuffer, offset: int = 0) -> None:
        """Encode into ``buf`` at ``offset``."""
        _pack_into(self, buf, offset)

    @classmethod
    def from_wire(cls, va: int, rkey: int, swap_add: int, compare: int) -> Self:
        """Build from :attr:`STRUCT` values."""
        return cls(va, rkey, swap_add, compare)

    @classmethod
    def unpack_from(cls, buf: BytesLike, offset: int = 0) -> Self:
        """Decode (rxe_hdr.h ``atmeth_va``, ``atmeth_swap_add``, …)."""
        return cls(*_unpack(cls.STRUCT, cls.NAME, buf, offset))


class _AtomicAckEthFields(NamedTuple):
    orig_data: int


class AtomicAckEth(_AtomicAckEthFields):
    """Atomic Acknowledge Extended Transport Header, 8 bytes (rxe_hdr.h
    ``struct rxe_atmack``): ``orig_data`` (64)."""

    __slots__ = ()

    SIZE: ClassVar[int] = ATMACK_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">Q")
    NAME: ClassVar[str] = "AtomicAckETH"
    BITS: ClassVar[tuple[int, ...]] = (64,)

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT`."""
        return self

    def pack(self) -> bytes:
        """Encode (rxe_hdr.h ``atmack_set_orig``)."""
        return _pack(self)

    def pack_into(self, buf: WritableBuffer, offset: int = 0) -> None:
        """Encode into ``buf`` at ``offset``."""
        _pack_into(self, buf, offset)

    @classmethod
    def from_wire(cls, orig_data: int) -> Self:
        """Build from :attr:`STRUCT` values."""
        return cls(orig_data)

    @classmethod
    def unpack_from(cls, buf: BytesLike, offset: int = 0) -> Self:
        """Decode (rxe_hdr.h ``atmack_orig``)."""
        return cls(*_unpack(cls.STRUCT, cls.NAME, buf, offset))


class _ImmDtFields(NamedTuple):
    imm: int


class ImmDt(_ImmDtFields):
    """Immediate data, 4 bytes (rxe_hdr.h ``struct rxe_immdt``): ``imm`` (32),
    read as a big-endian integer."""

    __slots__ = ()

    SIZE: ClassVar[int] = IMMDT_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">I")
    NAME: ClassVar[str] = "ImmDt"
    BITS: ClassVar[tuple[int, ...]] = (32,)

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT`."""
        return self

    def pack(self) -> bytes:
        """Encode (rxe_hdr.h ``immdt_set_imm``)."""
        return _pack(self)

    def pack_into(self, buf: WritableBuffer, offset: int = 0) -> None:
        """Encode into ``buf`` at ``offset``."""
        _pack_into(self, buf, offset)

    @classmethod
    def from_wire(cls, imm: int) -> Self:
        """Build from :attr:`STRUCT` values."""
        return cls(imm)

    @classmethod
    def unpack_from(cls, buf: BytesLike, offset: int = 0) -> Self:
        """Decode (rxe_hdr.h ``immdt_imm``)."""
        return cls(*_unpack(cls.STRUCT, cls.NAME, buf, offset))


class _IethFields(NamedTuple):
    inv_rkey: int


class Ieth(_IethFields):
    """Invalidate Extended Transport Header, 4 bytes (rxe_hdr.h ``struct
    rxe_ieth``): ``inv_rkey`` (32), the R_Key to invalidate."""

    __slots__ = ()

    SIZE: ClassVar[int] = IETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">I")
    NAME: ClassVar[str] = "IETH"
    BITS: ClassVar[tuple[int, ...]] = (32,)

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT`."""
        return self

    def pack(self) -> bytes:
        """Encode (rxe_hdr.h ``ieth_set_rkey``)."""
        return _pack(self)

    def pack_into(self, buf: WritableBuffer, offset: int = 0) -> None:
        """Encode into ``buf`` at ``offset``."""
        _pack_into(self, buf, offset)

    @classmethod
    def from_wire(cls, inv_rkey: int) -> Self:
        """Build from :attr:`STRUCT` values."""
        return cls(inv_rkey)

    @classmethod
    def unpack_from(cls, buf: BytesLike, offset: int = 0) -> Self:
        """Decode (rxe_hdr.h ``ieth_rkey``)."""
        return cls(*_unpack(cls.STRUCT, cls.NAME, buf, offset))


class _DethFields(NamedTuple):
    qkey: int
    src_qp: int


class Deth(_DethFields):
    """Datagram Extended Transport Header, 8 bytes (rxe_hdr.h ``struct
    rxe_deth``): ``qkey`` (32), reserved (8), ``src_qp`` (24)."""

    __slots__ = ()

    SIZE: ClassVar[int] = DETH_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">II")
    NAME: ClassVar[str] = "DETH"
    BITS: ClassVar[tuple[int, ...]] = (32, 24)

    def wire_fields(self) -> tuple[int, ...]:
        """Values for :attr:`STRUCT` (the reserved byte is the top of word 2)."""
        if self.src_qp >> _U24:
            raise _explain_fields(self, self.BITS, "range")
        return self

    def pack(self) -> bytes:
        """Encode (rxe_hdr.h ``deth_set_qkey``, ``deth_set_sqp``)."""
        return _pack(self)

    def pack_into(self, buf: WritableBuffer, offset: int = 0) -> None:
        """Encode into ``buf`` at ``offset``."""
        _pack_into(self, buf, offset)

    @classmethod
    def from_wire(cls, qkey: int, word: int) -> Self:
        """Build from :attr:`STRUCT` values (reserved byte ignored)."""
        return cls(qkey, word & 0xFFFFFF)

    @classmethod
    def unpack_from(cls, buf: BytesLike, offset: int = 0) -> Self:
        """Decode (rxe_hdr.h ``deth_qkey``, ``deth_sqp``)."""
        return cls.from_wire(*_unpack(cls.STRUCT, cls.NAME, buf, offset))


class _CnpRsvdFields(NamedTuple):
    rsvd: bytes = bytes(CNP_RSVD_SIZE)


class CnpRsvd(_CnpRsvdFields):
    """The 16 reserved bytes that follow the BTH of a RoCEv2 CNP (IBTA annex
    A17, opcode 0x81). rxe neither sends nor parses CNPs; the bytes are kept
    so a received CNP re-encodes exactly (senders write zeros)."""

    __slots__ = ()

    SIZE: ClassVar[int] = CNP_RSVD_SIZE
    STRUCT: ClassVar[struct.Struct] = struct.Struct(">16s")
    NAME: ClassVar[str] = "CNP reserved"
    BITS: ClassVar[tuple[int, ...]] = (128,)

    def wire_fields(self) -> tuple[bytes, ...]:
        """Values for :attr:`STRUCT`."""
        if not isinstance(self.rsvd, bytes | bytearray) or len(self.rsvd) != CNP_RSVD_SIZE:
            raise HeaderFieldError(f"CnpRsvd.rsvd must be {CNP_RSVD_SIZE} bytes, got {self.rsvd!r}")
        return self

    def pack(self) -> bytes:
        """Encode the 16 reserved bytes."""
        return self.STRUCT.pack(*self.wire_fields())

    def pack_into(self, buf: WritableBuffer, offset: int = 0) -> None:
        """Encode into ``buf`` at ``offset``."""
        self.STRUCT.pack_into(buf, offset, *self.wire_fields())

    @classmethod
    def from_wire(cls, rsvd: bytes) -> Self:
        """Build from :attr:`STRUCT` values."""
        return cls(rsvd)

    @classmethod
    def unpack_from(cls, buf: BytesLike, offset: int = 0) -> Self:
        """Decode the 16 reserved bytes."""
        try:
            (rsvd,) = cls.STRUCT.unpack_from(buf, offset)
        except struct.error:
            raise MalformedPacket(f"{cls.NAME} needs {CNP_RSVD_SIZE} bytes after the BTH") from None
        return cls(rsvd)


Header = Reth | Aeth | AtomicEth | AtomicAckEth | ImmDt | Ieth | Deth
ExtHeader = Header | CnpRsvd
"""Any extension header instance."""


def _pack(h: Header) -> bytes:
    try:
        return h.STRUCT.pack(*h.wire_fields())
    except struct.error as e:
        raise _explain_fields(h, h.BITS, e) from None


def _pack_into(h: Header, buf: WritableBuffer, offset: int) -> None:
    try:
        h.STRUCT.pack_into(buf, offset, *h.wire_fields())
    except struct.error as e:
        raise _explain_fields(h, h.BITS, e) from None


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
