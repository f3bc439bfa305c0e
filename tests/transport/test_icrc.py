"""ICRC: against scapy's independent implementation, known vectors, corruption."""

from __future__ import annotations

import struct
import zlib
from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.contrib.roce import BTH as ScapyBTH
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from softrdma.transport.headers import MalformedPacket
from softrdma.transport.icrc import (
    IcrcError,
    icrc_check,
    icrc_compute,
    icrc_hdr,
    icrc_headers,
    icrc_ipv4,
    icrc_ipv6,
    icrc_pack,
)
from softrdma.transport.packet import Packet
from softrdma.transport.roce import RoceFrame, _ipv4_csum, decode_roce_v2

from .strategies import packets, u

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _scapy_frame(pkt: Packet, l3: IP | IPv6, sport: int) -> bytes:
    """Build the same frame with scapy; its BTH layer computes the ICRC."""
    hdr, payload, pad = pkt.encode_parts()
    b = pkt.bth
    return bytes(
        Ether(dst=_mac(MAC_B), src=_mac(MAC_A))
        / l3
        / UDP(sport=sport, dport=4791, chksum=0)
        / ScapyBTH(
            opcode=b.opcode,
            solicited=int(b.se),
            migreq=int(b.mig),
            padcount=b.pad,
            version=0,
            pkey=b.pkey,
            fecn=int(b.fecn),
            becn=int(b.becn),
            dqpn=b.dest_qp,
            ackreq=int(b.ack_req),
            psn=b.psn,
        )
        / Raw(hdr[12:] + bytes(payload) + pad)
    )


ipv4s = st.tuples(u(32), u(32)).map(lambda t: (t[0].to_bytes(4, "big"), t[1].to_bytes(4, "big")))
ipv6s = st.tuples(u(128), u(128)).map(
    lambda t: (t[0].to_bytes(16, "big"), t[1].to_bytes(16, "big"))
)


@given(packets(max_payload=200), ipv4s, u(16), u(8), u(8), u(16), st.booleans())
def test_ipv4_frame_matches_scapy(
    pkt: Packet, addrs: tuple[bytes, bytes], ip_id: int, tos: int, ttl: int, sport: int, df: bool
) -> None:
    saddr, daddr = addrs
    frame = RoceFrame(
        pkt, saddr, daddr, sport, eth_dst=MAC_B, eth_src=MAC_A, tos=tos, ttl=ttl, ip_id=ip_id, df=df
    )
    ref = _scapy_frame(
        pkt,
        IP(
            src=".".join(map(str, saddr)),
            dst=".".join(map(str, daddr)),
            id=ip_id,
            tos=tos,
            ttl=ttl,
            flags="DF" if df else 0,
        ),
        sport,
    )
    assert frame.encode() == ref  # whole frame: IP checksum, lengths and ICRC
    assert icrc_check(ref[14:]) == frame.icrc
    assert decode_roce_v2(ref).packet == pkt


@given(packets(max_payload=200), ipv6s, u(8), u(20), u(8), u(16))
def test_ipv6_frame_matches_scapy(
    pkt: Packet, addrs: tuple[bytes, bytes], tc: int, fl: int, hlim: int, sport: int
) -> None:
    saddr, daddr = addrs
    frame = RoceFrame(
        pkt, saddr, daddr, sport, eth_dst=MAC_B, eth_src=MAC_A, tos=tc, ttl=hlim, flow_label=fl
    )
    ref = _scapy_frame(
        pkt,
        IPv6(src=str(IPv6Address(saddr)), dst=str(IPv6Address(daddr)), tc=tc, fl=fl, hlim=hlim),
        sport,
    )
    assert frame.encode() == ref
    assert icrc_check(ref[14:]) == frame.icrc
    back = decode_roce_v2(ref)
    assert back.packet == pkt and back.flow_label == fl and back.tos == tc


def test_seed_is_rxe_precomputed_lrh_crc() -> None:
    # rxe_icrc.c starts crc32_le from 0xdebb20e3 (no pre/post inversion); zlib's
    # running value is the inverted form.
    state = zlib.crc32(b"\xff" * 8) ^ 0xFFFFFFFF
    assert state == 0xDEBB20E3


