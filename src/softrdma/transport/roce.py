"""RoCEv2 framing: Ethernet II / IPv4 or IPv6 / UDP (dport 4791) / IB transport / ICRC.

Kernel counterparts: ``drivers/infiniband/sw/rxe/rxe_net.c`` (``prepare4``,
``prepare6``, ``prepare_udp_hdr``, ``prepare_ipv4_hdr``,
``prepare_ipv6_hdr``, ``rxe_udp_encap_recv``), ``rxe_recv.c`` (``rxe_rcv``),
``rxe_qp.c`` / ``rxe_verbs.c`` (UDP source port) and ``include/rdma/ib_addr.h``
(``rdma_ip2gid`` / ``rdma_gid2ip``).

What Linux rxe puts on the wire (checked against ``captures/``): IPv4 with
DF set, TOS = the AV's traffic class (0), TTL = the route's hop limit (64),
an IP ID from the kernel's per-destination counter (so it increments across
all QPs and the CM traffic to one peer); UDP checksum 0; destination port
4791; source port fixed per QP (:func:`rxe_qp_src_port` before the QP gets
an address vector, :func:`rdma_get_udp_sport` after).

The UDP payload alone (BTH to ICRC, for a device behind an ordinary UDP
socket) is :mod:`.roce_udp`'s.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import TypeAlias

from softrdma.transport.errors import HeaderFieldError, MalformedPacket, NotRoceV2
from softrdma.transport.headers import BTH_SIZE, BytesLike
from softrdma.transport.icrc import ICRC_SIZE, IcrcError, icrc_headers
from softrdma.transport.packet import Packet

__all__ = [
    "ETH_P_8021Q",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "IPPROTO_UDP",
    "IP_DF",
    "ROCE_V2_UDP_DPORT",
    "RXE_ROCE_V2_SPORT",
    "Address",
    "IcrcError",
    "IpIdentGenerator",
    "MalformedPacket",
    "NotRoceV2",
    "RoceFrame",
    "decode_roce_v2",
    "encode_roce_v2",
    "hash_32",
    "packed_addrs",
    "rdma_calc_flow_label",
    "rdma_flow_label_to_udp_sport",
    "rdma_get_udp_sport",
    "rdma_gid2ip",
    "rdma_ip2gid",
    "rxe_qp_src_port",
]

ROCE_V2_UDP_DPORT = 4791
"""include/rdma/ib_verbs.h ROCE_V2_UDP_DPORT."""
RXE_ROCE_V2_SPORT = 0xC000
"""rxe.h RXE_ROCE_V2_SPORT: source ports are in the dynamic range 0xC000-0xFFFF."""

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
IPPROTO_UDP = 17
IP_DF = 0x4000
IP_OFFSET = 0x1FFF

_ETH = struct.Struct(">6s6sH")
_VLAN = struct.Struct(">HH")
_IPV4 = struct.Struct(">BBHHHBBH4s4s")
_IPV6 = struct.Struct(">IHBB16s16s")
_UDP = struct.Struct(">HHHH")
_H = struct.Struct(">H")
_I = struct.Struct("<I")
# The pad bytes (0-3) and the ICRC behind the payload, in one pack.
_TAILS = tuple(struct.Struct(f"<{pad}xI") for pad in range(4))
_ZERO_MAC = bytes(6)
_LITTLE = sys.byteorder == "little"


@functools.cache
def _frame_layout(vlan: bool, ipv6: bool, transport: struct.Struct) -> struct.Struct:
    """Ethernet II (with one 802.1Q tag if ``vlan``), IPv4 or IPv6, UDP and the
    transport headers of one opcode (``transport``, from
    :meth:`Packet.wire_values`) as one Struct, so the encoder packs all of a
    frame's headers in a single call. Built on first use; there are at most
    four per distinct transport header layout."""
    return struct.Struct(
        (_ETH.format + _VLAN.format[1:] if vlan else _ETH.format)
        + (_IPV6 if ipv6 else _IPV4).format[1:]
        + _UDP.format[1:]
        + transport.format[1:]
    )


# --- UDP source port (flow entropy) -------------------------------------------------


def hash_32(val: int, bits: int) -> int:
    """include/linux/hash.h ``hash_32``: multiply by GOLDEN_RATIO_32, keep the top
    ``bits`` bits."""
    return ((val * 0x61C88647) & 0xFFFFFFFF) >> (32 - bits)


def rxe_qp_src_port(qpn: int) -> int:
    """The UDP source port rxe gives a QP at creation (rxe_qp.c
    ``rxe_qp_init_req``: ``RXE_ROCE_V2_SPORT + (hash_32(qpn, 14) & 0x3fff)``).
    UD and GSI QPs keep it (QP1 → 0xD872, as in the captures)."""
    return RXE_ROCE_V2_SPORT + (hash_32(qpn & 0xFFFFFF, 14) & 0x3FFF)


def rdma_calc_flow_label(lqpn: int, rqpn: int) -> int:
    """ib_verbs.h ``rdma_calc_flow_label``: a 20-bit flow label symmetric in the
    two QPNs."""
    v = lqpn * rqpn
    v ^= v >> 20
    v ^= v >> 40
    return v & 0xFFFFF


def rdma_flow_label_to_udp_sport(fl: int) -> int:
    """ib_verbs.h ``rdma_flow_label_to_udp_sport``: fold 20 bits to 14 and put
    them in the 0xC000 range."""
    low = fl & 0x3FFF
    low ^= (fl & 0xFC000) >> 14
    return (low | RXE_ROCE_V2_SPORT) & 0xFFFF


def rdma_get_udp_sport(fl: int, lqpn: int, rqpn: int) -> int:
    """ib_verbs.h ``rdma_get_udp_sport``: the source port rxe switches a
    connected QP to on ``modify_qp`` with an address vector (rxe_verbs.c
    ``rxe_modify_qp``). A zero flow label is derived from the QPNs; RDMA CM
    passes a non-zero one from the CM REQ (see rping/SRP captures)."""
    if not fl:
        fl = rdma_calc_flow_label(lqpn, rqpn)
    return rdma_flow_label_to_udp_sport(fl)


class IpIdentGenerator:
    """Incrementing IPv4 IDs per (source, destination), as Linux's
    ``__ip_select_ident`` does for rxe's DF packets (one counter shared by every
    QP talking to the same peer)."""

    def __init__(self, start: int = 0) -> None:
        self._start = start & 0xFFFF
        self._next: dict[tuple[bytes, bytes], int] = {}

    def __call__(self, saddr: bytes, daddr: bytes) -> int:
        """Return the next ID for this address pair."""
        key = (saddr, daddr)
        v = self._next.get(key, self._start)
        self._next[key] = (v + 1) & 0xFFFF
        return v


# --- GIDs -----------------------------------------------------------------------------


def rdma_ip2gid(addr: str | IPv4Address | IPv6Address) -> bytes:
    """The 16-byte GID of an IP address (ib_addr.h ``rdma_ip2gid``): IPv4 maps to
    ``::ffff:a.b.c.d`` (``ipv6_addr_set_v4mapped``)."""
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if isinstance(ip, IPv4Address):
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def rdma_gid2ip(gid: BytesLike) -> IPv4Address | IPv6Address:
    """The IP address of a RoCEv2 GID (ib_addr.h ``rdma_gid2ip``): IPv4-mapped
    GIDs give an IPv4 address, others IPv6."""
    raw = bytes(gid)
    if len(raw) != 16:
        raise HeaderFieldError(f"a GID is 16 bytes, got {len(raw)}")
    ip6 = IPv6Address(raw)
    return ip6.ipv4_mapped or ip6


Address: TypeAlias = str | IPv4Address | IPv6Address | bytes
"""An IP address as the framing functions take it: a string, an
:mod:`ipaddress` object, packed bytes or a 16-byte GID."""


def _addr_bytes(addr: Address) -> bytes:
    if isinstance(addr, bytes):
        if len(addr) == 16 and addr[:12] == b"\0" * 10 + b"\xff\xff":
            return addr[12:]  # an IPv4-mapped GID means RoCEv2 over IPv4
        if len(addr) in (4, 16):
            return addr
        raise HeaderFieldError(f"an address is 4 or 16 bytes, got {len(addr)}")
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.packed
    return ip.packed


def packed_addrs(src: Address, dst: Address) -> tuple[bytes, bytes]:
    """Source and destination as :class:`RoceFrame` carries them: 4 packed
    bytes for IPv4 (IPv4-mapped GIDs and ``::ffff:a.b.c.d`` included, as rxe's
    ``rxe_init_av`` picks the network type), 16 for IPv6. Both must be of one
    family (:class:`ValueError`)."""
    # Packed IPv4 addresses (the devices' data path) need no conversion.
    s = src if type(src) is bytes and len(src) == 4 else _addr_bytes(src)
    d = dst if type(dst) is bytes and len(dst) == 4 else _addr_bytes(dst)
    if len(s) != len(d):
        raise HeaderFieldError("source and destination must both be IPv4 or both IPv6")
    return s, d


# --- checksums -------------------------------------------------------------------------


def _ones_sum(data: BytesLike) -> int:
    """RFC 1071 one's-complement sum of big-endian 16-bit words, folded."""
    b = bytes(data)
    if len(b) & 1:
        b += b"\0"
    s = sum(array("H", b))  # native-order words; fixed up below (RFC 1071 §2(B))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    if _LITTLE:
        s = ((s & 0xFF) << 8) | (s >> 8)
    return s


