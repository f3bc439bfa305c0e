"""The iSER initiator's error handling and session recovery (ERL 0).

Kernel and open-iscsi counterparts:

* the request timer (``blk_mq_rq_timed_out`` → ``scsi_timeout``, sd's
  30 s) and the SCSI error handler's escalation as libiscsi implements its
  steps: ``iscsi_eh_abort`` (an immediate TMF ABORT TASK naming the
  command's ITT and CmdSN, ``abort_timeout``), ``iscsi_eh_device_reset``
  (LOGICAL UNIT RESET, ``lu_reset_timeout``), then
  ``iscsi_eh_session_reset`` (the connection is failed and the session
  recovered); a command taken back is sent again by the midlayer while
  its ``retries`` last (sd's ``SD_MAX_RETRIES``), else it fails with
  :class:`IserCommandTimeout`;
* the disposition of an answered command (``scsi_decide_disposition``):
  BUSY and TASK SET FULL are sent again after ``SCSI_QUEUE_DELAY`` or the
  next completion, without using a retry, until ``(retries + 1) *
  cmd_timeout`` since the command was queued; UNIT ATTENTION uses one;
* the connection monitor ``iscsi_check_transport_timeouts``: with nothing
  received for ``noop_out_interval`` a NOP-Out ping, and without its
  NOP-In within ``noop_out_timeout`` the connection fails
  (``ISCSI_ERR_NOP_TIMEDOUT``);
* ``iscsi_conn_failure`` → ``iscsi_start_session_recovery``: the
  connection is torn down (ib_iser's ``iser_conn_terminate`` +
  ``iser_conn_release``), every command that had not completed goes back
  to the queue (``DID_TRANSPORT_DISRUPTED``: the midlayer requeues it),
  and iscsid reopens the session (``session_conn_reopen``: first after
  ``DefaultTime2Wait``, then every ``ISCSI_CONN_ERR_REOPEN_DELAY``),
  logging in with the session's ISID — RFC 7143 §6.3.5 session
  reinstatement: the target ends what is left of the old session and
  the queued commands go out on the new one, each with a fresh
  registration;
* ``iscsi_session_recovery_timedout``: after ``replacement_timeout``
  without a session every queued command fails with
  :class:`IserTransportError` (``DID_TRANSPORT_FAILFAST``), as does every
  command submitted later until a reopen succeeds.

The state is kept in :class:`IserErrorHandler`, a base of
:class:`~softrdma.ulp.iser.initiator.IserInitiator`; the connection's
resources are the initiator's.
"""

from __future__ import annotations

import enum
import errno
import logging
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from softrdma.ulp.iscsi.proto import IscsiTmfFunc, IscsiTmfResponseCode
from softrdma.ulp.iscsi.session import (
    IscsiInitiatorConnection,
    LoginCompleted,
    NopInReceived,
    TmfCompleted,
)
from softrdma.ulp.iser.initiator_conn import IserConn
from softrdma.ulp.iser.initiator_errors import (
    IserCommandTimeout,
    IserInitiatorError,
    IserTransportError,
)
from softrdma.ulp.iser.initiator_task import IserRequest, needs_retry
from softrdma.verbs.device import IbDevice

if TYPE_CHECKING:
    from softrdma.ulp.iscsi.proto import IscsiPdu

__all__ = [
    "ISCSI_CONN_ERR_REOPEN_DELAY",
    "ISCSI_DEF_ABORT_TIMEOUT",
    "ISCSI_DEF_LU_RESET_TIMEOUT",
    "ISCSI_DEF_NOOP_OUT_INTERVAL",
    "ISCSI_DEF_NOOP_OUT_TIMEOUT",
    "ISCSI_DEF_REPLACEMENT_TIMEOUT",
    "ISCSI_DEF_TIME2WAIT",
    "SCSI_QUEUE_DELAY",
    "SD_MAX_RETRIES",
    "SD_TIMEOUT",
    "IserErrorHandler",
    "IserState",
]

