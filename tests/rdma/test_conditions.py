"""RNR, retry exhaustion, CQ overflow, SQD, UD with Q_Keys, and the pcap
tap on real device traffic."""

from __future__ import annotations

from pathlib import Path

import pytest

from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.verbs.ah import AhAttr, create_ah
from softrdma.verbs.enums import (
    IbEventType,
    IbMtu,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbSendFlags,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.qp import QpAttr, QpInitAttr
from softrdma.verbs.wr import RecvWR, SendWR, UdWR
from tests.rdma.nodes import Buffer, Node, connect, make_device, make_node, pair
from tests.tshark import bth_fields, needs_tshark

M = IbQpAttrMask


def test_rnr_retry_then_success_when_a_receive_is_posted() -> None:
    fabric, a, b = pair("cpu", "hw-direct", min_rnr_timer=1, rnr_retry=7)
    src, sink = Buffer(a.dev, 64), Buffer(b.dev, 64)
    src.fill(b"late receiver")
    a.qp.post_send(SendWR(1, IbWrOpcode.SEND, (src.sge(a.pd.local_dma_lkey, 0, 13),)))
    fabric.loop.run(until=fabric.loop.now + 0.001)  # several RNR NAKs and retries
    assert len(a.cq) == 0 and fabric.stats.delivered > 4, "RNR NAKs went back and forth"
    b.qp.post_recv(RecvWR(9, (sink.sge(b.pd.local_dma_lkey),)))
    a.wait_ok()
    (wc,) = b.wait_ok()
    assert wc.byte_len == 13 and sink.read(13) == b"late receiver"


def test_rnr_retry_exceeded() -> None:
    fabric, a, _b = pair("hw-iommu", "cpu", min_rnr_timer=1, rnr_retry=2)
    src = Buffer(a.dev, 64)
    t0 = fabric.loop.now
    a.qp.post_send(SendWR(1, IbWrOpcode.SEND, (src.sge(a.pd.local_dma_lkey, 0, 8),)))
    (wc,) = a.wait(1)
    assert wc.status == IbWcStatus.RNR_RETRY_EXC_ERR
    assert fabric.loop.now - t0 >= 2 * 10e-6, "waited the RNR timer (code 1 = 10 us) between tries"
    assert a.qp.state == IbQpState.ERR


def test_retry_exceeded_when_the_peer_vanishes() -> None:
    fabric, a, _b = pair("cpu", "cpu", timeout=10, retry_cnt=3)
    fabric.set_faults(drop=1.0)
    src = Buffer(a.dev, 64)
    a.qp.post_send(SendWR(1, IbWrOpcode.SEND, (src.sge(a.pd.local_dma_lkey, 0, 8),)))
    (wc,) = a.wait(1)
    assert wc.status == IbWcStatus.RETRY_EXC_ERR
    expected = 4 * 4.096e-6 * (1 << 10)  # first try + 3 retries, each waiting the local ACK timeout
    assert fabric.loop.now >= expected * 0.99
    assert fabric.stats.dropped == 4


def test_cq_overflow_raises_an_async_event() -> None:
    fabric = Fabric()
    a = make_node(make_device("cpu", fabric, "10.0.0.1"), cqe=2)
    b = make_node(make_device("cpu", fabric, "10.0.0.2"))
    connect(a, b)
    events = []
    a.dev.register_event_handler(lambda e: events.append(e.event))
    src = Buffer(a.dev, 64)
    for i in range(4):
        b.qp.post_recv(RecvWR(i, (Buffer(b.dev, 64).sge(b.pd.local_dma_lkey),)))
        a.qp.post_send(SendWR(i, IbWrOpcode.SEND, (src.sge(a.pd.local_dma_lkey, 0, 8),)))
    fabric.loop.run()
    assert IbEventType.CQ_ERR in events and a.cq.overflowed
    assert len(a.cq.poll(10)) == 2


def test_sqd_drains_and_notifies() -> None:
    fabric, a, b = pair("cpu", "cpu")
    events = []
    a.dev.register_event_handler(lambda e: events.append(e.event))
    src, sink = Buffer(a.dev, 8192), Buffer(b.dev, 8192)
    b.qp.post_recv(RecvWR(1, (sink.sge(b.pd.local_dma_lkey),)))
    a.qp.post_send(SendWR(1, IbWrOpcode.SEND, (src.sge(a.pd.local_dma_lkey),)))
    a.qp.modify(
        QpAttr(qp_state=IbQpState.SQD, en_sqd_async_notify=True), M.STATE | M.EN_SQD_ASYNC_NOTIFY
    )
    fabric.loop.run()
    assert IbEventType.SQ_DRAINED in events
    a.qp.modify(QpAttr(qp_state=IbQpState.RTS), M.STATE)
    a.wait_ok()


def ud_node(dev: RoceDevice, qkey: int) -> Node:
    pd = dev.alloc_pd()
    cq = dev.create_cq(16)
    qp = dev.create_qp(pd, QpInitAttr(IbQpType.UD, cq, cq))
    qp.modify(QpAttr(qp_state=IbQpState.INIT, qkey=qkey), M.STATE | M.PKEY_INDEX | M.PORT | M.QKEY)
    qp.modify(QpAttr(qp_state=IbQpState.RTR), M.STATE)
    qp.modify(QpAttr(qp_state=IbQpState.RTS, sq_psn=0), M.STATE | M.SQ_PSN)
    return Node(dev, pd, cq, qp)


@pytest.mark.parametrize("kinds", [("cpu", "hw-iommu"), ("hw-swiotlb", "hw-direct")], ids="-".join)
def test_ud_send_with_qkey_and_grh(kinds: tuple[str, str]) -> None:
    fabric = Fabric()
    a = ud_node(make_device(kinds[0], fabric, "10.0.0.1"), 0x1111)
    b = ud_node(make_device(kinds[1], fabric, "10.0.0.2"), 0x2222)
    ah = create_ah(a.pd, AhAttr(dgid=b.dev.query_gid()))
    src, sink = Buffer(a.dev, 4096), Buffer(b.dev, 4096)
    src.fill(b"datagram")
    lb = b.pd.local_dma_lkey
    b.qp.post_recv([RecvWR(1, (sink.sge(lb),)), RecvWR(2, (sink.sge(lb),))])
    sge = src.sge(a.pd.local_dma_lkey, 0, 8)
    a.qp.post_send(
        UdWR(1, IbWrOpcode.SEND, (sge,), ah=ah, remote_qpn=b.qp.qp_num, remote_qkey=0x9999)
    )
    a.qp.post_send(
        UdWR(
            2,
            IbWrOpcode.SEND_WITH_IMM,
            (sge,),
            imm_data=5,
            ah=ah,
            remote_qpn=b.qp.qp_num,
            remote_qkey=0x2222,
        )
    )
    a.wait_ok(2)
    (wc,) = b.wait_ok(1)
    assert wc.wr_id == 1, "the wrong Q_Key was dropped, the right one consumed the first receive"
    assert wc.opcode == IbWcOpcode.RECV and wc.src_qp == a.qp.qp_num
    assert wc.wc_flags & IbWcFlags.GRH and wc.wc_flags & IbWcFlags.WITH_IMM and wc.imm_data == 5
    assert wc.byte_len == 40 + 8
    # RoCEv2 over IPv4: the 40-byte GRH slot holds the IPv4 header in its
    # last 20 bytes (rdma_network_hdr.roce4grh), as rxe delivers it.
    grh = sink.read(48)
    ip = grh[20:40]
    assert ip[0] == 0x45 and ip[12:16] == a.dev.ip.packed and ip[16:20] == b.dev.ip.packed
    assert grh[40:] == b"datagram"


@pytest.mark.parametrize(("netdev_mtu", "ok"), [(4200, True), (1500, False)])
def test_ud_message_size_is_bounded_by_the_port_mtu(netdev_mtu: int, ok: bool) -> None:
    """rxe's ``get_mtu``: a UD send may carry up to the port's active MTU
    (4096 on a 4200-byte netdev, 1024 on a 1500-byte one), not a path MTU."""
    fabric = Fabric()
    a = ud_node(make_device("cpu", fabric, "10.0.0.1", netdev_mtu=netdev_mtu), 0x1111)
    b = ud_node(make_device("hw-iommu", fabric, "10.0.0.2", netdev_mtu=netdev_mtu), 0x1111)
    ah = create_ah(a.pd, AhAttr(dgid=b.dev.query_gid()))
    src, sink = Buffer(a.dev, 8192), Buffer(b.dev, 8192)
    src.fill(bytes(range(256)) * 16)
    b.qp.post_recv([RecvWR(1, (sink.sge(b.pd.local_dma_lkey),))])
    sge = src.sge(a.pd.local_dma_lkey, 0, 4096)
    a.qp.post_send(
        UdWR(1, IbWrOpcode.SEND, (sge,), ah=ah, remote_qpn=b.qp.qp_num, remote_qkey=0x1111)
    )
    if ok:
        a.wait_ok(1)
        (wc,) = b.wait_ok(1)
        assert wc.byte_len == 40 + 4096 and sink.read(40 + 4096)[40:] == src.read(4096)
    else:
        fabric.loop.run()
        (wc,) = a.cq.poll(1)
        assert wc.status == IbWcStatus.LOC_LEN_ERR and not b.cq.poll(1)


@needs_tshark
def test_pcap_tap_of_device_traffic_decodes_in_tshark(tmp_path: Path) -> None:
    fabric, a, b = pair("cpu", "hw-iommu", mtu=IbMtu.MTU_1024)
    path = tmp_path / "rdma.pcap"
    with fabric.tap(path):
        src, sink = Buffer(a.dev, 3000), Buffer(b.dev, 3000)
        b.qp.post_recv(RecvWR(1, (sink.sge(b.pd.local_dma_lkey),)))
        a.qp.post_send(SendWR(1, IbWrOpcode.SEND, (src.sge(a.pd.local_dma_lkey),)))
        a.wait_ok()
        b.wait_ok()
    rows = bth_fields(path, "opcode", "destqp")
    opcodes = [r[0] for r in rows]
    assert opcodes[:3] == [0, 1, 2], opcodes  # SEND_FIRST, SEND_MIDDLE, SEND_LAST
    assert 17 in opcodes  # the ACKNOWLEDGE
    assert rows[0][1] == b.qp.qp_num


def test_completion_notification_and_solicited_events() -> None:
    fabric, a, b = pair("cpu", "hw-direct")
    calls: list[int] = []
    b.cq.comp_handler = lambda cq: calls.append(len(cq))
    src, sink = Buffer(a.dev, 64), Buffer(b.dev, 64)
    lb, la = b.pd.local_dma_lkey, a.pd.local_dma_lkey
    b.qp.post_recv([RecvWR(i, (sink.sge(lb),)) for i in range(3)])
    b.cq.req_notify(solicited_only=True)
    a.qp.post_send(SendWR(1, IbWrOpcode.SEND, (src.sge(la, 0, 8),)))
    fabric.loop.run()
    assert calls == [], "an unsolicited completion does not fire a solicited-only arm"
    a.qp.post_send(
        SendWR(
            2,
            IbWrOpcode.SEND,
            (src.sge(la, 0, 8),),
            send_flags=IbSendFlags.SIGNALED | IbSendFlags.SOLICITED,
        )
    )
    fabric.loop.run()
    assert calls == [2]
    a.qp.post_send(SendWR(3, IbWrOpcode.SEND, (src.sge(la, 0, 8),)))
    fabric.loop.run()
    assert calls == [2], "one arm, one notification (ib_req_notify_cq again to re-arm)"
    assert len(b.cq.poll(3)) == 3
