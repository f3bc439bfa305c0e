"""The XRC wire format: XRCETH codec, the XRC opcodes' layout (XRCETH right
after the BTH of a request, none on responses), round trips through the
packet and RoCEv2 codecs, and tshark reading our frames."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softrdma.fabric.pcap import PcapWriter
from softrdma.transport.headers import (
    Aeth,
    AtomicAckEth,
    AtomicEth,
    HeaderFieldError,
    ImmDt,
    MalformedPacket,
    Reth,
    XrcEth,
)
from softrdma.transport.opcodes import OPCODE_TABLE, Opcode, Transport, opcode_info
from softrdma.transport.packet import Packet
from softrdma.transport.roce import RoceFrame, decode_roce_v2, encode_roce_v2
from softrdma.transport.xrc import rc_packet, xrc_packet
from tests.tshark import needs_tshark

from .strategies import packets

XRC_INFOS = [i for i in OPCODE_TABLE if i is not None and i.qp_type is Transport.XRC]


def test_xrc_opcode_set_is_ib_pack_h() -> None:
    # ib_pack.h IB_OPCODE_XRC (0xA0) + every RC operation up to SEND ONLY WITH INVALIDATE
    assert [i.opcode for i in XRC_INFOS] == [0xA0 + op for op in range(0x18) if op != 0x15]
    assert int(Transport.XRC) == 0xA0
    assert opcode_info(0xAC).offsets == (12, 16)  # READ REQUEST: XRCETH, RETH
    assert opcode_info(0xAB).offsets == (12, 16, 32)  # WRITE ONLY IMM: XRCETH, RETH, ImmDt
    assert opcode_info(0xB3).length == 12 + 4 + 28  # CMP SWAP: XRCETH + AtomicETH
    assert opcode_info(0xB0).offsets == (12,)  # READ RESPONSE ONLY: AETH, no XRCETH
    assert opcode_info(0xB1).ext_headers == (Aeth,)
    assert opcode_info(0xB2).ext_headers == (Aeth, AtomicAckEth)
    for v in (0xB5, 0xB8, 0xBF):
        assert OPCODE_TABLE[v] is None


def test_xrceth_codec() -> None:
    assert XrcEth(0xABCDEF).pack() == b"\x00\xab\xcd\xef"
    # the reserved byte is ignored on receive
    assert XrcEth.unpack_from(b"\xff\x00\x00\x41") == XrcEth(0x41)
    for bad in (1 << 24, -1):
        with pytest.raises(HeaderFieldError, match=r"XrcEth\.srqn"):
            XrcEth(bad).pack()
    with pytest.raises(MalformedPacket):
        XrcEth.unpack_from(b"\x00\x00")


def test_request_without_xrceth_does_not_encode() -> None:
    pkt = Packet.build(Opcode.XRC_SEND_ONLY, dest_qp=1, psn=2, payload=b"abcd")
    with pytest.raises(HeaderFieldError, match="xrceth"):
        pkt.encode()
    ack = Packet.build(Opcode.XRC_ACKNOWLEDGE, dest_qp=1, psn=2, aeth=Aeth.ack(0), xrceth=XrcEth(3))
    with pytest.raises(HeaderFieldError, match="does not carry xrceth"):
        ack.encode()


def test_truncated_xrc_request_is_malformed() -> None:
    raw = Packet.build(Opcode.XRC_RDMA_READ_REQUEST, dest_qp=1, psn=2, xrceth=XrcEth(5),
                       reth=Reth(0, 1, 2)).encode()  # fmt: skip
    with pytest.raises(MalformedPacket):
        Packet.decode(raw[:20])


@given(st.sampled_from(XRC_INFOS).flatmap(packets))
def test_packet_round_trip(pkt: Packet) -> None:
    raw = pkt.encode()
    back = Packet.decode(raw)
    assert back == pkt and back.encode() == raw
    assert (back.xrceth is not None) == back.info.is_request
    if back.xrceth is not None:
        # XRCETH is the 4 bytes right after the BTH: reserved 0, 24-bit SRQN
        assert raw[12:16] == struct.pack(">I", back.xrceth.srqn)


@given(st.sampled_from(XRC_INFOS).flatmap(packets))
def test_roce_frame_round_trip_with_icrc(pkt: Packet) -> None:
    frame = RoceFrame.build(pkt, "10.0.0.1", "10.0.0.2", 0xC000)
    raw = encode_roce_v2(frame)
    back = decode_roce_v2(raw)
    assert back.packet == pkt
    flipped = bytearray(raw)
    flipped[-5] ^= 0x01  # a payload / header byte under the ICRC
    with pytest.raises(MalformedPacket):
        decode_roce_v2(bytes(flipped))


@given(st.sampled_from(XRC_INFOS).flatmap(packets))
def test_rc_twin_round_trip(pkt: Packet) -> None:
    rc = rc_packet(pkt)
    assert rc.bth.opcode == pkt.bth.opcode - 0xA0 and rc.xrceth is None
    rc.encode()  # a valid RC packet
    srqn = pkt.xrceth.srqn if pkt.xrceth is not None else None
    assert xrc_packet(rc, srqn) == pkt


def _expected_after_bth(pkt: Packet) -> bytes:
    """The bytes that follow the BTH, assembled by hand from IBTA's layout."""
    out = b""
    if pkt.xrceth is not None:
        out += struct.pack(">BBH", 0, pkt.xrceth.srqn >> 16, pkt.xrceth.srqn & 0xFFFF)
    if pkt.reth is not None:
        out += struct.pack(">QII", *pkt.reth)
    if pkt.aeth is not None:
        out += struct.pack(">B", pkt.aeth.syndrome) + pkt.aeth.msn.to_bytes(3, "big")
    if pkt.atmeth is not None:
        out += struct.pack(">QIQQ", *pkt.atmeth)
    if pkt.atmack is not None:
        out += struct.pack(">Q", *pkt.atmack)
    if pkt.immdt is not None:
        out += struct.pack(">I", *pkt.immdt)
    if pkt.ieth is not None:
        out += struct.pack(">I", *pkt.ieth)
    n = len(bytes(pkt.payload))
    return out + bytes(pkt.payload) + bytes(-n & 3)


