"""Packet encode/decode: round trips over every opcode, layout, malformed input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from softrdma.transport.headers import (
    Aeth,
    Bth,
    Deth,
    HeaderFieldError,
    ImmDt,
    MalformedPacket,
    Reth,
)
from softrdma.transport.opcodes import Opcode, OpcodeInfo, UnknownOpcode, opcode_info
from softrdma.transport.packet import Packet, pad_count

from .codec_strategies import assert_equal_but, transport_ignored_bits
from .strategies import INFOS, SLOT, packets


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.opcode.name)
@given(data=st.data())
def test_roundtrip_every_opcode(info: OpcodeInfo, data: st.DataObject) -> None:
    pkt = data.draw(packets(info))
    raw = pkt.encode()
    n = pkt.payload_len
    assert len(raw) == len(pkt) == info.length + n + pad_count(n)
    assert len(raw) % 4 == 0
    back = Packet.decode(raw)
    assert back == pkt
    assert back.bth.pad == pad_count(n)
    assert back.opcode is info.opcode
    assert back.info is info
    assert bytes(back.payload) == bytes(pkt.payload)
    assert back.encode() == raw


@given(packets())
def test_layout_is_headers_in_order_then_payload_then_zero_pad(pkt: Packet) -> None:
    info = pkt.info
    expected = pkt.bth.pack()
    for cls in info.ext_headers:
        expected += getattr(pkt, SLOT[cls]).pack()
    assert len(expected) == info.length
    expected += bytes(pkt.payload) + bytes(pad_count(pkt.payload_len))
    assert pkt.encode() == expected
    hdr, payload, pad = pkt.encode_parts()
    assert hdr + bytes(payload) + pad == expected


@given(packets())
def test_wire_values_are_what_encode_packs(pkt: Packet) -> None:
    st_, vals, payload, pad = pkt.wire_values()
    assert st_.size == pkt.info.length and vals[:5] == pkt.bth.wire_fields()
    assert st_.pack(*vals) + bytes(payload) + bytes(pad) == pkt.encode()
    assert pad == pad_count(pkt.payload_len) and payload is pkt.payload


@given(packets(), st.integers(0, 9), st.sampled_from(["bytes", "bytearray", "memoryview"]))
def test_decode_accepts_buffers_and_is_zero_copy(pkt: Packet, offset: int, kind: str) -> None:
    raw = pkt.encode()
    buf: Any = bytearray(b"\xee" * offset + raw)
    view = memoryview(buf)[offset:]
    src: Any = {"bytes": bytes(view), "bytearray": bytearray(view), "memoryview": view}[kind]
    back = Packet.decode(src)
    assert back == pkt
    assert isinstance(back.payload, memoryview)
    if kind == "memoryview" and pkt.payload_len:
        # the payload aliases the receive buffer: no copy was made
        start = offset + pkt.info.length
        buf[start] ^= 0xFF
        assert back.payload[0] == buf[start]


def test_decode_non_byte_memoryview() -> None:
    pkt = Packet.build(Opcode.RC_SEND_ONLY, dest_qp=1, psn=2, payload=b"abcd" * 4)
    raw = pkt.encode()
    assert Packet.decode(memoryview(raw).cast("I")) == pkt


def test_build_and_accessors() -> None:
    p = Packet.build(
        Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE,
        dest_qp=0x123456,
        psn=0xABCDEF,
        payload=b"hello",
        reth=Reth(0x1000, 0x42, 5),
        immdt=ImmDt(7),
        ack_req=True,
    )
    assert (p.opcode, p.psn, p.dest_qp, p.payload_len, p.bth.pad) == (
        0x0B,
        0xABCDEF,
        0x123456,
        5,
        3,
    )
    assert "payload=<5 bytes>" in repr(p) and "reth=Reth" in repr(p)
    cnp = Packet.build(Opcode.CNP, dest_qp=0x118, psn=0, becn=True)
    assert cnp.encode() == bytes.fromhex("8100ffff40000118 00000000".replace(" ", "")) + bytes(16)


def test_rxe_ack_bytes() -> None:
    # An rxe ACK from rc_pingpong.pcap: RC ACK, DestQP 17, PSN 0x..., syndrome 0x1f.
    raw = bytes.fromhex("1100ffff00000011 00b1e1a9 1f000001".replace(" ", ""))
    p = Packet.decode(raw)
    assert p.opcode is Opcode.RC_ACKNOWLEDGE
    assert p.aeth == Aeth(0x1F, 1) and p.psn == 0xB1E1A9 and p.dest_qp == 17
    assert p.encode() == raw


# --- encode validation -------------------------------------------------------------------


def _good() -> Packet:
    return Packet.build(
        Opcode.RC_RDMA_WRITE_FIRST, dest_qp=1, psn=2, payload=b"x" * 6, reth=Reth(1, 2, 3)
    )


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda p: setattr(p, "bth", p.bth._replace(pad=0)), "PadCnt"),
        (lambda p: setattr(p, "reth", None), "reth"),
        (lambda p: setattr(p, "aeth", Aeth(0, 0)), "aeth"),
        (lambda p: setattr(p, "deth", Deth(0, 0)), "deth"),
        (lambda p: setattr(p, "bth", p.bth._replace(opcode=0x15)), "unknown opcode"),
        (lambda p: setattr(p, "bth", p.bth._replace(opcode=-1)), "unknown opcode"),
        (lambda p: setattr(p, "bth", p.bth._replace(psn=1 << 24)), "psn"),
        (lambda p: setattr(p, "bth", p.bth._replace(dest_qp=-1)), "dest_qp"),
        (lambda p: setattr(p, "bth", p.bth._replace(pkey=1 << 16)), "pkey"),
        (lambda p: setattr(p, "reth", Reth(1 << 64, 0, 0)), "va"),
        (lambda p: setattr(p, "reth", Reth(0, 0, -1)), "dma_len"),
    ],
)
def test_encode_validation(mutate: Any, match: str) -> None:
    p = _good()
    p.encode()
    mutate(p)
    with pytest.raises(HeaderFieldError, match=match):
        p.encode()


def test_encode_payload_on_no_payload_opcode() -> None:
    p = Packet(Bth(Opcode.RC_ACKNOWLEDGE, 1, 2), b"abcd", aeth=Aeth(0x1F, 0))
    with pytest.raises(HeaderFieldError, match="no payload"):
        p.encode()


def test_encode_ud_with_deth() -> None:
    p = Packet.build(
        Opcode.UD_SEND_ONLY, dest_qp=1, psn=0, payload=bytes(256), deth=Deth(0x80010000, 1)
    )
    assert Packet.decode(p.encode()).deth == Deth(0x80010000, 1)
    p.deth = Deth(0, 1 << 24)
    with pytest.raises(HeaderFieldError, match="src_qp"):
        p.encode()


# --- malformed input -----------------------------------------------------------------------


def _decode_or_malformed(buf: bytes) -> Packet | None:
    try:
        return Packet.decode(buf)
    except MalformedPacket:
        return None


def _assert_reencodes(pkt: Packet, raw: bytes) -> None:
    """A decoded packet re-encodes to ``raw`` except for bits receivers ignore
    and senders zero: BTH Resv6a/Resv7, the DETH reserved byte, pad bytes;
    and decoding the re-encoded bytes gives the same packet."""
    out = pkt.encode()
    assert_equal_but(out, raw, transport_ignored_bits(pkt, len(raw)))
    assert Packet.decode(out) == pkt


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120))
@example(b"")
@example(b"\x11")
@example(bytes(11))
def test_fuzz_random_bytes(buf: bytes) -> None:
    p = _decode_or_malformed(buf)
    if p is not None:
        _assert_reencodes(p, buf)


@settings(max_examples=300)
@given(st.integers(0, 255), st.binary(min_size=0, max_size=64))
def test_fuzz_each_opcode_byte(op: int, rest: bytes) -> None:
    raw = bytes([op]) + rest
    p = _decode_or_malformed(raw)
    if p is not None:
        _assert_reencodes(p, raw)


@given(packets(), st.data())
def test_truncations_are_typed(pkt: Packet, data: st.DataObject) -> None:
    raw = pkt.encode()
    cut = data.draw(st.integers(0, len(raw) - 1))
    got = _decode_or_malformed(raw[:cut])
    if cut < pkt.info.length or cut % 4:
        assert got is None
    if got is not None:
        _assert_reencodes(got, raw[:cut])


@given(packets(), st.data())
def test_byte_flips_are_typed(pkt: Packet, data: st.DataObject) -> None:
    raw = bytearray(pkt.encode())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    got = _decode_or_malformed(bytes(raw))
    if got is not None:
        _assert_reencodes(got, bytes(raw))


@pytest.mark.parametrize(
    ("raw", "exc", "match"),
    [
        (b"", MalformedPacket, "shorter than a BTH"),
        (bytes.fromhex("0400ffff000000010000"), MalformedPacket, "shorter than a BTH"),
        (bytes.fromhex("1500ffff0000000100000001"), UnknownOpcode, "0x15"),
        (bytes.fromhex("4000ffff0000000100000001"), UnknownOpcode, "0x40"),
        (bytes.fromhex("0401ffff0000000100000001"), MalformedPacket, "TVer"),
        (bytes.fromhex("0600ffff0000000100000001") + bytes(8), MalformedPacket, "needs 28"),
        (bytes.fromhex("0400ffff0000000100000001") + b"abc", MalformedPacket, "multiple of 4"),
        (bytes.fromhex("0430ffff0000000100000001"), MalformedPacket, "PadCnt"),
        (bytes.fromhex("0420ffff0000000100000001") + b"\0\0\0\0", MalformedPacket, None),
        (
            bytes.fromhex("1100ffff00000001000000011f000000") + b"abcd",
            MalformedPacket,
            "no payload",
        ),
        (bytes.fromhex("1110ffff00000001000000011f000000"), MalformedPacket, "PadCnt"),
        (
            bytes.fromhex("0c00ffff0000000100000001") + bytes(16) + b"abcd",
            MalformedPacket,
            "no payload",
        ),
    ],
)
def test_malformed_examples(raw: bytes, exc: type[Exception], match: str | None) -> None:
    if match is None:
        # PadCnt 2 with a 4-byte tail: a 2-byte payload plus 2 pad bytes is consistent
        assert Packet.decode(raw).payload_len == 2
        return
    with pytest.raises(exc, match=match):
        Packet.decode(raw)


def test_every_opcode_rejects_short_headers() -> None:
    for info in INFOS:
        if info.length == 12:
            continue
        raw = (
            bytes([info.opcode]) + bytes.fromhex("00ffff0000000100000001") + bytes(info.length - 16)
        )
        with pytest.raises(MalformedPacket, match=f"needs {info.length}"):
            Packet.decode(raw)
        assert opcode_info(info.opcode) is info
