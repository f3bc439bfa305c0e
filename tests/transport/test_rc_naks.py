"""Sequence NAKs, invalid requests, remote access and operational errors,
and local errors completing in order.

Two RC engines back to back (:class:`.engine_harness.Pair`).
"""

from __future__ import annotations

import pytest

from softrdma.transport.headers import AethType, NakCode, Reth
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.psn import psn_add
from softrdma.transport.wqe import CqSide, QpFatal
from softrdma.verbs.enums import IbAccess, IbEventType, IbQpState, IbWcOpcode, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR, Sge

from .engine_harness import QPN_B, DropWhen, Pair, fatal_events, naks, opnames, pattern, wc_ok
from .fakemem import ALL_ACCESS


def test_psn_sequence_nak_once_and_go_back_n() -> None:
    p = Pair(mtu=256)
    victim = psn_add(p.pa.sq_psn, 2)
    p.ab = DropWhen(lambda q: q.bth.psn == victim, times=1)
    n = 10 * 256
    src = p.mem_a.reg(n, fill=pattern(n))
    dst = p.mem_b.reg(n)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.run_until_completions(1)
    wc_ok(p.send_wcs()[0], IbWcOpcode.RDMA_WRITE)
    assert dst[0:n] == src[0:n]
    # One NAK for the seven packets after the gap, carrying the expected PSN.
    assert naks(p.sent_b) == [(AethType.NAK, NakCode.PSN_SEQ_ERR, victim)]
    # Go back N from the NAK'd PSN, resuming with MIDDLE packets (no RETH).
    resent = p.sent_a[10:]
    assert [q.bth.psn for q in resent] == [psn_add(victim, k) for k in range(8)]
    assert opnames(resent)[0] == "RDMA_WRITE_MIDDLE"
    assert p.now == 0.0  # no timeout needed
    assert p.mem_b.remote_writes == 10  # nothing written twice


@pytest.mark.parametrize(
    "opcode",
    [
        Opcode.RC_RDMA_WRITE_MIDDLE,
        Opcode.RC_RDMA_WRITE_LAST,
        Opcode.RC_SEND_MIDDLE,
        Opcode.RC_SEND_LAST,
    ],
)
def test_middle_or_last_without_first_is_invalid_request(opcode: Opcode) -> None:
    p = Pair(mtu=256)
    rbuf = p.mem_b.reg(256)
    p.post_recv(RecvWR(1, (rbuf.sge(),)))
    bad = Packet.build(opcode, dest_qp=QPN_B, psn=p.pb.rq_psn, payload=bytes(256), ack_req=True)
    p.b.receive(bad, 0.0)
    out = p.b.poll(0.0)
    pk = [o.pkt for o in out.packets]
    assert naks(pk) == [(AethType.NAK, NakCode.INVALID_REQUEST, p.pb.rq_psn)]
    (ev,) = out.events
    assert isinstance(ev, QpFatal) and ev.event is IbEventType.QP_REQ_ERR
    assert ev.status is IbWcStatus.REM_INV_REQ_ERR
    assert p.b.state is IbQpState.ERR and rbuf[0:256] == bytes(256)


def test_new_message_inside_open_send_is_invalid_request() -> None:
    p = Pair(mtu=256)
    rbuf = p.mem_b.reg(1024)
    p.post_recv(RecvWR(1, (rbuf.sge(),)))
    psn = p.pb.rq_psn
    p.b.receive(Packet.build(Opcode.RC_SEND_FIRST, dest_qp=QPN_B, psn=psn, payload=bytes(256)), 0.0)
    p.b.receive(Packet.build(Opcode.RC_SEND_ONLY, dest_qp=QPN_B, psn=psn + 1, payload=b"x"), 0.0)
    out = p.b.poll(0.0)
    assert naks([o.pkt for o in out.packets]) == [(AethType.NAK, NakCode.INVALID_REQUEST, psn + 1)]
    # The receive WQE being filled completes in error.
    (c,) = out.completions
    assert c.side is CqSide.RECV and c.wc.status is IbWcStatus.REM_INV_REQ_ERR


