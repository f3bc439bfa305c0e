"""The RDMA CM: connections by IP address and port, over the IB CM.

Kernel counterparts: ``drivers/infiniband/core/cma.c`` and librdmacm
(``rdma_create_event_channel``, ``rdma_create_id``, ``rdma_bind_addr``,
``rdma_resolve_addr``, ``rdma_resolve_route``, ``rdma_create_qp``,
``rdma_connect``, ``rdma_listen``, ``rdma_accept``, ``rdma_reject``,
``rdma_disconnect``, ``rdma_get_cm_event``, ``rdma_destroy_id``,
``rdma_init_qp_attr`` and ``rdma_establish`` for external QPs, and the
options of ``rdma_set_option``: ``rdma_set_service_type``,
``rdma_set_reuseaddr``, ``rdma_set_afonly``, ``rdma_set_ack_timeout``).

A consumer uses it as it would use librdmacm::

    ch = RdmaEventChannel(host)
    cid = RdmaCmId(ch)                       # RDMA_PS_TCP
    cid.resolve_addr("10.0.0.2", 7174)      # -> ADDR_RESOLVED
    cid.resolve_route()                      # -> ROUTE_RESOLVED
    qp = cid.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq))
    cid.connect(RdmaConnParam(private_data=b"hello"))  # -> ESTABLISHED
    ev = ch.get_cm_event(timeout=5.0)

and on the other side ``listen()``, a ``CONNECT_REQUEST`` event whose
``id`` is the new connection, ``create_qp`` on it and ``accept()``.

The RoCEv2 model throughout: a device is found by its IPv4 address among
the host's registered devices; the GID is ``::ffff:<ip>``; the route is the
port's active MTU, hop limit 64, the flow label cma.c derives from the
two ports (``cma_get_roce_udp_flow_label``), which also picks the QP's UDP
source port, the ID's type of service as traffic class (0 unless set) and a
packet life time of 18, or one less than the ID's ACK timeout when set.
The service ID is the port space over the port (``rdma_get_service_id``);
the CM REQ's private data starts with the 36-byte ``cma_hdr`` (addresses
and source port), and a consumer has the 56 bytes after it. The QP is moved through its states by the CM: INIT at
``create_qp``, RTR and RTS at ``accept`` or when the REP arrives, ERR at
``disconnect`` (flushing every outstanding work request). An ID without a
QP of its own connects an external one named in ``RdmaConnParam.qp_num``:
the application moves it with :meth:`RdmaCmId.init_qp_attr`'s attributes,
and the active side gets CONNECT_RESPONSE instead of ESTABLISHED and sends
the RTU with :meth:`RdmaCmId.establish`.

Events are queued on the channel from the device's scheduler;
:meth:`RdmaEventChannel.get_cm_event` waits for one (on simulated time, it
runs the simulation until one comes).
"""

from __future__ import annotations

import enum
import errno
import random
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address

from softrdma.cm.cm_port import CmIdError, IbCmId, ib_cm_port
from softrdma.cm.cma_hdr import (
    CMA_HDR_SIZE,
    CmaHdr,
    RdmaPortSpace,
    rdma_ps_service_id,
)
from softrdma.cm.ib_cm import CmEvent, CmEventType, CmState
from softrdma.cm.messages import CmRej, CmRejReason, CmRep, CmReq
from softrdma.errors import SoftRdmaError
from softrdma.mad.header import MalformedMad
from softrdma.memory.host import Host
from softrdma.verbs.ah import AhAttr
from softrdma.verbs.device import IbDevice, ib_devices
from softrdma.verbs.enums import IbAccess, IbMtu, IbQpAttrMask, IbQpState, IbQpType
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import QpAttr, QpInitAttr, QueuePair

__all__ = [
    "CMA_MAX_CM_RETRIES",
    "RdmaCmError",
    "RdmaCmEvent",
    "RdmaCmEventType",
    "RdmaCmId",
    "RdmaConnParam",
    "RdmaEventChannel",
]

CMA_CM_RESPONSE_TIMEOUT = 20
"""cma.c's ``CMA_CM_RESPONSE_TIMEOUT``: 4.096 µs × 2**20 ≈ 4.3 s."""
CMA_MAX_CM_RETRIES = 15
"""cma.c's ``CMA_MAX_CM_RETRIES``."""
CMA_IBOE_PACKET_LIFETIME = 18
"""The packet life time cma.c gives a RoCE path (4.096 µs × 2**18 ≈ 1 s)."""
CMA_HOP_LIMIT = 64
REQ_PRIVATE_DATA = 92 - CMA_HDR_SIZE
"""What is left of the REQ's private data for the consumer (56 bytes)."""
REP_PRIVATE_DATA = 196
REJ_PRIVATE_DATA = 148
_EPHEMERAL = range(32768, 61000)  # Linux's ip_local_port_range
_ANY = IPv4Address("0.0.0.0")


