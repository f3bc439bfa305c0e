"""RoCEv2 at the UDP-payload level: BTH, extension headers, payload, pad and
ICRC, for a device that talks RoCEv2 through an ordinary UDP socket, which
never shows nor lets it set the IP header.

Kernel counterparts: ``drivers/infiniband/sw/rxe/rxe_net.c`` (rxe's own UDP
tunnel socket on port 4791, ``rxe_udp_encap_recv``; the IP header it builds
in ``prepare4`` / ``prepare6``), ``rxe_icrc.c`` (``rxe_icrc_generate``,
``rxe_icrc_check``) and ``include/net/ip.h`` (``ip_select_ident_segs``).

The ICRC covers the IPv4 ID and the DF flag, which a UDP socket hides:

* sending, Linux gives the DF datagrams of an *unconnected* UDP socket the
  ID 0 (``ip_select_ident_segs``; a connected socket counts from a random
  start instead) and sets DF under path-MTU discovery (``IP_MTU_DISCOVER``
  = ``IP_PMTUDISC_DO`` makes sure): so :func:`encode_roce_udp` defaults to
  ``ip_id=0, df=True``, for ``sendto`` on an unconnected socket;
* receiving, rxe gives each packet a new ID (``__ip_select_ident``), which
  the socket does not show: :func:`decode_roce_udp` solves for it
  (:func:`~softrdma.transport.icrc.icrc_ipv4_solve`), at the price of a
  weaker check — about 2**-15 of corruptions pass instead of 2**-32.

The result is a :class:`~softrdma.transport.roce.RoceFrame`, and the codecs
agree with the Ethernet-frame ones byte for byte: :func:`encode_roce_udp`
is the UDP payload of :func:`~softrdma.transport.roce.encode_roce_v2` of the
same fields.
"""

from __future__ import annotations

import functools
import struct
import zlib

from softrdma.transport.errors import HeaderFieldError, MalformedPacket
from softrdma.transport.headers import BTH_SIZE, BytesLike
from softrdma.transport.icrc import (
    ICRC_LRH_STATE,
    ICRC_SIZE,
    ICRC_SOLVE_DF,
    ICRC_SOLVE_ID,
    IcrcError,
    icrc_headers,
    icrc_ipv4_solve,
)
from softrdma.transport.packet import Packet
from softrdma.transport.roce import (
    IP_DF,
    IPPROTO_UDP,
    ROCE_V2_UDP_DPORT,
    Address,
    RoceFrame,
    packed_addrs,
)

__all__ = ["decode_roce_udp", "encode_roce_udp"]

_I = struct.Struct("<I")
# The pad bytes (0-3) and the ICRC behind the payload, in one pack.
_TAILS = tuple(struct.Struct(f"<{pad}xI") for pad in range(4))
_IPV4_MAX_UDP_PAYLOAD = 0xFFFF - 28
_IPV6_MAX_UDP_PAYLOAD = 0xFFFF - 8

# IP + UDP as the ICRC sees them, the fields it masks already all ones, and
# the first four BTH bytes plus the masked fifth: one pack and one crc32 cover
# all of the ICRC's pseudo-header that differs from the received bytes.
_V4_PSEUDO = struct.Struct(">BBHHHBBH4s4sHHHH4sB")
_V6_PSEUDO = struct.Struct(">IHBB16s16sHHHH4sB")
_V6_VTF_MASKED = 0x6FFFFFFF  # version 6, traffic class and flow label all ones
_UNKNOWN_NAMES = {
    ICRC_SOLVE_ID: "ID",
    ICRC_SOLVE_DF: "DF",
    ICRC_SOLVE_ID | ICRC_SOLVE_DF: "ID and DF",
}


@functools.cache
def _udp_layout(ipv6: bool, transport: struct.Struct) -> struct.Struct:
    """IPv4 or IPv6, UDP and one opcode's transport headers as one Struct (the
    ICRC pseudo-header and what follows it, packed in one call)."""
    ip = ">IHBB16s16s" if ipv6 else ">BBHHHBBH4s4s"
    return struct.Struct(ip + "HHHH" + transport.format[1:])


def _encode_error(packet: Packet, problem: str) -> HeaderFieldError:
    """The packet's own error first, as :func:`encode_roce_v2` reports it."""
    packet.encode_parts()
    return HeaderFieldError(problem)


