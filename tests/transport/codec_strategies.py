"""Hypothesis strategies and reference helpers for the codec properties:
RoCEv2 frames, the endpoints of a RoCEv2 UDP payload, where the ICRC's
coverage lies in a frame, and the bits a receiver ignores.

The layouts here are written from the specifications (IBTA annex 17, RFC 791,
RFC 8200, RFC 768), not taken from ``softrdma.transport``, so that the
properties check the codecs against an independent reading.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from softrdma.transport.packet import Packet
from softrdma.transport.roce import RoceFrame

from .strategies import packets, u

#: ``::ffff:0:0/96``: the prefix of an IPv4-mapped IPv6 address (and GID).
V4_MAPPED = bytes(10) + b"\xff\xff"

ETH_HDR = 14
VLAN_TAG = 4
IPV4_HDR = 20
IPV6_HDR = 40
UDP_HDR = 8
BTH = 12
ICRC = 4


def ipv6_addrs(*, mapped: bool = True) -> st.SearchStrategy[bytes]:
    """16-byte IPv6 addresses; IPv4-mapped ones too unless ``mapped`` is false."""
    any16 = st.binary(min_size=16, max_size=16)
    if mapped:
        return any16 | st.binary(min_size=4, max_size=4).map(V4_MAPPED.__add__)
    return any16.filter(lambda a: a[:12] != V4_MAPPED)


@st.composite
def roce_frames(
    draw: st.DrawFn, max_payload: int = 64, udp_checksum: bool | None = None
) -> RoceFrame:
    """A RoCEv2 frame in the form :func:`decode_roce_v2` returns it: IPv4 or
    IPv6, with or without a VLAN tag, any addresses, ports, TOS/TTL, IPv4 ID
    and DF or IPv6 flow label, a real UDP checksum or none (``udp_checksum``
    forces one), and any Ethernet trailer. IPv6 frames have ``ip_id=0`` and
    ``df=False``, IPv4 ones ``flow_label=0``: the decoder's values for the
    fields the other IP version has not got."""
    v6 = draw(st.booleans())
    addr = ipv6_addrs() if v6 else st.binary(min_size=4, max_size=4)
    return RoceFrame(
        draw(packets(max_payload=max_payload)),
        draw(addr),
        draw(addr),
        draw(u(16)),
        eth_dst=draw(st.binary(min_size=6, max_size=6)),
        eth_src=draw(st.binary(min_size=6, max_size=6)),
        vlan_tci=draw(st.none() | u(16)),
        tos=draw(u(8)),
        ttl=draw(u(8)),
        ip_id=0 if v6 else draw(u(16)),
        df=not v6 and draw(st.booleans()),
        flow_label=draw(u(20)) if v6 else 0,
        udp_checksum=draw(st.booleans()) if udp_checksum is None else udp_checksum,
        trailer=draw(st.binary(max_size=8)),
    )


@dataclass(frozen=True)
class UdpEndpoints:
    """What a UDP socket knows of a RoCEv2 datagram, plus the IPv4 ID and DF
    the sender's kernel put in the header it hides. ``saddr`` / ``daddr`` are
    as passed to the codec (a 16-byte IPv4-mapped GID stands for IPv4);
    :attr:`packed` is the form a :class:`RoceFrame` carries them in."""

    saddr: bytes
    daddr: bytes
    sport: int
    dport: int
    ip_id: int
    df: bool
    tos: int
    ttl: int

    @property
    def ipv6(self) -> bool:
        return len(self.saddr) == 16 and self.saddr[:12] != V4_MAPPED

    @property
    def packed(self) -> tuple[bytes, bytes]:
        if self.ipv6:
            return self.saddr, self.daddr
        return self.saddr[-4:], self.daddr[-4:]

    def frame(self, packet: Packet) -> RoceFrame:
        """The frame :func:`decode_roce_udp` must return for ``packet`` sent
        from these endpoints (IPv6 has no ID or DF: 0 and False)."""
        s, d = self.packed
        v6 = self.ipv6
        return RoceFrame(
            packet,
            s,
            d,
            self.sport,
            self.dport,
            tos=self.tos,
            ttl=self.ttl,
            ip_id=0 if v6 else self.ip_id,
            df=not v6 and self.df,
        )


@st.composite
def udp_endpoints(draw: st.DrawFn) -> UdpEndpoints:
    """IPv4 (as 4 packed bytes or as IPv4-mapped GIDs) or IPv6 endpoints, any
    ports (the socket demultiplexed: any destination port), ID, DF, TOS, TTL."""
    kind = draw(st.sampled_from(["ipv4", "ipv4-gid", "ipv6"]))
    if kind == "ipv6":
        s, d = draw(ipv6_addrs(mapped=False)), draw(ipv6_addrs(mapped=False))
    else:
        s, d = draw(st.binary(min_size=4, max_size=4)), draw(st.binary(min_size=4, max_size=4))
        if kind == "ipv4-gid":
            s, d = V4_MAPPED + s, V4_MAPPED + d
    return UdpEndpoints(
        s,
        d,
        draw(u(16)),
        draw(st.just(4791) | u(16)),
        draw(u(16)),
        draw(st.booleans()),
        draw(u(8)),
        draw(u(8)),
    )


# --- where things are in an encoded frame --------------------------------------------------


@dataclass(frozen=True)
class FrameLayout:
    """Offsets in an encoded frame: the IP header at ``l3``, UDP at ``l4``,
    the BTH at ``bth`` and the ICRC ending at ``end`` (the trailer follows)."""

    l3: int
    l4: int
    bth: int
    end: int
    ipv6: bool

    @classmethod
    def of(cls, frame: RoceFrame, raw: bytes) -> FrameLayout:
        l3 = ETH_HDR + (VLAN_TAG if frame.vlan_tci is not None else 0)
        ipv6 = len(frame.saddr) == 16
        l4 = l3 + (IPV6_HDR if ipv6 else IPV4_HDR)
        return cls(l3, l4, l4 + UDP_HDR, len(raw) - len(frame.trailer), ipv6)

    def icrc_masked(self) -> dict[int, int]:
        """Byte offset → the bits of that byte the ICRC does not cover
        (IBTA annex 17 §A17.4.1: IPv4 TOS, TTL, header checksum; IPv6
        traffic class, flow label, hop limit; the UDP checksum; BTH byte 4 —
        FECN, BECN and Resv6a)."""
        ip, udp = self.l3, self.l4
        if self.ipv6:
            masked = {ip: 0x0F, ip + 1: 0xFF, ip + 2: 0xFF, ip + 3: 0xFF, ip + 7: 0xFF}
        else:
            masked = {ip + 1: 0xFF, ip + 8: 0xFF, ip + 10: 0xFF, ip + 11: 0xFF}
        masked |= {udp + 6: 0xFF, udp + 7: 0xFF, self.bth + 4: 0xFF}
        return masked

    def icrc_covered_bits(self) -> list[tuple[int, int]]:
        """Every (byte offset, one-bit mask) the ICRC covers: the IP header,
        UDP header and BTH but their masked bits, then everything to the end
        of the ICRC itself."""
        masked = self.icrc_masked()
        return [
            (i, 1 << b)
            for i in range(self.l3, self.end)
            for b in range(8)
            if not masked.get(i, 0) >> b & 1
        ]


def ones_complement_sum(data: bytes) -> int:
    """RFC 1071 sum of big-endian 16-bit words with end-around carries."""
    if len(data) & 1:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def refresh_checksums(raw: bytearray, frame: RoceFrame, layout: FrameLayout) -> None:
    """Recompute, in place, the checksums a router or NIC would after a
    change: the IPv4 header checksum and, if the frame carries one, the UDP
    checksum (over the lengths the frame was built with). Afterwards only the
    ICRC (or the frame's structure) can tell that something changed."""
    if not layout.ipv6:
        ip = layout.l3
        raw[ip + 10 : ip + 12] = b"\0\0"
        csum = ~ones_complement_sum(bytes(raw[ip : ip + IPV4_HDR])) & 0xFFFF
        raw[ip + 10 : ip + 12] = csum.to_bytes(2, "big")
    if frame.udp_checksum:
        l4, end = layout.l4, layout.end
        udp_len = end - l4
        if layout.ipv6:
            s, d = raw[layout.l3 + 8 : layout.l3 + 24], raw[layout.l3 + 24 : layout.l3 + 40]
            pseudo = bytes(s + d) + udp_len.to_bytes(4, "big") + b"\0\0\0\x11"
        else:
            s, d = raw[layout.l3 + 12 : layout.l3 + 16], raw[layout.l3 + 16 : layout.l3 + 20]
            pseudo = bytes(s + d) + b"\0\x11" + udp_len.to_bytes(2, "big")
        raw[l4 + 6 : l4 + 8] = b"\0\0"
        csum = ~ones_complement_sum(pseudo + bytes(raw[l4:end])) & 0xFFFF
        raw[l4 + 6 : l4 + 8] = (csum or 0xFFFF).to_bytes(2, "big")


# --- the bits a receiver ignores ------------------------------------------------------------


def transport_ignored_bits(pkt: Packet, length: int) -> dict[int, int]:
    """Byte offset (from the BTH) → the bits of a received transport packet
    of ``length`` bytes that the decoder ignores and the encoder writes as
    zero: BTH Resv6a (byte 4) and Resv7 (byte 8), the DETH reserved byte, the
    FETH reserved bits, the XRCETH reserved byte and the pad bytes. A decoded packet re-encodes to the received bytes but for
    these."""
    ignore = {4: 0x3F, 8: 0x7F}
    if pkt.deth is not None:
        ignore[BTH + 4] = 0xFF
    if pkt.feth is not None:  # FETH (right after the BTH): 26 reserved bits
        ignore.update({BTH: 0xFF, BTH + 1: 0xFF, BTH + 2: 0xFF, BTH + 3: 0xC0})
    if pkt.xrceth is not None:  # XRCETH (right after the BTH): its reserved byte
        ignore[BTH] = 0xFF
    for i in range(length - pkt.bth.pad, length):
        ignore[i] = 0xFF
    return ignore


def assert_equal_but(out: bytes, raw: bytes, ignore: dict[int, int]) -> None:
    """``out`` equals ``raw`` in every bit not in ``ignore`` (offset → mask)."""
    assert len(out) == len(raw)
    for i, (a, b) in enumerate(zip(out, raw, strict=True)):
        keep = ~ignore.get(i, 0) & 0xFF
        assert a & keep == b & keep, f"byte {i}: {a:#04x} != {b:#04x}"


def canonical_frame(raw: bytes, decoded: RoceFrame) -> bytes:
    """The frame a sender would have put on the wire for what ``raw`` was
    decoded to: the transport's ignored bits (:func:`transport_ignored_bits`)
    cleared and, if that changed any bit the ICRC covers, the ICRC and a
    non-zero UDP checksum recomputed (the ICRC with
    :func:`~softrdma.transport.icrc.icrc_compute`, not the frame encoder)."""
    from softrdma.transport.icrc import icrc_compute

    layout = FrameLayout.of(decoded, raw)
    out = bytearray(raw)
    ignore = transport_ignored_bits(decoded.packet, layout.end - ICRC - layout.bth)
    for off, bits in ignore.items():
        out[layout.bth + off] &= ~bits & 0xFF
    if out[layout.bth + 5 :] != raw[layout.bth + 5 :]:
        crc = icrc_compute(bytes(out[layout.l3 : layout.end - ICRC]))
        out[layout.end - ICRC : layout.end] = crc.to_bytes(4, "little")
    if out != raw:
        refresh_checksums(out, decoded, layout)
    return bytes(out)


@st.composite
def mangled_transports(draw: st.DrawFn, max_payload: int = 64) -> bytes:
    """Transport parts (BTH .. pad) that are mostly not valid: a valid packet
    with up to four bytes overwritten and its length changed by up to four
    bytes either way, or any bytes at all."""
    if draw(st.booleans()):
        return draw(st.binary(min_size=BTH, max_size=BTH + 16 + max_payload))
    raw = bytearray(draw(packets(max_payload=max_payload)).encode())
    for _ in range(draw(st.integers(0, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(u(8))
    delta = draw(st.integers(-4, 4))
    if delta > 0:
        raw += draw(st.binary(min_size=delta, max_size=delta))
    elif delta < 0 and len(raw) + delta >= BTH:
        del raw[delta:]
    return bytes(raw)