def test_wrong_length_first_packet_is_invalid_request() -> None:
    p = Pair(mtu=256)
    dst = p.mem_b.reg(1024)
    # FIRST must carry exactly one MTU.
    bad = Packet.build(
        Opcode.RC_RDMA_WRITE_FIRST,
        dest_qp=QPN_B,
        psn=p.pb.rq_psn,
        payload=bytes(100),
        reth=Reth(dst.iova, dst.key, 600),
    )
    p.b.receive(bad, 0.0)
    assert naks([o.pkt for o in p.b.poll(0.0).packets]) == [
        (AethType.NAK, NakCode.INVALID_REQUEST, p.pb.rq_psn)
    ]
    assert dst[0:1024] == bytes(1024)


VIOLATIONS = ["bad_rkey", "out_of_bounds", "no_permission"]


@pytest.mark.parametrize("kind", VIOLATIONS)
@pytest.mark.parametrize("op", ["write", "read", "atomic"])
def test_remote_access_violation(kind: str, op: str) -> None:
    p = Pair(mtu=256)
    need = {
        "write": IbAccess.REMOTE_WRITE,
        "read": IbAccess.REMOTE_READ,
        "atomic": IbAccess.REMOTE_ATOMIC,
    }[op]
    access = ALL_ACCESS & ~need if kind == "no_permission" else ALL_ACCESS
    target = p.mem_b.reg(4096, fill=pattern(4096, 9), access=IbAccess(access))
    before = target[0:4096]
    rkey = target.key ^ 0x100 if kind == "bad_rkey" else target.key
    # Out of bounds: the first MTU fits, the message does not — still nothing moves.
    va = target.iova + (4096 - 300 if kind == "out_of_bounds" else 0)
    if kind == "out_of_bounds" and op == "atomic":
        va = target.iova + 4096
    local = p.mem_a.reg(1000, fill=pattern(1000, 4))
    if op == "write":
        p.post(RdmaWR(1, Op.RDMA_WRITE, (local.sge(),), remote_addr=va, rkey=rkey))
    elif op == "read":
        p.post(RdmaWR(1, Op.RDMA_READ, (local.sge(),), remote_addr=va, rkey=rkey))
    else:
        p.post(
            AtomicWR(
                1,
                Op.ATOMIC_FETCH_AND_ADD,
                (local.sge(0, 8),),
                remote_addr=va,
                rkey=rkey,
                compare_add=1,
            )
        )
    # A second WQE behind it is flushed, not executed.
    p.post(RdmaWR(2, Op.RDMA_WRITE, (local.sge(),), remote_addr=target.iova, rkey=target.key))
    p.run()
    assert naks(p.sent_b) == [(AethType.NAK, NakCode.REMOTE_ACCESS_ERR, p.pa.sq_psn)]
    # The failed WQE, then the one behind it flushed by the QP's ERR.
    wc, flushed = p.send_wcs()
    assert wc.wr_id == 1 and wc.status is IbWcStatus.REM_ACCESS_ERR
    assert (flushed.wr_id, flushed.status) == (2, IbWcStatus.WR_FLUSH_ERR)
    (ea,) = fatal_events(p.events_a)
    assert ea.status is IbWcStatus.REM_ACCESS_ERR
    (eb,) = fatal_events(p.events_b)
    assert eb.event is IbEventType.QP_ACCESS_ERR and eb.status is IbWcStatus.REM_ACCESS_ERR
    assert target[0:4096] == before  # zero bytes changed
    assert p.mem_b.remote_writes == 0 and p.mem_b.atomic_count == 0
    assert local[0:1000] == pattern(1000, 4)  # nothing landed locally either


