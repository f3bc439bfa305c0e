"""LUN numbers and their 8-byte wire form.

The target's LUNs are SAM-5 single-level LUN numbers 0 .. 16383 (what an
administrator maps, LIO's ``mapped_lun``). On the wire (REPORT LUNS, the
LUN field of an SRP_CMD or an iSCSI PDU) a LUN is 8 bytes (SAM-5, logical
unit number structure): LUNs below 256 use the peripheral device
addressing method (``00 LL``), the others the flat space addressing method
(``01`` in the top two bits, 14 bits of LUN); the remaining six bytes are
zero (a single level).

Linux numbers LUNs with ``scsilun_to_int`` (each 16-bit level, lowest
first). For the LUNs this target reports the two numberings agree below
256, and a flat-space LUN ``n`` is Linux LUN ``0x4000 | n``;
:func:`lun_from_any` accepts either, so a transport can pass the integer
its protocol layer decoded.

Kernel counterparts: ``int_to_scsilun`` / ``scsilun_to_int``
(``drivers/scsi/scsi_common.c``), LIO's ``transport_lookup_cmd_lun``.
"""

from __future__ import annotations

import struct

from softrdma.ulp.scsi.sense import ScsiUsageError

__all__ = ["MAX_LUN", "decode_lun", "encode_lun", "lun_from_any"]

#: The largest single-level LUN (14 bits of flat space addressing).
MAX_LUN = 0x3FFF

_LUN = struct.Struct(">H6s")
_LINUX_WORDS = struct.Struct(">4H")
_ZERO6 = bytes(6)
_FLAT = 0x4000


def encode_lun(lun: int) -> bytes:
    """The 8-byte single-level LUN for LUN number ``lun`` (SAM-5 single
    level LUN structure: peripheral device addressing below 256, flat space
    addressing above; LIO's ``int_to_scsilun`` for REPORT LUNS)."""
    if not 0 <= lun <= MAX_LUN:
        raise ScsiUsageError(f"LUN {lun!r}: 0 .. {MAX_LUN}")
    return _LUN.pack(lun if lun < 256 else _FLAT | lun, _ZERO6)


def decode_lun(wire: bytes) -> int | None:
    """The LUN number of an 8-byte LUN field, or None when it is not a
    single-level peripheral or flat-space LUN (``scsilun_to_int`` followed
    by LIO's lookup; such a LUN addresses no logical unit here)."""
    if len(wire) != 8:
        raise ScsiUsageError(f"a LUN field is 8 bytes, got {len(wire)}")
    first: int
    rest: bytes
    first, rest = _LUN.unpack(wire)
    if rest != _ZERO6:
        return None
    method = first >> 14
    if method == 0:  # peripheral device addressing: bus identifier must be 0
        return first if first < 256 else None
    if method == 1:  # flat space addressing
        return first & MAX_LUN
    return None


def lun_from_any(lun: int | bytes | bytearray | memoryview) -> int | None:
    """A LUN number from what a transport has: the 8 wire bytes, a LUN
    number 0 .. 16383, or a Linux LUN number (``scsilun_to_int`` of the
    wire bytes). Returns None for a LUN that cannot address a logical unit
    here; raises :class:`ScsiUsageError` for a value no transport can
    produce (negative, or not 64 bits)."""
    if isinstance(lun, bytes | bytearray | memoryview):
        return decode_lun(bytes(lun))
    if isinstance(lun, bool) or not isinstance(lun, int):
        raise ScsiUsageError(f"LUN {lun!r}: an int or 8 bytes")
    if not 0 <= lun < 1 << 64:
        raise ScsiUsageError(f"LUN {lun!r}: a LUN is 64 bits")
    if lun <= MAX_LUN:
        return lun
    # A Linux LUN number: rebuild its wire form (int_to_scsilun) and decode.
    words = ((lun >> shift) & 0xFFFF for shift in (0, 16, 32, 48))
    return decode_lun(_LINUX_WORDS.pack(*words))
