"""The iSER initiator: Linux's ``ib_iser`` under libiscsi, as a block device.

Kernel counterparts (``drivers/infiniband/ulp/iser``):

* ``iser_verbs.c`` — ``iser_connect`` / ``iser_route_handler`` (RDMA CM
  with the iSER CM header, ``struct iser_cm_hdr``: ``80 00 00 00``, zero
  based VA not supported, Send with Invalidate accepted), ``iser_create_ib_conn_res``
  (PD, CQ, QP), ``iser_alloc_fastreg_pool`` (one FR descriptor per command
  slot per direction), ``iser_connected_handler`` (remote invalidation is
  used unless the REP says 0x40), ``iser_post_recvm`` / ``iser_post_send``
  — one connection's resources are :class:`~.initiator_conn.IserConn`;
* ``iser_initiator.c`` — ``iser_send_command`` (the iSER header with RSV
  and the read STag/VA, or WSV and the write STag/VA past the immediate
  part; the immediate data as further SGEs of the SEND — ib_iser names
  them through the MR, this model through the DMA segments, see
  :meth:`IserInitiator._imm_sges`),
  ``iser_rcv_completion`` / ``iser_task_rsp`` (the receive completion's
  invalidated rkey), ``iser_send_control`` (NOP-Out, TMF, Logout);
* ``iser_memory.c`` — ``iser_dma_map_task_data`` (``ib_dma_map_sg``),
  ``iser_reg_rdma_mem`` / ``iser_fast_reg_mr`` (``ib_map_mr_sg`` +
  ``IB_WR_REG_MR`` under ``ib_inc_rkey``), ``iser_unreg_mem_fastreg`` and
  ``iser_inv_rkey`` (``IB_WR_LOCAL_INV`` unless the target invalidated the
  key with SEND_WITH_INV), ``iser_dma_unmap_task_data``;
* libiscsi — the CmdSN window (``iscsi_check_cmdsn_window_closed``: a
  command waits until MaxCmdSN moves), the task table, logout; the sans-IO
  machine is :class:`~softrdma.ulp.iscsi.session.IscsiInitiatorConnection`;
  the error handler, the NOP-Out pings and session recovery at
  ErrorRecoveryLevel 0 are :mod:`.initiator_recovery`'s.

Data buffers are the block layer's pages (``GFP_HIGHUSER`` with
``highmem``), the CPU touching them only under a short ``kmap`` while it
copies (:class:`~softrdma.ulp.srp.initiator_map.SrpBuffer`), never while
the device owns them.

Progress: as :class:`~softrdma.ulp.srp.initiator.SrpInitiator`, blocking
calls poll the CQ and the RDMA CM channel and wait on the device (which
runs the simulation on simulated time), under the device's lock.
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from softrdma.cm.cma import RdmaCmError, RdmaCmEvent, RdmaCmEventType, RdmaEventChannel
from softrdma.memory.layout import PAGE_SIZE
from softrdma.ulp.iscsi.negotiate import linux_iser_initiator
from softrdma.ulp.iscsi.proto import IscsiError, IscsiPdu
from softrdma.ulp.iscsi.session import (
    CommandCompleted,
    IscsiInitiatorConnection,
    IscsiLoginError,
    LoggedOut,
    LoginCompleted,
    NopInReceived,
    TaskRejected,
    TmfCompleted,
)
from softrdma.ulp.iser.initiator_conn import (
    K_CTRL,
    K_INV,
    K_REG,
    K_SEND,
    TX_SIZE,
    IserConn,
    wr_id,
)
from softrdma.ulp.iser.initiator_disk import IserDisk
from softrdma.ulp.iser.initiator_errors import (
    IserCommandTimeout,
    IserConnectError,
    IserInitiatorError,
    IserLoginRejected,
    IserTransportError,
)
from softrdma.ulp.iser.initiator_memory import imm_sges, map_task_data, unmap_task_data
from softrdma.ulp.iser.initiator_recovery import (
    ISCSI_CONN_ERR_REOPEN_DELAY,
    ISCSI_DEF_ABORT_TIMEOUT,
    ISCSI_DEF_LU_RESET_TIMEOUT,
    ISCSI_DEF_NOOP_OUT_INTERVAL,
    ISCSI_DEF_NOOP_OUT_TIMEOUT,
    ISCSI_DEF_REPLACEMENT_TIMEOUT,
    SD_MAX_RETRIES,
    SD_TIMEOUT,
    IserErrorHandler,
    IserState,
)
from softrdma.ulp.iser.initiator_task import IserIo, IserRequest
from softrdma.ulp.iser.proto import ISER_HDR_LEN, IserError, IserFlag, IserHdr, encode_iser_send
from softrdma.ulp.iu import IuMapError
from softrdma.ulp.progress import service_until
from softrdma.verbs.device import IbDevice
from softrdma.verbs.enums import (
    IbAccess,
    IbPdFlags,
    IbSendFlags,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.mr import ib_inc_rkey
from softrdma.verbs.wr import RegWR, SendWR, Sge, WorkCompletion

__all__ = [
    "ISER_DEF_CAN_QUEUE",
    "ISER_DEF_MAX_SECTORS",
    "IserCommandTimeout",
    "IserConnectError",
    "IserInitiator",
    "IserInitiatorError",
    "IserIo",
    "IserLoginRejected",
    "IserRequest",
    "IserState",
    "IserTransportError",
]

log = logging.getLogger(__name__)

DEFAULT_IQN = "iqn.2003-01.org.linux-iscsi.softrdma:disk"
ISER_DEF_CAN_QUEUE = 16
"""Commands in flight (``iser_cmds_max`` is 512 in Linux; small here for the
swiotlb bounce pool)."""
ISER_DEF_MAX_SECTORS = 1024
"""``iser_max_sectors``: 512 KiB per command."""
ISCSI_DEF_LOGIN_TIMEOUT = 15.0
"""open-iscsi ``node.conn[0].timeo.login_timeout``."""


class IserInitiator(IserDisk, IserErrorHandler):
    """An iSER session to ``dest:port`` for ``target_name`` (ib_iser +
    libiscsi + open-iscsi's login and session recovery). :meth:`login`
    connects and logs in; then the block API (:meth:`read`, :meth:`write`,
    :meth:`submit_read`, :meth:`submit_write`, :meth:`wait_io`,
    :meth:`wait_any`, :meth:`wait_for`, :meth:`sync`, :meth:`inquiry`,
    :meth:`read_capacity`); :meth:`logout`; :meth:`close` frees everything.

    ``send_w_inv`` False sends the CM header 0xC0 (refusing Send with
    Invalidate), so every key is invalidated locally. ``timeout`` bounds
    each blocking call (None: until its commands end, which the recovery
    knobs bound); ``login_timeout`` each connect and login.

    Recovery, with open-iscsi's and the midlayer's names and defaults:
    ``cmd_timeout`` (sd's 30 s request timer), ``retries`` (sd's 5),
    ``abort_timeout`` (15 s), ``lu_reset_timeout`` (30 s),
    ``replacement_timeout`` (120 s), ``noop_out_interval`` /
    ``noop_out_timeout`` (5 s / 5 s; 0 disables the pings) and
    ``reopen_delay`` (iscsid's 3 s between failed reopen attempts); see
    :mod:`.initiator_recovery`."""

    def __init__(
        self,
        dev: IbDevice,
        dest: str,
        port: int = 3260,
        *,
        target_name: str = DEFAULT_IQN,
        initiator_name: str | None = None,
        isid: int = 0x00023D000001,
        lun: int = 0,
        can_queue: int = ISER_DEF_CAN_QUEUE,
        max_sectors: int = ISER_DEF_MAX_SECTORS,
        highmem: bool = True,
        send_w_inv: bool = True,
        timeout: float | None = 60.0,
        login_timeout: float = ISCSI_DEF_LOGIN_TIMEOUT,
        cmd_timeout: float = SD_TIMEOUT,
        retries: int = SD_MAX_RETRIES,
        abort_timeout: float = ISCSI_DEF_ABORT_TIMEOUT,
        lu_reset_timeout: float = ISCSI_DEF_LU_RESET_TIMEOUT,
        replacement_timeout: float = ISCSI_DEF_REPLACEMENT_TIMEOUT,
        noop_out_interval: float = ISCSI_DEF_NOOP_OUT_INTERVAL,
        noop_out_timeout: float = ISCSI_DEF_NOOP_OUT_TIMEOUT,
        reopen_delay: float = ISCSI_CONN_ERR_REOPEN_DELAY,
    ) -> None:
        if can_queue < 1:
            raise ValueError(f"can_queue {can_queue} must be positive")
        if retries < 0:
            raise ValueError(f"retries {retries} must not be negative")
        for name, value in (
            ("login_timeout", login_timeout),
            ("cmd_timeout", cmd_timeout),
            ("abort_timeout", abort_timeout),
            ("lu_reset_timeout", lu_reset_timeout),
            ("replacement_timeout", replacement_timeout),
            ("reopen_delay", reopen_delay),
        ):
            if not value > 0:
                raise ValueError(f"{name} {value} must be positive")
        if noop_out_interval < 0 or (noop_out_interval > 0 and not noop_out_timeout > 0):
            raise ValueError("noop_out_interval must be >= 0, and noop_out_timeout positive")
        self.dev = dev
        self.host = dev.host
        self.dest = dest
        self.port = port
        self.target_name = target_name
        self.initiator_name = initiator_name or f"iqn.2005-03.org.open-iscsi:{dev.host.name}"
        self.isid = isid
        self.lun = lun
        self.can_queue = can_queue
        self.highmem = highmem
        self.send_w_inv = send_w_inv
        self.timeout = timeout
        self.login_timeout = login_timeout
        self.cmd_timeout = cmd_timeout
        self.retries = retries
        self.abort_timeout = abort_timeout
        self.lu_reset_timeout = lu_reset_timeout
        self.replacement_timeout = replacement_timeout
        self.noop_out_interval = noop_out_interval
        self.noop_out_timeout = noop_out_timeout
        self.reopen_delay = reopen_delay
        pages = min(max_sectors * 512 // PAGE_SIZE, dev.attrs.max_fast_reg_page_list_len)
        self.max_pages = max(1, pages)
        self.max_transfer = self.max_pages * PAGE_SIZE
        self.stats: Counter[str] = Counter()
        self.conn = self._new_iscsi(0)
        self.state = IserState.FREE
        self.lost_reason: str | None = None
        self.remote_inv = False
        self.login_result: LoginCompleted | None = None
        self.tsih_history: list[int] = []
        """The TSIH of each login, the first and every reinstatement."""
        self._lock = dev.lock
        self._ch = RdmaEventChannel(self.host)
        self._ic: IserConn | None = None
        self._connecting: IserConn | None = None
        self._cm_events: list[RdmaCmEvent] = []
        self._login_error: IserInitiatorError | None = None
        self._logging_out = False
        self._in_service = False
        self.pd = dev.alloc_pd(IbPdFlags(0))
        self._pd_alive = True
        self._pending: deque[IserRequest] = deque()
        self._active: dict[int, IserRequest] = {}
        self._inv_wait: dict[int, IserRequest] = {}
        self._events: list[object] = []
        self._nops: set[int] = set()
        self._ids = itertools.count(1)
        self._serials = itertools.count(1)
        self._capacity: tuple[int, int] | None = None
        self._eh_init()

    def __repr__(self) -> str:
        return f"<IserInitiator {self.dest}:{self.port} {self.state.value} {self.conn!r}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether an RDMA connection is up."""
        return self._ic is not None and self._ic.established and not self._ic.disconnected

    @property
    def logged_in(self) -> bool:
        return self.state is IserState.LOGGED_IN

    @property
    def tsih(self) -> int:
        """The session's TSIH (0 before the first login)."""
        return self.tsih_history[-1] if self.tsih_history else 0

    def _new_iscsi(self, cmdsn: int) -> IscsiInitiatorConnection:
        negotiator = linux_iser_initiator(self.initiator_name, self.target_name)
        return IscsiInitiatorConnection(
            negotiator, isid=self.isid, cmdsn=cmdsn, itt_pool=self.can_queue + 16
        )

    # -- connection and login (iser_connect, iscsi login) ------------------------------------

    def login(self) -> LoginCompleted:
        """Connect through the RDMA CM with the iSER CM header and log in
        (one Login Request, operational stage to full feature phase);
        raises :class:`IserLoginRejected` or :class:`IserConnectError`."""
        with self._lock:
            if self.state is not IserState.FREE:
                raise IserInitiatorError(f"cannot log in: {self.state.value}", errno.EISCONN)
            ev = self._connect(self.login_timeout)
            self.state = IserState.LOGGED_IN
            self._last_rx = self._now()
            self.stats["logins"] += 1
            return ev

    def _connect(self, timeout: float) -> LoginCompleted:
        """``iscsi_iser_ep_connect`` + iscsid's login: resolve, connect with
        a fresh :class:`IserConn`, log in with the session's ISID (TSIH 0:
        a new session, or the reinstatement of the old one)."""
        deadline = self._now() + timeout
        ic = IserConn(
            self.dev, self.pd, self._ch, self._new_iscsi(self.conn.cmdsn), self.can_queue,
            self.max_pages,
        )  # fmt: skip
        self._connecting, self._cm_events = ic, []
        self._reset_login()
        try:
            E = RdmaCmEventType
            ic.cid.resolve_addr(self.dest, self.port)
            self._cm_expect(E.ADDR_RESOLVED, deadline)
            ic.cid.resolve_route()
            self._cm_expect(E.ROUTE_RESOLVED, deadline)
            ic.create_ib_conn_res()
            ic.connect(self.send_w_inv)
            ev = self._cm_expect(E.ESTABLISHED, deadline)
            rep = ev.param.private_data if ev.param else b""
            ic.established = True
            # iser_connected_handler: remote invalidation unless the target says 0x40.
            ic.remote_inv = self.send_w_inv and not (rep[:1] and rep[0] & 0x40)
            self._ic = ic
            if not self._post_pdu(ic.iscsi.login()):
                raise IserConnectError("login failed: cannot post the Login Request")
            self._wait(
                lambda: (
                    self.login_result is not None
                    or self._login_error is not None
                    or ic.disconnected
                ),
                max(0.0, deadline - self._now()),
            )
            if self.login_result is None:
                why = "connection lost" if ic.disconnected else "no Login Response"
                raise self._login_error or IserConnectError(f"login failed: {why}", errno.ETIMEDOUT)
        except (RdmaCmError, VerbsError, IuMapError) as e:
            self._drop_conn(ic)
            raise IserConnectError(f"login failed: {e}", getattr(e, "errno", errno.EIO)) from e
        except BaseException:
            self._drop_conn(ic)
            raise
        finally:
            self._connecting = None
        self.conn = ic.iscsi
        self.remote_inv = ic.remote_inv
        self.tsih_history.append(self.login_result.tsih)
        return self.login_result

    def _reset_login(self) -> None:
        self.login_result, self._login_error = None, None

    def _drop_conn(self, ic: IserConn) -> None:
        if self._ic is ic:
            self._ic = None
        ic.release()

    def _cm_expect(self, kind: RdmaCmEventType, deadline: float) -> RdmaCmEvent:
        if not self._wait(lambda: bool(self._cm_events), max(0.0, deadline - self._now())):
            raise IserConnectError(
                f"login failed: no {kind.name} from {self.dest}:{self.port}", errno.ETIMEDOUT
            )
        ev = self._cm_events.pop(0)
        if ev.event is not kind:
            raise IserConnectError(
                f"login failed: RDMA CM {ev.event.name}, expected {kind.name}", errno.ECONNREFUSED
            )
        return ev

    # -- the block API -------------------------------------------------------------------------

    def submit(
        self, cdb: bytes, *, read_length: int = 0, write_data: bytes = b"", lun: int | None = None
    ) -> IserRequest:
        """Queue one SCSI command (``iscsi_queuecommand``). While the session
        is recovering it waits; after ``replacement_timeout`` it fails at
        once with :class:`IserTransportError`."""
        with self._lock:
            if self.state in (IserState.FREE, IserState.TERMINATE):
                raise IserInitiatorError("not logged in", errno.ENOTCONN)
            if read_length > self.max_transfer or len(write_data) > self.max_transfer:
                raise ValueError(f"more than {self.max_transfer} bytes in one command")
            req = IserRequest(
                cdb,
                self.lun if lun is None else lun,
                read_length,
                bytes(write_data),
                serial=next(self._serials),
                retries=self.retries,
                submitted=self._now(),
            )
            if self.state is IserState.RECOVERY_FAILED:
                req.done = True
                req.error = IserTransportError(f"session lost: {self.lost_reason}", errno.ENOTCONN)
                return req
            self._pending.append(req)
            self._dispatch()  # blk_mq_run_hw_queues; completions are reaped while waiting
            return req

    def wait_for(self, pred: Callable[[], bool], timeout: float | None = None) -> bool:
        """Drive progress (completions, CM events, timers, recovery) until
        ``pred()`` holds or ``timeout`` seconds pass (default
        :attr:`timeout`; simulated seconds on simulated time); whether it
        holds (as :meth:`SrpInitiator.wait_for
        <softrdma.ulp.srp.initiator.SrpInitiator.wait_for>`)."""
        with self._lock:
            return self._wait(pred, self.timeout if timeout is None else timeout)

    def wait_io(self, ios: IserIo | Sequence[IserIo], timeout: float | None = None) -> bool:
        """Wait for every one of ``ios`` to end (completed or failed);
        whether they all did within ``timeout``."""
        ios = [ios] if isinstance(ios, IserIo) else list(ios)
        return self.wait_for(lambda: all(io.done for io in ios), timeout)

    def wait_any(self, ios: Sequence[IserIo], timeout: float | None = None) -> list[IserIo]:
        """Wait until at least one of ``ios`` has ended (the block layer's
        completion of any request in a queue kept full); those that have,
        in the order given ([] if none did within ``timeout``)."""
        self.wait_for(lambda: any(io.done for io in ios), timeout)
        return [io for io in ios if io.done]

    def poll(self) -> None:
        """Process whatever completions, events and timers are due, without
        waiting."""
        with self._lock:
            self._service()

    def nop(self, data: bytes = b"") -> bytes:
        """A NOP-Out ping; the NOP-In's data."""
        with self._lock:
            if self.state is not IserState.LOGGED_IN:
                raise IserInitiatorError(f"cannot ping: {self.state.value}", errno.ENOTCONN)
            pdu = self.conn.nop_out(data)
            if not self._post_pdu(pdu):
                raise IserInitiatorError("no control descriptor free", errno.EAGAIN)
            self._nops.add(pdu.itt)

            def answer() -> NopInReceived | None:
                return next(
                    (e for e in self._events if isinstance(e, NopInReceived) and e.itt == pdu.itt),
                    None,
                )

            # Bounded even without a timeout: with the pings off nothing else ends the wait.
            bound = self.timeout if self.timeout is not None else self.login_timeout
            if not self._wait(lambda: answer() is not None or not self.logged_in, bound):
                raise IserInitiatorError("no NOP-In", errno.ETIMEDOUT)
            ev = answer()
            if ev is None:
                raise IserTransportError(f"connection lost: {self.lost_reason}", errno.ENOTCONN)
            self._events.remove(ev)
            return ev.data

    @property
    def outstanding(self) -> int:
        """Commands sent or queued."""
        return len(self._active) + len(self._pending)

    @property
    def queued(self) -> int:
        """Commands waiting to be sent (window, descriptors, recovery)."""
        return len(self._pending)

    # -- logout and close ----------------------------------------------------------------------

    def logout(self) -> None:
        """Drain, send the Logout Request, wait for its response and for the
        target's disconnect (open-iscsi's logout), then :meth:`close`."""
        with self._lock:
            if self.state in (IserState.LOGGED_IN, IserState.FAILED):
                self._wait(
                    lambda: not self.outstanding or self.state is IserState.RECOVERY_FAILED,
                    self.timeout,
                )
            ic = self._ic
            if self.state is IserState.LOGGED_IN and ic is not None:
                self._logging_out = True
                if self._post_pdu(self.conn.logout()):
                    self._wait(
                        lambda: (
                            any(isinstance(e, LoggedOut) for e in self._events) or ic.disconnected
                        ),
                        self.login_timeout,
                    )
                    self._wait(lambda: ic.disconnected, 10.0)
                    self.stats["logouts"] += 1
            self.close()

    def close(self) -> None:
        """Tear everything down: disconnect, destroy the QP and CQ, deregister
        the MRs, unmap and free every buffer (``iser_conn_release``); what
        had not completed fails with :class:`IserTransportError`."""
        with self._lock:
            self.state = IserState.TERMINATE
            self._free_conn("session closed", requeue=False)
            self._fail_pending(IserTransportError("session closed", errno.ESHUTDOWN))
            if self._pd_alive:
                self._pd_alive = False
                self.pd.dealloc()

    # -- progress ------------------------------------------------------------------------------

    def _has_events(self) -> bool:
        ic = self._ic
        return len(self._ch) > 0 or (ic is not None and ic.cq is not None and len(ic.cq) > 0)

    def _wait(self, pred: Callable[[], bool], timeout: float | None) -> bool:
        """Service until ``pred()`` or ``timeout`` seconds (None: no bound)."""

        def next_timer() -> float | None:
            quiet = self._connecting is not None or self._logging_out
            return None if quiet else self._next_timer()

        return service_until(
            self.dev, self._service, pred, timeout, wake=self._has_events, next_timer=next_timer
        )

    def _wait_reqs(self, reqs: Sequence[IserRequest]) -> None:
        with self._lock:
            if not self._wait(lambda: all(r.done for r in reqs), self.timeout):
                left = sum(not r.done for r in reqs)
                raise IserInitiatorError(f"timed out: {left} commands", errno.ETIMEDOUT)

    def _service(self) -> None:
        """One pass: CM events, completions, then (outside a login) the
        timers, recovery and dispatch."""
        self._pump_cm()
        self._poll_cq()
        if self._connecting is not None or self._in_service:
            return
        self._in_service = True
        try:
            if not self._logging_out:
                self._check_timers()
            self._dispatch()
        finally:
            self._in_service = False

    def _pump_cm(self) -> None:
        while len(self._ch):
            ev = self._ch.get_cm_event(0)
            ic = self._connecting
            if ic is not None and ev.id is ic.cid and not ic.established:
                self._cm_events.append(ev)
                continue
            ic = self._ic
            if ic is None or ev.id is not ic.cid:
                continue  # a connection already released
            if ev.event in (RdmaCmEventType.DISCONNECTED, RdmaCmEventType.DEVICE_REMOVAL):
                ic.disconnected = True
                if not self._logging_out:
                    self._conn_failure(f"RDMA CM {ev.event.name}")

    def _poll_cq(self) -> None:
        ic = self._ic
        while ic is not None and self._ic is ic and ic.cq is not None and len(ic.cq):
            for wc in ic.cq.poll(32):
                if self._ic is not ic:
                    break  # the connection failed and was released meanwhile
                self._completion(ic, wc)

    def _completion(self, ic: IserConn, wc: WorkCompletion) -> None:
        kind, ident = wc.wr_id & 0xF, wc.wr_id >> 4
        if wc.status is not IbWcStatus.SUCCESS:
            self.stats["wc_errors"] += 1
            ic.disconnected = True  # a login in progress fails
            if not self._logging_out:
                self._conn_failure(f"work completion {wc.status.name} ({wc.opcode.name})")
            return
        if wc.opcode is IbWcOpcode.RECV:
            self._recv(ic, ident, wc)
        elif kind == K_SEND:
            req = self._active.get(ident)
            if req is not None:
                req.send_done = True
                self._maybe_release(req)
        elif kind == K_INV:
            req = self._inv_wait.pop(ident, None)
            if req is not None:
                req.inv_pending = False
                self._maybe_release(req)
        elif kind == K_CTRL:
            ic.ctrl_done(ident)

    def _recv(self, ic: IserConn, index: int, wc: WorkCompletion) -> None:
        """``iser_task_rsp``: decode, hand the PDU to libiscsi, repost."""
        data = ic.rx[index].read(wc.byte_len)
        inv = wc.invalidate_rkey if wc.wc_flags & IbWcFlags.WITH_INVALIDATE else 0
        ic.repost_recv(index)
        try:
            IserHdr.decode(data)
            step = ic.iscsi.receive(data[ISER_HDR_LEN:])
        except IscsiLoginError as e:
            self._login_error = IserLoginRejected(
                f"login failed: {e}", e.status_class, e.status_detail
            )
            return
        except (IscsiError, IserError) as e:  # libiscsi fails the connection
            why = f"{type(e).__name__}: {e}"
            ic.disconnected = True
            self._login_error = IserConnectError(f"login failed: {why}", errno.EPROTO)
            self._conn_failure(why)
            return
        for pdu in step.pdus:  # the answers to the target's pings
            self._post_pdu(pdu)
        if self.state is IserState.LOGGED_IN:
            self._received(step.events)
        for ev in step.events:
            if isinstance(ev, LoginCompleted):
                self.login_result = ev
            elif isinstance(ev, CommandCompleted):
                req = self._active.get(ev.itt)
                if req is None:
                    continue
                req.response, req.invalidated = ev, inv
                if inv:
                    self.stats["remote_inv"] += 1
                self._maybe_release(req)
            elif isinstance(ev, TaskRejected):
                req = self._active.get(ev.itt) if ev.itt is not None else None
                if req is not None and req.response is None and not req.taken_back:
                    # Never started at the target: sent again under a new ITT
                    # while its retries last (the reject freed the ITT).
                    log.warning("%r: command ITT %#x rejected (%#x)", self, req.itt, ev.reason)
                    self.stats["rejected"] += 1
                    req.error = IserTransportError(f"command rejected: reason {ev.reason:#x}")
                    self._take_back(req, "reject")
            elif isinstance(ev, NopInReceived):
                if ev.itt in self._nops:  # a ping of nop(); the others are the monitor's
                    self._nops.discard(ev.itt)
                    self._events.append(ev)
            elif not isinstance(ev, TmfCompleted):
                self._events.append(ev)

    def _post_pdu(self, pdu: IscsiPdu) -> bool:
        """``iser_send_control`` on the current connection; False if it
        cannot be posted."""
        ic = self._ic
        if ic is None or ic.qp is None:
            return False
        try:
            return ic.post_ctrl(pdu, next(self._ids))
        except VerbsError as e:
            log.warning("%r: cannot post %s: %s", self, type(pdu).__name__, e)
            return False

    # -- commands (iser_send_command, iser_reg_rdma_mem) ----------------------------------------

    def _dispatch(self) -> None:
        """``iscsi_xmitworker``: start queued commands while the CmdSN window
        is open and a TX descriptor and an FR descriptor are free."""
        ic = self._ic
        if self._blocked_until and self._now() < self._blocked_until:
            return  # scsi_device_blocked after BUSY
        while self._pending and self.state is IserState.LOGGED_IN and ic is self._ic:
            assert ic is not None and ic.pool is not None
            if not self.conn.window_open():  # iscsi_check_cmdsn_window_closed
                self.stats["window_closed"] += 1
                return
            if not ic.free_tx or not ic.pool.free:
                return
            req = self._pending.popleft()
            if not self._start(ic, req):
                if self._active:  # host busy: retried when a command completes
                    self._pending.appendleft(req)
                    return
                self._complete(req, IserTransportError("cannot map the data buffer", errno.ENOMEM))

    def _start(self, ic: IserConn, req: IserRequest) -> bool:
        """``iscsi_prep_scsi_cmd_pdu`` + ``iser_send_command``: map and
        register the buffer, then post REG_MR and the command's SEND (the
        immediate data further SGEs in the registered buffer)."""
        assert ic.qp is not None
        length = req.read_length or len(req.write_data)
        if length and not map_task_data(self.dev, ic, req, length, self.highmem, self.stats):
            return False
        wrs: list[SendWR | RegWR] = []
        hdr = IserHdr()
        data_sges: tuple[Sge, ...] = ()
        pdu = self.conn.send_command(
            req.cdb, lun=req.lun, read_length=req.read_length, write_data=req.write_data
        )
        req.itt, req.cmdsn = pdu.itt, pdu.cmdsn
        fr = req.fr
        if fr is not None:
            fr.key = ib_inc_rkey(fr.key)
            if req.read_length:
                access = IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE
            else:
                access = IbAccess.LOCAL_WRITE | IbAccess.REMOTE_READ
            reg = RegWR(
                wr_id(K_REG, pdu.itt), IbWrOpcode.REG_MR, mr=fr.mr, key=fr.key, access=access
            )
            wrs.append(reg)
            self.stats["reg_mr"] += 1
            if req.read_length:
                hdr = IserHdr(IserFlag.RSV, read_stag=fr.key, read_va=fr.mr.iova)
                self.stats["reads"] += 1
            else:
                imm = len(pdu.data)
                if imm < length:  # the rest by RDMA READ, past the immediate part
                    hdr = IserHdr(IserFlag.WSV, write_stag=fr.key, write_va=fr.mr.iova + imm)
                if imm:
                    data_sges = imm_sges(req, imm, ic.lkey)
                self.stats["writes"] += 1
        raw = encode_iser_send(hdr, pdu)[:TX_SIZE]
        tx = ic.free_tx.pop()
        req.tx = tx
        tx.write(raw)
        sges = (tx.sge(ic.lkey, TX_SIZE), *data_sges)
        wrs.append(SendWR(wr_id(K_SEND, pdu.itt), IbWrOpcode.SEND, sges, IbSendFlags.SIGNALED))
        self._active[pdu.itt] = req
        req.deadline = self._now() + self.cmd_timeout  # blk_add_timer
        self.stats["commands"] += 1
        # commands the target has not answered: never more than the window
        waiting = len(self.conn.outstanding)
        self.stats["max_unanswered"] = max(self.stats["max_unanswered"], waiting)
        try:
            ic.qp.post_send(wrs)
        except VerbsError as e:  # the QP failed: the command is requeued with the others
            self._conn_failure(f"post_send: {e}")
        return True

    def _take_back(self, req: IserRequest, how: str) -> None:
        """A TMF took the command from the target: release it (after the
        local invalidation of its key) and send it again or fail it."""
        req.taken_back = how
        self._maybe_release(req)

    def _maybe_release(self, req: IserRequest) -> None:
        """``iser_task_rsp`` → ``iser_unreg_mem_fastreg``: once the SEND and
        the response (or the TMF) completed, invalidate the key unless the
        target did, then unmap and complete."""
        if req.done or req.inv_pending or not req.send_done:
            return
        if req.response is None and not req.taken_back:
            return
        fr, ic = req.fr, self._ic
        if fr is not None and req.invalidated != fr.key:
            if req.invalidated:
                log.warning("%r: invalidated rkey %#x is not ours", self, req.invalidated)
            assert ic is not None and ic.qp is not None
            req.inv_pending = True
            req.invalidated = fr.key  # once
            ident = next(self._ids)
            self._inv_wait[ident] = req
            self.stats["local_inv"] += 1
            inv = SendWR(
                wr_id(K_INV, ident), IbWrOpcode.LOCAL_INV, (), IbSendFlags.SIGNALED,
                invalidate_rkey=fr.key,
            )  # fmt: skip
            try:
                ic.qp.post_send([inv])
            except VerbsError as e:
                self._conn_failure(f"post_send: {e}")
            return
        self._release(req, key_dead=True)
        if req.taken_back == "reject" and req.retries <= 0:
            self._complete(req, req.error)
        elif req.taken_back == "reject":
            req.retries -= 1
            self._retry_or_fail(req, req.taken_back)
        elif req.taken_back:
            self._retry_or_fail(req, req.taken_back)
        elif req.error is None and self._disposition(req):
            self._device_blocked()  # the queue waits a moment
            self._requeue(req)
        else:
            self._complete(req, req.error)

    def _release(self, req: IserRequest, *, key_dead: bool) -> None:
        """``iser_dma_unmap_task_data``: the buffer unmapped (read data
        copied out first), the FR descriptor back in the pool if its key is
        invalid, the TX descriptor and the ITT freed."""
        if self._active.get(req.itt) is req:
            del self._active[req.itt]
            if req.taken_back not in ("", "reject") and req.itt in self.conn.outstanding:
                self.conn.task_aborted(req.itt)  # (a Reject freed the ITT already)
        for k in [k for k, r in self._inv_wait.items() if r is req]:
            del self._inv_wait[k]
        ic = self._ic
        unmap_task_data(self.dev, req)
        if req.fr is not None:
            if key_dead and ic is not None and ic.pool is not None:
                ic.pool.put([req.fr])
            req.fr = None
        if req.tx is not None:
            if ic is not None and req.tx in ic.tx:
                ic.free_tx.append(req.tx)
            req.tx = None

    def _complete(self, req: IserRequest, error: Exception | None) -> None:
        rsp = req.response
        req.error = error
        if rsp is not None:
            req.status, req.sense = rsp.status, rsp.sense
        req.done = True
        self._blocked_until = 0.0  # a completion restarts a busy queue
        self.stats["completed"] += 1
        for fn in req.callbacks:
            fn(req)
