"""Parameter data byte by byte: INQUIRY (standard and VPD pages), READ
CAPACITY (10) / (16), REPORT LUNS, MODE SENSE (6) / (10), REQUEST SENSE,
and allocation-length truncation (SPC-4 4.2.5.6)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from softrdma.ulp.scsi import (
    VERSION_SRP,
    AdditionalSense,
    FieldPointer,
    FileBackstore,
    LogicalUnit,
    ScsiError,
    ScsiTarget,
    SenseData,
    SenseKey,
    decode_lun,
    encode_lun,
    lun_from_any,
)
from softrdma.ulp.scsi.sense import ScsiUsageError
from tests.ulp.test_scsi_support import (
    B,
    MemBackstore,
    assert_sense,
    cdb10,
    good,
    inquiry,
    invalid_field,
    make_image,
    mode_sense6,
    mode_sense10,
    read_capacity16,
    report_luns,
    request_sense,
    run,
)

MiB = 1 << 20


@pytest.fixture
def target(tmp_path: Path) -> ScsiTarget:
    t = ScsiTarget(transport_version=VERSION_SRP)
    t.add_lun(0, make_image(tmp_path / "disk.img"))
    return t


def serial(target: ScsiTarget, lun: int = 0) -> bytes:
    unit = target.lun(lun)
    assert unit is not None
    return unit.unit_serial.encode()


# --- INQUIRY -----------------------------------------------------------------------------


def test_standard_inquiry_byte_by_byte(target: ScsiTarget) -> None:
    data = good(run(target, inquiry(alloc=255)))
    expected = (
        bytes([0x00, 0x00, 0x06, 0x02, 91, 0x00, 0x00, 0x02])
        + b"SOFTRDMA"
        + b"FILEIO          "
        + b"0001"
        + bytes(20)
        + bytes(2)
        + struct.pack(">8H", 0x00A0, 0x0940, 0x0460, 0x04C0, 0, 0, 0, 0)
        + bytes(22)
    )
    assert data == expected
    assert len(data) == 96 == data[4] + 5


def test_standard_inquiry_truncated_to_the_allocation_length(target: ScsiTarget) -> None:
    full = good(run(target, inquiry(alloc=255)))
    for alloc in (0, 1, 5, 36, 95, 96):
        result = run(target, inquiry(alloc=alloc))
        assert good(result) == full[:alloc]
        assert result.underflow == alloc - min(alloc, 96)
    assert run(target, inquiry(alloc=255)).underflow == 255 - 96


def test_identity_and_version_descriptors_are_configurable(tmp_path: Path) -> None:
    t = ScsiTarget(vendor="ACME", product="Disk", revision="9")
    t.add_lun(0, make_image(tmp_path / "d.img", 1 * MiB))
    data = good(run(t, inquiry()))
    assert data[8:36] == b"ACME    Disk            9   "
    assert data[58:66] == struct.pack(">4H", 0x00A0, 0x0460, 0x04C0, 0)
    with pytest.raises(ScsiUsageError):
        ScsiTarget(vendor="TOO-LONG-")
    with pytest.raises(ScsiUsageError):
        ScsiTarget(product="é")
    with pytest.raises(ScsiUsageError):
        ScsiTarget(revision="")


def test_inquiry_on_a_lun_without_logical_unit(target: ScsiTarget) -> None:
    data = good(run(target, inquiry(), lun=7))
    assert data[0] == 0x7F  # peripheral qualifier 011b, device type 1Fh
    assert data[1:] == good(run(target, inquiry()))[1:]
    assert good(run(target, inquiry(0x00), lun=7)) == bytes([0x7F, 0x00, 0x00, 0x01, 0x00])
    invalid_field(run(target, inquiry(0x80), lun=7), 2)


def test_vpd_supported_pages(target: ScsiTarget) -> None:
    assert good(run(target, inquiry(0x00))) == bytes(
        [0x00, 0x00, 0x00, 0x05, 0x00, 0x80, 0x83, 0xB0, 0xB1]
    )


def test_vpd_unit_serial_number(target: ScsiTarget) -> None:
    sn = serial(target)
    assert len(sn) == 32 and int(sn, 16) >= 0
    assert good(run(target, inquiry(0x80))) == bytes([0x00, 0x80, 0x00, 32]) + sn


def test_vpd_device_identification(target: ScsiTarget) -> None:
    unit = target.lun(0)
    assert unit is not None
    sn = serial(target)
    data = good(run(target, inquiry(0x83)))
    naa = bytes([0x01, 0x03, 0x00, 0x08]) + unit.naa_id
    t10 = bytes([0x02, 0x01, 0x00, 8 + len(sn)]) + b"SOFTRDMA" + sn
    assert data == bytes([0x00, 0x83, 0x00, len(naa) + len(t10)]) + naa + t10
    assert unit.naa_id[0] >> 4 == 0x3  # NAA locally assigned


def test_vpd_block_limits_and_characteristics(target: ScsiTarget) -> None:
    b0 = good(run(target, inquiry(0xB0)))
    assert b0[:4] == bytes([0x00, 0xB0, 0x00, 0x3C]) and len(b0) == 64
    assert b0[4:8] == bytes([0, 0, 0, 1])  # WSNZ, COMPARE AND WRITE 0, granularity 1
    assert struct.unpack_from(">I", b0, 8)[0] == 8 * MiB // 512  # MAXIMUM TRANSFER LENGTH
    assert b0[12:] == bytes(52)  # no optimal length, prefetch, UNMAP, WRITE SAME
    b1 = good(run(target, inquiry(0xB1)))
    assert b1 == bytes([0x00, 0xB1, 0x00, 0x3C, 0x00, 0x01]) + bytes(58)


def test_identifiers_are_stable_and_distinct(tmp_path: Path) -> None:
    first = make_image(tmp_path / "a.img", 1 * MiB)
    again = FileBackstore(tmp_path / "a.img")
    other = make_image(tmp_path / "b.img", 1 * MiB)
    ua, ua2, ub = (LogicalUnit(0, b) for b in (first, again, other))
    assert (ua.unit_serial, ua.naa_id) == (ua2.unit_serial, ua2.naa_id)
    assert ua.unit_serial != ub.unit_serial and ua.naa_id != ub.naa_id
    named = LogicalUnit(1, first, unit_serial="SERIAL-1")
    assert named.unit_serial == "SERIAL-1"
    with pytest.raises(ScsiUsageError):
        LogicalUnit(1, first, unit_serial="bad\nserial")


@pytest.mark.parametrize("page", [0x01, 0x86, 0x89, 0xB2, 0xB9, 0xFF])
def test_unsupported_vpd_pages_are_invalid_fields(target: ScsiTarget, page: int) -> None:
    invalid_field(run(target, inquiry(page)), 2)


def test_inquiry_field_errors(target: ScsiTarget) -> None:
    invalid_field(run(target, bytes([0x12, 0x00, 0x80, 0x00, 0xFF, 0x00])), 2)  # page, EVPD 0
    invalid_field(run(target, bytes([0x12, 0x02, 0x00, 0x00, 0xFF, 0x00])), 1, 1)  # CMDDT


# --- READ CAPACITY -----------------------------------------------------------------------


def test_read_capacity_10_and_16(target: ScsiTarget) -> None:
    last = 64 * MiB // 512 - 1
    assert good(run(target, cdb10(0x25))) == struct.pack(">II", last, 512)
    rc16 = good(run(target, read_capacity16()))
    assert rc16 == struct.pack(">QI", last, 512) + bytes(20)
    assert good(run(target, read_capacity16(alloc=12))) == rc16[:12]
    assert good(run(target, read_capacity16(alloc=0))) == b""


@pytest.mark.parametrize(
    ("num_blocks", "rc10_lba"),
    [
        (0xFFFF_FFFF, 0xFFFF_FFFE),  # the last LBA that READ CAPACITY (10) can report
        (0x1_0000_0000, 0xFFFF_FFFF),  # 2 TiB of 512-byte blocks: last LBA FFFFFFFFh
        (0x1_0000_0001, 0xFFFF_FFFF),
        (1 << 40, 0xFFFF_FFFF),
    ],
)
def test_read_capacity_10_past_32_bits(num_blocks: int, rc10_lba: int) -> None:
    t = ScsiTarget()
    t.add_lun(0, MemBackstore(num_blocks))
    assert good(run(t, cdb10(0x25))) == struct.pack(">II", rc10_lba, 512)
    assert good(run(t, read_capacity16()))[:12] == struct.pack(">QI", num_blocks - 1, 512)


def test_read_capacity_of_a_sparse_file_over_2_tib(tmp_path: Path) -> None:
    size = (1 << 41) + 4096
    try:
        backstore = FileBackstore(tmp_path / "big.img", 4096, size=size, create=True)
    except OSError as exc:  # a file system without large sparse files
        pytest.skip(f"no {size}-byte sparse file here: {exc}")
    t = ScsiTarget()
    t.add_lun(0, backstore)
    last = size // 4096 - 1
    assert good(run(t, cdb10(0x25))) == struct.pack(">II", last, 4096)  # still fits in 4096s
    assert good(run(t, read_capacity16()))[:12] == struct.pack(">QI", last, 4096)


def test_read_capacity_pmi_rules(target: ScsiTarget) -> None:
    invalid_field(run(target, cdb10(0x25, lba=5)), 2)
    with_pmi = bytes([0x25, 0, 0, 0, 0, 5, 0, 0, 0x01, 0])
    assert len(good(run(target, with_pmi))) == 8
    invalid_field(run(target, struct.pack(">BBQIBB", 0x9E, 0x10, 5, 32, 0, 0)), 2)
    invalid_field(run(target, struct.pack(">BBQIBB", 0x9E, 0x11, 0, 32, 0, 0)), 1, 4)


# --- REPORT LUNS -------------------------------------------------------------------------


def test_report_luns_format(tmp_path: Path) -> None:
    t = ScsiTarget()
    for lun in (300, 0, 1):
        t.add_lun(lun, make_image(tmp_path / f"{lun}.img", 1 * MiB))
    data = good(run(t, report_luns(), nexus=B))
    assert data == (
        bytes([0, 0, 0, 24, 0, 0, 0, 0])
        + bytes([0x00, 0x00, 0, 0, 0, 0, 0, 0])
        + bytes([0x00, 0x01, 0, 0, 0, 0, 0, 0])
        + bytes([0x41, 0x2C, 0, 0, 0, 0, 0, 0])  # flat space addressing, LUN 300
    )
    assert good(run(t, report_luns(alloc=16), nexus=B)) == data[:16]
    assert good(run(t, report_luns(select=2), nexus=B)) == data
    assert good(run(t, report_luns(select=1), nexus=B)) == bytes(8)  # no well-known LUs
    invalid_field(run(t, report_luns(select=3), nexus=B), 2)
    assert good(run(t, report_luns(), nexus=B, lun=9)) == data  # any LUN may be asked


def test_report_luns_with_no_lun_reports_lun_0() -> None:
    assert good(run(ScsiTarget(), report_luns())) == bytes([0, 0, 0, 8]) + bytes(12)


def test_lun_encoding_round_trips() -> None:
    assert encode_lun(5) == bytes([0, 5, 0, 0, 0, 0, 0, 0])
    assert encode_lun(16383) == bytes([0x7F, 0xFF, 0, 0, 0, 0, 0, 0])
    for lun in (0, 1, 255, 256, 1000, 16383):
        wire = encode_lun(lun)
        assert decode_lun(wire) == lun_from_any(wire) == lun_from_any(lun) == lun
        linux = int.from_bytes(wire[:2], "big")  # scsilun_to_int of a single level
        assert lun_from_any(linux) == lun
    assert decode_lun(bytes([0x01, 0x00] + [0] * 6)) is None  # peripheral, bus 1
    assert decode_lun(bytes([0x00, 0x01, 0x00, 0x02] + [0] * 4)) is None  # two levels
    assert decode_lun(bytes([0xC0] + [0] * 7)) is None  # extended addressing
    assert lun_from_any(0x8000_0000_0000_0000) is None  # a LUN no target here has
    for bad in (-1, 1 << 64):
        with pytest.raises(ScsiUsageError):
            lun_from_any(bad)
    with pytest.raises(ScsiUsageError):
        encode_lun(16384)
    with pytest.raises(ScsiUsageError):
        decode_lun(b"\0" * 7)


# --- MODE SENSE --------------------------------------------------------------------------

CACHING_WCE = bytes([0x08, 0x12, 0x04]) + bytes(17)
CONTROL = bytes([0x0A, 0x0A]) + bytes(10)
BLOCK_DESC_64M = struct.pack(">II", 64 * MiB // 512, 512)


def test_mode_sense6_caching_page(target: ScsiTarget) -> None:
    data = good(run(target, mode_sense6(0x08)))
    assert data == bytes([3 + 8 + 20, 0x00, 0x10, 0x08]) + BLOCK_DESC_64M + CACHING_WCE
    assert good(run(target, mode_sense6(0x08, dbd=True))) == bytes([23, 0, 0x10, 0]) + CACHING_WCE


def test_mode_sense6_all_pages_and_header_only(target: ScsiTarget) -> None:
    data = good(run(target, mode_sense6(0x3F)))
    assert data == bytes([3 + 8 + 32, 0, 0x10, 8]) + BLOCK_DESC_64M + CACHING_WCE + CONTROL
    assert good(run(target, mode_sense6(0x3F, sub=0xFF))) == data
    assert good(run(target, mode_sense6(0x3F, alloc=4))) == data[:4]
    assert good(run(target, mode_sense6(0x0A, dbd=True))) == bytes([15, 0, 0x10, 0]) + CONTROL


def test_mode_sense_changeable_and_default_values(target: ScsiTarget) -> None:
    changeable = good(run(target, mode_sense6(0x08, pc=1, dbd=True)))
    assert changeable == bytes([23, 0, 0x10, 0, 0x08, 0x12]) + bytes(18)
    default = good(run(target, mode_sense6(0x08, pc=2)))
    assert default == good(run(target, mode_sense6(0x08)))
    assert_sense(
        run(target, mode_sense6(0x08, pc=3)),
        SenseKey.ILLEGAL_REQUEST,
        AdditionalSense.SAVING_PARAMETERS_NOT_SUPPORTED,
    )


def test_mode_sense10_short_and_long_block_descriptors(target: ScsiTarget) -> None:
    short = good(run(target, mode_sense10(0x08)))
    assert short == struct.pack(">HBBBxH", 6 + 8 + 20, 0, 0x10, 0, 8) + BLOCK_DESC_64M + CACHING_WCE
    long = good(run(target, mode_sense10(0x08, llbaa=True)))
    desc = struct.pack(">Q4xI", 64 * MiB // 512, 512)
    assert long == struct.pack(">HBBBxH", 6 + 16 + 20, 0, 0x10, 1, 16) + desc + CACHING_WCE
    assert good(run(target, mode_sense10(0x08, dbd=True, llbaa=True)))[:8] == struct.pack(
        ">HBBBxH", 26, 0, 0x10, 0, 0
    )


def test_mode_sense_write_protect_write_cache_and_big_disks(tmp_path: Path) -> None:
    make_image(tmp_path / "ro.img", 1 * MiB).close()
    t = ScsiTarget()
    t.add_lun(0, FileBackstore(tmp_path / "ro.img", read_only=True, write_cache=False))
    t.add_lun(1, MemBackstore(1 << 33))
    data = good(run(t, mode_sense6(0x08)))
    assert data[2] == 0x90  # WP | DPOFUA
    assert data[12 + 2] == 0x00  # WCE clear: write-through
    big = good(run(t, mode_sense6(0x08), lun=1))
    assert big[4:12] == struct.pack(">II", 0xFFFF_FFFF, 512)
    long = good(run(t, mode_sense10(0x08, llbaa=True), lun=1))
    assert struct.unpack_from(">Q", long, 8)[0] == 1 << 33


@pytest.mark.parametrize("page", [0x00, 0x01, 0x1C, 0x19])
def test_mode_sense_unsupported_pages(target: ScsiTarget, page: int) -> None:
    invalid_field(run(target, mode_sense6(page)), 2, 5)
    invalid_field(run(target, mode_sense10(page)), 2, 5)


def test_mode_sense_unsupported_subpage(target: ScsiTarget) -> None:
    invalid_field(run(target, mode_sense6(0x08, sub=0x01)), 3)
    invalid_field(run(target, mode_sense6(0x0A, sub=0x05)), 3)  # Linux's IO advice hints probe


# --- REQUEST SENSE -----------------------------------------------------------------------


def test_request_sense_without_pending_sense(target: ScsiTarget) -> None:
    data = good(run(target, request_sense()))
    assert data == bytes([0x70, 0, 0, 0, 0, 0, 0, 10]) + bytes(10)
    assert SenseData.decode(data).key is SenseKey.NO_SENSE
    assert good(run(target, request_sense(alloc=8))) == data[:8]
    assert good(run(target, request_sense(alloc=252))) == data
    invalid_field(run(target, request_sense(desc=True)), 1, 0)


def test_request_sense_on_a_lun_without_logical_unit(target: ScsiTarget) -> None:
    data = good(run(target, request_sense(), lun=3))
    sense = SenseData.decode(data)
    assert sense.key is SenseKey.ILLEGAL_REQUEST
    assert sense.additional_sense is AdditionalSense.LOGICAL_UNIT_NOT_SUPPORTED


# --- sense data encoding -----------------------------------------------------------------


def test_fixed_sense_layout() -> None:
    sense = SenseData.of(
        SenseKey.ILLEGAL_REQUEST,
        AdditionalSense.INVALID_FIELD_IN_CDB,
        information=0x01020304,
        field_pointer=FieldPointer(7, None),
    )
    raw = sense.encode()
    assert raw == bytes(
        [0xF0, 0, 0x05, 1, 2, 3, 4, 10, 0, 0, 0, 0, 0x24, 0x00, 0, 0xC0, 0x00, 0x07]
    )
    assert SenseData.decode(raw) == sense
    with_bit = SenseData.of(
        SenseKey.ILLEGAL_REQUEST,
        AdditionalSense.INVALID_FIELD_IN_CDB,
        field_pointer=FieldPointer(1, 7),
    ).encode()
    assert with_bit[0] == 0x70 and with_bit[15:18] == bytes([0xCF, 0x00, 0x01])
    too_big = SenseData.of(
        SenseKey.ILLEGAL_REQUEST, AdditionalSense.LBA_OUT_OF_RANGE, information=1 << 40
    ).encode()
    assert too_big[0] == 0x70 and too_big[3:7] == bytes(4)  # VALID clear
    assert SenseData.decode(too_big).information is None


def test_sense_decode_rejects_malformed_sense() -> None:
    good_sense = SenseData.of(SenseKey.UNIT_ATTENTION, AdditionalSense.WRITE_ERROR).encode()
    for bad in (
        good_sense[:17],  # short
        bytes([0x72]) + good_sense[1:],  # descriptor format
        good_sense[:7] + bytes([9]) + good_sense[8:],  # ADDITIONAL SENSE LENGTH too small
        good_sense[:2] + bytes([0x0F]) + good_sense[3:],  # reserved sense key
    ):
        with pytest.raises(ScsiError):
            SenseData.decode(bad)
    deferred = SenseData(SenseKey.MEDIUM_ERROR, 0x11, 0, deferred=True)
    assert deferred.encode()[0] == 0x71 and SenseData.decode(deferred.encode()) == deferred
    assert SenseData(SenseKey.NO_SENSE, 0x99, 0x99).additional_sense is None
