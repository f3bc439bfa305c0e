"""Header codecs: round trips, known byte layouts, validation, AETH, RNR table."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.contrib.roce import AETH as ScapyAETH
from scapy.contrib.roce import BTH as ScapyBTH

from softrdma.transport.headers import (
    AETH_CREDIT_INVALID,
    RNR_NAK_USEC,
    Aeth,
    AethType,
    AtomicAckEth,
    AtomicEth,
    Bth,
    CnpRsvd,
    Deth,
    HeaderFieldError,
    Ieth,
    ImmDt,
    MalformedPacket,
    NakCode,
    Reth,
    aeth_syndrome,
    aeth_syndrome_parse,
    rnr_timer_decode,
    rnr_timer_encode,
)

from .strategies import HEADER_STRATEGY, u

bths = st.builds(
    Bth,
    opcode=u(8),
    dest_qp=u(24),
    psn=u(24),
    pkey=u(16),
    se=st.booleans(),
    mig=st.booleans(),
    pad=u(2),
    fecn=st.booleans(),
    becn=st.booleans(),
    ack_req=st.booleans(),
    tver=st.just(0),
)


@given(bths, st.integers(0, 5))
def test_bth_roundtrip(bth: Bth, offset: int) -> None:
    raw = bth.pack()
    assert len(raw) == Bth.SIZE == 12
    assert Bth.unpack_from(raw) == bth
    buf = bytearray(offset + 12)
    bth.pack_into(buf, offset)
    assert bytes(buf[offset:]) == raw
    assert Bth.unpack_from(buf, offset) == bth


@given(bths)
def test_bth_layout_matches_scapy(bth: Bth) -> None:
    """scapy's BTH layer is an independent description of the same bits."""
    s = ScapyBTH(
        opcode=bth.opcode,
        solicited=int(bth.se),
        migreq=int(bth.mig),
        padcount=bth.pad,
        version=0,
        pkey=bth.pkey,
        fecn=int(bth.fecn),
        becn=int(bth.becn),
        resv6=0,
        dqpn=bth.dest_qp,
        ackreq=int(bth.ack_req),
        resv7=0,
        psn=bth.psn,
        icrc=0,
    )
    assert bytes(s)[:12] == bth.pack()


def test_bth_known_bytes() -> None:
    # write_bw.pcap: RDMA WRITE LAST, DestQP 17, AckReq, PSN 0x... (layout check)
    bth = Bth(0x08, dest_qp=0x000011, psn=0xABCDEF, ack_req=True, se=True, pad=2, becn=True)
    assert bth.pack() == bytes.fromhex("08a0ffff40000011 80abcdef".replace(" ", ""))


@given(bths)
def test_bth_ignores_reserved_bits_on_receive(bth: Bth) -> None:
    raw = bytearray(bth.pack())
    raw[4] |= 0x3F  # Resv6a
    raw[8] |= 0x7F  # Resv7
    assert Bth.unpack_from(raw) == bth


@pytest.mark.parametrize("tver", range(1, 16))
def test_bth_tver_nonzero_is_malformed(tver: int) -> None:
    raw = bytearray(Bth(0x04, 1, 2).pack())
    raw[1] |= tver
    with pytest.raises(MalformedPacket, match="TVer"):
        Bth.unpack_from(raw)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dest_qp": 1 << 24}, "dest_qp"),
        ({"dest_qp": -1}, "dest_qp"),
        ({"psn": 1 << 24}, "psn"),
        ({"psn": -5}, "psn"),
        ({"pad": 4}, "pad"),
        ({"pad": -1}, "pad"),
        ({"tver": 1}, "tver"),
        ({"se": 2}, "se"),
        ({"ack_req": -1}, "ack_req"),
        ({"becn": 3}, "becn"),
        ({"opcode": 256}, "opcode"),
        ({"pkey": 1 << 16}, "pkey"),
        ({"pkey": -1}, "pkey"),
    ],
)
def test_bth_field_validation(kwargs: dict[str, Any], field: str) -> None:
    base: dict[str, Any] = {"opcode": 4, "dest_qp": 1, "psn": 1}
    bth = Bth(**(base | kwargs))
    with pytest.raises(HeaderFieldError, match=field):
        bth.pack()
    with pytest.raises(HeaderFieldError, match=field):
        bth.pack_into(bytearray(12))


EXT = [Reth, Aeth, AtomicEth, AtomicAckEth, ImmDt, Ieth, Deth, CnpRsvd]


