"""The IB CM of one device port: connection IDs, the MAD agent that carries
their messages, and the tables that route what arrives.

Kernel counterpart: ``drivers/infiniband/core/cm.c`` — ``struct cm_port``
and ``cm.c``'s global tables (``cm.local_id_table``,
``cm.remote_id_table``, ``cm.remote_qp_table``, ``cm.listen_service_table``),
``ib_create_cm_id``, ``ib_cm_listen``, ``ib_destroy_cm_id``,
``cm_recv_handler``, ``cm_send_handler``, ``cm_issue_rej``,
``cm_issue_drep``.

Each connection's state machine is :class:`~softrdma.cm.ib_cm.CmConnection`
(sans-IO); :class:`IbCmId` is what a consumer holds, and this module carries
out the connection's actions: CM messages become MADs on the GSI QP
(retransmitted by the MAD layer while they wait for an answer), time-wait is
a timer on the device's scheduler, events go to the ID's handler.

What arrives is routed as cm.c routes it: a REQ to the listener of its
service ID (or, repeated, to the connection it created); every other message
to the connection its ``remote_comm_id`` names. What cannot be routed is
answered as IBTA says — a REQ for a service nobody listens on gets a REJ
(``INVALID_SERVICE_ID``), a REQ from a QP that is still connected a REJ
(``STALE_CONN``), a DREQ for an unknown connection a DREP — or dropped; every
case is counted in :attr:`CmPort.stats`.
"""

from __future__ import annotations

import errno
import random
import weakref
from collections import Counter
from collections.abc import Callable

from softrdma.cm.ib_cm import (
    Cancel,
    CmConnection,
    CmEvent,
    CmState,
    ExtendTimeout,
    Send,
    StartTimewait,
    cm_convert_to_ms,
)
from softrdma.cm.messages import (
    CM_CLASS_VERSION,
    CmDrep,
    CmDreq,
    CmMessage,
    CmMra,
    CmRej,
    CmRejReason,
    CmRep,
    CmReq,
    CmRtu,
    decode_cm_mad,
    encode_cm_mad,
)
from softrdma.errors import SoftRdmaError
from softrdma.mad.agent import MadAgent, MadRecvWc, MadSendBuf, MadSendWc, ib_mad_port
from softrdma.mad.header import MadHdr, MadMethod, MalformedMad, MgmtClass
from softrdma.transport.headers import BytesLike
from softrdma.verbs.ah import AhAttr
from softrdma.verbs.device import IbDevice, ib_register_client
from softrdma.verbs.enums import IbWcStatus
from softrdma.verbs.share import COMM_ID_SLOT_SHIFT

__all__ = ["CmHandler", "CmIdError", "CmPort", "IbCmId", "cm_route_key", "ib_cm_port"]

CmHandler = Callable[["IbCmId", CmEvent], None]


class CmIdError(SoftRdmaError):
    """A call on a destroyed CM ID, or a service ID already listened on."""


