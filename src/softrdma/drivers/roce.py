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

import errno
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address

from softrdma.dma.device import Device
from softrdma.drivers.qp_memory import QpMemory
from softrdma.fabric.link import Link, Network
from softrdma.time.base import Handle
from softrdma.transport.burst import BurstItem, RoceBurst, SegRun
from softrdma.transport.packet import Packet
from softrdma.transport.rc import REQUESTER_STATES, RcQp
from softrdma.transport.roce import (
    RoceFrame,
    rdma_get_udp_sport,
    rdma_gid2ip,
    rxe_qp_src_port,
)
from softrdma.transport.srq import SharedRq
from softrdma.transport.uc import UcQp
from softrdma.transport.ud import UdQp
from softrdma.transport.wqe import (
    CqSide,
    LastWqeReached,
    OutPacket,
    Output,
    QpFatal,
    SendWqe,
    SqDrained,
    SrqLimitReached,
    check_send_wr,
)
from softrdma.transport.xrc import XrcIniQp, XrcSrq, XrcTgtQp, xrc_supports
from softrdma.verbs.device import DeviceAttr, IbDevice, IbEvent
from softrdma.verbs.enums import IbEventType, IbQpState, IbQpType, IbSendFlags, IbSrqAttrMask
from softrdma.verbs.errors import PostError
from softrdma.verbs.qp import QpAttr, QueuePair
from softrdma.verbs.srq import SharedReceiveQueue, SrqAttr
from softrdma.verbs.wr import RecvWR, SendWR

log = logging.getLogger("softrdma.drivers")

