"""RoCEv2 over real UDP sockets: devices in different processes or on
different hosts, or a real Linux peer running ``rdma_rxe``.

Kernel counterpart: ``rxe_net.c`` — the UDP tunnel socket on port 4791
(``rxe_setup_udp_tunnel``, ``rxe_udp_encap_recv``) and ``rxe_send``; the
IP stack's header choices; ``rxe_icrc.c`` for the check on receive.

Sending needs no privilege. Each RoCE UDP source port (rxe's per-QP
``rdma_get_udp_sport``) gets its own socket bound to it, unconnected and
with ``IP_PMTUDISC_DO``: Linux then sends DF with IPv4 identification 0
(``ip_select_ident_segs``: DF, not ``ignore_df``, no connected
destination; with the default ``IP_PMTUDISC_WANT`` the ID is random), so
the ICRC is computed over exactly the header the kernel builds.
``SO_NO_CHECK`` leaves the UDP checksum 0, as rxe sends it. A source port that
cannot be bound (taken by another program, or by another process sharing
the address) falls back to the receive socket's port, counted as
``tx_sport_fallback``: the port is flow entropy only, and receivers do not
check it — but the ICRC covers it, so it is computed over the port the
datagram really leaves from.

Receiving: a UDP socket shows the addresses and ports (``recvmsg`` with
``IP_PKTINFO``) and the length, but not the IPv4 identification, which
rxe increments per packet and which the ICRC covers. It is solved for
(:func:`~softrdma.transport.roce_udp.decode_roce_udp`): a packet is accepted
when some identification makes its ICRC valid, so a corrupted packet slips
through with probability about 2⁻¹⁶ instead of 2⁻³² — this is the
``solve`` ICRC mode. DF is taken as set, as rxe and RoCE NICs send it:
solving for it too would cost another bit, and one fixed single-bit error
(UDP payload byte 173) would then always pass as "other ID, DF flipped". With ``CAP_NET_RAW`` a raw socket reads the real
IP header instead and the ICRC is checked exactly (``raw`` mode); the UDP
socket then stays bound, unread, so the kernel does not answer with ICMP
port unreachable. :attr:`UdpLink.description` says which mode is in force.

All socket work runs on the network's :class:`~softrdma.time.RealTimeLoop`
progress thread; nothing raises out of it: bad datagrams are reported to
the device by reason, failed sends are counted and left to the transport's
retransmission.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
import time
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path

from softrdma.errors import SoftRdmaError
from softrdma.fabric.link import LinkBase, LinkReceiver, mac_for_ip
from softrdma.fabric.netif import interface_for
from softrdma.fabric.pcap import PathOrFile, PcapWriter
from softrdma.fabric.udp_share import GsiRoute, ShareError, UdpShare
from softrdma.time.realtime import RealTimeLoop
from softrdma.transport.errors import RejectedPacket
from softrdma.transport.packet import Packet
from softrdma.transport.roce import ROCE_V2_UDP_DPORT
from softrdma.transport.roce_udp import decode_roce_udp, encode_roce_udp

__all__ = ["LinkError", "UdpLink", "UdpNetwork", "have_cap_net_raw"]

log = logging.getLogger("softrdma.fabric.udp")

_IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_SO_ATTACH_FILTER = 26
_SO_NO_CHECK = 11
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo
_IPV4 = struct.Struct(">BBHHHBBH4s4s")
_UDP = struct.Struct(">HHHH")
_ETH = struct.Struct(">6s6sH")
_IP_DF = 0x4000
#: Datagrams read per readable event before letting timers run.
_RX_BATCH = 64
_RCVBUF = 4 << 20
_SNDBUF = 1 << 20
_MAX_DATAGRAM = 65536


class LinkError(SoftRdmaError, OSError):
    """A link that cannot be opened (address not on this host, port taken,
    no permission); ``errno`` is the socket error."""


def have_cap_net_raw() -> bool:
    """True if this process may open raw IPv4 sockets (``CAP_NET_RAW``)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP).close()
    except OSError:
        return False
    return True


