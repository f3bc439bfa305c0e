"""Every error path ends in the right CHECK CONDITION (or the right typed
error for a caller bug), decided at setup — before any data moves —
whenever the CDB alone decides it."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest

from softrdma.ulp.scsi import (
    AdditionalSense,
    CommandState,
    Direction,
    FileBackstore,
    Opcode,
    ScsiStatus,
    ScsiTarget,
    ScsiUsageError,
    SenseKey,
)
from tests.ulp.test_scsi_support import (
    TUR,
    A,
    MemBackstore,
    assert_sense,
    cdb10,
    cdb16,
    good,
    inquiry,
    invalid_field,
    make_image,
    read_capacity16,
    report_luns,
    run,
    rw_cdb,
)

MiB = 1 << 20
BLOCKS = 1 * MiB // 512


@pytest.fixture
def target(tmp_path: Path) -> ScsiTarget:
    t = ScsiTarget()
    t.add_lun(0, make_image(tmp_path / "disk.img", 1 * MiB))
    return t


def lba_out_of_range(result: object, first_invalid: int | None) -> None:
    assert_sense(
        result,  # type: ignore[arg-type]
        SenseKey.ILLEGAL_REQUEST,
        AdditionalSense.LBA_OUT_OF_RANGE,
        information=first_invalid,
    )


@pytest.mark.parametrize("size", [6, 10, 12, 16])
@pytest.mark.parametrize("write", [False, True])
def test_bad_lba_and_transfer_past_the_end(target: ScsiTarget, size: int, write: bool) -> None:
    plan = target.setup(A, 0, rw_cdb(size, write, BLOCKS, 1))
    lba_out_of_range(plan, BLOCKS)  # at setup: no data is fetched for a WRITE
    lba_out_of_range(target.setup(A, 0, rw_cdb(size, write, BLOCKS - 1, 2)), BLOCKS)
    lba_out_of_range(target.setup(A, 0, rw_cdb(size, write, BLOCKS + 100, 1)), BLOCKS + 100)
    assert plan.result is not None and target.execute(plan) is plan.result


def test_lba_beyond_32_bits_has_no_information(target: ScsiTarget) -> None:
    lba_out_of_range(run(target, rw_cdb(16, False, 1 << 40, 1)), None)
    lba_out_of_range(run(target, rw_cdb(16, False, (1 << 64) - 1, 2)), None)  # no wrap-around
    lba_out_of_range(run(target, rw_cdb(12, False, 0xFFFF_FFFF, 0xFFFF_FFFF)), 0xFFFF_FFFF)


@pytest.mark.parametrize(
    "opcode",
    [0x01, 0x04, 0x15, 0x16, 0x1D, 0x1E, 0x3B, 0x41, 0x42, 0x4D, 0x55, 0x7F, 0x83, 0x89, 0x93,
     0xA3, 0xC0, 0xFF],
)  # fmt: skip
def test_unsupported_opcodes(target: ScsiTarget, opcode: int) -> None:
    plan = target.setup(A, 0, bytes([opcode]) + bytes(15))
    assert_sense(plan, SenseKey.ILLEGAL_REQUEST, AdditionalSense.INVALID_COMMAND_OPERATION_CODE)
    assert plan.name == f"opcode {opcode:#04x}"


def test_report_supported_operation_codes_as_linux_sends_it(target: ScsiTarget) -> None:
    """sd's probe of REPORT SUPPORTED OPERATION CODES (one command, INQUIRY)."""
    cdb = bytes.fromhex("a30c011200000000000a0000")
    assert_sense(
        run(target, cdb), SenseKey.ILLEGAL_REQUEST, AdditionalSense.INVALID_COMMAND_OPERATION_CODE
    )


def test_invalid_fields_point_at_the_field(target: ScsiTarget) -> None:
    for size, byte in ((10, 1), (12, 1), (16, 1)):
        for write in (False, True):
            cdb = bytearray(rw_cdb(size, write, 0, 1))
            cdb[1] |= 0x20  # RDPROTECT / WRPROTECT 001b: no protection information here
            invalid_field(target.setup(A, 0, bytes(cdb)), byte, 7)
    invalid_field(run(target, cdb10(Opcode.VERIFY_10, 0x02, 0, 1)), 1, 2)  # BYTCHK
    invalid_field(run(target, cdb10(Opcode.VERIFY_10, 0x40, 0, 1)), 1, 7)  # VRPROTECT
    invalid_field(run(target, bytes([Opcode.START_STOP_UNIT, 0, 0, 0, 0x10, 0])), 4, 7)
    invalid_field(run(target, bytes([Opcode.START_STOP_UNIT, 0, 0, 0, 0x02, 0])), 4, 1)
    invalid_field(run(target, bytes([Opcode.START_STOP_UNIT, 0, 0, 1, 0x01, 0])), 3, 3)
    invalid_field(run(target, report_luns(select=0x10)), 2)


