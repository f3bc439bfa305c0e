"""XRC INI and TGT engines back to back (sans-IO): SEND / WRITE / READ /
atomics through the RC engines with the XRC wire format, the receive WQE
and the keys taken from the XRC SRQ each request's XRCETH names, XRCETH
errors answered with a NAK and a completion error, and lossy links."""

from __future__ import annotations

import random
from typing import Any

import pytest

from softrdma.transport.errors import LocalProtocolError
from softrdma.transport.headers import Aeth, AethType, NakCode, XrcEth
from softrdma.transport.opcodes import Opcode, opcode_info
from softrdma.transport.packet import Packet
from softrdma.transport.wqe import Completion, CqSide, QpEvent, QpFatal, SendWqe
from softrdma.transport.xrc import XrcIniQp, XrcSrq, XrcTgtQp, xrc_packet, xrc_supports
from softrdma.verbs.enums import IbEventType, IbQpState, IbWcOpcode, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR, WorkCompletion

from .engine_harness import QPN_A, QPN_B, Channel, Lossy, attr_for, connect, pattern
from .fakemem import FakeMemory, FakeMr

SRQ_A, SRQ_B, SRQ_FOREIGN = 0x40, 0x41, 0x42
SLOT = 8192


class Xrc:
    """One XRC INI QP connected to one XRC TGT QP. The TGT's domain has two
    XRC SRQs (``SRQ_A``, ``SRQ_B``) whose PD is :attr:`mem_pd`; a third SRQ
    belongs to another XRC domain. The TGT's own memory port holds no MR
    (a TGT QP has no PD): anything that reaches it is a bug."""

    def __init__(
        self,
        *,
        mtu: int = 1024,
        ab: Channel | None = None,
        ba: Channel | None = None,
        **attr_kw: Any,
    ) -> None:
        self.mem_ini = FakeMemory()
        self.mem_pd = FakeMemory(next_index=0x100)
        self.mem_none = FakeMemory(next_index=0x200)
        self.xrcd = object()
        other = object()
        self.srqs = {
            SRQ_A: XrcSrq(SRQ_A, 64, 2, xrcd=self.xrcd, mem=self.mem_pd),
            SRQ_B: XrcSrq(SRQ_B, 64, 2, xrcd=self.xrcd, mem=self.mem_pd),
            SRQ_FOREIGN: XrcSrq(SRQ_FOREIGN, 64, 2, xrcd=other, mem=self.mem_pd),
        }
        self.ini = XrcIniQp(QPN_A, self.mem_ini, sq_sig_all=True)
        self.tgt = XrcTgtQp(QPN_B, self.mem_none, xrcd=self.xrcd, srq_lookup=self.srqs.get)
        connect(self.ini, attr_for(QPN_B, path_mtu=mtu, sq_psn=0x10, rq_psn=0x900, **attr_kw))
        connect(self.tgt, attr_for(QPN_A, path_mtu=mtu, sq_psn=0x900, rq_psn=0x10, **attr_kw))
        self.ab, self.ba = ab, ba
        self.now = 0.0
        self.send_wcs: list[WorkCompletion] = []
        self.recv: list[tuple[int, WorkCompletion]] = []  # (srqn, wc)
        self.ini_events: list[QpEvent] = []
        self.tgt_events: list[QpEvent] = []
        self.wire_ab: list[Packet] = []
        self.wire_ba: list[Packet] = []
        self.tgt_cq_side: list[Completion] = []

    def post(self, wr: SendWR) -> None:
        self.ini.post_send(SendWqe.from_wr(wr, sq_sig_all=True))

    def step(self) -> bool:
        oi = self.ini.poll(self.now)
        ot = self.tgt.poll(self.now)
        self.send_wcs += [c.wc for c in oi.completions if c.side is CqSide.SEND]
        assert not [c for c in oi.completions if c.side is CqSide.RECV]
        for c in ot.completions:
            srq = self.tgt.srq_of(c)
            if srq is None:
                self.tgt_cq_side.append(c)  # must stay empty: receives go to an SRQ's CQ
            else:
                assert c.side is CqSide.RECV
                self.recv.append((srq.srqn, c.wc))
        self.ini_events += oi.events
        self.tgt_events += ot.events
        # Through the codec: what goes on the wire is XRC, and decodes as such.
        pa = [Packet.decode(p.pkt.encode()) for p in oi.packets]
        pb = [Packet.decode(p.pkt.encode()) for p in ot.packets]
        self.wire_ab += pa
        self.wire_ba += pb
        busy = bool(oi or ot or pa or pb)
        if self.ab is not None:
            pa = self.ab(pa)
        if self.ba is not None:
            pb = self.ba(pb)
        for p in pa:
            self.tgt.receive(p, self.now)
        for p in pb:
            self.ini.receive(p, self.now)
        return busy or bool(getattr(self.ab, "held", None) or getattr(self.ba, "held", None))

    def run(self, max_steps: int = 200_000) -> None:
        for _ in range(max_steps):
            if self.step():
                continue
            deadlines = [
                d for d in (self.ini.next_deadline(), self.tgt.next_deadline()) if d is not None
            ]
            if not deadlines:
                return
            self.now = max(self.now, min(deadlines))
            if self.now > 3600:
                return
        raise AssertionError("pump did not settle")


