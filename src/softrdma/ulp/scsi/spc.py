"""Primary commands: INQUIRY and its VPD pages, MODE SENSE, REPORT LUNS,
REQUEST SENSE, TEST UNIT READY (SPC-4).

Kernel counterpart: LIO's ``drivers/target/target_core_spc.c``
(``spc_parse_cdb``, ``spc_emulate_inquiry_std``, the ``evpd_handlers``,
``spc_emulate_modesense``, ``spc_emulate_report_luns``,
``spc_emulate_request_sense``). Each builder returns the whole parameter
data; the core cuts it to the ALLOCATION LENGTH (SPC-4 "allocation length"), so an
allocation length of zero transfers nothing and is not an error.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from softrdma.ulp.scsi.cdb import Direction, Opcode, Parsed, Runner, u16, u32
from softrdma.ulp.scsi.lu import LogicalUnit
from softrdma.ulp.scsi.lun import encode_lun
from softrdma.ulp.scsi.sense import (
    AdditionalSense,
    CheckCondition,
    SenseData,
    SenseKey,
    illegal_request,
)

__all__ = [
    "SPC_PARSERS",
    "VERSION_ISCSI",
    "VERSION_SAM5",
    "VERSION_SBC3",
    "VERSION_SPC4",
    "VERSION_SRP",
    "SpcRequest",
    "TargetIdentity",
    "mode_sense_data",
    "report_luns_data",
    "standard_inquiry",
    "vpd_page",
]

# Version descriptors (SPC-4 table 34, "no version claimed" forms): the
# values LIO puts in its standard INQUIRY data.
VERSION_SAM5 = 0x00A0
VERSION_SRP = 0x0940
VERSION_ISCSI = 0x0960
VERSION_SPC4 = 0x0460
VERSION_SBC3 = 0x04C0

_PDT_DISK = 0x00  # peripheral qualifier 000b, direct-access block device
_PDT_NO_LU = 0x7F  # peripheral qualifier 011b, device type 1Fh (SPC-4, standard INQUIRY data)
_SPC4 = 0x06  # VERSION field: SPC-4
_RESPONSE_FORMAT = 0x02  # RESPONSE DATA FORMAT 2
_CMDQUE = 0x02  # byte 7: command queuing supported

# bytes 0..7, vendor, product, revision, 20 vendor-specific, byte 56, 57
# reserved, eight version descriptors, 22 reserved: 96 bytes.
_STD_INQUIRY = struct.Struct(">8B8s16s4s20sBx16s22s")
_VERSION_DESCRIPTORS = struct.Struct(">8H")
_VPD_HEADER = struct.Struct(">BBH")
_DESIGNATOR_HEADER = struct.Struct(">BBxB")
# Block Limits: WSNZ, MAXIMUM COMPARE AND WRITE LENGTH, OPTIMAL TRANSFER
# LENGTH GRANULARITY, MAXIMUM / OPTIMAL TRANSFER LENGTH, MAXIMUM PREFETCH
# LENGTH, the four UNMAP fields, MAXIMUM WRITE SAME LENGTH, 20 reserved.
_VPD_B0 = struct.Struct(">BBHIIIIIIIQ20x")
# Block Device Characteristics: MEDIUM ROTATION RATE, PRODUCT TYPE,
# WABEREQ/WACEREQ/NOMINAL FORM FACTOR, ZONED/FUAB/VBULS, reserved.
_VPD_B1 = struct.Struct(">HBBB55x")
_NON_ROTATING = 0x0001

_MODE_HEADER_6 = struct.Struct(">BBBB")
_MODE_HEADER_10 = struct.Struct(">HBBBxH")
_SHORT_BLOCK_DESC = struct.Struct(
    ">II"
)  # NUMBER OF LOGICAL BLOCKS, reserved + LOGICAL BLOCK LENGTH
_LONG_BLOCK_DESC = struct.Struct(">Q4xI")
_CACHING_PAGE = struct.Struct(">BBB17x")
_CONTROL_PAGE = struct.Struct(">BB10x")
_WP = 0x80  # device-specific parameter: write protected
_DPOFUA = 0x10  # device-specific parameter: DPO and FUA supported
_WCE = 0x04  # caching page byte 2
_LONGLBA = 0x01
_U32_MAX = 0xFFFF_FFFF

_REPORT_LUNS_HEADER = struct.Struct(">I4x")


@dataclass(frozen=True)
class TargetIdentity:
    """What a target says about itself in INQUIRY data (LIO's ``t10_wwn``
    vendor / model / revision, padded to 8 / 16 / 4 ASCII characters), the
    version descriptors it claims, and its per-command transfer cap
    (reported as the MAXIMUM TRANSFER LENGTH of the Block Limits page)."""

    vendor: str
    product: str
    revision: str
    version_descriptors: tuple[int, ...]
    max_transfer_bytes: int


@dataclass(frozen=True)
class SpcRequest:
    """What an SPC command may look at: the addressed logical unit (None
    for a LUN that does not exist), the target's identity, and callbacks
    into the core bound to the command's I_T nexus."""

    lu: LogicalUnit | None
    identity: TargetIdentity
    lun_numbers: Callable[[], Sequence[int]]
    take_unit_attention: Callable[[], AdditionalSense | None]
    luns_reported: Callable[[], None]