class IbCmId:
    """``struct ib_cm_id``: a consumer's handle on one connection (or a
    listener). ``handler`` gets every :class:`~softrdma.cm.ib_cm.CmEvent`;
    for a REQ the handler is the listener's and the ID is the new one
    (``listen_id`` says whose it was)."""

    def __init__(
        self,
        port: CmPort,
        conn: CmConnection,
        handler: CmHandler,
        context: object = None,
        ah_attr: AhAttr | None = None,
        listen_id: IbCmId | None = None,
    ) -> None:
        self.port = port
        self.conn = conn
        self.handler = handler
        self.context = context
        self.ah_attr = ah_attr
        self.listen_id = listen_id
        self.destroyed = False
        self.listening_on: int | None = None
        self.backlog = 0
        self._msg: MadSendBuf | None = None  # the message waiting for an answer

    def __repr__(self) -> str:
        return f"IbCmId({self.conn!r})"

    @property
    def state(self) -> CmState:
        """The connection's CM state (``cm_id->state``)."""
        return CmState.LISTEN if self.listening_on is not None else self.conn.state

    @property
    def local_id(self) -> int:
        return self.conn.local_id

    # -- the consumer's calls (each: change state, then carry it out) ---------------

    def _call(self, fn: Callable[[], None]) -> None:
        with self.port.device.lock:
            if self.destroyed:
                raise CmIdError(f"{self!r} is destroyed")
            fn()
            self.port._run(self)

    def send_req(self, req: CmReq, ah_attr: AhAttr) -> None:
        """``ib_send_cm_req`` to the port at ``ah_attr`` (the primary path)."""
        self.ah_attr = ah_attr
        self._call(lambda: self.conn.send_req(req, self.port.timewait_ms(req)))

    def send_rep(self, rep: CmRep) -> None:
        """``ib_send_cm_rep``."""
        self._call(lambda: self.conn.send_rep(rep))

    def send_rtu(self, private_data: bytes = b"") -> None:
        """``ib_send_cm_rtu``."""
        self._call(lambda: self.conn.send_rtu(private_data))

    def send_rej(
        self, reason: int = CmRejReason.CONSUMER_DEFINED, private_data: bytes = b""
    ) -> None:
        """``ib_send_cm_rej``."""
        self._call(lambda: self.conn.send_rej(reason, private_data))

    def send_mra(self, service_timeout: int, private_data: bytes = b"") -> None:
        """``ib_send_cm_mra``."""
        self._call(lambda: self.conn.send_mra(service_timeout, private_data))

    def send_dreq(self, private_data: bytes = b"") -> None:
        """``ib_send_cm_dreq``."""
        self._call(lambda: self.conn.send_dreq(private_data))

    def send_drep(self, private_data: bytes = b"") -> None:
        """``ib_send_cm_drep``."""
        self._call(lambda: self.conn.send_drep(private_data))

    def notify_established(self) -> None:
        """``ib_cm_notify(IB_EVENT_COMM_EST)``."""
        self._call(self.conn.established)

    def destroy(self) -> None:
        """``ib_destroy_cm_id``: tell the peer (REJ, DREQ or DREP as the state
        needs), then no more events. Idempotent."""
        port = self.port
        with port.device.lock:
            if self.destroyed:
                return
            self.destroyed = True
            if self.listening_on is not None:
                port._listen.pop(self.listening_on, None)
                if port.device.share is not None:
                    port.device.share.release_service(self.listening_on)
                self.listening_on = None
            self.conn.destroy()
            port._run(self)
            if self.conn.state is not CmState.TIMEWAIT:
                port._forget(self)


