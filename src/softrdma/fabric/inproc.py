"""The in-process fabric: one simulated Ethernet segment between RDMA ports.

Counterpart: the wire, and the switch every RoCEv2 port in a rack hangs off.
A device's port is the equivalent of rxe's ``rxe_net.c`` — it hands
complete Ethernet frames to :meth:`Fabric.transmit` (``rxe_send`` →
``ip_local_out``) and gets complete frames back in ``receive_frame``
(``rxe_udp_encap_recv``). The fabric never decodes a frame: it reads the
destination IP address with a slice at the IP header's offset (802.1Q tag
and IPv6 included) and routes on it, like a switch with a static neighbour
table.

Lazy serialisation
------------------
A :class:`~softrdma.fabric.inproc_link.FabricLink` hands its frames over as
:class:`~softrdma.transport.roce.RoceFrame` objects
(:meth:`PortAttachment.transmit_roce`) and the fabric gives the object to a
receiving link as it is: no encoding, ICRC or decoding on the way. The bytes
are built — exactly what ``encode_roce_v2`` gives — only where something
looks at them: a tap (sender's, fabric-wide or the receiver's), a drop
filter, a corruption fault (a corrupted frame then reaches the receiver as
bytes and fails its checks there), or a port that takes only bytes. Faults
draw the same random numbers either way, so a seed gives the same result
with and without a tap.

Segmentation offload
--------------------
When nothing can observe single frames between two ports — no tap on the
fabric or either port, no fault rates, no drop filter — and the per-frame
pacing does not matter (``link_rate`` 0: every frame of a burst arrives at
the same time anyway), a device's frames for one peer leave as one
:class:`~softrdma.transport.burst.RoceBurst`: one delivery event for all
of them, consecutive packets of one message as one
:class:`~softrdma.transport.burst.SegRun` (GSO/GRO). The counters, IPv4
IDs and arrival time are those of the single frames, and the receiver
handles them in order as it would the frames one by one. The moment a tap,
fault or filter is attached, frames are real again: bursts already in
flight are split into their frames for a tap that opened at the receiver
(:meth:`~softrdma.transport.burst.RoceBurst.roce_frames`). ``offload=False``
turns bursts off altogether.

Timing
------
Everything happens in the simulated time of an
:class:`~softrdma.time.sim.SimLoop`. A frame handed over at
``now`` occupies the sender's link for ``len * 8 / link_rate`` seconds after
the link's previous frame (serialization; ``link_rate=0`` means infinitely
fast), and arrives ``latency`` seconds after its last bit left: its delivery
is an event at that time. Arrival times from one port never decrease, so
each (source, destination) direction is FIFO unless reordering is injected.

Faults
------
Seeded and deterministic: each direction (source port, destination port)
draws from its own :class:`random.Random`, derived from the fabric's seed
and the two primary addresses, so the fate of a frame depends only on the
seed and the frames sent before it in that direction — not on traffic
elsewhere. Per frame, in this order: drop filters (:meth:`Fabric.drop_when`),
``drop``, ``corrupt`` (one bit flipped after the Ethernet header, in a
field the receiver checks, see :class:`Faults`), ``duplicate`` (a second copy
arrives right after the first), ``reorder`` (extra delay up to
``reorder_delay``, so later frames overtake it).

Capture
-------
:meth:`Fabric.tap` writes a pcap of every frame as transmitted (or of one
port's transmitted and received frames), with simulated timestamps in
nanoseconds; the frames are real Ethernet/IPv4/UDP/RoCEv2, so Wireshark and
tshark decode them as InfiniBand.
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Protocol

from softrdma.errors import SoftRdmaError
from softrdma.fabric.pcap import Closing, PathOrFile, PcapWriter
from softrdma.time.sim import SimLoop
from softrdma.transport.burst import RoceBurst
from softrdma.transport.roce import RoceFrame, encode_roce_v2

if TYPE_CHECKING:
    from softrdma.fabric.inproc_link import FabricLink
    from softrdma.fabric.link import LinkReceiver

__all__ = [
    "DEFAULT_LATENCY",
    "DEFAULT_LINK_RATE",
    "DEFAULT_REORDER_DELAY",
    "NO_FAULTS",
    "Endpoint",
    "Fabric",
    "FabricError",
    "FabricPort",
    "FabricStats",
    "Faults",
    "FrameFilter",
    "PcapTap",
    "PortAttachment",
    "PortStats",
]

DEFAULT_LATENCY = 1e-6
"""Propagation + switching delay of a frame, in seconds (1 µs)."""
DEFAULT_LINK_RATE = 100e9
"""Link rate in bits per second (100 Gb/s)."""
DEFAULT_REORDER_DELAY = 10e-6
"""Largest extra delay given to a reordered frame, in seconds (10 µs)."""

_ET_IPV4 = b"\x08\x00"
_ET_IPV6 = b"\x86\xdd"
_ET_VLAN = b"\x81\x00"
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
_IPPROTO_UDP = 17

FrameBytes = bytes | bytearray | memoryview


class FabricError(SoftRdmaError, ValueError):
    """Misuse of the fabric: an address already in use, a port that is not
    attached, a bad rate or delay."""


class FabricPort(Protocol):
    """What the fabric needs from a device port (the ``net_device`` rxe is
    bound to, seen from the wire).

    ``ip`` is the port's address (its RoCEv2 GID is ``::ffff:a.b.c.d`` for
    IPv4); ``mac`` its 6-byte Ethernet address; ``receive_frame`` is called
    from an event-loop callback with each complete Ethernet frame delivered
    to it (``rxe_udp_encap_recv``), and must not run the loop itself.
    """

    @property
    def ip(self) -> IPv4Address | IPv6Address:
        """The port's IP address (frames to it are delivered here)."""
        ...

    @property
    def mac(self) -> bytes:
        """The port's Ethernet address (6 bytes)."""
        ...

    def receive_frame(self, frame: bytes) -> None:
        """Accept one Ethernet frame from the wire."""
        ...


