"""``pyverbs.cmid``: the RDMA connection manager (librdmacm) over
softrdma's RDMA CM (:mod:`softrdma.cm.cma`).

``CMID(creator=AddrInfo(...))`` is librdmacm's synchronous endpoint
(``rdma_create_ep``): a passive one is bound to its source address, an
active one has its address and route resolved, and every later call
(``get_request``, ``accept``, ``connect``) waits for its event.
``CMID(creator=CMEventChannel())`` is the asynchronous ID: its events are
read with ``CMEvent(channel)``, and ``CMID(creator=event,
listen_id=listener)`` is the connection of a ``CONNECT_REQUEST``.
``set_option`` takes what pyverbs passes, ``RDMA_OPTION_ID_ACK_TIMEOUT``.
An external QP (``ConnParam(qp_num=...)`` on an ID without one) is moved by
the application with ``init_qp_attr``; the active side then gets
``CONNECT_RESPONSE`` and calls ``establish``. Only ``RDMA_PS_TCP`` (RC) is
supported; other port spaces, multicast and ECE refuse with ``EOPNOTSUPP``.

Between processes, the devices must be on the real network
(``SOFTRDMA_PYVERBS_NETWORK=udp:ADDR``, an address each or one shared, see
:mod:`pyverbs._softrdma`); in-process devices reach each other as well.
Where C would block forever, a wait ends with ``ETIMEDOUT`` after
:data:`CM_EVENT_TIMEOUT` seconds.
"""

from __future__ import annotations

import errno
import socket
import time
from collections import deque
from ipaddress import IPv4Address
from typing import Any

import pyverbs.cm_enums as ce
import pyverbs.enums as e
from pyverbs import _softrdma as sim
from pyverbs._unsupported import unsupported_class
from pyverbs.base import PyverbsCM, PyverbsObject
from pyverbs.cq import CQ, WC
from pyverbs.device import Context
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from pyverbs.qp import QPAttr, QPCap, QPInitAttr, _query_qp
from softrdma.cm.cma import (
    RdmaCmError,
    RdmaCmEvent,
    RdmaCmEventType,
    RdmaCmId,
    RdmaConnParam,
    RdmaEventChannel,
)
from softrdma.errors import SoftRdmaError
from softrdma.verbs import qp as ibqp
from softrdma.verbs import wr as ibwr
from softrdma.verbs.enums import IbQpState, IbQpType, IbSendFlags, IbWrOpcode

__all__ = [
    "CMID",
    "CM_EVENT_TIMEOUT",
    "AddrInfo",
    "CMEvent",
    "CMEventChannel",
    "ConnParam",
    "JoinMCAttrEx",
    "UDParam",
]

#: Seconds a call waits for its RDMA CM event or completion.
CM_EVENT_TIMEOUT = 30.0
_ANY = IPv4Address("0.0.0.0")

UDParam = unsupported_class("UDParam", "RDMA CM datagram (RDMA_PS_UDP) service", __name__)
JoinMCAttrEx = unsupported_class("JoinMCAttrEx", "RDMA CM multicast", __name__)


def _cm_error(what: str, ex: SoftRdmaError) -> PyverbsRDMAError:
    return sim.rdma_error(what, ex)


def _ipv4(name: str | bytes | None, what: str) -> IPv4Address | None:
    """A name or dotted address as ``rdma_getaddrinfo`` resolves it (IPv4)."""
    if name is None:
        return None
    text = name.decode() if isinstance(name, bytes) else str(name)
    try:
        return IPv4Address(text)
    except ValueError:
        pass
    try:
        return IPv4Address(socket.gethostbyname(text))
    except (OSError, ValueError):
        raise PyverbsRDMAError(f"{what}: cannot resolve {text!r}", errno.EADDRNOTAVAIL) from None


