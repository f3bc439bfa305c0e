"""RoCEv2 invariant CRC (ICRC).

Kernel counterpart: ``drivers/infiniband/sw/rxe/rxe_icrc.c`` (``rxe_icrc_hdr``,
``rxe_icrc_generate``, ``rxe_icrc_check``).

The ICRC is CRC-32 (the Ethernet polynomial, reflected — :func:`zlib.crc32`)
over:

1. 8 bytes of 0xFF standing in for the IB LRH (rxe starts from the
   precomputed state 0xDEBB20E3);
2. the IP header with the fields routers may change set to all ones — IPv4
   TOS, TTL and header checksum; IPv6 traffic class, flow label and hop limit —
   and the UDP header with its checksum set to all ones;
3. the BTH with byte 4 (FECN, BECN, reserved) set to 0xFF;
4. the remaining transport headers, the payload and the pad.

It is stored after the pad, least significant byte first
(``struct.pack('<I', crc)``). The IPv4 ID and flags are *not* masked, so
the real IP header is needed to check it.

Masking is a single OR of the 40 (IPv4) or 60 (IPv6) header bytes with a
constant, and the rest of the packet is fed to :func:`zlib.crc32` with a
running value, so nothing after the BTH is copied. :func:`icrc_headers`
masks the same way but takes the extension headers in the same call (the
frame encoder has them packed right behind the BTH).
"""

from __future__ import annotations

import struct
import zlib

from softrdma.transport.headers import BTH_SIZE, BytesLike, MalformedPacket

__all__ = [
    "ICRC_SIZE",
    "IcrcError",
    "icrc_check",
    "icrc_compute",
    "icrc_hdr",
    "icrc_headers",
    "icrc_ipv4",
    "icrc_ipv6",
    "icrc_pack",
]

ICRC_SIZE = 4
"""rxe_hdr.h RXE_ICRC_SIZE."""

IPV4_HDR_SIZE = 20
IPV6_HDR_SIZE = 40
UDP_HDR_SIZE = 8

_ICRC = struct.Struct("<I")

# CRC state after the 8 0xFF bytes of the pseudo LRH. zlib's running value is
# the finalised CRC, so this equals ~0xDEBB20E3 (rxe_icrc.c's seed).
_LRH_CRC = zlib.crc32(b"\xff" * 8)

_V4_LEN = IPV4_HDR_SIZE + UDP_HDR_SIZE + BTH_SIZE  # 40
_V6_LEN = IPV6_HDR_SIZE + UDP_HDR_SIZE + BTH_SIZE  # 60


def _mask(length: int, ones: tuple[tuple[int, int], ...]) -> int:
    m = bytearray(length)
    for start, end in ones:
        m[start:end] = b"\xff" * (end - start)
    return int.from_bytes(m, "big")


# IPv4: TOS (1), TTL (8), checksum (10-11); UDP checksum (26-27); BTH byte 4 (32).
_V4_MASK = _mask(_V4_LEN, ((1, 2), (8, 9), (10, 12), (26, 28), (32, 33)))
# IPv6: traffic class + flow label (low 28 bits of word 0), hop limit (7);
# UDP checksum (46-47); BTH byte 4 (52).
_V6_MASK = _mask(_V6_LEN, ((7, 8), (46, 48), (52, 53))) | (0x0FFFFFFF << (8 * (_V6_LEN - 4)))


class IcrcError(MalformedPacket):
    """The ICRC of a received packet does not match (rxe_icrc.c
    ``rxe_icrc_check`` → "bad ICRC", packet dropped)."""

    def __init__(self, expected: int, found: int) -> None:
        super().__init__(f"bad ICRC: computed {expected:#010x}, packet carries {found:#010x}")
        self.expected = expected
        self.found = found


def icrc_pack(crc: int) -> bytes:
    """The 4 ICRC wire bytes (little-endian, as rxe stores ``~crc`` in CPU
    order on a little-endian host)."""
    return _ICRC.pack(crc)