# Vectors from scapy's test/contrib/roce.uts (via research/detail/protocols-sources.md).
UC_PAYLOAD = b"F0\x81\x8b\xe2\x895\xd9\x0e\x9a\x95PT\x01\xbe\x88^P\x00\x00"  # 18 + 2 pad
UC_BTH = bytes.fromhex("2460ffff000000d3") + (13571856).to_bytes(4, "big")


def test_vector_ipv4_uc_send_only() -> None:
    ip = bytes(
        IP(
            tos=1,
            id=1144,
            flags="DF",
            ttl=64,
            src="192.168.0.7",
            dst="192.168.0.7",
            len=64,
            proto=17,
            chksum=0xB4D5,
        )
    )
    udp = struct.pack(">HHHH", 49152, 4791, 44, 0xACA2)
    crc = icrc_ipv4(ip, udp, UC_BTH + UC_PAYLOAD)
    assert icrc_pack(crc) == bytes.fromhex("78f353f3")
    assert icrc_compute(ip + udp + UC_BTH + UC_PAYLOAD) == crc
    assert Packet.decode(UC_BTH + UC_PAYLOAD).payload_len == 18


def test_vector_ipv6_uc_send_only() -> None:
    ip = bytes(
        IPv6(src="2022::1023", dst="2023::1024", hlim=255, plen=44, fl=0x1FACE, tc=226, nh=17)
    )
    udp = struct.pack(">HHHH", 49152, 4791, 44, 0xE7C5)
    crc = icrc_ipv6(ip, udp, UC_BTH + UC_PAYLOAD)
    assert icrc_pack(crc) == bytes.fromhex("3e5b743b")


def test_vector_connectx_cnp() -> None:
    frame = bytes.fromhex(
        "e41d2dab2bc27cfe90643b32080045c2003c718c400040119161 0a001101 0a001201".replace(" ", "")
        + "000012b700280000"
        + "8100ffff4000011800000000"
        + "00" * 16
        + "82fd002a"
    )
    rf = decode_roce_v2(frame)
    assert rf.packet.opcode == 0x81 and rf.packet.bth.becn and rf.packet.dest_qp == 0x118
    assert rf.tos == 0xC2 and rf.sport == 0
    assert rf.encode() == frame


@given(packets(max_payload=64), ipv4s, u(16))
def test_split_and_contiguous_agree(pkt: Packet, addrs: tuple[bytes, bytes], ip_id: int) -> None:
    frame = RoceFrame(pkt, *addrs, sport=0xC000, ip_id=ip_id).encode()
    l3 = frame[14:]
    ib = l3[28:-4]
    crc = icrc_ipv4(l3[:20], l3[20:28], ib)
    assert crc == icrc_compute(l3[:-4]) == icrc_check(l3)
    assert icrc_pack(crc) == l3[-4:]
    assert zlib.crc32(ib[12:], icrc_hdr(l3)) == crc


@given(packets(max_payload=64), st.booleans(), st.data())
def test_icrc_headers_takes_the_extension_headers_too(
    pkt: Packet, v6: bool, data: st.DataObject
) -> None:
    l3 = _frame(pkt, v6)[14:]
    n = 60 if v6 else 40
    k = data.draw(st.integers(0, len(l3) - n))
    assert icrc_headers(l3[: n + k], v6) == zlib.crc32(l3[n : n + k], icrc_hdr(l3))
    assert icrc_headers(memoryview(l3)[: n + k], v6) == icrc_headers(l3[: n + k], v6)


# --- corruption -----------------------------------------------------------------------------

V4_UNMASKED = [0, 2, 3, 4, 5, 6, 7, 9, *range(12, 20), *range(20, 26)]  # + UDP ports/length
V4_MASKED = [1, 8, 10, 11, 26, 27]  # TOS, TTL, IP checksum, UDP checksum
V6_UNMASKED = [4, 5, 6, *range(8, 40), *range(40, 46)]
V6_MASKED = [0, 1, 2, 3, 7, 46, 47]  # traffic class / flow label, hop limit, UDP checksum