def _port(service: str | int | None, what: str) -> int:
    if service is None:
        return 0
    try:
        port = int(service)
    except ValueError:
        try:
            port = socket.getservbyname(str(service))
        except OSError:
            raise PyverbsRDMAError(f"{what}: unknown service {service!r}", errno.EINVAL) from None
    if not 0 <= port < 65536:
        raise PyverbsRDMAError(f"{what}: port {port}", errno.EINVAL)
    return port


class AddrInfo(PyverbsObject):
    """``struct rdma_addrinfo`` of ``rdma_getaddrinfo``: ``AddrInfo(src=None,
    dst=None, src_service=None, dst_service=None, port_space=RDMA_PS_TCP,
    flags=0)`` (``RAI_PASSIVE`` for a listener's)."""

    def __init__(
        self,
        src: str | None = None,
        dst: str | None = None,
        src_service: str | int | None = None,
        dst_service: str | int | None = None,
        port_space: int = ce.RDMA_PS_TCP,
        flags: int = 0,
    ) -> None:
        super().__init__()
        what = "Failed to get address info"
        if port_space != ce.RDMA_PS_TCP:
            raise PyverbsRDMAError(f"{what}: port space {port_space:#x}", errno.EOPNOTSUPP)
        if src is None and dst is None and not flags & ce.RAI_PASSIVE:
            raise PyverbsRDMAError(f"{what}: no address", errno.EINVAL)
        self.src_addr = _ipv4(src, what)
        self.dst_addr = _ipv4(dst, what)
        self.src_port = _port(src_service, what)
        self.dst_port = _port(dst_service, what)
        self.port_space = port_space
        self.flags = flags
        self.closed = False

    @property
    def passive(self) -> bool:
        return bool(self.flags & ce.RAI_PASSIVE) or self.dst_addr is None

    def close(self) -> None:
        """``rdma_freeaddrinfo``."""
        self.closed = True


class CMEventChannel(PyverbsObject):
    """``rdma_create_event_channel``: where an asynchronous ID's events go."""

    def __init__(self) -> None:
        super().__init__()
        self.channel = RdmaEventChannel(sim.process().host)
        self._pending: deque[RdmaCmEvent] = deque()
        self.closed = False

    def _next(self, timeout: float) -> RdmaCmEvent:
        if self.closed:
            raise PyverbsRDMAError("Failed to get CM event: channel closed", errno.EBADF)
        if self._pending:
            return self._pending.popleft()
        try:
            return self.channel.get_cm_event(timeout)
        except RdmaCmError as ex:
            raise _cm_error("Failed to get CM event", ex) from None

    def _wait_for(self, cm_id: RdmaCmId, want: tuple[RdmaCmEventType, ...]) -> RdmaCmEvent:
        """The next event of ``cm_id`` (a synchronous call's), keeping the
        others for later; ``ETIMEDOUT`` when none comes in time, the
        event's status as the error of an event not in ``want``."""
        deadline = time.monotonic() + CM_EVENT_TIMEOUT
        skipped: list[RdmaCmEvent] = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PyverbsRDMAError("No RDMA CM event", errno.ETIMEDOUT)
                ev = self._next(left)
                if ev.id is cm_id or ev.listen_id is cm_id:
                    break
                skipped.append(ev)
        finally:
            self._pending.extend(skipped)
        if ev.event not in want:
            status = -ev.status if ev.status < 0 else errno.ECONNREFUSED
            raise PyverbsRDMAError(f"RDMA CM event {ev.event.name}", status)
        return ev

    def close(self) -> None:
        """``rdma_destroy_event_channel``."""
        self.closed = True
        self._pending.clear()


