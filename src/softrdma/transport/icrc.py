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

Solving for the IPv4 ID and DF (:func:`icrc_ipv4_solve`). A UDP socket
shows neither, and rxe gives every packet a new ID (``__ip_select_ident``),
so a receiver behind one cannot rebuild the pseudo-header. But the ICRC is
CRC-32, affine over GF(2): for a datagram of a given length each of the 16
ID bits and the DF bit flips a fixed 32-bit vector of the result. The 17
vectors are independent: a bit ``k`` bits from the end contributes
``x**(k+32) mod P``, and a non-zero sum of ``x**k`` over fewer than 32
consecutive ``k`` is a power of ``x`` times a non-zero polynomial of degree
< 32, which ``P`` (constant term 1) does not divide. So at most one (ID, DF)
pair fits a packet. Per length (cached: lengths repeat) the vectors are
completed to a basis of GF(2)**32 by Gaussian elimination and the basis
inverted, the inverse stored as four byte tables; a solve is then four
look-ups and XORs on top of the ordinary ICRC pass. The price: a corrupted
packet's ICRC is accepted when it lands in the 2**17-element set the
unknown bits reach, probability about 2**-15 (2**-16 with DF known) instead
of 2**-32.
"""

from __future__ import annotations

import functools
import struct
import zlib

from softrdma.transport.errors import HeaderFieldError
from softrdma.transport.headers import BTH_SIZE, BytesLike, MalformedPacket

__all__ = [
    "ICRC_LRH_STATE",
    "ICRC_SIZE",
    "ICRC_SOLVE_DF",
    "ICRC_SOLVE_ID",
    "IcrcError",
    "icrc_check",
    "icrc_compute",
    "icrc_hdr",
    "icrc_headers",
    "icrc_ipv4",
    "icrc_ipv4_solve",
    "icrc_ipv6",
    "icrc_pack",
]

ICRC_SIZE = 4
"""rxe_hdr.h RXE_ICRC_SIZE."""

IPV4_HDR_SIZE = 20
IPV6_HDR_SIZE = 40
UDP_HDR_SIZE = 8

_ICRC = struct.Struct("<I")

ICRC_LRH_STATE = zlib.crc32(b"\xff" * 8)
"""The :func:`zlib.crc32` running value after the 8 0xFF bytes that stand in
for the LRH: continue a hand-built ICRC from it. zlib's running value is the
finalised CRC, so this equals ~0xDEBB20E3 (rxe_icrc.c's seed)."""
_LRH_CRC = ICRC_LRH_STATE

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
    ``rxe_icrc_check`` → "bad ICRC", packet dropped). Reason ``bad_icrc``.

    ``expected`` is the CRC computed over the packet as received (with the
    IPv4 ID and DF the check assumed, when they had to be solved for; ``note``
    says so), ``found`` the one it carries."""

    def __init__(self, expected: int, found: int, note: str = "") -> None:
        super().__init__(
            f"bad ICRC: computed {expected:#010x}, packet carries {found:#010x}{note}",
            reason="bad_icrc",
        )
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
            raise MalformedPacket(
                "IPv4 header with options: RoCEv2 ICRC covers a 20-byte header",
                reason="bad_header",
            )
        n, m = _V4_LEN, _V4_MASK
    elif v == 6:
        n, m = _V6_LEN, _V6_MASK
    else:
        raise MalformedPacket(f"IP version {v} is neither 4 nor 6", reason="bad_version")
    if len(ip_udp_bth) < n:
        raise MalformedPacket(
            f"ICRC pseudo-header needs {n} bytes, got {len(ip_udp_bth)}", reason="truncated"
        )
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
        raise MalformedPacket("packet too short for an ICRC", reason="truncated")
    expected = icrc_compute(mv[:-ICRC_SIZE])
    (found,) = _ICRC.unpack_from(mv, len(mv) - ICRC_SIZE)
    if found != expected:
        raise IcrcError(expected, found)
    return expected


def _icrc_split(ip_hdr: BytesLike, hlen: int, udp_hdr: BytesLike, ib: BytesLike) -> int:
    if len(ip_hdr) != hlen or len(udp_hdr) != UDP_HDR_SIZE:
        raise MalformedPacket(
            f"need a {hlen}-byte IP and an 8-byte UDP header, got {len(ip_hdr)} and {len(udp_hdr)}",
            reason="bad_length",
        )
    mv = memoryview(ib)
    if len(mv) < BTH_SIZE:
        raise MalformedPacket("transport part shorter than a BTH", reason="truncated")
    crc = icrc_hdr(b"".join((ip_hdr, udp_hdr, mv[:BTH_SIZE])))  # 40 or 60 bytes
    return zlib.crc32(mv[BTH_SIZE:], crc)


def icrc_ipv4(ip_hdr: BytesLike, udp_hdr: BytesLike, ib: BytesLike) -> int:
    """ICRC from a 20-byte IPv4 header, the UDP header and the transport part
    BTH .. pad (rxe_icrc.c ``rxe_icrc_generate`` for an IPv4 skb)."""
    if not len(ip_hdr) or ip_hdr[0] >> 4 != 4:
        raise MalformedPacket("not an IPv4 header", reason="bad_version")
    return _icrc_split(ip_hdr, IPV4_HDR_SIZE, udp_hdr, ib)


def icrc_ipv6(ip_hdr: BytesLike, udp_hdr: BytesLike, ib: BytesLike) -> int:
    """ICRC from a 40-byte IPv6 header, the UDP header and the transport part
    BTH .. pad (rxe_icrc.c ``rxe_icrc_generate`` for an IPv6 skb)."""
    if not len(ip_hdr) or ip_hdr[0] >> 4 != 6:
        raise MalformedPacket("not an IPv6 header", reason="bad_version")
    return _icrc_split(ip_hdr, IPV6_HDR_SIZE, udp_hdr, ib)


# --- solving for the IPv4 ID and DF ----------------------------------------------------

ICRC_SOLVE_ID = 0xFFFF
"""Bits of an :func:`icrc_ipv4_solve` result that are the IPv4 ID change."""
ICRC_SOLVE_DF = 0x10000
"""Bit of an :func:`icrc_ipv4_solve` result that is the DF flag change."""

_IP_DF_BYTE = 0x40  # DF in byte 6 of the IPv4 header


def _id_df_vectors(n: int) -> list[int]:
    """The linear effect on the ICRC of each IPv4 ID bit (element ``i`` for the
    ID bit of value ``1 << i``) and of DF (element 16), for a UDP payload of
    ``n`` bytes. After the pseudo LRH the ICRC runs over the 40-byte
    pseudo-header and the ``n - 16`` bytes from the BTH's end to the ICRC;
    ID and DF sit in bytes 4..6. A bit's effect is the CRC difference it
    makes to an all-zero message of that length (the affine part cancels)."""
    zeros = bytes(24 + n)
    z = zlib.crc32(zeros)
    out = []
    for i in range(17):
        byte, mask = (5 - (i >> 3), 1 << (i & 7)) if i < 16 else (6, _IP_DF_BYTE)
        msg = bytearray(zeros)
        msg[byte] = mask
        out.append(zlib.crc32(msg) ^ z)
    return out


@functools.lru_cache(maxsize=256)
def _id_df_solver(n: int) -> list[int]:
    """Four 256-entry tables (one list) taking the bytes of a 32-bit ICRC
    difference to its coordinates in the basis of :func:`_id_df_vectors`
    (bits 0..16) completed by 15 unit vectors (bits 17..31): XOR the four
    entries. Built per UDP payload length ``n`` (about 0.2 ms) and cached
    (a list, about 40 kB: its ints exist already, so look-ups beat an
    array's, which box a new int each time).

    Gauss-Jordan over GF(2) on 32-bit ints; each row is a vector and the mask
    of basis vectors summing to it. Rows keep distinct leading bits; the 17
    vectors go in first, then the unit vectors of the 15 positions no row
    leads with (distinct leading bits: independent), then back-substitution
    turns row ``p`` into ``1 << p``, whose mask is then its coordinates."""
    if not BTH_SIZE + ICRC_SIZE <= n <= 0xFFFF - IPV4_HDR_SIZE - UDP_HDR_SIZE:
        raise HeaderFieldError(f"no IPv4 RoCEv2 packet has a {n}-byte UDP payload")
    rows: dict[int, tuple[int, int]] = {}  # leading bit -> (vector, combination)

    def insert(vec: int, combo: int) -> None:
        for p in sorted(rows, reverse=True):
            if vec >> p & 1:
                vec ^= rows[p][0]
                combo ^= rows[p][1]
        if not vec:  # cannot happen: see the module docstring
            raise AssertionError(f"ICRC ID/DF vectors dependent for length {n}")
        rows[vec.bit_length() - 1] = (vec, combo)

    for i, v in enumerate(_id_df_vectors(n)):
        insert(v, 1 << i)
    j = 17
    for p in range(32):
        if p not in rows:
            insert(1 << p, 1 << j)
            j += 1
    for p in range(32):  # ascending: the rows below p are unit vectors already
        vec, combo = rows[p]
        for q in range(p):
            if vec >> q & 1:
                vec ^= rows[q][0]
                combo ^= rows[q][1]
        rows[p] = (vec, combo)
    tables: list[int] = []
    for k in range(4):
        t = [0]
        for p in range(8 * k, 8 * k + 8):
            c = rows[p][1]
            t += [x ^ c for x in t]
        tables.extend(t)
    return tables


def icrc_ipv4_solve(udp_payload_len: int, diff: int) -> int:
    """The IPv4 ID and DF change that explains an ICRC difference: ``diff`` is
    the ICRC computed with some ID and DF XOR the one the packet carries,
    ``udp_payload_len`` the UDP payload's length (BTH to ICRC inclusive).
    Returns ``id_xor | df_xor << 16`` (:data:`ICRC_SOLVE_ID`,
    :data:`ICRC_SOLVE_DF`): XOR those into the assumed ID and DF and the ICRC
    is valid. A result with any bit above 16 set means no ID and DF do it.
    The first call for a length builds its tables (cached); then four table
    look-ups."""
    t = _id_df_solver(udp_payload_len)
    return (
        t[diff & 0xFF]
        ^ t[256 | diff >> 8 & 0xFF]
        ^ t[512 | diff >> 16 & 0xFF]
        ^ t[768 | diff >> 24]
    )