Endpoint = str | IPv4Address | IPv6Address | FabricPort
"""A port named by its IP address (string or :mod:`ipaddress`) or by itself."""


def _packed(addr: str | IPv4Address | IPv6Address) -> bytes:
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a RoCEv2 GID of an IPv4 port: the frames are IPv4
    return ip.packed


def _endpoint_key(ep: Endpoint) -> bytes:
    if isinstance(ep, str | IPv4Address | IPv6Address):
        return _packed(ep)
    return _packed(ep.ip)


def _show(key: bytes | None) -> str:
    return "*" if key is None else str(ipaddress.ip_address(key))


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault-injection rates (probabilities 0..1 per frame) for one direction
    or for the whole fabric.

    ``drop`` loses the frame; ``duplicate`` delivers it twice; ``reorder``
    delays it by an extra uniform (0, ``reorder_delay``] seconds so frames
    sent after it can overtake it; ``corrupt`` flips one bit after the
    Ethernet header. The flipped bit is always one the receiver checks — IP
    header (IPv4 header checksum), UDP ports and length, BTH and the rest of
    the transport packet, the ICRC (all covered by the ICRC) — never one of
    the fields masked out of the ICRC (IPv6 traffic class / flow label / hop
    limit, the UDP checksum, BTH FECN/BECN/reserved bits) nor Ethernet
    padding: on a real link the Ethernet FCS would catch those, and there is
    none here. So a corrupted RoCEv2 frame always fails ``decode_roce_v2``
    (a flip in the UDP destination port makes it ``NotRoceV2``, any other
    one ``MalformedPacket``).
    """

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    reorder_delay: float = DEFAULT_REORDER_DELAY

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder", "corrupt"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise FabricError(f"fault rate {name}={v!r} is not a probability in [0, 1]")
        if not 0.0 <= self.reorder_delay < math.inf:
            raise FabricError(f"reorder_delay={self.reorder_delay!r} must be finite and >= 0")

    @property
    def active(self) -> bool:
        """True if any rate is non-zero."""
        return bool(self.drop or self.duplicate or self.reorder or self.corrupt)


NO_FAULTS = Faults()


@dataclass(slots=True)
class FabricStats:
    """Frame counters of a fabric.

    ``sent``: frames handed to :meth:`Fabric.transmit`; ``delivered``:
    ``receive_frame`` calls (duplicates included); ``dropped``: lost to
    ``drop`` or a drop filter; ``duplicated`` / ``reordered`` /
    ``corrupted``: frames those faults hit; ``unroutable``: frames to no
    attached address (not IP, unknown destination, or a port detached while
    the frame was in flight); ``bursts``: bursts sent (segmentation offload;
    their frames are counted in the others as single frames are).
    """

    sent: int = 0
    delivered: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    unroutable: int = 0
    bursts: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return asdict(self)


@dataclass(slots=True)
class PortStats:
    """Per-port counters (``ip -s link``): frames and bytes sent and delivered."""

    tx_frames: int = 0
    tx_bytes: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0


class PortAttachment:
    """A port's place on the fabric, returned by :meth:`Fabric.attach`.

    :meth:`transmit` is the same as ``fabric.transmit(port, frame)`` minus
    the lookup of the port; a device may keep the attachment and use it.
    """

    __slots__ = (
        "_fabric",
        "addrs",
        "attached",
        "key",
        "last_arrival",
        "mac",
        "port",
        "receive",
        "receive_burst",
        "receive_roce",
        "stats",
        "taps",
        "tx_free",
    )

    def __init__(
        self,
        fabric: Fabric,
        port: FabricPort,
        key: bytes,
        mac: bytes,
        receive_roce: Callable[[RoceFrame], None] | None = None,
        receive_burst: Callable[[RoceBurst], None] | None = None,
    ) -> None:
        self._fabric = fabric
        self.port = port
        self.receive: Callable[[bytes], None] = port.receive_frame
        self.receive_roce = receive_roce
        """Where a frame handed over unencoded (:meth:`transmit_roce`) is
        delivered as it is; None: the port only takes bytes."""
        self.receive_burst = receive_burst if receive_roce is not None else None
        """Where a burst (segmentation offload) is delivered; None: the
        port takes single frames only."""
        self.key = key
        """The packed primary address."""
        self.mac = mac
        self.addrs: list[bytes] = [key]
        self.attached = True
        self.tx_free = 0.0
        """Simulated time at which the port's link finishes its last frame."""
        self.last_arrival = 0.0
        """Arrival time of the port's last (not reordered) frame."""
        self.stats = PortStats()
        self.taps: list[PcapTap] = []

    @property
    def ip(self) -> IPv4Address | IPv6Address:
        """The port's primary address."""
        return ipaddress.ip_address(self.key)

    def transmit(self, frame: FrameBytes) -> float:
        """Put a complete Ethernet frame on the wire (``rxe_send``); returns
        its arrival time (when it has left the wire)."""
        return self._fabric._xmit(self, frame)

    def transmit_roce(self, frame: RoceFrame, nbytes: int) -> float:
        """Put a RoCEv2 frame on the wire without encoding it (lazy
        serialisation); ``nbytes`` is its encoded length. The bytes are built
        only if something looks at them — a tap, a drop filter, a corruption
        fault, a port that takes only bytes — and are then exactly what
        :func:`~softrdma.transport.roce.encode_roce_v2` gives. The caller
        hands the frame over: neither it nor its packet may change after
        this (a duplicate delivers the same object twice). Returns the
        arrival time, as :meth:`transmit`."""
        return self._fabric._xmit_roce(self, frame, nbytes)

    def detach(self) -> None:
        """Same as :meth:`Fabric.detach` of this port."""
        self._fabric.detach(self.port)

    def __repr__(self) -> str:
        state = "" if self.attached else " detached"
        return f"<PortAttachment {self.ip} mac={self.mac.hex(':')}{state}>"