def encode_roce_udp(
    packet: Packet,
    saddr: Address,
    daddr: Address,
    sport: int,
    dport: int = ROCE_V2_UDP_DPORT,
    *,
    ip_id: int = 0,
    df: bool = True,
    tos: int = 0,
    ttl: int = 64,
) -> bytes:
    """The UDP payload of a RoCEv2 packet — BTH, extension headers, payload,
    pad and ICRC — for a UDP socket to send from ``saddr:sport`` to
    ``daddr:dport`` (rxe_net.c ``prepare4`` / ``prepare6`` and rxe_icrc.c
    ``rxe_icrc_generate``, without the headers the kernel adds).

    The ICRC covers the IP and UDP headers the kernel will build: lengths
    from the packet, ``ip_id`` and ``df`` as given (the defaults are what
    Linux gives an unconnected socket's DF datagrams; module docstring). TOS,
    TTL and the checksums are masked out of the ICRC; ``tos`` / ``ttl`` are
    only range-checked. Byte for byte the UDP payload of
    :func:`encode_roce_v2` of the same fields. Addresses are packed bytes
    (4 for IPv4, 16 for IPv6, IPv4-mapped GIDs meaning IPv4) or anything
    :func:`packed_addrs` takes; for IPv6, ``ip_id`` and ``df`` are ignored.
    Bad field values raise :class:`HeaderFieldError`.
    """
    transport, vals, payload, pad = packet.wire_values()
    s, d = packed_addrs(saddr, daddr)
    ipv6 = len(s) == 16
    n = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    plen = transport.size + n + pad + ICRC_SIZE
    if plen > (_IPV6_MAX_UDP_PAYLOAD if ipv6 else _IPV4_MAX_UDP_PAYLOAD):
        raise _encode_error(packet, f"UDP payload of {plen} bytes is too long for IP")
    try:  # struct.error / TypeError: a field out of range or of the wrong type
        if ipv6:
            if tos >> 8 or ttl >> 8:
                raise _encode_error(packet, "IPv6 traffic class and hop limit are 8 bits")
            ip: tuple[object, ...] = (6 << 28 | tos << 20, plen + 8, IPPROTO_UDP, ttl, s, d)
        else:
            frag = IP_DF if df else 0
            ip = (0x45, tos, plen + 28, ip_id, frag, ttl, IPPROTO_UDP, 0, s, d)
        headers = _udp_layout(ipv6, transport).pack(*ip, sport, dport, plen + 8, 0, *vals)
    except (struct.error, TypeError) as e:
        raise _encode_error(packet, f"cannot encode RoCEv2 UDP payload: {e}") from None
    # icrc_headers masks TOS/TTL (traffic class, flow label, hop limit), the
    # checksums and BTH byte 4, and takes the extension headers in the same call.
    crc = icrc_headers(headers, ipv6)
    crc = zlib.crc32(payload, crc)
    if pad:
        crc = zlib.crc32(bytes(pad), crc)
    ip_udp = 48 if ipv6 else 28
    return b"".join((headers[ip_udp:], payload, _TAILS[pad].pack(crc)))


