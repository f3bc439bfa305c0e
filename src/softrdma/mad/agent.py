"""The MAD layer of one port: the GSI QP (QP1), its buffers, and the agents
that send and receive management datagrams through it.

Kernel counterpart: ``drivers/infiniband/core/mad.c`` (``ib_mad_port_open``,
``ib_register_mad_agent``, ``ib_create_send_mad``, ``ib_post_send_mad``,
``ib_mad_recv_done``, ``ib_mad_send_done``, ``timeout_sends``,
``ib_cancel_mad``, ``ib_modify_mad``), with the buffer rules the seed is
about:

- every receive buffer is ``kmalloc``'ed and mapped with
  ``ib_dma_map_single(DMA_FROM_DEVICE)`` — 40 bytes of GRH (the IP header
  on RoCEv2) then the 256-byte MAD — and unmapped when it completes, then a
  fresh one is posted;
- every send buffer is ``kzalloc``'ed by :meth:`MadAgent.create_send_mad`
  and mapped with ``ib_dma_map_single(DMA_TO_DEVICE)`` (header and payload,
  two SGEs) each time it is posted, unmapped at each send completion;
- all of it through the ``ib_dma_*`` wrappers and the PD's
  ``local_dma_lkey``, so the same code runs on every device and platform.

A request sent with ``timeout_ms`` waits for its response (matched by
transaction ID and class) and is resent ``retries`` times before it
completes with ``IB_WC_RESP_TIMEOUT_ERR``. Responses are routed to the agent
whose ``hi_tid`` is in the TID's top 32 bits; requests to the agent
registered for their class, version and method. A GET or SET nobody is
registered for is answered with ``GET_RESP`` and status
``UNSUPPORTED_METHOD_ATTRIB`` (``generate_unmatched_resp``); anything else
unclaimed is dropped. Every drop is counted in :attr:`MadPort.stats`.

Everything runs on the device's scheduler holding its lock: completions are
handled in a deferred callback (the kernel's MAD workqueue), timers are the
scheduler's, and the agents' handlers are called from there.
"""

from __future__ import annotations