def _csum_fold(s: int) -> int:
    """RFC 1071 one's-complement sum of the 16-bit words in ``s``, folded to 16
    bits. ``s`` may be a big-endian byte string read as one integer, a sum of
    words, or a sum of both. Why one ``%`` suffices: 2**16 is 1 modulo 0xFFFF,
    so ``s`` is congruent to the sum of its 16-bit words, and end-around-carry
    addition is addition modulo 0xFFFF in which a non-zero multiple of 0xFFFF
    reads 0xFFFF. It replaces a word loop and the carry folds."""
    return s % 0xFFFF or (0xFFFF if s else 0)


def _ipv4_header_end(hdr: BytesLike, off: int, ver_ihl: int) -> int:
    """The UDP offset of an IPv4 header at ``off`` whose version/IHL byte is not
    0x45: checks the version and that the options are there (``ip_rcv_core``
    order), so that the header can still be checksummed and demultiplexed."""
    if ver_ihl >> 4 != 4:
        raise MalformedPacket(f"IPv4 header has version {ver_ihl >> 4}", reason="bad_version")
    ihl = (ver_ihl & 0x0F) * 4
    if ihl < 20:
        raise MalformedPacket(f"IPv4 IHL {ihl // 4} is below 5", reason="bad_header")
    if len(hdr) < off + ihl:
        raise MalformedPacket("truncated IPv4 options", reason="truncated")
    return off + ihl


