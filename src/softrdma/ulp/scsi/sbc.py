"""Block commands: CDB parsing and execution for a direct-access logical
unit (SBC-3).

Kernel counterpart: LIO's ``drivers/target/target_core_sbc.c``
(``sbc_parse_cdb``, ``sbc_check_valid_sectors``, ``sbc_emulate_readcapacity``
/ ``_16``, ``sbc_emulate_startstop``) driving the ``fileio`` backend's
``fd_execute_rw`` and ``fd_execute_sync_cache``.

Every field is checked before any I/O: the protection fields (this target
has no protection information, so RDPROTECT / WRPROTECT / VRPROTECT must be
zero), write protection, the LBA range — an LBA past the last one, or a
transfer running past it, is LOGICAL BLOCK ADDRESS OUT OF RANGE with the
first invalid LBA in the INFORMATION field (SBC-3 error reporting) — and
the per-command transfer cap, past which LIO too answers INVALID FIELD IN
CDB (its ``hw_max_sectors`` check), pointing at the TRANSFER LENGTH field.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

from softrdma.ulp.scsi.cdb import Direction, Opcode, Parsed, Runner, u16, u32, u64
from softrdma.ulp.scsi.lu import LogicalUnit
from softrdma.ulp.scsi.sense import (
    AdditionalSense,
    CheckCondition,
    SenseData,
    SenseKey,
    illegal_request,
)

__all__ = ["SBC_PARSERS"]

_RC10 = struct.Struct(">II")
_RC16 = struct.Struct(">QIBBH16x")
_U32_MAX = 0xFFFF_FFFF

SbcParser = Callable[[LogicalUnit, bytes, int], Parsed]


def _out_of_range(lu: LogicalUnit, lba: int, blocks: int) -> None:
    """LOGICAL BLOCK ADDRESS OUT OF RANGE unless ``lba`` is a valid LBA
    and ``blocks`` blocks from it stay on the medium (``sbc_check_valid_sectors``)."""
    capacity = lu.num_blocks
    if lba >= capacity or blocks > capacity - lba:
        first_invalid = lba if lba >= capacity else capacity
        raise CheckCondition(
            SenseData.of(
                SenseKey.ILLEGAL_REQUEST,
                AdditionalSense.LBA_OUT_OF_RANGE,
                information=first_invalid,
            )
        )


def _write_protected() -> CheckCondition:
    return CheckCondition(SenseData.of(SenseKey.DATA_PROTECT, AdditionalSense.WRITE_PROTECTED))


def _io_error(exc: OSError, lba: int, *, write: bool) -> CheckCondition:
    """The sense for a failed backstore I/O: a full file system is a thin
    provisioning failure, a read-only one write protection, anything else
    a medium error at the command's first LBA."""
    if write and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        code = AdditionalSense.SPACE_ALLOCATION_FAILED_WRITE_PROTECT
        return CheckCondition(SenseData.of(SenseKey.DATA_PROTECT, code))
    if write and exc.errno == errno.EROFS:
        return _write_protected()
    code = AdditionalSense.WRITE_ERROR if write else AdditionalSense.UNRECOVERED_READ_ERROR
    return CheckCondition(SenseData.of(SenseKey.MEDIUM_ERROR, code, information=lba))


def _reader(lu: LogicalUnit, lba: int, nbytes: int) -> Runner:
    def run(_data: memoryview | None, limit: int) -> bytes:
        want = min(nbytes, limit)
        if want == 0:
            return b""
        try:
            return lu.backstore.pread(lba * lu.block_size, want)
        except OSError as exc:
            raise _io_error(exc, lba, write=False) from exc

    return run


def _writer(lu: LogicalUnit, lba: int, nbytes: int, fua: bool) -> Runner:
    def run(data: memoryview | None, _limit: int) -> bytes:
        if nbytes == 0:
            return b""
        assert data is not None and len(data) == nbytes  # the core checked
        try:
            lu.backstore.pwrite(lba * lu.block_size, data)
            if fua and lu.write_cache:
                lu.backstore.flush()
        except OSError as exc:
            raise _io_error(exc, lba, write=True) from exc
        return b""

    return run


