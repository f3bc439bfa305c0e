"""Two UC engines back to back (:class:`~softrdma.transport.uc.UcQp`):
SEND / WRITE with and without immediate segmented with the UC opcodes
(scapy's RoCE table as the oracle), no ACKs and no retransmission, a
lost packet dropping its message while the next one arrives, class D
drops that leave the QP in RTS, and hostile packets that never raise."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.contrib.roce import opcode as scapy_opcode

from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_MASK, psn_add
from softrdma.transport.srq import SharedRq
from softrdma.transport.uc import UcQp
from softrdma.transport.wqe import Completion, CqSide, QpFatal, SendWqe
from softrdma.verbs.enums import IbAccess, IbQpState, IbWcOpcode, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR, Sge, WorkCompletion

from .engine_harness import attr_for, pattern, to_state
from .fakemem import FakeMemory
from .strategies import packets

QPN_A, QPN_B = 0x31, 0x42


class UcPair:
    """QP A sends to QP B over a channel that may drop packets."""

    def __init__(self, mtu: int = 256, srq: SharedRq | None = None, psn: int = 0x10) -> None:
        self.mem_a, self.mem_b = FakeMemory(), FakeMemory()
        self.a = UcQp(QPN_A, self.mem_a, sq_sig_all=True)
        self.b = UcQp(QPN_B, self.mem_b, sq_sig_all=True, srq=srq)
        pa = attr_for(QPN_B, path_mtu=mtu, sq_psn=psn, rq_psn=0x99)
        self.pb = attr_for(QPN_A, path_mtu=mtu, sq_psn=0x99, rq_psn=psn)
        for st_ in (IbQpState.INIT, IbQpState.RTR, IbQpState.RTS):
            to_state(self.a, pa, st_)
            to_state(self.b, self.pb, st_)
        self.sent: list[Packet] = []
        self.comps_a: list[Completion] = []
        self.comps_b: list[Completion] = []
        self.b_sent: list[Packet] = []
        self.b_events: list[object] = []

    def post(self, wr: SendWR) -> None:
        self.a.post_send(SendWqe.from_wr(wr, sq_sig_all=True))

    def pump(self, keep: Callable[[int, Packet], bool] = lambda i, p: True) -> None:
        """Send what A has; deliver the packets ``keep`` lets through."""
        out = self.a.poll(0.0)
        self.comps_a += out.completions
        for op in out.packets:
            i = len(self.sent)
            self.sent.append(op.pkt)
            if keep(i, op.pkt):
                self.b.receive(Packet.decode(op.pkt.encode()), 0.0)
        ob = self.b.poll(0.0)
        self.comps_b += ob.completions
        self.b_sent += [op.pkt for op in ob.packets]
        self.b_events += ob.events

    def recv_wcs(self) -> list[WorkCompletion]:
        return [c.wc for c in self.comps_b if c.side is CqSide.RECV]

    def send_wcs(self) -> list[WorkCompletion]:
        return [c.wc for c in self.comps_a if c.side is CqSide.SEND]


def test_send_and_write_with_and_without_immediate() -> None:
    p = UcPair()
    rx = p.mem_b.reg(4096)
    dst = p.mem_b.reg(4096, access=IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE)
    for i in range(3):
        p.b.post_recv(RecvWR(i, (rx.sge(i * 1024, 1024),)))
    data = pattern(700)
    src = p.mem_a.reg(700, fill=data)
    p.post(SendWR(1, Op.SEND, (src.sge(),)))
    p.post(SendWR(2, Op.SEND_WITH_IMM, (src.sge(0, 10),), imm_data=0xABCD))
    p.post(RdmaWR(3, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.post(
        RdmaWR(4, Op.RDMA_WRITE_WITH_IMM, (src.sge(0, 5),), remote_addr=dst.iova + 1000,
               rkey=dst.key, imm_data=7)
    )  # fmt: skip
    p.pump()
    ops = [p.sent[i].bth.opcode for i in range(len(p.sent))]
    assert [Opcode(o).name for o in ops] == [
        "UC_SEND_FIRST", "UC_SEND_MIDDLE", "UC_SEND_LAST",
        "UC_SEND_ONLY_WITH_IMMEDIATE",
        "UC_RDMA_WRITE_FIRST", "UC_RDMA_WRITE_MIDDLE", "UC_RDMA_WRITE_LAST",
        "UC_RDMA_WRITE_ONLY_WITH_IMMEDIATE",
    ]  # fmt: skip
    for o in ops:  # scapy's table agrees on every UC opcode
        assert scapy_opcode("UC", Opcode(o).name.removeprefix("UC_"))[0] == o
    assert [q.bth.psn for q in p.sent] == list(range(0x10, 0x18))
    assert [q.bth.ack_req for q in p.sent] == [False, False, True, True, False, False, True, True]
    assert p.sent[4].reth is not None and p.sent[4].reth.dma_len == 700
    # Every send completes with no ACK; the responder never answers.
    assert [(wc.wr_id, wc.status) for wc in p.send_wcs()] == [
        (i, IbWcStatus.SUCCESS) for i in (1, 2, 3, 4)
    ]
    assert p.b_sent == []
    wcs = p.recv_wcs()
    assert [(wc.wr_id, wc.opcode, wc.byte_len, wc.imm_data) for wc in wcs] == [
        (0, IbWcOpcode.RECV, 700, 0),
        (1, IbWcOpcode.RECV, 10, 0xABCD),
        (2, IbWcOpcode.RECV_RDMA_WITH_IMM, 5, 7),
    ]
    assert rx[0:700] == data and rx[1024:1034] == data[:10]
    assert dst[0:700] == data and dst[1000:1005] == data[:5]


@pytest.mark.parametrize("lost", [0, 1, 2])
def test_a_lost_packet_drops_its_message_only(lost: int) -> None:
    """Losing FIRST, MIDDLE or LAST of message 1: it never completes and is
    never sent again; message 2 arrives whole in the same receive WQE."""
    p = UcPair()
    rx = p.mem_b.reg(2048)
    p.b.post_recv(RecvWR(1, (rx.sge(0, 1024),)))
    p.b.post_recv(RecvWR(2, (rx.sge(1024, 1024),)))
    one, two = pattern(600, 1), pattern(600, 2)
    s1, s2 = p.mem_a.reg(600, fill=one), p.mem_a.reg(600, fill=two)
    p.post(SendWR(1, Op.SEND, (s1.sge(),)))
    p.post(SendWR(2, Op.SEND, (s2.sge(),)))
    p.pump(lambda i, _: i != lost)
    assert len(p.sent) == 6  # 3 + 3 packets, nothing retransmitted
    assert [wc.status for wc in p.send_wcs()] == [IbWcStatus.SUCCESS] * 2
    (wc,) = p.recv_wcs()
    assert (wc.wr_id, wc.status, wc.byte_len) == (1, IbWcStatus.SUCCESS, 600)
    assert rx[0:600] == two
    assert p.b.state is IbQpState.RTS and p.b.rq_outstanding == 1
    for _ in range(3):  # no timer, nothing more comes
        assert p.a.next_deadline() is None
        p.pump()
    assert len(p.sent) == 6


def test_srq_message_cut_short_completes_in_error() -> None:
    """Class E: on an SRQ the WQE of a message cut short by the next FIRST
    completes with IB_WC_REM_INV_REQ_ERR; the next message takes another."""
    srq = SharedRq(0x40, 4, 1)
    p = UcPair(srq=srq)
    rx = p.mem_b.reg(2048)
    srq.post_recv(RecvWR(1, (rx.sge(0, 1024),)))
    srq.post_recv(RecvWR(2, (rx.sge(1024, 1024),)))
    s = p.mem_a.reg(600, fill=pattern(600))
    p.post(SendWR(1, Op.SEND, (s.sge(),)))
    p.post(SendWR(2, Op.SEND, (s.sge(),)))
    p.pump(lambda i, _: i != 2)  # message 1's LAST lost
    assert [(wc.wr_id, wc.status) for wc in p.recv_wcs()] == [
        (1, IbWcStatus.REM_INV_REQ_ERR),
        (2, IbWcStatus.SUCCESS),
    ]
    assert rx[1024 : 1024 + 600] == pattern(600)


def test_class_d_drops_keep_the_qp_in_rts() -> None:
    p = UcPair()
    dst = p.mem_b.reg(1024, access=IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE)
    ro = p.mem_b.reg(1024, access=IbAccess.LOCAL_WRITE)
    src = p.mem_a.reg(300, fill=pattern(300))
    p.post(SendWR(1, Op.SEND, (src.sge(),)))  # no receive WQE
    p.post(RdmaWR(2, Op.RDMA_WRITE, (src.sge(),), remote_addr=ro.iova, rkey=ro.key))
    p.post(RdmaWR(3, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova + 900, rkey=dst.key))
    p.post(RdmaWR(4, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.pump()
    assert [wc.status for wc in p.send_wcs()] == [IbWcStatus.SUCCESS] * 4
    assert p.b.out.counters["uc_msg_dropped"] == 3
    assert p.b.state is IbQpState.RTS and not p.b_events and not p.b_sent
    assert ro[0:300] == bytes(300) and dst[0:300] == pattern(300)


def test_local_error_fails_the_wqe_and_the_qp() -> None:
    p = UcPair()
    p.post(SendWR(1, Op.SEND, (p.mem_a.reg(64).sge(),)))
    good = p.mem_a.reg(64).sge()
    bad = SendWR(2, Op.SEND, (Sge(good.addr, good.length, 0xDEAD),))
    p.post(bad)
    p.post(SendWR(3, Op.SEND, ()))
    p.pump()
    assert [(wc.wr_id, wc.status) for wc in p.send_wcs()] == [
        (1, IbWcStatus.SUCCESS),
        (2, IbWcStatus.LOC_PROT_ERR),
        (3, IbWcStatus.WR_FLUSH_ERR),
    ]
    assert p.a.state is IbQpState.ERR


def test_error_and_reset() -> None:
    p = UcPair()
    rx = p.mem_b.reg(64)
    p.b.post_recv(RecvWR(1, (rx.sge(),)))
    to_state(p.b, p.pb, IbQpState.ERR)
    out = p.b.poll(0.0)
    assert [(c.wc.wr_id, c.wc.status) for c in out.completions] == [(1, IbWcStatus.WR_FLUSH_ERR)]
    to_state(p.b, p.pb, IbQpState.RESET)
    assert p.b.state is IbQpState.RESET and p.b.rq_outstanding == 0


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(packets(max_payload=600), min_size=1, max_size=12), st.integers(0, PSN_MASK))
def test_hostile_packets_never_raise(pkts: list[Packet], base: int) -> None:
    """Any decodable packet near the expected PSN: dropped or taken, never
    an exception; nothing is ever sent back; receives only complete."""
    p = UcPair(psn=base)
    rx = p.mem_b.reg(4 * 512)
    dst = p.mem_b.reg(1024, access=IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE)
    for i in range(4):
        p.b.post_recv(RecvWR(i, (rx.sge(i * 512, 512),)))
    for q in pkts:
        q.bth = q.bth._replace(psn=psn_add(base, q.bth.psn % 16 - 4))
        if q.reth is not None and q.bth.opcode & 1:
            q.reth = q.reth._replace(rkey=dst.key)
        p.b.receive(Packet.decode(q.encode()), 0.0)
        out = p.b.poll(0.0)
        assert not out.packets
        assert not [e for e in out.events if not isinstance(e, QpFatal)]
    assert p.b.state in (IbQpState.RTS, IbQpState.ERR)
