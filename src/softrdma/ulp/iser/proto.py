"""iSER headers and framing, byte for byte.

Kernel counterparts: ``drivers/infiniband/ulp/iser/iscsi_iser.h`` (``struct
iser_ctrl``, ``struct iser_cm_hdr``, ``ISER_VER``, ``ISER_WSV``,
``ISER_RSV``, ``ISER_ZBVA_NOT_SUP``, ``ISER_SEND_W_INV_NOT_SUP``) and
``drivers/infiniband/ulp/isert/ib_isert.h`` (the target's copy of the same
layouts); RFC 7145 §9 for the wire formats.

* Every iSCSI PDU travels as one RC SEND: the 28-byte iSER header, then
  the PDU (48-byte BHS, AHSs, data segment padded to 4 bytes) —
  :func:`encode_iser_send` / :func:`decode_iser_send`.
* The iSER header (:class:`IserHdr`): byte 0 holds the opcode in its high
  nibble (1 = iSCSI control-type PDU, 2 = Hello, 3 = HelloReply) and the
  WSV / RSV flags; then 3 reserved bytes, the write STag and tagged offset
  (VA), the read STag and VA, all big-endian. WSV / RSV say whether the
  write / read pair is valid: the initiator's buffer the target RDMA-READs
  for a SCSI write, or RDMA-WRITEs for a SCSI read.
* The RDMA CM private data after the ``cma_hdr`` (REQ) or alone (REP) is
  the 4-byte :class:`IserCmHdr`: flags ZBVA-not-supported (0x80) and
  Send-with-Invalidate-not-supported (0x40), 3 reserved bytes. Linux sends
  ``80 00 00 00`` both ways and never a Hello.

Errors: :class:`IserProtocolError` (received bytes) and
:class:`IserEncodeError` (fields), both :class:`IserError`, a
:class:`~softrdma.errors.SoftRdmaError` and a :class:`ValueError`.
Decoding an iSCSI PDU inside a SEND raises the iSCSI codec's own
:class:`~softrdma.ulp.iscsi.IscsiProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from softrdma.errors import SoftRdmaError
from softrdma.transport.headers import BytesLike
from softrdma.ulp.iscsi.proto import IscsiPdu, decode_iscsi_pdu

__all__ = [
    "ISER_HDR_LEN",
    "ISER_HELLO",
    "ISER_HELLORPLY",
    "ISER_RSV",
    "ISER_SEND_W_INV_NOT_SUP",
    "ISER_VER",
    "ISER_WSV",
    "ISER_ZBVA_NOT_SUP",
    "IserCmFlag",
    "IserCmHdr",
    "IserEncodeError",
    "IserError",
    "IserFlag",
    "IserHdr",
    "IserHello",
    "IserHelloReply",
    "IserOpcode",
    "IserProtocolError",
    "decode_iser_send",
    "encode_iser_send",
]


class IserError(SoftRdmaError, ValueError):
    """Base of the iSER codec's errors."""


class IserProtocolError(IserError):
    """Received bytes that are not a valid iSER header, Hello or CM
    private data (too short, an unknown opcode nibble)."""


class IserEncodeError(IserError):
    """An iSER header field that does not fit its wire width."""


ISER_HDR_LEN: Final = 28
ISER_VER: Final = 0x10  # iscsi_iser.h: the opcode nibble of an iSCSI control-type PDU
ISER_HELLO: Final = 0x20
ISER_HELLORPLY: Final = 0x30
ISER_WSV: Final = 0x08
ISER_RSV: Final = 0x04
ISER_ZBVA_NOT_SUP: Final = 0x80
ISER_SEND_W_INV_NOT_SUP: Final = 0x40

_OPCODE_MASK: Final = 0xF0
_U32: Final = 1 << 32
_U64: Final = 1 << 64