def _pdt(lu: LogicalUnit | None) -> int:
    return _PDT_DISK if lu is not None else _PDT_NO_LU


def _ascii(text: str, width: int) -> bytes:
    return text.encode("ascii").ljust(width, b" ")


# --- INQUIRY -----------------------------------------------------------------------------


def standard_inquiry(identity: TargetIdentity, lu: LogicalUnit | None) -> bytes:
    """Standard INQUIRY data, 96 bytes (SPC-4; ``spc_emulate_inquiry_std``):
    SPC-4, response data format 2, ADDITIONAL LENGTH 91, CMDQUE, vendor /
    product / revision, and the version descriptors. A LUN with no logical
    unit gets peripheral qualifier 011b, device type 1Fh."""
    versions = (*identity.version_descriptors, 0, 0, 0, 0, 0, 0, 0, 0)[:8]
    return _STD_INQUIRY.pack(
        _pdt(lu),
        0,  # RMB: not removable
        _SPC4,
        _RESPONSE_FORMAT,
        _STD_INQUIRY.size - 5,
        0,  # SCCS, ACC, TPGS, 3PC, PROTECT: none
        0,  # ENCSERV, MULTIP, ...
        _CMDQUE,
        _ascii(identity.vendor, 8),
        _ascii(identity.product, 16),
        _ascii(identity.revision, 4),
        b"",
        0,
        _VERSION_DESCRIPTORS.pack(*versions),
        b"",
    )


def _vpd(page: int, lu: LogicalUnit | None, body: bytes) -> bytes:
    return _VPD_HEADER.pack(_pdt(lu), page, len(body)) + body


def _supported_pages(lu: LogicalUnit | None) -> tuple[int, ...]:
    return tuple(sorted(_VPD_BUILDERS)) if lu is not None else (0x00,)


def _vpd_00(identity: TargetIdentity, lu: LogicalUnit | None) -> bytes:
    """Supported VPD Pages (SPC-4): the page codes in ascending order."""
    return bytes(_supported_pages(lu))


def _vpd_80(identity: TargetIdentity, lu: LogicalUnit) -> bytes:
    """Unit Serial Number (SPC-4; ``spc_emulate_evpd_80``)."""
    return lu.unit_serial.encode("ascii")


def _designator(code_set: int, kind: int, value: bytes) -> bytes:
    # PROTOCOL IDENTIFIER 0 / CODE SET, PIV 0 / ASSOCIATION 00b (the logical
    # unit) / DESIGNATOR TYPE, reserved, DESIGNATOR LENGTH.
    return _DESIGNATOR_HEADER.pack(code_set, kind, len(value)) + value


def _vpd_83(identity: TargetIdentity, lu: LogicalUnit) -> bytes:
    """Device Identification (SPC-4; ``spc_emulate_evpd_83``): an NAA
    locally assigned designator (binary, type 3h) and a T10 vendor ID
    designator (ASCII, type 1h: vendor + unit serial), both for the
    logical unit."""
    return _designator(0x1, 0x3, lu.naa_id) + _designator(
        0x2, 0x1, _ascii(identity.vendor, 8) + lu.unit_serial.encode("ascii")
    )