@pytest.mark.parametrize("op", ["write", "read", "atomic"])
def test_qp_access_flags_missing_is_invalid_request(op: str) -> None:
    need = {
        "write": IbAccess.REMOTE_WRITE,
        "read": IbAccess.REMOTE_READ,
        "atomic": IbAccess.REMOTE_ATOMIC,
    }[op]
    flags = (IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ | IbAccess.REMOTE_ATOMIC) & ~need
    p = Pair(b_kw={"qp_access_flags": IbAccess(flags)})
    target = p.mem_b.reg(64)
    local = p.mem_a.reg(64)
    if op == "atomic":
        p.post(
            AtomicWR(
                1,
                Op.ATOMIC_FETCH_AND_ADD,
                (local.sge(0, 8),),
                remote_addr=target.iova,
                rkey=target.key,
                compare_add=1,
            )
        )
    else:
        wr_op = Op.RDMA_WRITE if op == "write" else Op.RDMA_READ
        p.post(RdmaWR(1, wr_op, (local.sge(),), remote_addr=target.iova, rkey=target.key))
    p.run()
    assert p.send_wcs()[0].status is IbWcStatus.REM_INV_REQ_ERR
    assert fatal_events(p.events_b)[0].event is IbEventType.QP_REQ_ERR


def test_recv_buffer_too_small() -> None:
    p = Pair(mtu=256)
    src = p.mem_a.reg(1000)
    rbuf = p.mem_b.reg(300)
    p.post_recv(RecvWR(7, (rbuf.sge(),)))
    p.post(SendWR(1, Op.SEND, (src.sge(),)))
    p.run()
    assert p.send_wcs()[0].status is IbWcStatus.REM_INV_REQ_ERR
    (r,) = p.recv_wcs()
    assert r.wr_id == 7 and r.status is IbWcStatus.LOC_LEN_ERR
    assert naks(p.sent_b) == [(AethType.NAK, NakCode.INVALID_REQUEST, psn_add(p.pa.sq_psn, 1))]
    assert fatal_events(p.events_a) and fatal_events(p.events_b)


def test_recv_buffer_protection_fault_is_remote_operational_error() -> None:
    p = Pair()
    src = p.mem_a.reg(100)
    p.post_recv(RecvWR(7, (Sge(0x1000, 100, 0xBAD00),)))
    p.post(SendWR(1, Op.SEND, (src.sge(),)))
    p.run()
    assert p.send_wcs()[0].status is IbWcStatus.REM_OP_ERR
    (r,) = p.recv_wcs()
    assert r.status is IbWcStatus.LOC_PROT_ERR
    assert naks(p.sent_b) == [(AethType.NAK, NakCode.REMOTE_OP_ERR, p.pa.sq_psn)]
    assert fatal_events(p.events_b)[0].status is IbWcStatus.LOC_PROT_ERR


def test_local_gather_error_completes_in_order() -> None:
    p = Pair()
    src = p.mem_a.reg(100)
    dst = p.mem_b.reg(100)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.post(
        RdmaWR(2, Op.RDMA_WRITE, (Sge(src.iova, 100, 0xBAD00),), remote_addr=dst.iova, rkey=dst.key)
    )
    p.post(RdmaWR(3, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.run()
    assert [(wc.wr_id, wc.status) for wc in p.send_wcs()] == [
        (1, IbWcStatus.SUCCESS),
        (2, IbWcStatus.LOC_PROT_ERR),
        (3, IbWcStatus.WR_FLUSH_ERR),
    ]
    assert not fatal_events(p.events_b)  # the peer is not affected


def test_read_response_scatter_error() -> None:
    p = Pair()
    remote = p.mem_b.reg(100)
    small = p.mem_a.reg(50)
    p.post(
        RdmaWR(
            1,
            Op.RDMA_READ,
            (small.sge(), Sge(small.iova, 50, 0xBAD00)),
            remote_addr=remote.iova,
            rkey=remote.key,
        )
    )
    p.run()
    assert p.send_wcs()[0].status is IbWcStatus.LOC_PROT_ERR