class FrameFilter:
    """A drop filter from :meth:`Fabric.drop_when`: frames for which the
    predicate is true are dropped, up to ``remaining`` of them (None: no
    limit), after which the filter removes itself."""

    __slots__ = ("_fabric", "dropped", "predicate", "remaining")

    def __init__(
        self, fabric: Fabric, predicate: Callable[[bytes], object], count: int | None
    ) -> None:
        self._fabric = fabric
        self.predicate = predicate
        self.remaining = count
        self.dropped = 0
        """Frames this filter has dropped."""

    @property
    def active(self) -> bool:
        """True while the filter is installed."""
        return self in self._fabric._filters

    def remove(self) -> None:
        """Uninstall the filter (no effect if already removed)."""
        self._fabric._remove_filter(self)


class PcapTap(Closing):
    """A pcap capture point from :meth:`Fabric.tap`. Timestamps are the
    simulated time in nanoseconds plus ``epoch_ns``. :meth:`close` stops the
    capture and closes the file if the tap opened it (a :class:`PcapWriter`
    passed in is only flushed: its owner closes it)."""

    __slots__ = ("_fabric", "_owned", "attachment", "epoch_ns", "frames", "writer")

    def __init__(
        self,
        fabric: Fabric,
        writer: PcapWriter,
        owned: bool,
        attachment: PortAttachment | None,
        epoch_ns: int,
    ) -> None:
        self._fabric: Fabric | None = fabric
        self.writer = writer
        self._owned = owned
        self.attachment = attachment
        self.epoch_ns = epoch_ns
        self.frames = 0
        """Frames written so far."""

    def _record(self, frame: bytes, now: float) -> None:
        self.writer.write(frame, round(now * 1e9) + self.epoch_ns)
        self.frames += 1

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._fabric is None

    def close(self) -> None:
        """Stop capturing; flush, and close the file if the tap opened it."""
        fabric = self._fabric
        if fabric is None:
            return
        fabric._remove_tap(self)
        self._fabric = None
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()


