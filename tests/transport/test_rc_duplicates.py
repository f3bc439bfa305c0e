"""Duplicate requests: re-executed READs, replayed atomics, re-ACKed SENDs
and WRITEs.

Two RC engines back to back (:class:`.engine_harness.Pair`).
"""

from __future__ import annotations

from softrdma.transport.headers import Aeth
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.psn import psn_add
from softrdma.verbs.enums import IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR

from .engine_harness import QPN_A, DropWhen, Pair, opnames, pattern


def test_duplicate_read_is_reexecuted() -> None:
    p = Pair(mtu=256)
    remote = p.mem_b.reg(1024, fill=pattern(1024))
    local = p.mem_a.reg(1024)
    # Lose the whole first reply.
    p.ba = DropWhen(lambda q: q.bth.opcode in (0x0D, 0x0E, 0x0F), times=4)
    p.post(RdmaWR(1, Op.RDMA_READ, (local.sge(),), remote_addr=remote.iova, rkey=remote.key))
    p.step()
    p.step()
    assert p.mem_b.remote_reads == 4
    remote.buf[0:4] = b"NEW!"  # the re-executed READ sees current memory
    p.run_until_completions(1)
    assert p.mem_b.remote_reads == 8
    assert local[0:4] == b"NEW!" and local[4:1024] == remote[4:1024]
    reqs = [q for q in p.sent_a if q.bth.opcode == Opcode.RC_RDMA_READ_REQUEST]
    assert len(reqs) == 2 and reqs[0].bth.psn == reqs[1].bth.psn


def test_replayed_read_does_not_rewind_the_expected_psn() -> None:
    """READ, then SEND, both executed; the READ reply is lost so both are
    retried. Replaying the READ must not make the SEND look new again."""
    p = Pair(mtu=256)
    remote = p.mem_b.reg(512, fill=pattern(512))
    local = p.mem_a.reg(512)
    src = p.mem_a.reg(16, fill=b"S" * 16)
    rbuf = p.mem_b.reg(64)
    p.post_recv(RecvWR(1, (rbuf.sge(),)))
    p.post_recv(RecvWR(2, (rbuf.sge(),)))
    p.ba = DropWhen(lambda q: q.bth.opcode in (0x0D, 0x0F), times=2)
    p.post(RdmaWR(1, Op.RDMA_READ, (local.sge(),), remote_addr=remote.iova, rkey=remote.key))
    p.post(SendWR(2, Op.SEND, (src.sge(),)))
    p.run_until_completions(2)
    assert [wc.status for wc in p.send_wcs()] == [IbWcStatus.SUCCESS] * 2
    assert [wc.wr_id for wc in p.recv_wcs()] == [1]  # the SEND ran once
    assert local[0:512] == remote[0:512]


def test_partial_read_retry_asks_for_the_rest() -> None:
    p = Pair(mtu=256)
    remote = p.mem_b.reg(1024, fill=pattern(1024))
    local = p.mem_a.reg(1024)
    third = psn_add(p.pa.sq_psn, 2)
    p.ba = DropWhen(lambda q: q.bth.psn == third, times=1)
    p.post(RdmaWR(1, Op.RDMA_READ, (local.sge(),), remote_addr=remote.iova, rkey=remote.key))
    p.run_until_completions(1)
    assert local[0:1024] == remote[0:1024]
    reqs = [q for q in p.sent_a if q.bth.opcode == Opcode.RC_RDMA_READ_REQUEST]
    assert len(reqs) == 2
    retry = reqs[1]
    assert retry.bth.psn == third and retry.reth is not None
    assert (retry.reth.va, retry.reth.dma_len) == (remote.iova + 512, 512)
    # The responder replays from inside the READ: MIDDLE, LAST.
    assert opnames(p.sent_b[4:]) == ["RDMA_READ_RESPONSE_MIDDLE", "RDMA_READ_RESPONSE_LAST"]


def test_duplicate_atomic_replays_saved_result() -> None:
    p = Pair()
    target = p.mem_b.reg(8)
    target.buf[0:8] = (40).to_bytes(8, "little")
    res = p.mem_a.reg(8)
    p.ba = DropWhen(lambda q: q.bth.opcode == Opcode.RC_ATOMIC_ACKNOWLEDGE, times=2)
    p.post(
        AtomicWR(
            1,
            Op.ATOMIC_FETCH_AND_ADD,
            (res.sge(),),
            remote_addr=target.iova,
            rkey=target.key,
            compare_add=2,
        )
    )
    p.run_until_completions(1)
    assert len([q for q in p.sent_a if q.bth.opcode == Opcode.RC_FETCH_ADD]) == 3
    assert p.mem_b.atomic_count == 1  # executed once, replayed twice
    assert int.from_bytes(target[0:8], "little") == 42
    assert int.from_bytes(res[0:8], "little") == 40


def test_duplicate_send_and_write_reacked_not_reexecuted() -> None:
    p = Pair()
    src = p.mem_a.reg(100, fill=pattern(100))
    dst = p.mem_b.reg(100)
    rbuf = p.mem_b.reg(200)
    p.post_recv(RecvWR(1, (rbuf.sge(),)))
    p.post_recv(RecvWR(2, (rbuf.sge(),)))
    p.ba = DropWhen(lambda q: q.bth.opcode == Opcode.RC_ACKNOWLEDGE, times=2)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.post(SendWR(2, Op.SEND, (src.sge(),)))
    p.run_until_completions(2)
    assert p.mem_b.remote_writes == 1
    assert [wc.wr_id for wc in p.recv_wcs()] == [1]  # the second recv is untouched
    # The duplicates were ACKed with the last executed PSN (C9-105).
    acks = [q for q in p.sent_b if q.bth.opcode == Opcode.RC_ACKNOWLEDGE]
    assert acks[-1].bth.psn == psn_add(p.pa.sq_psn, 1)


def test_plain_ack_never_completes_an_atomic() -> None:
    """A re-ACK whose PSN is an atomic's must not complete the atomic without
    its result (rxe would)."""
    p = Pair()
    src = p.mem_a.reg(8)
    target = p.mem_b.reg(8)
    res = p.mem_a.reg(8)
    p.post(
        AtomicWR(
            1,
            Op.ATOMIC_FETCH_AND_ADD,
            (res.sge(),),
            remote_addr=target.iova,
            rkey=target.key,
            compare_add=9,
        )
    )
    out = p.a.poll(0.0)
    ack = Packet.build(
        Opcode.RC_ACKNOWLEDGE, dest_qp=QPN_A, psn=out.packets[0].pkt.bth.psn, aeth=Aeth.ack(1)
    )
    p.a.receive(ack, 0.0)
    assert not p.a.poll(0.0).completions
    del src
    for o in out.packets:
        p.b.receive(o.pkt, 0.0)
    p.run_until_completions(1)
    assert int.from_bytes(res[0:8], "little") == 0 and int.from_bytes(target[0:8], "little") == 9