def _rw(
    lu: LogicalUnit,
    cdb: bytes,
    max_transfer: int,
    *,
    write: bool,
    lba: int,
    blocks: int,
    length_byte: int,
    flags: bool,
) -> Parsed:
    """READ / WRITE (6, 10, 12, 16): ``sbc_parse_cdb`` for the data CDBs."""
    fua = False
    if flags:  # the 10/12/16-byte forms: byte 1 holds xxPROTECT, DPO, FUA
        if cdb[1] & 0xE0:
            raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 1, 7)
        fua = bool(cdb[1] & 0x08)
    if write and lu.read_only:
        raise _write_protected()
    _out_of_range(lu, lba, blocks)
    nbytes = blocks * lu.block_size
    if nbytes > max_transfer:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, length_byte)
    name = ("WRITE" if write else "READ") + f"({_RW_SIZES[cdb[0]]})"
    if write:
        return Parsed(name, Direction.DATA_OUT, nbytes, _writer(lu, lba, nbytes, fua), True)
    return Parsed(name, Direction.DATA_IN, nbytes, _reader(lu, lba, nbytes), True)


_RW_SIZES: dict[int, int] = {
    Opcode.READ_6: 6,
    Opcode.WRITE_6: 6,
    Opcode.READ_10: 10,
    Opcode.WRITE_10: 10,
    Opcode.READ_12: 12,
    Opcode.WRITE_12: 12,
    Opcode.READ_16: 16,
    Opcode.WRITE_16: 16,
}


def _rw6(write: bool) -> SbcParser:
    def parse(lu: LogicalUnit, cdb: bytes, max_transfer: int) -> Parsed:
        lba = ((cdb[1] & 0x1F) << 16) | u16(cdb, 2)
        blocks = cdb[4] or 256  # SBC-3: a TRANSFER LENGTH of 0 means 256 blocks
        return _rw(
            lu, cdb, max_transfer, write=write, lba=lba, blocks=blocks, length_byte=4, flags=False
        )

    return parse


def _rw10(write: bool) -> SbcParser:
    def parse(lu: LogicalUnit, cdb: bytes, max_transfer: int) -> Parsed:
        return _rw(
            lu,
            cdb,
            max_transfer,
            write=write,
            lba=u32(cdb, 2),
            blocks=u16(cdb, 7),
            length_byte=7,
            flags=True,
        )

    return parse


def _rw12(write: bool) -> SbcParser:
    def parse(lu: LogicalUnit, cdb: bytes, max_transfer: int) -> Parsed:
        return _rw(
            lu,
            cdb,
            max_transfer,
            write=write,
            lba=u32(cdb, 2),
            blocks=u32(cdb, 6),
            length_byte=6,
            flags=True,
        )

    return parse


def _rw16(write: bool) -> SbcParser:
    def parse(lu: LogicalUnit, cdb: bytes, max_transfer: int) -> Parsed:
        return _rw(
            lu,
            cdb,
            max_transfer,
            write=write,
            lba=u64(cdb, 2),
            blocks=u32(cdb, 10),
            length_byte=10,
            flags=True,
        )

    return parse


def _flusher(lu: LogicalUnit) -> Runner:
    def run(_data: memoryview | None, _limit: int) -> bytes:
        try:
            lu.backstore.flush()
        except OSError as exc:
            raise CheckCondition(
                SenseData.of(SenseKey.MEDIUM_ERROR, AdditionalSense.WRITE_ERROR)
            ) from exc
        return b""

    return run


def _sync_cache(lu: LogicalUnit, name: str, lba: int, blocks: int) -> Parsed:
    """SYNCHRONIZE CACHE (10 / 16): the range is checked (NUMBER OF LOGICAL
    BLOCKS 0 means "to the end"), then the whole image is flushed; IMMED is
    accepted and the flush done before status anyway
    (``fd_execute_sync_cache``)."""
    _out_of_range(lu, lba, blocks)
    return Parsed(name, Direction.NONE, 0, _flusher(lu))


def _sync10(lu: LogicalUnit, cdb: bytes, _max: int) -> Parsed:
    return _sync_cache(lu, "SYNCHRONIZE CACHE(10)", u32(cdb, 2), u16(cdb, 7))


def _sync16(lu: LogicalUnit, cdb: bytes, _max: int) -> Parsed:
    return _sync_cache(lu, "SYNCHRONIZE CACHE(16)", u64(cdb, 2), u32(cdb, 10))


def _nothing(_data: memoryview | None, _limit: int) -> bytes:
    return b""