def recv_slots(x: Xrc, srqn: int, n: int, first_id: int = 0) -> FakeMr:
    mr = x.mem_pd.reg(SLOT * n)
    for i in range(n):
        x.srqs[srqn].post_recv(RecvWR(first_id + i, (mr.sge(i * SLOT, SLOT),)))
    return mr


def send_wr(x: Xrc, wr_id: int, data: bytes, srqn: int, **kw: Any) -> SendWR:
    mr = x.mem_ini.reg(max(len(data), 1), fill=data.ljust(max(len(data), 1), b"\0"))
    sg = (mr.sge(0, len(data)),) if data else ()
    return SendWR(wr_id, kw.pop("opcode", Op.SEND), sg, xrc_remote_srqn=srqn, **kw)


def test_xrc_has_the_rc_operations_but_annex_a19() -> None:
    for op in (Op.SEND, Op.SEND_WITH_INV, Op.RDMA_WRITE_WITH_IMM, Op.RDMA_READ,
               Op.ATOMIC_CMP_AND_SWP, Op.REG_MR, Op.LOCAL_INV):  # fmt: skip
        assert xrc_supports(op)
    for op in (Op.FLUSH, Op.ATOMIC_WRITE):
        assert not xrc_supports(op)


def test_xrc_opcodes_are_rc_twins_with_xrceth_on_requests() -> None:
    for op in Opcode:
        if not op.name.startswith("XRC_"):
            continue
        x, rc = opcode_info(op), opcode_info(op & 0x1F)
        assert x.name == "IB_OPCODE_" + op.name and rc.opcode == op - 0xA0
        assert x.requires_ack == rc.is_request
        if rc.is_request:
            assert x.ext_headers[0].__name__ == "XrcEth" and x.offsets[0] == 12
            assert x.ext_headers[1:] == rc.ext_headers and x.length == rc.length + 4
        else:
            assert x.ext_headers == rc.ext_headers and x.length == rc.length


