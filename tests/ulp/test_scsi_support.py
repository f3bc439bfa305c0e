"""Helpers for the SCSI target core tests: CDB builders, a one-call
command runner, sense assertions and in-memory backstores."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

from softrdma.ulp.scsi import (
    AdditionalSense,
    CommandPlan,
    Direction,
    FieldPointer,
    FileBackstore,
    Nexus,
    Opcode,
    ScsiResult,
    ScsiStatus,
    ScsiTarget,
    SenseData,
    SenseKey,
)

A = Nexus("iqn.initiator-a", "port-1")
B = Nexus("iqn.initiator-b", "port-1")

_CDB6 = struct.Struct(">BBHBB")
_CDB10 = struct.Struct(">BBIBHB")
_CDB12 = struct.Struct(">BBIIBB")
_CDB16 = struct.Struct(">BBQIBB")

READS = {6: Opcode.READ_6, 10: Opcode.READ_10, 12: Opcode.READ_12, 16: Opcode.READ_16}
WRITES = {6: Opcode.WRITE_6, 10: Opcode.WRITE_10, 12: Opcode.WRITE_12, 16: Opcode.WRITE_16}


def rw_cdb(size: int, write: bool, lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """A READ / WRITE CDB of ``size`` bytes (6, 10, 12 or 16)."""
    op = (WRITES if write else READS)[size]
    flags = 0x08 if fua else 0
    if size == 6:
        assert not fua and 0 <= lba < 1 << 21 and 1 <= blocks <= 256
        return _CDB6.pack(op, lba >> 16, lba & 0xFFFF, blocks & 0xFF, 0)
    if size == 10:
        return _CDB10.pack(op, flags, lba, 0, blocks, 0)
    if size == 12:
        return _CDB12.pack(op, flags, lba, blocks, 0, 0)
    return _CDB16.pack(op, flags, lba, blocks, 0, 0)


def cdb10(op: int, b1: int = 0, lba: int = 0, length: int = 0, b6: int = 0) -> bytes:
    """A 10-byte CDB: opcode, byte 1, bytes 2-5, byte 6, bytes 7-8, control 0."""
    return _CDB10.pack(op, b1, lba, b6, length, 0)


def cdb16(op: int, b1: int = 0, lba: int = 0, length: int = 0, b14: int = 0) -> bytes:
    """A 16-byte CDB: opcode, byte 1, bytes 2-9, bytes 10-13, byte 14, control 0."""
    return _CDB16.pack(op, b1, lba, length, b14, 0)


def inquiry(page: int | None = None, alloc: int = 255) -> bytes:
    """INQUIRY, standard data or the VPD ``page``."""
    evpd = 0 if page is None else 1
    return struct.pack(">BBBHB", Opcode.INQUIRY, evpd, page or 0, alloc, 0)


def mode_sense6(
    page: int, alloc: int = 255, *, pc: int = 0, dbd: bool = False, sub: int = 0
) -> bytes:
    """MODE SENSE (6)."""
    return bytes([Opcode.MODE_SENSE_6, 0x08 if dbd else 0, pc << 6 | page, sub, alloc, 0])


def mode_sense10(
    page: int, alloc: int = 255, *, pc: int = 0, dbd: bool = False, llbaa: bool = False
) -> bytes:
    """MODE SENSE (10)."""
    b1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return struct.pack(">BBBB3xHB", Opcode.MODE_SENSE_10, b1, pc << 6 | page, 0, alloc, 0)


def report_luns(alloc: int = 4096, select: int = 0) -> bytes:
    """REPORT LUNS."""
    return struct.pack(">BxBxxxIxx", Opcode.REPORT_LUNS, select, alloc)


def request_sense(alloc: int = 18, desc: bool = False) -> bytes:
    """REQUEST SENSE."""
    return bytes([Opcode.REQUEST_SENSE, 1 if desc else 0, 0, 0, alloc, 0])


TUR = bytes(6)


def read_capacity16(alloc: int = 32) -> bytes:
    """SERVICE ACTION IN (16) / READ CAPACITY (16)."""
    return cdb16(Opcode.SERVICE_ACTION_IN_16, 0x10, 0, alloc)


def run(
    target: ScsiTarget,
    cdb: bytes,
    data: bytes | None = None,
    *,
    nexus: Nexus = A,
    lun: int | bytes = 0,
    tag: int | None = None,
    expected_length: int | None = None,
) -> ScsiResult:
    """Set up and execute one command; write data defaults to a pattern of
    the plan's length."""
    plan = target.setup(nexus, lun, cdb, tag=tag, expected_length=expected_length)
    if plan.direction is Direction.DATA_OUT:
        if data is None:
            data = bytes(range(256)) * (plan.transfer_length // 256 + 1)
            data = data[: plan.transfer_length]
        return target.execute(plan, data)
    return target.execute(plan)


def good(result: ScsiResult) -> bytes:
    """The data-in of a GOOD result (fails on anything else)."""
    assert result.status is ScsiStatus.GOOD, result.sense_data
    assert result.sense == b""
    return result.data_in


def sense_of(result: ScsiResult) -> SenseData:
    """The sense of a CHECK CONDITION result, checked to be well formed."""
    assert result.status is ScsiStatus.CHECK_CONDITION, result
    assert len(result.sense) == 18
    assert result.sense[0] & 0x7F == 0x70
    assert result.sense[7] == 10
    assert result.data_in == b""
    return SenseData.decode(result.sense)


def assert_sense(
    result: ScsiResult | CommandPlan,
    key: SenseKey,
    code: AdditionalSense,
    *,
    information: int | None = None,
    pointer: FieldPointer | None = None,
) -> SenseData:
    """``result`` (or a plan failed at setup) is CHECK CONDITION with this
    key, ASC/ASCQ, INFORMATION and field pointer."""
    if isinstance(result, CommandPlan):
        assert result.result is not None, result
        assert result.direction is Direction.NONE and result.transfer_length == 0
        result = result.result
    sense = sense_of(result)
    assert (sense.key, sense.additional_sense) == (key, code), sense
    assert sense.information == information, sense
    assert sense.field_pointer == pointer, sense
    return sense


def invalid_field(result: ScsiResult | CommandPlan, byte: int, bit: int | None = None) -> None:
    """ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at ``byte`` / ``bit``."""
    assert_sense(
        result,
        SenseKey.ILLEGAL_REQUEST,
        AdditionalSense.INVALID_FIELD_IN_CDB,
        pointer=FieldPointer(byte, bit),
    )


def make_image(path: Path, size: int = 64 << 20, block_size: int = 512) -> FileBackstore:
    """A sparse image of ``size`` bytes."""
    return FileBackstore(path, block_size, size=size, create=True)


class MemBackstore:
    """An in-memory backstore for geometry tests (huge capacities read as
    zeros, nothing stored) and for injecting I/O errors."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 512,
        *,
        read_only: bool = False,
        write_cache: bool = True,
        fail: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.read_only = read_only
        self.write_cache = write_cache
        self.identity = b"mem:%d" % num_blocks
        self.fail = fail
        self.writes: list[tuple[int, bytes]] = []
        self.flushes = 0

    def pread(self, offset: int, length: int) -> bytes:
        """Zeros, or the configured errno."""
        assert offset >= 0 and offset + length <= self.num_blocks * self.block_size
        if self.fail is not None:
            raise OSError(self.fail, "injected")
        return bytes(length)

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        """Recorded, or the configured errno."""
        assert offset >= 0 and offset + len(data) <= self.num_blocks * self.block_size
        if self.fail is not None:
            raise OSError(self.fail, "injected")
        self.writes.append((offset, bytes(data)))

    def flush(self) -> None:
        """Counted, or EIO when failing."""
        if self.fail is not None:
            raise OSError(errno.EIO, "injected")
        self.flushes += 1


def test_helpers_build_the_cdbs_they_say() -> None:
    assert rw_cdb(10, False, 0x01020304, 8).hex() == "28000102030400000800"
    assert rw_cdb(16, True, 1, 2, fua=True).hex() == "8a080000000000000001000000020000"
    assert rw_cdb(6, False, 0x10203, 256).hex() == "080102030000"
    assert inquiry(0x83, 0x24).hex() == "120183002400"
    assert report_luns().hex() == "a0000000000000001000" + "0000"
    assert read_capacity16().hex() == "9e100000000000000000000000200000"
