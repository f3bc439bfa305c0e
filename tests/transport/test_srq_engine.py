"""RC engines taking receives from a shared receive queue
(:class:`~softrdma.transport.srq.SharedRq`, rxe ``get_srq_wqe``): two
responders sharing one SRQ over lossy links deliver every message once,
whole, into its own WQE; hostile packets never raise and never lose a
WQE; the limit fires once."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softrdma.transport.errors import LocalProtocolError
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_MASK, psn_add
from softrdma.transport.rc import RcQp
from softrdma.transport.srq import SharedRq
from softrdma.transport.wqe import LastWqeReached, SrqLimitReached
from softrdma.verbs.enums import IbQpState, IbWcOpcode, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import RecvWR, SendWR

from .engine_harness import QPN_B, Lossy, Pair, connect, pattern, to_state
from .fakemem import FakeMemory
from .strategies import packets

SLOT = 4096


def shared(
    pairs: int, srq: SharedRq, mem: FakeMemory, lossy: random.Random | None = None, **kw: object
) -> list[Pair]:
    """``pairs`` RC pairs whose B sides take from ``srq`` in one memory;
    with ``lossy`` each A → B link drops, duplicates and reorders."""
    out = []
    for i in range(pairs):
        if lossy is not None:
            kw["ab"] = Lossy(random.Random(lossy.random()), 0.1, 0.05, 0.2, 0.05)
        p = Pair(**kw)  # type: ignore[arg-type]
        p.mem_b = mem
        p.b = RcQp(QPN_B + i, mem, sq_sig_all=True, srq=srq)
        connect(p.b, p.pb)
        out.append(p)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_two_responders_share_one_srq_over_lossy_links(seed: int) -> None:
    mem = FakeMemory()
    srq = SharedRq(0x40, 32, 2)
    rx = mem.reg(SLOT * 16)
    for i in range(16):
        srq.post_recv(RecvWR(i, (rx.sge(i * SLOT, SLOT),)))
    rng = random.Random(seed)
    pairs = shared(2, srq, mem, rng, mtu=256)
    sent: dict[bytes, int] = {}
    for n in range(12):
        p = pairs[n % 2]
        data = pattern(rng.randrange(1, 3000), seed * 100 + n)
        src = p.mem_a.reg(len(data), fill=data)
        p.post(SendWR(n, Op.SEND, (src.sge(),)))
        sent[data] = n % 2
    for _ in range(2000):
        busy = False
        for p in pairs:
            busy |= p.step()
        if all(p.n_send_a == 6 for p in pairs):
            break
        if not busy:
            for p in pairs:
                d = [x for x in (p.a.next_deadline(), p.b.next_deadline()) if x is not None]
                if d:
                    p.now = max(p.now, min(d))
    for p in pairs:
        assert [wc.status for wc in p.send_wcs()] == [IbWcStatus.SUCCESS] * 6
    got: dict[bytes, int] = {}
    for i, p in enumerate(pairs):
        for wc in p.recv_wcs():
            assert wc.status is IbWcStatus.SUCCESS and wc.opcode is IbWcOpcode.RECV
            got[rx[wc.wr_id * SLOT : wc.wr_id * SLOT + wc.byte_len]] = i
    assert got == sent
    assert len(srq) == 4 and not any(p.b.resp.wqe for p in pairs)


def test_limit_fires_once_and_error_flushes_the_held_wqe() -> None:
    mem = FakeMemory()
    srq = SharedRq(0x40, 8, 1, limit=2)
    rx = mem.reg(SLOT * 4)
    for i in range(4):
        srq.post_recv(RecvWR(i, (rx.sge(i * SLOT, SLOT),)))
    (p,) = shared(1, srq, mem, mtu=256)
    for n in range(3):
        src = p.mem_a.reg(100, fill=b"x" * 100)
        p.post(SendWR(n, Op.SEND, (src.sge(),)))
    p.run_until_completions(3, 3)
    assert [e for e in p.events_b if isinstance(e, SrqLimitReached)] == [SrqLimitReached(0x40)]
    assert srq.limit == 0 and len(srq) == 1
    # A SEND whose FIRST took the last WQE, then ERR: that WQE flushes and
    # the QP reports its last WQE.
    src = p.mem_a.reg(1000, fill=b"y" * 1000)
    p.post(SendWR(9, Op.SEND, (src.sge(),)))
    out = p.a.poll(p.now)
    p.b.receive(out.packets[0].pkt, p.now)
    assert p.b.resp.wqe is not None and len(srq) == 0
    to_state(p.b, p.pb, IbQpState.ERR)
    ob = p.b.poll(p.now)
    assert [(c.wc.wr_id, c.wc.status) for c in ob.completions] == [(3, IbWcStatus.WR_FLUSH_ERR)]
    assert ob.events == [LastWqeReached()]


def test_shared_rq_rules() -> None:
    srq = SharedRq(0x40, 2, 1)
    srq.post_recv(RecvWR(1, ()))
    srq.post_recv(RecvWR(2, ()))
    with pytest.raises(LocalProtocolError):
        srq.post_recv(RecvWR(3, ()))
    with pytest.raises(LocalProtocolError):
        srq.modify(1, None)  # below the 2 queued
    with pytest.raises(LocalProtocolError):
        srq.modify(None, 3)
    srq.modify(4, 2)
    with pytest.raises(LocalProtocolError):
        srq.modify(1, None)
    events: list[object] = []
    assert srq.take(events) is not None  # type: ignore[arg-type]
    assert events == [SrqLimitReached(0x40)]
    p = Pair()
    p.b = RcQp(QPN_B, p.mem_b, srq=srq)
    with pytest.raises(LocalProtocolError):
        p.b.post_recv(RecvWR(5, ()))  # it has no receive queue of its own
    with pytest.raises(LocalProtocolError):
        SharedRq(1, 0, 1)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(packets(max_payload=600), min_size=1, max_size=12),
    st.integers(0, PSN_MASK),
)
def test_hostile_packets_never_lose_a_wqe(pkts: list[Packet], base: int) -> None:
    """Any decodable packet at PSNs near the expected one: never an
    exception, and every WQE taken off the SRQ is either completed or
    held by the message in progress."""
    mem = FakeMemory()
    srq = SharedRq(0x40, 8, 1)
    rx = mem.reg(8 * 512)
    for i in range(8):
        srq.post_recv(RecvWR(i, (rx.sge(i * 512, 512),)))
    (p,) = shared(1, srq, mem, mtu=256, psn_a=base)
    recv = 0
    for q in pkts:
        q.bth = q.bth._replace(psn=psn_add(base, q.bth.psn % 24 - 4))
        p.b.receive(Packet.decode(q.encode()), 0.0)
        out = p.b.poll(1.0)
        recv += sum(c.wc.opcode in (IbWcOpcode.RECV, IbWcOpcode.RECV_RDMA_WITH_IMM)
                    or c.wc.status is not IbWcStatus.SUCCESS for c in out.completions)  # fmt: skip
    held = 1 if p.b.resp.wqe is not None else 0
    assert len(srq) + recv + held == 8