def test_send_lands_in_the_srq_the_xrceth_names() -> None:
    x = Xrc()
    a = recv_slots(x, SRQ_A, 2, 100)
    b = recv_slots(x, SRQ_B, 2, 200)
    x.post(send_wr(x, 1, b"to-b", SRQ_B))
    x.post(send_wr(x, 2, b"to-a!", SRQ_A, opcode=Op.SEND_WITH_IMM, imm_data=0xDEAD))
    x.run()
    assert [wc.status for wc in x.send_wcs] == [IbWcStatus.SUCCESS] * 2
    assert [(s, wc.wr_id, wc.byte_len, wc.qp_num) for s, wc in x.recv] == [
        (SRQ_B, 200, 4, QPN_B),
        (SRQ_A, 100, 5, QPN_B),
    ]
    assert x.recv[1][1].imm_data == 0xDEAD
    assert bytes(b.buf[:4]) == b"to-b" and bytes(a.buf[:5]) == b"to-a!"
    assert len(x.srqs[SRQ_A]) == len(x.srqs[SRQ_B]) == 1
    assert not x.tgt_cq_side
    reqs = [p for p in x.wire_ab]
    assert [Opcode(p.bth.opcode).name for p in reqs] == [
        "XRC_SEND_ONLY",
        "XRC_SEND_ONLY_WITH_IMMEDIATE",
    ]
    assert [p.xrceth.srqn for p in reqs if p.xrceth] == [SRQ_B, SRQ_A]
    assert x.wire_ba and all(p.bth.opcode == Opcode.XRC_ACKNOWLEDGE for p in x.wire_ba)
    assert all(p.xrceth is None for p in x.wire_ba)


def test_multi_packet_send_fills_one_wqe_of_its_srq() -> None:
    x = Xrc(mtu=256)
    rx = recv_slots(x, SRQ_B, 1, 7)
    data = pattern(1000)
    x.post(send_wr(x, 1, data, SRQ_B))
    x.run()
    assert x.send_wcs[0].status is IbWcStatus.SUCCESS
    assert [(s, wc.wr_id, wc.byte_len) for s, wc in x.recv] == [(SRQ_B, 7, 1000)]
    assert bytes(rx.buf[:1000]) == data
    names = [Opcode(p.bth.opcode).name for p in x.wire_ab]
    assert names == ["XRC_SEND_FIRST", "XRC_SEND_MIDDLE", "XRC_SEND_MIDDLE", "XRC_SEND_LAST"]
    assert {p.xrceth.srqn for p in x.wire_ab if p.xrceth} == {SRQ_B}


def test_write_read_atomics_use_the_srq_pd_keys() -> None:
    x = Xrc(mtu=256)
    target = x.mem_pd.reg(4096, fill=pattern(4096, 3))
    local = x.mem_ini.reg(4096)
    data = pattern(700, 9)
    src = x.mem_ini.reg(700, fill=data)
    x.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=target.iova + 64, rkey=target.key,
                  xrc_remote_srqn=SRQ_A))  # fmt: skip
    x.post(RdmaWR(2, Op.RDMA_READ, (local.sge(0, 900),), remote_addr=target.iova, rkey=target.key,
                  xrc_remote_srqn=SRQ_B))  # fmt: skip
    atom = x.mem_ini.reg(16)
    target.buf[2048:2056] = (5).to_bytes(8, "little")
    x.post(AtomicWR(3, Op.ATOMIC_FETCH_AND_ADD, (atom.sge(0, 8),), remote_addr=target.iova + 2048,
                    rkey=target.key, compare_add=10, xrc_remote_srqn=SRQ_A))  # fmt: skip
    x.post(AtomicWR(4, Op.ATOMIC_CMP_AND_SWP, (atom.sge(8, 8),), remote_addr=target.iova + 2048,
                    rkey=target.key, compare_add=15, swap=99, xrc_remote_srqn=SRQ_B))  # fmt: skip
    x.run()
    assert [(wc.wr_id, wc.status) for wc in x.send_wcs] == [
        (i, IbWcStatus.SUCCESS) for i in (1, 2, 3, 4)
    ]
    assert bytes(target.buf[64:764]) == data
    expect = bytearray(pattern(4096, 3))
    expect[64:764] = data
    assert bytes(local.buf[:900]) == bytes(expect[:900])
    assert int.from_bytes(atom.buf[0:8], "little") == 5
    assert int.from_bytes(atom.buf[8:16], "little") == 15
    assert int.from_bytes(target.buf[2048:2056], "little") == 99
    assert not x.recv  # no receive WQE consumed
    resp = [Opcode(p.bth.opcode).name for p in x.wire_ba if p.bth.opcode != Opcode.XRC_ACKNOWLEDGE]
    assert resp == [
        "XRC_RDMA_READ_RESPONSE_FIRST",
        "XRC_RDMA_READ_RESPONSE_MIDDLE",
        "XRC_RDMA_READ_RESPONSE_MIDDLE",
        "XRC_RDMA_READ_RESPONSE_LAST",
        "XRC_ATOMIC_ACKNOWLEDGE",
        "XRC_ATOMIC_ACKNOWLEDGE",
    ]