@pytest.mark.parametrize(
    ("cdb", "byte"),
    [(TUR, 5), (rw_cdb(10, False, 0, 1), 9), (read_capacity16(), 15), (inquiry(), 5)],
)
def test_naca_and_link_are_invalid(target: ScsiTarget, cdb: bytes, byte: int) -> None:
    naca = bytearray(cdb)
    naca[byte] |= 0x04
    invalid_field(run(target, bytes(naca)), byte, 2)
    link = bytearray(cdb)
    link[byte] |= 0x01
    invalid_field(run(target, bytes(link)), byte, 0)


def test_a_cdb_shorter_than_its_opcode(target: ScsiTarget) -> None:
    invalid_field(run(target, rw_cdb(10, False, 0, 1)[:6]), 0)
    invalid_field(run(target, bytes([Opcode.READ_16]) + bytes(9)), 0)
    # extra bytes (a 16-byte SRP CDB field) are ignored
    assert len(good(run(target, rw_cdb(10, False, 0, 1) + b"\xff" * 6))) == 512


def test_transfer_cap(tmp_path: Path) -> None:
    t = ScsiTarget(max_transfer_bytes=64 * 1024)
    t.add_lun(0, make_image(tmp_path / "d.img", 1 * MiB))
    assert len(good(run(t, rw_cdb(10, False, 0, 128)))) == 64 * 1024
    for size, byte in ((10, 7), (12, 6), (16, 10)):
        invalid_field(t.setup(A, 0, rw_cdb(size, True, 0, 129)), byte)
    invalid_field(t.setup(A, 0, rw_cdb(6, False, 0, 256)), 4)
    # the default: 8 MiB, also the ceiling of what one command can make the core hold
    big = ScsiTarget()
    big.add_lun(0, MemBackstore(1 << 40))
    assert big.setup(A, 0, rw_cdb(16, False, 0, 16384)).transfer_length == 8 * MiB
    invalid_field(big.setup(A, 0, rw_cdb(16, False, 0, 16385)), 10)
    invalid_field(big.setup(A, 0, rw_cdb(16, True, 0, 0xFFFF_FFFF)), 10)
    with pytest.raises(ScsiUsageError):
        ScsiTarget(max_transfer_bytes=1000)


def test_missing_lun(target: ScsiTarget) -> None:
    for cdb in (
        TUR,
        rw_cdb(10, False, 0, 1),
        rw_cdb(10, True, 0, 1),
        read_capacity16(),
        bytes([0x42]) + bytes(9),
    ):
        for lun in (1, 255, 16383, bytes([0x01, 0x00] + [0] * 6), bytes([0xC1] + [0] * 7)):
            plan = target.setup(A, lun, cdb)
            assert_sense(plan, SenseKey.ILLEGAL_REQUEST, AdditionalSense.LOGICAL_UNIT_NOT_SUPPORTED)
    assert good(run(target, inquiry(), lun=5))[0] == 0x7F
    assert good(run(target, report_luns(), lun=5))[:4] == bytes([0, 0, 0, 8])


def test_read_only_lun(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"\x5a" * MiB)
    t = ScsiTarget()
    t.add_lun(0, FileBackstore(path, read_only=True))
    for size in (6, 10, 12, 16):
        plan = t.setup(A, 0, rw_cdb(size, True, 0, 1))
        assert_sense(plan, SenseKey.DATA_PROTECT, AdditionalSense.WRITE_PROTECTED)
    assert good(run(t, rw_cdb(10, False, 0, 1))) == b"\x5a" * 512
    good(run(t, cdb10(Opcode.SYNCHRONIZE_CACHE_10)))
    assert path.read_bytes() == b"\x5a" * MiB


@pytest.mark.parametrize(
    ("errno_", "key", "code"),
    [
        (errno.EIO, SenseKey.MEDIUM_ERROR, AdditionalSense.WRITE_ERROR),
        (
            errno.ENOSPC,
            SenseKey.DATA_PROTECT,
            AdditionalSense.SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
        ),
        (errno.EROFS, SenseKey.DATA_PROTECT, AdditionalSense.WRITE_PROTECTED),
    ],
)
def test_backstore_write_errors(errno_: int, key: SenseKey, code: AdditionalSense) -> None:
    t = ScsiTarget()
    t.add_lun(0, MemBackstore(1000, fail=errno_))
    result = run(t, rw_cdb(10, True, 7, 2), expected_length=1024)
    info = 7 if key is SenseKey.MEDIUM_ERROR else None
    assert_sense(result, key, code, information=info)
    assert result.underflow == 0  # the data-out did move


