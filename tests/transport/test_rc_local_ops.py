"""Local operations in send-queue order (REG_MR, LOCAL_INV), inline data,
signaling, solicited events and the fence.

Two RC engines back to back (:class:`.engine_harness.Pair`).
"""

from __future__ import annotations

from softrdma.transport.wqe import CqSide, QpFatal
from softrdma.verbs.enums import IbAccess, IbSendFlags, IbWcOpcode, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import RdmaWR, RecvWR, RegWR, SendWR, Sge

from .engine_harness import SIGNALED, DropWhen, Pair, opnames, pattern


def test_reg_mr_and_local_inv_in_send_queue_order() -> None:
    p = Pair()
    fast = p.mem_a.reg(256, fill=pattern(256), access=IbAccess(0))
    fast.valid = False  # a fast-reg MR starts invalid
    dst = p.mem_b.reg(256)
    new_key = fast.key | 0x5A
    p.post(RegWR(1, Op.REG_MR, key=new_key, access=IbAccess.LOCAL_WRITE))
    # Uses the key REG_MR just installed: only works if REG_MR ran first.
    p.post(
        RdmaWR(
            2, Op.RDMA_WRITE, (Sge(fast.iova, 256, new_key),), remote_addr=dst.iova, rkey=dst.key
        )
    )
    p.post(SendWR(3, Op.LOCAL_INV, invalidate_rkey=new_key))
    p.run_until_completions(3)
    wcs = p.send_wcs()
    assert [(wc.wr_id, wc.opcode, wc.status) for wc in wcs] == [
        (1, IbWcOpcode.REG_MR, IbWcStatus.SUCCESS),
        (2, IbWcOpcode.RDMA_WRITE, IbWcStatus.SUCCESS),
        (3, IbWcOpcode.LOCAL_INV, IbWcStatus.SUCCESS),
    ]
    assert dst[0:256] == fast[0:256]
    assert not fast.valid
    # After LOCAL_INV the key is dead: the next WRITE fails locally.
    p.post(
        RdmaWR(4, Op.RDMA_WRITE, (Sge(fast.iova, 16, new_key),), remote_addr=dst.iova, rkey=dst.key)
    )
    p.run_until_completions(4)
    assert p.send_wcs()[3].status is IbWcStatus.LOC_PROT_ERR
    assert [type(e) for e in p.events_a] == [QpFatal]


def test_local_inv_waits_for_earlier_wqes() -> None:
    """rxe_wqe_is_fenced(): LOCAL_INV runs only when everything before it has
    completed — the WRITE reading from the MR must finish first."""
    p = Pair()
    src = p.mem_a.reg(4096, fill=pattern(4096))
    dst = p.mem_b.reg(4096)
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.post(SendWR(2, Op.LOCAL_INV, invalidate_rkey=src.key))
    out = p.a.poll(0.0)
    assert not p.mem_a.invalidated and len(out.packets) == 4  # the WRITE went, LOCAL_INV waits
    for op in out.packets:
        p.b.receive(op.pkt, 0.0)
    for op in p.b.poll(0.0).packets:
        p.a.receive(op.pkt, 0.0)
    out = p.a.poll(0.0)
    assert p.mem_a.invalidated == [src.key]
    assert [c.wc.opcode for c in out.completions] == [IbWcOpcode.RDMA_WRITE, IbWcOpcode.LOCAL_INV]


def test_inline_data_is_captured_at_post_time() -> None:
    p = Pair()
    src = p.mem_a.reg(64, fill=b"A" * 64)
    dst = p.mem_b.reg(64)
    wr = RdmaWR(
        1,
        Op.RDMA_WRITE,
        (src.sge(),),
        send_flags=SIGNALED | IbSendFlags.INLINE,
        remote_addr=dst.iova,
        rkey=dst.key,
    )
    p.post(wr, inline=src[0:64])
    src.buf[:] = b"B" * 64  # the consumer reuses its buffer right after posting
    p.run_until_completions(1)
    assert dst[0:64] == b"A" * 64


def test_unsignaled_and_sq_sig_all() -> None:
    p = Pair(a_kw={"sq_sig_all": False})
    src = p.mem_a.reg(64)
    dst = p.mem_b.reg(64)
    for i in range(6):
        flags = SIGNALED if i in (2, 5) else IbSendFlags(0)
        p.post(
            RdmaWR(
                i, Op.RDMA_WRITE, (src.sge(),), send_flags=flags, remote_addr=dst.iova, rkey=dst.key
            )
        )
    p.run()
    assert [wc.wr_id for wc in p.send_wcs()] == [2, 5]
    # IB_SIGNAL_ALL_WR: every WQE completes.
    q = Pair(a_kw={"sq_sig_all": True})
    src = q.mem_a.reg(64)
    dst = q.mem_b.reg(64)
    for i in range(3):
        q.post(
            RdmaWR(
                i,
                Op.RDMA_WRITE,
                (src.sge(),),
                send_flags=IbSendFlags(0),
                remote_addr=dst.iova,
                rkey=dst.key,
            )
        )
    q.run()
    assert [wc.wr_id for wc in q.send_wcs()] == [0, 1, 2]


