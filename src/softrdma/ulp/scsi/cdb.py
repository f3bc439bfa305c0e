"""Operation codes, data directions and CDB field access.

Kernel counterparts: ``include/scsi/scsi_proto.h`` (operation codes),
``scsi_command_size`` / ``COMMAND_SIZE`` (the CDB length from the opcode's
group code, SPC-4 "operation code"), ``enum dma_data_direction`` as LIO's
``se_cmd->data_direction`` uses it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from softrdma.ulp.scsi.sense import AdditionalSense, illegal_request

__all__ = ["Direction", "Opcode", "cdb_size"]


class Opcode(enum.IntEnum):
    """The operation codes this target knows (``scsi_proto.h`` names)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    VERIFY_12 = 0xAF


#: SERVICE ACTION IN (16) service action of READ CAPACITY (16).
SAI_READ_CAPACITY_16 = 0x10


class Direction(enum.Enum):
    """Which way a command's data moves, seen from the initiator (LIO's
    ``DMA_NONE`` / ``DMA_FROM_DEVICE`` / ``DMA_TO_DEVICE``): DATA_IN is
    sent to the initiator (SRP: target RDMA WRITE), DATA_OUT is fetched
    from it (SRP: target RDMA READ or immediate data)."""

    NONE = "none"
    DATA_IN = "data-in"
    DATA_OUT = "data-out"


_GROUP_SIZES = (6, 10, 10, None, 16, 12, None, None)


def cdb_size(opcode: int) -> int | None:
    """The CDB length implied by ``opcode``'s group code (SPC-4 "operation code",
    ``COMMAND_SIZE``), or None for the reserved and vendor-specific groups
    and the variable-length CDB."""
    return _GROUP_SIZES[(opcode >> 5) & 7]


# Precompiled field readers: the CDB is big-endian throughout.
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


def u16(cdb: bytes, offset: int) -> int:
    """The 2-byte big-endian field at ``offset`` (``get_unaligned_be16``)."""
    value: int = U16.unpack_from(cdb, offset)[0]
    return value


def u32(cdb: bytes, offset: int) -> int:
    """The 4-byte big-endian field at ``offset`` (``get_unaligned_be32``)."""
    value: int = U32.unpack_from(cdb, offset)[0]
    return value


def u64(cdb: bytes, offset: int) -> int:
    """The 8-byte big-endian field at ``offset`` (``get_unaligned_be64``)."""
    value: int = U64.unpack_from(cdb, offset)[0]
    return value


def check_control_byte(cdb: bytes, size: int) -> None:
    """Reject NACA and the obsolete LINK bit of the CONTROL byte: this
    target supports neither ACA nor linked commands (SAM-5, the
    CONTROL byte)."""
    control = cdb[size - 1]
    if control & 0x04:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, size - 1, 2)
    if control & 0x01:
        raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, size - 1, 0)


#: ``run(data_out, limit)`` performs a parsed command: ``data_out`` is the
#: write data (DATA_OUT commands), ``limit`` the most data-in bytes the
#: transport can take; it returns the data-in bytes (possibly more than
#: ``limit``: the core truncates) or raises ``CheckCondition``.
Runner = Callable[[memoryview | None, int], bytes]


@dataclass(frozen=True)
class Parsed:
    """A CDB after ``spc_parse_cdb`` / ``sbc_parse_cdb``: the data
    direction, the transfer length the CDB specifies in bytes (an
    allocation length, or blocks × block size for a ``data_cdb`` such as
    READ / WRITE — LIO's ``SCF_SCSI_DATA_CDB``), and how to run it."""

    name: str
    direction: Direction
    length: int
    run: Runner
    data_cdb: bool = False