class IserOpcode(enum.IntEnum):
    """The high nibble of an iSER header's byte 0 (RFC 7145 §9), as the
    whole byte: ``ISCSI_CTRL`` (``ISER_VER`` in Linux), ``HELLO``,
    ``HELLORPLY``."""

    ISCSI_CTRL = ISER_VER
    HELLO = ISER_HELLO
    HELLORPLY = ISER_HELLORPLY


class IserFlag(enum.IntFlag):
    """The low nibble of an iSCSI control-type iSER header: ``ISER_WSV``
    (write STag valid), ``ISER_RSV`` (read STag valid)."""

    WSV = ISER_WSV
    RSV = ISER_RSV


class IserCmFlag(enum.IntFlag):
    """``iser_cm_hdr.flags``: ``ISER_ZBVA_NOT_SUP``,
    ``ISER_SEND_W_INV_NOT_SUP``."""

    ZBVA_NOT_SUP = ISER_ZBVA_NOT_SUP
    SEND_W_INV_NOT_SUP = ISER_SEND_W_INV_NOT_SUP


_NO_FLAGS: Final = IserFlag(0)
_CTRL: Final = struct.Struct(">B3xIQIQ")
_CM: Final = struct.Struct(">B3x")
_HELLO: Final = struct.Struct(">BBH24x")


def _check(what: str, value: int, limit: int) -> None:
    if not isinstance(value, int) or not 0 <= value < limit:
        raise IserEncodeError(f"{what}={value!r} does not fit")


@dataclass(frozen=True, slots=True)
class IserHdr:
    """The iSER header of an iSCSI control-type PDU (``struct iser_ctrl``,
    RFC 7145 §9): ``flags`` (:class:`IserFlag`) and the write and read
    STag / VA pairs. A pair whose valid bit is clear is sent as zeros by
    Linux, but any value round-trips."""

    flags: IserFlag = _NO_FLAGS
    write_stag: int = 0
    write_va: int = 0
    read_stag: int = 0
    read_va: int = 0

    SIZE: ClassVar[int] = ISER_HDR_LEN

    def encode(self) -> bytes:
        """The 28 header bytes."""
        _check("IserHdr.flags", int(self.flags), 0x10)
        for name, limit in (
            ("write_stag", _U32),
            ("write_va", _U64),
            ("read_stag", _U32),
            ("read_va", _U64),
        ):
            _check(f"IserHdr.{name}", getattr(self, name), limit)
        return _CTRL.pack(
            ISER_VER | self.flags, self.write_stag, self.write_va, self.read_stag, self.read_va
        )

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The header at the start of ``data``; it must be an iSCSI
        control-type header (a Hello is :class:`IserHello`)."""
        if len(data) < ISER_HDR_LEN:
            raise IserProtocolError(f"{len(data)} bytes: the iSER header is {ISER_HDR_LEN}")
        byte0, wstag, wva, rstag, rva = _CTRL.unpack_from(data)
        if byte0 & _OPCODE_MASK != ISER_VER:
            raise IserProtocolError(f"iSER opcode {byte0 >> 4:#x} is not an iSCSI control PDU")
        if byte0 & 0x03:
            raise IserProtocolError(f"iSER header flags {byte0:#04x}: reserved bits set")
        return cls(IserFlag(byte0 & 0x0C), wstag, wva, rstag, rva)


@dataclass(frozen=True, slots=True)
class IserHello:
    """The iSER Hello message (RFC 7145 §9), sent by an initiator that
    wants to announce its iSER versions and iSER-IRD; Linux never sends
    one. ``max_ver`` / ``min_ver`` are 4-bit, ``ird`` 16-bit; the rest of
    the 28-byte header is reserved."""

    max_ver: int = 1
    min_ver: int = 1
    ird: int = 0

    def encode(self) -> bytes:
        """The 28 Hello bytes."""
        _check("IserHello.max_ver", self.max_ver, 16)
        _check("IserHello.min_ver", self.min_ver, 16)
        _check("IserHello.ird", self.ird, 1 << 16)
        return _HELLO.pack(ISER_HELLO, self.max_ver << 4 | self.min_ver, self.ird)

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The Hello at the start of ``data``."""
        if len(data) < ISER_HDR_LEN:
            raise IserProtocolError(f"{len(data)} bytes: an iSER Hello is {ISER_HDR_LEN}")
        byte0, vers, ird = _HELLO.unpack_from(data)
        if byte0 & _OPCODE_MASK != ISER_HELLO:
            raise IserProtocolError(f"iSER opcode {byte0 >> 4:#x} is not a Hello")
        return cls(vers >> 4, vers & 0xF, ird)


