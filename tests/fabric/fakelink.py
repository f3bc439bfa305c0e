"""A test double for :mod:`softrdma.fabric.link`: a :class:`FakeNetwork` of
:class:`FakeLink` ports on a :class:`~softrdma.time.sim.SimLoop` that
records every packet a device transmits and lets a test hand the device
received frames (or drop reasons) at chosen simulated times.

It is the smallest thing that satisfies the ``Network`` / ``Link``
protocols — no Ethernet segment, no routing between ports, nothing sent
anywhere — so a device that works on it depends on the link protocol and
on nothing else of :mod:`softrdma.fabric`. Like a real link (rxe's
``rxe_send`` / ``rxe_udp_encap_recv``) it owns what lies below the
transport: it encodes each transmitted packet at once into the Ethernet
frame it would send (its own MAC, an IPv4 ID from its own per-destination
counter, TTL 64, DF), and it calls the receiver on the scheduler, holding
its lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from softrdma.fabric.link import LinkBase, LinkReceiver, mac_for_ip
from softrdma.time.sim import SimLoop
from softrdma.transport.errors import RejectedPacket
from softrdma.transport.packet import Packet
from softrdma.transport.roce import (
    ROCE_V2_UDP_DPORT,
    IpIdentGenerator,
    RoceFrame,
    encode_roce_v2,
)
from softrdma.transport.roce_udp import decode_roce_udp

__all__ = ["DEFAULT_MTU", "FakeLink", "FakeNetwork", "Transmitted"]

DEFAULT_MTU = 1500
"""The netdev MTU of a port opened without one (Ethernet; RoCE path MTU 1024)."""


@dataclass(frozen=True, slots=True)
class Transmitted:
    """One call of :meth:`FakeLink.transmit`, as the link saw it.

    ``packet`` is a private copy decoded from the bytes the packet encoded
    to at transmit time (a device may hand over a payload that is a view of
    memory which changes later, as a real NIC's DMA would read it then).
    ``frame`` is the Ethernet frame the link built around it; ``time`` the
    simulated time of the call; ``after`` how many frames had been delivered
    to the device by then (so ``after - 1`` is the index of the delivery
    that the packet answered, if any)."""

    packet: Packet
    daddr: bytes
    sport: int
    time: float
    after: int
    frame: bytes


class FakeLink(LinkBase):
    """A :class:`~softrdma.fabric.link.Link` that records instead of sending."""

    def __init__(
        self,
        network: FakeNetwork,
        ip: IPv4Address,
        receiver: LinkReceiver,
        mtu: int,
        *,
        ip_id_start: int = 0,
    ) -> None:
        super().__init__(network.scheduler, ip, mac_for_ip(ip), mtu)
        self._network = network
        self._receiver = receiver
        self._ip_ident = IpIdentGenerator(ip_id_start)
        self.closed = False
        self.sent: list[Transmitted] = []
        """Every packet transmitted, in order."""
        self.delivered = 0
        """Frames handed to the device so far (datagrams and errors included)."""

    # -- Link -------------------------------------------------------------------------

    @property
    def scheduler(self) -> SimLoop:
        return self._network.scheduler

    @property
    def description(self) -> str:
        return f"fake recording link, {self._ip}, MTU {self._mtu}"

    def transmit(self, packet: Packet, daddr: bytes, sport: int) -> None:
        if self.closed:
            raise AssertionError(f"{self!r}: transmit after close")
        wire = packet.encode()  # raises for a packet that could not go on the wire
        copy = Packet.decode(wire)
        saddr = self._ip.packed
        frame = encode_roce_v2(
            RoceFrame(
                copy,
                saddr,
                daddr,
                sport,
                eth_dst=mac_for_ip(IPv4Address(daddr)),
                eth_src=self._mac,
                ip_id=self._ip_ident(saddr, daddr),
            )
        )
        self.sent.append(
            Transmitted(copy, daddr, sport, self.scheduler.time(), self.delivered, frame)
        )

    def close(self) -> None:
        self.closed = True

    # -- test side --------------------------------------------------------------------

    def deliver(self, frame: RoceFrame, at: float | None = None) -> None:
        """Hand ``frame`` (already decoded and ICRC-checked) to the device at
        simulated time ``at`` (default: now, after what is already due)."""
        loop = self.scheduler
        loop.call_at(loop.time() if at is None else at, self._deliver, frame)

    def deliver_datagram(
        self,
        payload: bytes,
        saddr: bytes,
        sport: int,
        dport: int = ROCE_V2_UDP_DPORT,
        at: float | None = None,
    ) -> None:
        """What a UDP-socket link does with a received datagram: decode it
        knowing only the payload, addresses and ports
        (:func:`~softrdma.transport.roce_udp.decode_roce_udp`), then hand the
        packet to the device, or the reason it was dropped."""
        loop = self.scheduler
        when = loop.time() if at is None else at
        loop.call_at(when, self._deliver_datagram, payload, saddr, sport, dport)

    def _deliver(self, frame: RoceFrame) -> None:
        if self.closed:
            return
        self.delivered += 1
        self._receiver.receive_roce(frame)

    def _deliver_datagram(self, payload: bytes, saddr: bytes, sport: int, dport: int) -> None:
        if self.closed:
            return
        self.delivered += 1
        try:
            rf = decode_roce_udp(payload, saddr, self._ip.packed, sport, dport)
        except RejectedPacket as e:
            self._receiver.receive_error(e.reason)
            return
        self._receiver.receive_roce(rf)

    def __repr__(self) -> str:
        return f"<FakeLink {self._ip}>"


class FakeNetwork:
    """A :class:`~softrdma.fabric.link.Network` whose ports only record.
    ``ip_id_start`` is where each port's IPv4 ID counters start."""

    def __init__(self, loop: SimLoop | None = None, *, ip_id_start: int = 0) -> None:
        self._loop = loop if loop is not None else SimLoop()
        self._ip_id_start = ip_id_start
        self.links: dict[IPv4Address, FakeLink] = {}

    @property
    def scheduler(self) -> SimLoop:
        return self._loop

    def open_link(
        self, ip: str | IPv4Address, receiver: LinkReceiver, *, mtu: int | None = None
    ) -> FakeLink:
        addr = IPv4Address(ip)
        if addr in self.links and not self.links[addr].closed:
            raise ValueError(f"{addr} already has a link")
        link = FakeLink(
            self,
            addr,
            receiver,
            DEFAULT_MTU if mtu is None else mtu,
            ip_id_start=self._ip_id_start,
        )
        self.links[addr] = link
        return link
