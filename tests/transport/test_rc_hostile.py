"""Hostile packets never raise out of the engines.

Two RC engines back to back (:class:`.engine_harness.Pair`).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_MASK, psn_add
from softrdma.verbs.enums import IbAccess
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR

from .engine_harness import Pair
from .strategies import packets


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(packets(max_payload=600), min_size=1, max_size=12),
    st.integers(0, PSN_MASK),
    st.booleans(),
)
def test_hostile_packets_never_raise(pkts: list[Packet], base: int, near: bool) -> None:
    """Any decodable packet, at any PSN, in any state of the engines: the IBTA
    answer (NAK, drop, QP error) and never an exception; no write lands
    outside the granted MR."""
    p = Pair(mtu=256, psn_a=base, psn_b=psn_add(base, 40))
    src = p.mem_a.reg(2048)
    dst = p.mem_b.reg(2048, access=IbAccess.LOCAL_WRITE | IbAccess.REMOTE_READ)
    rb = p.mem_b.reg(512)
    p.post_recv(RecvWR(1, (rb.sge(),)))
    p.post(RdmaWR(1, Op.RDMA_READ, (src.sge(0, 1000),), remote_addr=dst.iova, rkey=dst.key))
    p.post(
        AtomicWR(2, Op.ATOMIC_FETCH_AND_ADD, (src.sge(0, 8),), remote_addr=dst.iova, rkey=dst.key)
    )
    p.post(SendWR(3, Op.SEND, (src.sge(0, 700),)))
    p.a.poll(0.0)
    for q in pkts:
        if near:  # aim at the PSN windows both sides care about
            q.bth = q.bth._replace(psn=psn_add(base, q.bth.psn % 96 - 16))
        q = Packet.decode(q.encode())
        p.a.receive(q, 0.0)
        p.b.receive(q, 0.0)
        p.a.poll(1.0)
        p.b.poll(1.0)
    p.run(max_time=50.0)
    assert dst[0:2048] == bytes(2048)  # never granted REMOTE_WRITE
