"""SCSI status codes, sense keys, additional sense codes and fixed-format
sense data.

Kernel counterparts: ``include/scsi/scsi_proto.h`` (``SAM_STAT_*``),
``include/scsi/scsi_common.h`` (sense keys), LIO's sense table in
``target_core_transport.c`` (``sense_info_table``, which maps each
``TCM_*`` reason to a key / ASC / ASCQ) and ``scsi_build_sense_buffer``.
Layouts: SAM-5 (status codes), SPC-4 "fixed format sense data" and
"sense key specific (field pointer)".
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from softrdma.errors import SoftRdmaError

__all__ = [
    "FIXED_SENSE_LEN",
    "AdditionalSense",
    "FieldPointer",
    "ScsiError",
    "ScsiStatus",
    "ScsiUsageError",
    "SenseData",
    "SenseKey",
]


class ScsiError(SoftRdmaError):
    """Base class of the SCSI target core's errors."""


class ScsiUsageError(ScsiError, ValueError):
    """A caller (transport or configuration) bug: a wrong argument, a plan
    executed twice, data-out of the wrong length. Never raised for anything
    an initiator sends — that becomes a SCSI status."""


class ScsiStatus(enum.IntEnum):
    """SAM-5 status codes (Linux ``SAM_STAT_*``)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(enum.IntEnum):
    """SPC-4 sense keys (Linux ``NO_SENSE`` … ``MISCOMPARE``)."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    EQUAL = 0xC  # obsolete
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


class AdditionalSense(enum.Enum):
    """The (ASC, ASCQ) pairs this target reports (SPC-4 Annex D; LIO's
    ``TCM_*`` sense reasons and the ``ASCQ_*`` names of
    ``target_core_ua.h``)."""

    NO_ADDITIONAL_SENSE = (0x00, 0x00)
    WRITE_ERROR = (0x0C, 0x00)
    INVALID_FIELD_IN_COMMAND_IU = (0x0E, 0x03)
    UNRECOVERED_READ_ERROR = (0x11, 0x00)
    INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
    LBA_OUT_OF_RANGE = (0x21, 0x00)
    INVALID_FIELD_IN_CDB = (0x24, 0x00)
    LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
    WRITE_PROTECTED = (0x27, 0x00)
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (0x27, 0x07)
    POWER_ON_RESET_OR_BUS_DEVICE_RESET = (0x29, 0x00)
    BUS_DEVICE_RESET_FUNCTION_OCCURRED = (0x29, 0x03)
    I_T_NEXUS_LOSS_OCCURRED = (0x29, 0x07)
    COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = (0x2F, 0x00)
    SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
    REPORTED_LUNS_DATA_HAS_CHANGED = (0x3F, 0x0E)
    INTERNAL_TARGET_FAILURE = (0x44, 0x00)
    OVERLAPPED_COMMANDS_ATTEMPTED = (0x4E, 0x00)

    @property
    def asc(self) -> int:
        """The ADDITIONAL SENSE CODE byte."""
        code: int = self.value[0]
        return code

    @property
    def ascq(self) -> int:
        """The ADDITIONAL SENSE CODE QUALIFIER byte."""
        qualifier: int = self.value[1]
        return qualifier


@dataclass(frozen=True)
class FieldPointer:
    """The sense-key-specific field pointer of an ILLEGAL REQUEST
    (SPC-4 "field pointer sense key specific data"): the byte of the CDB (``cdb=True``) or of the
    parameter list that is in error and, when ``bit`` is given, the most
    significant bit of the offending field within it (BPV set)."""

    byte: int
    bit: int | None = None
    cdb: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.byte <= 0xFFFF:
            raise ScsiUsageError(f"field pointer byte {self.byte}: 16 bits")
        if self.bit is not None and not 0 <= self.bit <= 7:
            raise ScsiUsageError(f"field pointer bit {self.bit}: 0..7")

    def encode(self) -> bytes:
        """The three sense-key-specific bytes (SKSV set)."""
        b0 = 0x80 | (0x40 if self.cdb else 0)
        if self.bit is not None:
            b0 |= 0x08 | self.bit
        return _SKS.pack(b0, self.byte)


#: Fixed-format sense data is 18 bytes: 8 of header and the ADDITIONAL
#: SENSE LENGTH (10) that follow (SPC-4, fixed format sense data).
FIXED_SENSE_LEN = 18
_FIXED_ADDITIONAL_LEN = FIXED_SENSE_LEN - 8

# response code, obsolete, flags|sense key, INFORMATION, additional sense
# length, COMMAND-SPECIFIC INFORMATION, ASC, ASCQ, FRU code, sense-key specific
_FIXED_SENSE = struct.Struct(">BxBIBIBBB3s")
_SKS = struct.Struct(">BH")
assert _FIXED_SENSE.size == FIXED_SENSE_LEN

