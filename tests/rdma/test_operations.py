"""Every RC operation between two hosts, on every device pairing, byte-exact."""

from __future__ import annotations

import random
import struct

import pytest

from softrdma.verbs.enums import (
    IbAccess,
    IbMtu,
    IbSendFlags,
    IbWcFlags,
    IbWcOpcode,
    IbWrOpcode,
)
from softrdma.verbs.mr import MrState
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR, Sge
from tests.rdma.nodes import PAIRINGS, Buffer, FrBuffer, pair

REMOTE = (
    IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ | IbAccess.REMOTE_ATOMIC
)


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize(("kind_a", "kind_b"), PAIRINGS)
@pytest.mark.parametrize("mtu", [IbMtu.MTU_256, IbMtu.MTU_4096])
def test_every_operation(kind_a: str, kind_b: str, mtu: IbMtu) -> None:
    _fabric, a, b = pair(kind_a, kind_b, mtu=mtu)
    lkey_a, lkey_b = a.pd.local_dma_lkey, b.pd.local_dma_lkey
    src = Buffer(a.dev, 40000)
    sink = Buffer(b.dev, 40000)

    # SEND, multi-packet, gathered from three SGEs, scattered into two.
    msg = pattern(9000, 1)
    src.fill(msg)
    b.qp.post_recv(RecvWR(1, (sink.sge(lkey_b, 0, 4000), sink.sge(lkey_b, 20000, 6000))))
    a.qp.post_send(
        SendWR(
            10,
            IbWrOpcode.SEND,
            (src.sge(lkey_a, 0, 1000), src.sge(lkey_a, 1000, 5000), src.sge(lkey_a, 6000, 3000)),
        )
    )
    (sent,) = a.wait_ok()
    (got,) = b.wait_ok()
    assert (sent.opcode, sent.wr_id) == (IbWcOpcode.SEND, 10)
    assert (got.opcode, got.byte_len, got.wr_id, got.qp_num) == (
        IbWcOpcode.RECV,
        9000,
        1,
        b.qp.qp_num,
    )
    assert sink.read(4000) + sink.read(5000, 20000) == msg

    # SEND_WITH_IMM, inline, solicited
    b.qp.post_recv(RecvWR(2, (sink.sge(lkey_b),)))
    # Inline SGEs carry CPU addresses: the driver copies the bytes at post time.
    inline = a.host.kmalloc(8)
    a.host.cpu_write(inline, b"inline!!")
    a.qp.post_send(
        SendWR(
            11,
            IbWrOpcode.SEND_WITH_IMM,
            (Sge(inline, 8, 0),),
            imm_data=0xDEADBEEF,
            send_flags=IbSendFlags.SIGNALED | IbSendFlags.SOLICITED | IbSendFlags.INLINE,
        )
    )
    a.host.cpu_write(inline, b"reused!!")  # the consumer may reuse it at once
    a.wait_ok()
    (got,) = b.wait_ok()
    assert got.wc_flags & IbWcFlags.WITH_IMM and got.imm_data == 0xDEADBEEF and got.byte_len == 8
    assert sink.read(8) == b"inline!!"

    # RDMA WRITE / WRITE_WITH_IMM / READ through a fast-registered MR of vmalloc pages
    target = FrBuffer(b, 3 * 4096 + 100, REMOTE)
    data = pattern(3 * 4096, 2)
    src.fill(data)
    a.qp.post_send(
        RdmaWR(
            12,
            IbWrOpcode.RDMA_WRITE,
            (src.sge(lkey_a, 0, len(data)),),
            remote_addr=target.iova + 50,
            rkey=target.rkey,
        )
    )
    (wc,) = a.wait_ok()
    assert wc.opcode == IbWcOpcode.RDMA_WRITE
    assert target.cpu_read(len(data), 50) == data

    b.qp.post_recv(RecvWR(3, ()))
    target.cpu_write(b"\0" * 100, 50)
    a.qp.post_send(
        RdmaWR(
            13,
            IbWrOpcode.RDMA_WRITE_WITH_IMM,
            (src.sge(lkey_a, 0, 100),),
            imm_data=7,
            remote_addr=target.iova + 50,
            rkey=target.rkey,
        )
    )
    a.wait_ok()
    (got,) = b.wait_ok()
    assert got.opcode == IbWcOpcode.RECV_RDMA_WITH_IMM and got.imm_data == 7
    assert target.cpu_read(100, 50) == data[:100]

    reader = Buffer(a.dev, 20000)
    a.qp.post_send(
        RdmaWR(
            14,
            IbWrOpcode.RDMA_READ,
            (reader.sge(lkey_a, 0, 5000), reader.sge(lkey_a, 10000, 7000)),
            remote_addr=target.iova + 50,
            rkey=target.rkey,
        )
    )
    (wc,) = a.wait_ok()
    assert wc.opcode == IbWcOpcode.RDMA_READ and wc.byte_len == 12000
    assert reader.read(5000) + reader.read(7000, 10000) == data[:12000]

    # atomics on an aligned word
    target.cpu_write(struct.pack("<Q", 41), 4096)
    result = Buffer(a.dev, 64)
    a.qp.post_send(
        AtomicWR(
            15,
            IbWrOpcode.ATOMIC_FETCH_AND_ADD,
            (result.sge(lkey_a, 0, 8),),
            remote_addr=target.iova + 4096,
            compare_add=1,
            rkey=target.rkey,
        )
    )
    (wc,) = a.wait_ok()
    assert wc.opcode == IbWcOpcode.FETCH_ADD
    assert struct.unpack("<Q", result.read(8))[0] == 41
    a.qp.post_send(
        AtomicWR(
            16,
            IbWrOpcode.ATOMIC_CMP_AND_SWP,
            (result.sge(lkey_a, 8, 8),),
            remote_addr=target.iova + 4096,
            compare_add=42,
            swap=1 << 63,
            rkey=target.rkey,
        )
    )
    a.qp.post_send(
        AtomicWR(
            17,
            IbWrOpcode.ATOMIC_CMP_AND_SWP,
            (result.sge(lkey_a, 16, 8),),
            remote_addr=target.iova + 4096,
            compare_add=42,
            swap=5,
            rkey=target.rkey,
        )
    )
    wcs = a.wait_ok(2)
    assert [wc.opcode for wc in wcs] == [IbWcOpcode.COMP_SWAP] * 2
    assert struct.unpack("<QQ", result.read(16, 8)) == (42, 1 << 63)
    assert struct.unpack("<Q", target.cpu_read(8, 4096))[0] == 1 << 63

    # SEND_WITH_INV invalidates the target MR on b; LOCAL_INV on a's own MR
    b.qp.post_recv(RecvWR(4, (sink.sge(lkey_b),)))
    a.qp.post_send(
        SendWR(18, IbWrOpcode.SEND_WITH_INV, (src.sge(lkey_a, 0, 16),), invalidate_rkey=target.rkey)
    )
    a.wait_ok()
    (got,) = b.wait_ok()
    assert got.wc_flags & IbWcFlags.WITH_INVALIDATE and got.invalidate_rkey == target.rkey
    assert target.mr.state == MrState.FREE
    mine = FrBuffer(a, 8192, IbAccess.LOCAL_WRITE)
    a.qp.post_send(SendWR(19, IbWrOpcode.LOCAL_INV, invalidate_rkey=mine.rkey))
    (wc,) = a.wait_ok()
    assert wc.opcode == IbWcOpcode.LOCAL_INV and mine.mr.state == MrState.FREE

    # IB_SIGNAL_ALL_WR, the default of a zeroed ib_qp_init_attr: every send
    # completes, IB_SEND_SIGNALED or not
    b.qp.post_recv([RecvWR(5 + i, (sink.sge(lkey_b),)) for i in range(3)])
    for i in range(3):
        flags = IbSendFlags.SIGNALED if i == 2 else IbSendFlags(0)
        a.qp.post_send(SendWR(20 + i, IbWrOpcode.SEND, (src.sge(lkey_a, 0, 64),), send_flags=flags))
    assert [wc.wr_id for wc in a.wait_ok(3)] == [20, 21, 22]
    assert [wc.wr_id for wc in b.wait_ok(3)] == [5, 6, 7]
    assert a.qp.hw.sq_outstanding == 0 and a.cq.poll(4) == []
    for node in (a, b):
        assert not node.dev.dma_device.platform.dma_debug.reports, (
            node.dev.dma_device.platform.dma_debug.reports
        )