class CMEvent(PyverbsObject):
    """``rdma_get_cm_event``: ``CMEvent(channel)`` is the channel's next
    event (``ETIMEDOUT`` after :data:`CM_EVENT_TIMEOUT` seconds)."""

    def __init__(self, channel: CMEventChannel) -> None:
        super().__init__()
        if not isinstance(channel, CMEventChannel):
            raise PyverbsUserError("CMEvent(channel) needs a CMEventChannel")
        self.event = channel._next(CM_EVENT_TIMEOUT)
        self.channel = channel
        self.acked = False

    @property
    def event_type(self) -> int:
        return int(self.event.event)

    @property
    def private_data(self) -> bytes:
        """The peer's private data (of a request, reply or reject)."""
        param = self.event.param
        return b"" if param is None else param.private_data

    def event_str(self) -> str:
        """``rdma_event_str``."""
        return f"RDMA_CM_EVENT_{self.event.event.name}"

    def ack_cm_event(self) -> None:
        """``rdma_ack_cm_event`` (once)."""
        if self.acked:
            raise PyverbsRDMAError("Failed to ack CM event: already acked", errno.EINVAL)
        self.acked = True

    def close(self) -> None:
        if not self.acked:
            self.acked = True


class ConnParam(PyverbsObject):
    """``struct rdma_conn_param`` for ``connect`` / ``accept``."""

    def __init__(
        self,
        resources: int = 1,
        depth: int = 1,
        flow_control: int = 0,
        retry: int = 5,
        rnr_retry: int = 5,
        srq: int = 0,
        qp_num: int = 0,
        data_len: int = 0,
    ) -> None:
        super().__init__()
        self.resources = resources
        self.depth = depth
        self.flow_control = flow_control
        self.retry = retry
        self.rnr_retry = rnr_retry
        self.srq = srq
        self.qpn = qp_num
        self._data = bytes(data_len)

    @property
    def private_data(self) -> bytes:
        return self._data

    def set_private_data(self, data: bytes | str) -> None:
        self._data = data.encode() if isinstance(data, str) else bytes(data)

    def to_rdma(self) -> RdmaConnParam:
        return RdmaConnParam(
            private_data=self._data,
            responder_resources=self.resources,
            initiator_depth=self.depth,
            flow_control=self.flow_control,
            retry_count=self.retry,
            rnr_retry_count=self.rnr_retry,
            srq=self.srq,
            qp_num=self.qpn,
        )

    def __str__(self) -> str:
        return (
            f"ConnParam: resources {self.resources}, depth {self.depth}, "
            f"retry {self.retry}, rnr_retry {self.rnr_retry}"
        )