log = logging.getLogger(__name__)

SD_TIMEOUT = 30.0
"""sd's request timeout, seconds (``SD_TIMEOUT``)."""
SD_MAX_RETRIES = 5
"""sd's retries of a command (``SD_MAX_RETRIES``)."""
SCSI_QUEUE_DELAY = 0.003
"""How long the midlayer holds a queue the device answered BUSY to."""
ISCSI_DEF_ABORT_TIMEOUT = 15.0
"""open-iscsi ``node.session.err_timeo.abort_timeout``."""
ISCSI_DEF_LU_RESET_TIMEOUT = 30.0
"""open-iscsi ``node.session.err_timeo.lu_reset_timeout``."""
ISCSI_DEF_REPLACEMENT_TIMEOUT = 120.0
"""open-iscsi ``node.session.timeo.replacement_timeout``."""
ISCSI_DEF_NOOP_OUT_INTERVAL = 5.0
"""open-iscsi ``node.conn[0].timeo.noop_out_interval``."""
ISCSI_DEF_NOOP_OUT_TIMEOUT = 5.0
"""open-iscsi ``node.conn[0].timeo.noop_out_timeout``."""
ISCSI_CONN_ERR_REOPEN_DELAY = 3.0
"""iscsid's delay between failed reopen attempts."""
ISCSI_DEF_TIME2WAIT = 2.0
"""DefaultTime2Wait when the login did not negotiate it (RFC 7143)."""


class IserState(enum.Enum):
    """The session's state (libiscsi's ``ISCSI_STATE_*``)."""

    FREE = "free"
    """Not logged in yet."""
    LOGGED_IN = "logged-in"
    """Full feature phase: commands flow."""
    FAILED = "failed"
    """The connection failed; reopening, commands wait
    (``ISCSI_STATE_FAILED``)."""
    RECOVERY_FAILED = "recovery-failed"
    """``replacement_timeout`` expired: commands fail at once while the
    reopen attempts go on (``ISCSI_STATE_RECOVERY_FAILED``)."""
    TERMINATE = "terminate"
    """Logged out or closed (``ISCSI_STATE_TERMINATE``)."""


@dataclass
class _Tmf:
    """A task management request in flight (libiscsi's ``tmf_state``)."""

    itt: int
    function: IscsiTmfFunc
    lun: int
    req: IserRequest
    deadline: float


@dataclass
class _Ping:
    itt: int
    deadline: float