def test_rkey_of_another_pd_is_a_remote_access_error() -> None:
    x = Xrc()
    foreign = x.mem_ini.reg(64)  # registered, but not in the SRQ's PD
    src = x.mem_ini.reg(8, fill=b"12345678")
    x.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=foreign.iova, rkey=foreign.key,
                  xrc_remote_srqn=SRQ_A))  # fmt: skip
    x.run()
    assert [wc.status for wc in x.send_wcs] == [IbWcStatus.REM_ACCESS_ERR]
    assert bytes(foreign.buf[:8]) == bytes(8)
    assert [e.event for e in x.tgt_events if isinstance(e, QpFatal)] == [IbEventType.QP_ACCESS_ERR]


def _nak_codes(pkts: list[Packet]) -> list[tuple[AethType, int]]:
    return [
        (AethType(p.aeth.syndrome >> 5), p.aeth.syndrome & 0x1F)
        for p in pkts
        if p.aeth is not None and p.aeth.syndrome >> 5
    ]


@pytest.mark.parametrize("srqn", [SRQ_FOREIGN, 0x777])
def test_srq_outside_the_domain_naks_and_fails_the_request(srqn: int) -> None:
    x = Xrc()
    recv_slots(x, SRQ_FOREIGN, 1)
    recv_slots(x, SRQ_A, 1)
    x.post(send_wr(x, 1, b"nope", srqn))
    x.post(send_wr(x, 2, b"after", SRQ_A))
    x.run()
    assert [(wc.wr_id, wc.status) for wc in x.send_wcs] == [
        (1, IbWcStatus.REM_ACCESS_ERR),
        (2, IbWcStatus.WR_FLUSH_ERR),
    ]
    assert _nak_codes(x.wire_ba) == [(AethType.NAK, NakCode.REMOTE_ACCESS_ERR)]
    assert x.wire_ba[0].bth.opcode == Opcode.XRC_ACKNOWLEDGE
    fatal = [e for e in x.tgt_events if isinstance(e, QpFatal)]
    assert [e.event for e in fatal] == [IbEventType.QP_ACCESS_ERR]
    assert "XRCETH" in fatal[0].reason
    assert x.tgt.state is IbQpState.ERR and x.ini.state is IbQpState.ERR
    assert x.tgt.out.counters["rcv_xrceth_err"] == 1
    assert not x.recv and len(x.srqs[SRQ_FOREIGN]) == 1 and len(x.srqs[SRQ_A]) == 1


def test_empty_srq_is_rnr_then_delivers() -> None:
    x = Xrc(min_rnr_timer=1)
    x.post(send_wr(x, 1, b"late", SRQ_A))
    for _ in range(4):
        x.step()
    assert _nak_codes(x.wire_ba) and _nak_codes(x.wire_ba)[0][0] is AethType.RNR_NAK
    recv_slots(x, SRQ_A, 1, 50)
    x.run()
    assert [wc.status for wc in x.send_wcs] == [IbWcStatus.SUCCESS]
    assert [(s, wc.wr_id) for s, wc in x.recv] == [(SRQ_A, 50)]


