"""The common MAD header (IBTA vol. 1 §13.4.2, ``struct ib_mad_hdr`` in
``include/rdma/ib_mad.h``) and the management classes, methods and status
codes the GSI uses.

A MAD is 256 bytes: this 24-byte header, then 232 bytes of class data. All
fields are big-endian::

    0  base_version      1  mgmt_class   2  class_version   3  method
    4  status (16)       6  class_specific (16)
    8  tid (64)
    16 attr_id (16)      18 reserved (16)
    20 attr_mod (32)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from softrdma.errors import SoftRdmaError

__all__ = [
    "IB_MGMT_BASE_VERSION",
    "MAD_DATA_SIZE",
    "MAD_HDR_SIZE",
    "MAD_SIZE",
    "MadError",
    "MadHdr",
    "MadMethod",
    "MadStatus",
    "MalformedMad",
    "MgmtClass",
    "make_mad",
]

MAD_SIZE = 256
"""``sizeof(struct ib_mad)``: every non-RMPP MAD is exactly this long."""
MAD_HDR_SIZE = 24
"""``sizeof(struct ib_mad_hdr)``."""
MAD_DATA_SIZE = MAD_SIZE - MAD_HDR_SIZE
"""``IB_MGMT_MAD_DATA``: class data after the common header (232 bytes)."""
IB_MGMT_BASE_VERSION = 1

_HDR = struct.Struct(">BBBBHHQHHI")


class MgmtClass(enum.IntEnum):
    """``IB_MGMT_CLASS_*``."""

    SUBN_LID_ROUTED = 0x01
    SUBN_DIRECTED_ROUTE = 0x81
    SUBN_ADM = 0x03
    PERF_MGMT = 0x04
    BM = 0x05
    DEVICE_MGMT = 0x06
    CM = 0x07
    SNMP = 0x08


class MadMethod(enum.IntEnum):
    """``IB_MGMT_METHOD_*``; a response is its request's method with the
    ``RESP`` bit (0x80) set."""

    GET = 0x01
    SET = 0x02
    SEND = 0x03
    TRAP = 0x05
    REPORT = 0x06
    TRAP_REPRESS = 0x07
    GET_RESP = 0x81
    REPORT_RESP = 0x86
    RESP = 0x80


class MadStatus(enum.IntEnum):
    """``IB_MGMT_MAD_STATUS_*`` (the class-independent low bits of
    ``status``, IBTA Table 110)."""

    SUCCESS = 0x0000
    BUSY = 0x0001
    REDIRECT_REQD = 0x0002
    BAD_VERSION = 0x0004
    UNSUPPORTED_METHOD = 0x0008
    UNSUPPORTED_METHOD_ATTRIB = 0x000C
    INVALID_ATTRIB_VALUE = 0x001C


class MadError(SoftRdmaError, ValueError):
    """A MAD field given for encoding is out of its wire range (a caller
    bug, not bad wire input)."""


class MalformedMad(SoftRdmaError, ValueError):
    """Received bytes that are not a MAD of the expected layout (too short,
    wrong attribute, a field with a reserved value). The MAD layer drops such
    MADs and counts them; the decoders raise this so the caller decides."""


@dataclass(frozen=True, slots=True)
class MadHdr:
    """``struct ib_mad_hdr``: the first 24 bytes of every MAD."""

    base_version: int = IB_MGMT_BASE_VERSION
    mgmt_class: int = MgmtClass.CM
    class_version: int = 2
    method: int = MadMethod.SEND
    status: int = 0
    class_specific: int = 0
    tid: int = 0
    attr_id: int = 0
    attr_mod: int = 0
    resv: int = 0
    """The reserved 16 bits after ``attr_id``, kept so that any MAD re-encodes
    byte for byte (senders set them to zero)."""

    @property
    def is_response(self) -> bool:
        """The method has the ``RESP`` bit (``ib_response_mad``)."""
        return bool(self.method & MadMethod.RESP)

    def encode(self) -> bytes:
        """The 24 header bytes. Raises :class:`MadError` for a field out of range."""
        try:
            return _HDR.pack(
                self.base_version,
                self.mgmt_class,
                self.class_version,
                self.method,
                self.status,
                self.class_specific,
                self.tid,
                self.attr_id,
                self.resv,
                self.attr_mod,
            )
        except struct.error as e:
            raise MadError(f"MAD header field out of range: {e}: {self}") from None

    @classmethod
    def decode(cls, mad: bytes | bytearray | memoryview) -> MadHdr:
        """The header of ``mad``. Raises :class:`MalformedMad` if it is shorter
        than 24 bytes."""
        if len(mad) < MAD_HDR_SIZE:
            raise MalformedMad(f"MAD of {len(mad)} bytes: shorter than its 24-byte header")
        (base, mclass, cver, method, status, cspec, tid, attr_id, resv, attr_mod) = (
            _HDR.unpack_from(mad)
        )
        return cls(base, mclass, cver, method, status, cspec, tid, attr_id, attr_mod, resv)

    def response(self, status: int = 0) -> MadHdr:
        """The header of a response to this request: the ``RESP`` method
        (GET and SET are answered with GET_RESP), the same TID, class,
        version and attribute (mad.c ``generate_unmatched_resp``)."""
        method = MadMethod.GET_RESP if self.method == MadMethod.SET else self.method | 0x80
        return MadHdr(
            self.base_version,
            self.mgmt_class,
            self.class_version,
            method,
            status,
            self.class_specific,
            self.tid,
            self.attr_id,
            self.attr_mod,
        )


def make_mad(hdr: MadHdr, data: bytes | bytearray | memoryview = b"") -> bytes:
    """A whole 256-byte MAD: the header, ``data``, zero padding. Raises
    :class:`MadError` if ``data`` is longer than 232 bytes."""
    if len(data) > MAD_DATA_SIZE:
        raise MadError(f"MAD data of {len(data)} bytes: at most {MAD_DATA_SIZE}")
    return hdr.encode() + bytes(data) + bytes(MAD_DATA_SIZE - len(data))
