"""The iSER initiator: Linux's ``ib_iser`` under libiscsi, as a block device.

Kernel counterparts (``drivers/infiniband/ulp/iser``):

* ``iser_verbs.c`` — ``iser_connect`` / ``iser_route_handler`` (RDMA CM
  with the iSER CM header, ``struct iser_cm_hdr``: ``80 00 00 00``, zero
  based VA not supported, Send with Invalidate accepted), ``iser_create_ib_conn_res``
  (PD, CQ, QP), ``iser_alloc_fastreg_pool`` (one FR descriptor per command
  slot per direction), ``iser_connected_handler`` (remote invalidation is
  used unless the REP says 0x40), ``iser_post_recvm`` / ``iser_post_send``;
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
  machine is :class:`~softrdma.ulp.iscsi.session.IscsiInitiatorConnection`.

Data buffers are the block layer's pages (``GFP_HIGHUSER`` with
``highmem``), the CPU touching them only under a short ``kmap`` while it
copies (:class:`~softrdma.ulp.srp.initiator_map.SrpBuffer`), never while
the device owns them.

Progress: as :class:`~softrdma.ulp.srp.initiator.SrpInitiator`, blocking
calls poll the CQ and the RDMA CM channel and wait on the device (which
runs the simulation on simulated time).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from softrdma.cm.cma import RdmaCmEvent, RdmaCmEventType, RdmaCmId, RdmaConnParam, RdmaEventChannel
from softrdma.dma.types import DMA_FROM_DEVICE, DMA_TO_DEVICE, DmaDirection
from softrdma.memory.layout import PAGE_SIZE
from softrdma.ulp.iscsi.negotiate import linux_iser_initiator
from softrdma.ulp.iscsi.proto import IscsiPdu
from softrdma.ulp.iscsi.session import (
    CommandCompleted,
    IscsiInitiatorConnection,
    LoggedOut,
    LoginCompleted,
    NopInReceived,
    TaskRejected,
)
from softrdma.ulp.iser.proto import ISER_HDR_LEN, IserCmHdr, IserFlag, IserHdr, encode_iser_send
from softrdma.ulp.iu import IuBuf, alloc_iu_ring, free_iu_ring
from softrdma.ulp.scsi import ScsiStatus
from softrdma.ulp.srp.initiator_map import FrDesc, FrPool, SrpBuffer
from softrdma.ulp.srp.initiator_scsi import (
    Inquiry,
    cdb_inquiry,
    cdb_read,
    cdb_read_capacity_10,
    cdb_synchronize_cache,
    cdb_write,
    parse_inquiry,
    parse_read_capacity_10,
    status_error,
)
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_unmap_sg
from softrdma.verbs.enums import (
    IbAccess,
    IbPdFlags,
    IbQpType,
    IbSendFlags,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.mr import ib_inc_rkey
from softrdma.verbs.qp import QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import RecvWR, RegWR, SendWR, Sge, WorkCompletion

__all__ = [
    "ISER_DEF_CAN_QUEUE",
    "ISER_DEF_MAX_SECTORS",
    "IserInitiator",
    "IserInitiatorError",
    "IserIo",
    "IserRequest",
]

log = logging.getLogger(__name__)

DEFAULT_IQN = "iqn.2003-01.org.linux-iscsi.softrdma:disk"
ISER_DEF_CAN_QUEUE = 16
"""Commands in flight (``iser_cmds_max`` is 512 in Linux; small here for the
swiotlb bounce pool)."""
ISER_DEF_MAX_SECTORS = 1024
"""``iser_max_sectors``: 512 KiB per command."""
_RX_DATA = 8192
"""The receive descriptor's data segment (``ISER_RX_PAYLOAD_SIZE``'s part;
what we declare in MaxRecvDataSegmentLength terms for responses)."""
_TX_SIZE = ISER_HDR_LEN + 48
"""``struct iser_tx_desc``: the iSER header and the BHS; data goes as a
second SGE."""
_TX_CTRL = ISER_HDR_LEN + 48 + _RX_DATA

_MAX_SEND_SGE = 4
"""The BHS descriptor and up to three segments of immediate data."""

_K_SEND, _K_REG, _K_INV, _K_RECV, _K_CTRL = range(5)


def _wr_id(kind: int, ident: int) -> int:
    return ident << 4 | kind


class IserInitiatorError(Exception):
    """The session failed (connection lost, login refused, protocol error)."""


@dataclass(eq=False)
class IserRequest:
    """One SCSI command in flight (``struct iscsi_task`` with its
    ``iscsi_iser_task``): the buffer, its FR descriptor and key, and what
    is still missing before it can be released."""

    cdb: bytes
    lun: int
    read_length: int
    write_data: bytes
    buf: SrpBuffer | None = None
    direction: DmaDirection | None = None
    fr: FrDesc | None = None
    tx: IuBuf | None = None
    itt: int = -1
    send_done: bool = False
    response: CommandCompleted | None = None
    invalidated: int = 0
    inv_pending: bool = False
    done: bool = False
    status: int = -1
    sense: bytes = b""
    data: bytes = b""
    error: Exception | None = None
    callbacks: list[Callable[[IserRequest], None]] = field(default_factory=list)

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

    @property
    def done(self) -> bool:
        return all(r.done for r in self.requests)

    def result(self) -> bytes | None:
        """The bytes read (``None`` for a write)."""
        parts = [r.result() for r in self.requests]
        return None if self.is_write else b"".join(parts)


class IserInitiator:
    """An iSER session to ``dest:port`` for ``target_name`` (ib_iser +
    libiscsi + open-iscsi's login). :meth:`login` connects and logs in;
    then the block API (:meth:`read`, :meth:`write`, :meth:`submit_read`,
    :meth:`submit_write`, :meth:`wait_io`, :meth:`sync`, :meth:`inquiry`,
    :meth:`read_capacity`); :meth:`logout`; :meth:`close` frees everything.

    ``send_w_inv`` False sends the CM header 0xC0 (refusing Send with
    Invalidate), so every key is invalidated locally."""

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
        timeout: float = 60.0,
    ) -> None:
        if can_queue < 1:
            raise ValueError(f"can_queue {can_queue} must be positive")
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
        pages = min(max_sectors * 512 // PAGE_SIZE, dev.attrs.max_fast_reg_page_list_len)
        self.max_pages = max(1, pages)
        self.max_transfer = self.max_pages * PAGE_SIZE
        self.stats: Counter[str] = Counter()
        self.conn = IscsiInitiatorConnection(
            linux_iser_initiator(self.initiator_name, target_name),
            isid=isid,
            itt_pool=can_queue + 16,
        )
        self.remote_inv = False
        self.connected = False
        self.logged_in = False
        self.login_result: LoginCompleted | None = None
        self._ch = RdmaEventChannel(self.host)
        self._cid: RdmaCmId | None = None
        self._qp: QueuePair | None = None
        self._cq: CompletionQueue | None = None
        self.pd = dev.alloc_pd(IbPdFlags(0))
        self._lkey = self.pd.local_dma_lkey
        # iser_alloc_fastreg_pool: a descriptor per command per direction
        # (one direction per command here, so one each).
        self._pool = FrPool(dev, self.pd, can_queue, self.max_pages)
        self._rx: list[IuBuf] = []
        self._tx: list[IuBuf] = []
        self._free_tx: list[IuBuf] = []
        self._ctrl: list[IuBuf] = []
        self._free_ctrl: list[IuBuf] = []
        self._ctrl_busy: dict[int, IuBuf] = {}
        self._pending: deque[IserRequest] = deque()
        self._active: dict[int, IserRequest] = {}
        self._inv_wait: dict[int, IserRequest] = {}
        self._events: list[object] = []
        self._ids = itertools.count(1)
        self._capacity: tuple[int, int] | None = None
        self._lost: str | None = None

    def __repr__(self) -> str:
        return f"<IserInitiator {self.dest}:{self.port} {self.target_name} {self.conn!r}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- connection and login (iser_connect, iscsi login) ------------------------------------

    def login(self) -> LoginCompleted:
        """Connect through the RDMA CM with the iSER CM header and log in
        (one Login Request, operational stage to full feature phase)."""
        ch = self._ch
        cid = RdmaCmId(ch)
        self._cid = cid
        cid.resolve_addr(self.dest, self.port)
        self._expect(RdmaCmEventType.ADDR_RESOLVED)
        cid.resolve_route()
        self._expect(RdmaCmEventType.ROUTE_RESOLVED)
        n_rx = self.can_queue + 8
        self._cq = self.dev.create_cq(n_rx + 4 * self.can_queue + 16)
        cap = QpCap(
            max_send_wr=3 * self.can_queue + 16,
            max_recv_wr=n_rx,
            max_send_sge=_MAX_SEND_SGE,
            max_recv_sge=1,
        )
        self._qp = cid.create_qp(self.pd, QpInitAttr(IbQpType.RC, self._cq, self._cq, cap))
        self._rx = alloc_iu_ring(self.dev, n_rx, ISER_HDR_LEN + 48 + _RX_DATA, DMA_FROM_DEVICE)
        self._tx = alloc_iu_ring(self.dev, self.can_queue, _TX_SIZE, DMA_TO_DEVICE)
        self._free_tx = list(self._tx)
        self._ctrl = alloc_iu_ring(self.dev, 4, _TX_CTRL, DMA_TO_DEVICE)
        self._free_ctrl = list(self._ctrl)
        for i, iu in enumerate(self._rx):
            self._qp.post_recv([RecvWR(_wr_id(_K_RECV, i), (iu.sge(self._lkey),))])
        flags = IserCmHdr().encode()
        if not self.send_w_inv:
            flags = bytes([flags[0] | 0x40]) + flags[1:]
        cid.connect(RdmaConnParam(private_data=flags, rnr_retry_count=7))
        ev = self._expect(RdmaCmEventType.ESTABLISHED)
        rep = ev.param.private_data if ev.param else b""
        # iser_connected_handler: remote invalidation unless the target says 0x40.
        self.remote_inv = self.send_w_inv and not (rep[:1] and rep[0] & 0x40)
        self.connected = True
        self._post_ctrl(self.conn.login())
        self._wait(lambda: self.login_result is not None or self._lost is not None)
        if self.login_result is None:
            raise IserInitiatorError(f"login failed: {self._lost}")
        self.logged_in = True
        self.stats["logins"] += 1
        return self.login_result

    def _expect(self, kind: RdmaCmEventType) -> RdmaCmEvent:
        ev = self._ch.get_cm_event(self.timeout)
        if ev.event is not kind:
            raise IserInitiatorError(f"RDMA CM: {ev.event.name}, expected {kind.name}")
        return ev

    # -- the block API -------------------------------------------------------------------------

    def submit(
        self, cdb: bytes, *, read_length: int = 0, write_data: bytes = b"", lun: int | None = None
    ) -> IserRequest:
        """Queue one SCSI command (``iscsi_queuecommand``)."""
        if not self.logged_in:
            raise IserInitiatorError("not logged in")
        if self._lost is not None:
            raise IserInitiatorError(f"connection lost: {self._lost}")
        if read_length > self.max_transfer or len(write_data) > self.max_transfer:
            raise ValueError(f"more than {self.max_transfer} bytes in one command")
        req = IserRequest(cdb, self.lun if lun is None else lun, read_length, bytes(write_data))
        self._pending.append(req)
        self._dispatch()  # blk_mq_run_hw_queues; completions are reaped while waiting
        return req

    def execute(
        self, cdb: bytes, *, read_length: int = 0, write_data: bytes = b"", lun: int | None = None
    ) -> bytes:
        """Run one command to completion; its data in."""
        req = self.submit(cdb, read_length=read_length, write_data=write_data, lun=lun)
        self._wait_reqs([req])
        return req.result()

    def inquiry(self, lun: int | None = None) -> Inquiry:
        """Standard INQUIRY."""
        return parse_inquiry(self.execute(cdb_inquiry(36), read_length=36, lun=lun).ljust(36))

    def read_capacity(self, lun: int | None = None) -> tuple[int, int]:
        """``(blocks, block_size)`` by READ CAPACITY(10)."""
        blocks, size = parse_read_capacity_10(
            self.execute(cdb_read_capacity_10(), read_length=8, lun=lun)
        )
        if lun is None or lun == self.lun:
            self._capacity = (blocks, size)
        return blocks, size

    @property
    def capacity(self) -> int:
        if self._capacity is None:
            self.read_capacity()
        assert self._capacity is not None
        return self._capacity[0]

    @property
    def block_size(self) -> int:
        if self._capacity is None:
            self.read_capacity()
        assert self._capacity is not None
        return self._capacity[1]

    def submit_read(self, lba: int, nblocks: int) -> IserIo:
        """Queue a read of ``nblocks`` from ``lba``."""
        size = self.block_size
        step = max(1, self.max_transfer // size)
        reqs = [
            self.submit(cdb_read(lba + i, n), read_length=n * size)
            for i in range(0, nblocks, step)
            for n in [min(step, nblocks - i)]
        ]
        return IserIo(reqs, False)

    def submit_write(self, lba: int, data: bytes | bytearray | memoryview) -> IserIo:
        """Queue a write of whole blocks at ``lba``."""
        size = self.block_size
        if not data or len(data) % size:
            raise ValueError(f"{len(data)} bytes is not a whole number of {size}-byte blocks")
        data = bytes(data)
        nblocks = len(data) // size
        step = max(1, self.max_transfer // size)
        reqs = [
            self.submit(cdb_write(lba + i, n), write_data=data[i * size : (i + n) * size])
            for i in range(0, nblocks, step)
            for n in [min(step, nblocks - i)]
        ]
        return IserIo(reqs, True)

    def wait_io(self, ios: IserIo | Sequence[IserIo], timeout: float | None = None) -> bool:
        """Wait for ``ios``; whether they all finished."""
        ios = [ios] if isinstance(ios, IserIo) else list(ios)
        return self._wait(lambda: all(io.done for io in ios) or self._lost is not None, timeout)

    def read(self, lba: int, nblocks: int) -> bytes:
        io = self.submit_read(lba, nblocks)
        self._wait_reqs(io.requests)
        data = io.result()
        assert data is not None
        return data

    def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        io = self.submit_write(lba, data)
        self._wait_reqs(io.requests)
        io.result()

    def sync(self) -> None:
        """SYNCHRONIZE CACHE."""
        self.execute(cdb_synchronize_cache())

    def nop(self, data: bytes = b"") -> bytes:
        """A NOP-Out ping; the NOP-In's data."""
        before = len(self._events)
        self._post_ctrl(self.conn.nop_out(data))
        self._wait(lambda: any(isinstance(e, NopInReceived) for e in self._events[before:]))
        ev = next(e for e in self._events[before:] if isinstance(e, NopInReceived))
        return ev.data

    @property
    def outstanding(self) -> int:
        return len(self._active) + len(self._pending)

    # -- logout and close ----------------------------------------------------------------------

    def logout(self) -> None:
        """Drain, send the Logout Request, wait for its response and for the
        target's disconnect (open-iscsi's logout), then :meth:`close`."""
        if self.logged_in and self._lost is None:
            self._wait(lambda: not self._active and not self._pending)
            self._post_ctrl(self.conn.logout())
            self._wait(
                lambda: (
                    any(isinstance(e, LoggedOut) for e in self._events) or self._lost is not None
                )
            )
            self._wait(lambda: not self.connected, 10.0)
            self.stats["logouts"] += 1
        self.close()

    def close(self) -> None:
        """Tear everything down: disconnect, destroy the QP and CQ, deregister
        the MRs, unmap and free every buffer (``iser_conn_release``)."""
        cid = self._cid
        if cid is not None:
            if self.connected:
                with contextlib.suppress(Exception):  # already gone
                    cid.disconnect()
                self.connected = False
            if self._qp is not None:
                cid.destroy_qp()
                self._qp = None
            for req in list(self._active.values()) + list(self._inv_wait.values()):
                self._finish(req, IserInitiatorError("session closed"))
            for req in self._pending:
                req.done, req.error = True, IserInitiatorError("session closed")
            self._pending.clear()
            cid.destroy()
            self._cid = None
            if self._cq is not None:
                self._cq.destroy()
                self._cq = None
        free_iu_ring(self._rx)
        free_iu_ring(self._tx)
        free_iu_ring(self._ctrl)
        self._rx, self._tx, self._ctrl = [], [], []
        self._free_tx, self._free_ctrl = [], []
        if self._pool.descs:
            self._pool.destroy()
            self.pd.dealloc()
        self.logged_in = False

    # -- progress ------------------------------------------------------------------------------

    def _has_events(self) -> bool:
        return len(self._ch) > 0 or (self._cq is not None and len(self._cq) > 0)

    def _wait(self, pred: Callable[[], bool], timeout: float | None = None) -> bool:
        sched = self.dev.scheduler
        deadline = sched.time() + (self.timeout if timeout is None else timeout)
        while True:
            self._service()
            if pred():
                return True
            now = sched.time()
            if now >= deadline:
                return False
            if not self._has_events() and getattr(sched, "idle", False):
                return pred()
            self.dev.wait(self._has_events, deadline - now)

    def _wait_reqs(self, reqs: Sequence[IserRequest]) -> None:
        if not self._wait(lambda: all(r.done for r in reqs) or self._lost is not None):
            raise IserInitiatorError(f"timed out: {sum(not r.done for r in reqs)} commands")
        if not all(r.done for r in reqs):
            raise IserInitiatorError(
                f"connection lost ({self._lost}): {sum(not r.done for r in reqs)} commands"
            )

    def _service(self) -> None:
        while len(self._ch):
            ev = self._ch.get_cm_event(0)
            if ev.event in (RdmaCmEventType.DISCONNECTED, RdmaCmEventType.DEVICE_REMOVAL):
                self.connected = False
                if self._lost is None and not any(isinstance(e, LoggedOut) for e in self._events):
                    self._lose(f"RDMA CM {ev.event.name}")
        if self._cq is not None:
            while wcs := self._cq.poll(32):
                for wc in wcs:
                    self._completion(wc)
        self._dispatch()

    def _lose(self, why: str) -> None:
        log.warning("%r: connection lost: %s", self, why)
        self._lost = why
        # In flight: the device may still own the buffers until the QP is
        # destroyed (close() releases them); queued: failed now.
        for req in list(self._active.values()):
            req.error = IserInitiatorError(why)
        while self._pending:
            req = self._pending.popleft()
            req.done, req.error = True, IserInitiatorError(why)

    def _completion(self, wc: WorkCompletion) -> None:
        kind, ident = wc.wr_id & 0xF, wc.wr_id >> 4
        if wc.status is not IbWcStatus.SUCCESS:
            if self._lost is None:
                self._lose(f"work completion {wc.status.name} ({wc.opcode.name})")
            return
        if wc.opcode is IbWcOpcode.RECV:
            self._recv(ident, wc)
        elif kind == _K_SEND:
            req = self._active.get(ident)
            if req is not None:
                req.send_done = True
                self._maybe_release(req)
        elif kind == _K_INV:
            req = self._inv_wait.pop(ident, None)
            if req is not None:
                req.inv_pending = False
                self._maybe_release(req)
        elif kind == _K_CTRL:
            iu = self._ctrl_busy.pop(ident, None)
            if iu is not None:
                self._free_ctrl.append(iu)

    def _recv(self, index: int, wc: WorkCompletion) -> None:
        """``iser_task_rsp``: decode, hand the PDU to libiscsi, repost."""
        assert self._qp is not None
        iu = self._rx[index]
        data = iu.read(wc.byte_len)
        inv = wc.invalidate_rkey if wc.wc_flags & IbWcFlags.WITH_INVALIDATE else 0
        self._qp.post_recv([RecvWR(wc.wr_id, (iu.sge(self._lkey),))])
        try:
            IserHdr.decode(data)
            step = self.conn.receive(data[ISER_HDR_LEN:])
        except Exception as e:  # libiscsi fails the connection
            self._lose(f"{type(e).__name__}: {e}")
            if self._cid is not None and self.connected:
                self._cid.disconnect()
            return
        for pdu in step.pdus:
            self._post_ctrl(pdu)
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
                if req is not None and ev.itt is not None:
                    req.error = IserInitiatorError(f"command rejected: {ev.reason!r}")
                    req.response = CommandCompleted(ev.itt, 0, 0, b"", 0, False, False)
                    self._maybe_release(req)
            else:
                self._events.append(ev)

    # -- commands (iser_send_command, iser_reg_rdma_mem) ----------------------------------------

    def _dispatch(self) -> None:
        """``iscsi_xmitworker``: start queued commands while the CmdSN window
        is open and a TX descriptor and an FR descriptor are free."""
        while self._pending and self._lost is None and self.connected:
            if not self.conn.window_open():  # iscsi_check_cmdsn_window_closed
                self.stats["window_closed"] += 1
                return
            if not self._free_tx or not self._pool.free:
                return
            req = self._pending.popleft()
            if not self._start(req):
                if self._active:  # host busy: retried when a command completes
                    self._pending.appendleft(req)
                    return
                req.done = True
                req.error = IserInitiatorError("cannot map the data buffer")

    def _map(self, req: IserRequest, length: int) -> bool:
        """``iser_dma_map_task_data`` + ``iser_fast_reg_mr``'s page list:
        the block layer's pages, ``ib_dma_map_sg``, ``ib_map_mr_sg``; False
        (everything undone) if the DMA mapping fails (a full bounce pool)
        or the MR cannot take the mapped list."""
        buf = SrpBuffer(self.host, length, highmem=self.highmem)
        direction = DMA_FROM_DEVICE if req.read_length else DMA_TO_DEVICE
        if req.write_data:
            buf.write(req.write_data)
        if not ib_dma_map_sg(self.dev, buf.sgl, direction):
            self.stats["map_busy"] += 1
            buf.free()
            return False
        fr = self._pool.get()
        assert fr is not None
        nents = len(buf.sgl.dma_segments())
        if fr.mr.map_sg(buf.sgl) != nents:
            self.stats["map_busy"] += 1
            self._pool.put([fr])
            ib_dma_unmap_sg(self.dev, buf.sgl, direction)
            buf.free()
            return False
        self.stats["highmem_pages"] += sum(page.is_highmem for page in buf.pages)
        req.buf, req.direction, req.fr = buf, direction, fr
        return True

    def _start(self, req: IserRequest) -> bool:
        """``iscsi_prep_scsi_cmd_pdu`` + ``iser_send_command``: map and
        register the buffer, then post REG_MR and the command's SEND (the
        immediate data a second SGE in the registered buffer)."""
        assert self._qp is not None
        length = req.read_length or len(req.write_data)
        if length and not self._map(req, length):
            return False
        wrs: list[SendWR | RegWR] = []
        hdr = IserHdr()
        data_sges: tuple[Sge, ...] = ()
        pdu = self.conn.send_command(
            req.cdb, lun=req.lun, read_length=req.read_length, write_data=req.write_data
        )
        req.itt = pdu.itt
        fr = req.fr
        if fr is not None:
            fr.key = ib_inc_rkey(fr.key)
            if req.read_length:
                access = IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE
            else:
                access = IbAccess.LOCAL_WRITE | IbAccess.REMOTE_READ
            reg = RegWR(
                _wr_id(_K_REG, pdu.itt), IbWrOpcode.REG_MR, mr=fr.mr, key=fr.key, access=access
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
                    data_sges = self._imm_sges(req, imm)
                self.stats["writes"] += 1
        raw = encode_iser_send(hdr, pdu)[:_TX_SIZE]
        tx = self._free_tx.pop()
        req.tx = tx
        tx.write(raw)
        sges = (tx.sge(self._lkey, _TX_SIZE), *data_sges)
        wrs.append(SendWR(_wr_id(_K_SEND, pdu.itt), IbWrOpcode.SEND, sges, IbSendFlags.SIGNALED))
        self._active[pdu.itt] = req
        self.stats["max_active"] = max(self.stats["max_active"], len(self._active))
        self._qp.post_send(wrs)
        return True

    def _imm_sges(self, req: IserRequest, imm: int) -> tuple[Sge, ...]:
        """The SGEs for the first ``imm`` bytes of the mapped buffer.

        ib_iser names them through the MR (``mem_reg->sge``, the MR's
        lkey). Here they are the DMA segments under the PD's
        ``local_dma_lkey`` instead: with SEND_WITH_INV the target may
        invalidate the MR while a retransmission of this SEND (its ACK
        lost) still has to read the data, which the MR's lkey would then
        refuse. Falls back to the MR when the segments exceed the SGEs."""
        assert req.buf is not None and req.fr is not None
        out: list[Sge] = []
        left = imm
        for dma, length in req.buf.sgl.dma_segments():
            n = min(length, left)
            out.append(Sge(dma, n, self._lkey))
            left -= n
            if not left:
                break
        if len(out) > _MAX_SEND_SGE - 1:
            return (Sge(req.fr.mr.iova, imm, req.fr.key),)
        return tuple(out)

    def _post_ctrl(self, pdu: IscsiPdu) -> None:
        """``iser_send_control``: a PDU with its data in a control buffer."""
        assert self._qp is not None
        if not self._free_ctrl:
            raise IserInitiatorError("no control descriptor free")
        iu = self._free_ctrl.pop()
        data = encode_iser_send(IserHdr(), pdu)
        iu.write(data)
        ident = next(self._ids)
        self._ctrl_busy[ident] = iu
        sge = iu.sge(self._lkey, len(data))
        self._qp.post_send(
            [SendWR(_wr_id(_K_CTRL, ident), IbWrOpcode.SEND, (sge,), IbSendFlags.SIGNALED)]
        )

    def _maybe_release(self, req: IserRequest) -> None:
        """``iser_task_rsp`` → ``iser_unreg_mem_fastreg``: once the SEND and
        the response completed, invalidate the key unless the target did,
        then unmap and complete."""
        if req.response is None or not req.send_done or req.inv_pending or req.done:
            return
        fr = req.fr
        if fr is not None and req.invalidated != fr.key and self._lost is None:
            if req.invalidated:
                log.warning("%r: invalidated rkey %#x is not ours", self, req.invalidated)
            assert self._qp is not None
            req.inv_pending = True
            req.invalidated = fr.key  # once
            ident = next(self._ids)
            self._inv_wait[ident] = req
            self.stats["local_inv"] += 1
            self._qp.post_send(
                [
                    SendWR(
                        _wr_id(_K_INV, ident),
                        IbWrOpcode.LOCAL_INV,
                        (),
                        IbSendFlags.SIGNALED,
                        invalidate_rkey=fr.key,
                    )
                ]
            )
            return
        self._finish(req, req.error)

    def _finish(self, req: IserRequest, error: Exception | None) -> None:
        self._active.pop(req.itt, None)
        for k, r in list(self._inv_wait.items()):
            if r is req:
                del self._inv_wait[k]
        if req.buf is not None:
            assert req.direction is not None
            ib_dma_unmap_sg(self.dev, req.buf.sgl, req.direction)
            if req.read_length and error is None:
                rsp = req.response
                got = req.read_length - (rsp.residual_count if rsp and rsp.underflow else 0)
                req.data = req.buf.read(max(0, got))
            req.buf.free()
            req.buf = None
        if req.fr is not None:
            if error is None or self._lost is None:
                self._pool.put([req.fr])
            req.fr = None
        if req.tx is not None:
            self._free_tx.append(req.tx)
            req.tx = None
        rsp = req.response
        req.error = error
        if rsp is not None:
            req.status, req.sense = rsp.status, rsp.sense
        req.done = True
        for fn in req.callbacks:
            fn(req)
