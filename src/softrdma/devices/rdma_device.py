"""The driver shared by every simulated RDMA device: it hosts one transport
engine per QP, puts their packets on the fabric as RoCEv2 frames, feeds
them received frames and timer ticks, and turns their completions and
events into CQ entries and asynchronous events.

Kernel counterparts: ``rxe_verbs.c`` (the ``ib_device_ops``), ``rxe_net.c``
(``rxe_send``, ``rxe_udp_encap_recv``, ``prepare4``), ``rxe_recv.c``
(``rxe_rcv``: header checks and dispatch to the QP), ``rxe_task.c``
(when the engines run).

How the engines run (the progress model): posting a work request rings a
doorbell, which schedules the QP's engines on the fabric's event loop; the
engines run when the loop does — inside ``poll_cq`` (which lets the loop
run until a completion arrives or nothing is left to do), or when the
caller runs ``fabric.loop`` itself. A received frame runs the addressed
QP's engines in its delivery event, and each engine's next deadline
(retransmit, RNR wait) is a timer on the loop.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address

from softrdma.devices.eventloop import TimerHandle
from softrdma.devices.memport import QpMemory
from softrdma.dma.device import Device
from softrdma.fabric.inproc import Fabric
from softrdma.transport.headers import MalformedPacket
from softrdma.transport.icrc import IcrcError
from softrdma.transport.params import QpParams
from softrdma.transport.rc import RcTransport
from softrdma.transport.roce import (
    IpIdentGenerator,
    RoceFrame,
    decode_roce_v2,
    encode_roce_v2,
    rdma_get_udp_sport,
    rdma_gid2ip,
    rxe_qp_src_port,
)
from softrdma.transport.ud import UdTransport
from softrdma.transport.wqe import Completion, CqSide, OutPacket, Output, QpFatal, SendWqe
from softrdma.verbs.device import DeviceAttr, IbDevice, IbEvent
from softrdma.verbs.enums import IbEventType, IbQpState, IbQpType, IbSendFlags
from softrdma.verbs.qp import QpAttr, QueuePair
from softrdma.verbs.wr import RecvWR, SendWR

log = logging.getLogger("softrdma.devices")

Engine = RcTransport | UdTransport
_BROADCAST = b"\xff" * 6
#: How long one ``poll_cq`` lets the hardware run when nothing completes:
#: events, and seconds of simulated time (a QP retrying forever must not
#: hang the caller; like polling hardware, poll then returns empty).
PROGRESS_MAX_EVENTS = 200_000
PROGRESS_MAX_TIME = 1.0


def mac_for_ip(ip: IPv4Address) -> bytes:
    """A locally administered MAC derived from the port's IPv4 address."""
    return b"\x02\x00" + ip.packed


