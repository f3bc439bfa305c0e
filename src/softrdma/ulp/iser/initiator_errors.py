"""The iSER initiator's errors.

Kernel counterparts: what libiscsi and iscsid report for a session —
a login that failed (iscsid's ``ISCSI_ERR_LOGIN`` / ``ISCSI_ERR_TRANS``), a
SCSI command failed with ``DID_TRANSPORT_FAILFAST`` once the session was
lost for longer than ``replacement_timeout``
(``iscsi_session_recovery_timedout``), and a command the SCSI error
handler took back after its timeout (``iscsi_eh_abort``,
``iscsi_eh_device_reset``, ``iscsi_eh_session_reset``) with no retry left.
"""

from __future__ import annotations

import errno as _errno

from softrdma.errors import SoftRdmaError

__all__ = [
    "IserCommandTimeout",
    "IserConnectError",
    "IserInitiatorError",
    "IserLoginRejected",
    "IserTransportError",
]


class IserInitiatorError(SoftRdmaError):
    """Base of the initiator's errors; ``errno`` is the kernel's error
    number for the condition."""

    def __init__(self, message: str, err: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class IserConnectError(IserInitiatorError):
    """The connection could not be made: address or route resolution
    failed, the CM REQ was rejected or unanswered (``iser_connect`` /
    ``iser_cma_handler`` failing), or the login got no answer in time."""


class IserLoginRejected(IserConnectError):
    """The target refused the login with a Login Response of status class
    ``status_class`` (1 redirect, 2 initiator error, 3 target error) and
    ``status_detail`` (iscsid's ``__check_iscsi_status_class``)."""

    def __init__(self, message: str, status_class: int, status_detail: int) -> None:
        super().__init__(message, _errno.EACCES if status_class == 2 else _errno.ECONNREFUSED)
        self.status_class = status_class
        self.status_detail = status_detail


class IserTransportError(IserInitiatorError):
    """A command could not be carried: the session was down for longer than
    ``replacement_timeout`` (``DID_TRANSPORT_FAILFAST``), it was logged out
    or closed with the command outstanding, or it was rejected."""


class IserCommandTimeout(IserInitiatorError):
    """The target did not answer the command within ``cmd_timeout``, the
    error handler took it back (``recovery``: ``"abort-task"``,
    ``"lun-reset"`` or ``"session-recovery"``) and no retry was left (the
    midlayer's ``retries``). The target can no longer reach the command's
    buffer when this is raised."""

    def __init__(self, itt: int, recovery: str) -> None:
        super().__init__(
            f"command ITT {itt:#x} timed out; taken back by {recovery}", _errno.ETIMEDOUT
        )
        self.itt = itt
        self.recovery = recovery
