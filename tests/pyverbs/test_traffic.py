"""Traffic between two contexts of one device, on every device kind,
through the pyverbs API: RC SEND with immediate, RDMA WRITE / READ,
atomics, UD SEND, completion channels — data checked end to end."""

from __future__ import annotations

import socket
import struct

import pytest

from tests.pyverbs.conftest import KINDS

DEVICES = [pytest.param(f"dev0:{k}", id=k) for k in KINDS]


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_rc_send_write_read_atomic(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.wr import SGE, RecvWR, SendWR

    from pyverbs import _softrdma as sim
    from tests.pyverbs import helpers as h

    a, b = h.player(machine), h.player(machine)
    h.connect(a, b)
    # two contexts of one device share its QP numbers and keys
    assert a.qp.qp_num != b.qp.qp_num
    assert a.mr.lkey != b.mr.lkey and a.mr.rkey != b.mr.rkey

    # SEND with immediate: bytes and immediate arrive
    b.qp.post_recv(RecvWR(wr_id=1, num_sge=1, sg=[SGE(b.mr.buf, 4096, b.mr.lkey)]))
    a.mr.write(b"ping" * 700, 2800)
    a.qp.post_send(
        SendWR(
            wr_id=2,
            opcode=e.IBV_WR_SEND_WITH_IMM,
            num_sge=1,
            sg=[SGE(a.mr.buf, 2800, a.mr.lkey)],
            imm_data=socket.htonl(0x1234),
        )
    )
    (sent,) = a.poll()
    (recv,) = b.poll()
    assert (sent.status, sent.opcode, sent.wr_id) == (e.IBV_WC_SUCCESS, e.IBV_WC_SEND, 2)
    assert (recv.status, recv.opcode, recv.byte_len) == (e.IBV_WC_SUCCESS, e.IBV_WC_RECV, 2800)
    assert recv.wc_flags & e.IBV_WC_WITH_IMM and socket.ntohl(recv.imm_data) == 0x1234
    assert b.mr.read(2800, 0) == b"ping" * 700

    # RDMA WRITE into b at an offset, then READ it back into a
    a.mr.write(b"W" * 3000, 3000, 100)
    w = SendWR(
        wr_id=3, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[SGE(a.mr.buf + 100, 3000, a.mr.lkey)]
    )
    w.set_wr_rdma(b.mr.rkey, b.mr.buf + 5000)
    a.qp.post_send(w)
    assert a.poll()[0].status == e.IBV_WC_SUCCESS
    assert b.mr.read(3000, 5000) == b"W" * 3000
    b.mr.write(b"R" * 1500, 1500, 6000)
    r = SendWR(wr_id=4, opcode=e.IBV_WR_RDMA_READ, num_sge=1, sg=[SGE(a.mr.buf, 1500, a.mr.lkey)])
    r.set_wr_rdma(b.mr.rkey, b.mr.buf + 6000)
    a.qp.post_send(r)
    (wc,) = a.poll()
    assert (wc.status, wc.opcode, wc.byte_len) == (e.IBV_WC_SUCCESS, e.IBV_WC_RDMA_READ, 1500)
    assert a.mr.read(1500, 0) == b"R" * 1500

    # FETCH_AND_ADD on an 8-byte word of b; the original lands in a
    b.mr.write(struct.pack("<Q", 40), 8, 8000)
    f = SendWR(
        wr_id=5,
        opcode=e.IBV_WR_ATOMIC_FETCH_AND_ADD,
        num_sge=1,
        sg=[SGE(a.mr.buf + 16, 8, a.mr.lkey)],
    )
    f.set_wr_atomic(b.mr.rkey, b.mr.buf + 8000, 2)
    a.qp.post_send(f)
    assert a.poll()[0].status == e.IBV_WC_SUCCESS
    assert struct.unpack("<Q", a.mr.read(8, 16))[0] == 40
    assert struct.unpack("<Q", b.mr.read(8, 8000))[0] == 42
    a.ctx.close()
    b.ctx.close()
    # every registration was unmapped, and the DMA-API checker saw no misuse
    proc = sim.process()
    dev = proc.devices["dev0"].dma_device
    assert not proc.platform.dma_debug.live_mappings(dev)
    assert not proc.platform.dma_debug.reports
    assert proc.mm.pinned_vm == 0 and proc.mm.total_vm == 0


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_ud_send_carries_a_grh(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.wr import SGE, RecvWR, SendWR

    from tests.pyverbs import helpers as h

    a, b = h.player(machine, e.IBV_QPT_UD), h.player(machine, e.IBV_QPT_UD)
    assert a.qp.qp_state == b.qp.qp_state == e.IBV_QPS_RTS
    b.qp.post_recv(RecvWR(wr_id=7, num_sge=1, sg=[SGE(b.mr.buf, 40 + 512, b.mr.lkey)]))
    a.mr.write(b"u" * 512, 512)
    wr = SendWR(wr_id=8, num_sge=1, sg=[SGE(a.mr.buf, 512, a.mr.lkey)])
    wr.set_wr_ud(b.ah(), b.qp.qp_num, h.UD_QKEY)
    a.qp.post_send(wr)
    assert a.poll()[0].status == e.IBV_WC_SUCCESS
    (wc,) = b.poll()
    assert (wc.status, wc.byte_len, wc.src_qp) == (e.IBV_WC_SUCCESS, 40 + 512, a.qp.qp_num)
    assert wc.wc_flags & e.IBV_WC_GRH
    assert b.mr.read(512, 40) == b"u" * 512
    a.ctx.close()
    b.ctx.close()


@pytest.mark.parametrize("machine", [DEVICES[0]], indirect=True)
def test_completion_channel_delivers_events(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.cq import CQ, CompChannel
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import SGE, RecvWR, SendWR

    from tests.pyverbs import helpers as h

    a, b = h.player(machine), h.player(machine)
    channel = CompChannel(b.ctx)
    cq = CQ(b.ctx, 8, None, channel, 0)
    b.cq.close()  # closes b's QP with it: pyverbs closes dependants first
    assert b.qp.closed
    init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=QPCap(4, 4))
    b = h.Player(b.ctx, b.pd, cq, b.mr, QP(b.pd, init, QPAttr()))
    h.connect(a, b)
    cq.req_notify()
    b.qp.post_recv(RecvWR(wr_id=1, num_sge=1, sg=[SGE(b.mr.buf, 64, b.mr.lkey)]))
    a.qp.post_send(SendWR(wr_id=2, num_sge=1, sg=[SGE(a.mr.buf, 64, a.mr.lkey)]))
    assert channel.get_cq_event(cq) is cq
    cq.ack_events(1)
    assert b.poll()[0].status == e.IBV_WC_SUCCESS
    a.ctx.close()
    b.ctx.close()
    assert channel.closed and cq.closed


@pytest.mark.parametrize("machine", [DEVICES[1]], indirect=True)
def test_a_forked_child_has_its_own_machine(machine: str) -> None:
    """After fork the child works on its own copy of the machine (as it has
    its own copy of process memory): traffic there, nothing shared back."""
    import multiprocessing

    from tests.pyverbs import helpers as h

    parent = h.player(machine)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_traffic, args=(machine,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0
    # the parent's device did not see the child's QPs
    assert parent.qp.qp_num == h.player(machine).qp.qp_num - 1
    parent.ctx.close()


def _child_traffic(dev: str) -> None:
    import pyverbs.enums as e
    from pyverbs.wr import SGE, RecvWR, SendWR

    from tests.pyverbs import helpers as h

    a, b = h.player(dev), h.player(dev)
    h.connect(a, b)
    b.qp.post_recv(RecvWR(wr_id=1, num_sge=1, sg=[SGE(b.mr.buf, 8, b.mr.lkey)]))
    a.mr.write(b"forked!!", 8)
    a.qp.post_send(SendWR(wr_id=2, num_sge=1, sg=[SGE(a.mr.buf, 8, a.mr.lkey)]))
    ok = a.poll()[0].status == b.poll()[0].status == e.IBV_WC_SUCCESS
    raise SystemExit(0 if ok and b.mr.read(8, 0) == b"forked!!" else 1)


@pytest.mark.parametrize("machine", DEVICES[:2], indirect=True)
def test_inline_send_copies_at_post_time(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import SGE, RecvWR, SendWR

    from tests.pyverbs import helpers as h

    a, b = h.player(machine), h.player(machine)
    inline = SendWR(
        wr_id=5,
        num_sge=1,
        sg=[SGE(a.mr.buf, 32, a.mr.lkey)],
        send_flags=e.IBV_SEND_SIGNALED | e.IBV_SEND_INLINE,
    )
    a.qp.close()
    init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=a.cq, rcq=a.cq, cap=QPCap(4, 4, 1, 1, 64))
    a = h.Player(a.ctx, a.pd, a.cq, a.mr, QP(a.pd, init, QPAttr()))
    h.connect(a, b)
    b.qp.post_recv(RecvWR(wr_id=1, num_sge=1, sg=[SGE(b.mr.buf, 64, b.mr.lkey)]))
    a.mr.write(b"i" * 32, 32)
    a.qp.post_send(inline)
    a.mr.write(b"X" * 32, 32)  # after the post: not what is sent
    assert a.poll()[0].status == e.IBV_WC_SUCCESS
    assert b.poll()[0].byte_len == 32 and b.mr.read(32, 0) == b"i" * 32
    # more inline data than the QP takes: the WR is refused and named
    big = SendWR(
        wr_id=6, num_sge=1, sg=[SGE(a.mr.buf, 65, a.mr.lkey)], send_flags=e.IBV_SEND_INLINE
    )
    bad = SendWR()
    with pytest.raises(PyverbsRDMAError, match="Failed to post send"):
        a.qp.post_send(big, bad)
    assert bad.wr_id == 6
    a.ctx.close()
    b.ctx.close()


@pytest.mark.parametrize("machine", [DEVICES[0]], indirect=True)
def test_ud_reply_through_an_ah_from_the_completion(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.addr import AH
    from pyverbs.wr import SGE, RecvWR, SendWR

    from tests.pyverbs import helpers as h

    a, b = h.player(machine, e.IBV_QPT_UD), h.player(machine, e.IBV_QPT_UD)
    for p in (a, b):
        p.qp.post_recv(RecvWR(wr_id=1, num_sge=1, sg=[SGE(p.mr.buf, 40 + 64, p.mr.lkey)]))
    wr = SendWR(wr_id=2, num_sge=1, sg=[SGE(a.mr.buf + 1024, 64, a.mr.lkey)])
    wr.set_wr_ud(b.ah(), b.qp.qp_num, h.UD_QKEY)
    a.qp.post_send(wr)
    a.poll()
    (wc,) = b.poll()
    # b answers whoever sent it, from the GRH at the start of its buffer
    ah = AH(b.pd, wc=wc, grh=b.mr.buf, port_num=1)
    assert ah.ah_attr.dgid == a.ctx.query_gid(1, 0)
    b.mr.write(b"reply", 5, 1024)
    back = SendWR(wr_id=3, num_sge=1, sg=[SGE(b.mr.buf + 1024, 5, b.mr.lkey)])
    back.set_wr_ud(ah, wc.src_qp, h.UD_QKEY)
    b.qp.post_send(back)
    assert b.poll()[0].status == e.IBV_WC_SUCCESS
    assert a.poll()[0].byte_len == 45 and a.mr.read(5, 40) == b"reply"
    a.ctx.close()
    b.ctx.close()


@pytest.mark.parametrize("machine", [DEVICES[0]], indirect=True)
def test_sq_drained_event(machine: str) -> None:
    """RTS -> SQD with ``en_sqd_async_notify``: the context gets
    ``IBV_EVENT_SQ_DRAINED`` once the send queue is empty."""
    import pyverbs.enums as e
    from pyverbs.qp import QPAttr

    from tests.pyverbs import helpers as h

    a, b = h.player(machine), h.player(machine)
    h.connect(a, b)
    attr = QPAttr(qp_state=e.IBV_QPS_SQD)
    attr.en_sqd_async_notify = 1
    a.qp.modify(attr, e.IBV_QP_STATE | e.IBV_QP_EN_SQD_ASYNC_NOTIFY)
    event = a.ctx.get_async_event()
    assert event.event_type == e.IBV_EVENT_SQ_DRAINED
    event.ack()
    a.ctx.close()
    b.ctx.close()