@pytest.mark.parametrize("cls", EXT, ids=lambda c: c.__name__)
@given(data=st.data(), offset=st.integers(0, 7))
def test_ext_header_roundtrip(cls: Any, data: st.DataObject, offset: int) -> None:
    h = data.draw(HEADER_STRATEGY[cls])
    raw = h.pack()
    assert len(raw) == cls.SIZE == cls.STRUCT.size
    assert cls.unpack_from(raw) == h
    buf = bytearray(b"\xaa" * (offset + cls.SIZE))
    h.pack_into(buf, offset)
    assert bytes(buf[offset:]) == raw
    assert cls.unpack_from(memoryview(buf), offset) == h


@pytest.mark.parametrize("cls", EXT, ids=lambda c: c.__name__)
def test_ext_header_truncated(cls: Any) -> None:
    with pytest.raises(MalformedPacket, match=cls.NAME):
        cls.unpack_from(bytes(cls.SIZE - 1))
    with pytest.raises(MalformedPacket):
        cls.unpack_from(bytes(cls.SIZE), 1)


def test_ext_header_known_bytes() -> None:
    assert Reth(0x0102030405060708, 0x11223344, 0x1000).pack() == bytes.fromhex(
        "01020304050607081122334400001000"
    )
    assert Aeth(0x1F, 0x000102).pack() == bytes.fromhex("1f000102")
    assert AtomicEth(1, 2, 3, 4).pack() == bytes.fromhex(
        "00000000000000010000000200000000000000030000000000000004"
    )
    assert AtomicAckEth(0xDEADBEEF00000001).pack() == bytes.fromhex("deadbeef00000001")
    assert ImmDt(0x12345678).pack() == bytes.fromhex("12345678")
    assert Ieth(0xCAFEF00D).pack() == bytes.fromhex("cafef00d")
    # rxe/CM: QP1 Q_Key 0x80010000, source QP 1, reserved byte 0
    assert Deth(0x80010000, 1).pack() == bytes.fromhex("8001000000000001")
    assert CnpRsvd().pack() == bytes(16)


def test_deth_ignores_reserved_byte() -> None:
    assert Deth.unpack_from(bytes.fromhex("80010000ff000001")) == Deth(0x80010000, 1)


@given(u(8), u(24))
def test_aeth_matches_scapy(syndrome: int, msn: int) -> None:
    assert bytes(ScapyAETH(syndrome=syndrome, msn=msn)) == Aeth(syndrome, msn).pack()


@pytest.mark.parametrize(
    ("header", "field"),
    [
        (Reth(1 << 64, 0, 0), "va"),
        (Reth(0, -1, 0), "rkey"),
        (Reth(0, 0, 1 << 32), "dma_len"),
        (Aeth(256, 0), "syndrome"),
        (Aeth(0, 1 << 24), "msn"),
        (Aeth(-1, 0), "syndrome"),
        (AtomicEth(0, 0, 1 << 64, 0), "swap_add"),
        (AtomicEth(0, 0, 0, -1), "compare"),
        (AtomicAckEth(1 << 64), "orig_data"),
        (ImmDt(1 << 32), "imm"),
        (Ieth(-1), "inv_rkey"),
        (Deth(1 << 32, 0), "qkey"),
        (Deth(0, 1 << 24), "src_qp"),
    ],
)
def test_ext_header_field_validation(header: Any, field: str) -> None:
    with pytest.raises(HeaderFieldError, match=field):
        header.pack()
    with pytest.raises(HeaderFieldError, match=field):
        header.pack_into(bytearray(64))


def test_cnp_rsvd_validation() -> None:
    with pytest.raises(HeaderFieldError):
        CnpRsvd(b"short").pack()


# --- AETH syndrome -------------------------------------------------------------------


def test_aeth_constructors_match_rxe_values() -> None:
    # rxe_hdr.h: AETH_ACK_UNLIMITED 0x1f, AETH_RNR_NAK 0x20, AETH_NAK_* 0x60..0x63
    assert Aeth.ack(5).syndrome == 0x1F
    assert AETH_CREDIT_INVALID == 31
    assert Aeth.rnr_nak(5, 12).syndrome == 0x2C
    assert Aeth.nak(5, NakCode.PSN_SEQ_ERR).syndrome == 0x60
    assert Aeth.nak(5, NakCode.INVALID_REQUEST).syndrome == 0x61
    assert Aeth.nak(5, NakCode.REMOTE_ACCESS_ERR).syndrome == 0x62
    assert Aeth.nak(5, NakCode.REMOTE_OP_ERR).syndrome == 0x63
    assert Aeth.nak(5, NakCode.INVALID_RD_REQUEST).syndrome == 0x64
    a = Aeth.rnr_nak(7, 3)
    assert (a.kind, a.value, a.msn) == (AethType.RNR_NAK, 3, 7)


