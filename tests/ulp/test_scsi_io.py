"""READ and WRITE against a plain-file reference, durability (FUA,
SYNCHRONIZE CACHE, write-through) observed through ``os.fsync``, the
residuals of a transport whose buffer does not match the CDB, and the
file backstore itself."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.ulp.scsi import (
    AdditionalSense,
    Direction,
    FileBackstore,
    Opcode,
    ScsiStatus,
    ScsiTarget,
    SenseKey,
)
from softrdma.ulp.scsi.sense import ScsiUsageError
from tests.ulp.test_scsi_support import (
    A,
    assert_sense,
    cdb10,
    cdb16,
    good,
    make_image,
    mode_sense6,
    run,
    rw_cdb,
)

MiB = 1 << 20
BLOCKS = 256  # the images of the randomized tests


class FsyncSpy:
    """Counts ``os.fsync`` calls (and still syncs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = os.fsync

        def spy(fd: int) -> None:
            self.calls += 1
            real(fd)

        monkeypatch.setattr(os, "fsync", spy)


@st.composite
def io_ops(draw: st.DrawFn) -> tuple[bool, int, int, int, bool, int]:
    """(write, CDB size, LBA, blocks, FUA, seed), LBAs and lengths reaching
    a little past the end of a BLOCKS-block image."""
    size = draw(st.sampled_from([6, 10, 12, 16]))
    write = draw(st.booleans())
    lba = draw(st.integers(0, BLOCKS + 2))
    blocks = draw(st.integers(1 if size == 6 else 0, BLOCKS // 4 if draw(st.booleans()) else 4))
    if draw(st.integers(0, 9)) == 0:
        lba = draw(st.integers(BLOCKS, (1 << 21) - 1 if size == 6 else (1 << 32) - 1))
    fua = size != 6 and draw(st.booleans())
    return write, size, lba, blocks, fua, draw(st.integers(0, 1 << 30))


@pytest.mark.parametrize("block_size", [512, 4096])
@settings(max_examples=60, deadline=None)
@given(ops=st.lists(io_ops(), min_size=1, max_size=12))
def test_reads_and_writes_match_a_plain_file(
    block_size: int, ops: list[tuple[bool, int, int, int, bool, int]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "disk.img"
        reference = Path(tmp) / "reference.img"
        size = BLOCKS * block_size
        target = ScsiTarget()
        target.add_lun(0, FileBackstore(image, block_size, size=size, create=True))
        fd = os.open(reference, os.O_RDWR | os.O_CREAT)
        try:
            os.ftruncate(fd, size)
            for write, cdb_size, lba, blocks, fua, seed in ops:
                cdb = rw_cdb(cdb_size, write, lba, blocks, fua=fua)
                nbytes = blocks * block_size
                data = random.Random(seed).randbytes(nbytes) if write else None
                result = run(target, cdb, data)
                if lba + blocks > BLOCKS or lba >= BLOCKS:
                    first_invalid = lba if lba >= BLOCKS else BLOCKS
                    assert_sense(
                        result,
                        SenseKey.ILLEGAL_REQUEST,
                        AdditionalSense.LBA_OUT_OF_RANGE,
                        information=first_invalid,
                    )
                elif write:
                    assert good(result) == b""
                    assert data is not None
                    os.pwrite(fd, data, lba * block_size)
                else:
                    assert good(result) == os.pread(fd, nbytes, lba * block_size)
            assert image.read_bytes() == reference.read_bytes()
        finally:
            os.close(fd)


def test_writes_are_in_the_file_when_execute_returns(tmp_path: Path) -> None:
    target = ScsiTarget()
    target.add_lun(0, make_image(tmp_path / "d.img", 1 * MiB, 4096))
    plan = target.setup(A, 0, rw_cdb(10, True, 3, 2))
    assert (plan.direction, plan.transfer_length) == (Direction.DATA_OUT, 8192)
    assert good(target.execute(plan, b"\xa5" * 8192)) == b""
    with open(tmp_path / "d.img", "rb") as f:  # another open file description
        f.seek(3 * 4096)
        assert f.read(8192) == b"\xa5" * 8192


def test_zero_length_transfers(tmp_path: Path) -> None:
    target = ScsiTarget()
    target.add_lun(0, make_image(tmp_path / "d.img", 1 * MiB))
    last = 1 * MiB // 512 - 1
    for write in (False, True):
        plan = target.setup(A, 0, rw_cdb(10, write, last, 0))
        assert plan.transfer_length == 0
        assert good(target.execute(plan, b"" if write else None)) == b""
    assert_sense(
        run(target, rw_cdb(10, False, last + 1, 0)),
        SenseKey.ILLEGAL_REQUEST,
        AdditionalSense.LBA_OUT_OF_RANGE,
        information=last + 1,
    )
    # READ(6) / WRITE(6): a TRANSFER LENGTH of 0 means 256 blocks
    plan = target.setup(A, 0, bytes([Opcode.READ_6, 0, 0, 0, 0, 0]))
    assert plan.transfer_length == 256 * 512


# --- durability --------------------------------------------------------------------------


def test_fua_and_synchronize_cache_call_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = ScsiTarget()
    target.add_lun(0, make_image(tmp_path / "d.img", 1 * MiB))
    spy = FsyncSpy(monkeypatch)
    good(run(target, rw_cdb(10, True, 0, 8)))
    good(run(target, rw_cdb(16, True, 8, 8)))
    good(run(target, rw_cdb(10, False, 0, 8, fua=True)))  # FUA on a read: no flush needed
    assert spy.calls == 0
    for size in (10, 12, 16):
        good(run(target, rw_cdb(size, True, 0, 1, fua=True)))
    assert spy.calls == 3
    good(run(target, cdb10(Opcode.SYNCHRONIZE_CACHE_10)))
    good(run(target, cdb16(Opcode.SYNCHRONIZE_CACHE_16, lba=8, length=8)))
    good(run(target, cdb10(Opcode.SYNCHRONIZE_CACHE_10, 0x02, 0, 0)))  # IMMED
    assert spy.calls == 6
    good(run(target, bytes([Opcode.START_STOP_UNIT, 0, 0, 0, 0x00, 0])))  # STOP: flush
    good(run(target, bytes([Opcode.START_STOP_UNIT, 0, 0, 0, 0x04, 0])))  # NO_FLUSH
    good(run(target, bytes([Opcode.START_STOP_UNIT, 0, 0, 0, 0x01, 0])))  # START
    assert spy.calls == 7


def test_synchronize_cache_checks_its_range(tmp_path: Path) -> None:
    target = ScsiTarget()
    target.add_lun(0, make_image(tmp_path / "d.img", 1 * MiB))
    blocks = 1 * MiB // 512
    good(run(target, cdb10(Opcode.SYNCHRONIZE_CACHE_10, lba=blocks - 1, length=0)))
    good(run(target, cdb10(Opcode.SYNCHRONIZE_CACHE_10, lba=0, length=blocks)))
    for lba, length, first in ((blocks, 0, blocks), (blocks - 1, 2, blocks)):
        assert_sense(
            run(target, cdb10(Opcode.SYNCHRONIZE_CACHE_10, lba=lba, length=length)),
            SenseKey.ILLEGAL_REQUEST,
            AdditionalSense.LBA_OUT_OF_RANGE,
            information=first,
        )


def test_write_through_backstore_flushes_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = ScsiTarget()
    target.add_lun(
        0, FileBackstore(tmp_path / "d.img", size=1 * MiB, create=True, write_cache=False)
    )
    spy = FsyncSpy(monkeypatch)
    good(run(target, rw_cdb(10, True, 0, 8)))
    assert spy.calls == 1
    good(run(target, rw_cdb(10, True, 0, 8, fua=True)))
    assert spy.calls == 2  # FUA adds nothing to a write-through cache
    assert good(run(target, mode_sense6(0x08, dbd=True)))[4 + 2] & 0x04 == 0


# --- residuals ---------------------------------------------------------------------------


def test_read_residuals_against_the_transport_buffer(tmp_path: Path) -> None:
    target = ScsiTarget()
    target.add_lun(0, make_image(tmp_path / "d.img", 1 * MiB))
    good(run(target, rw_cdb(10, True, 0, 8), bytes(range(256)) * 16))
    cdb = rw_cdb(10, False, 0, 8)
    exact = run(target, cdb, expected_length=4096)
    assert (exact.underflow, exact.overflow, len(exact.data_in)) == (0, 0, 4096)
    short = target.setup(A, 0, cdb, expected_length=1000)
    assert short.transfer_length == 1000
    over = target.execute(short)
    assert over.data_in == exact.data_in[:1000]
    assert (over.underflow, over.overflow) == (0, 3096)
    under = run(target, cdb, expected_length=6000)
    assert under.data_in == exact.data_in
    assert (under.underflow, under.overflow) == (1904, 0)
    none = run(target, bytes(6), expected_length=512)  # TEST UNIT READY with a buffer
    assert (none.status, none.underflow) == (ScsiStatus.GOOD, 512)


def test_write_length_mismatch_is_rejected_before_data_moves(tmp_path: Path) -> None:
    target = ScsiTarget()
    target.add_lun(0, make_image(tmp_path / "d.img", 1 * MiB))
    for expected in (0, 2048, 8192):
        plan = target.setup(A, 0, rw_cdb(10, True, 0, 8), expected_length=expected)
        assert_sense(plan, SenseKey.ILLEGAL_REQUEST, AdditionalSense.INVALID_FIELD_IN_COMMAND_IU)
        assert plan.result is not None and plan.result.underflow == expected
        assert target.execute(plan) is plan.result
    assert (tmp_path / "d.img").read_bytes() == bytes(1 * MiB)


# --- the backstore -----------------------------------------------------------------------


def test_file_backstore_geometry_and_options(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    with FileBackstore(path, 4096, size=1 * MiB, create=True) as store:
        assert (store.num_blocks, store.size, store.block_size) == (256, 1 * MiB, 4096)
        assert os.stat(path).st_blocks == 0  # sparse
        store.pwrite(4096, b"x" * 4096)
        assert store.pread(4096, 4) == b"xxxx"
    assert store.closed
    store.close()
    with pytest.raises(OSError):
        store.pread(0, 1)
    with FileBackstore(path, 512) as again:  # size from the file
        assert again.num_blocks == 2048 and again.identity == os.fsencode(os.path.realpath(path))
    with FileBackstore(path, 512, size=4096) as part:  # a prefix of a larger file
        assert part.num_blocks == 8
        with pytest.raises(ScsiUsageError):
            part.pread(4000, 200)
    with FileBackstore(path, read_only=True) as ro:
        assert ro.read_only
        with pytest.raises(OSError):
            ro.pwrite(0, b"x")
    (tmp_path / "odd.img").write_bytes(b"x" * 1000)
    assert FileBackstore(tmp_path / "odd.img").num_blocks == 1  # a partial block is ignored


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_size": 1024},
        {"size": 1000},
        {"size": 0},
        {"create": True, "read_only": True},
        {"size": 2 * MiB},  # longer than the file, create not set
    ],
)
def test_file_backstore_rejects_bad_configurations(
    tmp_path: Path, kwargs: dict[str, object]
) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(1 * MiB))
    with pytest.raises(ScsiUsageError):
        FileBackstore(path, **kwargs)  # type: ignore[arg-type]


def test_file_backstore_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileBackstore(tmp_path / "missing.img")
    (tmp_path / "empty.img").touch()
    with pytest.raises(ScsiUsageError):
        FileBackstore(tmp_path / "empty.img")


def test_file_backstore_extends_an_existing_short_file(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(b"keep" + bytes(508))
    with FileBackstore(path, size=1 * MiB, create=True) as store:
        assert store.num_blocks == 2048 and store.pread(0, 4) == b"keep"
    assert path.stat().st_size == 1 * MiB


def test_a_truncated_image_is_a_medium_error(tmp_path: Path) -> None:
    target = ScsiTarget()
    target.add_lun(0, make_image(tmp_path / "d.img", 1 * MiB))
    os.truncate(tmp_path / "d.img", 4096)  # someone else shrinks the file
    assert_sense(
        run(target, rw_cdb(10, False, 16, 1)),
        SenseKey.MEDIUM_ERROR,
        AdditionalSense.UNRECOVERED_READ_ERROR,
        information=16,
    )
