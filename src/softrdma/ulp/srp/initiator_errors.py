"""The SRP initiator's errors.

Kernel counterparts: the ``-errno`` values ib_srp's login path returns
(``srp_connect_ch``, ``srp_cm_rep_handler``, ``srp_rdma_cm_rej_handler``),
and the SCSI results its commands complete with (``scmnd->result``: the
SCSI status byte with its sense data, ``DID_ERROR``, ``DID_TRANSPORT_FAILFAST``,
the error handler's abort / reset outcomes).
"""

from __future__ import annotations

import errno as _errno

from softrdma.errors import SoftRdmaError

__all__ = [
    "ScsiCheckCondition",
    "ScsiStatusError",
    "SrpCommandTimeout",
    "SrpConnectError",
    "SrpInitiatorError",
    "SrpLoginRejected",
    "SrpMapError",
    "SrpTransportError",
]


class SrpInitiatorError(SoftRdmaError):
    """Base of the initiator's errors. ``errno`` is the kernel's error
    number for the condition (0 when it is a SCSI status instead)."""

    def __init__(self, message: str, err: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class SrpConnectError(SrpInitiatorError):
    """The RDMA CM could not connect (ib_srp's ``srp_connect_ch`` failing):
    address or route resolution failed (``ENXIO``, ``EHOSTUNREACH``), the
    target was unreachable (``EHOSTUNREACH``), the CM REJ was not an SRP
    login reject (``ECONNRESET``, with the CM reason in ``cm_reason``), or
    the login response was unusable (``ECONNRESET``)."""

    def __init__(self, message: str, err: int = _errno.ECONNRESET, cm_reason: int = 0) -> None:
        super().__init__(message, err)
        self.cm_reason = cm_reason


class SrpLoginRejected(SrpConnectError):
    """The target answered the login with ``SRP_LOGIN_REJ``
    (``srp_rdma_cm_rej_handler``, "SRP LOGIN REJECTED, reason 0x%08x"):
    ``reason`` is the ``SRP_LOGIN_REJ_*`` code, an
    :class:`~softrdma.ulp.srp.proto.SrpLoginRejReason` when it is one of
    srp.h's."""

    def __init__(self, reason: int, cm_reason: int) -> None:
        name = getattr(reason, "name", None)
        what = f"{name} ({int(reason):#010x})" if name else f"{int(reason):#010x}"
        super().__init__(f"SRP login rejected, reason {what}", _errno.ECONNRESET, cm_reason)
        self.reason = reason


class SrpTransportError(SrpInitiatorError):
    """A command could not be carried: the channel is gone and
    ``fast_io_fail_tmo`` expired (``DID_TRANSPORT_FAILFAST``), the initiator
    logged out or was closed with the command outstanding, it ran out of
    retries, or posting failed (``DID_ERROR``)."""


class SrpMapError(SrpInitiatorError):
    """``srp_map_data`` refused the command's data buffer: it could not be
    DMA-mapped (``EIO``), it needs more descriptors than fit the SRP_CMD
    without an external table (``EIO``, "Could not fit S/G list into
    SRP_CMD"), or a segment no MR can hold (``EINVAL``). ``transient``
    marks what ib_srp answers with ``SAM_STAT_TASK_SET_FULL``, which the
    midlayer requeues: a shortage that clears when other commands complete
    (the FR pool is empty; the mapping resources — swiotlb slots, IOVA
    space, kmap slots — are exhausted) or more memory registrations than
    ``mr_per_cmd`` ("Out of MRs", ``ENOMEM``: bounced segments that break
    the page list may map differently next time). The command then waits
    for the others, or, with none in flight, is mapped again up to
    ``retries`` times, before it fails with this error.
    """

    def __init__(self, message: str, err: int = _errno.EIO, *, transient: bool = False) -> None:
        super().__init__(message, err)
        self.transient = transient


class SrpCommandTimeout(SrpInitiatorError):
    """The target did not answer the command in time and the error handler
    took it back (``srp_abort``, ``srp_reset_device``, ``srp_reset_host``):
    ``recovery`` says what finally worked — ``"abort-task"``,
    ``"lun-reset"`` or ``"reconnect"``. The target can no longer reach the
    command's buffer when this is raised."""

    def __init__(self, tag: int, recovery: str, tm_status: int | None = None) -> None:
        super().__init__(
            f"command tag {tag:#x} timed out; recovered by {recovery}", _errno.ETIMEDOUT
        )
        self.tag = tag
        self.recovery = recovery
        self.tm_status = tm_status


class ScsiStatusError(SrpInitiatorError):
    """The command completed with a SCSI status other than GOOD (the
    status byte of ``scmnd->result``): BUSY, RESERVATION CONFLICT, TASK
    SET FULL after the retries ran out, ..."""

    def __init__(self, status: int, message: str | None = None) -> None:
        super().__init__(message or f"SCSI status {status:#04x}", 0)
        self.status = status


class ScsiCheckCondition(ScsiStatusError):
    """CHECK CONDITION with its sense data (``scsi_normalize_sense``):
    ``sense_key``, ``asc``, ``ascq`` and the raw ``sense`` bytes."""

    def __init__(self, sense: bytes, sense_key: int, asc: int, ascq: int) -> None:
        super().__init__(
            0x02,
            f"CHECK CONDITION: sense key {sense_key:#x}, ASC/ASCQ {asc:#04x}/{ascq:#04x}",
        )
        self.sense = sense
        self.sense_key = sense_key
        self.asc = asc
        self.ascq = ascq