Engine = RcQp | UcQp | UdQp
_POST_AS = {IbQpType.GSI: IbQpType.UD, IbQpType.XRC_INI: IbQpType.RC}
"""The QP type whose send opcodes a type posts (``validate_send_wr``)."""
_INLINE = int(IbSendFlags.INLINE)  # (IntFlag's & is slow: once per WR posted)


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
            scheduler=link.scheduler,
            share=link.device_share,
        )
        self.link = link
        self._engines: dict[int, Engine] = {}
        self._srqs: dict[int, SharedRq] = {}
        self._timers: dict[int, Handle] = {}
        self._kicked: set[int] = set()
        self._saddr = link.address.packed
        self._routes: dict[bytes, bytes] = {}
        self._rc_paths: dict[int, tuple[bytes, int]] = {}
        """RC QPN -> (peer's packed address, UDP source port), fixed while
        the QP is not modified (rxe keeps both in the QP once connected)."""
        self._rc_rx: dict[int, tuple[RcQp, QueuePair, bytes]] = {}
        """RC QPN -> (engine, QP, peer's packed address): what
        :meth:`receive_roce` looks up per packet, until the QP is modified
        or destroyed."""
        # Segmentation offload, where the link carries bursts (the
        # in-process fabric): the link's transmit_burst / offload_active.
        self._transmit_burst: Callable[[list[BurstItem], bytes, int], float | None] | None = (
            getattr(link, "transmit_burst", None)
        )
        self._offload: Callable[[], bool] | None = getattr(link, "offload_active", None)
        self._collect: list[tuple[tuple[bytes, int], list[BurstItem]]] | None = None
        """While a burst is received: what the QPs send meanwhile, per path
        in order, sent when the burst is done (:meth:`receive_burst`)."""

    # -- QP lifecycle (ib_device_ops) --------------------------------------------

    def ops_create_qp(self, qp: QueuePair) -> Engine:
        """The QP's transport object, which owns its state (``rxe_qp_init``)."""
        mem = QpMemory(self, qp)
        srq = None if qp.srq is None else self._srqs[qp.srq.srq_num]
        engine: Engine
        if qp.qp_type == IbQpType.RC:
            engine = RcQp(qp.qp_num, mem, sq_sig_all=qp.sq_sig_all, counters=self.stats, srq=srq)
            engine.offload = self._offload
        elif qp.qp_type == IbQpType.XRC_INI:
            # No segmentation offload: XRC packets go frame by frame.
            engine = XrcIniQp(qp.qp_num, mem, sq_sig_all=qp.sq_sig_all, counters=self.stats)
        elif qp.qp_type == IbQpType.XRC_TGT:
            engine = XrcTgtQp(
                qp.qp_num,
                mem,
                xrcd=qp.xrcd,
                srq_lookup=self._xrc_srq,
                srq_mem=self._xrc_mem(qp),
                counters=self.stats,
            )
        elif qp.qp_type == IbQpType.UC:
            engine = UcQp(qp.qp_num, mem, sq_sig_all=qp.sq_sig_all, counters=self.stats, srq=srq)
        else:
            engine = UdQp(qp.qp_num, mem, sq_sig_all=qp.sq_sig_all, counters=self.stats, srq=srq)
            engine.mtu = self.query_port().active_mtu.size
        self._engines[qp.qp_num] = engine
        return engine

    def ops_modify_qp(self, qp: QueuePair, attr: QpAttr, mask: int) -> None:
        """``rxe_modify_qp``: the engine takes the attributes and the state."""
        engine = self._engines[qp.qp_num]
        engine.modify(attr, mask)
        # the path or the state may have changed: look them up again
        self._rc_paths.pop(qp.qp_num, None)
        self._rc_rx.pop(qp.qp_num, None)
        if engine.state in (IbQpState.RESET, IbQpState.ERR):
            self._cancel_timer(qp.qp_num)
        self._kick(qp.qp_num)  # deliver a flush, start sending

    def ops_post_send(self, qp: QueuePair, wrs: Sequence[SendWR]) -> None:
        """``rxe_post_send``: ``validate_send_wr`` with the WR opcode table,
        inline data copied, then the doorbell."""
        engine = self._engines[qp.qp_num]
        qp_type = _POST_AS.get(qp.qp_type, qp.qp_type)
        sig_all = qp.sq_sig_all
        xrc_ini = qp.qp_type == IbQpType.XRC_INI
        try:
            for wr in wrs:
                why = check_send_wr(wr, qp_type)
                if why is None and xrc_ini and not xrc_supports(wr.opcode):
                    why = f"{wr.opcode.name} is not valid on an XRC_INI QP"
                if why is not None:
                    raise PostError(errno.EINVAL, f"QP {qp.qp_num:#x}: {why}", wr)
                inline = None
                if int(wr.send_flags) & _INLINE:
                    # Inline SGEs hold CPU addresses: the driver copies the
                    # bytes into the WQE at post time (mlx5 set_data_inl_seg,
                    # rxe copy_inline_data_to_wqe), no lkey involved.
                    inline = b"".join(
                        bytes(self.host.cpu_read(s.addr, s.length)) for s in wr.sg_list
                    )
                engine.post_send(SendWqe.from_wr(wr, sq_sig_all=sig_all, inline_data=inline))
        finally:
            self._kick(qp.qp_num)

    def ops_post_recv(self, qp: QueuePair, wrs: Sequence[RecvWR]) -> None:
        engine = self._engines[qp.qp_num]
        for wr in wrs:
            engine.post_recv(wr)
        self._kick(qp.qp_num)

    def ops_destroy_qp(self, qp: QueuePair) -> None:
        self._cancel_timer(qp.qp_num)
        self._rc_paths.pop(qp.qp_num, None)
        self._rc_rx.pop(qp.qp_num, None)
        self._engines.pop(qp.qp_num, None)
        self._kicked.discard(qp.qp_num)

    # -- SRQ lifecycle (rxe_srq.c) ---------------------------------------------------

    def ops_create_srq(self, srq: SharedReceiveQueue, attr: SrqAttr) -> SharedRq:
        """``rxe_create_srq``: the queue the QPs attached to it take from."""
        hw: SharedRq
        if srq.xrcd is not None:
            hw = XrcSrq(srq.srq_num, attr.max_wr, attr.max_sge, attr.srq_limit, xrcd=srq.xrcd)
        else:
            hw = SharedRq(srq.srq_num, attr.max_wr, attr.max_sge, attr.srq_limit)
        self._srqs[srq.srq_num] = hw
        return hw

    def _xrc_srq(self, srqn: int) -> XrcSrq | None:
        """The XRC SRQ numbered ``srqn``, for a TGT QP's XRCETH."""
        hw = self._srqs.get(srqn)
        return hw if isinstance(hw, XrcSrq) else None

    def _xrc_mem(self, qp: QueuePair) -> Callable[[XrcSrq], QpMemory]:
        """A TGT QP's memory port per XRC SRQ: keys checked against the
        SRQ's PD (made on first use, kept while the SRQ lives)."""
        ports: dict[int, tuple[XrcSrq, QpMemory]] = {}

        def mem_of(hw: XrcSrq) -> QpMemory:
            got = ports.get(hw.srqn)
            if got is None or got[0] is not hw:
                srq = self._tables.srqs[hw.srqn]
                got = ports[hw.srqn] = (hw, QpMemory(self, qp, srq.pd))
            return got[1]

        return mem_of

    def ops_post_srq_recv(self, srq: SharedReceiveQueue, wrs: Sequence[RecvWR]) -> None:
        """``rxe_post_srq_recv``. Nothing to kick: a sender refused with an
        RNR NAK retries on its own timer."""
        hw = self._srqs[srq.srq_num]
        for wr in wrs:
            hw.post_recv(wr)

    def ops_modify_srq(self, srq: SharedReceiveQueue, attr: SrqAttr, mask: IbSrqAttrMask) -> None:
        """``rxe_modify_srq``."""
        self._srqs[srq.srq_num].modify(
            attr.max_wr if mask & IbSrqAttrMask.MAX_WR else None,
            attr.srq_limit if mask & IbSrqAttrMask.LIMIT else None,
        )

    def ops_destroy_srq(self, srq: SharedReceiveQueue) -> None:
        """``rxe_destroy_srq``: its WQEs go without completions."""
        hw = self._srqs.pop(srq.srq_num, None)
        if hw is not None:
            hw.clear()

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
        if engine is not None and qp is not None:
            self._poll(qp, engine, self.scheduler.time())

    def _poll(self, qp: QueuePair, engine: Engine, now: float) -> None:
        """Run the QP's engines at ``now``, hand their output on, and set
        their next run."""
        out = engine.poll(now)
        resume = self._handle(qp, out) if out else None
        self._arm_timer(qp.qp_num, engine, resume, now)

    def _arm_timer(self, qpn: int, engine: Engine, resume: float | None, now: float) -> None:
        """The QP's next run: its earliest timer, or — when it holds back a
        READ reply — once the link has carried what it just sent (``resume``;
        rxe waits for its in-flight skbs to be freed)."""
        deadline = engine.next_deadline()
        if engine.reply_pending():
            at = engine.reply_hold if resume is None else max(resume, now)
            engine.reply_hold = at
            deadline = at if deadline is None else min(deadline, at)
        self._set_timer(qpn, deadline, now)

    def _set_timer(self, qpn: int, deadline: float | None, now: float) -> None:
        """Run the QP at ``deadline`` (not before ``now``; ``None``: no
        run), keeping its timer when it is already set for then."""
        timer = self._timers.get(qpn)
        if timer is None:
            if deadline is not None:
                self._timers[qpn] = self.scheduler.call_at(max(deadline, now), self._run, qpn)
            return
        if not timer.done:
            if deadline is not None and timer.when == max(deadline, now):
                return
            timer.cancel()
        if deadline is None:
            self._timers.pop(qpn, None)
        else:
            self._timers[qpn] = self.scheduler.call_at(max(deadline, now), self._run, qpn)

    def _cancel_timer(self, qpn: int) -> None:
        timer = self._timers.pop(qpn, None)
        if timer is not None:
            timer.cancel()

    def _handle(self, qp: QueuePair, out: Output) -> float | None:
        """Transmit, complete, and report events; return when the link is done
        with the last packet (None: at once, or not yet sent: see
        :meth:`receive_burst`)."""
        done = None
        packets = out.packets
        if packets:
            items: list[BurstItem] = []
            nframes = len(packets)
            for op in packets:
                run = op.run
                if run is None:
                    items.append(op.pkt)
                else:
                    items.append(run)
                    nframes += run.count - 1
            self.stats["sent_pkts"] += nframes
            burst = self._transmit_burst
            if packets[0].dest is None and burst is not None:
                # RC: to the connected peer, all of it as one burst.
                path = self._rc_paths.get(qp.qp_num) or self._rc_path(qp)
                collect = self._collect
                if collect is not None:
                    engine = self._engines.get(qp.qp_num)
                    if engine is not None and not engine.reply_pending():
                        # Receiving a burst: send with what the other QPs
                        # send meanwhile, in order (a READ reply, paced by
                        # when the link is done, goes at once).
                        if collect and collect[-1][0] == path:
                            collect[-1][1].extend(items)
                        else:
                            collect.append((path, items))
                        items = []
                    else:
                        self._flush()
                if items:
                    if nframes == 1:
                        pkt = items[0]
                        assert isinstance(pkt, Packet)
                        done = self.link.transmit(pkt, path[0], path[1])
                    else:
                        done = burst(items, path[0], path[1])
            else:
                if self._collect:
                    self._flush()
                transmit = self.link.transmit
                path = None
                for op in packets:
                    if op.dest is None:  # RC: to the connected peer
                        if path is None:
                            path = self._rc_paths.get(qp.qp_num) or self._rc_path(qp)
                        run = op.run
                        for pkt in (op.pkt,) if run is None else run.packets():
                            done = transmit(pkt, path[0], path[1])
                    else:
                        done = self._transmit_ud(qp, op)
        if self._collect and (out.completions or out.events):
            # Application code may run from here (a CQ's comp_handler, an
            # event handler): what was sent before it is on the wire.
            self._flush()
        tgt = self._engines.get(qp.qp_num) if qp.qp_type == IbQpType.XRC_TGT else None
        for c in out.completions:
            if c.side is CqSide.SEND:
                qp.send_cq.push(c.wc)
            elif isinstance(tgt, XrcTgtQp):
                # to the CQ of the XRC SRQ that supplied the WQE
                xsrq = tgt.srq_of(c)
                vsrq = None if xsrq is None else self._tables.srqs.get(xsrq.srqn)
                if vsrq is not None and vsrq.cq is not None:
                    vsrq.cq.push(c.wc, c.solicited)
            else:
                qp.recv_cq.push(c.wc, c.solicited)
        for event in out.events:
            if isinstance(event, QpFatal):
                self.dispatch_event(IbEvent(event.event, self, qp=qp, reason=event.reason))
            elif isinstance(event, SqDrained):
                if qp.hw.attr.en_sqd_async_notify:
                    self.dispatch_event(IbEvent(IbEventType.SQ_DRAINED, self, qp=qp))
            elif isinstance(event, SrqLimitReached):
                # (an XRC TGT QP's SRQ is the one its request named)
                srq = qp.srq if qp.srq is not None else self._tables.srqs.get(event.srqn)
                if srq is not None:
                    ev = IbEvent(IbEventType.SRQ_LIMIT_REACHED, self, srq=srq)
                    self.dispatch_event(ev)
            elif isinstance(event, LastWqeReached):
                self.dispatch_event(IbEvent(IbEventType.LAST_WQE_REACHED, self, qp=qp))
        return done

    # -- the wire (rxe_net.c) -------------------------------------------------------

    def _flush(self) -> None:
        """Send what was held back while receiving a burst, in order."""
        collect = self._collect
        if not collect:
            return
        burst = self._transmit_burst
        assert burst is not None
        held = list(collect)
        collect.clear()
        for (daddr, sport), items in held:
            if len(items) == 1 and type(items[0]) is not SegRun:
                pkt = items[0]
                assert isinstance(pkt, Packet)
                self.link.transmit(pkt, daddr, sport)
            else:
                burst(items, daddr, sport)

    def _transmit_ud(self, qp: QueuePair, op: OutPacket) -> float | None:
        """A UD packet to the address vector of its work request, from the
        QPN's fixed source port (``rxe_qp_src_port``)."""
        assert op.dest is not None and op.dest.wr.ah is not None
        dgid = op.dest.wr.ah.attr.dgid
        sport = rxe_qp_src_port(qp.qp_num)
        return self.link.transmit(op.pkt, self._route(dgid), sport)

    def _rc_path(self, qp: QueuePair) -> tuple[bytes, int]:
        """An RC QP's peer address and UDP source port, fixed once it is
        connected (rxe sets the port in ``rxe_modify_qp`` from the flow label
        or the two QPNs, and routes once per address vector)."""
        attr = qp.hw.attr
        ah = attr.ah_attr
        assert ah is not None
        sport = rdma_get_udp_sport(ah.flow_label, qp.qp_num, attr.dest_qp_num)
        path = self._rc_paths[qp.qp_num] = (self._route(ah.dgid), sport)
        return path

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
        self._receive_packet(rf.saddr, rf.daddr, rf.packet, self.scheduler.time())

    def receive_burst(self, burst: RoceBurst) -> None:
        """A burst from the link (segmentation offload, GRO): its packets in
        order, each as :meth:`receive_roce` takes a frame, except that the
        WRITE packets of a run that the responder can execute together
        (:meth:`RcQp.receive_run <softrdma.transport.rc.RcQp.receive_run>`)
        are, with one poll after them — the polls between would find
        nothing to do. What the QPs send meanwhile leaves in the same order
        once the burst is done (so, with the fabric's link rate 0, at the
        same times), as bursts too."""
        if burst.daddr != self._saddr:
            self.stats["rx_wrong_address"] += burst.frames
            return
        saddr, daddr = burst.saddr, burst.daddr
        now = self.scheduler.time()
        self._collect = []
        # A connected RC QP whose poll after its last packet was left for
        # after its next one: the poll would have found nothing else to do.
        held: tuple[int, RcQp, QueuePair] | None = None
        try:
            for pkt in burst.items:
                if isinstance(pkt, SegRun):
                    if held is not None:
                        self._after_receive(*held, now)
                        held = None
                    self._receive_run(saddr, daddr, pkt, now)
                    continue
                if held is not None:
                    # Poll it now unless this packet goes to it, past the
                    # checks (a dropped packet polls nothing).
                    bth = pkt.bth
                    rc = self._rc_rx.get(bth.dest_qp)
                    if held[0] != bth.dest_qp or bth.pkey != 0xFFFF or rc is None or rc[2] != saddr:
                        self._after_receive(*held, now)
                held = self._receive_packet(saddr, daddr, pkt, now, True)
            if held is not None:
                self._after_receive(*held, now)
        finally:
            self._flush()
            self._collect = None

    def _receive_run(self, saddr: bytes, daddr: bytes, run: SegRun, now: float) -> None:
        """The packets of a run: the first on its own, then as many as the
        QP takes at once, the rest one by one."""
        qpn = run.dest_qp
        i = 0
        count = run.count
        while i < count:
            took = 0
            if i:
                rc = self._rc_rx.get(qpn)
                # The checks _receive_packet makes of every packet.
                if rc is not None and rc[2] == saddr and run.pkey == 0xFFFF:
                    took = rc[0].receive_run(run, i)
                    if took:
                        self.stats["rcvd_pkts"] += took
                        i += took
                        self._after_receive(qpn, rc[0], rc[1], now)
                        continue
            self._receive_packet(saddr, daddr, run.packets(i, i + 1)[0], now)
            i += 1

    def _receive_packet(
        self, saddr: bytes, daddr: bytes, pkt: Packet, now: float, hold: bool = False
    ) -> tuple[int, RcQp, QueuePair] | None:
        """``rxe_rcv`` of one packet addressed to this device. With
        ``hold``, a connected RC QP's poll is left to the caller (returned)
        when it would hand back no more than the packet produced and that
        can wait: no event, no completion for an armed CQ."""
        bth = pkt.bth
        if bth.pkey != 0xFFFF:
            self.stats["rx_bad_pkey"] += 1
            return None
        qpn = bth.dest_qp
        rc = self._rc_rx.get(qpn)
        if rc is not None:  # a connected RC QP seen before: checks below, cached
            rc_engine, rc_qp, peer = rc
            if saddr != peer:
                self.stats["rx_wrong_peer"] += 1
                return None
            self.stats["rcvd_pkts"] += 1
            rc_engine.receive(pkt, now)
            if hold:
                out = rc_engine.out
                if not out.events and rc_engine.poll_idle(now):
                    comps = out.completions
                    if not comps:
                        return qpn, rc_engine, rc_qp
                    # Completions may wait where pushing them later runs no
                    # application code: no armed CQ, no overflow.
                    scq, rcq = rc_qp.send_cq, rc_qp.recv_cq
                    k = len(comps)
                    if scq.quiet_for(k) and (rcq is scq or rcq.quiet_for(k)):
                        return qpn, rc_engine, rc_qp
            self._after_receive(qpn, rc_engine, rc_qp, now)
            return None
        engine = self._engines.get(qpn)
        if engine is None and qpn == 1:
            # A management datagram: the MAD layer and the CM open on first
            # use (ib_register_client), then take it.
            self.open_clients()
            engine = self._engines.get(qpn)
        qp = self.qp_by_num(qpn)
        if engine is None or qp is None:
            self.stats["rx_no_qp"] += 1
            return None
        if isinstance(engine, UdQp):
            self.stats["rcvd_pkts"] += 1
            engine.receive(pkt, now, sgid=_gid(saddr), dgid=_gid(daddr))
        elif isinstance(engine, UcQp):
            # Connected: only from the peer of its address vector.
            ah = engine.attr.ah_attr
            if ah is None or saddr != self._route(ah.dgid):
                self.stats["rx_wrong_peer"] += 1
                return None
            self.stats["rcvd_pkts"] += 1
            engine.receive(pkt, now)
        else:
            ah = engine.attr.ah_attr
            if ah is None:
                self.stats["rx_wrong_peer"] += 1
                return None
            peer = self._route(ah.dgid)
            self._rc_rx[qpn] = (engine, qp, peer)
            if saddr != peer:
                self.stats["rx_wrong_peer"] += 1
                return None
            self.stats["rcvd_pkts"] += 1
            engine.receive(pkt, now)
        self._poll(qp, engine, now)
        return None

    def _after_receive(self, qpn: int, rc_engine: RcQp, rc_qp: QueuePair, now: float) -> None:
        """_poll() and _arm_timer() written out for a connected RC QP: this
        runs for every packet received."""
        out = rc_engine.poll(now)
        resume = self._handle(rc_qp, out) if out.packets or out.completions or out.events else None
        resp = rc_engine.resp
        if resp.cur is not None or resp.queue:
            self._arm_timer(qpn, rc_engine, resume, now)
            return
        deadline = None
        if rc_engine.state in REQUESTER_STATES:
            req = rc_engine.req
            deadline = req.retrans_deadline
            b = req.rnr_deadline
            if deadline is None or (b is not None and b < deadline):
                deadline = b
        self._set_timer(qpn, deadline, now)

    def receive_error(self, reason: str) -> None:
        """A datagram the link dropped before the transport (bad ICRC,
        truncated, ...): counted as ``rx_<reason>``."""
        self.stats["rx_" + reason] += 1


def _gid(addr: bytes) -> bytes:
    return addr if len(addr) == 16 else bytes(10) + b"\xff\xff" + addr
