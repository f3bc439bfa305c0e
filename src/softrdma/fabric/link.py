"""The boundary between a device and the network it is plugged into.

Kernel counterpart: what rxe gets from ``rxe_net.c`` and the IP stack —
``rxe_send`` (``ip_local_out`` of a packet whose IP and UDP headers the
stack fills in), ``rxe_udp_encap_recv`` (packets to UDP 4791), the
netdev's MTU and address, and the softirq context it all runs in.

A device sees a :class:`Network` once, to open its :class:`Link` for an
IP address, and then only the link: transmit a transport packet to an
address from a UDP source port; receive decoded, ICRC-checked frames (or
the reason one was dropped) through its :class:`LinkReceiver`; read the
link's MTU and MAC; run on the link's :class:`~softrdma.time.Scheduler`.
Two networks implement it: the in-process fabric
(:class:`~softrdma.fabric.inproc.Fabric`, simulated time, Ethernet frames
in memory) and RoCEv2 over real UDP sockets
(:class:`~softrdma.fabric.udp.UdpNetwork`, real time). No device module
imports either.

Who owns what: the link owns everything below the transport headers — the
IP identification, TTL, the MAC addresses, the ICRC it computes over the
IP header it will send — because on a real host the IP stack chooses them;
the device owns its QPs, keys and drop counters.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Protocol

from softrdma.time.base import Scheduler
from softrdma.transport.packet import Packet
from softrdma.transport.roce import RoceFrame
from softrdma.verbs.share import DeviceShare

__all__ = ["Link", "LinkBase", "LinkReceiver", "Network", "mac_for_ip"]


def mac_for_ip(ip: IPv4Address) -> bytes:
    """A locally administered MAC derived from an IPv4 address
    (``02:00:a:b:c:d``), for ports that have no hardware address of their
    own."""
    return b"\x02\x00" + ip.packed


class LinkReceiver(Protocol):
    """What a link delivers to (the device's ``rxe_rcv``). Both methods are
    called on the link's scheduler, holding its lock."""

    def receive_roce(self, frame: RoceFrame) -> None:
        """A RoCEv2 packet addressed to this link: its ICRC checked if it
        travelled as bytes, or, on the in-process fabric when nothing needed
        bytes, the sender's frame itself (``icrc`` None: never serialised)."""
        ...

    def receive_error(self, reason: str) -> None:
        """A datagram for this link that was dropped before the transport:
        ``reason`` is a short name such as ``"bad_icrc"`` or
        ``"truncated"`` (:data:`softrdma.transport.DROP_REASONS`)."""
        ...


class Link(Protocol):
    """One device's port on a network (the netdev rxe is bound to, plus the
    IP/UDP stack under it)."""

    @property
    def scheduler(self) -> Scheduler:
        """The clock, timers and lock the device runs on."""
        ...

    @property
    def address(self) -> IPv4Address:
        """The port's IPv4 address; its RoCEv2 GID is ``::ffff:<address>``."""
        ...

    @property
    def mac(self) -> bytes:
        """The port's Ethernet address (6 bytes)."""
        ...

    @property
    def mtu(self) -> int:
        """The netdev MTU (the RoCE path MTU follows from it, as in rxe)."""
        ...

    @property
    def description(self) -> str:
        """One line saying what the link is and how it checks ICRCs (for
        ``devinfo``)."""
        ...

    @property
    def device_share(self) -> DeviceShare | None:
        """How the device on this link shares its address with other
        processes' copies of it (:mod:`softrdma.verbs.share`); None when
        the address is this process's alone."""
        ...

    def transmit(self, packet: Packet, daddr: bytes, sport: int) -> float | None:
        """Send ``packet`` to the packed IPv4 address ``daddr`` (UDP port
        4791 or the network's configured port) from UDP source port
        ``sport``, with the ICRC computed over the headers the link will
        really send (``rxe_send``). Never raises for a lost packet: links
        drop, the transport retransmits.

        Returns the scheduler time at which the link is done with the
        packet — it has left the wire (rxe: the skb is freed) — or None if
        it already is (a kernel socket took it). A device holds back further
        READ replies until then, so what a peer's requests cost it is bounded
        by what is on the wire."""
        ...

    def close(self) -> None:
        """Detach from the network; nothing is delivered afterwards."""
        ...


class LinkBase:
    """What every :class:`Link` keeps the same way: its scheduler, address,
    MAC and MTU, fixed when it is opened."""

    def __init__(self, scheduler: Scheduler, ip: IPv4Address, mac: bytes, mtu: int) -> None:
        self._scheduler = scheduler
        self._ip = ip
        self._saddr = ip.packed
        self._mac = mac
        self._mtu = mtu

    @property
    def scheduler(self) -> Scheduler:
        """The clock, timers and lock the device runs on."""
        return self._scheduler

    @property
    def address(self) -> IPv4Address:
        """The port's IPv4 address."""
        return self._ip

    @property
    def mac(self) -> bytes:
        """The port's Ethernet address."""
        return self._mac

    @property
    def mtu(self) -> int:
        """The netdev MTU."""
        return self._mtu

    @property
    def device_share(self) -> DeviceShare | None:
        """None: the address is this process's alone."""
        return None


class Network(Protocol):
    """Something devices plug into: :meth:`open_link` gives each device its
    port."""

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler the network and its devices run on."""
        ...

    def open_link(
        self, ip: str | IPv4Address, receiver: LinkReceiver, *, mtu: int | None = None
    ) -> Link:
        """A port with address ``ip`` delivering to ``receiver``. ``mtu``
        overrides the netdev MTU (default: the network's or interface's)."""
        ...