@pytest.mark.parametrize("seed", range(4))
def test_lossy_links_deliver_every_message_once_into_its_srq(seed: int) -> None:
    rng = random.Random(seed)
    x = Xrc(
        mtu=256,
        ab=Lossy(random.Random(rng.random()), drop=0.1, dup=0.05, reorder=0.2, hold=0.05),
        ba=Lossy(random.Random(rng.random()), drop=0.1, dup=0.05, reorder=0.2),
        timeout=8,
    )
    recv_slots(x, SRQ_A, 16, 0)
    recv_slots(x, SRQ_B, 16, 100)
    sent: dict[int, tuple[int, bytes]] = {}
    for i in range(16):
        srqn = (SRQ_A, SRQ_B)[rng.randrange(2)]
        data = pattern(rng.randrange(0, 900), seed * 100 + i)
        sent[i] = (srqn, data)
        x.post(send_wr(x, i, data, srqn))
    x.run()
    assert sorted(wc.wr_id for wc in x.send_wcs) == list(range(16))
    assert all(wc.status is IbWcStatus.SUCCESS for wc in x.send_wcs)
    got = sorted((wc.wr_id, s, wc.byte_len) for s, wc in x.recv)
    assert len(got) == 16
    # WQEs of each SRQ are consumed in order, by the messages that name it.
    for srqn, base in ((SRQ_A, 0), (SRQ_B, 100)):
        msgs = [d for i, (s, d) in sorted(sent.items()) if s == srqn]
        wcs = sorted((wc for s, wc in x.recv if s == srqn), key=lambda wc: wc.wr_id)
        assert [wc.wr_id for wc in wcs] == list(range(base, base + len(msgs)))
        assert [wc.byte_len for wc in wcs] == [len(d) for d in msgs]
        assert all(wc.opcode is IbWcOpcode.RECV and wc.qp_num == QPN_B for wc in wcs)


