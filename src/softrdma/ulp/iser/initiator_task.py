"""The iSER initiator's commands and block I/Os.

Kernel counterparts: ``struct iscsi_task`` with its ``iscsi_iser_task``
(one SCSI command in flight: its data buffer, fast-registration
descriptor and key), the SCSI midlayer's ``scsi_cmnd`` fields the error
handler uses (the request timer, ``retries`` / ``allowed``), and the
block layer's request that ``sd`` splits into commands of at most
``max_sectors``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from softrdma.dma.types import DmaDirection
from softrdma.ulp.iscsi.session import CommandCompleted
from softrdma.ulp.iser.initiator_errors import IserInitiatorError
from softrdma.ulp.iu import IuBuf
from softrdma.ulp.scsi import ScsiStatus
from softrdma.ulp.scsi.sense import SenseKey
from softrdma.ulp.srp.initiator_errors import ScsiCheckCondition
from softrdma.ulp.srp.initiator_map import FrDesc, SrpBuffer
from softrdma.ulp.srp.initiator_scsi import status_error

__all__ = ["IserIo", "IserRequest", "needs_retry"]


@dataclass(eq=False)
class IserRequest:
    """One SCSI command (``struct iscsi_task`` with its
    ``iscsi_iser_task``): the buffer, its FR descriptor and key, what is
    still missing before it can be released, and the error handler's
    state (``deadline`` the request timer, ``timed_out`` once it fired,
    ``taken_back`` how a TMF took it from the target, ``retries`` left for
    the midlayer to send it again)."""

    cdb: bytes
    lun: int
    read_length: int
    write_data: bytes
    serial: int = 0
    retries: int = 5
    submitted: float = 0.0
    buf: SrpBuffer | None = None
    direction: DmaDirection | None = None
    fr: FrDesc | None = None
    tx: IuBuf | None = None
    itt: int = -1
    cmdsn: int = 0
    send_done: bool = False
    response: CommandCompleted | None = None
    invalidated: int = 0
    inv_pending: bool = False
    deadline: float = 0.0
    timed_out: bool = False
    taken_back: str = ""
    done: bool = False
    status: int = -1
    sense: bytes = b""
    data: bytes = b""
    error: Exception | None = None
    callbacks: list[Callable[[IserRequest], None]] = field(default_factory=list)

    def reset(self) -> None:
        """Back to queued: a new ITT, buffer and key when sent again
        (``scsi_queue_insert`` after the task was taken back)."""
        self.itt = -1
        self.send_done = False
        self.response = None
        self.invalidated = 0
        self.inv_pending = False
        self.timed_out = False
        self.taken_back = ""
        self.error = None

    def result(self) -> bytes:
        """The data read (``b""`` for other commands); raises the SCSI or
        session error."""
        if not self.done:
            raise self.error or IserInitiatorError("the command has not completed")
        if self.error is not None:
            raise self.error
        if self.status != ScsiStatus.GOOD:
            raise status_error(self.status, self.sense)
        return self.data


class IserIo:
    """A block I/O split into commands of at most ``max_sectors``."""

    def __init__(self, requests: Sequence[IserRequest], is_write: bool) -> None:
        self.requests = list(requests)
        self.is_write = is_write

    def __repr__(self) -> str:
        kind = "write" if self.is_write else "read"
        return f"<IserIo {kind} {len(self.requests)} commands done={self.done}>"

    @property
    def done(self) -> bool:
        return all(r.done for r in self.requests)

    def result(self) -> bytes | None:
        """The bytes read (``None`` for a write)."""
        parts = [r.result() for r in self.requests]
        return None if self.is_write else b"".join(parts)


def needs_retry(req: IserRequest) -> str:
    """``scsi_decide_disposition`` for an answered command: ``"busy"`` for
    BUSY and TASK SET FULL (ADD_TO_MLQUEUE: requeued without using a
    retry), ``"retry"`` for CHECK CONDITION with UNIT ATTENTION (a reset or
    a reinstated session reported once: NEEDS_RETRY), ``""`` otherwise."""
    rsp = req.response
    if rsp is None or rsp.status == ScsiStatus.GOOD:
        return ""
    if rsp.status in (ScsiStatus.BUSY, ScsiStatus.TASK_SET_FULL):
        return "busy"
    err = status_error(rsp.status, rsp.sense)
    unit_attention = (
        isinstance(err, ScsiCheckCondition) and err.sense_key == SenseKey.UNIT_ATTENTION
    )
    return "retry" if unit_attention else ""
