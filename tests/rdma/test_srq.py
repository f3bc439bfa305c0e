"""Shared receive queues end to end: several RC QPs (and a UD QP) of one
device taking receives from one SRQ, a multi-packet SEND keeping its WQE
while another QP takes the next, the limit event, exhaustion answered
with RNR NAKs, and the verbs' refusals (rxe_srq.c, rxe_resp.c
``get_srq_wqe``)."""

from __future__ import annotations

import errno
from dataclasses import dataclass

import pytest

from softrdma.fabric.inproc import Fabric
from softrdma.verbs.ah import AhAttr, create_ah
from softrdma.verbs.device import IbEvent
from softrdma.verbs.enums import (
    IbEventType,
    IbMtu,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbSrqAttrMask,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import PostError, VerbsError
from softrdma.verbs.qp import QpAttr, QpCap, QpInitAttr, QueuePair, connect_qp
from softrdma.verbs.srq import SharedReceiveQueue, SrqAttr, SrqInitAttr
from softrdma.verbs.wr import RecvWR, SendWR, Sge, UdWR
from tests.rdma.nodes import PAIRINGS, Buffer, Node, make_device, make_node

SLOT = 8192


@dataclass
class SrqSetup:
    fabric: Fabric
    senders: list[Node]
    rx: Node
    """The receiving device; ``rx.qp`` is unused, ``qps`` take from ``srq``."""
    srq: SharedReceiveQueue
    qps: list[QueuePair]
    events: list[IbEvent]
    buf: Buffer
    mr_lkey: int


def setup(
    kind_a: str = "cpu",
    kind_b: str = "cpu",
    *,
    nqps: int = 2,
    max_wr: int = 16,
    limit: int = 0,
    offload: bool = True,
    rnr_retry: int = 7,
    mtu: IbMtu | None = None,
) -> SrqSetup:
    fabric = Fabric(seed=1, offload=offload)
    dev_b = make_device(kind_b, fabric, "10.0.0.2")
    rx = make_node(dev_b)
    events: list[IbEvent] = []
    srq = dev_b.create_srq(
        rx.pd, SrqInitAttr(SrqAttr(max_wr, 2, limit), event_handler=events.append)
    )
    senders: list[Node] = []
    qps: list[QueuePair] = []
    for i in range(nqps):
        # One device per sender: their packets do not queue behind each other.
        dev_a = make_device(kind_a, fabric, f"10.0.0.{10 + i}")
        tx = make_node(dev_a)
        qp = dev_b.create_qp(
            rx.pd,
            QpInitAttr(IbQpType.RC, rx.cq, rx.cq, QpCap(max_send_wr=8), srq=srq,
                       event_handler=events.append),
        )  # fmt: skip
        connect_qp(tx.qp, dest_qp_num=qp.qp_num, dgid=dev_b.query_gid(), rnr_retry=rnr_retry,
                   path_mtu=mtu)  # fmt: skip
        connect_qp(qp, dest_qp_num=tx.qp.qp_num, dgid=dev_a.query_gid(), path_mtu=mtu)
        senders.append(tx)
        qps.append(qp)
    buf = Buffer(dev_b, SLOT * max_wr)
    mr = rx.pd.local_dma_lkey
    return SrqSetup(fabric, senders, rx, srq, qps, events, buf, mr)


def post_slots(s: SrqSetup, ids: range) -> None:
    s.srq.post_recv([RecvWR(i, (s.buf.sge(s.mr_lkey, i * SLOT, SLOT),)) for i in ids])


def send(tx: Node, data: bytes, wr_id: int = 1) -> None:
    buf = Buffer(tx.dev, len(data))
    buf.fill(data)
    tx.qp.post_send(SendWR(wr_id, IbWrOpcode.SEND, (buf.sge(tx.pd.local_dma_lkey),)))


@pytest.mark.parametrize(("kind_a", "kind_b"), PAIRINGS)
@pytest.mark.parametrize("offload", [True, False])
def test_qps_share_the_srq(kind_a: str, kind_b: str, offload: bool) -> None:
    s = setup(kind_a, kind_b, offload=offload)
    post_slots(s, range(4))
    # A 3-packet SEND on QP 0 and a 1-packet SEND on QP 1, then the reverse:
    # each message lands whole in the slot its first packet took.
    msgs = [bytes([0x10 + i]) * (5000 if i % 2 == 0 else 100) for i in range(4)]
    send(s.senders[0], msgs[0])
    send(s.senders[1], msgs[1])
    s.senders[0].wait_ok()
    s.senders[1].wait_ok()
    send(s.senders[1], msgs[2])
    send(s.senders[0], msgs[3])
    s.senders[1].wait_ok()
    s.senders[0].wait_ok()
    wcs = s.rx.wait_ok(4)
    got = {}
    for wc in wcs:
        assert wc.opcode == IbWcOpcode.RECV
        got[wc.wr_id] = (wc.qp_num, s.buf.read(wc.byte_len, wc.wr_id * SLOT))
    assert sorted(got) == [0, 1, 2, 3]
    assert sorted(d for _, d in got.values()) == sorted(msgs)
    assert {q for q, _ in got.values()} == {s.qps[0].qp_num, s.qps[1].qp_num}
    for qpn, data in got.values():
        idx = [qp.qp_num for qp in s.qps].index(qpn)
        assert data in ((msgs[0], msgs[3]) if idx == 0 else (msgs[1], msgs[2]))
    assert len(s.srq.hw) == 0


def test_interleaved_multi_packet_sends_keep_their_wqe() -> None:
    """QP 0's FIRST takes WQE 0; QP 1's whole message takes WQE 1 while QP
    0's message is still open; QP 0's rest still lands in WQE 0."""
    s = setup(offload=False, mtu=IbMtu.MTU_1024)
    s.fabric.link_rate = 1e8  # ~80 µs a packet: QP 0's message takes a while
    post_slots(s, range(2))
    big = bytes(range(256)) * 28  # 7 KiB: 7 packets at MTU 1024
    send(s.senders[0], big)
    s.rx.dev.progress(lambda: len(s.srq.hw) == 1)
    assert s.qps[0].hw.resp.wqe is not None  # type: ignore[attr-defined]
    send(s.senders[1], b"small")
    s.rx.dev.progress(lambda: len(s.srq.hw) == 0)
    # QP 1 took WQE 1 while QP 0's message was still open on WQE 0.
    assert s.qps[0].hw.resp.wqe is not None  # type: ignore[attr-defined]
    s.senders[0].wait_ok()
    s.senders[1].wait_ok()
    wcs = {wc.wr_id: wc for wc in s.rx.wait_ok(2)}
    assert wcs[0].qp_num == s.qps[0].qp_num
    assert s.buf.read(wcs[0].byte_len, 0) == big
    assert wcs[1].qp_num == s.qps[1].qp_num
    assert s.buf.read(wcs[1].byte_len, SLOT) == b"small"


def test_limit_event_fires_once_and_disarms() -> None:
    s = setup(limit=2)
    post_slots(s, range(4))
    for i in range(2):
        send(s.senders[0], b"x", i)
        s.senders[0].wait_ok()
    assert s.srq.query().srq_limit == 2
    assert not s.events  # 2 left: not below the limit
    send(s.senders[1], b"y")
    s.senders[1].wait_ok()
    lim = [e for e in s.events if e.event == IbEventType.SRQ_LIMIT_REACHED]
    assert len(lim) == 1 and lim[0].srq is s.srq
    assert s.srq.query() == SrqAttr(16, 2, 0)
    send(s.senders[1], b"z")
    s.senders[1].wait_ok()
    assert len(s.events) == 1  # disarmed: no second event
    # Re-armed at 1 with 0 left: fires at the next take only.
    post_slots(s, range(4, 6))
    s.srq.modify(SrqAttr(srq_limit=2), IbSrqAttrMask.LIMIT)
    send(s.senders[0], b"w")
    s.senders[0].wait_ok()
    assert len([e for e in s.events if e.event == IbEventType.SRQ_LIMIT_REACHED]) == 2
    assert len(s.rx.wait_ok(5)) == 5


def test_exhausted_srq_rnr_naks_then_recovers() -> None:
    s = setup(rnr_retry=7)
    send(s.senders[0], b"late")
    s.rx.dev.progress(lambda: s.rx.dev.stats["send_rnr_err"] >= 1)
    assert s.rx.dev.stats["send_rnr_err"] >= 1
    assert not s.senders[0].cq.poll(1)
    post_slots(s, range(1))
    s.senders[0].wait_ok()
    (wc,) = s.rx.wait_ok()
    assert s.buf.read(4, 0) == b"late"
    assert wc.qp_num == s.qps[0].qp_num


def test_exhausted_srq_without_rnr_retry_fails_the_sender() -> None:
    s = setup(rnr_retry=0)
    send(s.senders[0], b"nobody")
    (wc,) = s.senders[0].wait(1)
    assert wc.status == IbWcStatus.RNR_RETRY_EXC_ERR
    assert s.rx.dev.stats["send_rnr_err"] == 1


def test_error_state_flushes_held_wqe_and_reports_last_wqe() -> None:
    s = setup(offload=False)
    post_slots(s, range(3))
    send(s.senders[0], b"Q" * 5000)
    s.rx.dev.progress(lambda: len(s.srq.hw) == 2)  # FIRST took WQE 0
    assert s.qps[0].hw.resp.wqe is not None  # type: ignore[attr-defined]
    s.qps[0].modify(QpAttr(qp_state=IbQpState.ERR), IbQpAttrMask.STATE)
    (wc,) = s.rx.wait(1)
    assert (wc.wr_id, wc.status) == (0, IbWcStatus.WR_FLUSH_ERR)
    assert [e.event for e in s.events] == [IbEventType.LAST_WQE_REACHED]
    assert s.events[0].qp is s.qps[0]
    # The other WQEs stay on the SRQ for QP 1.
    assert len(s.srq.hw) == 2
    send(s.senders[1], b"still")
    s.senders[1].wait_ok()
    (wc,) = s.rx.wait_ok()
    assert wc.wr_id == 1 and wc.qp_num == s.qps[1].qp_num


def test_ud_qp_takes_from_srq() -> None:
    s = setup(nqps=0)
    dev_b = s.rx.dev
    ud = dev_b.create_qp(s.rx.pd, QpInitAttr(IbQpType.UD, s.rx.cq, s.rx.cq, srq=s.srq))
    for st, extra, m in (
        (IbQpState.INIT, QpAttr(pkey_index=0, port_num=1, qkey=0x11),
         IbQpAttrMask.PKEY_INDEX | IbQpAttrMask.PORT | IbQpAttrMask.QKEY),
        (IbQpState.RTR, QpAttr(), 0),
        (IbQpState.RTS, QpAttr(sq_psn=0), IbQpAttrMask.SQ_PSN),
    ):  # fmt: skip
        extra.qp_state = st
        ud.modify(extra, m | IbQpAttrMask.STATE)
    post_slots(s, range(2))
    ah = create_ah(s.rx.pd, AhAttr(dgid=dev_b.query_gid()))
    src = Buffer(dev_b, 64)
    src.fill(b"datagram")
    ud.post_send(
        UdWR(7, IbWrOpcode.SEND, (Sge(src.dma, 8, s.rx.pd.local_dma_lkey),),
             ah=ah, remote_qpn=ud.qp_num, remote_qkey=0x11)
    )  # fmt: skip
    wcs = s.rx.wait_ok(2)
    recv = next(wc for wc in wcs if wc.opcode == IbWcOpcode.RECV)
    assert recv.wr_id == 0 and recv.byte_len == 40 + 8
    assert s.buf.read(8, 40) == b"datagram"
    assert len(s.srq.hw) == 1


def test_verbs_refusals() -> None:
    s = setup(nqps=1, max_wr=4)
    with pytest.raises(PostError) as e:
        s.qps[0].post_recv(RecvWR(1, ()))
    assert e.value.errno == errno.EINVAL
    post_slots(s, range(3))
    with pytest.raises(PostError) as e:
        post_slots(s, range(3, 6))
    assert e.value.errno == errno.ENOMEM and e.value.bad_wr is not None
    assert isinstance(e.value.bad_wr, RecvWR)
    assert e.value.bad_wr.wr_id == 4 and len(s.srq.hw) == 4
    sge = s.buf.sge(s.mr_lkey, 0, 8)
    s.srq.modify(SrqAttr(max_wr=8), IbSrqAttrMask.MAX_WR)
    with pytest.raises(PostError) as e:
        s.srq.post_recv(RecvWR(9, (sge, sge, sge)))
    assert e.value.errno == errno.EINVAL
    for attr, mask in (
        (SrqAttr(max_wr=3), IbSrqAttrMask.MAX_WR),  # below the 4 queued
        (SrqAttr(srq_limit=9), IbSrqAttrMask.LIMIT),  # above max_wr
        (SrqAttr(), 0),
        (SrqAttr(), 4),
    ):
        with pytest.raises(VerbsError) as v:
            s.srq.modify(attr, mask)
        assert v.value.errno == errno.EINVAL
    with pytest.raises(VerbsError) as v:
        s.srq.destroy()
    assert v.value.errno == errno.EBUSY
    with pytest.raises(VerbsError) as v:
        s.rx.dev.create_srq(s.rx.pd, SrqInitAttr(SrqAttr(max_wr=0)))
    assert v.value.errno == errno.EINVAL
    other_pd = s.rx.dev.alloc_pd()
    with pytest.raises(VerbsError):
        s.rx.dev.create_qp(other_pd, QpInitAttr(IbQpType.RC, s.rx.cq, s.rx.cq, srq=s.srq))
    s.qps[0].destroy()
    s.srq.destroy()
    s.srq.destroy()  # idempotent
    with pytest.raises(VerbsError):
        s.srq.post_recv(RecvWR(1, ()))