def _corrupt(frame: bytes, rng: random.Random) -> bytes | None:
    """``frame`` with one bit flipped after the Ethernet header, in a field
    the receiver checks (see :class:`Faults`); None if there is nothing to
    flip."""
    n = len(frame)
    l3, et = 14, frame[12:14]
    if et == _ET_VLAN:
        l3, et = 18, frame[16:18]
    end = n
    unchecked: dict[int, int] = {}  # byte offset -> mask of bits not to flip
    l4: int | None = None
    if et == _ET_IPV4 and n >= l3 + 20 and frame[l3] == 0x45 and frame[l3 + 9] == _IPPROTO_UDP:
        end = min(n, l3 + int.from_bytes(frame[l3 + 2 : l3 + 4], "big"))
        l4 = l3 + 20
    elif et == _ET_IPV6 and n >= l3 + 40 and frame[l3 + 6] == _IPPROTO_UDP:
        end = min(n, l3 + 40 + int.from_bytes(frame[l3 + 4 : l3 + 6], "big"))
        l4 = l3 + 40
        # traffic class + flow label, hop limit: masked out of the ICRC
        unchecked = {l3: 0x0F, l3 + 1: 0xFF, l3 + 2: 0xFF, l3 + 3: 0xFF, l3 + 7: 0xFF}
    if l4 is not None:
        unchecked[l4 + 6] = unchecked[l4 + 7] = 0xFF  # UDP checksum (masked)
        unchecked[l4 + 12] = 0xFF  # BTH byte 4: FECN, BECN, Resv6a (masked)
    if end <= l3:
        return None
    nbits = (end - l3) * 8
    i, mask = l3, 0x80
    for _ in range(64):  # rejection sampling; unchecked bits are a small minority
        bit = rng.randrange(nbits)
        i, mask = l3 + (bit >> 3), 0x80 >> (bit & 7)
        if not unchecked.get(i, 0) & mask:
            break
    buf = bytearray(frame)
    buf[i] ^= mask
    return bytes(buf)


