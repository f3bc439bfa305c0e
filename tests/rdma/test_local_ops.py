"""Memory registration work requests that fail: IB_WR_REG_MR and
IB_WR_LOCAL_INV refused by the device, and SEND_WITH_INVALIDATE naming a
key the responder may not invalidate.

rxe_req.c ``rxe_do_local_ops``: a REG_MR or LOCAL_INV the device refuses
completes with ``IB_WC_LOC_QP_OP_ERR`` (``IB_WC_MW_BIND_ERR`` is for
memory-window binds, which softrdma does not implement) and, like every
completion error, moves the QP to ERR; the work requests behind it are
flushed. A completion error is reported even for an unsignaled WR (IBTA
10.7.3.1, quoted in rxe_comp.c ``do_complete``). rxe_mr.c
``rxe_reg_fast_mr``: the MR must be FREE, of the QP's PD, and only the key
byte may change; ``rxe_invalidate_mr``: the key must name a
fast-registration MR and match it. rxe_resp.c
``RESPST_ERR_INVALIDATE_RKEY``: the receive completes with
``IB_WC_REM_INV_REQ_ERR`` and the responder's QP goes to ERR."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from softrdma.dma.types import DMA_BIDIRECTIONAL
from softrdma.memory.scatterlist import Scatterlist
from softrdma.transport.headers import NakCode
from softrdma.verbs.dma import ib_dma_map_sg
from softrdma.verbs.enums import (
    IbAccess,
    IbPdFlags,
    IbQpState,
    IbQpType,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import PostError
from softrdma.verbs.mr import MemoryRegion, MrState, ib_inc_rkey
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import IbSigType, QpInitAttr, connect_qp
from softrdma.verbs.wr import RecvWR, RegWR, SendWR
from tests.rdma.helpers_device import (
    RW,
    SIG,
    UNSIG,
    nak_codes,
    rc_node,
    record,
    statuses,
    wait_n,
)
from tests.rdma.nodes import Buffer, FrBuffer, Node, pair

FLUSH = IbWcStatus.WR_FLUSH_ERR
LOC_QP_OP = IbWcStatus.LOC_QP_OP_ERR


def fresh_mr(node: Node, pd: ProtectionDomain) -> MemoryRegion:
    """``ib_alloc_mr`` + ``ib_map_mr_sg`` of a mapped buffer: FREE, ready for
    IB_WR_REG_MR."""
    host = node.host
    kva = host.kmalloc(8192)
    sgl = Scatterlist.from_buffer(host, kva, 8192)
    n = ib_dma_map_sg(node.dev, sgl, DMA_BIDIRECTIONAL)
    mr = node.dev.alloc_mr(pd, 4)
    assert mr.map_sg(sgl, n) == n and mr.state == MrState.FREE
    return mr


def state_of(mr: MemoryRegion) -> MrState:
    return mr.state


def local_node(node: Node) -> Node:
    """A QP on ``node``'s device in RTS that signals only what it is asked
    to (``IB_SIGNAL_REQ_WR``), in a PD of its own with a global rkey; local
    operations need no peer."""
    local = rc_node(node, pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    connect_qp(local.qp, dest_qp_num=0xABC, dgid=node.dev.query_gid())
    return local


def registered(node: Node, size: int, access: IbAccess) -> FrBuffer:
    """A fast-registered buffer in ``node``'s PD, registered through a
    sibling QP that signals every WR (``FrBuffer`` waits for its REG_MR)."""
    init = QpInitAttr(IbQpType.RC, node.cq, node.cq, sq_sig_type=IbSigType.ALL_WR)
    sibling = Node(node.dev, node.pd, node.cq, node.dev.create_qp(node.pd, init))
    connect_qp(sibling.qp, dest_qp_num=0xABD, dgid=node.dev.query_gid())
    return FrBuffer(sibling, size, access)


@dataclass
class Refused:
    """A REG_MR or LOCAL_INV the device must refuse, and the MR whose
    state must not change."""

    wr: SendWR
    mr: MemoryRegion


def _reg_other_pd(n: Node) -> Refused:
    mr = fresh_mr(n, n.dev.alloc_pd())
    return Refused(
        RegWR(1, IbWrOpcode.REG_MR, send_flags=UNSIG, mr=mr, key=ib_inc_rkey(mr.rkey), access=RW),
        mr,
    )


def _reg_valid_mr(n: Node) -> Refused:
    mr = fresh_mr(n, n.pd)
    n.qp.post_send(
        RegWR(9, IbWrOpcode.REG_MR, send_flags=SIG, mr=mr, key=ib_inc_rkey(mr.rkey), access=RW)
    )
    assert statuses(n.wait(1)) == [(9, IbWcStatus.SUCCESS)]
    return Refused(
        RegWR(1, IbWrOpcode.REG_MR, send_flags=UNSIG, mr=mr, key=ib_inc_rkey(mr.rkey), access=RW),
        mr,
    )


def _reg_other_index(n: Node) -> Refused:
    mr = fresh_mr(n, n.pd)
    return Refused(
        RegWR(1, IbWrOpcode.REG_MR, send_flags=UNSIG, mr=mr, key=mr.rkey + 0x100, access=RW), mr
    )


def _reg_deregistered(n: Node) -> Refused:
    mr = fresh_mr(n, n.pd)
    n.dev.dereg_mr(mr)
    return Refused(
        RegWR(1, IbWrOpcode.REG_MR, send_flags=UNSIG, mr=mr, key=ib_inc_rkey(mr.rkey), access=RW),
        mr,
    )


def _inv(key: int, mr: MemoryRegion) -> Refused:
    return Refused(SendWR(1, IbWrOpcode.LOCAL_INV, send_flags=UNSIG, invalidate_rkey=key), mr)


def _inv_unknown(n: Node) -> Refused:
    t = registered(n, 4096, RW)
    return _inv((0x7F_FF00 | t.rkey & 0xFF) ^ 0x100, t.mr)


def _inv_stale_byte(n: Node) -> Refused:
    t = registered(n, 4096, RW)
    return _inv((t.rkey & ~0xFF) | ((t.rkey + 1) & 0xFF), t.mr)


def _inv_other_pd(n: Node) -> Refused:
    t = registered(local_node(n), 4096, RW)
    return _inv(t.rkey, t.mr)


def _inv_dma_mr(n: Node) -> Refused:
    internal = n.pd.internal_mr
    assert internal is not None and n.pd.unsafe_global_rkey == internal.rkey
    return _inv(n.pd.unsafe_global_rkey, internal)


REFUSED: dict[str, Callable[[Node], Refused]] = {
    "reg-mr-of-another-pd": _reg_other_pd,
    "reg-mr-already-valid": _reg_valid_mr,
    "reg-mr-key-changes-the-index": _reg_other_index,
    "reg-mr-deregistered": _reg_deregistered,
    "local-inv-unknown-key": _inv_unknown,
    "local-inv-stale-key-byte": _inv_stale_byte,
    # rxe does not compare PDs here; IBTA's memory management (and mlx5) does
    "local-inv-mr-of-another-pd": _inv_other_pd,
    "local-inv-dma-mr": _inv_dma_mr,
}


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("kind", ["hw-iommu", "cpu"])
def test_refused_local_operation(case: str, kind: str) -> None:
    _fabric, a, _b = pair(kind, "cpu")
    node = local_node(a)
    refused = REFUSED[case](node)
    state, rkey = refused.mr.state, refused.mr.rkey
    follow = SendWR(2, IbWrOpcode.SEND, send_flags=SIG)
    # The refused WR is unsignaled: its error completes anyway.
    wr = refused.wr
    assert not wr.send_flags & SIG
    node.qp.post_send([wr, follow])
    wcs = wait_n(node, 2)
    assert statuses(wcs) == [(1, LOC_QP_OP), (2, FLUSH)]
    expected = IbWcOpcode.REG_MR if wr.opcode == IbWrOpcode.REG_MR else IbWcOpcode.LOCAL_INV
    assert wcs[0].opcode == expected
    assert node.qp.state == IbQpState.ERR
    assert (refused.mr.state, refused.mr.rkey) == (state, rkey), "the MR is untouched"


@pytest.mark.parametrize(
    "access", [IbAccess.REMOTE_WRITE, IbAccess.REMOTE_ATOMIC], ids=lambda f: str(f.name)
)
def test_reg_mr_with_remote_write_but_no_local_write_is_refused(access: IbAccess) -> None:
    _fabric, a, _b = pair("hw-iommu", "cpu")
    node = local_node(a)
    mr = fresh_mr(node, node.pd)
    wr = RegWR(
        1, IbWrOpcode.REG_MR, send_flags=UNSIG, mr=mr, key=ib_inc_rkey(mr.rkey), access=access
    )
    try:
        node.qp.post_send([wr, SendWR(2, IbWrOpcode.SEND, send_flags=SIG)])
    except PostError as e:
        assert e.bad_wr is wr and e.errno == errno.EINVAL
        assert node.qp.state == IbQpState.RTS
    else:
        assert statuses(wait_n(node, 2)) == [(1, LOC_QP_OP), (2, FLUSH)]
    assert mr.state == MrState.FREE


# -- SEND_WITH_INVALIDATE --------------------------------------------------------------


def _remote_unknown(b: Node) -> tuple[int, MemoryRegion | None]:
    return 0x7F_FF00, None


def _remote_other_pd(b: Node) -> tuple[int, MemoryRegion | None]:
    t = registered(local_node(b), 4096, RW)
    return t.rkey, t.mr


def _remote_stale_byte(b: Node) -> tuple[int, MemoryRegion | None]:
    t = FrBuffer(b, 4096, RW)
    return (t.rkey & ~0xFF) | ((t.rkey + 1) & 0xFF), t.mr


def _remote_dma_mr(b: Node) -> tuple[int, MemoryRegion | None]:
    return b.pd.unsafe_global_rkey, b.pd.internal_mr


REMOTE_REFUSED: dict[str, Callable[[Node], tuple[int, MemoryRegion | None]]] = {
    "unknown-key": _remote_unknown,
    "mr-of-another-pd": _remote_other_pd,
    "stale-key-byte": _remote_stale_byte,
    "global-rkey-dma-mr": _remote_dma_mr,
}


@pytest.mark.parametrize("case", list(REMOTE_REFUSED))
def test_refused_remote_invalidate(case: str) -> None:
    fabric, a, b = pair("cpu", "hw-iommu", pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    key, mr = REMOTE_REFUSED[case](b)
    before = None if mr is None else (mr.state, mr.rkey)
    frames = record(fabric)
    src, sink = Buffer(a.dev, 64), Buffer(b.dev, 64)
    src.fill(b"please invalidate")
    b.qp.post_recv(RecvWR(5, (sink.sge(b.pd.local_dma_lkey),)))
    a.qp.post_send(
        SendWR(
            1,
            IbWrOpcode.SEND_WITH_INV,
            (src.sge(a.pd.local_dma_lkey, 0, 17),),
            send_flags=SIG,
            invalidate_rkey=key,
        )
    )
    (got,) = b.wait(1)
    assert (got.wr_id, got.status) == (5, IbWcStatus.REM_INV_REQ_ERR)
    assert b.qp.state == IbQpState.ERR
    if mr is not None:
        assert (mr.state, mr.rkey) == before, "the MR stays valid"
    # softrdma NAKs the SEND (invalid request); rxe ACKs it before its QP fails.
    (sent,) = a.wait(1)
    assert (sent.wr_id, sent.status) == (1, IbWcStatus.REM_INV_REQ_ERR)
    assert nak_codes(frames) == [NakCode.INVALID_REQUEST]


def test_remote_invalidate_of_an_mr_without_remote_access() -> None:
    """rxe invalidates it: ``rxe_reg_fast_mr`` sets rkey = key whatever the
    access, and ``rxe_invalidate_rkey`` / ``rxe_invalidate_mr`` check only
    the key, the MR type and bound windows — not the access flags."""
    _fabric, a, b = pair("cpu", "hw-iommu")
    t = FrBuffer(b, 4096, IbAccess.LOCAL_WRITE)
    src, sink = Buffer(a.dev, 64), Buffer(b.dev, 64)
    src.fill(b"please invalidate")
    b.qp.post_recv(RecvWR(5, (sink.sge(b.pd.local_dma_lkey),)))
    a.qp.post_send(
        SendWR(
            1,
            IbWrOpcode.SEND_WITH_INV,
            (src.sge(a.pd.local_dma_lkey, 0, 17),),
            send_flags=SIG,
            invalidate_rkey=t.rkey,
        )
    )
    assert statuses(a.wait_ok()) == [(1, IbWcStatus.SUCCESS)]
    (got,) = b.wait_ok()
    assert got.wc_flags & IbWcFlags.WITH_INVALIDATE and got.invalidate_rkey == t.rkey
    assert got.byte_len == 17 and sink.read(17) == b"please invalidate"
    assert t.mr.state == MrState.FREE
    # ... and the MR can be registered again with the next key.
    b.qp.post_send(
        RegWR(
            2,
            IbWrOpcode.REG_MR,
            send_flags=SIG,
            mr=t.mr,
            key=ib_inc_rkey(t.rkey),
            access=RW,
        )
    )
    assert statuses(b.wait_ok()) == [(2, IbWcStatus.SUCCESS)]
    assert state_of(t.mr) == MrState.VALID