_SENSE_KEYS = frozenset(int(key) for key in SenseKey)
_RESPONSE_CURRENT = 0x70
_RESPONSE_DEFERRED = 0x71
_VALID = 0x80
_U32_MAX = 0xFFFF_FFFF


@dataclass(frozen=True)
class SenseData:
    """One sense-data record, as LIO's ``transport_send_check_condition_and_sense``
    builds it and ``scsi_normalize_sense`` reads it (SPC-4,
    fixed format, response code 70h current or 71h deferred).

    ``information`` is the INFORMATION field (SBC-3: the first invalid or
    failing LBA); a value that does not fit its 4 bytes is sent with the
    VALID bit clear, as SPC-4 asks of fixed-format sense.
    """

    key: SenseKey
    asc: int = 0
    ascq: int = 0
    information: int | None = None
    command_specific: int = 0
    field_pointer: FieldPointer | None = None
    deferred: bool = False

    @classmethod
    def of(
        cls,
        key: SenseKey,
        code: AdditionalSense,
        *,
        information: int | None = None,
        field_pointer: FieldPointer | None = None,
    ) -> SenseData:
        """Sense data for ``key`` and a named additional sense code."""
        return cls(key, code.asc, code.ascq, information, 0, field_pointer)

    @property
    def additional_sense(self) -> AdditionalSense | None:
        """The named (ASC, ASCQ), or None for a pair this module does not name."""
        try:
            return AdditionalSense((self.asc, self.ascq))
        except ValueError:
            return None

    def encode(self) -> bytes:
        """The 18 bytes of fixed-format sense data."""
        info = self.information
        valid = info is not None and 0 <= info <= _U32_MAX
        code = (_RESPONSE_DEFERRED if self.deferred else _RESPONSE_CURRENT) | (
            _VALID if valid else 0
        )
        sks = self.field_pointer.encode() if self.field_pointer else b"\0\0\0"
        return _FIXED_SENSE.pack(
            code,
            int(self.key) & 0x0F,
            info if valid and info is not None else 0,
            _FIXED_ADDITIONAL_LEN,
            self.command_specific & _U32_MAX,
            self.asc & 0xFF,
            self.ascq & 0xFF,
            0,
            sks,
        )

    @classmethod
    def decode(cls, data: bytes) -> SenseData:
        """Parse fixed-format sense data (response code 70h / 71h, at least
        18 bytes, ADDITIONAL SENSE LENGTH ≥ 10). Raises :class:`ScsiError`
        for anything else, so a test can use it as a well-formedness check."""
        if len(data) < FIXED_SENSE_LEN:
            raise ScsiError(f"sense data is {len(data)} bytes, fixed format needs 18")
        code, flags, info, add_len, cmd_info, asc, ascq, _fru, sks = _FIXED_SENSE.unpack_from(data)
        if code & 0x7F not in (_RESPONSE_CURRENT, _RESPONSE_DEFERRED):
            raise ScsiError(f"sense response code {code & 0x7F:#x} is not fixed format")
        if add_len < _FIXED_ADDITIONAL_LEN or len(data) < 8 + add_len:
            raise ScsiError(f"ADDITIONAL SENSE LENGTH {add_len} does not fit {len(data)} bytes")
        if flags & 0x0F not in _SENSE_KEYS:
            raise ScsiError(f"sense key {flags & 0x0F:#x} is reserved")
        pointer = None
        if sks[0] & 0x80:
            b0, byte = _SKS.unpack(sks)
            pointer = FieldPointer(byte, (b0 & 0x07) if b0 & 0x08 else None, bool(b0 & 0x40))
        return cls(
            key=SenseKey(flags & 0x0F),
            asc=asc,
            ascq=ascq,
            information=info if code & _VALID else None,
            command_specific=cmd_info,
            field_pointer=pointer,
            deferred=(code & 0x7F) == _RESPONSE_DEFERRED,
        )


class CheckCondition(Exception):
    """Raised inside the core to end a command with CHECK CONDITION; never
    escapes :class:`~softrdma.ulp.scsi.ScsiTarget` (LIO's ``sense_reason_t``
    return values)."""

    def __init__(self, sense: SenseData) -> None:
        super().__init__(sense)
        self.sense = sense


def illegal_request(
    code: AdditionalSense = AdditionalSense.INVALID_FIELD_IN_CDB,
    byte: int | None = None,
    bit: int | None = None,
    *,
    information: int | None = None,
) -> CheckCondition:
    """ILLEGAL REQUEST with an optional CDB field pointer (LIO's
    ``TCM_INVALID_CDB_FIELD`` and friends)."""
    pointer = FieldPointer(byte, bit) if byte is not None else None
    return CheckCondition(
        SenseData.of(SenseKey.ILLEGAL_REQUEST, code, information=information, field_pointer=pointer)
    )