@given(st.sampled_from(list(AethType)), u(5))
def test_aeth_syndrome_roundtrip(kind: AethType, value: int) -> None:
    if kind is AethType.NAK and value > 4:
        with pytest.raises(HeaderFieldError):
            aeth_syndrome(kind, value)
        syn = kind << 5 | value
        with pytest.raises(MalformedPacket, match="reserved"):
            aeth_syndrome_parse(syn)
        return
    syn = aeth_syndrome(kind, value)
    assert 0 <= syn <= 0xFF
    assert aeth_syndrome_parse(syn) == (kind, value)


@pytest.mark.parametrize("syndrome", [0x40, 0x5F, 0x80, 0xA0, 0xC0, 0xFF])
def test_aeth_reserved_types(syndrome: int) -> None:
    with pytest.raises(MalformedPacket, match="reserved"):
        aeth_syndrome_parse(syndrome)
    with pytest.raises(MalformedPacket):
        _ = Aeth(syndrome, 0).kind


def test_aeth_syndrome_value_range() -> None:
    with pytest.raises(HeaderFieldError):
        aeth_syndrome(AethType.ACK, 32)
    with pytest.raises(HeaderFieldError):
        aeth_syndrome(AethType.ACK, -1)


def test_nak_codes() -> None:
    assert [int(c) for c in NakCode] == [0, 1, 2, 3, 4]


# --- RNR timer ------------------------------------------------------------------------

PROTOCOLS_MD_MS = [
    655.36, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32, 0.48, 0.64,
    0.96, 1.28, 1.92, 2.56, 3.84, 5.12, 7.68, 10.24, 15.36, 20.48, 30.72, 40.96,
    61.44, 81.92, 122.88, 163.84, 245.76, 327.68, 491.52,
]  # fmt: skip


def test_rnr_table_matches_ibta() -> None:
    assert len(RNR_NAK_USEC) == 32
    for code, ms in enumerate(PROTOCOLS_MD_MS):
        assert rnr_timer_decode(code) == round(ms * 1000)


@given(u(5))
def test_rnr_encode_decode_exact(code: int) -> None:
    assert rnr_timer_encode(rnr_timer_decode(code)) == code


@given(st.floats(min_value=0, max_value=655360, allow_nan=False))
def test_rnr_encode_is_smallest_sufficient(usec: float) -> None:
    code = rnr_timer_encode(usec)
    t = rnr_timer_decode(code)
    assert t >= usec
    # no other code gives a shorter delay that still covers usec
    assert all(not (usec <= other < t) for other in RNR_NAK_USEC)


def test_rnr_limits() -> None:
    assert rnr_timer_encode(0) == 1
    assert rnr_timer_encode(491521) == 0
    with pytest.raises(HeaderFieldError):
        rnr_timer_encode(655361)
    with pytest.raises(HeaderFieldError):
        rnr_timer_decode(32)


# --- the shared codec ------------------------------------------------------------------


@pytest.mark.parametrize("cls", EXT, ids=lambda c: c.__name__)
@given(data=st.data())
def test_verbatim_headers_are_their_struct_values(cls: Any, data: st.DataObject) -> None:
    """Packet.decode builds a VERBATIM header straight from the unpacked values
    (tuple.__new__), skipping from_wire: only headers that keep the shared
    from_wire may say so."""
    h = data.draw(HEADER_STRATEGY[cls])
    values = cls.STRUCT.unpack(h.pack())
    assert cls.from_wire(*values) == h
    assert ("from_wire" in vars(cls)) is not cls.VERBATIM
    if cls.VERBATIM:
        assert tuple.__new__(cls, values) == h


@pytest.mark.parametrize("cls", [Bth, *EXT], ids=lambda c: c.__name__)
def test_headers_share_one_codec(cls: Any) -> None:
    for name in ("pack", "pack_into", "unpack_from"):
        assert getattr(cls, name).__qualname__ == f"_WireHeader.{name}"
    assert cls.STRUCT.size == cls.SIZE
    assert len(cls.BITS) == len(cls._fields)