@needs_tshark
def test_tshark_reads_xrc_frames(tmp_path: Path) -> None:
    """tshark names the XRC opcodes and gives the bytes after the BTH (its
    InfiniBand dissector leaves XRC's extension headers undissected); they
    are laid out as IBTA places them, XRCETH first on requests only."""
    pkts = [
        Packet.build(Opcode.XRC_RDMA_WRITE_ONLY, dest_qp=0x12, psn=5, payload=b"abcde",
                     xrceth=XrcEth(0xABCDE), reth=Reth(0x1122334455, 0x77, 5)),
        Packet.build(Opcode.XRC_COMPARE_SWAP, dest_qp=0x12, psn=6, xrceth=XrcEth(0x41),
                     atmeth=AtomicEth(0x1000, 0x99, 7, 8)),
        Packet.build(Opcode.XRC_ATOMIC_ACKNOWLEDGE, dest_qp=0x13, psn=6,
                     aeth=Aeth.ack(3), atmack=AtomicAckEth(42)),
        Packet.build(Opcode.XRC_SEND_ONLY_WITH_IMMEDIATE, dest_qp=0xFFFFFF, psn=0xFFFFFF,
                     payload=b"xyzw", xrceth=XrcEth(0xFFFFFF), immdt=ImmDt(0xDEADBEEF)),
        Packet.build(Opcode.XRC_RDMA_READ_RESPONSE_MIDDLE, dest_qp=0x13, psn=9, payload=b"m" * 8),
    ]  # fmt: skip
    path = tmp_path / "xrc.pcap"
    with path.open("wb") as f:
        w = PcapWriter(f)
        for p in pkts:
            w.write(encode_roce_v2(RoceFrame.build(p, "10.0.0.1", "10.0.0.2", 0xC000)))
        w.close()
    args = ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=|"]
    for field in ("bth.opcode", "bth.destqp", "bth.psn", "vendor"):
        args += ["-e", f"infiniband.{field}"]
    verbose = subprocess.run(
        ["tshark", "-r", str(path), "-V"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line]
    assert len(rows) == len(pkts)
    for p, (opcode, destqp, psn, vendor) in zip(pkts, rows, strict=True):
        assert (int(opcode), int(destqp, 0), int(psn)) == (p.bth.opcode, p.dest_qp, p.psn)
        data = bytes.fromhex(vendor.split(",")[-1])
        assert data[:-4] == _expected_after_bth(p)  # then the 4-byte ICRC
    assert verbose.count("Opcode: Extended Reliable Connection (XRC) - ") == len(pkts)