def test_unsignaled_error_still_completes() -> None:
    p = Pair()
    src = p.mem_a.reg(64)
    p.post(
        RdmaWR(
            1, Op.RDMA_WRITE, (src.sge(),), send_flags=IbSendFlags(0), remote_addr=0, rkey=0xBAD00
        )
    )
    p.run()
    (wc,) = p.send_wcs()
    assert wc.wr_id == 1 and wc.status is IbWcStatus.REM_ACCESS_ERR


def test_solicited_event_on_last_packet_only() -> None:
    p = Pair(mtu=256)
    src = p.mem_a.reg(600)
    rbuf = p.mem_b.reg(600)
    p.post_recv(RecvWR(1, (rbuf.sge(),)))
    p.post_recv(RecvWR(2, (rbuf.sge(),)))
    p.post(SendWR(1, Op.SEND, (src.sge(),), send_flags=SIGNALED | IbSendFlags.SOLICITED))
    p.post(SendWR(2, Op.SEND, (src.sge(0, 10),)))
    p.run_until_completions(2, 2)
    assert [q.bth.se for q in p.sent_a] == [False, False, True, False]
    recv = [c for c in p.comps_b if c.side is CqSide.RECV]
    assert [c.solicited for c in recv] == [True, False]


def test_fence_waits_for_outstanding_read() -> None:
    p = Pair()
    remote = p.mem_b.reg(4096, fill=pattern(4096))
    local = p.mem_a.reg(4096)
    p.post(RdmaWR(1, Op.RDMA_READ, (local.sge(),), remote_addr=remote.iova, rkey=remote.key))
    p.post(
        RdmaWR(
            2,
            Op.RDMA_WRITE,
            (local.sge(),),
            send_flags=SIGNALED | IbSendFlags.FENCE,
            remote_addr=remote.iova,
            rkey=remote.key,
        )
    )
    out = p.a.poll(0.0)
    assert opnames([o.pkt for o in out.packets]) == ["RDMA_READ_REQUEST"]
    assert not p.a.sq[p.a.sq_head + 1].started  # fenced behind the READ
    p.run_until_completions(2)
    # The WRITE sent back what the READ fetched: it waited for it.
    assert remote[0:4096] == local[0:4096] == pattern(4096)
    assert [wc.status for wc in p.send_wcs()] == [IbWcStatus.SUCCESS] * 2


def test_go_back_n_does_not_run_a_local_op_twice() -> None:
    """A REG_MR that ran between two RDMA WRITEs stays done when a lost
    packet of the first WRITE rewinds the requester to it (rxe's req_retry
    leaves finished WQEs alone): registering again would hand out a key the
    consumer may already have invalidated, and a real MR refuses a second
    registration while valid."""
    from softrdma.transport.opcodes import Opcode

    lose = DropWhen(lambda pkt: pkt.bth.opcode == Opcode.RC_RDMA_WRITE_MIDDLE)
    p = Pair(ab=lose)
    regs: list[int] = []
    reg_mr = p.mem_a.reg_mr

    def counted(wr: RegWR) -> None:
        regs.append(wr.key)
        reg_mr(wr)

    p.mem_a.reg_mr = counted  # type: ignore[method-assign]
    src = p.mem_a.reg(4096, fill=pattern(4096))
    fast = p.mem_a.reg(256, fill=pattern(256, seed=2), access=IbAccess(0))
    fast.valid = False
    dst = p.mem_b.reg(8192)
    new_key = fast.key | 0x5A
    p.post(RdmaWR(1, Op.RDMA_WRITE, (src.sge(),), remote_addr=dst.iova, rkey=dst.key))
    p.post(RegWR(2, Op.REG_MR, key=new_key, access=IbAccess.LOCAL_WRITE))
    p.post(
        RdmaWR(
            3,
            Op.RDMA_WRITE,
            (Sge(fast.iova, 256, new_key),),
            remote_addr=dst.iova + 4096,
            rkey=dst.key,
        )
    )
    p.run_until_completions(3)
    assert lose.dropped, "no packet was lost: the test shows nothing"
    assert [(wc.wr_id, wc.status) for wc in p.send_wcs()] == [
        (1, IbWcStatus.SUCCESS),
        (2, IbWcStatus.SUCCESS),
        (3, IbWcStatus.SUCCESS),
    ]
    assert regs == [new_key]
    assert dst[0:4096] == src[0:4096] and dst[4096:4352] == fast[0:256]