def _rxe_loaded() -> bool:
    return Path("/sys/module/rdma_rxe").exists()


def _bind_error(e: OSError, ip: IPv4Address, port: int) -> LinkError:
    if e.errno == errno.EADDRINUSE:
        if _rxe_loaded():
            owner = (
                "rdma_rxe is loaded and owns it on this host: unload it (rmmod rdma_rxe)"
                " or run softrdma in another network namespace"
            )
        else:
            owner = "another program (or softrdma device) has bound it"
        return LinkError(e.errno, f"UDP port {port} on {ip} is already in use: {owner}")
    if e.errno == errno.EADDRNOTAVAIL:
        return LinkError(e.errno, f"{ip} is not an address of this host")
    if e.errno == errno.EACCES:
        return LinkError(e.errno, f"no permission to bind UDP port {port} on {ip}")
    return LinkError(e.errno or errno.EIO, f"cannot bind UDP {ip}:{port}: {e.strerror or e}")


def _udp_port_filter(port: int) -> bytes:
    """A classic BPF program for a raw IPv4 socket that keeps UDP datagrams
    to ``port`` (``ldxb 4*([0]&0xf); ldh [x+2]; jeq #port``)."""
    insns = [
        (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf): IP header length
        (0x48, 0, 0, 2),  # ldh [x+2]: UDP destination port
        (0x15, 0, 1, port),  # jeq #port, keep, drop
        (0x06, 0, 0, 0xFFFF),  # ret #65535
        (0x06, 0, 0, 0),  # ret #0
    ]
    return b"".join(struct.pack("=HBBI", *i) for i in insns)


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    """``SO_ATTACH_FILTER``: the kernel copies the program during the call,
    so the buffer only has to outlive it."""
    buf = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