class Fabric(Closing):
    """One Ethernet segment joining any number of ports in one process
    (the wire and the switch).

    ``loop`` is the :class:`~softrdma.time.sim.SimLoop` that
    delivers frames (a new one if omitted); ``latency`` in seconds and
    ``link_rate`` in bits per second (0 = infinite) set the timing (see the
    module docstring); ``seed`` makes fault injection reproducible;
    ``faults`` are the fabric-wide fault rates.
    """

    def __init__(
        self,
        loop: SimLoop | None = None,
        *,
        latency: float = DEFAULT_LATENCY,
        link_rate: float = DEFAULT_LINK_RATE,
        seed: int = 0,
        faults: Faults | None = None,
        offload: bool = True,
    ) -> None:
        self._loop = loop if loop is not None else SimLoop()
        self._post = self._loop.post_at  # bound once: the per-frame path
        self._deliver_cb = self._deliver
        self._deliver_roce_cb = self._deliver_roce
        self._deliver_burst_cb = self._deliver_burst
        self._offload = offload
        self._bursts = False
        self.stats = FabricStats()
        self._latency = 0.0
        self._sec_per_byte = 0.0
        self._link_rate = 0.0
        self.latency = latency
        self.link_rate = link_rate
        self._seed = seed
        self._routes: dict[bytes, PortAttachment] = {}
        self._by_port: dict[int, PortAttachment] = {}
        self._taps: list[PcapTap] = []
        self._filters: list[FrameFilter] = []
        self._faults = faults if faults is not None else NO_FAULTS
        self._overrides: dict[tuple[bytes | None, bytes | None], Faults] = {}
        self._link_faults: dict[tuple[PortAttachment, PortAttachment], Faults] = {}
        self._rngs: dict[tuple[bytes, bytes], random.Random] = {}
        self._faulty = False
        self._update_faulty()

    @property
    def offload(self) -> bool:
        """Segmentation offload (see the module docstring): frames may
        travel in bursts where nothing observes them. False: always single
        frames."""
        return self._offload

    @offload.setter
    def offload(self, value: bool) -> None:
        self._offload = bool(value)
        self._update_bursts()

    @property
    def bursts(self) -> bool:
        """Whether frames travel in bursts now: offload on, link rate 0, no
        fabric-wide tap, no faults or drop filters (a port's own tap also
        keeps its frames single)."""
        return self._bursts

    def _update_bursts(self) -> None:
        self._bursts = (
            self._offload and not self._sec_per_byte and not self._taps and not self._faulty
        )

    # --- configuration ------------------------------------------------------------------

    @property
    def loop(self) -> SimLoop:
        """The event loop delivering frames (shared with the devices' timers)."""
        return self._loop

    @property
    def scheduler(self) -> SimLoop:
        """:attr:`loop`, as the :class:`~softrdma.fabric.link.Network` API
        names it."""
        return self._loop

    def open_link(
        self, ip: str | IPv4Address, receiver: LinkReceiver, *, mtu: int | None = None
    ) -> FabricLink:
        """A RoCEv2 port with address ``ip`` on this segment, delivering to
        ``receiver`` (a device); ``mtu`` is its netdev MTU (default 1500).
        See :class:`~softrdma.fabric.inproc_link.FabricLink`."""
        from softrdma.fabric.inproc_link import FabricLink

        return FabricLink(self, IPv4Address(ip), receiver, 1500 if mtu is None else mtu)

    @property
    def latency(self) -> float:
        """Seconds from a frame's last bit leaving the sender to its delivery."""
        return self._latency

    @latency.setter
    def latency(self, value: float) -> None:
        if not 0.0 <= value < math.inf:
            raise FabricError(f"latency {value!r} must be finite and >= 0")
        self._latency = float(value)

    @property
    def link_rate(self) -> float:
        """Bits per second of every port's link; 0 means infinitely fast."""
        return self._link_rate

    @link_rate.setter
    def link_rate(self, value: float) -> None:
        if not 0.0 <= value < math.inf:
            raise FabricError(f"link_rate {value!r} must be finite and >= 0 (0 = infinite)")
        self._link_rate = float(value)
        self._sec_per_byte = 8.0 / value if value else 0.0
        if hasattr(self, "_taps"):  # (set up in __init__ after this)
            self._update_bursts()

    @property
    def seed(self) -> int:
        """The fault-injection seed."""
        return self._seed

    def reseed(self, seed: int) -> None:
        """Restart every direction's random stream from ``seed``."""
        self._seed = seed
        self._rngs.clear()

    # --- ports ----------------------------------------------------------------------

    def attach(
        self,
        port: FabricPort,
        *,
        receive_roce: Callable[[RoceFrame], None] | None = None,
        receive_burst: Callable[[RoceBurst], None] | None = None,
    ) -> PortAttachment:
        """Connect ``port`` to the segment; frames to ``port.ip`` are then
        delivered to ``port.receive_frame``. With ``receive_roce``, RoCEv2
        frames sent unencoded (:meth:`PortAttachment.transmit_roce`) are
        handed to it as they are, intact ones included when they were
        encoded for a tap (corrupted ones still arrive as bytes); with
        ``receive_burst`` too, bursts (segmentation offload) reach it whole. Raises
        :class:`FabricError` if the port is attached already, its address is
        in use, or its MAC is not 6 bytes."""
        if id(port) in self._by_port:
            raise FabricError(f"port {port!r} is already attached")
        key = _packed(port.ip)
        if key in self._routes:
            raise FabricError(
                f"address {_show(key)} is already in use by {self._routes[key].port!r}"
            )
        mac = bytes(port.mac)
        if len(mac) != 6:
            raise FabricError(f"a MAC address is 6 bytes, port {port!r} has {len(mac)}")
        att = PortAttachment(self, port, key, mac, receive_roce, receive_burst)
        self._routes[key] = att
        self._by_port[id(port)] = att
        self._link_faults.clear()
        return att

    def add_address(self, port: FabricPort, addr: str | IPv4Address | IPv6Address) -> None:
        """Route another address to an attached port (a second GID, e.g. its
        IPv6 link-local address)."""
        att = self.attachment(port)
        key = _packed(addr)
        if key in self._routes:
            raise FabricError(
                f"address {_show(key)} is already in use by {self._routes[key].port!r}"
            )
        self._routes[key] = att
        att.addrs.append(key)
        self._link_faults.clear()

    def detach(self, port: FabricPort) -> None:
        """Disconnect ``port``: its addresses become unroutable, frames in
        flight to it are counted as unroutable when they arrive, and its
        per-port taps are closed."""
        att = self.attachment(port)
        att.attached = False
        for key in att.addrs:
            del self._routes[key]
        del self._by_port[id(port)]
        for tap in list(att.taps):
            tap.close()
        self._link_faults.clear()

    def attachment(self, port: FabricPort) -> PortAttachment:
        """The :class:`PortAttachment` of an attached port."""
        att = self._by_port.get(id(port))
        if att is None:
            raise FabricError(f"port {port!r} is not attached to this fabric")
        return att

    @property
    def ports(self) -> list[FabricPort]:
        """The attached ports, in attachment order."""
        return [a.port for a in self._by_port.values()]

    def lookup_mac(self, addr: str | IPv4Address | IPv6Address) -> bytes | None:
        """The MAC address of the port owning ``addr`` (the neighbour table a
        device consults to fill in the destination MAC, ``neigh_lookup`` /
        ``rdma_resolve_ip``), or None."""
        att = self._routes.get(_packed(addr))
        return att.mac if att is not None else None

    # --- the wire -------------------------------------------------------------------

    def transmit(self, port: FabricPort, frame: FrameBytes) -> None:
        """Put a complete Ethernet frame from ``port`` on the wire (rxe_net.c
        ``rxe_send``). The frame is copied if it is not ``bytes``; its
        delivery is scheduled on :attr:`loop` (see the module docstring)."""
        att = self._by_port.get(id(port))
        if att is None:
            raise FabricError(f"port {port!r} is not attached to this fabric")
        self._xmit(att, frame)

    def _xmit_roce(self, src: PortAttachment, rf: RoceFrame, n: int) -> float:
        """:meth:`_xmit` of a frame not yet encoded: encoded at once if a tap
        or a bytes-only destination wants it, later if a filter or a
        corruption fault does, else never."""
        dst = self._routes.get(rf.daddr)
        if self._taps or src.taps or (dst is not None and (dst.taps or dst.receive_roce is None)):
            return self._xmit(src, encode_roce_v2(rf), rf)
        if not src.attached:
            raise FabricError(f"port {src.port!r} is detached from the fabric")
        now = self._loop.now
        self.stats.sent += 1
        ps = src.stats
        ps.tx_frames += 1
        ps.tx_bytes += n
        # serialization and latency, as in _xmit
        start = src.tx_free
        if start < now:
            start = now
        done = start + n * self._sec_per_byte
        src.tx_free = done
        arrival = done + self._latency
        if arrival < src.last_arrival:
            arrival = src.last_arrival
        src.last_arrival = arrival
        if dst is None:
            self.stats.unroutable += 1
        elif self._faulty:
            self._xmit_faulty(src, dst, None, arrival, rf, n)
        else:
            self._post(arrival, self._deliver_roce_cb, dst, rf, None, n)
        return arrival

    def _xmit_burst(self, src: PortAttachment, dst: PortAttachment, burst: RoceBurst) -> float:
        """:meth:`_xmit_roce` of a whole burst, for a direction where
        nothing observes single frames (:attr:`bursts`, no tap on either
        port, ``dst`` takes bursts): the counters of its frames, one
        delivery at the arrival time of its last frame (the link rate is 0:
        all of them arrive then)."""
        if not src.attached:
            raise FabricError(f"port {src.port!r} is detached from the fabric")
        now = self._loop.now
        frames = burst.frames
        stats = self.stats
        stats.sent += frames
        stats.bursts += 1
        ps = src.stats
        ps.tx_frames += frames
        ps.tx_bytes += burst.nbytes
        start = src.tx_free
        if start < now:
            start = now
        src.tx_free = start
        arrival = start + self._latency
        if arrival < src.last_arrival:
            arrival = src.last_arrival
        src.last_arrival = arrival
        self._post(arrival, self._deliver_burst_cb, dst, burst)
        return arrival

    def _deliver_burst(self, dst: PortAttachment, burst: RoceBurst) -> None:
        """:meth:`_deliver_roce` of every frame of a burst: counted, captured
        frame by frame if a tap opened at the receiver while it was in
        flight, handed over whole."""
        frames = burst.frames
        if not dst.attached:
            self.stats.unroutable += frames
            return
        self.stats.delivered += frames
        ps = dst.stats
        ps.rx_frames += frames
        ps.rx_bytes += burst.nbytes
        if dst.taps:
            now = self._loop.now
            for rf in burst.roce_frames():
                frame = encode_roce_v2(rf)
                for tap in dst.taps:
                    tap._record(frame, now)
        receive = dst.receive_burst
        assert receive is not None  # only such ports are sent bursts
        receive(burst)

    def _xmit(self, src: PortAttachment, frame: FrameBytes, rf: RoceFrame | None = None) -> float:
        if type(frame) is not bytes:
            frame = bytes(frame)
        if not src.attached:
            raise FabricError(f"port {src.port!r} is detached from the fabric")
        now = self._loop.now
        self.stats.sent += 1
        n = len(frame)
        ps = src.stats
        ps.tx_frames += 1
        ps.tx_bytes += n
        if self._taps:
            for tap in self._taps:
                tap._record(frame, now)
        if src.taps:
            for tap in src.taps:
                tap._record(frame, now)
        # serialization on the sender's link, then latency
        start = src.tx_free
        if start < now:
            start = now
        done = start + n * self._sec_per_byte
        src.tx_free = done
        arrival = done + self._latency
        if arrival < src.last_arrival:  # latency lowered meanwhile: stay FIFO
            arrival = src.last_arrival
        src.last_arrival = arrival
        # route on the destination IP address, read in place
        et = frame[12:14]
        if et == _ET_IPV4:
            dst = self._routes.get(frame[30:34])
        elif et == _ET_IPV6:
            dst = self._routes.get(frame[38:54])
        elif et == _ET_VLAN:
            et = frame[16:18]
            if et == _ET_IPV4:
                dst = self._routes.get(frame[34:38])
            elif et == _ET_IPV6:
                dst = self._routes.get(frame[42:58])
            else:
                dst = None
        else:
            dst = None
        if dst is None:
            self.stats.unroutable += 1
            return arrival
        if rf is not None and dst.receive_roce is None:
            rf = None  # the destination takes bytes only
        if self._faulty:
            self._xmit_faulty(src, dst, frame, arrival, rf, n)
        elif rf is None:
            self._post(arrival, self._deliver_cb, dst, frame)
        else:
            self._post(arrival, self._deliver_roce_cb, dst, rf, frame, n)
        return arrival

    def _deliver(self, dst: PortAttachment, frame: bytes) -> None:
        if not dst.attached:
            self.stats.unroutable += 1
            return
        self.stats.delivered += 1
        ps = dst.stats
        ps.rx_frames += 1
        ps.rx_bytes += len(frame)
        if dst.taps:
            now = self._loop.now
            for tap in dst.taps:
                tap._record(frame, now)
        dst.receive(frame)

    def _deliver_roce(
        self, dst: PortAttachment, rf: RoceFrame, frame: bytes | None, nbytes: int
    ) -> None:
        """:meth:`_deliver` of an intact frame sent unencoded: the receiver
        gets the frame object; ``frame`` is its bytes if they were built."""
        if not dst.attached:
            self.stats.unroutable += 1
            return
        self.stats.delivered += 1
        ps = dst.stats
        ps.rx_frames += 1
        ps.rx_bytes += nbytes
        if dst.taps:  # a tap opened while the frame was in flight
            if frame is None:
                frame = encode_roce_v2(rf)
            now = self._loop.now
            for tap in dst.taps:
                tap._record(frame, now)
        receive = dst.receive_roce
        if receive is not None:
            receive(rf)
        else:
            dst.receive(encode_roce_v2(rf) if frame is None else frame)

    def _xmit_faulty(
        self,
        src: PortAttachment,
        dst: PortAttachment,
        frame: bytes | None,
        arrival: float,
        rf: RoceFrame | None = None,
        nbytes: int = 0,
    ) -> None:
        """Filters and random faults; ``frame`` is None for a frame sent
        unencoded (``rf``), encoded here only for a filter or a corruption,
        so that the random draws are the same either way."""
        stats = self.stats
        filters = self._filters
        if filters:
            if frame is None:
                assert rf is not None
                frame = encode_roce_v2(rf)
            for flt in filters:
                if flt.predicate(frame):
                    flt.dropped += 1
                    if flt.remaining is not None:
                        flt.remaining -= 1
                        if flt.remaining <= 0:
                            self._remove_filter(flt)
                    stats.dropped += 1
                    return
        f = self._faults_for(src, dst)
        post = self._loop.post_at
        if f.active:
            rng = self._rng(src.key, dst.key)
            if f.drop and rng.random() < f.drop:
                stats.dropped += 1
                return
            if f.corrupt and rng.random() < f.corrupt:
                if frame is None:
                    assert rf is not None
                    frame = encode_roce_v2(rf)
                bad = _corrupt(frame, rng)
                if bad is not None:
                    frame = bad
                    rf = None  # the receiver must decode the broken bytes
                    stats.corrupted += 1
            duplicate = f.duplicate and rng.random() < f.duplicate
            if f.reorder and rng.random() < f.reorder:
                stats.reordered += 1
                when = arrival + f.reorder_delay * (1.0 - rng.random())
            else:
                when = arrival
        else:
            duplicate = False
            when = arrival
        # a duplicate is the same object or bytes again: receivers never
        # modify what they are given
        for t in (when, arrival) if duplicate else (when,):
            if rf is None:
                assert frame is not None
                post(t, self._deliver, dst, frame)
            else:
                post(t, self._deliver_roce, dst, rf, frame, nbytes)
        if duplicate:
            stats.duplicated += 1

    # --- faults ---------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        """The fabric-wide fault rates (for directions without an override)."""
        return self._faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self._faults = value
        self._link_faults.clear()
        self._update_faulty()

    def set_faults(
        self,
        src: Endpoint | None = None,
        dst: Endpoint | None = None,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        corrupt: float = 0.0,
        reorder_delay: float = DEFAULT_REORDER_DELAY,
    ) -> Faults:
        """Set fault rates for frames from ``src`` to ``dst`` (one direction),
        or fabric-wide when both are None. One of them None is a wildcard
        ("everything from A", "everything to B"). An override replaces the
        fabric-wide rates for its direction entirely (rates not given are 0);
        the most specific one applies: (src, dst), then (src, *), then
        (*, dst), then fabric-wide. Returns the :class:`Faults` set."""
        f = Faults(drop, duplicate, reorder, corrupt, reorder_delay)
        if src is None and dst is None:
            self.faults = f
            return f
        key = (
            None if src is None else _endpoint_key(src),
            None if dst is None else _endpoint_key(dst),
        )
        self._overrides[key] = f
        self._link_faults.clear()
        self._update_faulty()
        return f

    def clear_faults(self, src: Endpoint | None = None, dst: Endpoint | None = None) -> None:
        """Remove the override set for exactly (``src``, ``dst``); with both
        None, reset the fabric-wide rates to none (overrides stay)."""
        if src is None and dst is None:
            self.faults = NO_FAULTS
            return
        key = (
            None if src is None else _endpoint_key(src),
            None if dst is None else _endpoint_key(dst),
        )
        self._overrides.pop(key, None)
        self._link_faults.clear()
        self._update_faulty()

    def clear_all_faults(self) -> None:
        """No faults anywhere: fabric-wide rates, overrides and drop filters."""
        self._overrides.clear()
        self._filters.clear()
        self.faults = NO_FAULTS

    def faults_between(self, src: Endpoint, dst: Endpoint) -> Faults:
        """The rates that apply to frames from ``src`` to ``dst`` (addresses
        need not be attached)."""
        s, d = _endpoint_key(src), _endpoint_key(dst)
        o = self._overrides
        return o.get((s, d)) or o.get((s, None)) or o.get((None, d)) or self._faults

    def drop_when(
        self, predicate: Callable[[bytes], object], *, count: int | None = None
    ) -> FrameFilter:
        """Drop every routable frame for which ``predicate(frame)`` is true —
        at most ``count`` of them if given (``count=1``: lose exactly one
        packet). Filters run before the random faults and use no randomness.
        Returns the :class:`FrameFilter` (``.dropped``, ``.remove()``)."""
        if count is not None and count < 1:
            raise FabricError(f"count={count!r} must be at least 1")
        flt = FrameFilter(self, predicate, count)
        self._filters.append(flt)
        self._update_faulty()
        return flt

    def _remove_filter(self, flt: FrameFilter) -> None:
        # a new list: _xmit_faulty may be iterating over the old one
        self._filters = [f for f in self._filters if f is not flt]
        self._update_faulty()

    def _update_faulty(self) -> None:
        self._faulty = (
            bool(self._filters)
            or self._faults.active
            or any(f.active for f in self._overrides.values())
        )
        self._update_bursts()

    def _faults_for(self, src: PortAttachment, dst: PortAttachment) -> Faults:
        pair = (src, dst)
        f = self._link_faults.get(pair)
        if f is None:
            f = self._faults
            o = self._overrides
            if o:
                found = (
                    [o[(s, d)] for s in src.addrs for d in dst.addrs if (s, d) in o]
                    or [o[(s, None)] for s in src.addrs if (s, None) in o]
                    or [o[(None, d)] for d in dst.addrs if (None, d) in o]
                )
                if found:
                    f = found[0]
            self._link_faults[pair] = f
        return f

    def _rng(self, s: bytes, d: bytes) -> random.Random:
        rng = self._rngs.get((s, d))
        if rng is None:
            # str seeds hash with SHA-512: stable across runs and processes
            rng = random.Random(f"softrdma.fabric:{self._seed}:{s.hex()}:{d.hex()}")
            self._rngs[(s, d)] = rng
        return rng

    # --- capture --------------------------------------------------------------------

    def tap(
        self,
        dest: PathOrFile | PcapWriter,
        *,
        port: FabricPort | None = None,
        epoch_ns: int = 0,
    ) -> PcapTap:
        """Capture frames to a pcap file (like ``tcpdump -w``).

        Without ``port``: every frame as it is transmitted (before any fault,
        so dropped frames are in it and corrupted ones are intact). With
        ``port``: that port's frames as it transmits them and as they are
        delivered to it (duplicates and corruption visible). ``dest`` is a
        path or binary file (a nanosecond-resolution pcap is written) or a
        :class:`PcapWriter`. Timestamps are simulated time + ``epoch_ns``.
        """
        if isinstance(dest, PcapWriter):
            writer, owned = dest, False
        else:
            writer, owned = PcapWriter(dest, nanosecond=True), True
        att = None if port is None else self.attachment(port)
        t = PcapTap(self, writer, owned, att, epoch_ns)
        if att is None:
            self._taps = [*self._taps, t]
            self._update_bursts()
        else:
            att.taps = [*att.taps, t]
        return t

    def _remove_tap(self, tap: PcapTap) -> None:
        att = tap.attachment
        if att is None:
            self._taps = [t for t in self._taps if t is not tap]
            self._update_bursts()
        else:
            att.taps = [t for t in att.taps if t is not tap]

    @property
    def taps(self) -> list[PcapTap]:
        """The open taps (fabric-wide, then per port)."""
        return [*self._taps, *(t for att in self._by_port.values() for t in att.taps)]

    def close(self) -> None:
        """Close every tap. The fabric stays usable."""
        for tap in self.taps:
            tap.close()

    def __repr__(self) -> str:
        return (
            f"<Fabric ports={len(self._by_port)} latency={self._latency!r}"
            f" link_rate={self._link_rate!r} seed={self._seed!r}>"
        )