class RdmaCmEventType(enum.IntEnum):
    """``enum rdma_cm_event_type``."""

    ADDR_RESOLVED = 0
    ADDR_ERROR = 1
    ROUTE_RESOLVED = 2
    ROUTE_ERROR = 3
    CONNECT_REQUEST = 4
    CONNECT_RESPONSE = 5
    CONNECT_ERROR = 6
    UNREACHABLE = 7
    REJECTED = 8
    ESTABLISHED = 9
    DISCONNECTED = 10
    DEVICE_REMOVAL = 11
    MULTICAST_JOIN = 12
    MULTICAST_ERROR = 13
    ADDR_CHANGE = 14
    TIMEWAIT_EXIT = 15


class RdmaCmState(enum.IntEnum):
    """``enum rdma_cm_state`` (cma_priv.h)."""

    IDLE = 0
    ADDR_QUERY = 1
    ADDR_RESOLVED = 2
    ROUTE_QUERY = 3
    ROUTE_RESOLVED = 4
    CONNECT = 5
    DISCONNECT = 6
    ADDR_BOUND = 7
    LISTEN = 8
    DEVICE_REMOVAL = 9
    DESTROYING = 10


class RdmaCmError(SoftRdmaError):
    """An RDMA CM call that librdmacm would fail with ``errno`` (``EINVAL``
    for the wrong state, ``EADDRINUSE``, ``EADDRNOTAVAIL``, ``ETIMEDOUT``
    from :meth:`RdmaEventChannel.get_cm_event`, ...)."""

    def __init__(self, err: int, why: str) -> None:
        self.errno = err
        super().__init__(f"{errno.errorcode.get(err, err)}: {why}")


@dataclass(frozen=True, slots=True)
class RdmaConnParam:
    """``struct rdma_conn_param``. On an event, what the peer sent: its
    private data (after the ``cma_hdr``, for a CONNECT_REQUEST) and the
    depths as this side should use them."""

    private_data: bytes = b""
    responder_resources: int = 1
    initiator_depth: int = 1
    flow_control: int = 0
    retry_count: int = 7
    rnr_retry_count: int = 7
    srq: int = 0
    qp_num: int = 0
    """An external QP's number, for an ID without a QP of its own."""


@dataclass(slots=True)
class _ConnPath:
    """What a connection's QP is moved to RTR and RTS with, besides the
    ID's route, once the CM has the peer's REQ (passive) or REP (active):
    the message fields ``ib_cm_init_qp_attr`` reads."""

    remote_qpn: int
    sq_psn: int  # the peer's starting PSN: the one it receives from
    resp: int  # max_dest_rd_atomic: the READs and atomics this side serves
    init: int  # max_rd_atomic: the ones it has outstanding
    timeout: int
    retry: int
    rnr_retry: int


@dataclass(frozen=True, slots=True)
class RdmaCmEvent:
    """``struct rdma_cm_event``: ``id`` is the ID it is about (for
    CONNECT_REQUEST the new one, ``listen_id`` its listener); ``status`` is
    0, a negative errno, or a REJ reason for REJECTED."""

    event: RdmaCmEventType
    id: RdmaCmId
    listen_id: RdmaCmId | None = None
    status: int = 0
    param: RdmaConnParam | None = None

    def __repr__(self) -> str:
        return f"RdmaCmEvent({self.event.name}, status={self.status}, id={self.id!r})"


class RdmaEventChannel:
    """``rdma_create_event_channel``: where the events of the IDs created
    on it queue up, for the host whose devices they use.

    With ``handler``, events are not queued: each is handed to
    ``handler(event)`` as it happens, on the device's scheduler holding its
    lock — the kernel's ``rdma_create_id(net, event_handler, ...)``, which
    in-kernel consumers such as ib_srpt use. The handler must not block."""

    def __init__(self, host: Host, handler: Callable[[RdmaCmEvent], None] | None = None) -> None:
        self.host = host
        self.handler = handler
        self._events: deque[RdmaCmEvent] = deque()

    def __len__(self) -> int:
        return len(self._events)

    def _device(self) -> IbDevice:
        devices = ib_devices(self.host)
        if not devices:
            raise RdmaCmError(errno.ENODEV, f"no RDMA device on {self.host!r}")
        return devices[0]

    def get_cm_event(self, timeout: float | None = None) -> RdmaCmEvent:
        """``rdma_get_cm_event``: the next event, waiting up to ``timeout``
        seconds (None: until one comes; on simulated time, while anything is
        pending, an hour at most). Raises :class:`RdmaCmError`
        (``ETIMEDOUT``) when none came."""
        device = self._device()
        events = self._events
        with device.lock:
            if not events:
                wait = timeout
                if wait is None and device.scheduler.simulated:
                    wait = 3600.0
                device.wait(lambda: bool(events), wait)
            if not events:
                raise RdmaCmError(errno.ETIMEDOUT, "no RDMA CM event")
            return events.popleft()

    def _post(self, event: RdmaCmEvent) -> None:
        if self.handler is not None:
            self.handler(event)
            return
        self._events.append(event)
        for dev in ib_devices(self.host)[:1]:  # wake get_cm_event, which waits on its lock
            with dev.lock:
                dev.lock.notify_all()


