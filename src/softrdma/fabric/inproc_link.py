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
from softrdma.transport.burst import BurstItem, RoceBurst, SegRun
from softrdma.transport.errors import RejectedPacket
from softrdma.transport.packet import HEADER_LENGTHS, Packet
from softrdma.transport.roce import ROCE_V2_UDP_DPORT, RoceFrame, decode_roce_v2, encode_roce_v2

if TYPE_CHECKING:
    from softrdma.fabric.inproc import Fabric

__all__ = ["FabricLink"]

_BROADCAST = b"\xff" * 6
# Ethernet + IPv4 + UDP headers and the ICRC around the transport packet
_FRAMING = 14 + 20 + 8 + 4


def _owned(packet: Packet) -> Packet:
    """``packet`` with a payload of its own: one that is not ``bytes`` may
    be a view of memory the sender writes later, so the receiver gets a
    copy (the one copy of the payload, as the encoder's join made)."""
    return Packet(
        packet.bth,
        bytes(packet.payload),
        packet.reth,
        packet.aeth,
        packet.atmeth,
        packet.atmack,
        packet.immdt,
        packet.ieth,
        packet.deth,
        packet.cnp,
    )


def _header_length(opcode: int) -> int:
    """The bytes of BTH and extension headers ``opcode`` carries; 0 for an
    opcode that cannot be encoded (its frame goes through the encoder, which
    raises ``HeaderFieldError``)."""
    try:
        return HEADER_LENGTHS[opcode] if opcode >= 0 else 0
    except (IndexError, TypeError):
        return 0


class FabricLink(LinkBase):
    """A :class:`~softrdma.fabric.link.Link` on a
    :class:`~softrdma.fabric.inproc.Fabric` (create it with
    :meth:`Fabric.open_link <softrdma.fabric.inproc.Fabric.open_link>`).
    It is also the fabric's :class:`~softrdma.fabric.inproc.FabricPort`:
    it hands packets to the fabric as :class:`RoceFrame` objects, which
    reach the receiving link's device as they are (their ``icrc`` unset:
    nothing was encoded), and decodes the frames that arrive as bytes
    (corrupted ones, or frames from a port that sends bytes)."""

    def __init__(self, fabric: Fabric, ip: IPv4Address, receiver: LinkReceiver, mtu: int) -> None:
        super().__init__(fabric.loop, ip, mac_for_ip(ip), mtu)
        self._fabric = fabric
        self._receiver = receiver
        # next IPv4 ID per destination (__ip_select_ident; IpIdentGenerator
        # inlined: one per frame)
        self._ip_ids: dict[bytes, int] = {}
        self._neighbours: dict[bytes, bytes] = {}
        self._port = fabric.attach(
            self,
            receive_roce=receiver.receive_roce,
            receive_burst=getattr(receiver, "receive_burst", None),
        )
        # PortAttachment.transmit_roce minus one call, per frame
        self._xmit_roce = fabric._xmit_roce

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
        """Put the Ethernet / IPv4 / UDP frame around ``packet`` on the
        segment (an unknown neighbour gets the broadcast MAC: the fabric
        routes on the IP address and counts it unroutable). Returns when the
        frame is off the wire: its arrival time.

        The frame travels as a :class:`RoceFrame` and is encoded only if
        something on the fabric needs its bytes (lazy serialisation, see
        :meth:`PortAttachment.transmit_roce
        <softrdma.fabric.inproc.PortAttachment.transmit_roce>`). What the
        receiver gets is fixed now, as if encoded now: a payload that is not
        ``bytes`` may be a view of memory the sender writes later, so it is
        copied here (once, as the encoder's join did) into a packet of the
        receiver's own. A packet with a ``bytes`` payload is handed on as it
        is: the engines build a new packet for every transmission and never
        change one they have handed to the link."""
        ids = self._ip_ids
        ip_id = ids.get(daddr, 0)
        ids[daddr] = (ip_id + 1) & 0xFFFF
        if type(packet.payload) is not bytes:
            packet = _owned(packet)
        n = len(packet.payload)
        hlen = _header_length(packet.bth.opcode)
        frame = RoceFrame(
            packet,
            self._saddr,
            daddr,
            sport,
            ROCE_V2_UDP_DPORT,
            self._neighbours.get(daddr) or self._neighbour(daddr),
            self._mac,
            None,
            0,
            64,
            ip_id,
            True,
            0,
            False,
            b"",
            None,
        )
        if not hlen:  # not an opcode we can encode: HeaderFieldError, as before
            return self._port.transmit(encode_roce_v2(frame))
        return self._xmit_roce(self._port, frame, _FRAMING + hlen + n + (-n & 3))

    def offload_active(self) -> bool:
        """Whether a burst handed to :meth:`transmit_burst` would now travel
        whole (segmentation offload on a fabric where nothing observes
        single frames; see :mod:`softrdma.fabric.inproc`). A requester asks
        before gathering a run of packets as one."""
        return self._fabric._bursts and not self._port.taps

    def transmit_burst(self, items: list[BurstItem], daddr: bytes, sport: int) -> float | None:
        """Send ``items`` — packets and :class:`SegRun` runs, in order — to
        ``daddr`` from UDP port ``sport``: as one :class:`RoceBurst` where
        nothing observes single frames (their IPv4 IDs, counters and
        arrival time those of the frames one by one), else frame by frame
        through :meth:`transmit`, runs split by :meth:`SegRun.packets`.
        Returns the arrival time of the last frame, as :meth:`transmit`.
        Payloads are taken now, as :meth:`transmit` takes them."""
        fabric = self._fabric
        port = self._port
        dst = fabric._routes.get(daddr) if fabric._bursts and not port.taps else None
        if dst is None or dst.taps or dst.receive_burst is None:
            return self._transmit_each(items, daddr, sport)
        frames = 0
        nbytes = 0
        out: list[BurstItem] = []
        for item in items:
            if isinstance(item, SegRun):
                data = item.data
                if data is not None and type(data) is not bytes:
                    item.data = bytes(data)  # the one copy of the payload
                elif item.pieces is not None:
                    item.pieces = [p if type(p) is bytes else bytes(p) for p in item.pieces]
                frames += item.count
                nbytes += item.wire_len()
                out.append(item)
                continue
            if type(item.payload) is not bytes:
                item = _owned(item)
            hlen = _header_length(item.bth.opcode)
            if not hlen:  # not an opcode we can encode: as transmit does, frame by frame
                return self._transmit_each(items, daddr, sport)
            n = len(item.payload)
            frames += 1
            nbytes += _FRAMING + hlen + n + (-n & 3)
            out.append(item)
        ids = self._ip_ids
        ip_id = ids.get(daddr, 0)
        ids[daddr] = (ip_id + frames) & 0xFFFF
        burst = RoceBurst(
            out,
            self._saddr,
            daddr,
            sport,
            self._neighbours.get(daddr) or self._neighbour(daddr),
            self._mac,
            ip_id,
            frames,
            nbytes,
        )
        return fabric._xmit_burst(port, dst, burst)

    def _transmit_each(self, items: list[BurstItem], daddr: bytes, sport: int) -> float | None:
        """The items as single frames (:meth:`transmit`), runs segmented."""
        done = None
        transmit = self.transmit
        for item in items:
            if isinstance(item, SegRun):
                for pkt in item.packets():
                    done = transmit(pkt, daddr, sport)
            else:
                done = transmit(item, daddr, sport)
        return done

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