def _verify(lu: LogicalUnit, cdb: bytes, name: str, lba: int, blocks: int) -> Parsed:
    """VERIFY (10 / 12 / 16) with BYTCHK 0: the medium is a file, so there
    is nothing to verify beyond the range (LIO emulates VERIFY the same
    way); byte-by-byte comparison (BYTCHK ≠ 0) is not supported."""
    if cdb[1] & 0xE0:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 1, 7)
    if cdb[1] & 0x06:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 1, 2)
    _out_of_range(lu, lba, blocks)
    return Parsed(name, Direction.NONE, 0, _nothing)


def _verify10(lu: LogicalUnit, cdb: bytes, _max: int) -> Parsed:
    return _verify(lu, cdb, "VERIFY(10)", u32(cdb, 2), u16(cdb, 7))


def _verify12(lu: LogicalUnit, cdb: bytes, _max: int) -> Parsed:
    return _verify(lu, cdb, "VERIFY(12)", u32(cdb, 2), u32(cdb, 6))


def _verify16(lu: LogicalUnit, cdb: bytes, _max: int) -> Parsed:
    return _verify(lu, cdb, "VERIFY(16)", u64(cdb, 2), u32(cdb, 10))


def _read_capacity10(lu: LogicalUnit, cdb: bytes, _max: int) -> Parsed:
    """READ CAPACITY (10) (``sbc_emulate_readcapacity``): the last LBA, or
    FFFFFFFFh when it does not fit in 32 bits — the initiator must then use
    READ CAPACITY (16) — and the block length. PMI = 0 with a non-zero LBA
    is an invalid field (SBC-3)."""
    if not cdb[8] & 0x01 and u32(cdb, 2):
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 2)
    data = _RC10.pack(min(lu.last_lba, _U32_MAX), lu.block_size)
    return Parsed("READ CAPACITY(10)", Direction.DATA_IN, len(data), _constant(data))


def _service_action_in16(lu: LogicalUnit, cdb: bytes, _max: int) -> Parsed:
    """SERVICE ACTION IN (16): only READ CAPACITY (16)
    (``sbc_emulate_readcapacity_16``): last LBA, block length, no protection,
    one logical block per physical block, no thin provisioning (32 bytes,
    truncated to the ALLOCATION LENGTH)."""
    if cdb[1] & 0x1F != 0x10:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 1, 4)
    if not cdb[14] & 0x01 and u64(cdb, 2):
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 2)
    data = _RC16.pack(lu.last_lba, lu.block_size, 0, 0, 0)
    return Parsed("READ CAPACITY(16)", Direction.DATA_IN, u32(cdb, 10), _constant(data))


def _start_stop(lu: LogicalUnit, cdb: bytes, _max: int) -> Parsed:
    """START STOP UNIT (``sbc_emulate_startstop``): power conditions and
    LOEJ are invalid fields (no power management, no removable medium);
    START and STOP are accepted, a STOP without NO_FLUSH flushes the
    cache. The unit is not really stopped: media access keeps working."""
    if cdb[4] & 0xF0:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 4, 7)
    if cdb[3] & 0x0F:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 3, 3)
    if cdb[4] & 0x02:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 4, 1)
    stop_and_flush = not cdb[4] & 0x01 and not cdb[4] & 0x04
    return Parsed(
        "START STOP UNIT", Direction.NONE, 0, _flusher(lu) if stop_and_flush else _nothing
    )


def _constant(data: bytes) -> Runner:
    def run(_data: memoryview | None, _limit: int) -> bytes:
        return data

    return run


#: Opcode → parser for the SBC commands; each needs a logical unit.
SBC_PARSERS: dict[int, SbcParser] = {
    Opcode.READ_6: _rw6(False),
    Opcode.WRITE_6: _rw6(True),
    Opcode.READ_10: _rw10(False),
    Opcode.WRITE_10: _rw10(True),
    Opcode.READ_12: _rw12(False),
    Opcode.WRITE_12: _rw12(True),
    Opcode.READ_16: _rw16(False),
    Opcode.WRITE_16: _rw16(True),
    Opcode.SYNCHRONIZE_CACHE_10: _sync10,
    Opcode.SYNCHRONIZE_CACHE_16: _sync16,
    Opcode.VERIFY_10: _verify10,
    Opcode.VERIFY_12: _verify12,
    Opcode.VERIFY_16: _verify16,
    Opcode.READ_CAPACITY_10: _read_capacity10,
    Opcode.SERVICE_ACTION_IN_16: _service_action_in16,
    Opcode.START_STOP_UNIT: _start_stop,
}