def _ipv4_csum(hdr: BytesLike) -> int:
    """Checksum of the 20-byte IPv4 header at the start of ``hdr``: the value
    to store with the checksum field zero, 0 when checking a received header."""
    return ~_csum_fold(int.from_bytes(hdr[:20], "big")) & 0xFFFF


def _udp_csum(saddr: bytes, daddr: bytes, udp: BytesLike) -> int:
    if len(saddr) == 16:
        pseudo = saddr + daddr + struct.pack(">IxxxB", len(udp), IPPROTO_UDP)
    else:
        pseudo = saddr + daddr + struct.pack(">xBH", IPPROTO_UDP, len(udp))
    s = _ones_sum(pseudo) + _ones_sum(udp)
    s = (s & 0xFFFF) + (s >> 16)
    c = ~s & 0xFFFF
    return c or 0xFFFF  # RFC 768: a computed 0 is sent as all ones


# --- the frame ------------------------------------------------------------------------


@dataclass(slots=True)
class RoceFrame:
    """A RoCEv2 Ethernet frame: L2/L3/L4 fields plus the transport
    :class:`~softrdma.transport.packet.Packet` (rxe_net.c ``prepare4`` /
    ``prepare6`` fill the same fields).

    ``saddr`` / ``daddr`` are packed addresses (4 bytes IPv4, 16 bytes IPv6;
    kernel ``iph->saddr``); ``tos`` is the IPv4 TOS or IPv6 traffic class,
    ``ttl`` the TTL or hop limit; ``ip_id`` and ``df`` are IPv4-only,
    ``flow_label`` IPv6-only. ``udp_checksum`` asks for a real UDP checksum
    (rxe sends 0). ``trailer`` is anything after the IP datagram (Ethernet
    padding), kept so a decoded frame re-encodes byte for byte. ``icrc`` is
    the value found on decode (set again by :meth:`encode`).
    """

    packet: Packet
    saddr: bytes
    daddr: bytes
    sport: int
    dport: int = ROCE_V2_UDP_DPORT
    eth_dst: bytes = _ZERO_MAC
    eth_src: bytes = _ZERO_MAC
    vlan_tci: int | None = None
    tos: int = 0
    ttl: int = 64
    ip_id: int = 0
    df: bool = True
    flow_label: int = 0
    udp_checksum: bool = False
    trailer: bytes = b""
    icrc: int | None = field(default=None, compare=False)

    @classmethod
    def build(
        cls,
        packet: Packet,
        src: Address,
        dst: Address,
        sport: int,
        **kwargs: object,
    ) -> RoceFrame:
        """A frame from addresses given as strings, :mod:`ipaddress` objects,
        packed bytes or 16-byte GIDs (IPv4-mapped GIDs select IPv4, as rxe's
        ``rxe_init_av`` network type does)."""
        s, d = packed_addrs(src, dst)
        return cls(packet, s, d, sport, **kwargs)  # type: ignore[arg-type]

    @property
    def ip_version(self) -> int:
        """4 or 6."""
        return 4 if len(self.saddr) == 4 else 6

    @property
    def src_ip(self) -> IPv4Address | IPv6Address:
        """Source address as an :mod:`ipaddress` object."""
        return ipaddress.ip_address(self.saddr)

    @property
    def dst_ip(self) -> IPv4Address | IPv6Address:
        """Destination address as an :mod:`ipaddress` object."""
        return ipaddress.ip_address(self.daddr)

    @property
    def sgid(self) -> bytes:
        """Source GID (``rdma_ip2gid`` of the source address)."""
        return rdma_ip2gid(self.src_ip)

    @property
    def dgid(self) -> bytes:
        """Destination GID (``rdma_ip2gid`` of the destination address)."""
        return rdma_ip2gid(self.dst_ip)

    def encode(self) -> bytes:
        """The frame bytes; see :func:`encode_roce_v2`."""
        return encode_roce_v2(self)


