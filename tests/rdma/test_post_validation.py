"""What the driver checks of a send work request (rxe's ``validate_send_wr``
with the WR opcode table): the opcode for the QP type, the WR structure it
needs, an atomic's one 8-byte SGE, REG_MR's MR, a UD send's address handle —
each refused with ``PostError`` naming the bad WR, the ones before it
posted."""

from __future__ import annotations

import errno

import pytest

from softrdma.fabric.inproc import Fabric
from softrdma.transport.wqe import WR_OPCODE_INFO
from softrdma.verbs.ah import AhAttr, create_ah
from softrdma.verbs.enums import IbQpAttrMask, IbQpState, IbQpType, IbWcOpcode, IbWrOpcode
from softrdma.verbs.errors import PostError
from softrdma.verbs.qp import QpAttr, QpInitAttr
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, RegWR, SendWR, Sge, UdWR
from tests.rdma.nodes import KINDS, Buffer, make_device, pair


@pytest.mark.parametrize("kind", KINDS)
def test_rc_send_wr_checks(kind: str) -> None:
    _, a, b = pair(kind, "cpu")
    sink = Buffer(b.dev, 64)
    b.qp.post_recv([RecvWR(i, (sink.sge(b.pd.local_dma_lkey),)) for i in range(8)])
    buf = Buffer(a.dev, 64)
    sge = buf.sge(a.pd.local_dma_lkey, 0, 8)
    good = SendWR(1, IbWrOpcode.SEND, (sge,))
    bad_cases = [
        (SendWR(3, IbWrOpcode.RDMA_WRITE, (sge,)), "needs an RdmaWR"),
        (SendWR(4, IbWrOpcode.ATOMIC_FETCH_AND_ADD, (sge,)), "needs an AtomicWR"),
        (AtomicWR(5, IbWrOpcode.ATOMIC_FETCH_AND_ADD, (buf.sge(a.pd.local_dma_lkey, 0, 4),)),
         "8-byte SGE"),
        (RegWR(6, IbWrOpcode.REG_MR), "RegWR with an MR"),
        (SendWR(7, IbWrOpcode.REG_MR), "needs an RegWR"),
    ]  # fmt: skip
    for wr, msg in bad_cases:
        with pytest.raises(PostError, match=msg) as err:
            a.qp.post_send([good, wr])
        assert err.value.bad_wr is wr and err.value.errno == errno.EINVAL
    # every good WR before a bad one was posted, and completes
    wcs = a.wait_ok(len(bad_cases))
    assert [wc.wr_id for wc in wcs] == [1] * len(bad_cases)


def test_ud_qp_takes_only_sends_with_an_address_handle() -> None:
    fabric = Fabric()
    dev = make_device("cpu", fabric, "10.0.0.1")
    peer = make_device("hw-iommu", fabric, "10.0.0.2")
    pd = dev.alloc_pd()
    cq = dev.create_cq(8)
    qp = dev.create_qp(pd, QpInitAttr(IbQpType.UD, cq, cq))
    m = IbQpAttrMask
    qp.modify(
        QpAttr(qp_state=IbQpState.INIT, qkey=0x1234), m.STATE | m.PKEY_INDEX | m.PORT | m.QKEY
    )
    qp.modify(QpAttr(qp_state=IbQpState.RTR), m.STATE)
    qp.modify(QpAttr(qp_state=IbQpState.RTS, sq_psn=0), m.STATE | m.SQ_PSN)
    with pytest.raises(PostError, match="not valid on a UD QP"):
        qp.post_send(RdmaWR(1, IbWrOpcode.RDMA_WRITE))
    with pytest.raises(PostError, match="address handle"):
        qp.post_send(SendWR(2, IbWrOpcode.SEND))
    ah = create_ah(pd, AhAttr(dgid=peer.query_gid()))
    qp.post_send(UdWR(3, IbWrOpcode.SEND, ah=ah, remote_qpn=0x33, remote_qkey=0x1234))
    (wc,) = cq.poll(1)
    assert wc.wr_id == 3 and wc.opcode is IbWcOpcode.SEND


def test_the_wr_opcode_table_is_complete() -> None:
    """One row per send opcode: every opcode has its WR class, QP types and
    completion opcode; RC wire opcodes exactly for the RC operations."""
    assert set(WR_OPCODE_INFO) == set(IbWrOpcode)
    for opcode, info in WR_OPCODE_INFO.items():
        assert IbQpType.RC in info.qp_types
        local = opcode in (IbWrOpcode.REG_MR, IbWrOpcode.LOCAL_INV, IbWrOpcode.BIND_MW)
        assert (info.rc_ops == (-1,) * 4) == local
    ud = {op for op, info in WR_OPCODE_INFO.items() if IbQpType.UD in info.qp_types}
    assert ud == {IbWrOpcode.SEND, IbWrOpcode.SEND_WITH_IMM}
    # UC (rxe_wr_opcode_info): no READ, atomics or SEND_WITH_INV.
    uc = {op for op, info in WR_OPCODE_INFO.items() if IbQpType.UC in info.qp_types}
    assert uc == set(IbWrOpcode) - {
        IbWrOpcode.RDMA_READ,
        IbWrOpcode.ATOMIC_CMP_AND_SWP,
        IbWrOpcode.ATOMIC_FETCH_AND_ADD,
        IbWrOpcode.SEND_WITH_INV,
        IbWrOpcode.FLUSH,
        IbWrOpcode.ATOMIC_WRITE,
    }


def test_sge_lengths_are_checked_by_the_verbs_layer() -> None:
    _, a, _ = pair("cpu", "cpu")
    with pytest.raises(PostError, match="SGE length"):
        a.qp.post_send(SendWR(1, IbWrOpcode.SEND, (Sge(0, -1, 0),)))
