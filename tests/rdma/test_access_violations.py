"""Remote access violations: the IBTA NAK on the wire, the kernel completion
status, both QPs in ERR, and not one byte changed in the target's memory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from softrdma.transport.headers import AethType, NakCode, aeth_syndrome_parse
from softrdma.transport.opcodes import Opcode
from softrdma.transport.roce import decode_roce_v2
from softrdma.verbs.enums import IbAccess, IbEventType, IbQpState, IbWcStatus, IbWrOpcode
from softrdma.verbs.qp import connect_qp
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR
from tests.rdma.nodes import KINDS, Buffer, FrBuffer, Node, make_node, pair, ram_digest

RW = IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ


def naks_on_wire(frames: list[bytes]) -> list[int]:
    """NAK codes in AETHs of ACKNOWLEDGE packets the fabric carried."""
    codes = []
    for f in frames:
        pkt = decode_roce_v2(f).packet
        if pkt.bth.opcode == Opcode.RC_ACKNOWLEDGE and pkt.aeth is not None:
            kind, value = aeth_syndrome_parse(pkt.aeth.syndrome)
            if kind == AethType.NAK:
                codes.append(value)
    return codes


Violation = Callable[[Node, FrBuffer], tuple[int, int]]  # -> (remote_addr, rkey)

VIOLATIONS: dict[str, Violation] = {
    "bad-rkey": lambda b, t: (t.iova, t.rkey ^ 0x5A5A00),
    "stale-key-byte": lambda b, t: (t.iova, (t.rkey & ~0xFF) | ((t.rkey + 1) & 0xFF)),
    "out-of-bounds": lambda b, t: (t.iova + t.size - 8, t.rkey),
    "before-start": lambda b, t: (t.iova - 4096, t.rkey),
    "no-permission": lambda b, t: (
        t.iova,
        FrBuffer(b, 4096, IbAccess.LOCAL_WRITE | IbAccess.REMOTE_READ).rkey,
    ),
    "other-pd": lambda b, t: (t.iova, _other_pd_rkey(b)),
    "invalidated": lambda b, t: (t.iova, _invalidated(b, t)),
}


def _other_pd_rkey(b: Node) -> int:
    """A valid rkey of another PD on the same device (REG_MR is a local
    operation: its QP only has to be in RTS)."""
    other = make_node(b.dev)
    connect_qp(other.qp, dest_qp_num=0xABC, dgid=b.dev.query_gid())
    return FrBuffer(other, 4096, RW).rkey


def _invalidated(b: Node, t: FrBuffer) -> int:
    b.qp.post_send(SendWR(0x1AB, IbWrOpcode.LOCAL_INV, invalidate_rkey=t.rkey))
    b.wait_ok()
    return t.rkey


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("violation", list(VIOLATIONS))
def test_remote_write_violation_changes_nothing(kind: str, violation: str) -> None:
    fabric, a, b = pair("cpu", kind)
    events: list[IbEventType] = []
    b.dev.register_event_handler(lambda e: events.append(e.event))
    target = FrBuffer(b, 2 * 4096, RW)
    addr, rkey = VIOLATIONS[violation](b, target)
    src = Buffer(a.dev, 3000)
    src.fill(b"\xab" * 3000)
    frames: list[bytes] = []

    def record(frame: bytes) -> bool:
        frames.append(bytes(frame))
        return False

    fabric.drop_when(record)
    before = ram_digest(b.host)
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_WRITE,
            (src.sge(a.pd.local_dma_lkey, 0, 3000),),
            remote_addr=addr,
            rkey=rkey,
        )
    )
    (wc,) = a.wait(1)
    assert wc.status == IbWcStatus.REM_ACCESS_ERR and wc.wr_id == 1
    fabric.loop.run()
    assert ram_digest(b.host) == before, "the target's memory changed"
    assert naks_on_wire(frames) == [NakCode.REMOTE_ACCESS_ERR]
    assert a.qp.state == IbQpState.ERR and b.qp.state == IbQpState.ERR
    assert IbEventType.QP_ACCESS_ERR in events


@pytest.mark.parametrize("kind", KINDS)
def test_remote_read_violation_and_flush(kind: str) -> None:
    _fabric, a, b = pair(kind, "cpu")
    target = FrBuffer(b, 4096, IbAccess.LOCAL_WRITE)  # no REMOTE_READ
    dst = Buffer(a.dev, 4096)
    dst.fill(b"\x11" * 4096)
    lkey = a.pd.local_dma_lkey
    a.qp.post_send(
        RdmaWR(1, IbWrOpcode.RDMA_READ, (dst.sge(lkey),), remote_addr=target.iova, rkey=target.rkey)
    )
    a.qp.post_send(SendWR(2, IbWrOpcode.SEND, (dst.sge(lkey, 0, 8),)))
    first, second = a.wait(2)
    assert first.status == IbWcStatus.REM_ACCESS_ERR
    assert second.status == IbWcStatus.WR_FLUSH_ERR and second.wr_id == 2
    assert dst.read() == b"\x11" * 4096
    # posting in ERR completes with a flush error
    a.qp.post_recv(RecvWR(3, (dst.sge(lkey),)))
    a.qp.post_send(SendWR(4, IbWrOpcode.SEND, (dst.sge(lkey, 0, 8),)))
    assert {wc.status for wc in a.wait(2)} == {IbWcStatus.WR_FLUSH_ERR}


def test_local_protection_error() -> None:
    _fabric, a, _b = pair("hw-iommu", "cpu")
    buf = Buffer(a.dev, 4096)
    a.qp.post_send(SendWR(1, IbWrOpcode.SEND, (buf.sge(0x7777700),)))
    (wc,) = a.wait(1)
    assert wc.status == IbWcStatus.LOC_PROT_ERR
    assert a.qp.state == IbQpState.ERR