class UdpNetwork:
    """The real network, for devices opened on it with
    :meth:`open_link`. ``port`` is the UDP port devices bind and send to
    (4791, as rxe; another value only between softrdma processes). ``raw``
    chooses how the ICRC is checked on receive: True = raw socket (needs
    ``CAP_NET_RAW``), False = solve for the IPv4 identification, None =
    raw when permitted. ``scheduler`` defaults to a new
    :class:`~softrdma.time.RealTimeLoop`, closed with the network.

    With ``share=True`` an address another softrdma process has bound is
    shared with it instead of refused (:mod:`softrdma.fabric.udp_share`):
    each process's device is a copy of one device, and ``gsi_route``
    (:func:`softrdma.cm.cm_port.cm_route_key`) says which process a CM MAD
    is for."""

    def __init__(
        self,
        *,
        port: int = ROCE_V2_UDP_DPORT,
        raw: bool | None = None,
        scheduler: RealTimeLoop | None = None,
        share: bool = False,
        gsi_route: GsiRoute | None = None,
    ) -> None:
        if not 0 < port < 65536:
            raise LinkError(errno.EINVAL, f"UDP port {port} out of range")
        self.port = port
        self.raw = have_cap_net_raw() if raw is None else raw
        self.share = share
        self.gsi_route = gsi_route
        self._own_scheduler = scheduler is None
        self._scheduler = RealTimeLoop() if scheduler is None else scheduler
        self._links: list[UdpLink] = []

    @property
    def scheduler(self) -> RealTimeLoop:
        """The real-time loop the links and their devices run on."""
        return self._scheduler

    def open_link(
        self, ip: str | IPv4Address, receiver: LinkReceiver, *, mtu: int | None = None
    ) -> UdpLink:
        """Bind ``ip`` (an address of this host) on :attr:`port`; raises
        :class:`LinkError` with one clear sentence if that cannot be done."""
        link = UdpLink(self, IPv4Address(ip), receiver, mtu)
        self._links.append(link)
        return link

    def close(self) -> None:
        """Close every link, then the scheduler if the network made it."""
        for link in list(self._links):
            link.close()
        if self._own_scheduler:
            self._scheduler.close()

    def close_after_fork(self) -> None:
        """In a forked child: close the child's copies of the links'
        sockets, leaving the parent's open. The loop thread did not survive
        ``fork``, so nothing reads them here; held open they would keep the
        parent's addresses bound after it exits."""
        for link in self._links:
            link.close_after_fork()
        self._links.clear()

    def _forget(self, link: UdpLink) -> None:
        if link in self._links:
            self._links.remove(link)

    def __enter__(self) -> UdpNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UdpLink(LinkBase):
    """A device's port on a :class:`UdpNetwork` (a
    :class:`~softrdma.fabric.link.Link`)."""

    def __init__(
        self, network: UdpNetwork, ip: IPv4Address, receiver: LinkReceiver, mtu: int | None
    ) -> None:
        itf = interface_for(ip)
        mac = itf.mac if itf is not None else bytes(6)
        super().__init__(
            network.scheduler,
            ip,
            mac if any(mac) else mac_for_ip(ip),
            mtu if mtu is not None else (itf.mtu if itf is not None else 1500),
        )
        self._network = network
        self._sched = network.scheduler
        self._port = network.port
        self._receiver = receiver
        self.counters: Counter[str] = Counter()
        """Socket-level events: ``tx_sport_fallback``, ``tx_dropped``,
        ``rx_foreign`` (raw mode: datagrams for another address)."""
        self._ifname = itf.name if itf is not None else "?"
        self._tx: dict[int, tuple[socket.socket, int]] = {}
        """QP source port -> the socket it leaves from and that socket's port
        (another one when the QP's is taken: the ICRC covers the real one)."""
        self._daddrs: dict[bytes, tuple[str, int]] = {}
        self._pcap: PcapWriter | None = None
        self._closed = False
        self._raw: socket.socket | None = None
        self._watched: socket.socket | None = None  # the socket read for the wire
        self._share: UdpShare | None = None
        try:
            self._rx = self._bind(socket.SOCK_DGRAM, self._port)
        except LinkError as e:
            if not (network.share and e.errno == errno.EADDRINUSE):
                raise
            try:  # another softrdma process has the address: become its member
                self._share = UdpShare.join(ip, self._port, self._deliver)
            except ShareError:
                raise e from None
            # sends still leave from this address; nothing is read here
            self._rx = self._bind(socket.SOCK_DGRAM, 0)
            self._sched.add_reader(self._share.sock, self._share.on_readable)
            return
        if network.share:
            try:
                self._share = UdpShare.own(ip, self._port, network.gsi_route)
            except ShareError:
                self._rx.close()
                raise
            self._sched.add_reader(self._share.sock, self._share.on_readable)
        if network.raw:
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
            _attach_filter(raw, _udp_port_filter(self._port))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            raw.bind((str(ip), 0))  # deliver only datagrams to our address
            raw.setblocking(False)
            self._raw = raw
            # The UDP socket stays bound so the kernel does not answer ICMP
            # port unreachable; its copies are never read.
            self._rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            self._sched.add_reader(raw, self._on_raw_readable)
            self._watched = raw
        else:
            self._rx.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            self._sched.add_reader(self._rx, self._on_udp_readable)
            self._watched = self._rx

    def _bind(self, kind: int, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            s.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)
            s.setsockopt(socket.SOL_SOCKET, _SO_NO_CHECK, 1)  # UDP checksum 0, as rxe
            s.bind((str(self._ip), port))
        except OSError as e:
            s.close()
            raise _bind_error(e, self._ip, port) from None
        s.setblocking(False)
        return s

    # -- Link -------------------------------------------------------------------------

    @property
    def scheduler(self) -> RealTimeLoop:
        """The network's real-time loop."""
        return self._sched

    @property
    def icrc_mode(self) -> str:
        """``"raw"`` (real IP header from a raw socket, exact ICRC check) or
        ``"solve"`` (IPv4 identification solved for; about 2⁻¹⁶ of corrupted
        packets pass)."""
        return "raw" if self._raw is not None else "solve"

    @property
    def description(self) -> str:
        """What ``devinfo`` says about the link."""
        how = (
            "ICRC checked over the real IP header (raw socket)"
            if self._raw is not None
            else "ICRC checked by solving for the IPv4 ID (UDP socket)"
        )
        if self._share is not None and self._share.slot:
            how = f"shared with the process that bound the port (slot {self._share.slot})"
        return f"UDP {self._ip}:{self._port} on {self._ifname}, MTU {self._mtu}, {how}"

    @property
    def device_share(self) -> UdpShare | None:
        """This link's end of its shared address (``share=True``), else None
        (the device's :class:`~softrdma.verbs.share.DeviceShare`)."""
        return self._share

    def transmit(self, packet: Packet, daddr: bytes, sport: int) -> None:
        """Send from the QP's source port to ``daddr``; the kernel adds IPv4
        (DF, identification 0) and UDP headers. Returns None: the kernel's
        socket buffer has the datagram when ``sendto`` returns."""
        if self._closed:
            return  # a timer that fired as the device went away
        sock, sport = self._tx.get(sport) or self._tx_socket(sport)
        payload = encode_roce_udp(packet, self._saddr, daddr, sport, self._port, ip_id=0, df=True)
        dest = self._daddrs.get(daddr)
        if dest is None:
            dest = self._daddrs[daddr] = (socket.inet_ntoa(daddr), self._port)
        try:
            sock.sendto(payload, dest)
        except OSError as e:  # a full buffer, no route: the transport retransmits
            self.counters["tx_dropped"] += 1
            if self.counters["tx_dropped"] == 1:
                log.warning("softrdma: %s: send to %s failed: %s", self._ip, dest[0], e)
            return
        if self._pcap is not None:
            self._record(self._saddr, daddr, sport, self._port, 0, True, payload)

    def _tx_socket(self, sport: int) -> tuple[socket.socket, int]:
        try:
            sock = self._bind(socket.SOCK_DGRAM, sport)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # never read
        except LinkError:
            self.counters["tx_sport_fallback"] += 1
            sock = self._rx
        tx = self._tx[sport] = (sock, sock.getsockname()[1])
        return tx

    # -- receive ------------------------------------------------------------------------

    def _on_udp_readable(self) -> None:
        rx = self._rx
        cmsg_space = socket.CMSG_SPACE(_PKTINFO.size)
        for _ in range(_RX_BATCH):
            try:
                data, anc, _, src = rx.recvmsg(_MAX_DATAGRAM, cmsg_space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNREFUSED from an ICMP error: nothing to read
                continue
            daddr = self._saddr
            for level, kind, value in anc:
                if level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
                    daddr = _PKTINFO.unpack_from(value)[2]
            saddr = socket.inet_aton(src[0])
            self._deliver(data, saddr, daddr, src[1], self._port, None, True)

    def _on_raw_readable(self) -> None:
        raw = self._raw
        assert raw is not None
        for _ in range(_RX_BATCH):
            try:
                data = raw.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if len(data) < 28 or data[0] >> 4 != 4:
                self._receiver.receive_error("truncated")
                continue
            ihl = (data[0] & 0x0F) * 4
            _, _, tot_len, ip_id, frag, _, _, _, saddr, daddr = _IPV4.unpack_from(data)
            if daddr != self._saddr:
                self.counters["rx_foreign"] += 1
                continue
            if ihl != 20 or frag & ~_IP_DF:
                self._receiver.receive_error("bad_header")
                continue
            sport, dport, ulen, _ = _UDP.unpack_from(data, ihl)
            end = min(len(data), tot_len)
            if ulen != end - ihl:
                self._receiver.receive_error("bad_length")
                continue
            payload = data[ihl + 8 : end]
            self._deliver(payload, saddr, daddr, sport, dport, ip_id, bool(frag & _IP_DF))

    def _deliver(
        self,
        payload: bytes,
        saddr: bytes,
        daddr: bytes,
        sport: int,
        dport: int,
        ip_id: int | None,
        df: bool | None,
    ) -> None:
        try:
            frame = decode_roce_udp(payload, saddr, daddr, sport, dport, ip_id=ip_id, df=df)
        except RejectedPacket as e:  # not RoCEv2, or broken: counted by reason
            self._receiver.receive_error(e.reason)
            frame = None
        if self._pcap is not None:
            if frame is not None:
                ip_id, df = frame.ip_id, frame.df
            self._record(saddr, daddr, sport, dport, ip_id or 0, bool(df), payload)
        if frame is None:
            return
        share = self._share
        if share is not None and share.members:
            slot = share.route(frame.packet)
            if slot:
                share.pass_on(
                    slot, payload, saddr, daddr, sport, dport, frame.ip_id or 0, bool(frame.df)
                )
                return
        self._receiver.receive_roce(frame)

    # -- capture ----------------------------------------------------------------------

    def capture(self, dest: PathOrFile) -> PcapWriter:
        """Write every datagram sent and received from now on to a pcap file,
        Ethernet-framed with the real (or solved) IPv4 and UDP headers.
        Closed with the link."""
        with self._sched.lock:
            if self._pcap is not None:
                self._pcap.close()
            self._pcap = PcapWriter(dest, nanosecond=True)
            return self._pcap

    def _record(
        self,
        saddr: bytes,
        daddr: bytes,
        sport: int,
        dport: int,
        ip_id: int,
        df: bool,
        payload: bytes,
    ) -> None:
        assert self._pcap is not None
        udp_len = 8 + len(payload)
        hdr = [0x45, 0, 20 + udp_len, ip_id, _IP_DF if df else 0, 64, 17, 0, saddr, daddr]
        hdr[7] = _ipv4_checksum(_IPV4.pack(*hdr))
        eth_src = self._mac if saddr == self._saddr else mac_for_ip(IPv4Address(saddr))
        eth_dst = self._mac if daddr == self._saddr else mac_for_ip(IPv4Address(daddr))
        frame = b"".join(
            (
                _ETH.pack(eth_dst, eth_src, 0x0800),
                _IPV4.pack(*hdr),
                _UDP.pack(sport, dport, udp_len, 0),
                payload,
            )
        )
        self._pcap.write(frame, time.time_ns())

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop receiving and close every socket (and the capture)."""
        if self._closed:
            return
        self._closed = True
        sched = self._sched
        if self._watched is not None:
            sched.remove_reader(self._watched)
        if self._share is not None:
            sched.remove_reader(self._share.sock)
            self._share.close()
        with sched.lock:
            for s in {id(s): s for s, _ in self._tx.values()}.values():
                if s is not self._rx:
                    s.close()
            self._tx.clear()
            self._rx.close()
            if self._raw is not None:
                self._raw.close()
            if self._pcap is not None:
                self._pcap.close()
                self._pcap = None
        self._network._forget(self)

    def close_after_fork(self) -> None:
        """See :meth:`UdpNetwork.close_after_fork`."""
        self._closed = True
        for s in (
            *(s for s, _ in self._tx.values()),
            self._rx,
            self._raw,
            self._share and self._share.sock,
        ):
            if s is not None:
                s.close()

    def __repr__(self) -> str:
        return f"<UdpLink {self._ip}:{self._port} icrc={self.icrc_mode}>"


def _ipv4_checksum(hdr: bytes) -> int:
    s: int = sum(struct.unpack(">10H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