def _vpd_b0(identity: TargetIdentity, lu: LogicalUnit) -> bytes:
    """Block Limits (SBC-3; ``spc_emulate_evpd_b0``): the maximum
    transfer length is the core's per-command cap; no UNMAP, no WRITE SAME,
    no COMPARE AND WRITE."""
    return _VPD_B0.pack(
        0,
        0,
        1,  # OPTIMAL TRANSFER LENGTH GRANULARITY: one block
        identity.max_transfer_bytes // lu.block_size,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    )


def _vpd_b1(identity: TargetIdentity, lu: LogicalUnit) -> bytes:
    """Block Device Characteristics (SBC-3): a non-rotating medium,
    so Linux marks the disk non-rotational."""
    return _VPD_B1.pack(_NON_ROTATING, 0, 0, 0)


_VPD_BUILDERS: dict[int, Callable[[TargetIdentity, LogicalUnit], bytes]] = {
    0x00: _vpd_00,
    0x80: _vpd_80,
    0x83: _vpd_83,
    0xB0: _vpd_b0,
    0xB1: _vpd_b1,
}


def vpd_page(page: int, identity: TargetIdentity, lu: LogicalUnit | None) -> bytes | None:
    """VPD page ``page`` with its 4-byte header, or None when it is not
    supported (the caller answers INVALID FIELD IN CDB). A LUN with no
    logical unit supports only page 00h."""
    if page not in _supported_pages(lu):
        return None
    if lu is None:
        return _vpd(page, lu, _vpd_00(identity, lu))
    return _vpd(page, lu, _VPD_BUILDERS[page](identity, lu))


def _constant(data: bytes) -> Runner:
    def run(_data: memoryview | None, _limit: int) -> bytes:
        return data

    return run


def _inquiry(req: SpcRequest, cdb: bytes) -> Parsed:
    """INQUIRY (``spc_emulate_inquiry``): CMDDT is obsolete and rejected, a
    PAGE CODE without EVPD and an unsupported VPD page are invalid fields
    of byte 2; the ALLOCATION LENGTH is bytes 3-4 (SPC-4)."""
    if cdb[1] & 0x02:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 1, 1)
    page = cdb[2]
    if cdb[1] & 0x01:
        data = vpd_page(page, req.identity, req.lu)
        if data is None:
            raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 2)
    elif page:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 2)
    else:
        data = standard_inquiry(req.identity, req.lu)
    return Parsed("INQUIRY", Direction.DATA_IN, u16(cdb, 3), _constant(data))


# --- MODE SENSE --------------------------------------------------------------------------


def _caching_page(lu: LogicalUnit, changeable: bool) -> bytes:
    """Caching mode page 08h (SBC-3): WCE reflects the backstore's
    write cache; nothing is changeable (no MODE SELECT)."""
    flags = 0 if changeable or not lu.write_cache else _WCE
    return _CACHING_PAGE.pack(0x08, _CACHING_PAGE.size - 2, flags)


def _control_page(lu: LogicalUnit, changeable: bool) -> bytes:
    """Control mode page 0Ah (SPC-4): all zero — one task set,
    restricted reordering, QErr 00b, fixed-format sense (D_SENSE 0),
    TAS 0, UA_INTLCK_CTRL 00b."""
    return _CONTROL_PAGE.pack(0x0A, _CONTROL_PAGE.size - 2)


_MODE_PAGES: dict[int, Callable[[LogicalUnit, bool], bytes]] = {
    0x08: _caching_page,
    0x0A: _control_page,
}


def mode_sense_data(
    lu: LogicalUnit,
    *,
    ten: bool,
    dbd: bool,
    llbaa: bool,
    pc: int,
    page: int,
    subpage: int,
) -> bytes:
    """MODE SENSE (6) / (10) parameter data (SPC-4; ``spc_emulate_modesense``):
    the mode parameter header (WP for a read-only LUN, DPOFUA), one block
    descriptor unless DBD (the long 16-byte form for MODE SENSE (10) with
    LLBAA), then the pages asked for: 08h caching, 0Ah control, or both
    for 3Fh. Raises the CHECK CONDITION for saved values (PC 11b) and
    unsupported pages or subpages."""
    if pc == 3:
        raise CheckCondition(
            SenseData.of(SenseKey.ILLEGAL_REQUEST, AdditionalSense.SAVING_PARAMETERS_NOT_SUPPORTED)
        )
    if page == 0x3F:
        codes: Sequence[int] = sorted(_MODE_PAGES)
    elif page in _MODE_PAGES:
        codes = (page,)
    else:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 2, 5)
    if subpage not in (0x00, 0xFF):
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 3)
    pages = b"".join(_MODE_PAGES[code](lu, pc == 1) for code in codes)
    if dbd:
        desc = b""
    elif ten and llbaa:
        desc = _LONG_BLOCK_DESC.pack(lu.num_blocks, lu.block_size)
    else:
        desc = _SHORT_BLOCK_DESC.pack(min(lu.num_blocks, _U32_MAX), lu.block_size)
    device_specific = _DPOFUA | (_WP if lu.read_only else 0)
    if ten:
        header = _MODE_HEADER_10.pack(
            _MODE_HEADER_10.size - 2 + len(desc) + len(pages),
            0,
            device_specific,
            _LONGLBA if len(desc) == _LONG_BLOCK_DESC.size else 0,
            len(desc),
        )
    else:
        header = _MODE_HEADER_6.pack(
            _MODE_HEADER_6.size - 1 + len(desc) + len(pages), 0, device_specific, len(desc)
        )
    return header + desc + pages