class _Cma:
    """cma.c's per-namespace state for one host: the port spaces' bindings,
    and where ephemeral ports and starting PSNs come from — a seeded
    generator on simulated time (the same run gives the same packets), the
    system's on a real network (a restarted tool must not reuse them)."""

    def __init__(self, simulated: bool) -> None:
        self.bound: dict[tuple[int, int], list[RdmaCmId]] = {}
        self.rng: random.Random = random.Random(0x5EED) if simulated else random.SystemRandom()


_HOSTS: weakref.WeakKeyDictionary[Host, _Cma] = weakref.WeakKeyDictionary()


def _cma(host: Host) -> _Cma:
    cma = _HOSTS.get(host)
    if cma is None:
        devices = ib_devices(host)
        simulated = bool(devices) and all(d.scheduler.simulated for d in devices)
        cma = _HOSTS[host] = _Cma(simulated)
    return cma


def _roce_flow_label(sport: int, dport: int) -> int:
    """cma.c ``cma_get_roce_udp_flow_label``: the RoCEv2 flow label (and so
    the QP's UDP source port) from the two RDMA CM ports."""
    return (sport * 31 + dport) & 0xFFFFF


class RdmaCmId:
    """``struct rdma_cm_id`` (librdmacm's, with cma.c's ``rdma_id_private``
    behind it)."""

    def __init__(
        self,
        channel: RdmaEventChannel,
        context: object = None,
        ps: RdmaPortSpace = RdmaPortSpace.TCP,
        qp_type: IbQpType = IbQpType.RC,
    ) -> None:
        if ps is not RdmaPortSpace.TCP or qp_type is not IbQpType.RC:
            raise RdmaCmError(errno.EPROTONOSUPPORT, "only RDMA_PS_TCP with RC QPs")
        self.channel = channel
        self.context = context
        self.ps = ps
        self.qp_type = qp_type
        self.state = RdmaCmState.IDLE
        self.device: IbDevice | None = None
        self.port_num = 1
        self.src_addr: IPv4Address = _ANY
        self.src_port = 0
        self.dst_addr: IPv4Address = _ANY
        self.dst_port = 0
        self.qp: QueuePair | None = None
        self.listen_id: RdmaCmId | None = None
        self.path_mtu = IbMtu.MTU_1024
        self.flow_label = 0
        self.traffic_class = 0  # the route's (path record's), from the ToS
        self.packet_life_time = CMA_IBOE_PACKET_LIFETIME
        # rdma_set_option's state (id_priv->tos / timeout / reuseaddr / afonly)
        self.tos: int | None = None
        self.ack_timeout: int | None = None
        self.reuseaddr = False
        self.afonly = False
        self._cma = _cma(channel.host)
        self._cm_ids: list[IbCmId] = []  # one per device for a wildcard listener
        self._req: CmReq | None = None  # the REQ of a passive connection
        self._path: _ConnPath | None = None
        self._rq_psn: int | None = None  # id_priv->seq_num, drawn on first use
        self._destroyed = False

    def __repr__(self) -> str:
        return (
            f"RdmaCmId({self.state.name}, {self.src_addr}:{self.src_port} -> "
            f"{self.dst_addr}:{self.dst_port})"
        )

    @property
    def cm_id(self) -> IbCmId | None:
        """The IB CM ID of the connection (``id_priv->cm_id.ib``); None for a
        listener (it has one per device) and before ``connect``."""
        if self.state is RdmaCmState.LISTEN or not self._cm_ids:
            return None
        return self._cm_ids[0]

    # -- addresses --------------------------------------------------------------

    def _lock(self) -> object:
        return self.channel._device().lock

    def _check(self, *states: RdmaCmState) -> None:
        if self._destroyed:
            raise RdmaCmError(errno.EINVAL, f"{self!r} is destroyed")
        if states and self.state not in states:
            names = "/".join(s.name for s in states)
            raise RdmaCmError(errno.EINVAL, f"{self!r}: needs state {names}")

    def _device_for(self, addr: IPv4Address) -> IbDevice:
        for dev in ib_devices(self.channel.host):
            if dev.ip == addr:
                return dev
        raise RdmaCmError(errno.EADDRNOTAVAIL, f"no RDMA device has address {addr}")

    def _bind_port(self, port: int) -> int:
        bound = self._cma.bound
        if port == 0:
            start = self._cma.rng.randrange(len(_EPHEMERAL))
            for i in range(len(_EPHEMERAL)):
                candidate = _EPHEMERAL[(start + i) % len(_EPHEMERAL)]
                if (self.ps, candidate) not in bound:
                    port = candidate
                    break
            else:
                raise RdmaCmError(errno.EADDRNOTAVAIL, "no free port")
        self._check_port(port, self.reuseaddr)
        bound.setdefault((self.ps, port), []).append(self)
        self.src_port = port
        return port

    def _check_port(self, port: int, reuseaddr: bool) -> None:
        """cma.c ``cma_check_port``: the IDs bound to ``port`` that this
        one may not share it with; two that both set REUSEADDR may."""
        for other in self._cma.bound.get((self.ps, port), ()):
            if other is self or (reuseaddr and other.reuseaddr):
                continue
            if _ANY in (other.src_addr, self.src_addr):
                raise RdmaCmError(errno.EADDRNOTAVAIL, f"port {port} is bound by {other!r}")
            if other.src_addr == self.src_addr:
                raise RdmaCmError(errno.EADDRINUSE, f"port {port} is bound by {other!r}")

    def _unbind(self) -> None:
        users = self._cma.bound.get((self.ps, self.src_port))
        if users and self in users:
            users.remove(self)
            if not users:
                del self._cma.bound[(self.ps, self.src_port)]

    def bind_addr(self, addr: str | IPv4Address = _ANY, port: int = 0) -> None:
        """``rdma_bind_addr``: to one of the host's RDMA device addresses (or
        0.0.0.0, every device) and a port (0: an ephemeral one)."""
        self._check(RdmaCmState.IDLE)
        ip = IPv4Address(str(addr))
        device = None if ip == _ANY else self._device_for(ip)
        self.src_addr = ip
        self._bind_port(port)
        self.device = device
        self.state = RdmaCmState.ADDR_BOUND

    def resolve_addr(
        self,
        dst: str | IPv4Address,
        dst_port: int,
        src: str | IPv4Address | None = None,
        timeout_ms: int = 2000,
    ) -> None:
        """``rdma_resolve_addr``: pick the local device (the bound or given
        source address, else the host's first device) and queue
        ADDR_RESOLVED (ADDR_ERROR if ``dst`` is not IPv4)."""
        self._check(RdmaCmState.IDLE, RdmaCmState.ADDR_BOUND)
        try:
            dst_ip = ip_address(str(dst))
        except ValueError as e:
            raise RdmaCmError(errno.EINVAL, f"bad destination {dst!r}") from e
        if src is not None and self.state is RdmaCmState.IDLE:
            self.bind_addr(src)
        if self.device is None:
            if self.src_addr != _ANY:
                self.device = self._device_for(self.src_addr)
            else:
                self.device = self.channel._device()
                self.src_addr = self.device.ip
                if not self.src_port:
                    self._bind_port(0)
        if not self.src_port:
            self._bind_port(0)
        self.dst_port = dst_port
        self.state = RdmaCmState.ADDR_QUERY
        ok = isinstance(dst_ip, IPv4Address)
        if ok:
            self.dst_addr = dst_ip  # type: ignore[assignment]
        self._later(RdmaCmEventType.ADDR_RESOLVED if ok else RdmaCmEventType.ADDR_ERROR,
                    RdmaCmState.ADDR_RESOLVED if ok else RdmaCmState.ADDR_BOUND,
                    0 if ok else -errno.EAFNOSUPPORT)  # fmt: skip

    def resolve_route(self, timeout_ms: int = 2000) -> None:
        """``rdma_resolve_route``: RoCEv2's route (``cma_resolve_iboe_route``):
        the GID of the destination address, the port's active MTU, the flow
        label from the two ports; queues ROUTE_RESOLVED."""
        self._check(RdmaCmState.ADDR_RESOLVED)
        assert self.device is not None
        self.path_mtu = self.device.query_port(self.port_num).active_mtu
        self.flow_label = _roce_flow_label(self.src_port, self.dst_port)
        self.traffic_class = self.tos or 0
        # IBTA 12.7.34: ACK timeout = 2 * packet life time + CA ACK delay;
        # cma.c takes the life time as one less than the timeout set
        if self.ack_timeout:
            self.packet_life_time = self.ack_timeout - 1
        else:
            self.packet_life_time = CMA_IBOE_PACKET_LIFETIME
        self.state = RdmaCmState.ROUTE_QUERY
        self._later(RdmaCmEventType.ROUTE_RESOLVED, RdmaCmState.ROUTE_RESOLVED, 0)

    def _later(self, event: RdmaCmEventType, state: RdmaCmState, status: int) -> None:
        """Address and route resolution complete asynchronously, as in cma.c."""
        assert self.device is not None

        def done() -> None:
            if not self._destroyed:
                self.state = state
                self.channel._post(RdmaCmEvent(event, self, status=status))

        self.device.scheduler.call_soon(done)

    @property
    def dgid(self) -> bytes:
        return bytes(10) + b"\xff\xff" + self.dst_addr.packed

    # -- options (rdma_set_option) --------------------------------------------------

    def set_service_type(self, tos: int) -> None:
        """``rdma_set_service_type`` (``RDMA_OPTION_ID_TOS``): the type of
        service of the connection; the route resolved after it carries it
        as the GRH traffic class (the REQ's and both QPs' address vectors)."""
        self._check()
        if not 0 <= tos <= 0xFF:
            raise RdmaCmError(errno.EINVAL, f"type of service {tos} is not a byte")
        self.tos = tos

    def set_reuseaddr(self, reuse: bool) -> None:
        """``rdma_set_reuseaddr`` (``RDMA_OPTION_ID_REUSEADDR``): IDs that
        all set it may bind one port; a listener's own is cleared. Turning it
        off is allowed only before binding, on only before listening."""
        self._check()
        if not ((reuse and self.state is not RdmaCmState.LISTEN) or self.state is RdmaCmState.IDLE):
            raise RdmaCmError(errno.EINVAL, f"{self!r}: REUSEADDR cannot change now")
        self.reuseaddr = bool(reuse)

    def set_afonly(self, afonly: bool) -> None:
        """``rdma_set_afonly`` (``RDMA_OPTION_ID_AFONLY``): bind the address
        family only, before the ID is bound further than its address. IDs
        are IPv4 only here, so it changes no bind."""
        self._check(RdmaCmState.IDLE, RdmaCmState.ADDR_BOUND)
        self.afonly = bool(afonly)

    def set_ack_timeout(self, timeout: int) -> None:
        """``rdma_set_ack_timeout`` (``RDMA_OPTION_ID_ACK_TIMEOUT``): the
        local ACK timeout (4.096 µs × 2**timeout) the QP gets at RTS instead
        of the CM's; a route resolved after it takes its packet life time
        from it."""
        self._check()
        if self.qp_type is not IbQpType.RC:
            raise RdmaCmError(errno.EINVAL, "an ACK timeout needs an RC ID")
        if not 0 <= timeout <= 31:
            raise RdmaCmError(errno.EINVAL, f"ACK timeout {timeout} is not 0-31")
        self.ack_timeout = timeout

    # -- the QP ------------------------------------------------------------------

    def create_qp(self, pd: ProtectionDomain, init_attr: QpInitAttr) -> QueuePair:
        """``rdma_create_qp``: a QP on the ID's device, in INIT
        (``cma_init_conn_qp``)."""
        self._check()
        if self.device is None or pd.device is not self.device:
            raise RdmaCmError(errno.EINVAL, "the PD must be on the ID's device (resolve first)")
        if self.qp is not None:
            raise RdmaCmError(errno.EINVAL, f"{self!r} has a QP already")
        with self.device.lock:
            qp = self.device.create_qp(pd, init_attr)
            qp.modify(*self.init_qp_attr(IbQpState.INIT))
            self.qp = qp
            return qp

    def destroy_qp(self) -> None:
        """``rdma_destroy_qp``."""
        if self.qp is not None:
            self.qp.destroy()
            self.qp = None

    def _seq_num(self) -> int:
        """The PSN this side receives from, which it puts in its REQ or REP
        (cma.c's random ``id_priv->seq_num``; it sends from the peer's)."""
        if self._rq_psn is None:
            self._rq_psn = self._cma.rng.getrandbits(24)
        return self._rq_psn

    def init_qp_attr(self, state: IbQpState) -> tuple[QpAttr, IbQpAttrMask]:
        """``rdma_init_qp_attr``: the attributes and mask that move the
        connection's QP to ``state`` — INIT, RTR or RTS — as the CM moves
        the ID's own QP and an application an external one. INIT before
        the peer's REQ or REP has no remote access; RTR and RTS need it
        (``ib_cm_init_qp_attr``), else ``EINVAL``."""
        self._check()
        m = IbQpAttrMask
        path = self._path
        if state is IbQpState.INIT:
            access = IbAccess(0)
            if path is not None:
                access = IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE
                if path.resp:
                    access |= IbAccess.REMOTE_READ | IbAccess.REMOTE_ATOMIC
            attr = QpAttr(qp_state=state, pkey_index=0, port_num=self.port_num,
                          qp_access_flags=access)  # fmt: skip
            return attr, m.STATE | m.PKEY_INDEX | m.PORT | m.ACCESS_FLAGS
        if path is None or state not in (IbQpState.RTR, IbQpState.RTS):
            raise RdmaCmError(errno.EINVAL, f"{self!r}: no QP attributes for {state.name}")
        if state is IbQpState.RTR:
            assert self.device is not None
            mtu = min(self.path_mtu, self.device.query_port(self.port_num).active_mtu)
            ah = AhAttr(self.dgid, hop_limit=CMA_HOP_LIMIT, flow_label=self.flow_label,
                        traffic_class=self.traffic_class)  # fmt: skip
            attr = QpAttr(qp_state=state, ah_attr=ah, path_mtu=mtu,
                          dest_qp_num=path.remote_qpn, rq_psn=self._seq_num(),
                          max_dest_rd_atomic=path.resp, min_rnr_timer=0)  # fmt: skip
            return attr, (
                m.STATE | m.AV | m.PATH_MTU | m.DEST_QPN | m.RQ_PSN | m.MAX_DEST_RD_ATOMIC
                | m.MIN_RNR_TIMER
            )  # fmt: skip
        # the ID's ACK timeout, when set, overrides the CM's
        timeout = path.timeout if self.ack_timeout is None else self.ack_timeout
        attr = QpAttr(qp_state=state, sq_psn=path.sq_psn, timeout=timeout, retry_cnt=path.retry,
                      rnr_retry=path.rnr_retry, max_rd_atomic=path.init)  # fmt: skip
        return attr, (
            m.STATE | m.SQ_PSN | m.TIMEOUT | m.RETRY_CNT | m.RNR_RETRY | m.MAX_QP_RD_ATOMIC
        )

    def _ready_qp(self) -> None:
        """``cma_modify_qp_rtr`` + ``cma_modify_qp_rts``: the ID's own QP
        (if any: an external one is the application's) through INIT, RTR
        and RTS."""
        if self.qp is not None:
            for state in (IbQpState.INIT, IbQpState.RTR, IbQpState.RTS):
                self.qp.modify(*self.init_qp_attr(state))

    def _qp_error(self) -> None:
        """``cma_modify_qp_err``: every outstanding work request flushes."""
        qp = self.qp
        if qp is not None and not qp.destroyed and qp.state not in (
            IbQpState.RESET, IbQpState.ERR
        ):  # fmt: skip
            qp.modify(QpAttr(qp_state=IbQpState.ERR), IbQpAttrMask.STATE)

    def _ready_to_send(self, param: RdmaConnParam, private_max: int) -> tuple[IbDevice, int]:
        """The checks ``rdma_connect`` and ``rdma_accept`` share; the
        device and the connection's QP number: the ID's QP's, else the
        external QP's of ``param.qp_num`` (``id_priv->qp_num``)."""
        if self.device is None or (self.qp is None and not param.qp_num):
            raise RdmaCmError(errno.EINVAL, "create a QP on the ID (or name one in qp_num)")
        if len(param.private_data) > private_max:
            raise RdmaCmError(errno.EINVAL, f"private data over {private_max} bytes")
        return self.device, self.qp.qp_num if self.qp is not None else param.qp_num

    # -- active side -------------------------------------------------------------------

    def connect(self, param: RdmaConnParam | None = None) -> None:
        """``rdma_connect``: send the CM REQ (``cma_connect_ib``); the
        events that follow are ESTABLISHED, REJECTED or UNREACHABLE."""
        param = RdmaConnParam() if param is None else param
        self._check(RdmaCmState.ROUTE_RESOLVED)
        device, qpn = self._ready_to_send(param, REQ_PRIVATE_DATA)
        with device.lock:
            cm_id = ib_cm_port(device, self.port_num).create_id(self._cm_handler, self)
            self._cm_ids = [cm_id]
            hdr = CmaHdr(self.src_addr, self.dst_addr, self.src_port)
            sgid = device.query_gid(self.port_num)
            req = CmReq(
                service_id=rdma_ps_service_id(self.ps, self.dst_port),
                local_qpn=qpn,
                responder_resources=param.responder_resources,
                initiator_depth=param.initiator_depth,
                remote_cm_response_timeout=CMA_CM_RESPONSE_TIMEOUT,
                transport_service_type=0,
                end_to_end_flow_control=bool(param.flow_control),
                starting_psn=self._seq_num(),
                local_cm_response_timeout=CMA_CM_RESPONSE_TIMEOUT,
                retry_count=param.retry_count,
                partition_key=0xFFFF,
                path_mtu=int(self.path_mtu),
                rnr_retry_count=param.rnr_retry_count,
                max_cm_retries=CMA_MAX_CM_RETRIES,
                srq=bool(param.srq),
                primary_local_lid=0xFFFF,
                primary_remote_lid=0xFFFF,
                primary_local_gid=sgid,
                primary_remote_gid=self.dgid,
                primary_flow_label=self.flow_label,
                primary_traffic_class=self.traffic_class,
                primary_hop_limit=CMA_HOP_LIMIT,
                primary_local_ack_timeout=_cm_ack_timeout(
                    device.attrs.local_ca_ack_delay, self.packet_life_time
                ),
                private_data=hdr.encode() + param.private_data,
            )
            self.state = RdmaCmState.CONNECT
            cm_id.send_req(
                req, AhAttr(self.dgid, hop_limit=CMA_HOP_LIMIT, traffic_class=self.traffic_class)
            )

    # -- passive side ------------------------------------------------------------------

    def listen(self, backlog: int = 0) -> None:
        """``rdma_listen``: take connection requests on the bound address
        (every device's for 0.0.0.0) and port; each arrives as a
        CONNECT_REQUEST event with a new ID. ``backlog`` bounds the requests
        not yet accepted or rejected (0: no bound)."""
        if self.state is RdmaCmState.IDLE:
            self.bind_addr()
        self._check(RdmaCmState.ADDR_BOUND)
        if self.reuseaddr:
            # a listener shares its port with nobody: check again without
            # REUSEADDR, and it stays off (cma.c rdma_listen)
            self._check_port(self.src_port, False)
            self.reuseaddr = False
        devices = [self.device] if self.device is not None else ib_devices(self.channel.host)
        service_id = rdma_ps_service_id(self.ps, self.src_port)
        for dev in devices:
            assert dev is not None
            with dev.lock:
                port = ib_cm_port(dev, self.port_num)
                cm_id = port.create_id(self._cm_handler, self)
                self._cm_ids.append(cm_id)
                try:
                    port.listen(cm_id, service_id, backlog)
                except CmIdError as e:  # another process listens on it (shared device)
                    for made in self._cm_ids:
                        made.destroy()
                    self._cm_ids.clear()
                    raise RdmaCmError(errno.EADDRINUSE, str(e)) from None
        self.state = RdmaCmState.LISTEN

    def _new_request(self, cm_id: IbCmId, req: CmReq) -> None:
        """``cma_ib_req_handler``: a REQ for our service: a new ID with the
        addresses of its ``cma_hdr``, and a CONNECT_REQUEST event."""
        try:
            hdr = CmaHdr.decode(req.private_data[:CMA_HDR_SIZE])
        except MalformedMad:
            cm_id.send_rej(CmRejReason.CONSUMER_DEFINED)
            cm_id.destroy()
            return
        if not isinstance(hdr.dst, IPv4Address) or (
            self.src_addr != _ANY and hdr.dst != self.src_addr
        ) or hdr.dst != cm_id.port.device.ip:  # fmt: skip
            cm_id.send_rej(CmRejReason.INVALID_SERVICE_ID)
            cm_id.destroy()
            return
        child = RdmaCmId(self.channel, self.context, self.ps, self.qp_type)
        child.device = cm_id.port.device
        child.port_num = self.port_num
        child.src_addr = hdr.dst
        child.src_port = self.src_port
        assert isinstance(hdr.src, IPv4Address)
        child.dst_addr = hdr.src
        child.dst_port = hdr.src_port
        child.listen_id = self
        child.path_mtu = IbMtu(min(req.path_mtu, int(child.device.query_port().active_mtu)))
        child.flow_label = req.primary_flow_label
        child.traffic_class = req.primary_traffic_class
        child.state = RdmaCmState.CONNECT
        child._req = req
        child._path = _ConnPath(
            remote_qpn=req.local_qpn,
            sq_psn=req.starting_psn,
            resp=req.initiator_depth,  # until accept says otherwise
            init=req.responder_resources,
            timeout=req.primary_local_ack_timeout,
            retry=req.retry_count,
            rnr_retry=req.rnr_retry_count,
        )
        child._cm_ids = [cm_id]
        cm_id.handler = child._cm_handler
        cm_id.context = child
        param = RdmaConnParam(
            private_data=req.private_data[CMA_HDR_SIZE:],
            # The CM swaps them: what the peer reads from us is what we serve.
            responder_resources=req.initiator_depth,
            initiator_depth=req.responder_resources,
            flow_control=int(req.end_to_end_flow_control),
            retry_count=req.retry_count,
            rnr_retry_count=req.rnr_retry_count,
            srq=int(req.srq),
        )
        self.channel._post(RdmaCmEvent(RdmaCmEventType.CONNECT_REQUEST, child, self, 0, param))

    def accept(self, param: RdmaConnParam | None = None) -> None:
        """``rdma_accept``: ready the ID's QP (RTR, then RTS) with the REQ's
        attributes — an external QP, named by ``param.qp_num``, the
        application readies with :meth:`init_qp_attr` — and send the REP
        (``cma_accept_ib``); ESTABLISHED follows the peer's RTU."""
        param = RdmaConnParam() if param is None else param
        self._check(RdmaCmState.CONNECT)
        req, cm_id = self._req, self.cm_id
        if req is None or cm_id is None or cm_id.state not in (
            CmState.REQ_RCVD, CmState.MRA_REQ_SENT
        ):  # fmt: skip
            raise RdmaCmError(errno.EINVAL, f"{self!r} has no connection request to accept")
        device, qpn = self._ready_to_send(param, REP_PRIVATE_DATA)
        assert self._path is not None
        with device.lock:
            self._path.resp = param.responder_resources
            self._path.init = param.initiator_depth
            self._ready_qp()
            rep = CmRep(
                local_qpn=qpn,
                starting_psn=self._seq_num(),
                responder_resources=param.responder_resources,
                initiator_depth=param.initiator_depth,
                target_ack_delay=device.attrs.local_ca_ack_delay,
                end_to_end_flow_control=bool(param.flow_control),
                rnr_retry_count=min(param.rnr_retry_count, 7),
                srq=bool(param.srq),
                private_data=param.private_data,
            )
            cm_id.send_rep(rep)

    def establish(self) -> None:
        """``rdma_establish``: the active side of an external QP, once
        CONNECT_RESPONSE came and the application moved its QP to RTS
        with :meth:`init_qp_attr`, sends the RTU."""
        self._check(RdmaCmState.CONNECT)
        cm_id, device = self.cm_id, self.device
        if self.qp is not None or cm_id is None or device is None or cm_id.state not in (
            CmState.REP_RCVD, CmState.MRA_REP_SENT
        ):  # fmt: skip
            raise RdmaCmError(errno.EINVAL, f"{self!r} has no connection response to establish")
        with device.lock:
            cm_id.send_rtu()

    def reject(self, private_data: bytes = b"") -> None:
        """``rdma_reject``: refuse the connection request (a REJ with
        reason ``CONSUMER_DEFINED``); the peer gets REJECTED."""
        self._check(RdmaCmState.CONNECT)
        cm_id = self.cm_id
        if len(private_data) > REJ_PRIVATE_DATA:
            raise RdmaCmError(errno.EINVAL, f"private data over {REJ_PRIVATE_DATA} bytes")
        if cm_id is None or cm_id.state not in (CmState.REQ_RCVD, CmState.MRA_REQ_SENT):
            raise RdmaCmError(errno.EINVAL, f"{self!r} has no connection request to reject")
        cm_id.send_rej(CmRejReason.CONSUMER_DEFINED, private_data)

    # -- both sides -------------------------------------------------------------------

    def disconnect(self) -> None:
        """``rdma_disconnect``: the QP to ERR (outstanding work requests
        flush), then a DREQ — or the DREP, when the peer disconnected first.
        DISCONNECTED follows (at once when answering a DREQ)."""
        self._check()
        cm_id = self.cm_id
        device = self.device
        if cm_id is None or device is None:
            raise RdmaCmError(errno.EINVAL, f"{self!r} is not connected")
        with device.lock:
            self._qp_error()
            if cm_id.state in (CmState.ESTABLISHED,):
                cm_id.send_dreq()
            elif cm_id.state is CmState.DREQ_RCVD:
                cm_id.send_drep()
            elif cm_id.state in (CmState.REP_SENT, CmState.MRA_REP_RCVD):
                cm_id.notify_established()
                cm_id.send_dreq()
            else:
                raise RdmaCmError(errno.EINVAL, f"{self!r}: nothing to disconnect")

    def destroy(self) -> None:
        """``rdma_destroy_id``: tell the peer as the CM state needs (REJ,
        DREQ or DREP), release the port; no event for it comes after.
        The QP, if any, is the consumer's to destroy (``destroy_qp``)."""
        if self._destroyed:
            return
        self._destroyed = True
        for cm_id in self._cm_ids:
            cm_id.destroy()
        self._cm_ids = []
        if self.listen_id is None:
            self._unbind()
        self.state = RdmaCmState.DESTROYING

    # -- IB CM events -------------------------------------------------------------------

    def _cm_handler(self, cm_id: IbCmId, ev: CmEvent) -> None:
        """``cma_ib_handler`` / ``cma_ib_req_handler``: IB CM events as RDMA
        CM events, with the QP moved as each needs."""
        t = ev.type
        if t is CmEventType.REQ_RECEIVED:
            assert isinstance(ev.msg, CmReq)
            self._new_request(cm_id, ev.msg)
            return
        if self._destroyed:
            return
        post = self.channel._post
        E = RdmaCmEventType
        if t is CmEventType.REP_RECEIVED:
            assert isinstance(ev.msg, CmRep)
            rep = ev.msg
            req = cm_id.conn.req
            assert req is not None
            self._path = _ConnPath(
                remote_qpn=rep.local_qpn,
                sq_psn=rep.starting_psn,
                resp=rep.initiator_depth,
                init=rep.responder_resources,
                timeout=req.primary_local_ack_timeout,
                retry=req.retry_count,
                rnr_retry=rep.rnr_retry_count,
            )
            param = RdmaConnParam(
                private_data=rep.private_data,
                responder_resources=rep.initiator_depth,
                initiator_depth=rep.responder_resources,
                rnr_retry_count=rep.rnr_retry_count,
            )
            if self.qp is None:  # an external QP: the application readies it, then establish()
                post(RdmaCmEvent(E.CONNECT_RESPONSE, self, param=param))
                return
            self._ready_qp()
            cm_id.send_rtu()
            post(RdmaCmEvent(E.ESTABLISHED, self, param=param))
        elif t in (CmEventType.RTU_RECEIVED, CmEventType.USER_ESTABLISHED):
            post(RdmaCmEvent(E.ESTABLISHED, self))
        elif t is CmEventType.REJ_RECEIVED:
            assert isinstance(ev.msg, CmRej)
            self._qp_error()
            param = RdmaConnParam(private_data=ev.msg.private_data)
            post(RdmaCmEvent(E.REJECTED, self, status=ev.msg.reason, param=param))
        elif t in (CmEventType.REQ_ERROR, CmEventType.REP_ERROR):
            self._qp_error()
            post(RdmaCmEvent(E.UNREACHABLE, self, status=-errno.ETIMEDOUT))
        elif t is CmEventType.DREQ_RECEIVED or t in (
            CmEventType.DREP_RECEIVED,
            CmEventType.DREQ_ERROR,
        ):
            self.state = RdmaCmState.DISCONNECT
            post(RdmaCmEvent(E.DISCONNECTED, self))
        elif t is CmEventType.TIMEWAIT_EXIT:
            post(RdmaCmEvent(E.TIMEWAIT_EXIT, self))


def _cm_ack_timeout(ca_ack_delay: int, packet_life_time: int) -> int:
    """cm.c ``cm_ack_timeout``: the local ACK timeout a REQ asks for, from the
    CA's ACK delay and the path's packet life time (RoCE: 15 and 18 → 19)."""
    ack = packet_life_time + 1
    if ack >= ca_ack_delay:
        ack += int(ca_ack_delay >= ack - 1)
    else:
        ack = ca_ack_delay + int(ack >= ca_ack_delay - 1)
    return min(31, ack)
