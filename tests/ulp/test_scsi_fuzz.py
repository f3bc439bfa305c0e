"""Hostile CDBs: whatever the bytes, the core answers GOOD or CHECK
CONDITION with well-formed fixed sense, never raises, never moves more
than it planned, and never changes the image unless a valid WRITE was
sent — and then exactly the blocks that WRITE names."""

from __future__ import annotations

import random
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.ulp.scsi import (
    Direction,
    FileBackstore,
    Opcode,
    ScsiResult,
    ScsiStatus,
    ScsiTarget,
    SenseData,
    SenseKey,
)
from tests.ulp.test_scsi_support import A, B, rw_cdb

BLOCKS = 256
BS = 512


def write_extent(cdb: bytes) -> tuple[int, int]:
    """(LBA, blocks) of a WRITE CDB, decoded independently of the core."""
    op = cdb[0]
    if op == Opcode.WRITE_6:
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256
    if op == Opcode.WRITE_10:
        return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
    if op == Opcode.WRITE_12:
        return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[6:10], "big")
    assert op == Opcode.WRITE_16, hex(op)
    return int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")


KNOWN = sorted(int(op) for op in Opcode)


@st.composite
def hostile_cdbs(draw: st.DrawFn) -> bytes:
    """Random 6/10/12/16-byte CDBs: raw bytes, known opcodes with random
    fields, and valid READ / WRITEs with one byte mutated."""
    kind = draw(st.integers(0, 2))
    size = draw(st.sampled_from([6, 10, 12, 16]))
    if kind == 2:
        cdb = bytearray(
            rw_cdb(
                size,
                draw(st.booleans()),
                draw(st.integers(0, BLOCKS + 8)),
                draw(st.integers(1, 16)),
                fua=size != 6 and draw(st.booleans()),
            )
        )
        if draw(st.booleans()):
            cdb[draw(st.integers(0, size - 1))] = draw(st.integers(0, 255))
        return bytes(cdb)
    cdb = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if kind == 1:
        cdb[0] = draw(st.sampled_from(KNOWN))
        if draw(st.booleans()):
            cdb[-1] = 0  # a clean CONTROL byte gets further
    return bytes(cdb)


def check_well_formed(result: ScsiResult, planned: int) -> None:
    assert result.status in (ScsiStatus.GOOD, ScsiStatus.CHECK_CONDITION)
    assert result.underflow >= 0 and result.overflow >= 0
    assert not (result.underflow and result.overflow)
    assert not result.aborted
    if result.status is ScsiStatus.GOOD:
        assert result.sense == b""
        assert len(result.data_in) <= planned
        return
    assert result.data_in == b""
    assert len(result.sense) == 18 and result.sense[0] & 0x7F == 0x70 and result.sense[7] == 10
    sense = SenseData.decode(result.sense)
    assert sense.key in (
        SenseKey.ILLEGAL_REQUEST,
        SenseKey.DATA_PROTECT,
        SenseKey.ABORTED_COMMAND,
        SenseKey.UNIT_ATTENTION,
    )
    assert (sense.asc, sense.ascq) != (0, 0)
    if sense.field_pointer is not None:
        assert sense.field_pointer.cdb and sense.field_pointer.byte < 16


def test_hostile_cdbs(tmp_path: Path) -> None:
    image = tmp_path / "fuzz.img"
    initial = random.Random(1).randbytes(BLOCKS * BS)
    image.write_bytes(initial)
    target = ScsiTarget(max_transfer_bytes=64 * 1024)
    target.add_lun(0, FileBackstore(image, BS))
    (tmp_path / "ro.img").write_bytes(initial)
    target.add_lun(1, FileBackstore(tmp_path / "ro.img", BS, read_only=True))
    reference = bytearray(initial)
    seen: dict[str, int] = {"write": 0, "good": 0, "check": 0}

    @settings(max_examples=600, deadline=None)
    @given(
        cdb=hostile_cdbs(),
        lun=st.one_of(st.sampled_from([0, 0, 0, 1, 2]), st.binary(min_size=8, max_size=8)),
        expected=st.one_of(st.none(), st.integers(0, 1 << 20), st.just(BS)),
        nexus=st.sampled_from([A, B]),
        seed=st.integers(0, 1 << 30),
    )
    def one(cdb: bytes, lun: int | bytes, expected: int | None, nexus: object, seed: int) -> None:
        assert nexus in (A, B)
        plan = target.setup(A if nexus == A else B, lun, cdb, expected_length=expected)
        assert plan.transfer_length <= 1 << 20
        data = None
        if plan.direction is Direction.DATA_OUT:
            assert cdb[0] in (Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16)
            data = random.Random(seed).randbytes(plan.transfer_length)
        result = target.execute(plan, data)
        check_well_formed(result, plan.transfer_length)
        seen["good" if result.status is ScsiStatus.GOOD else "check"] += 1
        if result.status is ScsiStatus.GOOD and data is not None:
            seen["write"] += 1
            assert plan.lun == 0
            lba, blocks = write_extent(cdb)
            assert len(data) == blocks * BS and (lba + blocks) <= BLOCKS
            reference[lba * BS : (lba + blocks) * BS] = data
        assert image.read_bytes() == reference
        assert target.outstanding(A) == target.outstanding(B) == ()

    one()
    assert (tmp_path / "ro.img").read_bytes() == initial
    assert min(seen.values()) > 0, seen  # the fuzz reached valid WRITEs and errors


@settings(max_examples=300, deadline=None)
@given(cdb=st.binary(min_size=1, max_size=260), lun=st.binary(min_size=8, max_size=8))
def test_any_cdb_length_is_answered(cdb: bytes, lun: bytes) -> None:
    target = ScsiTarget()
    from tests.ulp.test_scsi_support import MemBackstore

    store = MemBackstore(BLOCKS)
    target.add_lun(0, store)
    for which in (0, lun):
        plan = target.setup(A, which, cdb, expected_length=4096)
        payload = bytes(plan.data_out_length) if plan.direction is Direction.DATA_OUT else None
        check_well_formed(target.execute(plan, payload), plan.transfer_length)


def test_write_extent_decoder() -> None:
    assert write_extent(rw_cdb(16, True, 5, 7)) == (5, 7)
    assert write_extent(struct.pack(">BBHBB", 0x0A, 0x01, 2, 0, 0)) == (0x10002, 256)
