"""Every RoCEv2 packet of the Linux rdma_rxe captures: decode, ICRC, exact re-encode.

The captures (``tests/data/captures``, see its SUMMARY.md) are the reference
for the wire format. Opcode counts are pinned to SUMMARY.md so the test cannot
pass on an empty or filtered-out file.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from softrdma.fabric.pcap import LINKTYPE_ETHERNET, PcapReader
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.roce import (
    RoceFrame,
    decode_roce_v2,
    rdma_get_udp_sport,
    rxe_qp_src_port,
)

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "captures"

# SUMMARY.md "RoCEv2 opcodes seen" per file.
EXPECTED: dict[str, dict[int, int]] = {
    "rc_pingpong.pcap": {Opcode.RC_SEND_ONLY: 26, Opcode.RC_ACKNOWLEDGE: 26},
    "write_bw.pcap": {
        Opcode.RC_RDMA_WRITE_FIRST: 20,
        Opcode.RC_RDMA_WRITE_MIDDLE: 120,
        Opcode.RC_RDMA_WRITE_LAST: 20,
        Opcode.RC_ACKNOWLEDGE: 20,
    },
    "read_bw.pcap": {
        Opcode.RC_RDMA_READ_REQUEST: 20,
        Opcode.RC_RDMA_READ_RESPONSE_FIRST: 20,
        Opcode.RC_RDMA_READ_RESPONSE_MIDDLE: 120,
        Opcode.RC_RDMA_READ_RESPONSE_LAST: 20,
    },
    "atomic_bw.pcap": {Opcode.RC_FETCH_ADD: 20, Opcode.RC_ATOMIC_ACKNOWLEDGE: 20},
    "rping.pcap": {
        Opcode.UD_SEND_ONLY: 5,
        Opcode.RC_SEND_ONLY: 12,
        Opcode.RC_RDMA_WRITE_ONLY: 3,
        Opcode.RC_RDMA_READ_REQUEST: 3,
        Opcode.RC_RDMA_READ_RESPONSE_ONLY: 3,
        Opcode.RC_ACKNOWLEDGE: 15,
    },
    "srp_imm.pcap": {
        Opcode.UD_SEND_ONLY: 3,
        Opcode.RC_SEND_ONLY: 86,
        Opcode.RC_SEND_FIRST: 16,
        Opcode.RC_SEND_MIDDLE: 48,
        Opcode.RC_SEND_LAST: 16,
        Opcode.RC_RDMA_WRITE_FIRST: 20,
        Opcode.RC_RDMA_WRITE_MIDDLE: 40,
        Opcode.RC_RDMA_WRITE_LAST: 20,
        Opcode.RC_RDMA_WRITE_ONLY: 13,
        Opcode.RC_ACKNOWLEDGE: 135,
    },
    "srp_rdma.pcap": {
        Opcode.UD_SEND_ONLY: 3,
        Opcode.RC_SEND_ONLY: 54,
        Opcode.RC_RDMA_WRITE_FIRST: 8,
        Opcode.RC_RDMA_WRITE_MIDDLE: 128,
        Opcode.RC_RDMA_WRITE_LAST: 8,
        Opcode.RC_RDMA_WRITE_ONLY: 13,
        Opcode.RC_RDMA_READ_REQUEST: 4,
        Opcode.RC_RDMA_READ_RESPONSE_FIRST: 4,
        Opcode.RC_RDMA_READ_RESPONSE_MIDDLE: 120,
        Opcode.RC_RDMA_READ_RESPONSE_LAST: 4,
        Opcode.RC_ACKNOWLEDGE: 75,
    },
}


def _capture_files() -> list[str]:
    return sorted(p.name for p in CAPTURES.glob("*.pcap"))


def _roce_frames(path: Path) -> Iterator[bytes]:
    """Frames that are IPv4/IPv6 UDP to port 4791, by a parse independent of
    softrdma.transport."""
    with PcapReader(path) as r:
        assert r.linktype == LINKTYPE_ETHERNET
        for rec in r:
            f = rec.data
            assert rec.orig_len == len(f)  # not truncated by the capture
            et = f[12:14]
            if et == b"\x08\x00" and f[23] == 17:
                l4 = 14 + (f[14] & 0x0F) * 4
            elif et == b"\x86\xdd" and f[20] == 17:
                l4 = 54
            else:
                continue
            if struct.unpack_from(">H", f, l4 + 2)[0] == 4791:
                yield f


def _icrc_by_summary_recipe(f: bytes) -> bytes:
    """SUMMARY.md's recipe, written out with plain zlib (IPv4 only)."""
    ip = bytearray(f[14:34])
    ip[1] = 0xFF
    ip[8] = 0xFF
    ip[10:12] = b"\xff\xff"
    udp = bytearray(f[34:42])
    udp[6:8] = b"\xff\xff"
    bth = bytearray(f[42:54])
    bth[4] = 0xFF
    return struct.pack("<I", zlib.crc32(b"\xff" * 8 + ip + udp + bth + f[54:-4]))