def icrc_hdr(ip_udp_bth: BytesLike) -> int:
    """Running CRC after the masked pseudo-header (rxe_icrc.c ``rxe_icrc_hdr``).

    ``ip_udp_bth`` is the IP header (20-byte IPv4 or 40-byte IPv6, told apart
    by the version nibble), the UDP header and the BTH, contiguous; extra bytes
    after the BTH are ignored. Continue with ``zlib.crc32(rest, crc)``.
    """
    v = ip_udp_bth[0] >> 4 if len(ip_udp_bth) else 0
    if v == 4:
        if ip_udp_bth[0] != 0x45:
            raise MalformedPacket("IPv4 header with options: RoCEv2 ICRC covers a 20-byte header")
        n, m = _V4_LEN, _V4_MASK
    elif v == 6:
        n, m = _V6_LEN, _V6_MASK
    else:
        raise MalformedPacket(f"IP version {v} is neither 4 nor 6")
    if len(ip_udp_bth) < n:
        raise MalformedPacket(f"ICRC pseudo-header needs {n} bytes, got {len(ip_udp_bth)}")
    masked = (int.from_bytes(ip_udp_bth[:n], "big") | m).to_bytes(n, "big")
    return zlib.crc32(masked, _LRH_CRC)


def icrc_headers(headers: BytesLike, ipv6: bool) -> int:
    """Running CRC after the masked pseudo-header and whatever follows the BTH
    in ``headers``: :func:`icrc_hdr` without its checks, for the RoCEv2
    framing code, which has parsed or built the IP header itself.

    ``headers`` runs from the start of the IP header (20-byte IPv4 when
    ``ipv6`` is false, else 40-byte IPv6) to at least the end of the BTH, so
    the extension headers after the BTH go into the same ``zlib.crc32`` call.
    """
    n = len(headers)
    # The masks cover the first 40 / 60 bytes; align them with the start of
    # ``headers`` (big-endian, so shift past the bytes after the BTH).
    mask = (_V6_MASK << 8 * (n - _V6_LEN)) if ipv6 else (_V4_MASK << 8 * (n - _V4_LEN))
    return zlib.crc32((int.from_bytes(headers, "big") | mask).to_bytes(n, "big"), _LRH_CRC)


def icrc_compute(l3: BytesLike) -> int:
    """ICRC of a contiguous IP header .. pad (the ICRC itself excluded)
    (rxe_icrc.c ``rxe_icrc_hdr`` + ``crc32_le`` over the rest)."""
    mv = memoryview(l3)
    crc = icrc_hdr(mv)
    n = _V4_LEN if mv[0] >> 4 == 4 else _V6_LEN
    return zlib.crc32(mv[n:], crc)


def icrc_check(l3: BytesLike) -> int:
    """Verify the ICRC of a contiguous IP header .. ICRC (rxe_icrc.c
    ``rxe_icrc_check``); returns the CRC, raises :class:`IcrcError`."""
    mv = memoryview(l3)
    if len(mv) < ICRC_SIZE:
        raise MalformedPacket("packet too short for an ICRC")
    expected = icrc_compute(mv[:-ICRC_SIZE])
    (found,) = _ICRC.unpack_from(mv, len(mv) - ICRC_SIZE)
    if found != expected:
        raise IcrcError(expected, found)
    return expected


def _icrc_split(ip_hdr: BytesLike, hlen: int, udp_hdr: BytesLike, ib: BytesLike) -> int:
    if len(ip_hdr) != hlen or len(udp_hdr) != UDP_HDR_SIZE:
        raise MalformedPacket(
            f"need a {hlen}-byte IP and an 8-byte UDP header, got {len(ip_hdr)} and {len(udp_hdr)}"
        )
    mv = memoryview(ib)
    if len(mv) < BTH_SIZE:
        raise MalformedPacket("transport part shorter than a BTH")
    crc = icrc_hdr(b"".join((ip_hdr, udp_hdr, mv[:BTH_SIZE])))  # 40 or 60 bytes
    return zlib.crc32(mv[BTH_SIZE:], crc)


def icrc_ipv4(ip_hdr: BytesLike, udp_hdr: BytesLike, ib: BytesLike) -> int:
    """ICRC from a 20-byte IPv4 header, the UDP header and the transport part
    BTH .. pad (rxe_icrc.c ``rxe_icrc_generate`` for an IPv4 skb)."""
    if not len(ip_hdr) or ip_hdr[0] >> 4 != 4:
        raise MalformedPacket("not an IPv4 header")
    return _icrc_split(ip_hdr, IPV4_HDR_SIZE, udp_hdr, ib)


def icrc_ipv6(ip_hdr: BytesLike, udp_hdr: BytesLike, ib: BytesLike) -> int:
    """ICRC from a 40-byte IPv6 header, the UDP header and the transport part
    BTH .. pad (rxe_icrc.c ``rxe_icrc_generate`` for an IPv6 skb)."""
    if not len(ip_hdr) or ip_hdr[0] >> 4 != 6:
        raise MalformedPacket("not an IPv6 header")
    return _icrc_split(ip_hdr, IPV6_HDR_SIZE, udp_hdr, ib)
