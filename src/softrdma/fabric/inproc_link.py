"""A device's RoCEv2 port on the in-process fabric: the NIC and IP stack
between a device and the simulated Ethernet segment.

Kernel counterparts: ``rxe_net.c`` — ``rxe_prepare`` / ``prepare4`` (IPv4
and UDP headers, DF set, the ID from ``__ip_select_ident``'s
per-destination counter, TTL 64), the neighbour lookup for the destination
MAC, ``rxe_send``; and on receive ``rxe_udp_encap_recv`` with the header
and ICRC checks of ``rxe_rcv``.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from softrdma.fabric.link import LinkBase, LinkReceiver, mac_for_ip
from softrdma.time.sim import SimLoop
from softrdma.transport.errors import RejectedPacket
from softrdma.transport.packet import Packet
from softrdma.transport.roce import IpIdentGenerator, RoceFrame, decode_roce_v2, encode_roce_v2

if TYPE_CHECKING:
    from softrdma.fabric.inproc import Fabric

__all__ = ["FabricLink"]

_BROADCAST = b"\xff" * 6


class FabricLink(LinkBase):
    """A :class:`~softrdma.fabric.link.Link` on a
    :class:`~softrdma.fabric.inproc.Fabric` (create it with
    :meth:`Fabric.open_link <softrdma.fabric.inproc.Fabric.open_link>`).
    It is also the fabric's :class:`~softrdma.fabric.inproc.FabricPort`:
    it turns packets into Ethernet frames and frames back into packets."""

    def __init__(self, fabric: Fabric, ip: IPv4Address, receiver: LinkReceiver, mtu: int) -> None:
        super().__init__(fabric.loop, ip, mac_for_ip(ip), mtu)
        self._fabric = fabric
        self._receiver = receiver
        self._ip_ident = IpIdentGenerator()
        self._neighbours: dict[bytes, bytes] = {}
        self._port = fabric.attach(self)

    # -- Link -----------------------------------------------------------------------

    @property
    def scheduler(self) -> SimLoop:
        """The fabric's simulated-time loop."""
        return self._fabric.loop

    @property
    def ip(self) -> IPv4Address:
        """Same as :attr:`address` (the fabric's name for it)."""
        return self._ip

    @property
    def description(self) -> str:
        """What ``devinfo`` says about the link."""
        return f"in-process fabric, {self._ip}, MTU {self._mtu}, ICRC over the full frame"

    def transmit(self, packet: Packet, daddr: bytes, sport: int) -> float:
        """Build the Ethernet / IPv4 / UDP frame around ``packet`` and put it
        on the segment (an unknown neighbour gets the broadcast MAC: the
        fabric routes on the IP address and counts it unroutable). Returns
        when the frame is off the wire: its arrival time."""
        frame = RoceFrame(
            packet,
            self._saddr,
            daddr,
            sport,
            eth_dst=self._neighbour(daddr),
            eth_src=self._mac,
            ip_id=self._ip_ident(self._saddr, daddr),
        )
        return self._port.transmit(encode_roce_v2(frame))

    def _neighbour(self, daddr: bytes) -> bytes:
        mac = self._neighbours.get(daddr)
        if mac is None:
            found = self._fabric.lookup_mac(IPv4Address(daddr))
            if found is None:
                return _BROADCAST  # not cached: the neighbour may appear later
            self._neighbours[daddr] = mac = found
        return mac

    def close(self) -> None:
        """Detach from the fabric."""
        if self._port.attached:
            self._port.detach()

    # -- FabricPort ---------------------------------------------------------------------

    def receive_frame(self, frame: bytes) -> None:
        """A frame from the segment: decode and check it (ICRC included), hand
        the packet to the device, or tell it why the frame was dropped."""
        try:
            rf = decode_roce_v2(frame)
        except RejectedPacket as e:  # not RoCEv2, or broken: counted by reason
            self._receiver.receive_error(e.reason)
            return
        self._receiver.receive_roce(rf)

    def __repr__(self) -> str:
        return f"<FabricLink {self._ip}>"