class CmPort:
    """The CM on one device port (``struct cm_port`` with cm.c's tables).
    Get it with :func:`ib_cm_port`."""

    def __init__(self, device: IbDevice, port_num: int = 1, *, seed: int | None = None) -> None:
        self.device = device
        self.port_num = port_num
        self.stats: Counter[str] = Counter()
        """``rx_<message>`` for each message taken, and drops / answers by
        reason: ``rx_malformed``, ``rx_unsupported``, ``rx_dup_req``,
        ``rx_no_listener`` (answered with REJ), ``rx_stale_conn`` (REJ),
        ``rx_backlog`` (REJ), ``rx_bad_req`` (REJ: a path MTU or transport
        it cannot take), ``rx_unknown_id``, ``rx_stale``,
        ``rx_unknown_dreq`` (answered with DREP)."""
        # Local comm IDs: reproducible on simulated time, random on a real
        # network (a restarted tool must not look like a stale connection).
        self._rng: random.Random = (
            random.Random(device.node_guid if seed is None else seed)
            if device.scheduler.simulated or seed is not None
            else random.SystemRandom()
        )
        self._local: dict[int, IbCmId] = {}
        self._remote: dict[tuple[int, int], IbCmId] = {}
        self._remote_qpn: dict[tuple[int, int], IbCmId] = {}
        self._listen: dict[int, IbCmId] = {}
        with device.lock:
            self.mad = ib_mad_port(device, port_num)
            self.agent: MadAgent = self.mad.register_agent(
                MgmtClass.CM,
                CM_CLASS_VERSION,
                self._recv_handler,
                self._send_handler,
                methods=[MadMethod.SEND],
            )

    def __repr__(self) -> str:
        return f"CmPort({self.device.name}:{self.port_num}, ids={len(self._local)})"

    # -- IDs --------------------------------------------------------------------------

    def create_id(self, handler: CmHandler, context: object = None) -> IbCmId:
        """``ib_create_cm_id``: a new ID in IDLE with a fresh local comm ID."""
        with self.device.lock:
            return self._new_id(handler, context, tid=None)

    def listen(self, cm_id: IbCmId, service_id: int, backlog: int = 0) -> None:
        """``ib_cm_listen``: REQs for ``service_id`` create connections that
        report to ``cm_id``'s handler. ``backlog`` (0: no limit) bounds the
        requests the consumer has not answered yet; more are rejected with
        ``NO_RESOURCES``."""
        with self.device.lock:
            if cm_id.destroyed or cm_id.conn.state is not CmState.IDLE:
                raise CmIdError(f"listen on {cm_id!r}")
            if service_id in self._listen:
                raise CmIdError(f"service ID {service_id:#018x} is listened on already")
            share = self.device.share
            if share is not None and not share.claim_service(service_id):
                raise CmIdError(f"service ID {service_id:#018x} is listened on by another process")
            cm_id.listening_on = service_id
            cm_id.backlog = backlog
            self._listen[service_id] = cm_id

    def close(self) -> None:
        """Destroy every ID and unregister the CM's MAD agent."""
        with self.device.lock:
            for cm_id in list(self._local.values()):
                cm_id.destroy()
                self._forget(cm_id)
            self.agent.unregister()
            _PORTS.pop((self.device, self.port_num), None)
            self.device.remove_client(self.close)

    def timewait_ms(self, req: CmReq) -> int:
        """How long a connection stays in TIMEWAIT: the path's local ACK
        timeout (cm.c ``cm_enter_timewait``: ``cm_convert_to_ms(av.timeout)``)."""
        return cm_convert_to_ms(req.primary_local_ack_timeout)

    def _new_id(
        self,
        handler: CmHandler,
        context: object,
        tid: int | None,
        ah_attr: AhAttr | None = None,
        listen_id: IbCmId | None = None,
    ) -> IbCmId:
        # a shared device's IDs carry its slot in the top byte (for routing)
        share = self.device.share
        prefix, bits = (
            (0, 32) if share is None else (share.slot << COMM_ID_SLOT_SHIFT, COMM_ID_SLOT_SHIFT)
        )
        while True:
            local_id = prefix | self._rng.getrandbits(bits)
            if local_id and local_id not in self._local:
                break
        if tid is None:
            # cm.c cm_form_tid(): the agent's hi_tid over the local ID as the
            # little-endian host stores it.
            tid = self.agent.hi_tid << 32 | int.from_bytes(local_id.to_bytes(4, "big"), "little")
        conn = CmConnection(local_id, tid, self.device.node_guid)
        cm_id = IbCmId(self, conn, handler, context, ah_attr, listen_id)
        self._local[local_id] = cm_id
        return cm_id

    def _remember_remote(self, cm_id: IbCmId) -> None:
        conn = cm_id.conn
        self._remote[(conn.remote_id, conn.remote_ca_guid)] = cm_id
        self._remote_qpn[(conn.remote_qpn, conn.remote_ca_guid)] = cm_id

    def _forget_remote(self, cm_id: IbCmId) -> None:
        conn = cm_id.conn
        key = (conn.remote_id, conn.remote_ca_guid)
        if self._remote.get(key) is cm_id:
            del self._remote[key]
        key = (conn.remote_qpn, conn.remote_ca_guid)
        if self._remote_qpn.get(key) is cm_id:
            del self._remote_qpn[key]

    def _forget(self, cm_id: IbCmId) -> None:
        if cm_id._msg is not None:
            self.agent.cancel_mad(cm_id._msg)
        if self._local.get(cm_id.conn.local_id) is cm_id:
            del self._local[cm_id.conn.local_id]
        self._forget_remote(cm_id)

    # -- carrying out a connection's actions --------------------------------------------

    def _run(self, cm_id: IbCmId) -> None:
        conn = cm_id.conn
        events: list[CmEvent] = []
        for action in conn.take():
            if isinstance(action, Send):
                self._post(cm_id, action)
            elif isinstance(action, Cancel):
                if cm_id._msg is not None:
                    msg, cm_id._msg = cm_id._msg, None
                    self.agent.cancel_mad(msg)
            elif isinstance(action, ExtendTimeout):
                if cm_id._msg is not None:
                    self.agent.modify_mad(cm_id._msg, action.timeout_ms)
            elif isinstance(action, StartTimewait):
                self.device.scheduler.call_later(action.delay_ms / 1000, self._timewait, cm_id)
            else:
                events.append(action)
        if conn.state is CmState.IDLE:
            self._forget_remote(cm_id)
        for event in events:
            if not cm_id.destroyed:
                cm_id.handler(cm_id, event)

    def _post(self, cm_id: IbCmId, send: Send) -> None:
        assert cm_id.ah_attr is not None
        hdr = MadHdr(
            mgmt_class=MgmtClass.CM,
            class_version=CM_CLASS_VERSION,
            method=MadMethod.SEND,
            tid=cm_id.conn.tid,
        )
        mad = encode_cm_mad(hdr, send.msg)
        buf = self.agent.create_send_mad(
            cm_id.ah_attr,
            mad,
            timeout_ms=send.timeout_ms,
            retries=send.retries,
            context=cm_id,
        )
        if send.timeout_ms:
            if cm_id._msg is not None:
                self.agent.cancel_mad(cm_id._msg)
            cm_id._msg = buf
        self.agent.post_send_mad(buf)

    def _timewait(self, cm_id: IbCmId) -> None:
        cm_id.conn.timewait_expired()
        if cm_id.destroyed:
            cm_id.conn.take()
            self._forget(cm_id)
        else:
            self._run(cm_id)

    def _send_handler(self, agent: MadAgent, wc: MadSendWc) -> None:
        """``cm_send_handler``: a message that waited for an answer and got
        none fails its connection; a cancelled one is of no interest."""
        buf = wc.send_buf
        cm_id = buf.context
        buf.free()
        if not isinstance(cm_id, IbCmId) or cm_id._msg is not buf:
            return
        cm_id._msg = None
        if wc.status is not IbWcStatus.WR_FLUSH_ERR and wc.status is not IbWcStatus.SUCCESS:
            cm_id.conn.send_failed(errno.ETIMEDOUT)
            self._run(cm_id)

    # -- what arrives --------------------------------------------------------------------

    def _recv_handler(self, agent: MadAgent, buf: MadSendBuf | None, recv: MadRecvWc) -> None:
        """``cm_recv_handler``: decode and route one CM MAD."""
        try:
            hdr, msg = decode_cm_mad(recv.mad)
        except MalformedMad:
            self.stats["rx_malformed"] += 1
            return
        self.stats[f"rx_{type(msg).__name__.removeprefix('Cm').lower()}"] += 1
        if isinstance(msg, CmReq):
            self._recv_req(hdr, msg, recv)
            return
        if not isinstance(msg, CmRep | CmRtu | CmRej | CmMra | CmDreq | CmDrep):
            self.stats["rx_unsupported"] += 1  # SIDR, LAP, APR
            return
        cm_id = self._local.get(msg.remote_comm_id)
        if cm_id is None:
            if isinstance(msg, CmDreq):
                self.stats["rx_unknown_dreq"] += 1
                self._issue(recv, hdr, self._drep_for(msg))
            else:
                self.stats["rx_unknown_id"] += 1
            return
        conn = cm_id.conn
        if conn.remote_id and msg.local_comm_id != conn.remote_id and not isinstance(msg, CmRej):
            self.stats["rx_stale"] += 1
            return
        if isinstance(msg, CmRep):
            conn.recv_rep(msg)
            if conn.state is CmState.REP_RCVD:
                self._remember_remote(cm_id)
        elif isinstance(msg, CmRtu):
            conn.recv_rtu(msg)
        elif isinstance(msg, CmRej):
            conn.recv_rej(msg)
        elif isinstance(msg, CmMra):
            conn.recv_mra(msg)
        elif isinstance(msg, CmDreq):
            conn.recv_dreq(msg)
        else:
            conn.recv_drep(msg)
        self._run(cm_id)

    def _recv_req(self, hdr: MadHdr, req: CmReq, recv: MadRecvWc) -> None:
        """``cm_req_handler``: a duplicate, a stale connection, no listener,
        a full backlog, or a new connection for the listener."""
        dup = self._remote.get((req.local_comm_id, req.local_ca_guid))
        if dup is not None:
            self.stats["rx_dup_req"] += 1
            dup.conn.recv_dup_req()
            self._run(dup)
            return
        bad = _check_req(req)
        if bad is not None:
            self.stats["rx_bad_req"] += 1
            self._issue(recv, hdr, self._rej_for(req, bad))
            return
        listener = self._listen.get(req.service_id)
        if listener is None:
            self.stats["rx_no_listener"] += 1
            self._issue(recv, hdr, self._rej_for(req, CmRejReason.INVALID_SERVICE_ID))
            return
        old = self._remote_qpn.get((req.local_qpn, req.local_ca_guid))
        if old is not None and old.conn.state not in (CmState.IDLE, CmState.TIMEWAIT):
            # cm_insert_remote_qpn collision: the peer reuses a QP we still
            # think is connected.
            self.stats["rx_stale_conn"] += 1
            self._issue(recv, hdr, self._rej_for(req, CmRejReason.STALE_CONN))
            return
        if listener.backlog:
            pending = sum(
                1
                for c in self._local.values()
                if c.listen_id is listener
                and c.conn.state in (CmState.REQ_RCVD, CmState.MRA_REQ_SENT)
            )
            if pending >= listener.backlog:
                self.stats["rx_backlog"] += 1
                self._issue(recv, hdr, self._rej_for(req, CmRejReason.NO_RESOURCES))
                return
        cm_id = self._new_id(
            listener.handler, listener.context, hdr.tid, recv.ah_attr, listen_id=listener
        )
        cm_id.conn.recv_req(req, self.timewait_ms(req))
        self._remember_remote(cm_id)
        self._run(cm_id)

    def _rej_for(self, req: CmReq, reason: CmRejReason) -> CmRej:
        """``cm_issue_rej``: a REJ of ``req`` from no connection."""
        return CmRej(
            local_comm_id=0,
            remote_comm_id=req.local_comm_id,
            message_rejected=0,
            reason=reason,
        )

    def _drep_for(self, dreq: CmDreq) -> CmDrep:
        """``cm_issue_drep``: a DREP for a connection we no longer know."""
        return CmDrep(local_comm_id=dreq.remote_comm_id, remote_comm_id=dreq.local_comm_id)

    def _issue(self, recv: MadRecvWc, hdr: MadHdr, msg: CmMessage) -> None:
        self.agent.respond(recv, encode_cm_mad(MadHdr(
            mgmt_class=MgmtClass.CM, class_version=CM_CLASS_VERSION, method=MadMethod.SEND,
            tid=hdr.tid,
        ), msg))  # fmt: skip


