"""A QP's life on a device: destroyed with work outstanding, reset while
busy and reconnected with new PSNs, flushed in ERR and reused.

Kernel semantics: ``ib_destroy_qp`` generates no completions — posted work
requests simply go (rxe_qp.c ``rxe_qp_do_cleanup``); packets to a QP that
no longer exists are dropped and counted (rxe_recv.c, ``rx_no_qp`` here);
a modify to RESET empties both work queues without completions
(``rxe_qp_reset``); ERR completes everything outstanding with
``IB_WC_WR_FLUSH_ERR``, in order per work queue, and so does anything
posted in ERR (rxe_comp.c / rxe_resp.c flush paths)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.verbs.enums import (
    IbMtu,
    IbPdFlags,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.qp import QpAttr, QpCap, QpInitAttr, connect_qp
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR
from tests.rdma.helpers_device import (
    SIG,
    counters,
    delta,
    device_port,
    poll_all,
    port_stats,
    settle,
    statuses,
)
from tests.rdma.nodes import Buffer, Node, connect, pair

M = IbQpAttrMask
PSN_MAX = (1 << 24) - 1


def to_state(node: Node, state: IbQpState) -> None:
    node.qp.modify(QpAttr(qp_state=state), M.STATE)


@pytest.mark.parametrize("kinds", [("cpu", "hw-iommu"), ("hw-direct", "cpu")], ids="-".join)
def test_destroy_with_outstanding_work_completes_nothing(kinds: tuple[str, str]) -> None:
    fabric, a, b = pair(*kinds, min_rnr_timer=1, rnr_retry=7, timeout=10, retry_cnt=3)
    la = a.pd.local_dma_lkey
    src, sink = Buffer(a.dev, 4096), Buffer(a.dev, 4096)
    # b posts no receive: a's SENDs go round RNR NAK / retry forever (rnr_retry 7).
    a.qp.post_recv([RecvWR(100 + i, (sink.sge(la),)) for i in range(3)])
    a.qp.post_send(
        [SendWR(i, IbWrOpcode.SEND, (src.sge(la, 0, 64),), send_flags=SIG) for i in range(3)]
    )
    fabric.loop.run(until=fabric.loop.now + 0.0005)
    assert len(a.cq) == 0 and port_stats(fabric, b.dev).tx_frames > 2, "stuck in RNR NAKs"
    qpn = a.qp.qp_num
    a.qp.destroy()
    settle(fabric)
    assert poll_all(a.cq) == [], "ib_destroy_qp flushes nothing: the WRs are just gone"
    assert a.dev.qp_by_num(qpn) is None
    with pytest.raises(VerbsError) as err:
        a.qp.post_send(SendWR(9, IbWrOpcode.SEND, send_flags=SIG))
    assert err.value.errno == errno.EINVAL
    # The peer still talks to the old QPN: every try is dropped as rx_no_qp,
    # nothing is answered, and the peer's retries run out.
    before_a, sent_a = counters(a.dev), port_stats(fabric, a.dev).tx_frames
    msg = Buffer(b.dev, 64)
    b.qp.post_send(
        SendWR(7, IbWrOpcode.SEND, (msg.sge(b.pd.local_dma_lkey, 0, 8),), send_flags=SIG)
    )
    (wc,) = b.wait(1)
    assert (wc.wr_id, wc.status) == (7, IbWcStatus.RETRY_EXC_ERR)
    assert delta(counters(a.dev), before_a) == {"rx_no_qp": 1 + 3}, "first try + retry_cnt"
    assert port_stats(fabric, a.dev).tx_frames == sent_a
    assert poll_all(a.cq) == []
    # With its last QP gone the CQ and the PD can go too.
    a.cq.destroy()
    a.pd.dealloc()


def test_destroying_one_qp_leaves_the_qps_sharing_its_cq_alone() -> None:
    """Two QPs on one CQ; the one with SENDs stuck in RNR is destroyed: the
    other keeps working and the CQ only ever shows its completions; the CQ
    stays busy (``EBUSY``) until its last QP is gone."""
    fabric, a, b = pair("hw-iommu", "cpu", min_rnr_timer=1, rnr_retry=7)
    cq = a.cq
    cap = QpCap(max_send_wr=16, max_recv_wr=16, max_send_sge=2, max_recv_sge=2)
    other_a = a.dev.create_qp(a.pd, QpInitAttr(IbQpType.RC, cq, cq, cap))
    other_b = b.dev.create_qp(b.pd, QpInitAttr(IbQpType.RC, b.cq, b.cq, cap))
    connect_qp(other_a, dest_qp_num=other_b.qp_num, dgid=b.dev.query_gid())
    connect_qp(other_b, dest_qp_num=other_a.qp_num, dgid=a.dev.query_gid())
    la, lb = a.pd.local_dma_lkey, b.pd.local_dma_lkey
    src, sink = Buffer(a.dev, 4096), Buffer(b.dev, 4096)
    src.fill(b"keep going" * 400)
    a.qp.post_send(
        [SendWR(i, IbWrOpcode.SEND, (src.sge(la, 0, 64),), send_flags=SIG) for i in range(4)]
    )
    other_b.post_recv([RecvWR(50 + i, (sink.sge(lb, 64 * i, 64),)) for i in range(8)])
    other_a.post_send(
        [SendWR(10 + i, IbWrOpcode.SEND, (src.sge(la, 0, 64),), send_flags=SIG) for i in range(4)]
    )
    fabric.loop.run(until=fabric.loop.now + 0.0005)
    a.qp.destroy()
    other_a.post_send(
        [SendWR(20 + i, IbWrOpcode.SEND, (src.sge(la, 0, 64),), send_flags=SIG) for i in range(4)]
    )
    settle(fabric)
    wcs = poll_all(cq)
    assert {wc.qp_num for wc in wcs} == {other_a.qp_num}
    assert statuses(wcs) == [(i, IbWcStatus.SUCCESS) for i in (10, 11, 12, 13, 20, 21, 22, 23)]
    assert [wc.wr_id for wc in poll_all(b.cq)] == list(range(50, 58))
    with pytest.raises(VerbsError) as err:
        cq.destroy()
    assert err.value.errno == errno.EBUSY
    other_a.destroy()
    cq.destroy()


def test_reset_discards_work_and_the_qp_reconnects_with_new_psns() -> None:
    """Both ends go to RESET with a WRITE in flight and receives posted:
    nothing completes. Reconnected with new PSNs (a's wrapping through 0),
    the old incarnation's packets, delivered late, never execute, and new
    traffic lands in the receive posted after the reset."""
    fabric, a, b = pair(
        "hw-iommu", "cpu", pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY, mtu=IbMtu.MTU_1024
    )
    la, lb, rkey = a.pd.local_dma_lkey, b.pd.local_dma_lkey, b.pd.unsafe_global_rkey
    src, dst, back = Buffer(a.dev, 8192), Buffer(b.dev, 8192), Buffer(a.dev, 8192)
    dst.fill(bytes(8192))
    src.fill(b"1" * 8192)
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_WRITE,
            (src.sge(la, 0, 4096),),
            send_flags=SIG,
            remote_addr=dst.dma,
            rkey=rkey,
        )
    )
    a.wait_ok()
    # Work in flight when both ends are reset: a WRITE whose packets the
    # fabric loses (kept to be replayed later), a receive on each side.
    stale: list[bytes] = []

    def lose(frame: bytes) -> bool:
        stale.append(bytes(frame))
        return True

    loss = fabric.drop_when(lose)
    src.fill(b"2" * 8192)
    a.qp.post_send(
        RdmaWR(
            2,
            IbWrOpcode.RDMA_WRITE,
            (src.sge(la, 0, 4096),),
            send_flags=SIG,
            remote_addr=dst.dma + 4096,
            rkey=rkey,
        )
    )
    a.qp.post_recv(RecvWR(20, (back.sge(la),)))
    b.qp.post_recv(RecvWR(21, (dst.sge(lb, 0, 64),)))
    fabric.loop.run(until=fabric.loop.now + 1e-5)
    loss.remove()
    assert len(stale) == 4 and len(a.cq) == 0
    to_state(a, IbQpState.RESET)
    to_state(b, IbQpState.RESET)
    settle(fabric)
    assert poll_all(a.cq) == [] and poll_all(b.cq) == [], "RESET completes nothing"
    assert a.qp.state == b.qp.state == IbQpState.RESET
    # Reconnect both ends with new PSNs; a's send PSNs wrap through 0.
    connect(a, b, psn_a=PSN_MAX - 2, psn_b=0x123456, mtu=IbMtu.MTU_1024)
    attr, _ = a.qp.query()
    assert (attr.qp_state, attr.sq_psn, attr.rq_psn) == (IbQpState.RTS, PSN_MAX - 2, 0x123456)
    # The old incarnation's packets arrive late: they never execute.
    before = dst.read()
    for frame in stale:
        fabric.transmit(device_port(fabric, a.dev), frame)
    settle(fabric)
    assert dst.read() == before
    assert poll_all(a.cq) == [] and poll_all(b.cq) == []
    # New traffic: a WRITE across the PSN wrap, a SEND, a READ back.
    src.fill(b"3" * 8192)
    b.qp.post_recv(RecvWR(22, (dst.sge(lb, 0, 64),)))
    a.qp.post_send(
        [
            RdmaWR(
                3,
                IbWrOpcode.RDMA_WRITE,
                (src.sge(la),),
                send_flags=SIG,
                remote_addr=dst.dma,
                rkey=rkey,
            ),
            SendWR(4, IbWrOpcode.SEND, (src.sge(la, 0, 64),), send_flags=SIG),
            RdmaWR(
                5,
                IbWrOpcode.RDMA_READ,
                (back.sge(la),),
                send_flags=SIG,
                remote_addr=dst.dma,
                rkey=rkey,
            ),
        ]
    )
    assert [wc.wr_id for wc in a.wait_ok(3)] == [3, 4, 5]
    (got,) = b.wait_ok()
    assert (got.wr_id, got.byte_len) == (22, 64)
    assert back.read() == b"3" * 8192


def test_err_flushes_in_order_then_reset_and_reuse() -> None:
    """A QP moved to ERR with sends and receives outstanding flushes each
    exactly once, in order per queue; WRs posted in ERR flush at once; after
    RESET both ends reconnect and traffic flows."""
    fabric, a, b = pair("cpu", "hw-direct", pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    la = a.pd.local_dma_lkey
    buf = Buffer(a.dev, 4096)
    lost = fabric.drop_when(lambda frame: True)
    a.qp.post_recv([RecvWR(100 + i, (buf.sge(la, 64 * i, 64),)) for i in range(2)])
    a.qp.post_send(
        [
            SendWR(1, IbWrOpcode.SEND, (buf.sge(la, 0, 64),), send_flags=SIG),
            RdmaWR(
                2,
                IbWrOpcode.RDMA_WRITE,
                (buf.sge(la, 0, 64),),
                send_flags=SIG,
                remote_addr=0x1000,
                rkey=1,
            ),
            SendWR(3, IbWrOpcode.SEND, (buf.sge(la, 0, 64),), send_flags=SIG),
        ]
    )
    fabric.loop.run(until=fabric.loop.now + 1e-5)
    to_state(a, IbQpState.ERR)
    wcs = poll_all(a.cq)
    # Only wr_id, status and qp_num are defined in a flushed completion.
    sends = [wc for wc in wcs if wc.wr_id < 100]
    recvs = [wc for wc in wcs if wc.wr_id >= 100]
    assert {wc.qp_num for wc in wcs} == {a.qp.qp_num}
    flush = IbWcStatus.WR_FLUSH_ERR
    assert statuses(sends) == [(1, flush), (2, flush), (3, flush)]
    assert statuses(recvs) == [(100, flush), (101, flush)]
    # Posting in ERR completes at once with a flush error.
    a.qp.post_send(SendWR(4, IbWrOpcode.SEND, send_flags=SIG))
    a.qp.post_recv(RecvWR(102, ()))
    assert sorted(statuses(poll_all(a.cq))) == [(4, flush), (102, flush)]
    settle(fabric)
    assert poll_all(a.cq) == [], "each WR completes exactly once"
    lost.remove()
    to_state(a, IbQpState.RESET)
    to_state(b, IbQpState.RESET)
    connect(a, b, psn_a=0x777, psn_b=0xABCDEF)
    sink = Buffer(b.dev, 64)
    b.qp.post_recv(RecvWR(7, (sink.sge(b.pd.local_dma_lkey),)))
    buf.fill(b"second life")
    a.qp.post_send(SendWR(5, IbWrOpcode.SEND, (buf.sge(la, 0, 11),), send_flags=SIG))
    assert statuses(a.wait_ok()) == [(5, IbWcStatus.SUCCESS)]
    (got,) = b.wait_ok()
    assert (got.wr_id, got.byte_len, sink.read(11)) == (7, 11, b"second life")


PSNS = st.one_of(
    st.sampled_from([0, 1, PSN_MAX - 3, PSN_MAX, 1 << 23, (1 << 23) - 1]),
    st.integers(0, PSN_MAX),
)


@settings(max_examples=12, derandomize=True, deadline=None, database=None)
@given(first=st.tuples(PSNS, PSNS), second=st.tuples(PSNS, PSNS))
def test_reuse_after_reset_with_any_psns(first: tuple[int, int], second: tuple[int, int]) -> None:
    """Whatever PSNs the two incarnations use (the second need not be
    "after" the first), a multi-packet SEND, WRITE and READ work after a
    RESET; the responder's duplicate detection starts over."""
    _fabric, a, b = pair(
        "cpu",
        "hw-iommu",
        pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY,
        mtu=IbMtu.MTU_1024,
        psn_a=first[0],
        psn_b=first[1],
    )
    for round_, (psn_a, psn_b) in enumerate((first, second)):
        if round_:
            for node in (a, b):
                to_state(node, IbQpState.RESET)
            connect(a, b, psn_a=psn_a, psn_b=psn_b, mtu=IbMtu.MTU_1024)
        _traffic(a, b, round_)
        _traffic(b, a, round_)
    assert not [k for k in counters(a.dev) | counters(b.dev) if k.startswith("rx_")]


def _traffic(a: Node, b: Node, round_: int) -> None:
    la, lb = a.pd.local_dma_lkey, b.pd.local_dma_lkey
    data = bytes([round_ + 1]) * 5000
    src, dst, back = Buffer(a.dev, 5000), Buffer(b.dev, 5000), Buffer(a.dev, 5000)
    src.fill(data)
    b.qp.post_recv(RecvWR(1, (dst.sge(lb),)))
    a.qp.post_send(
        [
            SendWR(1, IbWrOpcode.SEND, (src.sge(la),), send_flags=SIG),
            RdmaWR(
                2,
                IbWrOpcode.RDMA_WRITE,
                (src.sge(la),),
                send_flags=SIG,
                remote_addr=dst.dma,
                rkey=b.pd.unsafe_global_rkey,
            ),
            RdmaWR(
                3,
                IbWrOpcode.RDMA_READ,
                (back.sge(la),),
                send_flags=SIG,
                remote_addr=dst.dma,
                rkey=b.pd.unsafe_global_rkey,
            ),
        ]
    )
    assert [wc.wr_id for wc in a.wait_ok(3)] == [1, 2, 3]
    (got,) = b.wait_ok()
    assert got.byte_len == 5000
    assert back.read() == data