class IserErrorHandler:
    """Timers, the TMF escalation and session recovery for
    :class:`~softrdma.ulp.iser.initiator.IserInitiator` (which provides the
    connection: :meth:`_connect`, :meth:`_post_pdu`, :meth:`_release`,
    :meth:`_complete`)."""

    dev: IbDevice
    conn: IscsiInitiatorConnection
    stats: Counter[str]
    state: IserState
    lost_reason: str | None
    cmd_timeout: float
    abort_timeout: float
    lu_reset_timeout: float
    replacement_timeout: float
    noop_out_interval: float
    noop_out_timeout: float
    reopen_delay: float
    _active: dict[int, IserRequest]
    _pending: deque[IserRequest]

    _ic: IserConn | None
    _inv_wait: dict[int, IserRequest]
    login_timeout: float
    retries: int

    if TYPE_CHECKING:

        @property
        def tsih(self) -> int: ...
        def _post_pdu(self, pdu: IscsiPdu) -> bool: ...
        def _take_back(self, req: IserRequest, how: str) -> None: ...
        def _connect(self, timeout: float) -> LoginCompleted: ...
        def _release(self, req: IserRequest, *, key_dead: bool) -> None: ...
        def _complete(self, req: IserRequest, error: Exception | None) -> None: ...

    def _eh_init(self) -> None:
        self._eh_queue: deque[IserRequest] = deque()
        self._tmf: _Tmf | None = None
        self._ping: _Ping | None = None
        self._last_rx = 0.0
        self._failed_at = 0.0
        self._reopen_at: float | None = None
        self._blocked_until = 0.0

    def _now(self) -> float:
        return self.dev.scheduler.time()

    # -- the timers ----------------------------------------------------------------------

    def _next_timer(self) -> float | None:
        """When :meth:`_check_timers` has something to do next."""
        times: list[float] = []
        if self.state is IserState.LOGGED_IN:
            times += [r.deadline for r in self._active.values() if self._timer_on(r)]
            if self._pending and self._blocked_until:
                times.append(self._blocked_until)
            if self._tmf is not None:
                times.append(self._tmf.deadline)
            elif self._eh_queue:
                times.append(0.0)
            if self._ping is not None:
                times.append(self._ping.deadline)
            elif self.noop_out_interval > 0:
                times.append(self._last_rx + self.noop_out_interval)
        elif self.state in (IserState.FAILED, IserState.RECOVERY_FAILED):
            if self._reopen_at is not None:
                times.append(self._reopen_at)
            if self.state is IserState.FAILED:
                times.append(self._failed_at + self.replacement_timeout)
        return min(times) if times else None

    @staticmethod
    def _timer_on(req: IserRequest) -> bool:
        """The request timer runs until the response (or a TMF) ends the
        command at the target."""
        return not req.timed_out and req.response is None and not req.taken_back

    def _check_timers(self) -> None:
        now = self._now()
        if self.state is IserState.LOGGED_IN:
            for req in list(self._active.values()):
                if self._timer_on(req) and req.deadline <= now:
                    # scsi_timeout → scsi_abort_command: the error handler owns it.
                    log.warning("%r: command ITT %#x timed out", self, req.itt)
                    req.timed_out = True
                    self.stats["timeouts"] += 1
                    self._eh_queue.append(req)
            tmf = self._tmf
            if tmf is not None and now >= tmf.deadline:
                log.warning("%r: %s timed out", self, tmf.function.name)
                self._tmf_done(tmf, None)
            if self.state is IserState.LOGGED_IN and self._tmf is None:
                self._eh_next()
            if self.state is IserState.LOGGED_IN:
                self._check_ping(now)
        if self.state is IserState.FAILED and now >= self._failed_at + self.replacement_timeout:
            self._recovery_timedout()
        if (
            self.state in (IserState.FAILED, IserState.RECOVERY_FAILED)
            and self._reopen_at is not None
            and now >= self._reopen_at
        ):
            self._reopen_at = None
            self._reopen()

    def _check_ping(self, now: float) -> None:
        """``iscsi_check_transport_timeouts``."""
        if self.noop_out_interval <= 0:
            return
        if self._ping is not None:
            if now >= self._ping.deadline:
                self.stats["ping_timeouts"] += 1
                self._conn_failure("NOP-Out ping timed out")
            return
        if now >= self._last_rx + self.noop_out_interval:
            pdu = self.conn.nop_out()
            if self._post_pdu(pdu):
                self.stats["pings"] += 1
                self._ping = _Ping(pdu.itt, now + self.noop_out_timeout)
            else:
                self._conn_failure("no descriptor for a NOP-Out")

    def _received(self, events: Sequence[object]) -> None:
        """Note traffic (the ping timer restarts) and the answers the error
        handler waits for."""
        self._last_rx = self._now()
        for ev in events:
            if isinstance(ev, NopInReceived) and self._ping and ev.itt == self._ping.itt:
                self._ping = None
            elif isinstance(ev, TmfCompleted) and self._tmf and ev.itt == self._tmf.itt:
                self._tmf_done(self._tmf, ev.response)

    # -- the error handler ----------------------------------------------------------------

    def _eh_next(self) -> None:
        """``iscsi_eh_abort`` for the next timed-out command still active."""
        while self._eh_queue:
            req = self._eh_queue[0]
            if self._active.get(req.itt) is not req or req.response is not None:
                self._eh_queue.popleft()  # it completed meanwhile
                continue
            self._send_tmf(IscsiTmfFunc.ABORT_TASK, req, self.abort_timeout)
            return

    def _send_tmf(self, function: IscsiTmfFunc, req: IserRequest, timeout: float) -> None:
        """``iscsi_exec_task_mgmt_fn``: an immediate TMF Request; failing to
        send it escalates to session recovery."""
        lun = req.lun
        if function is IscsiTmfFunc.ABORT_TASK:
            pdu = self.conn.task_management(function, lun=lun, rtt=req.itt, refcmdsn=req.cmdsn)
        else:
            pdu = self.conn.task_management(function, lun=lun)
        if not self._post_pdu(pdu):
            self._conn_failure(f"cannot send {function.name}")
            return
        log.warning("%r: %s for ITT %#x", self, function.name, req.itt)
        self.stats[f"tmf_{function.name.lower()}"] += 1
        self._tmf = _Tmf(pdu.itt, function, lun, req, self._now() + timeout)

    def _tmf_done(self, tmf: _Tmf, response: int | None) -> None:
        """A TMF answered (``response``) or timed out (None): take the
        commands back, or escalate — ABORT TASK, LOGICAL UNIT RESET,
        session recovery (``scsi_eh_abort_cmds``, ``scsi_eh_bus_device_reset``,
        ``scsi_eh_host_reset``)."""
        self._tmf = None
        req = tmf.req
        if tmf.function is IscsiTmfFunc.ABORT_TASK:
            if req.response is not None or self._active.get(req.itt) is not req:
                # It completed meanwhile (NO_TASK): nothing to take back.
                if req in self._eh_queue:
                    self._eh_queue.remove(req)
                return
            if response == IscsiTmfResponseCode.COMPLETE:
                if req in self._eh_queue:
                    self._eh_queue.remove(req)
                self.stats["aborted"] += 1
                self._take_back(req, "abort-task")
                return
            self._send_tmf(IscsiTmfFunc.LOGICAL_UNIT_RESET, req, self.lu_reset_timeout)
            return
        if response == IscsiTmfResponseCode.COMPLETE:
            # Every task of the LU is gone at the target (no response comes).
            self.stats["lun_resets"] += 1
            for other in [r for r in self._active.values() if r.lun == tmf.lun]:
                if other.response is None:
                    if other in self._eh_queue:
                        self._eh_queue.remove(other)
                    self._take_back(other, "lun-reset")
            return
        what = "timed out" if response is None else f"answered {response:#x}"
        self._conn_failure(f"{tmf.function.name} {what}")

    # -- session recovery ---------------------------------------------------------------

    def _conn_failure(self, reason: str) -> None:
        """``iscsi_conn_failure``: tear the connection down, requeue what had
        not completed, and reopen after DefaultTime2Wait."""
        if self.state is not IserState.LOGGED_IN:
            return
        log.warning("%r: connection failed: %s", self, reason)
        self.stats["conn_failures"] += 1
        self.lost_reason = reason
        self.state = IserState.FAILED
        self._failed_at = self._now()
        neg = self.conn.negotiated
        time2wait = ISCSI_DEF_TIME2WAIT
        if neg is not None:  # iscsid's def_time2wait: the first reopen waits that long
            value = neg.values.get("DefaultTime2Wait", "")
            time2wait = float(value) if value.isdigit() else ISCSI_DEF_TIME2WAIT
        self._eh_queue.clear()
        self._tmf = None
        self._ping = None
        self._free_conn(reason)
        self._reopen_at = self._failed_at + time2wait

    def _reopen(self) -> None:
        """iscsid's ``session_conn_reopen``: a new connection and login;
        the queued commands go out on it."""
        self.stats["reopens"] += 1
        old = self.tsih
        try:
            self._connect(self.login_timeout)
        except IserInitiatorError as e:
            self._reopen_failed(str(e))
            return
        self.state = IserState.LOGGED_IN
        self.lost_reason = None
        self._last_rx = self._now()
        self.stats["reinstatements"] += 1
        log.warning("%r: session reinstated (TSIH %#x, was %#x)", self, self.tsih, old)

    def _reopen_failed(self, why: str) -> None:
        log.warning("%r: reopen failed: %s", self, why)
        self.stats["reopen_failures"] += 1
        self._reopen_at = self._now() + self.reopen_delay

    def _free_conn(self, reason: str, *, requeue: bool = True) -> None:
        """``iscsi_start_session_recovery`` + ``iser_conn_release``: the QP
        destroyed first (the device lets go of every buffer), then each
        command that had not completed taken back — answered ones complete,
        the others requeue (``requeue``) or fail — and the connection's
        resources freed."""
        ic = self._ic
        if ic is None:
            return
        ic.disconnect()
        ic.destroy_qp()
        reqs = {id(r): r for r in [*self._active.values(), *self._inv_wait.values()]}
        for req in sorted(reqs.values(), key=lambda r: r.serial):
            answered = req.response is not None and not req.taken_back
            self._release(req, key_dead=False)
            if answered:
                self._complete(req, req.error)
            elif requeue:
                self._retry_or_fail(req, req.taken_back or "session-recovery")
            else:
                self._complete(req, IserTransportError(reason, errno.ENOTCONN))
        self._active.clear()
        self._inv_wait.clear()
        self._ic = None
        ic.release()

    def _retry_or_fail(self, req: IserRequest, how: str) -> None:
        """``scsi_eh_flush_done_q``: a command taken back goes to the queue
        again while its retries last (a timed-out one uses one up)."""
        itt = req.itt
        if req.timed_out:
            req.retries -= 1
            if req.retries < 0:
                self._complete(req, IserCommandTimeout(itt, how))
                return
        self.stats["retried"] += 1
        self._requeue(req)

    def _disposition(self, req: IserRequest) -> bool:
        """Whether the midlayer sends an answered command again: BUSY while
        ``(retries + 1) * cmd_timeout`` has not passed since it was queued
        (``scsi_softirq_done``'s limit), UNIT ATTENTION while it has
        retries."""
        how = needs_retry(req)
        if how == "busy":
            if self._now() < req.submitted + (self.retries + 1) * self.cmd_timeout:
                self.stats["busy_retries"] += 1
                return True
        elif how == "retry" and req.retries > 0:
            req.retries -= 1
            self.stats["retried"] += 1
            return True
        return False

    def _requeue(self, req: IserRequest) -> None:
        """Back in the queue in submission order (``scsi_queue_insert``)."""
        req.reset()
        pos = next((i for i, r in enumerate(self._pending) if r.serial > req.serial), None)
        if pos is None:
            self._pending.append(req)
        else:
            self._pending.insert(pos, req)

    def _device_blocked(self) -> None:
        """The target was busy: hold the queue for ``SCSI_QUEUE_DELAY`` or
        until a command completes (``scsi_device_blocked``)."""
        self._blocked_until = self._now() + SCSI_QUEUE_DELAY

    def _recovery_timedout(self) -> None:
        """``iscsi_session_recovery_timedout``: fail every queued command."""
        log.error("%r: session recovery timed out after %gs", self, self.replacement_timeout)
        self.state = IserState.RECOVERY_FAILED
        self._fail_pending(
            IserTransportError(
                f"session lost ({self.lost_reason}) for {self.replacement_timeout:g}s",
                errno.ENOTCONN,
            )
        )

    def _fail_pending(self, error: IserInitiatorError) -> None:
        while self._pending:
            req = self._pending.popleft()
            req.done, req.error = True, error
            for fn in req.callbacks:
                fn(req)