def _mode_sense(req: SpcRequest, cdb: bytes) -> Parsed:
    lu = req.lu
    assert lu is not None  # the core answers LOGICAL UNIT NOT SUPPORTED first
    ten = cdb[0] == Opcode.MODE_SENSE_10
    data = mode_sense_data(
        lu,
        ten=ten,
        dbd=bool(cdb[1] & 0x08),
        llbaa=ten and bool(cdb[1] & 0x10),
        pc=cdb[2] >> 6,
        page=cdb[2] & 0x3F,
        subpage=cdb[3],
    )
    alloc = u16(cdb, 7) if ten else cdb[4]
    return Parsed(f"MODE SENSE({10 if ten else 6})", Direction.DATA_IN, alloc, _constant(data))


# --- REPORT LUNS -------------------------------------------------------------------------


def report_luns_data(luns: Sequence[int]) -> bytes:
    """REPORT LUNS parameter data (SPC-4; ``spc_emulate_report_luns``):
    LUN LIST LENGTH, 4 reserved bytes, then 8 bytes per LUN."""
    return _REPORT_LUNS_HEADER.pack(8 * len(luns)) + b"".join(encode_lun(n) for n in luns)


def _report_luns(req: SpcRequest, cdb: bytes) -> Parsed:
    """REPORT LUNS: SELECT REPORT 00h and 02h list every logical unit (this
    target has no well-known logical units), 01h lists none; other values
    are invalid. With no LUN configured, LUN 0 is reported, as LIO does,
    so that an initiator scanning LUN 0 still finds the target."""
    select = cdb[2]
    if select not in (0x00, 0x01, 0x02):
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 2)

    def run(_data: memoryview | None, _limit: int) -> bytes:
        req.luns_reported()
        if select == 0x01:
            return report_luns_data(())
        return report_luns_data(req.lun_numbers() or (0,))

    return Parsed("REPORT LUNS", Direction.DATA_IN, u32(cdb, 6), run)


# --- REQUEST SENSE, TEST UNIT READY ------------------------------------------------------


def _request_sense(req: SpcRequest, cdb: bytes) -> Parsed:
    """REQUEST SENSE (``spc_emulate_request_sense``): a pending unit
    attention is returned (and cleared) as parameter data with GOOD status;
    otherwise NO SENSE — sense of a failed command travels with its CHECK
    CONDITION (autosense), so none is left pending. Descriptor format
    (DESC = 1) is not supported: INVALID FIELD IN CDB. A LUN with no
    logical unit reports LOGICAL UNIT NOT SUPPORTED (SPC-4, REQUEST SENSE)."""
    if cdb[1] & 0x01:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 1, 0)

    def run(_data: memoryview | None, _limit: int) -> bytes:
        if req.lu is None:
            sense = SenseData.of(
                SenseKey.ILLEGAL_REQUEST, AdditionalSense.LOGICAL_UNIT_NOT_SUPPORTED
            )
        elif (ua := req.take_unit_attention()) is not None:
            sense = SenseData.of(SenseKey.UNIT_ATTENTION, ua)
        else:
            sense = SenseData(SenseKey.NO_SENSE)
        return sense.encode()

    return Parsed("REQUEST SENSE", Direction.DATA_IN, cdb[4], run)


def _nothing(_data: memoryview | None, _limit: int) -> bytes:
    return b""


def _test_unit_ready(req: SpcRequest, cdb: bytes) -> Parsed:
    """TEST UNIT READY: the unit is always ready."""
    return Parsed("TEST UNIT READY", Direction.NONE, 0, _nothing)


SpcParser = Callable[[SpcRequest, bytes], Parsed]

#: Opcode → parser for the SPC commands.
SPC_PARSERS: dict[int, SpcParser] = {
    Opcode.TEST_UNIT_READY: _test_unit_ready,
    Opcode.REQUEST_SENSE: _request_sense,
    Opcode.INQUIRY: _inquiry,
    Opcode.MODE_SENSE_6: _mode_sense,
    Opcode.MODE_SENSE_10: _mode_sense,
    Opcode.REPORT_LUNS: _report_luns,
}