def cm_route_key(mad: BytesLike) -> tuple[str, int] | None:
    """What ``cm_recv_handler`` looks a CM MAD up by: ``("service", ID)``
    for a REQ (its listener), ``("comm_id", ID)`` for a message of a
    connection (its ``remote_comm_id``), None for anything else (not a CM
    MAD, malformed, SIDR, LAP, APR). A shared device's wire address routes
    MADs to the process that holds the listener or connection with it."""
    try:
        _, msg = decode_cm_mad(mad)
    except MalformedMad:
        return None
    if isinstance(msg, CmReq):
        return ("service", msg.service_id)
    if isinstance(msg, CmRep | CmRtu | CmRej | CmMra | CmDreq | CmDrep):
        return ("comm_id", msg.remote_comm_id)
    return None


def _check_req(req: CmReq) -> CmRejReason | None:
    """What ``cm_req_handler`` / ``cm_validate_req_param`` refuse before a
    connection exists: a path MTU that is no IB MTU, a transport other
    than RC (the only one here), an RNR retry count it cannot use."""
    if not 1 <= req.path_mtu <= 5:
        return CmRejReason.INVALID_MTU
    if req.transport_service_type != 0:
        return CmRejReason.INVALID_TRANSPORT_TYPE
    return None


_PORTS: weakref.WeakValueDictionary[tuple[IbDevice, int], CmPort] = weakref.WeakValueDictionary()


def ib_cm_port(device: IbDevice, port_num: int = 1) -> CmPort:
    """The CM of ``device``'s port (``cm_add_one``), created on first use
    with the port's MAD layer under it."""
    with device.lock:
        port = _PORTS.get((device, port_num))
        if port is None:
            port = CmPort(device, port_num)
            _PORTS[(device, port_num)] = port
            device.add_client(port.close)
        return port


# The CM (and the MAD layer under it) answers on every device, as Linux's
# does: it opens on a device's first management datagram.
ib_register_client(ib_cm_port)
