"""What the SCSI disk driver and midlayer put on top of an SRP initiator:
CDBs for the commands a block device needs, the sense data that comes back,
and INQUIRY / READ CAPACITY parsing.

Kernel counterparts: ``drivers/scsi/sd.c`` (``sd_setup_read_write_cmnd``
with its 10- / 16-byte choice, ``read_capacity_16`` / ``read_capacity_10``,
``sd_sync_cache``), ``drivers/scsi/scsi_common.c``
(``scsi_normalize_sense``), ``scsi_scan.c`` (the 36-byte standard
INQUIRY), ``include/scsi/scsi_proto.h`` (opcodes; the status codes and sense keys
are :mod:`softrdma.ulp.scsi.sense`'s).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from softrdma.ulp.scsi.sense import ScsiStatus, SenseKey
from softrdma.ulp.srp.initiator_errors import ScsiCheckCondition, ScsiStatusError

__all__ = [
    "UNIT_ATTENTION",
    "Inquiry",
    "ScsiSense",
    "ScsiStatus",
    "cdb_inquiry",
    "cdb_read",
    "cdb_read_capacity_10",
    "cdb_read_capacity_16",
    "cdb_synchronize_cache",
    "cdb_test_unit_ready",
    "cdb_write",
    "parse_inquiry",
    "parse_read_capacity_10",
    "parse_read_capacity_16",
    "scsi_normalize_sense",
    "status_error",
]


UNIT_ATTENTION = SenseKey.UNIT_ATTENTION
"""The sense key the midlayer retries (``scsi_check_sense``)."""

_LBA32_MAX = 0xFFFF_FFFF
_READ_10, _WRITE_10, _READ_16, _WRITE_16 = 0x28, 0x2A, 0x88, 0x8A


def cdb_read(lba: int, nblocks: int) -> bytes:
    """``sd_setup_read_write_cmnd`` for a read: READ(10) while the LBA and
    the transfer fit its 32- and 16-bit fields (2 TiB of 512-byte blocks),
    READ(16) beyond."""
    return _rw(_READ_10, _READ_16, lba, nblocks)


def cdb_write(lba: int, nblocks: int) -> bytes:
    """``sd_setup_read_write_cmnd`` for a write: WRITE(10) or WRITE(16)."""
    return _rw(_WRITE_10, _WRITE_16, lba, nblocks)


def _rw(op10: int, op16: int, lba: int, nblocks: int) -> bytes:
    if lba < 0 or not 0 < nblocks <= _LBA32_MAX or lba + nblocks - 1 >= 1 << 64:
        raise ValueError(f"LBA {lba} + {nblocks} blocks does not fit a READ/WRITE CDB")
    if lba + nblocks - 1 <= _LBA32_MAX and nblocks <= 0xFFFF:
        return struct.pack(">BBIBHB", op10, 0, lba, 0, nblocks, 0)
    return struct.pack(">BBQIBB", op16, 0, lba, nblocks, 0, 0)


def cdb_read_capacity_10() -> bytes:
    """READ CAPACITY(10) (``read_capacity_10``)."""
    return bytes([0x25]) + bytes(9)


def cdb_read_capacity_16(alloc_len: int = 32) -> bytes:
    """SERVICE ACTION IN(16) / READ CAPACITY(16) (``read_capacity_16``,
    ``RC16_LEN`` 32 bytes)."""
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc_len, 0, 0)


def cdb_inquiry(alloc_len: int = 36) -> bytes:
    """Standard INQUIRY (``scsi_probe_lun``: 36 bytes first)."""
    return struct.pack(">BBBHB", 0x12, 0, 0, alloc_len, 0)


def cdb_synchronize_cache() -> bytes:
    """SYNCHRONIZE CACHE(10) of the whole medium (``sd_sync_cache``: LBA 0,
    0 blocks)."""
    return bytes([0x35]) + bytes(9)


def cdb_test_unit_ready() -> bytes:
    """TEST UNIT READY."""
    return bytes(6)


def parse_read_capacity_16(data: bytes) -> tuple[int, int]:
    """``(blocks, block_size)`` from READ CAPACITY(16) parameter data: the
    last LBA plus one, the logical block length."""
    if len(data) < 12:
        raise ValueError(f"READ CAPACITY(16) returned {len(data)} bytes, 12 needed")
    last, size = struct.unpack_from(">QI", data)
    return last + 1, size


def parse_read_capacity_10(data: bytes) -> tuple[int, int]:
    """``(blocks, block_size)`` from READ CAPACITY(10) parameter data (a last
    LBA of 0xffffffff means "ask READ CAPACITY(16)")."""
    if len(data) < 8:
        raise ValueError(f"READ CAPACITY(10) returned {len(data)} bytes, 8 needed")
    last, size = struct.unpack_from(">II", data)
    return last + 1, size


@dataclass(frozen=True, slots=True)
class Inquiry:
    """The standard INQUIRY data a disk is named by (``scsi_probe_lun``,
    ``scsi_add_lun``): peripheral device type, vendor (8 bytes), product
    (16), revision (4), trailing blanks stripped."""

    peripheral_type: int
    vendor: str
    product: str
    revision: str


def parse_inquiry(data: bytes) -> Inquiry:
    """The fields of standard INQUIRY data (at least 36 bytes)."""
    if len(data) < 36:
        raise ValueError(f"INQUIRY returned {len(data)} bytes, 36 needed")

    def text(b: bytes) -> str:
        return b.decode("ascii", "replace").rstrip(" \0")

    return Inquiry(data[0] & 0x1F, text(data[8:16]), text(data[16:32]), text(data[32:36]))


@dataclass(frozen=True, slots=True)
class ScsiSense:
    """``struct scsi_sense_hdr`` (``scsi_normalize_sense``)."""

    response_code: int
    sense_key: int
    asc: int
    ascq: int


def scsi_normalize_sense(sense: bytes) -> ScsiSense | None:
    """``scsi_normalize_sense``: fixed (0x70 / 0x71) or descriptor (0x72 /
    0x73) format sense data; None when it is neither."""
    if not sense:
        return None
    code = sense[0] & 0x7F
    if code < 0x70:
        return None
    if code >= 0x72:
        return ScsiSense(
            code,
            sense[1] & 0xF if len(sense) > 1 else 0,
            sense[2] if len(sense) > 2 else 0,
            sense[3] if len(sense) > 3 else 0,
        )
    key = sense[2] & 0xF if len(sense) > 2 else 0
    add_len = sense[7] if len(sense) > 7 else 0
    end = min(len(sense), 8 + add_len)
    asc = sense[12] if end > 12 else 0
    ascq = sense[13] if end > 13 else 0
    return ScsiSense(code, key, asc, ascq)


def status_error(status: int, sense: bytes) -> ScsiStatusError:
    """The typed error for a SCSI status other than GOOD."""
    if status == ScsiStatus.CHECK_CONDITION:
        hdr = scsi_normalize_sense(sense)
        if hdr is None:
            return ScsiCheckCondition(sense, 0, 0, 0)
        return ScsiCheckCondition(sense, hdr.sense_key, hdr.asc, hdr.ascq)
    try:
        name = ScsiStatus(status).name
    except ValueError:
        name = f"{status:#04x}"
    return ScsiStatusError(status, f"SCSI status {name}")
