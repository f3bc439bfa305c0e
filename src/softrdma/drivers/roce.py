"""The driver shared by every simulated RDMA device: it hosts one transport
engine per QP, hands their packets to its network link, feeds them
received packets and timer ticks, and turns their completions and events
into CQ entries and asynchronous events.

Kernel counterparts: ``rxe_verbs.c`` (the ``ib_device_ops``), ``rxe_net.c``
(``rxe_send`` → the link), ``rxe_recv.c`` (``rxe_rcv``: header checks and
dispatch to the QP), ``rxe_task.c`` (when the engines run),
``rxe_hw_counters.c`` (:attr:`RoceDevice.stats`).

How the engines run (the progress model): posting a work request rings a
doorbell, which schedules the QP's engines on the link's scheduler
(``call_soon``); a received packet runs the addressed QP's engines at
once; each engine's next deadline (retransmit, RNR wait) is a timer. On
simulated time (the in-process fabric) all of that runs when the
application polls a CQ or runs the loop; on real time (UDP) it runs on the
scheduler's progress thread whether or not anybody polls. Either way every
engine runs holding the scheduler's lock, which the verbs take too.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address

from softrdma.dma.device import Device
from softrdma.drivers.qp_memory import QpMemory
from softrdma.fabric.link import Link, Network
from softrdma.time.base import Handle, Scheduler
from softrdma.transport.params import QpParams
from softrdma.transport.rc import RcTransport
from softrdma.transport.roce import (
    RoceFrame,
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

log = logging.getLogger("softrdma.drivers")

Engine = RcTransport | UdTransport


class RoceDevice(IbDevice):
    """A RoCEv2 RDMA device with address ``ip`` on ``network`` (the
    in-process :class:`~softrdma.fabric.inproc.Fabric` or a
    :class:`~softrdma.fabric.udp.UdpNetwork`). ``netdev_mtu`` overrides the
    link's MTU. Subclasses decide how it reaches memory (its
    ``dma_device``)."""

    def __init__(
        self,
        name: str,
        dma_device: Device,
        attrs: DeviceAttr,
        network: Network,
        ip: str | IPv4Address,
        *,
        netdev_mtu: int | None = None,
        local_dma_lkey: int = 0,
    ) -> None:
        self.stats: Counter[str] = Counter()
        """Packets sent and received, and dropped by reason (``rx_bad_icrc``,
        ``rx_no_qp``, ...), plus the transport's counters (rxe's
        ``hw_counters``: ``completer_retry_err``, ``rcvd_seq_err``, ...)."""
        link: Link = network.open_link(ip, self, mtu=netdev_mtu)
        super().__init__(
            name,
            dma_device,
            attrs,
            ip=link.address,
            mac=link.mac,
            netdev_mtu=link.mtu,
            local_dma_lkey=local_dma_lkey,
            lock=link.scheduler.lock,
        )
        self.link = link
        self.scheduler: Scheduler = link.scheduler
        self._engines: dict[int, Engine] = {}
        self._memports: dict[int, QpMemory] = {}
        self._timers: dict[int, Handle] = {}
        self._kicked: set[int] = set()
        self._saddr = link.address.packed
        self._routes: dict[bytes, bytes] = {}
        self._sports: dict[int, int] = {}

    # -- QP lifecycle (ib_device_ops) --------------------------------------------

    def ops_create_qp(self, qp: QueuePair) -> None:
        mem = QpMemory(self, qp)
        self._memports[qp.qp_num] = mem
        self._engines[qp.qp_num] = self._new_engine(qp, mem)

    def _new_engine(self, qp: QueuePair, mem: QpMemory) -> Engine:
        if qp.qp_type == IbQpType.RC:
            return RcTransport(qp.qp_num, mem, self.stats)
        return UdTransport(qp.qp_num, mem, self.stats)

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
        """Let the hardware run for a poller that found nothing
        (:meth:`Scheduler.progress <softrdma.time.base.Scheduler.progress>`)."""
        self.scheduler.progress(until)

    def ops_wait(self, until: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``until()`` holds or ``timeout`` seconds pass
        (:meth:`Scheduler.wait <softrdma.time.base.Scheduler.wait>`)."""
        return self.scheduler.wait(until, timeout)

    def ops_unregister(self) -> None:
        """Detach from the network (``rxe_net_del``): cancel the timers and
        close the link."""
        for qpn in list(self._timers):
            self._cancel_timer(qpn)
        self.link.close()

    # -- running the engines ----------------------------------------------------

    def _kick(self, qpn: int) -> None:
        """Ring the doorbell: run the QP's engines soon (``rxe_sched_task``)."""
        if qpn not in self._kicked:
            self._kicked.add(qpn)
            self.scheduler.call_soon(self._run, qpn)

    def _run(self, qpn: int) -> None:
        self._kicked.discard(qpn)
        engine = self._engines.get(qpn)
        qp = self.qp_by_num(qpn)
        if engine is None or qp is None:
            return
        out = engine.poll(self.scheduler.time())
        if out:
            self._handle(qp, engine, out)
        self._arm_timer(qpn, engine)

    def _arm_timer(self, qpn: int, engine: Engine) -> None:
        deadline = engine.next_deadline()
        timer = self._timers.get(qpn)
        if timer is not None and not timer.done:
            if deadline is not None and timer.when == deadline:
                return
            timer.cancel()
        if deadline is None:
            self._timers.pop(qpn, None)
        else:
            now = self.scheduler.time()
            self._timers[qpn] = self.scheduler.call_at(max(deadline, now), self._run, qpn)

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
        self.stats["sent_pkts"] += 1
        self.link.transmit(op.pkt, self._route(dgid), sport)

    def _rc_sport(self, qp: QueuePair) -> int:
        """An RC QP's UDP source port, fixed once it is connected (rxe sets
        it in ``rxe_modify_qp`` from the flow label or the two QPNs)."""
        ah = qp.attr.ah_attr
        assert ah is not None
        sport = rdma_get_udp_sport(ah.flow_label, qp.qp_num, qp.attr.dest_qp_num)
        self._sports[qp.qp_num] = sport
        return sport

    def _route(self, dgid: bytes) -> bytes:
        """The packed destination address of a GID (rxe's ``rxe_find_route``
        with the RoCEv2 ``rdma_gid2ip``), cached."""
        daddr = self._routes.get(dgid)
        if daddr is None:
            daddr = self._routes[dgid] = rdma_gid2ip(dgid).packed
        return daddr

    def receive_roce(self, rf: RoceFrame) -> None:
        """A packet from the link (``rxe_rcv``): another destination, a bad
        P_Key, an unknown QP, or RC from an address that is not the QP's
        peer — counted and dropped silently, as rxe does."""
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
        if isinstance(engine, UdTransport):
            self.stats["rcvd_pkts"] += 1
            engine.receive(pkt, self.scheduler.time(), sgid=_gid(rf.saddr), dgid=_gid(rf.daddr))
        else:
            ah = qp.attr.ah_attr
            if ah is None or rf.saddr != self._route(ah.dgid):
                self.stats["rx_wrong_peer"] += 1
                return
            self.stats["rcvd_pkts"] += 1
            engine.receive(pkt, self.scheduler.time())
        self._run(qpn)

    def receive_error(self, reason: str) -> None:
        """A datagram the link dropped before the transport (bad ICRC,
        truncated, ...): counted as ``rx_<reason>``."""
        self.stats["rx_" + reason] += 1


def _gid(addr: bytes) -> bytes:
    return addr if len(addr) == 16 else bytes(10) + b"\xff\xff" + addr