def _frame(pkt: Packet, v6: bool) -> bytes:
    if v6:
        return RoceFrame(pkt, bytes(range(16)), bytes(range(16, 32)), 0xC123, flow_label=5).encode()
    return RoceFrame(pkt, b"\x0a\x4d\x00\x02", b"\x0a\x4d\x00\x01", 0xC121, ip_id=1234).encode()


@given(packets(max_payload=100), st.booleans(), st.data())
def test_any_transport_corruption_fails_icrc(pkt: Packet, v6: bool, data: st.DataObject) -> None:
    l3 = bytearray(_frame(pkt, v6)[14:])
    ib = 48 if v6 else 28
    i = data.draw(st.integers(ib, len(l3) - 1))  # BTH .. pad, and the ICRC itself
    bit = data.draw(st.integers(0, 7))
    l3[i] ^= 1 << bit
    if i == ib + 4:  # BTH byte 4 (FECN/BECN/reserved) is masked by design
        assert icrc_check(l3)
        return
    with pytest.raises(IcrcError):
        icrc_check(l3)


@given(packets(max_payload=40), st.booleans(), st.data())
def test_unmasked_ip_udp_corruption_fails_icrc(pkt: Packet, v6: bool, data: st.DataObject) -> None:
    l3 = bytearray(_frame(pkt, v6)[14:])
    i = data.draw(st.sampled_from(V6_UNMASKED if v6 else V4_UNMASKED))
    l3[i] ^= 1 << data.draw(st.integers(0, 7))
    # byte 0 carries version/IHL: changing it also makes the header unparsable
    with pytest.raises(MalformedPacket if i == 0 else IcrcError):
        icrc_check(l3)


@given(packets(max_payload=40), st.booleans(), st.data())
def test_masked_fields_do_not_change_icrc(pkt: Packet, v6: bool, data: st.DataObject) -> None:
    l3 = bytearray(_frame(pkt, v6)[14:])
    i = data.draw(st.sampled_from(V6_MASKED if v6 else V4_MASKED))
    l3[i] ^= data.draw(st.integers(1, 255)) & (0x0F if v6 and i == 0 else 0xFF)
    icrc_check(l3)


@given(packets(max_payload=40), st.data())
def test_decode_detects_ip_id_corruption_even_with_fixed_checksum(
    pkt: Packet, data: st.DataObject
) -> None:
    frame = bytearray(_frame(pkt, v6=False))
    frame[18] ^= data.draw(st.integers(1, 255))  # IP ID high byte
    frame[24:26] = b"\0\0"
    frame[24:26] = _ipv4_csum(frame[14:34]).to_bytes(2, "big")  # a NAT-like rewrite
    with pytest.raises(IcrcError) as ei:
        decode_roce_v2(frame)
    assert ei.value.found != ei.value.expected
    assert decode_roce_v2(frame, verify_icrc=False).packet == pkt


def test_icrc_input_validation() -> None:
    with pytest.raises(MalformedPacket):
        icrc_hdr(b"")
    with pytest.raises(MalformedPacket, match="version"):
        icrc_hdr(b"\x50" + bytes(59))
    with pytest.raises(MalformedPacket, match="options"):
        icrc_hdr(b"\x46" + bytes(59))
    with pytest.raises(MalformedPacket, match="40 bytes"):
        icrc_hdr(b"\x45" + bytes(30))
    with pytest.raises(MalformedPacket):
        icrc_check(b"\x45")
    with pytest.raises(MalformedPacket):
        icrc_ipv4(b"\x60" + bytes(19), bytes(8), bytes(12))
    with pytest.raises(MalformedPacket):
        icrc_ipv6(b"\x45" + bytes(39), bytes(8), bytes(12))
    with pytest.raises(MalformedPacket):
        icrc_ipv4(b"\x45" + bytes(19), bytes(7), bytes(12))
    with pytest.raises(MalformedPacket):
        icrc_ipv4(b"\x45" + bytes(19), bytes(8), bytes(11))