def _frame_error(frame: RoceFrame, problem: str) -> HeaderFieldError:
    """The error for a frame that cannot be encoded. The packet's own error,
    if it has one, comes first (as when it was encoded before the frame)."""
    frame.packet.encode_parts()
    return HeaderFieldError(problem)


def encode_roce_v2(frame: RoceFrame) -> bytes:
    """Build Ethernet / IP / UDP / transport / ICRC (rxe_net.c ``rxe_prepare``
    → ``prepare4``/``prepare6``, rxe_icrc.c ``rxe_icrc_generate``). Sets
    ``frame.icrc``. Bad field values raise :class:`HeaderFieldError`.

    All headers, Ethernet to the last transport header, are packed in one call
    (:func:`_frame_layout`); the ICRC runs over them, the payload and the pad
    without joining them first; the payload is copied once, by the final join.
    """
    transport, vals, payload, pad = frame.packet.wire_values()
    n = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    udp_len = 8 + transport.size + n + pad + ICRC_SIZE
    saddr, daddr = frame.saddr, frame.daddr
    ipv6 = len(saddr) != 4
    if udp_len + (0 if ipv6 else 20) > 0xFFFF:
        raise _frame_error(frame, f"UDP datagram of {udp_len} bytes is too long for IP")
    eth_dst, eth_src, vlan = frame.eth_dst, frame.eth_src, frame.vlan_tci
    tos, ttl = frame.tos, frame.ttl
    try:  # struct.error / TypeError: a field out of range or of the wrong type
        if len(eth_dst) != 6 or len(eth_src) != 6:
            raise _frame_error(frame, "MAC addresses are 6 bytes")
        if not ipv6 and len(daddr) == 4:
            tot_len = 20 + udp_len
            frag = IP_DF if frame.df else 0
            ip_id = frame.ip_id
            # The header checksum from the field values (the words with the
            # checksum zero), so that the header is packed once, complete.
            words = (0x4500 | tos) + tot_len + ip_id + frag + (ttl << 8 | IPPROTO_UDP)
            csum = ~_csum_fold(words + int.from_bytes(saddr + daddr, "big")) & 0xFFFF
            ip: tuple[object, ...] = (
                0x45, tos, tot_len, ip_id, frag, ttl, IPPROTO_UDP, csum, saddr, daddr
            )  # fmt: skip
        elif len(saddr) == 16 and len(daddr) == 16:
            if tos >> 8 or frame.flow_label >> 20:
                raise _frame_error(frame, "IPv6 traffic class is 8 bits, flow label 20 bits")
            vtf = 6 << 28 | tos << 20 | frame.flow_label
            ip = (vtf, udp_len, IPPROTO_UDP, ttl, saddr, daddr)
        else:
            raise _frame_error(frame, "saddr/daddr must both be 4 (IPv4) or 16 (IPv6) bytes")
        ethertype = ETH_P_IPV6 if ipv6 else ETH_P_IP
        eth: tuple[object, ...] = (
            (eth_dst, eth_src, ethertype)
            if vlan is None
            else (eth_dst, eth_src, ETH_P_8021Q, vlan, ethertype)
        )
        headers = _frame_layout(vlan is not None, ipv6, transport).pack(
            *eth, *ip, frame.sport, frame.dport, udp_len, 0, *vals
        )
    except (struct.error, TypeError) as e:
        raise _frame_error(frame, f"cannot encode RoCEv2 frame: {e}") from None
    # ICRC: masked IP + UDP + BTH and the extension headers, then the rest
    # without copying the payload.
    l3 = 14 if vlan is None else 18
    crc = icrc_headers(headers[l3:], ipv6)
    crc = zlib.crc32(payload, crc)
    if pad:
        crc = zlib.crc32(bytes(pad), crc)
    frame.icrc = crc
    tail = _TAILS[pad].pack(crc)
    if frame.udp_checksum:
        l4 = l3 + (40 if ipv6 else 20)
        csum = _udp_csum(saddr, daddr, b"".join((headers[l4:], payload, tail)))
        headers = b"".join((headers[: l4 + 6], _H.pack(csum), headers[l4 + 8 :]))
    return b"".join((headers, payload, tail, frame.trailer))


