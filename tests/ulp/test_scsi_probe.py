"""What Linux's SCSI scan and sd driver see when they probe the target.

The CDBs are the ones Linux 6.1 sent to LIO in the SRP captures
(``srp_imm.pcap`` / ``srp_rdma.pcap``, see the captures' SUMMARY.md), in
their order, plus the VPD reads that ``scsi_attach_vpd`` makes for each
page our page 00h lists. Each step checks the decision Linux takes from
our answer, so that ``mkfs`` and ``mount`` work through ib_srp.
"""

from __future__ import annotations

import struct
from pathlib import Path

from softrdma.ulp.scsi import (
    VERSION_SRP,
    AdditionalSense,
    Direction,
    ScsiTarget,
    SenseKey,
)
from tests.ulp.test_scsi_support import A, assert_sense, good, make_image, run

MiB = 1 << 20


def probe(target: ScsiTarget, hex_cdb: str) -> bytes:
    """One command of the probe, as a 16-byte SRP CDB field."""
    cdb = bytes.fromhex(hex_cdb).ljust(16, b"\0")
    return good(run(target, cdb, lun=bytes(8), expected_length=None))


def vpd(target: ScsiTarget, page: int) -> bytes:
    """``scsi_get_vpd_buf``: the 4-byte header first, then the whole page."""
    header = probe(target, f"1201{page:02x}000400")
    assert header[1] == page
    length = struct.unpack_from(">H", header, 2)[0] + 4
    data = probe(target, f"1201{page:02x}{length:04x}00")
    assert len(data) == length
    return data


def test_linux_scan_and_sd_probe(tmp_path: Path) -> None:
    target = ScsiTarget(transport_version=VERSION_SRP)
    target.add_lun(0, make_image(tmp_path / "disk.img", 64 * MiB))

    # scsi_probe_lun: 36 bytes, then as many as the ADDITIONAL LENGTH says
    std = probe(target, "120000002400")
    assert std[0] == 0x00 and std[2] == 0x06 and std[3] & 0x0F == 0x02  # disk, SPC-4
    assert std[7] & 0x02  # CmdQue: tagged queueing
    full = probe(target, f"120000{std[4] + 5:04x}00")
    assert full[:36] == std and len(full) == 96

    # scsi_attach_vpd: page 00h, then every listed page Linux knows
    pages = vpd(target, 0x00)[4:]
    assert list(pages) == [0x00, 0x80, 0x83, 0xB0, 0xB1]
    serial = vpd(target, 0x80)[4:].decode()
    assert serial == target.luns[0].unit_serial
    ids = vpd(target, 0x83)
    assert ids[4:8] == bytes([0x01, 0x03, 0x00, 0x08])  # scsi_vpd_lun_id → "naa.3…"
    block_limits = vpd(target, 0xB0)
    max_xfer_blocks = struct.unpack_from(">I", block_limits, 8)[0]
    assert max_xfer_blocks * 512 == 8 * MiB  # sd caps its requests at 8 MiB
    characteristics = vpd(target, 0xB1)
    assert struct.unpack_from(">H", characteristics, 4)[0] == 1  # non-rotational

    # scsi_report_lun_scan on LUN 0
    luns = probe(target, "a0000000000000001000000000000000")
    assert luns[:16] == bytes([0, 0, 0, 8, 0, 0, 0, 0]) + bytes(8)

    # sd_revalidate_disk: spin-up, capacity (READ CAPACITY (16) first)
    probe(target, "00")
    rc16 = probe(target, "9e100000000000000000000000200000")
    last_lba, block = struct.unpack_from(">QI", rc16)
    assert (last_lba + 1) * block == 64 * MiB and block == 512
    assert rc16[12] & 0x01 == 0 and rc16[14] & 0x80 == 0  # no protection, no LBPME

    # sd_read_write_protect_flag: header of all pages
    header = probe(target, "1a003f000400")
    assert header[2] & 0x80 == 0  # not write-protected

    # sd_read_cache_type: header, then the caching page
    header = probe(target, "1a0008000400")
    caching = probe(target, f"1a000800{header[0] + 1:02x}00")
    assert len(caching) == header[0] + 1 == 32
    page = caching[4 + caching[3] :]
    assert page[0] & 0x3F == 0x08
    assert page[2] & 0x04 and not page[2] & 0x01  # WCE set, RCD clear
    assert caching[2] & 0x10  # DPOFUA: sd sends FUA writes and cache flushes

    # sd_read_write_same: REPORT SUPPORTED OPERATION CODES is not supported
    rsoc = bytes.fromhex("a30c011200000000000a0000").ljust(16, b"\0")
    assert_sense(
        run(target, rsoc), SenseKey.ILLEGAL_REQUEST, AdditionalSense.INVALID_COMMAND_OPERATION_CODE
    )

    # the partition scan, a FUA write and a cache flush
    assert probe(target, "28000000000000000800") == bytes(4096)
    plan = target.setup(A, 0, bytes.fromhex("2a080000080000000800").ljust(16, b"\0"))
    assert plan.direction is Direction.DATA_OUT and plan.transfer_length == 4096
    good(target.execute(plan, b"\x42" * 4096))
    probe(target, "35000000000000000000")
    assert probe(target, "28000000080000000800") == b"\x42" * 4096