class RdmaDevice(IbDevice):
    """A RoCEv2 RDMA device on a :class:`~softrdma.fabric.inproc.Fabric`.
    Subclasses decide how it reaches memory (its ``dma_device``)."""

    def __init__(
        self,
        name: str,
        dma_device: Device,
        attrs: DeviceAttr,
        fabric: Fabric,
        ip: str | IPv4Address,
        *,
        netdev_mtu: int = 1500,
        local_dma_lkey: int = 0,
    ) -> None:
        addr = IPv4Address(ip)
        super().__init__(
            name,
            dma_device,
            attrs,
            ip=addr,
            mac=mac_for_ip(addr),
            netdev_mtu=netdev_mtu,
            local_dma_lkey=local_dma_lkey,
        )
        self.fabric = fabric
        self.loop = fabric.loop
        self._port = fabric.attach(self)
        self._engines: dict[int, Engine] = {}
        self._memports: dict[int, QpMemory] = {}
        self._timers: dict[int, TimerHandle] = {}
        self._kicked: set[int] = set()
        self._ip_ident = IpIdentGenerator()
        self._saddr = addr.packed
        self._routes: dict[bytes, tuple[bytes, bytes]] = {}
        self._sports: dict[int, int] = {}
        self.stats: Counter[str] = Counter()
        """Frames sent / received / dropped, by reason (``rx_bad_icrc``, ...)."""

    # -- QP lifecycle (ib_device_ops) --------------------------------------------

    def ops_create_qp(self, qp: QueuePair) -> None:
        mem = QpMemory(self, qp)
        self._memports[qp.qp_num] = mem
        self._engines[qp.qp_num] = self._new_engine(qp, mem)

    @staticmethod
    def _new_engine(qp: QueuePair, mem: QpMemory) -> Engine:
        if qp.qp_type == IbQpType.RC:
            return RcTransport(qp.qp_num, mem)
        return UdTransport(qp.qp_num, mem)

    def ops_modify_qp(self, qp: QueuePair, attr: QpAttr, mask: int) -> None:
        a = qp.attr
        params = QpParams(
            qp.qp_num,
            qp.qp_type if qp.qp_type != IbQpType.GSI else IbQpType.UD,
            dest_qpn=a.dest_qp_num,
            path_mtu=a.path_mtu.size,
            sq_psn=a.sq_psn,
            rq_psn=a.rq_psn,
            timeout=a.timeout,
            retry_cnt=a.retry_cnt,
            rnr_retry=a.rnr_retry,
            min_rnr_timer=a.min_rnr_timer,
            max_rd_atomic=a.max_rd_atomic,
            max_dest_rd_atomic=a.max_dest_rd_atomic,
            qkey=a.qkey,
            sq_sig_all=qp.sq_sig_all,
            qp_access_flags=a.qp_access_flags,
        )
        if qp.state == IbQpState.RESET:
            self._cancel_timer(qp.qp_num)
            self._engines[qp.qp_num] = self._new_engine(qp, self._memports[qp.qp_num])
        self._sports.pop(qp.qp_num, None)  # the path may have changed
        engine = self._engines[qp.qp_num]
        engine.modify(params, qp.state)
        if qp.state == IbQpState.ERR:
            self._cancel_timer(qp.qp_num)
            self._deliver(qp, engine.flush())
        self._kick(qp.qp_num)

    def ops_post_send(self, qp: QueuePair, wrs: Sequence[SendWR]) -> None:
        engine = self._engines[qp.qp_num]
        for wr in wrs:
            inline = None
            if wr.send_flags & IbSendFlags.INLINE:
                # Inline SGEs hold CPU addresses: the driver copies the bytes
                # into the WQE at post time (mlx5 set_data_inl_seg, rxe
                # copy_inline_data_to_wqe), no lkey involved.
                inline = b"".join(bytes(self.host.cpu_read(s.addr, s.length)) for s in wr.sg_list)
            engine.post_send(SendWqe.from_wr(wr, sq_sig_all=qp.sq_sig_all, inline_data=inline))
        self._after_post(qp, engine)

    def ops_post_recv(self, qp: QueuePair, wrs: Sequence[RecvWR]) -> None:
        engine = self._engines[qp.qp_num]
        for wr in wrs:
            engine.post_recv(wr)
        self._after_post(qp, engine)

    def _after_post(self, qp: QueuePair, engine: Engine) -> None:
        if qp.state == IbQpState.ERR:
            # IBTA: work requests posted in ERR complete with a flush error.
            self._deliver(qp, engine.flush())
        else:
            self._kick(qp.qp_num)

    def ops_destroy_qp(self, qp: QueuePair) -> None:
        self._cancel_timer(qp.qp_num)
        self._engines.pop(qp.qp_num, None)
        self._memports.pop(qp.qp_num, None)
        self._kicked.discard(qp.qp_num)

    def ops_progress(self, until: Callable[[], bool]) -> None:
        """Run the event loop until ``until()`` holds, nothing is pending,
        or a generous budget of events / simulated time is spent."""
        loop = self.loop
        if loop.running:
            return  # called from inside an event: the loop is already running
        loop.run_until(until, timeout=PROGRESS_MAX_TIME, max_events=PROGRESS_MAX_EVENTS)

    # -- running the engines ----------------------------------------------------

    def _kick(self, qpn: int) -> None:
        """Ring the doorbell: run the QP's engines soon (``rxe_sched_task``)."""
        if qpn not in self._kicked:
            self._kicked.add(qpn)
            self.loop.call_soon(self._run, qpn)

    def _run(self, qpn: int) -> None:
        self._kicked.discard(qpn)
        engine = self._engines.get(qpn)
        qp = self.qp_by_num(qpn)
        if engine is None or qp is None:
            return
        out = engine.poll(self.loop.now)
        if out:
            self._handle(qp, engine, out)
        self._arm_timer(qpn, engine)

    def _arm_timer(self, qpn: int, engine: Engine) -> None:
        deadline = engine.next_deadline()
        timer = self._timers.get(qpn)
        if timer is not None and not timer.cancelled and not timer.done:
            if deadline is not None and timer.when == deadline:
                return
            timer.cancel()
        if deadline is None:
            self._timers.pop(qpn, None)
        else:
            self._timers[qpn] = self.loop.call_at(max(deadline, self.loop.now), self._run, qpn)

    def _cancel_timer(self, qpn: int) -> None:
        timer = self._timers.pop(qpn, None)
        if timer is not None:
            timer.cancel()

    def _handle(self, qp: QueuePair, engine: Engine, out: Output) -> None:
        for op in out.packets:
            self._transmit(qp, op)
        self._deliver(qp, out.completions)
        for event in out.events:
            if isinstance(event, QpFatal):
                self.dispatch_event(IbEvent(event.event, self, qp=qp, reason=event.reason))
                qp.to_error(event.reason)
            elif qp.attr.en_sqd_async_notify:
                self.dispatch_event(IbEvent(IbEventType.SQ_DRAINED, self, qp=qp))

    def _deliver(self, qp: QueuePair, completions: Sequence[Completion]) -> None:
        for c in completions:
            if c.side is CqSide.SEND:
                qp.send_cq.push(c.wc)
            else:
                qp.rq_outstanding -= 1
                qp.recv_cq.push(c.wc, c.solicited)
        engine = self._engines.get(qp.qp_num)
        if engine is not None:
            qp.sq_outstanding = engine.sq_outstanding

    # -- the wire (rxe_net.c) -------------------------------------------------------

    def _transmit(self, qp: QueuePair, op: OutPacket) -> None:
        if op.dest is None:
            ah = qp.attr.ah_attr
            assert ah is not None
            dgid = ah.dgid
            sport = self._sports.get(qp.qp_num) or self._rc_sport(qp)
        else:
            assert op.dest.wr.ah is not None
            dgid = op.dest.wr.ah.attr.dgid
            sport = rxe_qp_src_port(qp.qp_num)
        daddr, dmac = self._route(dgid)
        frame = RoceFrame.build(
            op.pkt,
            self._saddr,
            daddr,
            sport,
            eth_dst=dmac,
            eth_src=self.mac,
            ip_id=self._ip_ident(self._saddr, daddr),
        )
        self.stats["tx_frames"] += 1
        self._port.transmit(encode_roce_v2(frame))

    def _rc_sport(self, qp: QueuePair) -> int:
        """An RC QP's UDP source port, fixed once it is connected (rxe sets
        it in ``rxe_modify_qp`` from the flow label or the two QPNs)."""
        ah = qp.attr.ah_attr
        assert ah is not None
        sport = rdma_get_udp_sport(ah.flow_label, qp.qp_num, qp.attr.dest_qp_num)
        self._sports[qp.qp_num] = sport
        return sport

    def _route(self, dgid: bytes) -> tuple[bytes, bytes]:
        """Destination address and MAC for a GID (rxe's ``rxe_find_route``
        and neighbour lookup), cached once the neighbour is known."""
        route = self._routes.get(dgid)
        if route is None:
            dst = rdma_gid2ip(dgid)
            mac = self.fabric.lookup_mac(dst)
            route = (dst.packed, mac or _BROADCAST)
            if mac is not None:
                self._routes[dgid] = route
        return route

    def receive_frame(self, frame: bytes) -> None:
        """A frame from the fabric (``rxe_udp_encap_recv`` → ``rxe_rcv``):
        bad ICRC or headers, another destination, an unknown QP, or RC
        from an address that is not the QP's peer — dropped silently."""
        try:
            rf = decode_roce_v2(frame)
        except IcrcError:
            self.stats["rx_bad_icrc"] += 1
            return
        except MalformedPacket:
            self.stats["rx_bad_frame"] += 1
            return
        if rf.daddr != self._saddr:
            self.stats["rx_wrong_address"] += 1
            return
        pkt = rf.packet
        if pkt.bth.pkey != 0xFFFF:
            self.stats["rx_bad_pkey"] += 1
            return
        qpn = pkt.bth.dest_qp
        engine = self._engines.get(qpn)
        qp = self.qp_by_num(qpn)
        if engine is None or qp is None:
            self.stats["rx_no_qp"] += 1
            return
        self.stats["rx_frames"] += 1
        if isinstance(engine, UdTransport):
            engine.receive(pkt, self.loop.now, sgid=_gid(rf.saddr), dgid=_gid(rf.daddr))
        else:
            ah = qp.attr.ah_attr
            if ah is None or rf.saddr != self._route(ah.dgid)[0]:
                self.stats["rx_wrong_peer"] += 1
                return
            engine.receive(pkt, self.loop.now)
        self._run(qpn)


def _gid(addr: bytes) -> bytes:
    return addr if len(addr) == 16 else bytes(10) + b"\xff\xff" + addr