class CMID(PyverbsCM):
    """``struct rdma_cm_id``: ``CMID(creator, qp_init_attr=None, pd=None,
    port_space=RDMA_PS_TCP, listen_id=None)``; see the module documentation
    for the creators."""

    def __init__(
        self,
        creator: AddrInfo | CMEventChannel | CMEvent | None = None,
        qp_init_attr: QPInitAttr | None = None,
        pd: PD | None = None,
        port_space: int = ce.RDMA_PS_TCP,
        listen_id: CMID | None = None,
    ) -> None:
        super().__init__()
        what = "Failed to create CM ID"
        if port_space != ce.RDMA_PS_TCP:
            raise PyverbsRDMAError(f"{what}: port space {port_space:#x}", errno.EOPNOTSUPP)
        self._pd = pd
        self._own: list[PyverbsCM] = []  # the PD and CQs made for the ID
        self._ctx: Context | None = None
        self.scq: CQ | None = None
        self.rcq: CQ | None = None
        self.qp: ibqp.QueuePair | None = None
        self._wr_id = 0
        self._child_qp_init: QPInitAttr | None = None
        self._qp_init: QPInitAttr | None = None  # what the QP was created with
        self.sync: bool
        self.event_channel: CMEventChannel
        self.id: RdmaCmId
        if isinstance(creator, CMEvent):
            if listen_id is None or creator.event.event is not RdmaCmEventType.CONNECT_REQUEST:
                raise PyverbsUserError("CMID(event, listen_id) needs a CONNECT_REQUEST event")
            self.sync = listen_id.sync
            self.event_channel = listen_id.event_channel
            self.id = creator.event.id
            return
        if creator is None:
            if listen_id is None:
                raise PyverbsUserError("CMID() needs an AddrInfo, a channel or an event")
            raise PyverbsUserError("CMID(listen_id=...) alone: use listen_id.get_request()")
        self.sync = isinstance(creator, AddrInfo)
        self.event_channel = creator if isinstance(creator, CMEventChannel) else CMEventChannel()
        try:
            self.id = RdmaCmId(self.event_channel.channel, context=self)
        except RdmaCmError as ex:
            raise _cm_error(what, ex) from None
        if isinstance(creator, AddrInfo):
            # rdma_create_ep: bind a listener, resolve an active endpoint
            if creator.passive:
                # rdma_get_request gives each connection a QP of these
                self._child_qp_init = qp_init_attr
                self.bind_addr(creator)
            else:
                self.resolve_addr(creator)
                self.resolve_route()
                if qp_init_attr is not None:
                    self.create_qp(qp_init_attr)

    # -- attributes ------------------------------------------------------------

    @property
    def context(self) -> Context:
        """The pyverbs Context of the ID's device (opened on first use)."""
        if self._ctx is None:
            dev = self.id.device
            if dev is None:
                raise PyverbsRDMAError("The CM ID has no device yet", errno.EINVAL)
            self._ctx = Context(name=dev.name)
        return self._ctx

    @property
    def pd(self) -> PD:
        """The ID's PD (the device's default one unless given)."""
        if self._pd is None:
            self._pd = PD(self.context)
            self._own.append(self._pd)
        return self._pd

    @property
    def dev_name(self) -> str:
        return self.context.name

    @property
    def port_num(self) -> int:
        return self.id.port_num

    @property
    def qpn(self) -> int:
        if self.qp is None:
            raise PyverbsRDMAError("The CM ID has no QP", errno.EINVAL)
        return self.qp.qp_num

    def _check(self, what: str) -> RdmaCmId:
        if self.closed:
            raise PyverbsRDMAError(f"{what}: the CM ID is closed", errno.EINVAL)
        return self.id

    def _wait(self, *want: RdmaCmEventType) -> RdmaCmEvent:
        return self.event_channel._wait_for(self.id, want)

    # -- addresses and routes -----------------------------------------------------

    def bind_addr(self, lai: AddrInfo) -> None:
        """``rdma_bind_addr`` to ``lai``'s source address and port."""
        cm_id = self._check("Failed to bind address")
        try:
            cm_id.bind_addr(lai.src_addr or _ANY, lai.src_port)
        except RdmaCmError as ex:
            raise _cm_error("Failed to bind address", ex) from None

    def resolve_addr(self, rai: AddrInfo, timeout_ms: int = 2000) -> None:
        """``rdma_resolve_addr`` of ``rai``'s destination (from its source
        when given); a synchronous ID waits for ``ADDR_RESOLVED``."""
        what = "Failed to resolve address"
        cm_id = self._check(what)
        if rai.dst_addr is None:
            raise PyverbsRDMAError(f"{what}: no destination", errno.EINVAL)
        try:
            cm_id.resolve_addr(rai.dst_addr, rai.dst_port, src=rai.src_addr, timeout_ms=timeout_ms)
        except RdmaCmError as ex:
            raise _cm_error(what, ex) from None
        if self.sync:
            self._wait(RdmaCmEventType.ADDR_RESOLVED)

    def resolve_route(self, timeout_ms: int = 2000) -> None:
        """``rdma_resolve_route``; a synchronous ID waits for ``ROUTE_RESOLVED``."""
        what = "Failed to resolve route"
        cm_id = self._check(what)
        try:
            cm_id.resolve_route(timeout_ms)
        except RdmaCmError as ex:
            raise _cm_error(what, ex) from None
        if self.sync:
            self._wait(RdmaCmEventType.ROUTE_RESOLVED)

    # -- the QP ----------------------------------------------------------------

    def create_qp(self, qp_init: QPInitAttr) -> None:
        """``rdma_create_qp`` on the ID's PD: an RC QP, moved through its
        states by the CM; CQs are made for it when ``qp_init`` has none."""
        what = "Failed to create QP"
        cm_id = self._check(what)
        if qp_init.qp_type != e.IBV_QPT_RC:
            raise PyverbsRDMAError(f"{what}: QP type {qp_init.qp_type}", errno.EOPNOTSUPP)
        if qp_init.srq is not None:
            raise PyverbsRDMAError(f"{what}: an SRQ on a CM QP", errno.EOPNOTSUPP)
        if self.qp is not None:
            raise PyverbsRDMAError(f"{what}: the ID has one", errno.EINVAL)
        cap: QPCap = qp_init.cap
        scq, rcq = qp_init.send_cq, qp_init.recv_cq
        if scq is None or rcq is None:
            scq = rcq = CQ(self.context, max(cap.max_send_wr + cap.max_recv_wr, 1))
            self._own.append(scq)
        self.scq, self.rcq = scq, rcq
        init = ibqp.QpInitAttr(
            IbQpType.RC,
            scq.cq,
            rcq.cq,
            cap.to_ib(),
            ibqp.IbSigType.ALL_WR if qp_init.sq_sig_all else ibqp.IbSigType.REQ_WR,
        )
        try:
            self.qp = cm_id.create_qp(self.pd.alive(what), init)
        except SoftRdmaError as ex:
            raise _cm_error(what, ex) from None
        self._qp_init = qp_init

    # -- connections -------------------------------------------------------------

    def listen(self, backlog: int = 0) -> None:
        """``rdma_listen``."""
        cm_id = self._check("Failed to listen")
        try:
            cm_id.listen(backlog)
        except RdmaCmError as ex:
            raise _cm_error("Failed to listen", ex) from None

    def get_request(self) -> CMID:
        """``rdma_get_request`` of a synchronous listener: the ID of the next
        connection request."""
        self._check("Failed to get request")
        if not self.sync:
            raise PyverbsRDMAError("Failed to get request: an asynchronous ID", errno.EINVAL)
        ev = self._wait(RdmaCmEventType.CONNECT_REQUEST)
        event = CMEvent.__new__(CMEvent)
        PyverbsObject.__init__(event)
        event.event, event.channel, event.acked = ev, self.event_channel, True
        child = CMID(creator=event, listen_id=self)
        child._pd = self._pd
        if self._child_qp_init is not None:
            try:
                child.create_qp(self._child_qp_init)
            except PyverbsRDMAError:
                child.reject()
                child.close()
                raise
        return child

    def accept(self, param: ConnParam | None = None) -> None:
        """``rdma_accept``; a synchronous ID waits for ``ESTABLISHED``."""
        cm_id = self._check("Failed to accept")
        try:
            cm_id.accept(param.to_rdma() if param is not None else None)
        except SoftRdmaError as ex:
            raise _cm_error("Failed to accept", ex) from None
        if self.sync:
            self._wait(RdmaCmEventType.ESTABLISHED)

    def connect(self, param: ConnParam | None = None) -> None:
        """``rdma_connect``; a synchronous ID waits for ``ESTABLISHED`` —
        ``CONNECT_RESPONSE`` for an external QP — (``ECONNREFUSED`` when
        rejected)."""
        cm_id = self._check("Failed to connect")
        try:
            cm_id.connect(param.to_rdma() if param is not None else None)
        except SoftRdmaError as ex:
            raise _cm_error("Failed to connect", ex) from None
        if self.sync:
            E = RdmaCmEventType
            self._wait(E.ESTABLISHED if cm_id.qp is not None else E.CONNECT_RESPONSE)

    def reject(self, private_data: bytes | str = b"", private_data_len: int | None = None) -> None:
        """``rdma_reject`` with ``private_data``."""
        data = private_data.encode() if isinstance(private_data, str) else bytes(private_data)
        if private_data_len is not None:
            data = data[:private_data_len]
        try:
            self._check("Failed to reject").reject(data)
        except RdmaCmError as ex:
            raise _cm_error("Failed to reject", ex) from None
        sim.flush_sends()

    def disconnect(self) -> None:
        """``rdma_disconnect``: the QP goes to ERR; a synchronous ID waits
        for ``DISCONNECTED``."""
        cm_id = self._check("Failed to disconnect")
        try:
            cm_id.disconnect()
        except RdmaCmError as ex:
            raise _cm_error("Failed to disconnect", ex) from None
        sim.flush_sends()
        if self.sync:
            self._wait(RdmaCmEventType.DISCONNECTED)

    def set_option(self, level: int, optname: int, optval: int, optlen: int) -> None:
        """``rdma_set_option``; like pyverbs, only ``RDMA_OPTION_ID_ACK_TIMEOUT``
        (a ``uint8_t``: the QP's local ACK timeout, 4.096 µs × 2**optval,
        set at RTS instead of the CM's)."""
        what = "Failed to set option"
        if optname != ce.RDMA_OPTION_ID_ACK_TIMEOUT:
            raise PyverbsUserError("CMID.set_option supports only RDMA_OPTION_ID_ACK_TIMEOUT")
        if not 0 <= optval <= 0xFF:
            raise OverflowError(f"ACK timeout {optval} is not a uint8_t")
        if level != ce.RDMA_OPTION_ID:  # ucma: no such option at that level
            raise PyverbsRDMAError(f"{what}: level {level}", errno.ENOSYS)
        if optlen != 1:
            raise PyverbsRDMAError(f"{what}: optlen {optlen}, not 1", errno.EINVAL)
        try:
            self._check(what).set_ack_timeout(optval)
        except RdmaCmError as ex:
            raise _cm_error(what, ex) from None

    def query_qp(self, attr_mask: int) -> tuple[QPAttr, QPInitAttr]:
        """``ibv_query_qp`` of the ID's QP: ``(QPAttr, QPInitAttr)``."""
        qp = self._qp("Failed to query QP")
        assert self._qp_init is not None
        return _query_qp(qp, self._qp_init)

    def establish(self) -> None:
        """``rdma_establish``: the active side of an external QP (one named
        in ``ConnParam(qp_num=...)``) sends the RTU once its QP is in RTS."""
        what = "Failed to Complete an active connection request"
        try:
            self._check(what).establish()
        except RdmaCmError as ex:
            raise _cm_error(what, ex) from None

    def init_qp_attr(self, qp_state: int) -> tuple[QPAttr, int]:
        """``rdma_init_qp_attr``: ``(QPAttr, attr_mask)`` that move an
        external QP to ``qp_state`` (INIT, RTR, RTS) for this connection."""
        what = "Failed to get QP attributes"
        try:
            state = IbQpState(qp_state)
            attr, mask = self._check(what).init_qp_attr(state)
        except ValueError:
            raise PyverbsRDMAError(f"{what}: QP state {qp_state}", errno.EINVAL) from None
        except RdmaCmError as ex:
            raise _cm_error(what, ex) from None
        return QPAttr.from_ib(attr, ibqp.QpCap()), int(mask)

    def __getattr__(self, name: str) -> Any:
        if name in (
            "join_multicast",
            "leave_multicast",
            "set_local_ece",
            "get_remote_ece",
            "post_ud_send",
        ):
            raise PyverbsRDMAError(f"CMID.{name} is not supported", errno.EOPNOTSUPP)
        raise AttributeError(name)

    # -- rdma_verbs.h helpers ------------------------------------------------------

    def _reg(self, size: int, access: int) -> MR:
        mr = MR(self.pd, size, access)
        return mr

    def reg_msgs(self, size: int) -> MR:
        """``rdma_reg_msgs``: an MR for sends and receives."""
        return self._reg(size, e.IBV_ACCESS_LOCAL_WRITE)

    def reg_read(self, size: int) -> MR:
        """``rdma_reg_read``: an MR the peer may read."""
        return self._reg(size, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ)

    def reg_write(self, size: int) -> MR:
        """``rdma_reg_write``: an MR the peer may write."""
        return self._reg(size, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)

    def _qp(self, what: str) -> ibqp.QueuePair:
        self._check(what)
        if self.qp is None:
            raise PyverbsRDMAError(f"{what}: the ID has no QP", errno.EINVAL)
        return self.qp

    def _sge(self, mr: MR, length: int | None) -> tuple[ibwr.Sge, ...]:
        n = mr.length if length is None else int(length)
        return (ibwr.Sge(mr.buf, n, mr.lkey),)

    def _post(self, what: str, wr: ibwr.SendWR) -> None:
        try:
            self._qp(what).post_send(wr)
        except SoftRdmaError as ex:
            raise _cm_error(what, ex) from None

    def _next_id(self) -> int:
        self._wr_id += 1
        return self._wr_id

    def post_recv(self, mr: MR, length: int | None = None) -> None:
        """``rdma_post_recv`` of ``length`` bytes (all of ``mr``) of ``mr``."""
        what = "Failed to post recv"
        try:
            self._qp(what).post_recv(ibwr.RecvWR(self._next_id(), self._sge(mr, length)))
        except SoftRdmaError as ex:
            raise _cm_error(what, ex) from None

    def post_send(
        self, mr: MR, flags: int = e.IBV_SEND_SIGNALED, length: int | None = None
    ) -> None:
        """``rdma_post_send`` of ``mr``'s bytes."""
        wr = ibwr.SendWR(
            self._next_id(), IbWrOpcode.SEND, self._sge(mr, length), IbSendFlags(flags)
        )
        self._post("Failed to post send", wr)

    def post_write(
        self, mr: MR, length: int, remote_addr: int, rkey: int, flags: int = e.IBV_SEND_SIGNALED
    ) -> None:
        """``rdma_post_write`` into the peer's ``remote_addr`` / ``rkey``."""
        wr = ibwr.RdmaWR(
            self._next_id(),
            IbWrOpcode.RDMA_WRITE,
            self._sge(mr, length),
            IbSendFlags(flags),
            remote_addr=remote_addr,
            rkey=rkey,
        )
        self._post("Failed to post write", wr)

    def post_read(
        self, mr: MR, length: int, remote_addr: int, rkey: int, flags: int = e.IBV_SEND_SIGNALED
    ) -> None:
        """``rdma_post_read`` from the peer's ``remote_addr`` / ``rkey``."""
        wr = ibwr.RdmaWR(
            self._next_id(),
            IbWrOpcode.RDMA_READ,
            self._sge(mr, length),
            IbSendFlags(flags),
            remote_addr=remote_addr,
            rkey=rkey,
        )
        self._post("Failed to post read", wr)

    def _comp(self, cq: CQ | None, what: str) -> WC:
        if cq is None:
            raise PyverbsRDMAError(f"{what}: the ID has no CQ", errno.EINVAL)
        deadline = time.monotonic() + CM_EVENT_TIMEOUT
        while time.monotonic() < deadline:
            n, wcs = cq.poll(1)
            if n:
                return wcs[0]
            cq.cq.wait(min(0.1, deadline - time.monotonic()))
        raise PyverbsRDMAError(f"{what}: no completion", errno.ETIMEDOUT)

    def get_send_comp(self) -> WC:
        """``rdma_get_send_comp``: the next completion of the send CQ."""
        return self._comp(self.scq, "Failed to get send completion")

    def get_recv_comp(self) -> WC:
        """``rdma_get_recv_comp``: the next completion of the receive CQ."""
        return self._comp(self.rcq, "Failed to get receive completion")

    def _release(self) -> None:
        # rdma_destroy_ep: the QP, then the ID, then what was made for it
        cm_id: RdmaCmId | None = self.__dict__.get("id")
        if cm_id is not None and not cm_id._destroyed:
            cm_id.destroy_qp()
            cm_id.destroy()
        self.qp = None
        for obj in reversed(self._own):
            obj.close()
        self._own.clear()
        if self._ctx is not None:
            self._ctx.close()
