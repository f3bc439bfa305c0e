"""Properties of the RoCEv2 codecs that can fail: round trips at the frame
and UDP-payload levels (the packet level: test_packet.py), and the ICRC's
coverage — every single-bit error inside it is rejected by the exact check,
every change outside it is not an ICRC matter."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.transport.errors import RejectedPacket
from softrdma.transport.headers import BytesLike
from softrdma.transport.icrc import IcrcError
from softrdma.transport.packet import Packet
from softrdma.transport.roce import RoceFrame, decode_roce_v2, encode_roce_v2
from softrdma.transport.roce_udp import decode_roce_udp, encode_roce_udp

from .codec_strategies import (
    FrameLayout,
    UdpEndpoints,
    refresh_checksums,
    roce_frames,
    udp_endpoints,
)
from .strategies import packets

#: The buffer types the decoders take.
BUFFERS: st.SearchStrategy[Callable[[bytes], BytesLike]] = st.sampled_from(
    [bytes, bytearray, memoryview]
)

# --- round trips ----------------------------------------------------------------------------


@given(roce_frames(max_payload=300), BUFFERS)
def test_frame_decode_encode_roundtrip(
    frame: RoceFrame, kind: Callable[[bytes], BytesLike]
) -> None:
    raw = encode_roce_v2(frame)
    back = decode_roce_v2(kind(raw))
    assert back == frame
    end = FrameLayout.of(frame, raw).end
    assert back.icrc == frame.icrc == int.from_bytes(raw[end - 4 : end], "little")
    assert bytes(back.packet.payload) == bytes(frame.packet.payload)
    assert encode_roce_v2(back) == raw


@given(packets(max_payload=300), udp_endpoints(), BUFFERS)
def test_udp_payload_decode_encode_roundtrip(
    pkt: Packet, ep: UdpEndpoints, kind: Callable[[bytes], BytesLike]
) -> None:
    payload = encode_roce_udp(
        pkt,
        ep.saddr,
        ep.daddr,
        ep.sport,
        ep.dport,
        ip_id=ep.ip_id,
        df=ep.df,
        tos=ep.tos,
        ttl=ep.ttl,
    )
    expected = ep.frame(pkt)
    # ID and DF known (a raw socket, a capture), and solved for (a UDP socket).
    for ip_id, df in ((ep.ip_id, ep.df), (None, ep.df), (None, None)):
        back = decode_roce_udp(
            kind(payload),
            ep.saddr,
            ep.daddr,
            ep.sport,
            ep.dport,
            ip_id=ip_id,
            df=df,
            tos=ep.tos,
            ttl=ep.ttl,
        )
        assert back == expected, (ip_id, df)
        assert back.icrc == int.from_bytes(payload[-4:], "little")
        assert (
            encode_roce_udp(
                back.packet,
                back.saddr,
                back.daddr,
                back.sport,
                back.dport,
                ip_id=back.ip_id,
                df=back.df,
            )
            == payload
        )


@given(packets(max_payload=300), udp_endpoints(), st.binary(min_size=6, max_size=6))
def test_udp_payload_level_and_frame_level_agree(pkt: Packet, ep: UdpEndpoints, mac: bytes) -> None:
    """The frame decoded from a UDP payload, given Ethernet addresses, encodes
    to the Ethernet frame the payload came from; the frame decoded from that
    is the same frame."""
    ep = dataclasses.replace(ep, dport=4791)  # decode_roce_v2 takes port 4791 only
    payload = encode_roce_udp(
        pkt,
        ep.saddr,
        ep.daddr,
        ep.sport,
        ep.dport,
        ip_id=ep.ip_id,
        df=ep.df,
        tos=ep.tos,
        ttl=ep.ttl,
    )
    back = decode_roce_udp(payload, ep.saddr, ep.daddr, ep.sport, tos=ep.tos, ttl=ep.ttl)
    back.eth_dst = back.eth_src = mac
    raw = encode_roce_v2(back)
    assert raw[-len(payload) :] == payload
    assert decode_roce_v2(raw) == back


# --- the ICRC's coverage --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(roce_frames(max_payload=40))
def test_every_single_bit_error_in_the_icrc_coverage_is_rejected(frame: RoceFrame) -> None:
    """Every bit of the IP header (but TOS/TTL/checksum, or IPv6 traffic
    class/flow label/hop limit), the UDP header (but the checksum), the BTH
    (but byte 4), the rest of the transport headers, payload, pad and the
    ICRC itself, flipped alone:

    * as is, the frame is rejected;
    * with the IPv4 and UDP checksums recomputed (a NAT, a NIC offload — so
      that only the ICRC can notice), it is still rejected; a flip behind
      the UDP header is an :class:`IcrcError` (the ICRC is checked before
      the transport headers are parsed), and so is any flip that leaves the
      frame decodable when the ICRC is not checked."""
    raw = encode_roce_v2(frame)
    layout = FrameLayout.of(frame, raw)
    for i, mask in layout.icrc_covered_bits():
        bad = bytearray(raw)
        bad[i] ^= mask
        with pytest.raises(RejectedPacket):
            decode_roce_v2(bytes(bad))
        refresh_checksums(bad, frame, layout)
        if i >= layout.bth:
            with pytest.raises(IcrcError):
                decode_roce_v2(bytes(bad))
            continue
        try:
            decode_roce_v2(bytes(bad), verify_icrc=False)
        except RejectedPacket:
            with pytest.raises(RejectedPacket):
                decode_roce_v2(bytes(bad))
        else:
            with pytest.raises(IcrcError):
                decode_roce_v2(bytes(bad))


@settings(max_examples=60, deadline=None)
@given(roce_frames(max_payload=40))
def test_bits_outside_the_icrc_coverage_are_not_an_icrc_matter(frame: RoceFrame) -> None:
    """The masked fields, changed (checksums recomputed): the frame decodes,
    with the new value of the field, and re-encodes to the changed bytes —
    but for BTH Resv6a, which the receiver ignores and the sender zeroes."""
    raw = encode_roce_v2(frame)
    layout = FrameLayout.of(frame, raw)
    checksums = {layout.l4 + 6, layout.l4 + 7}
    if not layout.ipv6:
        checksums |= {layout.l3 + 10, layout.l3 + 11}
    for i, bits in layout.icrc_masked().items():
        if i in checksums:
            continue
        for b in range(8):
            if not bits >> b & 1:
                continue
            bad = bytearray(raw)
            bad[i] ^= 1 << b
            refresh_checksums(bad, frame, layout)
            back = decode_roce_v2(bytes(bad))
            assert back.packet.bth._replace(fecn=False, becn=False) == frame.packet.bth._replace(
                fecn=False, becn=False
            )
            out = bytearray(encode_roce_v2(back))
            if i == layout.bth + 4 and 1 << b & 0x3F:  # Resv6a: ignored, sent as 0
                assert out == raw
            else:
                assert out == bad


@settings(max_examples=60, deadline=None)
@given(packets(max_payload=40), udp_endpoints())
def test_every_single_bit_error_in_a_udp_payload_fails_the_exact_check(
    pkt: Packet, ep: UdpEndpoints
) -> None:
    """At the UDP-payload level with the IPv4 ID and DF known (or IPv6), every
    bit but BTH byte 4's is covered: each flip is an :class:`IcrcError`."""
    payload = encode_roce_udp(pkt, ep.saddr, ep.daddr, ep.sport, ep.dport, ip_id=ep.ip_id, df=ep.df)
    for i in range(len(payload)):
        for b in range(8):
            bad = bytearray(payload)
            bad[i] ^= 1 << b
            args = (bytes(bad), ep.saddr, ep.daddr, ep.sport, ep.dport)
            if i == 4:
                assert decode_roce_udp(*args, ip_id=ep.ip_id, df=ep.df).packet.psn == pkt.psn
                continue
            with pytest.raises(IcrcError):
                decode_roce_udp(*args, ip_id=ep.ip_id, df=ep.df)