@pytest.mark.parametrize("seed", range(3))
def test_lossy_links_with_reads_writes_and_atomics(seed: int) -> None:
    """Duplicated READs / atomics are answered from the TGT's resources
    (replayed, never re-executed), READ replies queue the requests behind
    them, and each request keeps the keys of the SRQ it names."""
    rng = random.Random(seed)
    x = Xrc(
        mtu=256,
        ab=Lossy(random.Random(rng.random()), drop=0.1, dup=0.1, reorder=0.2, hold=0.05),
        ba=Lossy(random.Random(rng.random()), drop=0.1, dup=0.1, reorder=0.2),
        timeout=8,
    )
    target = x.mem_pd.reg(8192, fill=pattern(8192, seed))
    expect = bytearray(target.buf)
    local = x.mem_ini.reg(8192)
    counter = target.iova + 8000
    target.buf[8000:8008] = bytes(8)
    expect[8000:8008] = bytes(8)
    reads: dict[int, tuple[int, int, int]] = {}  # wr_id -> (local off, remote off, len)
    for i in range(12):
        srqn = (SRQ_A, SRQ_B)[i % 2]
        kind = i % 3
        if kind == 0:
            data = pattern(600, 50 + i)
            off = 1024 * (i // 3)
            src = x.mem_ini.reg(len(data), fill=data)
            x.post(RdmaWR(i, Op.RDMA_WRITE, (src.sge(),), remote_addr=target.iova + off,
                          rkey=target.key, xrc_remote_srqn=srqn))  # fmt: skip
            expect[off : off + 600] = data
        elif kind == 1:
            loff, roff = 600 * (i // 3), 4096 + 100 * i
            x.post(RdmaWR(i, Op.RDMA_READ, (local.sge(loff, 600),), remote_addr=target.iova + roff,
                          rkey=target.key, xrc_remote_srqn=srqn))  # fmt: skip
            reads[i] = (loff, roff, 600)
        else:
            x.post(AtomicWR(i, Op.ATOMIC_FETCH_AND_ADD, (local.sge(7000 + 8 * (i // 3), 8),),
                            remote_addr=counter, rkey=target.key, compare_add=1,
                            xrc_remote_srqn=srqn))  # fmt: skip
    x.run()
    assert sorted(wc.wr_id for wc in x.send_wcs) == list(range(12))
    assert all(wc.status is IbWcStatus.SUCCESS for wc in x.send_wcs), x.send_wcs
    for loff, roff, n in reads.values():
        assert bytes(local.buf[loff : loff + n]) == bytes(expect[roff : roff + n])
    # four fetch-and-adds, each executed once whatever was duplicated
    assert int.from_bytes(target.buf[8000:8008], "little") == 4
    olds = sorted(
        int.from_bytes(local.buf[7000 + 8 * k : 7008 + 8 * k], "little") for k in range(4)
    )
    assert olds == [0, 1, 2, 3]
    expect[8000:8008] = (4).to_bytes(8, "little")
    assert bytes(target.buf) == bytes(expect)
    assert not x.recv


def test_requests_behind_a_long_read_reply_wait_and_keep_their_srq() -> None:
    """A READ longer than one reply burst leaves the requests behind it
    waiting, still XRC; each then takes the SRQ its own XRCETH names."""
    x = Xrc(mtu=256)
    target = x.mem_pd.reg(32768, fill=pattern(32768, 5))
    local = x.mem_ini.reg(32768)
    recv_slots(x, SRQ_B, 2, 70)
    x.post(RdmaWR(1, Op.RDMA_READ, (local.sge(0, 30000),), remote_addr=target.iova,
                  rkey=target.key, xrc_remote_srqn=SRQ_A))  # fmt: skip
    x.post(send_wr(x, 2, b"after the read", SRQ_B))
    x.post(send_wr(x, 3, b"and another", SRQ_B))
    x.step()  # the READ request and both SENDs reach the TGT together
    assert x.tgt.reply_pending() and len(x.tgt._pending) == 2
    assert len(x.tgt.out.packets) == 64  # one reply burst so far, no ACK for the SENDs
    x.run()
    assert [(wc.wr_id, wc.status) for wc in x.send_wcs] == [
        (i, IbWcStatus.SUCCESS) for i in (1, 2, 3)
    ]
    assert bytes(local.buf[:30000]) == bytes(target.buf[:30000])
    assert [(s, wc.wr_id, wc.byte_len) for s, wc in x.recv] == [(SRQ_B, 70, 14), (SRQ_B, 71, 11)]


def test_queues_that_do_not_exist_are_refused_and_foreign_packets_dropped() -> None:
    x = Xrc()
    with pytest.raises(LocalProtocolError):
        x.ini.post_recv(RecvWR(1))
    with pytest.raises(LocalProtocolError):
        x.tgt.post_recv(RecvWR(1))
    with pytest.raises(LocalProtocolError):
        x.tgt.post_send(SendWqe.from_wr(SendWR(1, Op.SEND)))
    with pytest.raises(LocalProtocolError):
        x.ini.post_send(SendWqe.from_wr(SendWR(1, Op.SEND, xrc_remote_srqn=1 << 24)))
    recv_slots(x, SRQ_A, 1)
    # An RC SEND to the TGT, and an XRC request to the INI, are dropped.
    rc = Packet.build(Opcode.RC_SEND_ONLY, dest_qp=QPN_B, psn=0x10, payload=b"rc", ack_req=True)
    x.tgt.receive(rc, 0.0)
    x.ini.receive(xrc_packet(rc, SRQ_A), 0.0)
    x.ini.receive(
        Packet.build(Opcode.RC_ACKNOWLEDGE, dest_qp=QPN_A, psn=0x10, aeth=Aeth.ack(0)), 0.0
    )
    assert not x.tgt.poll(0.0) and not x.ini.poll(0.0)
    assert len(x.srqs[SRQ_A]) == 1


def test_duplicate_with_a_bad_srq_is_only_a_duplicate() -> None:
    x = Xrc()
    recv_slots(x, SRQ_A, 2)
    x.post(send_wr(x, 1, b"once", SRQ_A))
    x.run()
    first = x.wire_ab[0]
    dup = Packet.build(
        first.bth.opcode, dest_qp=QPN_B, psn=first.bth.psn, payload=bytes(first.payload),
        ack_req=True, xrceth=XrcEth(0x777),
    )  # fmt: skip
    x.tgt.receive(dup, x.now)
    out = x.tgt.poll(x.now)
    assert x.tgt.state is IbQpState.RTS
    assert [p.pkt.bth.opcode for p in out.packets] == [Opcode.XRC_ACKNOWLEDGE]
    assert not _nak_codes([p.pkt for p in out.packets])
    assert len(x.recv) == 1 and len(x.srqs[SRQ_A]) == 1