def decode_roce_udp(
    payload: BytesLike,
    saddr: Address,
    daddr: Address,
    sport: int,
    dport: int = ROCE_V2_UDP_DPORT,
    *,
    ip_id: int | None = None,
    df: bool | None = None,
    verify_icrc: bool = True,
    tos: int = 0,
    ttl: int = 64,
) -> RoceFrame:
    """Parse the UDP payload of a RoCEv2 packet that a UDP socket bound to
    ``daddr:dport`` received from ``saddr:sport`` (rxe_net.c
    ``rxe_udp_encap_recv`` → rxe_recv.c ``rxe_rcv``): the ICRC, then the
    transport packet (:meth:`Packet.decode`; its payload is a memoryview into
    ``payload``). The socket has done the demultiplexing, so any ``dport``
    is taken (4791 as rxe, or another port between softrdma processes); it
    enters the ICRC like the other fields.

    IPv4 ID and DF: given (a raw socket, a capture), the ICRC is checked
    exactly. ``ip_id=None`` — all a UDP socket allows — solves for the ID,
    and ``df=None`` for DF too (:func:`~softrdma.transport.icrc.icrc_ipv4_solve`:
    four table look-ups on top of the ordinary check, plus a table build
    the first time a length is seen): the packet is accepted when some ID
    (and DF) makes its ICRC valid, and the returned frame carries them, so
    that :func:`encode_roce_v2` of it, Ethernet addresses filled in,
    rebuilds the original frame byte for byte. At most one (ID, DF) pair
    fits any packet (the 17 bit vectors are independent), so there is no
    choice between DF values to make. **A corruption slips through with
    probability about 2**-16 with the ID unknown, 2**-15 with ID and DF
    unknown, instead of 2**-32.** Worse, with DF unknown one single-bit
    error is missed in every packet longer than 177 bytes (UDP payload byte
    173, bit 0x08: it reads as ID XOR 0x37B6 with DF flipped; the place is
    fixed relative to the IP header); with DF known none is below byte
    26744. So pass ``df=True`` when the peer sets DF — rxe always does, and
    so does a Linux UDP socket under ``IP_PMTUDISC_DO``. A caller that can
    bound the ID (rxe's counter only moves forward) can check the solved
    value to win back more.

    IPv6 has no ID or DF and the ICRC masks its traffic class and flow
    label, so the check is always exact; ``ip_id`` / ``df`` are ignored and
    the frame gets ``ip_id=0, df=False``, as from :func:`decode_roce_v2`.
    With ``verify_icrc`` false an unknown ID is 0 and an unknown DF set.
    ``tos`` and ``ttl`` are not covered by the ICRC (a socket can learn them
    with ``IP_RECVTOS`` / ``IP_RECVTTL``); they only go into the frame.

    Raises :class:`IcrcError` (reason ``bad_icrc``) when no ID / DF makes
    the ICRC valid, :class:`MalformedPacket` with its ``reason`` for a
    payload shorter than a BTH and an ICRC (``truncated``), too long for IP
    (``bad_length``) or one :meth:`Packet.decode` rejects; never
    :class:`NotRoceV2`. Malformed addresses or ports: :class:`ValueError`.
    """
    mv = payload if type(payload) is memoryview else memoryview(payload)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    n = len(mv)
    s, d = packed_addrs(saddr, daddr)
    ipv6 = len(s) == 16
    if n < BTH_SIZE + ICRC_SIZE:
        raise MalformedPacket(
            f"{n} bytes of UDP payload cannot hold a BTH and an ICRC", reason="truncated"
        )
    if n > (_IPV6_MAX_UDP_PAYLOAD if ipv6 else _IPV4_MAX_UDP_PAYLOAD):
        raise MalformedPacket(f"UDP payload of {n} bytes is too long for IP", reason="bad_length")
    (found,) = _I.unpack_from(mv, n - ICRC_SIZE)
    if ipv6:
        got_id, got_df, unknown = 0, False, 0
    else:
        # Unknown fields start from ID 0 and DF set: what an unconnected Linux
        # UDP socket sends, so such a peer's packets need no solve.
        got_id = 0 if ip_id is None else ip_id
        got_df = True if df is None else df
        unknown = (ICRC_SOLVE_ID if ip_id is None else 0) | (ICRC_SOLVE_DF if df is None else 0)
    if verify_icrc:
        head = payload[:4] if type(payload) is bytes else bytes(mv[:4])  # BTH bytes 0..3
        try:
            if ipv6:
                pseudo = _V6_PSEUDO.pack(
                    _V6_VTF_MASKED, n + 8, IPPROTO_UDP, 0xFF, s, d,
                    sport, dport, n + 8, 0xFFFF, head, 0xFF,
                )  # fmt: skip
            else:
                pseudo = _V4_PSEUDO.pack(
                    0x45, 0xFF, n + 28, got_id, IP_DF if got_df else 0, 0xFF, IPPROTO_UDP, 0xFFFF,
                    s, d, sport, dport, n + 8, 0xFFFF, head, 0xFF,
                )  # fmt: skip
        except (struct.error, TypeError) as e:
            raise HeaderFieldError(f"bad address, port or IPv4 ID: {e}") from None
        crc = zlib.crc32(pseudo, ICRC_LRH_STATE)
        crc = zlib.crc32(mv[5 : n - ICRC_SIZE], crc)
        if crc != found:
            if not unknown:
                raise IcrcError(crc, found)
            r = icrc_ipv4_solve(n, crc ^ found)
            if r & ~unknown:
                what = _UNKNOWN_NAMES[unknown]
                raise IcrcError(crc, found, f" (nor with any IPv4 {what})")
            got_id ^= r & ICRC_SOLVE_ID
            got_df ^= bool(r & ICRC_SOLVE_DF)
    packet = Packet.decode(mv[: n - ICRC_SIZE])
    return RoceFrame(
        packet, s, d, sport, dport, tos=tos, ttl=ttl, ip_id=got_id, df=got_df, icrc=found
    )