import errno
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from softrdma.dma.types import DMA_FROM_DEVICE, DMA_TO_DEVICE
from softrdma.errors import SoftRdmaError
from softrdma.mad.header import (
    IB_MGMT_BASE_VERSION,
    MAD_HDR_SIZE,
    MAD_SIZE,
    MadHdr,
    MadMethod,
    MadStatus,
    MalformedMad,
    make_mad,
)
from softrdma.time.base import Handle
from softrdma.transport.headers import GSI_QKEY
from softrdma.transport.ud import GRH_SIZE
from softrdma.verbs.ah import AddressHandle, AhAttr, ah_attr_from_grh, create_ah
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import ib_dma_map_single, ib_dma_mapping_error, ib_dma_unmap_single
from softrdma.verbs.enums import (
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbSendFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import QpAttr, QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import RecvWR, Sge, UdWR, WorkCompletion

__all__ = [
    "IB_MAD_QP_RECV_SIZE",
    "IB_MAD_QP_SEND_SIZE",
    "MadAgent",
    "MadPort",
    "MadPortError",
    "MadRecvWc",
    "MadSendBuf",
    "MadSendWc",
    "ib_mad_port",
]

IB_MAD_QP_SEND_SIZE = 128
"""mad.c's default send queue depth (``mad_sendq_size``)."""
IB_MAD_QP_RECV_SIZE = 512
"""mad.c's default receive queue depth (``mad_recvq_size``)."""
CLOSE_DRAIN_TIMEOUT = 1.0
"""How long :meth:`MadPort.close` waits for posted sends to leave (seconds)."""
_RECV_BUF_SIZE = GRH_SIZE + MAD_SIZE
_UNMATCHED = (MadMethod.GET, MadMethod.SET)


class MadPortError(SoftRdmaError):
    """A MAD layer call the port cannot take: a closed port or agent, a
    class / version / method already claimed, a buffer posted twice."""


@dataclass(frozen=True, slots=True)
class MadRecvWc:
    """``struct ib_mad_recv_wc``: one received MAD, its header decoded, and
    where it came from (``ah_attr`` answers it)."""

    mad: bytes
    hdr: MadHdr
    wc: WorkCompletion
    ah_attr: AhAttr
    src_qp: int


@dataclass(frozen=True, slots=True)
class MadSendWc:
    """``struct ib_mad_send_wc``: how a send ended — ``SUCCESS`` (sent, and
    answered when a response was awaited), ``RESP_TIMEOUT_ERR`` (no response
    after every retry), ``WR_FLUSH_ERR`` (cancelled or the agent went away),
    or the send completion's error."""

    send_buf: MadSendBuf
    status: IbWcStatus


class MadSendBuf:
    """``struct ib_mad_send_buf``: a 256-byte MAD in ``kzalloc``'ed host
    memory with its destination. Created by :meth:`MadAgent.create_send_mad`;
    the client frees it (:meth:`free`) once its send handler has it back."""

    def __init__(
        self,
        agent: MadAgent,
        kva: int,
        ah: AddressHandle,
        remote_qpn: int,
        timeout_ms: int,
        retries: int,
        context: object,
    ) -> None:
        self.agent = agent
        self.kva = kva
        self.ah = ah
        self.remote_qpn = remote_qpn
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.context = context
        self.retries_left = retries
        self.posted = False
        """Between post and its final send-handler call."""
        self.freed = False
        self.free_when_done = False
        """Free it after its send handler ran (the MAD layer's own answers,
        :meth:`MadAgent.respond`)."""
        self._tid = 0  # TID and class as posted, for matching the response
        self._class = 0
        self._dma: tuple[int, int] | None = None  # header, payload mappings
        self._in_flight = False  # a send WR on the QP
        self._timer: Handle | None = None
        self._status = IbWcStatus.SUCCESS
        self._done = False  # the final status is known

    def __repr__(self) -> str:
        return f"MadSendBuf(tid={self.hdr.tid:#x}, attr={self.hdr.attr_id:#x})"

    @property
    def mad(self) -> bytes:
        """The MAD as it is in host memory now."""
        return bytes(self.agent.port.device.host.cpu_read(self.kva, MAD_SIZE))

    @property
    def hdr(self) -> MadHdr:
        return MadHdr.decode(self.mad)

    def write(self, mad: bytes | bytearray | memoryview) -> None:
        """Replace the MAD (a whole 256 bytes); not while it is posted."""
        if self.posted:
            raise MadPortError("MAD send buffer is posted: wait for its send handler")
        if len(mad) != MAD_SIZE:
            raise MadPortError(f"a MAD is {MAD_SIZE} bytes, not {len(mad)}")
        self.agent.port.device.host.cpu_write(self.kva, mad)

    def free(self) -> None:
        """``ib_free_send_mad``: give the memory back. Not while posted."""
        if self.posted:
            raise MadPortError("MAD send buffer is posted: cancel it or wait for its handler")
        if not self.freed:
            self.freed = True
            self.ah.destroy()
            self.agent.port.device.host.kfree(self.kva)


RecvHandler = Callable[["MadAgent", "MadSendBuf | None", MadRecvWc], None]
SendHandler = Callable[["MadAgent", MadSendWc], None]


class MadAgent:
    """``struct ib_mad_agent``: a client of the MAD layer for one management
    class and version. ``methods`` are the request methods it serves
    (responses to its own requests always reach it). Handlers run on the
    device's scheduler holding its lock."""

    def __init__(
        self,
        port: MadPort,
        hi_tid: int,
        mgmt_class: int,
        class_version: int,
        methods: frozenset[int],
        recv_handler: RecvHandler,
        send_handler: SendHandler,
    ) -> None:
        self.port = port
        self.hi_tid = hi_tid
        self.mgmt_class = mgmt_class
        self.class_version = class_version
        self.methods = methods
        self.recv_handler = recv_handler
        self.send_handler = send_handler
        self.registered = True
        self._tid = 0
        self._sends: list[MadSendBuf] = []  # posted, not yet handed back

    def __repr__(self) -> str:
        return f"MadAgent(class={self.mgmt_class:#x} v{self.class_version}, hi_tid={self.hi_tid})"

    def next_tid(self) -> int:
        """A fresh transaction ID with this agent's ``hi_tid`` on top, so the
        response comes back here."""
        self._tid = (self._tid + 1) & 0xFFFF_FFFF
        return self.hi_tid << 32 | self._tid

    # -- sending ------------------------------------------------------------------

    def create_send_mad(
        self,
        ah_attr: AhAttr,
        mad: bytes | bytearray | memoryview,
        *,
        remote_qpn: int = 1,
        timeout_ms: int = 0,
        retries: int = 0,
        context: object = None,
    ) -> MadSendBuf:
        """``ib_create_send_mad``: a send buffer holding ``mad`` (256 bytes),
        addressed to ``remote_qpn`` (the peer's GSI QP) at ``ah_attr``. With
        ``timeout_ms`` the send waits that long for a response, ``retries``
        times over."""
        port = self.port
        self._check()
        if len(mad) != MAD_SIZE:
            raise MadPortError(f"a MAD is {MAD_SIZE} bytes, not {len(mad)}")
        if timeout_ms < 0 or retries < 0:
            raise MadPortError("timeout_ms and retries must not be negative")
        with port.device.lock:
            kva = port.device.host.kzalloc(MAD_SIZE)
            port.device.host.cpu_write(kva, mad)
            ah = create_ah(port.pd, ah_attr)
            return MadSendBuf(self, kva, ah, remote_qpn, timeout_ms, retries, context)

    def post_send_mad(self, buf: MadSendBuf) -> None:
        """``ib_post_send_mad``: map and post it (or queue it behind a full
        send queue). Its send handler is called exactly once when it ends."""
        self._check()
        if buf.agent is not self or buf.freed:
            raise MadPortError(f"{buf!r} does not belong to {self!r} or was freed")
        if buf.posted:
            raise MadPortError(f"{buf!r} is posted already")
        with self.port.device.lock:
            hdr = buf.hdr
            buf._tid, buf._class = hdr.tid, hdr.mgmt_class
            buf.posted = True
            buf.retries_left = buf.retries
            buf._status = IbWcStatus.SUCCESS
            buf._done = False
            self._sends.append(buf)
            self.port._send(buf)

    def cancel_mad(self, buf: MadSendBuf) -> None:
        """``ib_cancel_mad``: stop waiting for a response; the send handler
        gets ``WR_FLUSH_ERR`` (after the send completion, if one is out)."""
        with self.port.device.lock:
            if buf.posted and buf in self._sends:
                self.port._finish(buf, IbWcStatus.WR_FLUSH_ERR)

    def modify_mad(self, buf: MadSendBuf, timeout_ms: int) -> None:
        """``ib_modify_mad``: wait ``timeout_ms`` from now for the response
        instead (the CM does this when the peer sends an MRA)."""
        with self.port.device.lock:
            if not buf.posted or buf not in self._sends:
                return
            buf.timeout_ms = timeout_ms
            if not buf._in_flight:
                self.port._arm(buf)

    def respond(
        self, recv: MadRecvWc, mad: bytes | bytearray | memoryview, *, context: object = None
    ) -> MadSendBuf:
        """Send ``mad`` back to where ``recv`` came from (``ib_create_ah_from_wc``
        plus :meth:`create_send_mad` and :meth:`post_send_mad`); the buffer
        is freed when it has been sent."""
        buf = self.create_send_mad(recv.ah_attr, mad, remote_qpn=recv.src_qp, context=context)
        buf.free_when_done = True
        self.post_send_mad(buf)
        return buf

    def unregister(self) -> None:
        """``ib_unregister_mad_agent``: every send still out ends with
        ``WR_FLUSH_ERR`` — at once, or, while the device still holds its
        buffer, when its send completes (or the port closes). No receive
        reaches the agent after this returns."""
        with self.port.device.lock:
            if not self.registered:
                return
            for buf in list(self._sends):
                self.port._finish(buf, IbWcStatus.WR_FLUSH_ERR)
            self.registered = False
            self.port._agents.remove(self)

    def _check(self) -> None:
        if not self.registered or self.port.closed:
            raise MadPortError(f"{self!r} is unregistered")


class MadPort:
    """``struct ib_mad_port_private``: the GSI QP of a port with its CQ,
    receive buffers and agents. Get it with :func:`ib_mad_port`."""

    def __init__(
        self,
        device: IbDevice,
        port_num: int = 1,
        *,
        send_queue_size: int = IB_MAD_QP_SEND_SIZE,
        recv_queue_size: int = IB_MAD_QP_RECV_SIZE,
    ) -> None:
        self.device = device
        self.port_num = port_num
        self.stats: Counter[str] = Counter()
        """``rx_mads``, ``tx_mads``, ``retries``, ``timeouts``, and drops by
        reason: ``rx_truncated``, ``rx_bad_base_version``, ``rx_no_agent``,
        ``rx_unmatched_response``, ``rx_recv_error``, ``rx_unanswerable``."""
        self.closed = False
        self._agents: list[MadAgent] = []
        self._next_hi_tid = 1
        self._recv_bufs: dict[int, tuple[int, int]] = {}  # wr_id -> (kva, dma)
        self._next_wr_id = 1
        self._send_wrs: dict[int, MadSendBuf] = {}
        self._overflow: deque[MadSendBuf] = deque()
        self._send_queue_size = send_queue_size
        self._scheduled = False
        # The port's own sender, for answers no client owns (the kernel's
        # agent.c port agent); not in _agents, so nothing routes to it.
        self._port_agent = MadAgent(self, 0, 0, 0, frozenset(), lambda *_: None, lambda *_: None)
        with device.lock:
            self.pd: ProtectionDomain = device.alloc_pd()
            self.cq: CompletionQueue = device.create_cq(
                send_queue_size + recv_queue_size, comp_handler=self._cq_event
            )
            cap = QpCap(
                max_send_wr=send_queue_size,
                max_recv_wr=recv_queue_size,
                max_send_sge=2,
                max_recv_sge=1,
            )
            self.qp: QueuePair = device.create_qp(
                self.pd, QpInitAttr(IbQpType.GSI, self.cq, self.cq, cap)
            )
            self._start_qp()
            for _ in range(recv_queue_size):
                self._post_recv()
            self.cq.req_notify()

    def __repr__(self) -> str:
        return f"MadPort({self.device.name}:{self.port_num}, agents={len(self._agents)})"

    # -- agents ----------------------------------------------------------------------

    def register_agent(
        self,
        mgmt_class: int,
        class_version: int,
        recv_handler: RecvHandler,
        send_handler: SendHandler,
        *,
        methods: Iterable[int] = (),
    ) -> MadAgent:
        """``ib_register_mad_agent``: a client for ``mgmt_class`` /
        ``class_version`` that serves the request ``methods`` (none: it
        only sends requests and gets their responses). Raises
        :class:`MadPortError` if another agent serves one of them."""
        wanted = frozenset(int(m) for m in methods)
        if any(m & MadMethod.RESP for m in wanted):
            raise MadPortError("register request methods; responses reach the sender's agent")
        with self.device.lock:
            if self.closed:
                raise MadPortError(f"{self!r} is closed")
            for a in self._agents:
                if (a.mgmt_class, a.class_version) == (mgmt_class, class_version) and (
                    a.methods & wanted
                ):
                    raise MadPortError(
                        f"class {mgmt_class:#x} v{class_version} methods "
                        f"{sorted(a.methods & wanted)} are served by {a!r}"
                    )
            agent = MadAgent(
                self, self._next_hi_tid, mgmt_class, class_version, wanted, recv_handler,
                send_handler,
            )  # fmt: skip
            self._next_hi_tid += 1
            self._agents.append(agent)
            return agent

    def close(self) -> None:
        """``ib_mad_port_close``: unregister every agent, let the sends on
        the QP leave (at most :data:`CLOSE_DRAIN_TIMEOUT`), destroy the QP,
        unmap and free every buffer."""
        with self.device.lock:
            if self.closed:
                return
            for agent in list(self._agents):
                agent.unregister()
            self.closed = True
            # Let the device put out what is on the QP — a CM's last DREQ or
            # REJ, as the kernel does for a process that went away — before
            # the QP goes (bounded; no wait from inside the device's thread).
            self.device.wait(lambda: not self._send_wrs, CLOSE_DRAIN_TIMEOUT)
            if self.qp.state is not IbQpState.RESET:
                self.qp.modify(QpAttr(qp_state=IbQpState.RESET), IbQpAttrMask.STATE)
            self.qp.destroy()
            self.cq.destroy()
            # The device is gone from the sends still on the QP: unmap them
            # and hand them back flushed.
            in_flight, self._send_wrs = list(self._send_wrs.values()), {}
            for buf in in_flight:
                buf._in_flight = False
                self._unmap(buf)
                self._finish(buf, IbWcStatus.WR_FLUSH_ERR)
            for kva, dma in self._recv_bufs.values():
                ib_dma_unmap_single(self.device, dma, _RECV_BUF_SIZE, DMA_FROM_DEVICE)
                self.device.host.kfree(kva)
            self._recv_bufs.clear()
            self.pd.dealloc()
            _PORTS.pop((self.device, self.port_num), None)
            self.device.remove_client(self.close)

    # -- the GSI QP -------------------------------------------------------------------

    def _start_qp(self) -> None:
        """``ib_mad_change_qp_state_to_rts``."""
        m = IbQpAttrMask
        self.qp.modify(
            QpAttr(qp_state=IbQpState.INIT, pkey_index=0, port_num=self.port_num, qkey=GSI_QKEY),
            m.STATE | m.PKEY_INDEX | m.PORT | m.QKEY,
        )
        self.qp.modify(QpAttr(qp_state=IbQpState.RTR), m.STATE)
        self.qp.modify(QpAttr(qp_state=IbQpState.RTS, sq_psn=0), m.STATE | m.SQ_PSN)

    def _post_recv(self) -> None:
        """``ib_mad_post_receive_mads``: one fresh ``kmalloc``'ed, mapped buffer."""
        dev = self.device
        kva = dev.host.kmalloc(_RECV_BUF_SIZE)
        dma = ib_dma_map_single(dev, kva, _RECV_BUF_SIZE, DMA_FROM_DEVICE)
        if ib_dma_mapping_error(dev, dma):
            dev.host.kfree(kva)
            self.stats["recv_map_error"] += 1
            return
        wr_id = self._next_wr_id
        self._next_wr_id += 1
        self._recv_bufs[wr_id] = (kva, dma)
        try:
            self.qp.post_recv(RecvWR(wr_id, (Sge(dma, _RECV_BUF_SIZE, self.pd.local_dma_lkey),)))
        except VerbsError:
            del self._recv_bufs[wr_id]
            ib_dma_unmap_single(dev, dma, _RECV_BUF_SIZE, DMA_FROM_DEVICE)
            dev.host.kfree(kva)
            raise

    def _send(self, buf: MadSendBuf) -> None:
        """``ib_send_mad``: map the header and the payload and post one UD
        SEND; behind a full send queue, wait on the overflow list."""
        if len(self._send_wrs) >= self._send_queue_size:
            self._overflow.append(buf)
            return
        dev = self.device
        hdr = ib_dma_map_single(dev, buf.kva, MAD_HDR_SIZE, DMA_TO_DEVICE)
        if ib_dma_mapping_error(dev, hdr):
            self._finish(buf, IbWcStatus.LOC_PROT_ERR)
            return
        payload = ib_dma_map_single(
            dev, buf.kva + MAD_HDR_SIZE, MAD_SIZE - MAD_HDR_SIZE, DMA_TO_DEVICE
        )
        if ib_dma_mapping_error(dev, payload):
            ib_dma_unmap_single(dev, hdr, MAD_HDR_SIZE, DMA_TO_DEVICE)
            self._finish(buf, IbWcStatus.LOC_PROT_ERR)
            return
        buf._dma = (hdr, payload)
        wr_id = self._next_wr_id
        self._next_wr_id += 1
        lkey = self.pd.local_dma_lkey
        wr = UdWR(
            wr_id,
            IbWrOpcode.SEND,
            (Sge(hdr, MAD_HDR_SIZE, lkey), Sge(payload, MAD_SIZE - MAD_HDR_SIZE, lkey)),
            IbSendFlags.SIGNALED,
            ah=buf.ah,
            remote_qpn=buf.remote_qpn,
            remote_qkey=GSI_QKEY,
        )
        try:
            self.qp.post_send(wr)
        except VerbsError:
            self._unmap(buf)
            self._finish(buf, IbWcStatus.LOC_QP_OP_ERR)
            return
        buf._in_flight = True
        self._send_wrs[wr_id] = buf
        self.stats["tx_mads"] += 1

    def _unmap(self, buf: MadSendBuf) -> None:
        if buf._dma is not None:
            hdr, payload = buf._dma
            ib_dma_unmap_single(self.device, hdr, MAD_HDR_SIZE, DMA_TO_DEVICE)
            ib_dma_unmap_single(self.device, payload, MAD_SIZE - MAD_HDR_SIZE, DMA_TO_DEVICE)
            buf._dma = None

    def _arm(self, buf: MadSendBuf) -> None:
        """Wait ``timeout_ms`` for the response (``wait_for_response``)."""
        if buf._timer is not None:
            buf._timer.cancel()
        buf._timer = self.device.scheduler.call_later(buf.timeout_ms / 1000, self._timeout, buf)

    def _timeout(self, buf: MadSendBuf) -> None:
        """``timeout_sends``: resend while retries last, then give up."""
        buf._timer = None
        if not buf.posted or buf._done:
            return
        if buf.retries_left > 0:
            buf.retries_left -= 1
            self.stats["retries"] += 1
            self._send(buf)
        else:
            self.stats["timeouts"] += 1
            self._finish(buf, IbWcStatus.RESP_TIMEOUT_ERR)

    def _finish(self, buf: MadSendBuf, status: IbWcStatus) -> None:
        """End a posted send: once its send WR (if any) has completed, the
        agent's send handler gets it back."""
        buf._status = status if buf._status is IbWcStatus.SUCCESS else buf._status
        if buf._timer is not None:
            buf._timer.cancel()
            buf._timer = None
        if buf in self._overflow:
            self._overflow.remove(buf)
        if buf._in_flight:
            buf._done = True  # the send completion hands it back
            return
        agent = buf.agent
        if buf in agent._sends:
            agent._sends.remove(buf)
        buf.posted = False
        # Every posted send is handed back exactly once, even to an agent that
        # has unregistered meanwhile (mad.c waits for them).
        agent.send_handler(agent, MadSendWc(buf, buf._status))
        if buf.free_when_done:
            buf.free()

    # -- completions --------------------------------------------------------------------

    def _cq_event(self, cq: CompletionQueue) -> None:
        """The GSI CQ's completion handler: defer the work (mad.c queues it
        on its workqueue), never run agents inside the driver's call."""
        if not self._scheduled:
            self._scheduled = True
            self.device.scheduler.call_soon(self._process)

    def _process(self) -> None:
        self._scheduled = False
        if self.closed:
            return
        while True:
            wcs = self.cq.poll(16)
            if not wcs:
                self.cq.req_notify()
                # A completion that raced with re-arming is polled now.
                wcs = self.cq.poll(16)
                if not wcs:
                    return
            for wc in wcs:
                if wc.opcode is IbWcOpcode.RECV:
                    self._recv_done(wc)
                else:
                    self._send_done(wc)

    def _send_done(self, wc: WorkCompletion) -> None:
        """``ib_mad_send_done``: unmap, then either wait for the response or
        hand the buffer back; post one from the overflow list."""
        buf = self._send_wrs.pop(wc.wr_id, None)
        if buf is None:
            return
        buf._in_flight = False
        self._unmap(buf)
        if wc.status is not IbWcStatus.SUCCESS:
            self._finish(buf, wc.status)
        elif buf._done or not buf.timeout_ms or not buf.posted:
            self._finish(buf, buf._status)
        else:
            self._arm(buf)
        if self._overflow and len(self._send_wrs) < self._send_queue_size:
            self._send(self._overflow.popleft())

    def _recv_done(self, wc: WorkCompletion) -> None:
        """``ib_mad_recv_done``: unmap the buffer, validate the MAD, route
        it, and post a fresh buffer in its place."""
        entry = self._recv_bufs.pop(wc.wr_id, None)
        if entry is None:
            return
        kva, dma = entry
        dev = self.device
        ib_dma_unmap_single(dev, dma, _RECV_BUF_SIZE, DMA_FROM_DEVICE)
        data = bytes(dev.host.cpu_read(kva, _RECV_BUF_SIZE))
        dev.host.kfree(kva)
        if not self.closed:
            self._post_recv()
        if wc.status is not IbWcStatus.SUCCESS:
            self.stats["rx_recv_error"] += 1
            return
        self.stats["rx_mads"] += 1
        length = wc.byte_len - GRH_SIZE
        if length < MAD_HDR_SIZE:
            self.stats["rx_truncated"] += 1
            return
        mad = data[GRH_SIZE : GRH_SIZE + min(length, MAD_SIZE)]
        mad += bytes(MAD_SIZE - len(mad))
        try:
            hdr = MadHdr.decode(mad)
            ah_attr = ah_attr_from_grh(data[:GRH_SIZE], self.port_num)
        except (MalformedMad, VerbsError):
            self.stats["rx_truncated"] += 1
            return
        if hdr.base_version != IB_MGMT_BASE_VERSION:
            self.stats["rx_bad_base_version"] += 1
            return
        recv = MadRecvWc(mad, hdr, wc, ah_attr, wc.src_qp)
        if hdr.is_response:
            self._route_response(recv)
        else:
            self._route_request(recv)

    def _route_response(self, recv: MadRecvWc) -> None:
        """A response goes to the agent whose ``hi_tid`` it carries, matched
        to the request by TID and class (``ib_find_send_mad``)."""
        hdr = recv.hdr
        hi_tid = hdr.tid >> 32
        agent = next((a for a in self._agents if a.hi_tid == hi_tid), None)
        if agent is None:
            self.stats["rx_no_agent"] += 1
            return
        match = None
        for buf in agent._sends:
            if buf._tid == hdr.tid and buf._class == hdr.mgmt_class and not buf._done:
                match = buf
                break
        if match is None:
            self.stats["rx_unmatched_response"] += 1
            return
        agent.recv_handler(agent, match, recv)
        if match.posted:
            self._finish(match, IbWcStatus.SUCCESS)

    def _route_request(self, recv: MadRecvWc) -> None:
        hdr = recv.hdr
        for agent in self._agents:
            if (
                agent.mgmt_class == hdr.mgmt_class
                and agent.class_version == hdr.class_version
                and hdr.method in agent.methods
            ):
                agent.recv_handler(agent, None, recv)
                return
        self.stats["rx_no_agent"] += 1
        if hdr.method in _UNMATCHED:
            self._answer_unmatched(recv)

    def _answer_unmatched(self, recv: MadRecvWc) -> None:
        """``generate_unmatched_resp``: a GET or SET nobody serves is answered
        with GET_RESP, status UNSUPPORTED_METHOD_ATTRIB, the request's data."""
        reply = make_mad(
            recv.hdr.response(MadStatus.UNSUPPORTED_METHOD_ATTRIB), recv.mad[MAD_HDR_SIZE:]
        )
        self._port_agent.respond(recv, reply)


_PORTS: weakref.WeakValueDictionary[tuple[IbDevice, int], MadPort] = weakref.WeakValueDictionary()


def ib_mad_port(device: IbDevice, port_num: int = 1) -> MadPort:
    """The MAD layer of ``device``'s port ``port_num``, opened on first use
    (``ib_mad_port_open``: the GSI QP, its CQ and receive buffers). Raises
    :class:`MadPortError` (``EBUSY``) if the port's QP1 is taken by
    somebody else."""
    with device.lock:
        port = _PORTS.get((device, port_num))
        if port is None or port.closed:
            try:
                port = MadPort(device, port_num)
            except VerbsError as e:
                if e.errno == errno.EBUSY:
                    raise MadPortError(f"{device.name}: QP1 is in use outside the MAD layer") from e
                raise
            _PORTS[(device, port_num)] = port
            device.add_client(port.close)
        return port