@dataclass(frozen=True, slots=True)
class IserHelloReply:
    """The iSER HelloReply (RFC 7145 §9): ``rej`` (the target refuses
    the initiator's versions), ``max_ver`` / ``cur_ver`` and the target's
    iSER-ORD."""

    rej: bool = False
    max_ver: int = 1
    cur_ver: int = 1
    ord: int = 0

    def encode(self) -> bytes:
        """The 28 HelloReply bytes."""
        _check("IserHelloReply.max_ver", self.max_ver, 16)
        _check("IserHelloReply.cur_ver", self.cur_ver, 16)
        _check("IserHelloReply.ord", self.ord, 1 << 16)
        return _HELLO.pack(
            ISER_HELLORPLY | int(self.rej), self.max_ver << 4 | self.cur_ver, self.ord
        )

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The HelloReply at the start of ``data``."""
        if len(data) < ISER_HDR_LEN:
            raise IserProtocolError(f"{len(data)} bytes: an iSER HelloReply is {ISER_HDR_LEN}")
        byte0, vers, ird = _HELLO.unpack_from(data)
        if byte0 & _OPCODE_MASK != ISER_HELLORPLY:
            raise IserProtocolError(f"iSER opcode {byte0 >> 4:#x} is not a HelloReply")
        return cls(bool(byte0 & 0x01), vers >> 4, vers & 0xF, ird)


@dataclass(frozen=True, slots=True)
class IserCmHdr:
    """The iSER CM private data (``struct iser_cm_hdr``, RFC 7145 §5, §9):
    what ``iser_route_handler`` puts in the RDMA CM REQ after the
    ``cma_hdr`` and ``isert_rdma_accept`` in the REP. Linux sends
    ``ZBVA_NOT_SUP`` (it uses real virtual addresses as tagged offsets)
    and leaves ``SEND_W_INV_NOT_SUP`` clear (it accepts SEND with
    Invalidate)."""

    flags: IserCmFlag = IserCmFlag.ZBVA_NOT_SUP

    SIZE: ClassVar[int] = 4

    def encode(self) -> bytes:
        """The 4 private-data bytes."""
        _check("IserCmHdr.flags", int(self.flags), 0x100)
        return _CM.pack(self.flags)

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The header at the start of ``data`` (the rest of the CM private
        data is padding). Unknown flag bits are kept."""
        if len(data) < _CM.size:
            raise IserProtocolError(f"{len(data)} bytes: the iSER CM header is {_CM.size}")
        (flags,) = _CM.unpack_from(data)
        return cls(IserCmFlag(flags))


def encode_iser_send(hdr: IserHdr, pdu: IscsiPdu) -> bytes:
    """The payload of the SEND that carries ``pdu``: iSER header, BHS,
    AHSs, padded data segment (``iser_send_command`` /
    ``isert_put_response`` build the same two SGEs)."""
    return hdr.encode() + pdu.encode()


def decode_iser_send(data: BytesLike) -> tuple[IserHdr, IscsiPdu]:
    """The iSER header and the iSCSI PDU of a received SEND
    (``iser_rcv_completion`` / ``isert_recv_done``)."""
    return IserHdr.decode(data), decode_iscsi_pdu(memoryview(data)[ISER_HDR_LEN:])