def test_backstore_read_and_flush_errors() -> None:
    t = ScsiTarget()
    t.add_lun(0, MemBackstore(1000, fail=errno.EIO))
    result = run(t, rw_cdb(16, False, 9, 1))
    assert_sense(
        result, SenseKey.MEDIUM_ERROR, AdditionalSense.UNRECOVERED_READ_ERROR, information=9
    )
    assert result.underflow == 512
    assert_sense(
        run(t, cdb16(Opcode.SYNCHRONIZE_CACHE_16)),
        SenseKey.MEDIUM_ERROR,
        AdditionalSense.WRITE_ERROR,
    )


def test_overlapped_tag_and_task_set_full(tmp_path: Path) -> None:
    t = ScsiTarget(max_tasks_per_nexus=2)
    t.add_lun(0, make_image(tmp_path / "d.img", 1 * MiB))
    first = t.setup(A, 0, TUR, tag=7)
    assert_sense(
        t.setup(A, 0, TUR, tag=7),
        SenseKey.ABORTED_COMMAND,
        AdditionalSense.OVERLAPPED_COMMANDS_ATTEMPTED,
    )
    t.setup(A, 0, TUR)  # untagged
    full = t.setup(A, 0, TUR, tag=8)
    assert full.result is not None and full.result.status is ScsiStatus.TASK_SET_FULL
    assert full.result.sense == b""
    good(t.execute(first))
    assert t.setup(A, 0, TUR, tag=7).state is CommandState.PENDING  # tag free again


def test_caller_bugs_are_typed_errors(target: ScsiTarget, tmp_path: Path) -> None:
    write = target.setup(A, 0, rw_cdb(10, True, 0, 2))
    with pytest.raises(ScsiUsageError):
        target.execute(write)  # no data-out
    with pytest.raises(ScsiUsageError):
        target.execute(write, bytes(1000))  # wrong length
    assert write.state is CommandState.PENDING  # still usable
    good(target.execute(write, bytes(1024)))
    with pytest.raises(ScsiUsageError):
        target.execute(write, bytes(1024))  # twice
    read = target.setup(A, 0, rw_cdb(10, False, 0, 1))
    with pytest.raises(ScsiUsageError):
        target.execute(read, b"data")
    other = ScsiTarget()
    with pytest.raises(ScsiUsageError):
        other.execute(read)
    for bad_cdb in (b"", bytes(261)):
        with pytest.raises(ScsiUsageError):
            target.setup(A, 0, bad_cdb)
    with pytest.raises(ScsiUsageError):
        target.setup(A, 0, TUR, tag=-1)
    with pytest.raises(ScsiUsageError):
        target.setup(A, 0, TUR, expected_length=-1)
    with pytest.raises(ScsiUsageError):
        target.setup(A, -1, TUR)
    with pytest.raises(ScsiUsageError):
        target.setup("initiator", 0, TUR)  # type: ignore[arg-type]
    with pytest.raises(ScsiUsageError):
        target.add_lun(0, make_image(tmp_path / "again.img", 1 * MiB))
    with pytest.raises(ScsiUsageError):
        target.add_lun(16384, make_image(tmp_path / "big-lun.img", 1 * MiB))
    with pytest.raises(ScsiUsageError):
        target.remove_lun(9)


def test_release_drops_a_plan(target: ScsiTarget) -> None:
    plan = target.setup(A, 0, rw_cdb(10, True, 0, 1), tag=1)
    assert target.outstanding(A) == (plan,)
    target.release(plan)
    assert plan.state is CommandState.RELEASED and target.outstanding(A) == ()
    with pytest.raises(ScsiUsageError):
        target.execute(plan, bytes(512))
    target.release(plan)  # idempotent


def test_setup_reports_the_plan(target: ScsiTarget) -> None:
    plan = target.setup(
        A, struct.pack(">Q", 0), rw_cdb(10, False, 2, 3), tag=99, expected_length=1536
    )
    assert (plan.name, plan.direction, plan.cdb_length, plan.transfer_length) == (
        "READ(10)",
        Direction.DATA_IN,
        1536,
        1536,
    )
    assert (plan.lun, plan.tag, plan.data_out_length) == (0, 99, 0)
    assert "READ(10)" in repr(plan)