def test_expected_table_covers_captures() -> None:
    assert set(EXPECTED) <= set(_capture_files()), "a capture named in SUMMARY.md is missing"


@pytest.mark.parametrize("name", _capture_files())
def test_capture(name: str) -> None:
    frames = list(_roce_frames(CAPTURES / name))
    assert frames, f"{name} has no RoCEv2 packets"
    counts: Counter[int] = Counter()
    for f in frames:
        rf = decode_roce_v2(f)  # raises on any malformation or bad ICRC
        p = rf.packet
        counts[p.opcode] += 1
        assert rf.icrc is not None and struct.pack("<I", rf.icrc) == f[-4:]
        if rf.ip_version == 4:
            assert _icrc_by_summary_recipe(f) == f[-4:]

        # Re-encode from decoded fields with a copied payload and a fresh ICRC.
        hdrs = {
            s: getattr(p, s)
            for s in ("reth", "aeth", "atmeth", "atmack", "immdt", "ieth", "deth", "cnp")
        }
        pkt = Packet(p.bth, bytes(p.payload), **hdrs)
        ib_end = len(f) - 4 - len(rf.trailer)
        assert pkt.encode() == f[ib_end - len(pkt) : ib_end]
        again = RoceFrame(
            pkt,
            rf.saddr,
            rf.daddr,
            rf.sport,
            rf.dport,
            rf.eth_dst,
            rf.eth_src,
            rf.vlan_tci,
            rf.tos,
            rf.ttl,
            rf.ip_id,
            rf.df,
            rf.flow_label,
            rf.udp_checksum,
            rf.trailer,
        )
        assert again.encode() == f
        assert again.icrc == rf.icrc

        # What Linux rxe puts on the wire.
        assert rf.df and rf.ttl == 64 and rf.tos == 0 and not rf.udp_checksum
        assert 0xC000 <= rf.sport <= 0xFFFF
        assert p.bth.tver == 0 and not p.bth.mig and p.bth.pkey == 0xFFFF
        assert rf.trailer == b""
        if p.aeth is not None:
            assert p.aeth.syndrome == 0x1F  # ACK with "invalid" credits, never NAK here
        if p.info.ends_message and p.info.is_request:
            assert p.bth.ack_req  # rxe asks for an ACK at the end of each message
        if p.deth is not None:
            assert p.deth.qkey == 0x80010000 and p.deth.src_qp == 1 and p.dest_qp == 1
            assert len(p.payload) == 256  # a CM MAD
    expected = EXPECTED.get(name)
    if expected is not None:
        assert dict(counts) == {int(k): v for k, v in expected.items()}


def _cm_req_flow_labels(frames: list[RoceFrame]) -> set[int]:
    """The primary flow label of every CM REQ in the capture (0 if none)."""
    labels = set()
    for rf in frames:
        p = rf.packet
        if p.deth is not None:
            mad = bytes(p.payload)
            if mad[16:18] == b"\x00\x10":  # AttributeID REQ
                labels.add(int.from_bytes(mad[24 + 88 : 24 + 91], "big") >> 4)
    return labels or {0}


@pytest.mark.parametrize("name", _capture_files())
def test_capture_udp_source_ports_and_ip_ids(name: str) -> None:
    frames = [decode_roce_v2(f) for f in _roce_frames(CAPTURES / name)]
    # One connection's frames share a UDP source port both ways; in it, the
    # QPN each host's RC traffic is addressed to is the peer's local QPN.
    dest_qp: dict[tuple[int, bytes], set[int]] = defaultdict(set)
    for rf in frames:
        if rf.packet.deth is None:
            dest_qp[(rf.sport, rf.saddr)].add(rf.packet.dest_qp)
    labels = _cm_req_flow_labels(frames)
    ids: dict[tuple[bytes, bytes], list[int]] = defaultdict(list)
    for rf in frames:
        ids[(rf.saddr, rf.daddr)].append(rf.ip_id)
        if rf.packet.deth is not None:
            # GSI QP1 keeps the port given at QP creation.
            assert rf.sport == rxe_qp_src_port(1) == 0xD872
            continue
        (rqpn,) = dest_qp[(rf.sport, rf.saddr)]
        (lqpn,) = dest_qp[(rf.sport, rf.daddr)]
        # the flow label of the connection's REQ (any REQ's, when several)
        assert rf.sport in {rdma_get_udp_sport(fl, lqpn, rqpn) for fl in labels}
    # One IP ID counter per (source, destination), shared by all QPs: it only
    # moves forward (with gaps for retransmissions and other traffic).
    # A sender on an ordinary UDP socket with DF (softrdma's UdpNetwork, in
    # a capture taken on its side) sends identification 0 throughout
    # (ip_select_ident_segs); rxe's kernel path counts.
    for seq in ids.values():
        if not any(seq):
            continue
        steps = [(b - a) & 0xFFFF for a, b in pairwise(seq)]
        assert all(0 < s < 0x8000 for s in steps), steps
