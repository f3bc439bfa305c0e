"""A SCSI target core, transport-independent and sans-IO, serving disk
images (LIO's target core, ``drivers/target/``, with its ``fileio``
backstore).

A transport — the SRP target, later iSER — plugs into it the way
``ib_srpt`` and ``ib_isert`` plug into LIO: it hands the core a command and
the core tells it how the data moves; the transport moves it (RDMA READ,
immediate data, RDMA WRITE) and asks the core to execute; the core answers
with status, sense and data-in. The core knows nothing of RDMA, does no
I/O but ``pread`` / ``pwrite`` / ``fsync`` on its backstores, and is not
thread-safe (the transport serialises calls).

::

    target = ScsiTarget(transport_version=VERSION_SRP)
    target.add_lun(0, FileBackstore("disk.img", 512, size=64 << 20, create=True))
    nexus = Nexus("initiator port id", "target port id")

    plan = target.setup(nexus, lun, cdb, tag=tag, expected_length=buffer_len)
    if plan.direction is Direction.DATA_OUT:
        data = fetch(plan.transfer_length)          # RDMA READ / immediate data
        result = target.execute(plan, data)
    else:
        result = target.execute(plan)              # result.data_in → RDMA WRITE
    respond(result.status, result.sense, result.underflow, result.overflow)

:meth:`ScsiTarget.setup` (``target_setup_cmd_from_cdb``) validates
everything — the LUN, pending unit attentions, the opcode, each CDB field,
the LBA range, the transfer cap — before any I/O, and returns a
:class:`CommandPlan`: ``direction`` (NONE / DATA_IN / DATA_OUT) and
``transfer_length`` in bytes, or, for a command that fails, its CHECK
CONDITION already in ``plan.result`` (``execute`` then just returns it).
Between the two phases the command is outstanding in its nexus's task
set, where task management can abort it: :meth:`ScsiTarget.abort_task`,
:meth:`~ScsiTarget.abort_task_set`, :meth:`~ScsiTarget.clear_task_set`,
:meth:`~ScsiTarget.lun_reset`, :meth:`~ScsiTarget.it_nexus_reset`,
:meth:`~ScsiTarget.query_task` (or :meth:`~ScsiTarget.task_management`
with a :class:`TmFunction`), each answering a :class:`TmfResult` with a
SAM-5 :class:`TmfResponse`. :meth:`ScsiTarget.release` drops a plan the
transport gives up on.

:meth:`ScsiTarget.execute` returns a :class:`ScsiResult`: status, 18 bytes
of fixed-format sense (:class:`SenseData` decodes them), data-in cut to the
allocation length and the transport's buffer, and the residual
(``underflow`` / ``overflow``) against the ``expected_length`` the
transport gave at setup. Writes are in the image when ``execute`` returns
and durable after SYNCHRONIZE CACHE or when the WRITE had FUA.

Commands: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard data; VPD
pages 00h, 80h, 83h, B0h, B1h), MODE SENSE (6) / (10) (pages 08h caching,
0Ah control, 3Fh all), REPORT LUNS, READ CAPACITY (10) and (16), READ /
WRITE (6, 10, 12, 16) with FUA, SYNCHRONIZE CACHE (10) / (16), VERIFY (10,
12, 16) without byte check, START STOP UNIT. Anything else is ILLEGAL
REQUEST / INVALID COMMAND OPERATION CODE.

Bounds: one READ or WRITE moves at most ``max_transfer_bytes`` (8 MiB by
default, reported as the Block Limits page's MAXIMUM TRANSFER LENGTH);
larger ones get INVALID FIELD IN CDB pointing at the TRANSFER LENGTH, as
LIO answers past ``hw_max_sectors``. A nexus may have at most
``max_tasks_per_nexus`` commands outstanding (then TASK SET FULL). Other
parameter data is built at its natural size (at most 128 KiB for REPORT
LUNS) and only cut to the allocation length, never allocated from it.
"""

from softrdma.ulp.scsi.backstore import BLOCK_SIZES, Backstore, FileBackstore
from softrdma.ulp.scsi.cdb import Direction, Opcode, cdb_size
from softrdma.ulp.scsi.lu import LogicalUnit
from softrdma.ulp.scsi.lun import MAX_LUN, decode_lun, encode_lun, lun_from_any
from softrdma.ulp.scsi.sense import (
    FIXED_SENSE_LEN,
    AdditionalSense,
    FieldPointer,
    ScsiError,
    ScsiStatus,
    ScsiUsageError,
    SenseData,
    SenseKey,
)
from softrdma.ulp.scsi.spc import (
    VERSION_ISCSI,
    VERSION_SAM5,
    VERSION_SBC3,
    VERSION_SPC4,
    VERSION_SRP,
    TargetIdentity,
)
from softrdma.ulp.scsi.target import (
    DEFAULT_MAX_TRANSFER,
    CommandPlan,
    CommandState,
    Nexus,
    ScsiResult,
    ScsiTarget,
    TmfResponse,
    TmfResult,
    TmFunction,
)

__all__ = [
    "BLOCK_SIZES",
    "DEFAULT_MAX_TRANSFER",
    "FIXED_SENSE_LEN",
    "MAX_LUN",
    "VERSION_ISCSI",
    "VERSION_SAM5",
    "VERSION_SBC3",
    "VERSION_SPC4",
    "VERSION_SRP",
    "AdditionalSense",
    "Backstore",
    "CommandPlan",
    "CommandState",
    "Direction",
    "FieldPointer",
    "FileBackstore",
    "LogicalUnit",
    "Nexus",
    "Opcode",
    "ScsiError",
    "ScsiResult",
    "ScsiStatus",
    "ScsiTarget",
    "ScsiUsageError",
    "SenseData",
    "SenseKey",
    "TargetIdentity",
    "TmFunction",
    "TmfResponse",
    "TmfResult",
    "cdb_size",
    "decode_lun",
    "encode_lun",
    "lun_from_any",
]
