"""RC FLUSH (0x1C) and RC ATOMIC WRITE (0x1D), IBTA annex A19, as rxe runs
them: the wire codec (FETH + RETH; RETH + 8 bytes), the requester's packets,
the responder's checks and its empty RDMA READ RESPONSE ONLY, duplicates,
lost responses and the ``max_rd_atomic`` credits.

Neither scapy's RoCE layer nor tshark 4.0 knows these two opcodes, so the
codec is checked against byte strings written out from the layout in
``rxe_hdr.h`` / ``rxe_opcode.c`` (FETH: placement type bits 3..0,
selectivity level bits 5..4 of a big-endian word)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softrdma.transport.headers import (
    Aeth,
    AethType,
    Feth,
    HeaderFieldError,
    MalformedPacket,
    NakCode,
    Reth,
)
from softrdma.transport.opcodes import Opcode, UnknownOpcode, opcode_info
from softrdma.transport.packet import Packet
from softrdma.transport.wqe import check_send_wr
from softrdma.verbs.enums import IbAccess, IbQpType, IbWcOpcode, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import AtomicWriteWR, FlushWR, RdmaWR, Sge

from .engine_harness import REMOTE_ALL, DropWhen, Pair, naks, wc_ok
from .fakemem import ALL_ACCESS

FLUSH_ACCESS = ALL_ACCESS | IbAccess.FLUSH_GLOBAL
QP_FLUSH = REMOTE_ALL | IbAccess.FLUSH_GLOBAL | IbAccess.FLUSH_PERSISTENT
RESPONSE_ONLY = Opcode.RC_RDMA_READ_RESPONSE_ONLY


def flush(wr_id: int, mr_iova: int, key: int, n: int, *, plt: int = 1, sel: int = 0) -> FlushWR:
    return FlushWR(
        wr_id, Op.FLUSH, remote_addr=mr_iova, rkey=key, flush_len=n, placement_type=plt, level=sel
    )


def awrite(wr_id: int, va: int, key: int, data: bytes = b"ATOMIC!!") -> AtomicWriteWR:
    return AtomicWriteWR(wr_id, Op.ATOMIC_WRITE, remote_addr=va, rkey=key, atomic_wr=data)


# -- the codec ---------------------------------------------------------------------------


def test_feth_known_bytes() -> None:
    assert Feth(1, 0).pack() == bytes.fromhex("00000001")
    assert Feth(2, 1).pack() == bytes.fromhex("00000012")
    assert Feth(3, 3).pack() == bytes.fromhex("00000033")
    # reserved bits are ignored on receive
    assert Feth.unpack_from(bytes.fromhex("ffffffd2")) == Feth(2, 1)
    for bad, field in ((Feth(16, 0), "plt"), (Feth(0, 4), "sel"), (Feth(-1, 0), "plt")):
        with pytest.raises(HeaderFieldError, match=field):
            bad.pack()
    with pytest.raises(MalformedPacket):
        Feth.unpack_from(b"\0\0\0")


def test_opcode_rows() -> None:
    fl, aw = opcode_info(0x1C), opcode_info(0x1D)
    assert (fl.name, fl.ext_headers, fl.offsets, fl.length) == (
        "IB_OPCODE_RC_FLUSH",
        (Feth, Reth),
        (12, 16),
        32,
    )
    assert (aw.name, aw.ext_headers, aw.offsets, aw.length) == (
        "IB_OPCODE_RC_ATOMIC_WRITE",
        (Reth,),
        (12,),
        28,
    )
    for info in (fl, aw):
        assert info.is_request and info.is_only and info.requires_ack
        assert not (info.is_read or info.is_write or info.is_atomic or info.is_send)
        assert not info.consumes_recv_wqe and not info.completes
    assert fl.is_flush and not fl.has_payload and not fl.is_atomic_write
    assert aw.is_atomic_write and aw.has_payload and not aw.is_flush
    # RC only: no UC / XRC twins
    for op in (0x3C, 0x3D, 0xBC, 0xBD):
        with pytest.raises(UnknownOpcode):
            opcode_info(op)


def test_flush_wire_bytes() -> None:
    pkt = Packet.build(
        Opcode.RC_FLUSH,
        dest_qp=0x123456,
        psn=0x654321,
        pkey=0xFFFF,
        ack_req=True,
        feth=Feth(1, 1),
        reth=Reth(0x1122334455667788, 0xAABBCCDD, 0x1000),
    )
    want = (
        bytes.fromhex("1c00ffff0012345680654321")
        + bytes.fromhex("00000011")
        + bytes.fromhex("1122334455667788aabbccdd00001000")
    )
    assert pkt.encode() == want
    back = Packet.decode(want)
    assert back.feth == Feth(1, 1) and back.reth == pkt.reth and back.payload_len == 0
    with pytest.raises(MalformedPacket, match="no payload"):
        Packet.decode(want + b"abcd")
    with pytest.raises(MalformedPacket, match="needs 32"):
        Packet.decode(want[:28])


def test_atomic_write_wire_bytes() -> None:
    pkt = Packet.build(
        Opcode.RC_ATOMIC_WRITE,
        dest_qp=7,
        psn=9,
        ack_req=True,
        reth=Reth(0x1000, 0x42, 8),
        payload=b"\x01\x02\x03\x04\x05\x06\x07\x08",
    )
    want = (
        bytes.fromhex("1d00ffff0000000780000009")
        + bytes.fromhex("00000000000010000000004200000008")
        + bytes(range(1, 9))
    )
    assert pkt.encode() == want
    assert bytes(Packet.decode(want).payload) == bytes(range(1, 9))


@given(
    plt=st.integers(0, 15),
    sel=st.integers(0, 3),
    va=st.integers(0, (1 << 64) - 1),
    rkey=st.integers(0, (1 << 32) - 1),
    n=st.integers(0, (1 << 32) - 1),
    psn=st.integers(0, (1 << 24) - 1),
    value=st.binary(min_size=8, max_size=8),
)
def test_round_trip(plt: int, sel: int, va: int, rkey: int, n: int, psn: int, value: bytes) -> None:
    fl = Packet.build(
        Opcode.RC_FLUSH, dest_qp=1, psn=psn, feth=Feth(plt, sel), reth=Reth(va, rkey, n)
    )
    raw = fl.encode()
    # the layout, independently: BTH, then the FETH word, then the RETH
    assert raw[12:16] == struct.pack(">I", sel << 4 | plt)
    assert raw[16:32] == struct.pack(">QII", va, rkey, n)
    back = Packet.decode(raw)
    assert (back.feth, back.reth, back.psn) == (Feth(plt, sel), Reth(va, rkey, n), psn)
    aw = Packet.build(
        Opcode.RC_ATOMIC_WRITE, dest_qp=1, psn=psn, reth=Reth(va, rkey, 8), payload=value
    )
    raw = aw.encode()
    assert raw[28:] == value and len(raw) == 36
    back = Packet.decode(raw)
    assert back.reth == Reth(va, rkey, 8) and bytes(back.payload) == value


# -- posting -----------------------------------------------------------------------------


def test_post_validation() -> None:
    assert check_send_wr(flush(1, 0, 1, 8), IbQpType.RC) is None
    assert check_send_wr(awrite(1, 0, 1), IbQpType.RC) is None
    assert "not valid on a UC QP" in str(check_send_wr(flush(1, 0, 1, 8), IbQpType.UC))
    assert "not valid on a UC QP" in str(check_send_wr(awrite(1, 0, 1), IbQpType.UC))
    assert "placement type" in str(check_send_wr(flush(1, 0, 1, 8, plt=0), IbQpType.RC))
    assert "placement type" in str(check_send_wr(flush(1, 0, 1, 8, plt=4), IbQpType.RC))
    assert "selectivity" in str(check_send_wr(flush(1, 0, 1, 8, sel=2), IbQpType.RC))
    assert "8 bytes" in str(check_send_wr(awrite(1, 0, 1, b"1234"), IbQpType.RC))
    # the right structure for the opcode
    wrong = RdmaWR(1, Op.FLUSH, (), remote_addr=0, rkey=1)
    assert "FlushWR" in str(check_send_wr(wrong, IbQpType.RC))


# -- the engines -------------------------------------------------------------------------


def _pair(
    *,
    a_kw: dict[str, Any] | None = None,
    b_kw: dict[str, Any] | None = None,
    mtu: int = 1024,
    wire: bool = False,
) -> Pair:
    """A pair whose responder QP (B) allows both FLUSH placement types."""
    return Pair(mtu=mtu, wire=wire, a_kw=a_kw, b_kw={"qp_access_flags": QP_FLUSH, **(b_kw or {})})


def test_write_flush_atomic_write_in_order() -> None:
    p = _pair(mtu=256)
    remote = p.mem_b.reg(4096, FLUSH_ACCESS)
    src = p.mem_a.reg(1000, fill=bytes(range(250)) * 4)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=remote.iova, rkey=remote.key))
    p.post(flush(2, remote.iova, remote.key, 1000))
    p.post(awrite(3, remote.iova + 1024, remote.key, b"12345678"))
    p.post(flush(4, 0xDEAD, remote.key, 0, sel=1))  # the whole MR: no range
    p.run_until_completions(4)
    wcs = p.send_wcs()
    assert [w.wr_id for w in wcs] == [1, 2, 3, 4]
    for wc, op in zip(wcs, (IbWcOpcode.RDMA_WRITE, IbWcOpcode.FLUSH, IbWcOpcode.ATOMIC_WRITE,
                            IbWcOpcode.FLUSH), strict=True):  # fmt: skip
        wc_ok(wc, op)
    assert [wc.byte_len for wc in wcs] == [1000, 1000, 8, 0]
    assert remote[0:1000] == src[0:1000] and remote[1024:1032] == b"12345678"
    # the FLUSH went after every WRITE packet, and each was answered with an
    # empty READ RESPONSE ONLY carrying an ACK at its own PSN
    ops = [q.bth.opcode for q in p.sent_a]
    assert ops == [Opcode.RC_RDMA_WRITE_FIRST, Opcode.RC_RDMA_WRITE_MIDDLE,
                   Opcode.RC_RDMA_WRITE_MIDDLE, Opcode.RC_RDMA_WRITE_LAST,
                   Opcode.RC_FLUSH, Opcode.RC_ATOMIC_WRITE, Opcode.RC_FLUSH]  # fmt: skip
    req = [q for q in p.sent_a if q.bth.opcode in (Opcode.RC_FLUSH, Opcode.RC_ATOMIC_WRITE)]
    assert req[0].feth == Feth(1, 0) and req[0].reth == Reth(remote.iova, remote.key, 1000)
    assert req[2].feth == Feth(1, 1)
    assert all(q.bth.ack_req for q in req)
    rsp = [q for q in p.sent_b if q.bth.opcode == RESPONSE_ONLY]
    assert [q.bth.psn for q in rsp] == [q.bth.psn for q in req]
    assert all(q.payload_len == 0 and q.aeth is not None and q.aeth.syndrome >> 5 == 0
               for q in rsp)  # fmt: skip
    assert not p.a.sq[p.a.sq_head :]


def _nak_case(
    p: Pair, wr: FlushWR | AtomicWriteWR
) -> tuple[IbWcStatus, list[tuple[AethType, int, int]]]:
    p.post(wr)
    p.run_until_completions(1)
    (wc,) = p.send_wcs()
    assert wc.opcode is (IbWcOpcode.FLUSH if isinstance(wr, FlushWR) else IbWcOpcode.ATOMIC_WRITE)
    return wc.status, naks(p.sent_b)


def test_flush_needs_the_mr_flush_access() -> None:
    p = _pair()
    remote = p.mem_b.reg(256)  # no FLUSH_GLOBAL
    status, nk = _nak_case(p, flush(1, remote.iova, remote.key, 64))
    assert status is IbWcStatus.REM_ACCESS_ERR
    assert nk == [(AethType.NAK, NakCode.REMOTE_ACCESS_ERR, 0x100)]


def test_flush_persistent_needs_its_own_access() -> None:
    """The upstream suite's ``test_qp_ex_rc_flush_type_violate``: the QP
    allows both placement types, the MR only GLOBAL."""
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    status, _ = _nak_case(p, flush(1, remote.iova, remote.key, 64, plt=2))
    assert status is IbWcStatus.REM_ACCESS_ERR
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    status, _ = _nak_case(p, flush(1, remote.iova, remote.key, 0, plt=3, sel=1))
    assert status is IbWcStatus.REM_ACCESS_ERR


def test_flush_needs_the_qp_flush_access() -> None:
    p = Pair()  # the responder's QP allows remote READ/WRITE/atomics only
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    status, nk = _nak_case(p, flush(1, remote.iova, remote.key, 64))
    assert status is IbWcStatus.REM_INV_REQ_ERR
    assert nk == [(AethType.NAK, NakCode.INVALID_REQUEST, 0x100)]


def test_flush_range_bounds_and_keys() -> None:
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    status, _ = _nak_case(p, flush(1, remote.iova + 200, remote.key, 64))
    assert status is IbWcStatus.REM_ACCESS_ERR
    # a whole-MR FLUSH checks the key, not the RETH range
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    status, _ = _nak_case(p, flush(1, 0, remote.key + 0x100, 0, sel=1))
    assert status is IbWcStatus.REM_ACCESS_ERR
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    status, _ = _nak_case(p, flush(1, remote.iova + (1 << 20), remote.key, 1 << 20, sel=1))
    assert status is IbWcStatus.SUCCESS


def test_reserved_feth_is_an_invalid_request() -> None:
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    bad = Packet.build(
        Opcode.RC_FLUSH,
        dest_qp=p.b.qpn,
        psn=0x100,
        ack_req=True,
        feth=Feth(4, 0),
        reth=Reth(remote.iova, remote.key, 8),
    )
    p.b.receive(bad, 0.0)
    out = p.b.poll(0.0)
    assert naks([q.pkt for q in out.packets]) == [(AethType.NAK, NakCode.INVALID_REQUEST, 0x100)]


def test_atomic_write_errors() -> None:
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    status, nk = _nak_case(p, awrite(1, remote.iova + 4, remote.key))
    assert status is IbWcStatus.REM_INV_REQ_ERR  # rxe RESPST_ERR_MISALIGNED_ATOMIC
    assert nk == [(AethType.NAK, NakCode.INVALID_REQUEST, 0x100)]
    assert remote[0:16] == bytes(16)
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    status, _ = _nak_case(p, awrite(1, remote.iova + 256, remote.key))
    assert status is IbWcStatus.REM_ACCESS_ERR
    p = _pair()
    remote = p.mem_b.reg(256, IbAccess.LOCAL_WRITE | IbAccess.REMOTE_READ)
    status, _ = _nak_case(p, awrite(1, remote.iova, remote.key))
    assert status is IbWcStatus.REM_ACCESS_ERR
    assert remote[0:8] == bytes(8)
    # the QP must allow remote writes
    p = Pair(b_kw={"qp_access_flags": IbAccess.REMOTE_READ})
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    status, _ = _nak_case(p, awrite(1, remote.iova, remote.key))
    assert status is IbWcStatus.REM_INV_REQ_ERR


def test_atomic_write_of_a_wrong_length_is_refused() -> None:
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    bad = Packet.build(
        Opcode.RC_ATOMIC_WRITE,
        dest_qp=p.b.qpn,
        psn=0x100,
        ack_req=True,
        reth=Reth(remote.iova, remote.key, 4),
        payload=b"1234",
    )
    p.b.receive(bad, 0.0)
    out = p.b.poll(0.0)
    assert naks([q.pkt for q in out.packets]) == [(AethType.NAK, NakCode.INVALID_REQUEST, 0x100)]
    assert remote[0:8] == bytes(8)


def test_lost_atomic_write_response_is_replayed_not_reexecuted() -> None:
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    p.ba = DropWhen(lambda q: q.bth.opcode == RESPONSE_ONLY, times=1)
    p.post(awrite(1, remote.iova + 8, remote.key, b"FIRST!!!"))
    p.step()
    p.step()
    assert remote[8:16] == b"FIRST!!!"
    remote.buf[8:16] = b"changed!"  # a local store after the remote one
    p.run_until_completions(1)
    (wc,) = p.send_wcs()
    wc_ok(wc, IbWcOpcode.ATOMIC_WRITE)
    assert remote[8:16] == b"changed!"  # the retried request was not executed again
    reqs = [q for q in p.sent_a if q.bth.opcode == Opcode.RC_ATOMIC_WRITE]
    assert len(reqs) == 2 and reqs[0].bth.psn == reqs[1].bth.psn
    assert p.b.resp.psn == 0x101


def test_lost_flush_response_is_retried() -> None:
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    p.ba = DropWhen(lambda q: q.bth.opcode == RESPONSE_ONLY, times=2)
    p.post(flush(1, remote.iova, remote.key, 256))
    p.post(flush(2, remote.iova, remote.key, 16))
    p.run_until_completions(2)
    assert [(w.wr_id, w.status) for w in p.send_wcs()] == [(1, IbWcStatus.SUCCESS),
                                                            (2, IbWcStatus.SUCCESS)]  # fmt: skip
    assert p.b.resp.psn == 0x102 and p.b.resp.msn == 2


def test_duplicate_without_a_resource_is_dropped() -> None:
    """A repeated FLUSH whose resource was recycled is a class D error:
    dropped, not answered (rxe duplicate_request)."""
    p = _pair(b_kw={"max_dest_rd_atomic": 1})
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    p.post(flush(1, remote.iova, remote.key, 16))
    p.post(awrite(2, remote.iova, remote.key))
    p.run_until_completions(2)
    first = next(q for q in p.sent_a if q.bth.opcode == Opcode.RC_FLUSH)
    before = len(p.sent_b)
    p.b.receive(first, p.now)
    assert not p.b.poll(p.now).packets and len(p.sent_b) == before


def test_a_plain_ack_does_not_complete_them() -> None:
    """Only their READ RESPONSE ONLY completes a FLUSH / ATOMIC WRITE; an
    ACKNOWLEDGE or a response with data is a bad response."""
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    p.post(flush(1, remote.iova, remote.key, 16))
    out = p.a.poll(0.0)
    (req,) = [q.pkt for q in out.packets]
    ack = Packet.build(Opcode.RC_ACKNOWLEDGE, dest_qp=p.a.qpn, psn=req.bth.psn, aeth=Aeth(31, 1))
    p.a.receive(ack, 0.0)
    assert not p.a.poll(0.0).completions
    bad = Packet.build(RESPONSE_ONLY, dest_qp=p.a.qpn, psn=req.bth.psn, aeth=Aeth(31, 1),
                       payload=b"data")  # fmt: skip
    p.a.receive(bad, 0.0)
    (c,) = p.a.poll(0.0).completions
    assert c.wc.status is IbWcStatus.BAD_RESP_ERR and c.wc.opcode is IbWcOpcode.FLUSH


def test_they_take_rd_atomic_credits() -> None:
    p = _pair(a_kw={"max_rd_atomic": 1})
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    p.post(flush(1, remote.iova, remote.key, 16))
    p.post(awrite(2, remote.iova, remote.key))
    p.post(flush(3, remote.iova, remote.key, 16))
    out = p.a.poll(0.0)
    assert [q.pkt.bth.opcode for q in out.packets] == [Opcode.RC_FLUSH]
    assert p.a.req.rd_atomic == 0
    p.run_until_completions(3)
    assert [w.status for w in p.send_wcs()] == [IbWcStatus.SUCCESS] * 3
    assert p.a.req.rd_atomic == 1


def test_no_responder_resources_is_an_invalid_request() -> None:
    p = _pair(b_kw={"max_dest_rd_atomic": 0})
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    status, _ = _nak_case(p, flush(1, remote.iova, remote.key, 16))
    assert status is IbWcStatus.REM_INV_REQ_ERR
    p = _pair(b_kw={"max_dest_rd_atomic": 0})
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    status, _ = _nak_case(p, awrite(1, remote.iova, remote.key))
    assert status is IbWcStatus.REM_INV_REQ_ERR


def test_over_the_wire_codec() -> None:
    p = _pair(wire=True)
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    p.post(awrite(1, remote.iova + 16, remote.key, b"\xff" * 8))
    p.post(flush(2, remote.iova, remote.key, 256, plt=1, sel=1))
    p.run_until_completions(2)
    assert [w.status for w in p.send_wcs()] == [IbWcStatus.SUCCESS] * 2
    assert remote[16:24] == b"\xff" * 8


def test_sge_list_is_not_used() -> None:
    """FLUSH and ATOMIC WRITE carry no local data: an SGE list is not read."""
    p = _pair()
    remote = p.mem_b.reg(256, FLUSH_ACCESS)
    wr = AtomicWriteWR(1, Op.ATOMIC_WRITE, (Sge(0xBAD, 8, 0xBAD),), remote_addr=remote.iova,
                       rkey=remote.key, atomic_wr=b"abcdefgh")  # fmt: skip
    p.post(wr)
    p.run_until_completions(1)
    wc_ok(p.send_wcs()[0], IbWcOpcode.ATOMIC_WRITE)
    assert remote[0:8] == b"abcdefgh"


def test_flush_is_answered_only_after_a_lost_write_is_placed() -> None:
    """The WRITE's last packet is lost: the FLUSH behind it is out of
    sequence and NAKed, and answered only after the retried WRITE landed."""
    p = _pair(mtu=256)
    remote = p.mem_b.reg(1024, FLUSH_ACCESS)
    src = p.mem_a.reg(768, fill=bytes(range(256)) * 3)
    p.ab = DropWhen(lambda q: q.bth.opcode == Opcode.RC_RDMA_WRITE_LAST, times=1)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=remote.iova, rkey=remote.key))
    p.post(flush(2, remote.iova, remote.key, 768))
    p.run_until_completions(2)
    assert [(w.wr_id, w.status) for w in p.send_wcs()] == [
        (1, IbWcStatus.SUCCESS),
        (2, IbWcStatus.SUCCESS),
    ]
    assert remote[0:768] == src[0:768]
    assert (AethType.NAK, NakCode.PSN_SEQ_ERR, 0x102) in naks(p.sent_b)
    # one answer to the FLUSH, after the WRITE's last packet was executed
    log = [(who, q.bth.opcode) for _t, who, q in p.log]
    answered = log.index(("b", RESPONSE_ONLY))
    last_write = max(i for i, x in enumerate(log) if x == ("a", Opcode.RC_RDMA_WRITE_LAST))
    assert last_write < answered and log.count(("b", RESPONSE_ONLY)) == 1