def decode_roce_v2(frame_bytes: BytesLike, *, verify_icrc: bool = True) -> RoceFrame:
    """Parse an Ethernet frame carrying RoCEv2 (rxe_net.c ``rxe_udp_encap_recv``
    → rxe_recv.c ``rxe_rcv``): Ethernet II (one optional 802.1Q tag), IPv4
    without options or fragments (header checksum checked) or IPv6 with UDP as
    next header, UDP to port 4791 (checksum checked when non-zero), the
    transport packet and the ICRC (checked unless ``verify_icrc`` is false;
    :class:`IcrcError`). The packet's payload is a memoryview into
    ``frame_bytes``.

    Errors (see :mod:`.errors`): :class:`NotRoceV2` when the frame is intact
    as far as it identifies itself and is something else — ethertype not IPv4
    or IPv6 (ARP), IP protocol / IPv6 next header not UDP (TCP; IPv6
    extension headers are not walked), a non-first IPv4 fragment, UDP
    destination port not 4791. The checks run in the order Linux's receive
    path runs them (``ip_rcv_core``, ``udp_rcv``, the tunnel socket): an IPv4
    header is only trusted to say "not UDP" once its checksum holds, so a
    corrupted RoCEv2 header reads as broken, not as foreign. Everything else
    — truncation, bad lengths, versions, checksums, options, fragmentation
    of a RoCEv2 datagram, the transport checks, the ICRC — is a
    :class:`MalformedPacket` with its ``reason``."""
    mv = frame_bytes if type(frame_bytes) is memoryview else memoryview(frame_bytes)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    # Small header pieces are read from ``hdr``: slicing bytes copies a few
    # bytes but costs less than a memoryview slice, and int.from_bytes reads
    # bytes faster. A memoryview input is read through ``mv`` throughout.
    hdr = frame_bytes if type(frame_bytes) is bytes else mv
    n = len(mv)
    if n < 14:
        raise MalformedPacket(f"{n} bytes is shorter than an Ethernet header", reason="truncated")
    eth_dst, eth_src, ethertype = _ETH.unpack_from(mv)
    off = 14
    vlan: int | None = None
    if ethertype == ETH_P_8021Q:
        if n < 18:
            raise MalformedPacket("truncated 802.1Q tag", reason="truncated")
        vlan, ethertype = _VLAN.unpack_from(mv, 14)
        off = 18
    ip_id = 0
    df = False
    flow_label = 0
    if ethertype == ETH_P_IP:
        if n < off + 20:
            raise MalformedPacket("truncated IPv4 header", reason="truncated")
        ver_ihl, tos, tot_len, ip_id, frag, ttl, proto, _, saddr, daddr = _IPV4.unpack_from(mv, off)
        l4 = off + 20
        if ver_ihl != 0x45:
            l4 = _ipv4_header_end(hdr, off, ver_ihl)
        # A correct header sums to 0xFFFF with its checksum in (RFC 1071).
        if _csum_fold(int.from_bytes(hdr[off:l4])) != 0xFFFF:
            raise MalformedPacket("bad IPv4 header checksum", reason="bad_checksum")
        if proto != IPPROTO_UDP:
            raise NotRoceV2(f"IP protocol {proto} is not UDP")
        if frag & IP_OFFSET:
            raise NotRoceV2(f"IPv4 fragment at offset {(frag & IP_OFFSET) * 8}: no UDP header")
        end = off + tot_len
        if end < l4 + 8:
            raise MalformedPacket(
                f"IPv4 total length {tot_len} leaves no room for UDP", reason="bad_length"
            )
    elif ethertype == ETH_P_IPV6:
        if n < off + 40:
            raise MalformedPacket("truncated IPv6 header", reason="truncated")
        vtf, plen, nh, ttl, saddr, daddr = _IPV6.unpack_from(mv, off)
        if vtf >> 28 != 6:
            raise MalformedPacket(f"IPv6 header has version {vtf >> 28}", reason="bad_version")
        if nh != IPPROTO_UDP:
            raise NotRoceV2(f"IPv6 next header {nh} is not UDP")
        tos = (vtf >> 20) & 0xFF
        flow_label = vtf & 0xFFFFF
        l4 = off + 40
        end = l4 + plen
        if plen < 8:
            raise MalformedPacket(
                f"IPv6 payload length {plen} is below a UDP header", reason="bad_length"
            )
    else:
        raise NotRoceV2(f"ethertype {ethertype:#06x} is not IPv4 or IPv6")
    if n < l4 + 8:
        raise MalformedPacket("truncated UDP header", reason="truncated")
    sport, dport, ulen, ucsum = _UDP.unpack_from(mv, l4)
    if dport != ROCE_V2_UDP_DPORT:
        raise NotRoceV2(f"UDP destination port {dport} is not RoCEv2 ({ROCE_V2_UDP_DPORT})")
    # Identified as RoCEv2: from here on every problem is a malformation.
    if ethertype == ETH_P_IP:
        if l4 != off + 20:
            raise MalformedPacket(
                f"IPv4 header with {l4 - off - 20} bytes of options: RoCEv2 ICRC covers 20",
                reason="bad_header",
            )
        if frag & ~IP_DF:
            raise MalformedPacket(
                f"IPv4 fragment or reserved flag (frag_off {frag:#06x})", reason="bad_header"
            )
        df = frag == IP_DF
    if end > n:
        raise MalformedPacket(
            f"IP datagram claims {end - off} bytes, frame has {n - off}", reason="truncated"
        )
    if ulen != end - l4:
        raise MalformedPacket(
            f"UDP length {ulen} disagrees with the IP length ({end - l4})", reason="bad_length"
        )
    ib = l4 + 8
    if end - ib < BTH_SIZE + ICRC_SIZE:
        raise MalformedPacket(
            f"{end - ib} bytes of UDP payload cannot hold a BTH and an ICRC", reason="truncated"
        )
    if ucsum and _udp_csum(saddr, daddr, mv[l4:end]) not in (0, 0xFFFF):
        raise MalformedPacket("bad UDP checksum", reason="bad_checksum")
    (found,) = _I.unpack_from(mv, end - ICRC_SIZE)
    if verify_icrc:
        crc = icrc_headers(hdr[off : ib + BTH_SIZE], ethertype == ETH_P_IPV6)
        crc = zlib.crc32(mv[ib + BTH_SIZE : end - ICRC_SIZE], crc)
        if crc != found:
            raise IcrcError(crc, found)
    packet = Packet.decode(mv[ib : end - ICRC_SIZE])
    return RoceFrame(
        packet,
        saddr,
        daddr,
        sport,
        dport,
        eth_dst,
        eth_src,
        vlan,
        tos,
        ttl,
        ip_id,
        df,
        flow_label,
        ucsum != 0,
        bytes(mv[end:]) if end != n else b"",
        found,
    )
