"""XRC through the kernel-style verbs on the device pairings: an XRC domain,
XRC SRQs with their own CQs, TGT QPs made by the domain, INI QPs naming
the SRQ per work request; the refcounts and refusals of the verbs."""

from __future__ import annotations

import dataclasses
import errno
import os

import pytest

from softrdma.fabric.inproc import Fabric
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.device import IbEvent
from softrdma.verbs.enums import (
    IbAccess,
    IbEventType,
    IbQpState,
    IbQpType,
    IbSrqType,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import PostError, VerbsError
from softrdma.verbs.qp import QpCap, QpInitAttr, QueuePair, connect_qp
from softrdma.verbs.srq import SharedReceiveQueue, SrqAttr, SrqInitAttr
from softrdma.verbs.wr import AtomicWriteWR, FlushWR, RdmaWR, RecvWR, SendWR
from softrdma.verbs.xrcd import XrcDomain, ib_alloc_xrcd_user, ib_dealloc_xrcd_user, ib_open_qp
from tests.rdma.nodes import PAIRINGS, Buffer, Node, make_device, make_node

SLOT = 8192


def xrc_srq(node: Node, xrcd: XrcDomain, cq: CompletionQueue) -> SharedReceiveQueue:
    init = SrqInitAttr(SrqAttr(16, 2), srq_type=IbSrqType.XRC, xrcd=xrcd, cq=cq)
    return node.dev.create_srq(node.pd, init)


def ini_qp(node: Node) -> QueuePair:
    return node.dev.create_qp(
        node.pd, QpInitAttr(IbQpType.XRC_INI, node.cq, node.cq, QpCap(16, 0, 2, 0, 0))
    )


@pytest.mark.parametrize(("kind_a", "kind_b"), PAIRINGS)
def test_send_and_write_through_xrc(kind_a: str, kind_b: str) -> None:
    fabric = Fabric(seed=1)
    da, db = make_device(kind_a, fabric, "10.0.0.1"), make_device(kind_b, fabric, "10.0.0.2")
    a, b = make_node(da), make_node(db)
    xrcd = ib_alloc_xrcd_user(db)
    cqs = [db.create_cq(16), db.create_cq(16)]
    srqs = [xrc_srq(b, xrcd, cq) for cq in cqs]
    tgt = xrcd.create_tgt_qp()
    ini = ini_qp(a)
    connect_qp(ini, dest_qp_num=tgt.qp_num, dgid=db.query_gid())
    connect_qp(tgt, dest_qp_num=ini.qp_num, dgid=da.query_gid())
    rx = Buffer(db, 4 * SLOT)
    for i, srq in enumerate(srqs):
        srq.post_recv([RecvWR(10 * i + k, (rx.sge(b.pd.local_dma_lkey, (2 * i + k) * SLOT, SLOT),))
                       for k in range(2)])  # fmt: skip
    tx = Buffer(da, 6000)
    tx.fill(bytes(range(250)) * 24)
    lkey = a.pd.local_dma_lkey
    ini.post_send(SendWR(1, IbWrOpcode.SEND, (tx.sge(lkey, 0, 6000),),
                         xrc_remote_srqn=srqs[1].srq_num))  # fmt: skip
    ini.post_send(SendWR(2, IbWrOpcode.SEND_WITH_IMM, (tx.sge(lkey, 0, 10),), imm_data=7,
                         xrc_remote_srqn=srqs[0].srq_num))  # fmt: skip
    wcs = a.wait(2)
    assert [(wc.wr_id, wc.status) for wc in wcs] == [
        (1, IbWcStatus.SUCCESS),
        (2, IbWcStatus.SUCCESS),
    ]
    (w1,) = b.wait(1, cqs[1])
    (w0,) = b.wait(1, cqs[0])
    assert (w1.wr_id, w1.byte_len, w1.qp_num, w1.opcode) == (10, 6000, tgt.qp_num, IbWcOpcode.RECV)
    assert (w0.wr_id, w0.byte_len, w0.imm_data) == (0, 10, 7)
    assert rx.read(6000, 2 * SLOT) == bytes(range(250)) * 24
    assert b.cq.poll(1) == []  # the TGT's internal CQ and the node's see nothing
    # RDMA WRITE: the rkey is checked against the PD of the SRQ the XRCETH names
    access = IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE
    mr = db.get_dma_mr(b.pd, access)
    foreign = db.get_dma_mr(db.alloc_pd(), access)
    for wr_id, rkey in ((3, mr.rkey), (4, foreign.rkey)):
        ini.post_send(RdmaWR(wr_id, IbWrOpcode.RDMA_WRITE, (tx.sge(lkey, 0, 100),),
                             remote_addr=rx.dma + 3 * SLOT, rkey=rkey,
                             xrc_remote_srqn=srqs[0].srq_num))  # fmt: skip
    ok, bad = a.wait(2)
    assert ok.status is IbWcStatus.SUCCESS and bad.status is IbWcStatus.REM_ACCESS_ERR
    assert rx.read(100, 3 * SLOT) == bytes(range(100))
    assert tgt.state is IbQpState.ERR


def test_domain_refcounts_and_refusals() -> None:
    fabric = Fabric(seed=1)
    dev = make_device("cpu", fabric, "10.0.0.1")
    node = make_node(dev)
    events: list[IbEvent] = []
    xrcd = ib_alloc_xrcd_user(dev)
    cq = dev.create_cq(4)
    srq = xrc_srq(node, xrcd, cq)
    tgt = xrcd.create_tgt_qp(event_handler=events.append)
    assert xrcd.usecnt == 2 and cq.usecnt == 1
    with pytest.raises(VerbsError) as ex:
        ib_dealloc_xrcd_user(xrcd)
    assert ex.value.errno == errno.EBUSY
    # An XRC SRQ serves TGT QPs only; XRC QPs take no SRQ and have no RQ.
    with pytest.raises(VerbsError):
        dev.create_qp(node.pd, QpInitAttr(IbQpType.RC, node.cq, node.cq, srq=srq))
    with pytest.raises(PostError):
        tgt.post_recv(RecvWR(1))
    ini = ini_qp(node)
    with pytest.raises(PostError):
        ini.post_recv(RecvWR(1))
    connect_qp(ini, dest_qp_num=tgt.qp_num, dgid=dev.query_gid())
    # FLUSH and ATOMIC WRITE (IBTA annex A19) have no XRC opcodes
    for wr in (FlushWR(5, IbWrOpcode.FLUSH, flush_len=8, xrc_remote_srqn=srq.srq_num),
               AtomicWriteWR(6, IbWrOpcode.ATOMIC_WRITE, xrc_remote_srqn=srq.srq_num)):  # fmt: skip
        with pytest.raises(PostError) as pe:
            ini.post_send(wr)
        assert pe.value.errno == errno.EINVAL and pe.value.bad_wr is wr
    with pytest.raises(VerbsError):
        dev.create_srq(node.pd, SrqInitAttr(SrqAttr(4, 1), srq_type=IbSrqType.XRC, cq=cq))
    with pytest.raises(VerbsError):
        dev.create_qp(node.pd, QpInitAttr(IbQpType.XRC_TGT, node.cq, node.cq))
    # ib_open_qp: only TGT QPs of the domain
    other: list[IbEvent] = []
    assert ib_open_qp(xrcd, tgt.qp_num, other.append) is tgt
    with pytest.raises(VerbsError):
        ib_open_qp(xrcd, node.qp.qp_num)
    tgt.destroy()
    srq.destroy()
    assert xrcd.usecnt == 0 and cq.usecnt == 0
    ib_dealloc_xrcd_user(xrcd)
    with pytest.raises(VerbsError):
        xrcd.create_tgt_qp()


def test_shared_by_inode() -> None:
    fabric = Fabric(seed=1)
    dev = make_device("cpu", fabric, "10.0.0.1")
    x = ib_alloc_xrcd_user(dev, ("dev", 1), os.O_CREAT)
    assert ib_alloc_xrcd_user(dev, ("dev", 1), 0) is x and x.opens == 2
    with pytest.raises(VerbsError):
        ib_alloc_xrcd_user(dev, ("dev", 1), os.O_CREAT | os.O_EXCL)
    with pytest.raises(VerbsError):
        ib_alloc_xrcd_user(dev, ("dev", 2), 0)
    ib_dealloc_xrcd_user(x)
    assert (x.deallocated, x.opens) == (False, 1)
    ib_dealloc_xrcd_user(x)
    assert (x.deallocated, x.opens) == (True, 0)
    y = ib_alloc_xrcd_user(dev, ("dev", 1), os.O_CREAT)
    assert y is not x


def test_max_xrcds_counts_live_domains() -> None:
    fabric = Fabric(seed=1)
    dev = make_device("cpu", fabric, "10.0.0.1")
    assert dev.attrs.max_xrcds > 0
    limit = 4
    dev.attrs = dataclasses.replace(dev.attrs, max_xrcds=limit)
    domains = [ib_alloc_xrcd_user(dev) for _ in range(limit)]
    with pytest.raises(VerbsError) as ex:
        ib_alloc_xrcd_user(dev)
    assert ex.value.errno == errno.ENOMEM
    ib_dealloc_xrcd_user(domains.pop())
    domains.append(ib_alloc_xrcd_user(dev, ("dev", 7)))  # a freed slot is free again
    with pytest.raises(VerbsError):
        ib_alloc_xrcd_user(dev, ("dev", 8))
    for x in domains:
        ib_dealloc_xrcd_user(x)
    with pytest.raises(VerbsError) as ex:  # the file's domain went with its last close
        ib_alloc_xrcd_user(dev, ("dev", 7), 0)
    assert ex.value.errno == errno.EINVAL
    assert len([ib_alloc_xrcd_user(dev) for _ in range(limit)]) == limit


def test_srq_limit_event_names_the_xrc_srq() -> None:
    fabric = Fabric(seed=1)
    da, db = make_device("cpu", fabric, "10.0.0.1"), make_device("hw-direct", fabric, "10.0.0.2")
    a, b = make_node(da), make_node(db)
    xrcd = ib_alloc_xrcd_user(db)
    cq = db.create_cq(16)
    events: list[IbEvent] = []
    srq = db.create_srq(
        b.pd,
        SrqInitAttr(SrqAttr(8, 1, 2), srq_type=IbSrqType.XRC, xrcd=xrcd, cq=cq,
                    event_handler=events.append),
    )  # fmt: skip
    tgt = xrcd.create_tgt_qp()
    ini = ini_qp(a)
    connect_qp(ini, dest_qp_num=tgt.qp_num, dgid=db.query_gid())
    connect_qp(tgt, dest_qp_num=ini.qp_num, dgid=da.query_gid())
    rx = Buffer(db, 3 * SLOT)
    srq.post_recv([RecvWR(i, (rx.sge(b.pd.local_dma_lkey, i * SLOT, SLOT),)) for i in range(3)])
    tx = Buffer(da, 16)
    for i in range(2):
        ini.post_send(SendWR(i, IbWrOpcode.SEND, (tx.sge(a.pd.local_dma_lkey),),
                             xrc_remote_srqn=srq.srq_num))  # fmt: skip
    assert all(wc.status is IbWcStatus.SUCCESS for wc in a.wait(2))
    assert [wc.wr_id for wc in b.wait(2, cq)] == [0, 1]
    assert [(ev.event, ev.srq) for ev in events] == [(IbEventType.SRQ_LIMIT_REACHED, srq)]
