"""A logical unit: a LUN number, its backstore and its identity.

Kernel counterparts: LIO's ``struct se_lun`` + ``struct se_device`` and the
device's ``struct t10_wwn`` (vendor, model, revision, unit serial), whose
NAA designator ``spc_gen_naa_6h_vendor_specific`` derives from the serial.
"""

from __future__ import annotations

import hashlib

from softrdma.ulp.scsi.backstore import BLOCK_SIZES, Backstore
from softrdma.ulp.scsi.lun import MAX_LUN
from softrdma.ulp.scsi.sense import ScsiUsageError

__all__ = ["LogicalUnit", "check_ascii"]

_NAA_LOCAL = 0x3  # NAA locally assigned (SPC-4, NAA designator formats): no IEEE company ID needed
_MAX_SERIAL = 240  # the T10 vendor ID designator (8 + serial) must fit a 1-byte length


def check_ascii(what: str, text: str, max_len: int, *, min_len: int = 1) -> str:
    """``text`` if it is printable ASCII (20h..7Eh, SPC-4 "ASCII data field requirements") of
    ``min_len`` .. ``max_len`` characters; raises :class:`ScsiUsageError`."""
    if not (min_len <= len(text) <= max_len and text.isascii() and text.isprintable()):
        raise ScsiUsageError(f"{what} {text!r}: {min_len}..{max_len} printable ASCII characters")
    return text


class LogicalUnit:
    """One LUN of a :class:`~softrdma.ulp.scsi.ScsiTarget` (LIO ``se_lun`` +
    ``se_device``).

    ``unit_serial`` is the PRODUCT SERIAL NUMBER of VPD page 80h; by default
    32 hex digits of a SHA-256 over the backstore's identity (for a file:
    its resolved path), so the same image gets the same serial in every
    run. ``naa_id`` is the 8-byte NAA locally assigned designator of VPD
    page 83h (NAA 3h, 60 bits hashed from the serial), which Linux shows
    as the disk's ``wwid`` (``naa.3…``).
    """

    def __init__(
        self, number: int, backstore: Backstore, *, unit_serial: str | None = None
    ) -> None:
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= MAX_LUN:
            raise ScsiUsageError(f"LUN {number!r}: 0 .. {MAX_LUN}")
        if not isinstance(backstore, Backstore):
            raise ScsiUsageError(f"{backstore!r} is not a backstore")
        if backstore.block_size not in BLOCK_SIZES or backstore.num_blocks <= 0:
            raise ScsiUsageError(f"{backstore!r}: bad geometry")
        if unit_serial is None:
            unit_serial = hashlib.sha256(b"softrdma-lu-serial\0" + backstore.identity).hexdigest()
            unit_serial = unit_serial[:32]
        self.number = number
        self.backstore = backstore
        self.unit_serial = check_ascii("unit serial", unit_serial, _MAX_SERIAL)
        digest = hashlib.sha256(b"softrdma-lu-naa\0" + self.unit_serial.encode()).digest()
        value = (_NAA_LOCAL << 60) | (int.from_bytes(digest[:8], "big") & ((1 << 60) - 1))
        self.naa_id = value.to_bytes(8, "big")

    @property
    def block_size(self) -> int:
        """Logical block size in bytes."""
        return self.backstore.block_size

    @property
    def num_blocks(self) -> int:
        """Capacity in logical blocks."""
        return self.backstore.num_blocks

    @property
    def last_lba(self) -> int:
        """The LBA of the last logical block (what READ CAPACITY returns)."""
        return self.backstore.num_blocks - 1

    @property
    def read_only(self) -> bool:
        """Writes fail with DATA PROTECT / WRITE PROTECTED."""
        return self.backstore.read_only

    @property
    def write_cache(self) -> bool:
        """The caching mode page's WCE bit."""
        return self.backstore.write_cache

    def __repr__(self) -> str:
        return f"LogicalUnit({self.number}, {self.backstore!r}, serial={self.unit_serial!r})"
