"""UC QPs end to end on every device pairing: the UC rows of the QP state
table, SEND / WRITE with and without immediate on the burst and the
per-frame path, a frame lost on the fabric dropping one message without
any retransmission, and the WRs UC refuses."""

from __future__ import annotations

import errno

import pytest

from softrdma.fabric.inproc import Fabric
from softrdma.verbs.ah import AhAttr
from softrdma.verbs.enums import (
    IbAccess,
    IbMtu,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import PostError, VerbsError
from softrdma.verbs.qp import QpAttr, QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR
from tests.rdma.nodes import PAIRINGS, Buffer, Node, make_device

M = IbQpAttrMask


def uc_node(fabric: Fabric, kind: str, ip: str) -> Node:
    dev = make_device(kind, fabric, ip)
    pd = dev.alloc_pd()
    cq = dev.create_cq(256)
    qp = dev.create_qp(pd, QpInitAttr(IbQpType.UC, cq, cq, QpCap(max_send_wr=64, max_recv_wr=64)))
    return Node(dev, pd, cq, qp)


def uc_connect(qp: QueuePair, dest: QueuePair, mtu: IbMtu = IbMtu.MTU_1024) -> None:
    """The UC rows: INIT needs the access flags, RTR the path (no RNR timer,
    no responder resources), RTS only the send PSN."""
    qp.modify(
        QpAttr(qp_state=IbQpState.INIT, qp_access_flags=IbAccess.REMOTE_WRITE),
        M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS,
    )
    qp.modify(
        QpAttr(
            qp_state=IbQpState.RTR,
            ah_attr=AhAttr(dgid=dest.device.query_gid()),
            path_mtu=mtu,
            dest_qp_num=dest.qp_num,
            rq_psn=7,
        ),
        M.STATE | M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN,
    )
    qp.modify(QpAttr(qp_state=IbQpState.RTS, sq_psn=7), M.STATE | M.SQ_PSN)


def uc_pair(kind_a: str, kind_b: str, offload: bool = True) -> tuple[Fabric, Node, Node]:
    fabric = Fabric(seed=3, offload=offload)
    a = uc_node(fabric, kind_a, "10.0.0.1")
    b = uc_node(fabric, kind_b, "10.0.0.2")
    uc_connect(a.qp, b.qp)
    uc_connect(b.qp, a.qp)
    return fabric, a, b


@pytest.mark.parametrize(("kind_a", "kind_b"), PAIRINGS)
@pytest.mark.parametrize("offload", [True, False])
def test_uc_send_and_write(kind_a: str, kind_b: str, offload: bool) -> None:
    _, a, b = uc_pair(kind_a, kind_b, offload)
    src = Buffer(a.dev, 8192)
    data = bytes(range(256)) * 32
    src.fill(data)
    rx = Buffer(b.dev, 16384)
    b.qp.post_recv([RecvWR(i, (rx.sge(b.pd.local_dma_lkey, i * 8192, 8192),)) for i in range(2)])
    mr = b.dev.get_dma_mr(b.pd, IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE)
    dst = Buffer(b.dev, 8192)
    lkey = a.pd.local_dma_lkey
    a.qp.post_send(
        [
            SendWR(1, IbWrOpcode.SEND, (src.sge(lkey),)),
            RdmaWR(2, IbWrOpcode.RDMA_WRITE, (src.sge(lkey, 0, 5000),), remote_addr=dst.dma,
                   rkey=mr.rkey),
            RdmaWR(3, IbWrOpcode.RDMA_WRITE_WITH_IMM, (src.sge(lkey, 0, 3000),),
                   remote_addr=dst.dma + 5000, rkey=mr.rkey, imm_data=0x55),
        ]
    )  # fmt: skip
    assert [wc.wr_id for wc in a.wait_ok(3)] == [1, 2, 3]
    wcs = b.wait_ok(2)
    assert [(wc.wr_id, wc.opcode, wc.byte_len) for wc in wcs] == [
        (0, IbWcOpcode.RECV, 8192),
        (1, IbWcOpcode.RECV_RDMA_WITH_IMM, 3000),
    ]
    assert wcs[1].imm_data == 0x55
    assert rx.read(8192) == data
    assert dst.read(8000) == data[:5000] + data[:3000]
    # UC never acknowledges: A received nothing.
    assert a.dev.stats["rcvd_pkts"] == 0


def test_uc_loss_drops_one_message_without_retransmission() -> None:
    fabric, a, b = uc_pair("cpu", "hw-iommu", offload=False)
    src = Buffer(a.dev, 4096)
    src.fill(b"\x11" * 2048 + b"\x22" * 2048)
    rx = Buffer(b.dev, 4096)
    b.qp.post_recv([RecvWR(i, (rx.sge(b.pd.local_dma_lkey, i * 2048, 2048),)) for i in range(2)])
    sent = a.dev.stats["sent_pkts"]
    # Lose the second frame on the wire: message 1's LAST.
    seen = [0]

    def second(frame: bytes) -> bool:
        seen[0] += 1
        return seen[0] == 2

    lost = fabric.drop_when(second, count=1)
    lkey = a.pd.local_dma_lkey
    a.qp.post_send(
        [
            SendWR(1, IbWrOpcode.SEND, (src.sge(lkey, 0, 2048),)),
            SendWR(2, IbWrOpcode.SEND, (src.sge(lkey, 2048, 2048),)),
        ]
    )
    a.wait_ok(2)
    (wc,) = b.wait_ok(1)
    assert (wc.wr_id, wc.byte_len) == (0, 2048)
    assert rx.read(2048) == b"\x22" * 2048
    assert lost.dropped == 1
    assert a.dev.stats["sent_pkts"] - sent == 4  # nothing sent again
    assert b.dev.stats["uc_msg_dropped"] == 0  # a gap: dropped, not counted as class D
    assert b.qp.state == IbQpState.RTS
    assert not b.cq.poll(1)


def test_uc_state_table_and_refusals() -> None:
    fabric = Fabric(seed=1)
    a = uc_node(fabric, "cpu", "10.0.0.1")
    b = uc_node(fabric, "cpu", "10.0.0.2")
    a.qp.modify(
        QpAttr(qp_state=IbQpState.INIT, qp_access_flags=IbAccess.REMOTE_WRITE),
        M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS,
    )
    # RC's RTR attributes are not UC's.
    with pytest.raises(VerbsError) as e:
        a.qp.modify(
            QpAttr(qp_state=IbQpState.RTR, ah_attr=AhAttr(dgid=b.dev.query_gid()),
                   dest_qp_num=b.qp.qp_num),
            M.STATE | M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN | M.MAX_DEST_RD_ATOMIC
            | M.MIN_RNR_TIMER,
        )  # fmt: skip
    assert e.value.errno == errno.EINVAL
    with pytest.raises(VerbsError):
        a.qp.modify(QpAttr(qp_state=IbQpState.RTR), M.STATE | M.AV)  # path missing
    uc_connect(b.qp, a.qp)
    a.qp.modify(QpAttr(qp_state=IbQpState.RESET), M.STATE)
    uc_connect(a.qp, b.qp)
    attr, init = a.qp.query()
    assert attr.qp_state == IbQpState.RTS and attr.dest_qp_num == b.qp.qp_num
    assert init.qp_type == IbQpType.UC
    for wr in (
        RdmaWR(1, IbWrOpcode.RDMA_READ, (), remote_addr=0, rkey=1),
        AtomicWR(2, IbWrOpcode.ATOMIC_FETCH_AND_ADD, (), remote_addr=0),
        SendWR(3, IbWrOpcode.SEND_WITH_INV, (), invalidate_rkey=1),
    ):
        with pytest.raises(PostError) as pe:
            a.qp.post_send(wr)
        assert pe.value.errno == errno.EINVAL and pe.value.bad_wr is wr
    # RTS -> SQD -> RTS and SQE -> RTS are UC transitions too.
    a.qp.modify(QpAttr(qp_state=IbQpState.SQD), M.STATE)
    a.qp.modify(QpAttr(qp_state=IbQpState.RTS), M.STATE)
    assert a.qp.state == IbQpState.RTS
    a.qp.modify(QpAttr(qp_state=IbQpState.ERR), M.STATE)
    a.qp.post_send(SendWR(9, IbWrOpcode.SEND, ()))
    (wc,) = a.wait(1)
    assert (wc.wr_id, wc.status) == (9, IbWcStatus.WR_FLUSH_ERR)
