"""Hundreds of outstanding send WQEs on a lossy fabric: far more than one
window of PSNs (rxe's ``RXE_MAX_UNACKED_PSNS``, 128) and more than the
point (256) where the send queue drops its completed head, with more WRs
posted while the first ones are still retrying. Every WR completes exactly
once, in posting order (an RC send queue completes in order), and every
byte lands where it was sent."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from softrdma.fabric.inproc import Fabric
from softrdma.verbs.enums import IbMtu, IbPdFlags, IbWcOpcode, IbWcStatus, IbWrOpcode
from softrdma.verbs.qp import QpCap
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR
from tests.rdma.helpers_device import SIG, poll_all, settle, wait_n
from tests.rdma.nodes import Buffer, connect, make_device, make_node

N = 600
FIRST = 400  # posted at once; the rest while those are in flight
SLOT = 64


def op_of(i: int) -> IbWrOpcode:
    """SEND, WRITE, WRITE, ... with a READ of an earlier WRITE now and then."""
    if i % 10 == 9:
        return IbWrOpcode.RDMA_READ
    return IbWrOpcode.SEND if i % 3 == 0 else IbWrOpcode.RDMA_WRITE


def written_before(i: int) -> int:
    """The slot of the last WRITE before WR ``i``."""
    return max(j for j in range(i) if op_of(j) == IbWrOpcode.RDMA_WRITE)


WC_OPCODE = {
    IbWrOpcode.SEND: IbWcOpcode.SEND,
    IbWrOpcode.RDMA_WRITE: IbWcOpcode.RDMA_WRITE,
    IbWrOpcode.RDMA_READ: IbWcOpcode.RDMA_READ,
}


@pytest.mark.parametrize("kinds", [("cpu", "hw-iommu"), ("hw-direct", "cpu")], ids="-".join)
def test_600_outstanding_wrs_complete_in_order_exactly_once(kinds: tuple[str, str]) -> None:
    fabric = Fabric(seed=23)
    cap = QpCap(max_send_wr=1024, max_recv_wr=1024, max_send_sge=1, max_recv_sge=1)
    a = make_node(make_device(kinds[0], fabric, "10.0.0.1"), cqe=2048, cap=cap)
    b = make_node(
        make_device(kinds[1], fabric, "10.0.0.2"),
        cqe=2048,
        cap=cap,
        pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY,
    )
    connect(a, b, mtu=IbMtu.MTU_1024, timeout=8, retry_cnt=7)
    fabric.set_faults(drop=0.04, reorder=0.04, duplicate=0.02)
    la, lb, rkey = a.pd.local_dma_lkey, b.pd.local_dma_lkey, b.pd.unsafe_global_rkey
    data = random.Random(5).randbytes(N * SLOT)
    src, back = Buffer(a.dev, N * SLOT), Buffer(a.dev, N * SLOT)
    dst, inbox = Buffer(b.dev, N * SLOT), Buffer(b.dev, N * SLOT)
    src.fill(data)
    back.fill(bytes(N * SLOT))
    sends = [i for i in range(N) if op_of(i) == IbWrOpcode.SEND]
    b.qp.post_recv([RecvWR(10_000 + i, (inbox.sge(lb, i * SLOT, SLOT),)) for i in sends])

    def wr(i: int) -> SendWR:
        op = op_of(i)
        if op == IbWrOpcode.SEND:
            return SendWR(i, op, (src.sge(la, i * SLOT, SLOT),), send_flags=SIG)
        if op == IbWrOpcode.RDMA_WRITE:
            sge, remote = src.sge(la, i * SLOT, SLOT), dst.dma + i * SLOT
        else:  # READ back what the last WRITE before it wrote
            sge, remote = back.sge(la, i * SLOT, SLOT), dst.dma + written_before(i) * SLOT
        return RdmaWR(i, op, (sge,), send_flags=SIG, remote_addr=remote, rkey=rkey)

    a.qp.post_send([wr(i) for i in range(FIRST)])
    early = wait_n(a, 150)
    a.qp.post_send([wr(i) for i in range(FIRST, N)])
    settle(fabric)
    wcs = early + poll_all(a.cq)
    assert [wc.wr_id for wc in wcs] == list(range(N)), "in order, exactly once"
    assert Counter(wc.status for wc in wcs) == {IbWcStatus.SUCCESS: N}
    assert [wc.opcode for wc in wcs] == [WC_OPCODE[op_of(i)] for i in range(N)]
    recvs = poll_all(b.cq)
    assert [wc.wr_id for wc in recvs] == [10_000 + i for i in sends]
    assert {(wc.status, wc.byte_len) for wc in recvs} == {(IbWcStatus.SUCCESS, SLOT)}
    got_inbox, got_dst, got_back = inbox.read(), dst.read(), back.read()
    for i in range(N):
        s = slice(i * SLOT, (i + 1) * SLOT)
        op = op_of(i)
        if op == IbWrOpcode.SEND:
            assert got_inbox[s] == data[s], i
        elif op == IbWrOpcode.RDMA_WRITE:
            assert got_dst[s] == data[s], i
        else:
            j = written_before(i)
            assert got_back[s] == data[j * SLOT : (j + 1) * SLOT], i
    stats = fabric.stats
    assert stats.dropped and stats.reordered and stats.duplicated, "the loss really happened"
