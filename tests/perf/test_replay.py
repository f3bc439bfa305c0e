"""The RoCE requests of real ``ib_write_bw``, ``ib_read_bw`` and
``ib_atomic_bw`` clients (``tests/data/captures``) replayed into a responder
that ``softrdma perf``'s server set up — its QP connected from the key line
the client sent, its out_reads as max_dest_rd_atomic, its buffer registered
with a fast-registration MR — get the answers rxe gave, request by request
and byte for byte (the transport headers and payloads; the RETH / AtomicETH
name our VADDR and RKEY instead of rxe's, at the same offsets).

The capture machinery is the transport replay's (``tests/transport``): the
same request/answer attribution and memory reconstruction.
"""

from __future__ import annotations

import dataclasses

import pytest

from softrdma.perf.context import PerfContext
from softrdma.perf.engine_bw import ATOMIC_ADD_VALUE, step_size
from softrdma.perf.oob import PingpongDest
from softrdma.perf.params import TOOLS, PerfParams
from softrdma.transport.roce import RoceFrame, rdma_get_udp_sport
from softrdma.verbs.enums import IbMtu
from tests.fabric.fakelink import FakeNetwork, Transmitted
from tests.perf.oob_capture import tcp_segments
from tests.rdma.nodes import make_device
from tests.transport._replay_capture import (
    BY_ID,
    NETDEV_MTU,
    PATH_MTU,
    QPN,
    RXE_MAX_QP_RD_ATOM,
    _decode_as_udp_socket,
    _expected_memory,
    _remote_base,
    _requests,
    _responses,
    _rxe_answers,
)
from tests.transport._replay_run import _summary

SIZES = {"write_bw": 8192, "read_bw": 8192, "atomic_bw": None}


def _keys(capture: str) -> tuple[PingpongDest, PingpongDest]:
    """(client's, server's) first key line."""
    segs = tcp_segments(capture)
    first = {
        c: next(s.data for s in segs if s.client == c and len(s.data) == 108) for c in (True, False)
    }
    return PingpongDest.unpack(first[True]), PingpongDest.unpack(first[False])


def _translate(rf: RoceFrame, theirs: PingpongDest, ours: PingpongDest) -> RoceFrame:
    p = rf.packet
    if p.reth is not None:
        assert p.reth.rkey == theirs.rkey
        reth = p.reth._replace(va=ours.vaddr + p.reth.va - theirs.vaddr, rkey=ours.rkey)
        return dataclasses.replace(rf, packet=dataclasses.replace(p, reth=reth))
    if p.atmeth is None:
        return rf  # a WRITE MIDDLE / LAST: no address
    assert p.atmeth.rkey == theirs.rkey
    atmeth = p.atmeth._replace(va=ours.vaddr + p.atmeth.va - theirs.vaddr, rkey=ours.rkey)
    return dataclasses.replace(rf, packet=dataclasses.replace(p, atmeth=atmeth))


@pytest.mark.parametrize("tool", sorted(SIZES))
def test_perf_server_answers_like_rxe(tool: str) -> None:
    s = BY_ID[tool]
    requests, responses = _requests(s), _responses(s)
    rxe = _rxe_answers(requests, responses)
    client, server = _keys(s.capture)
    assert client.out_reads == server.out_reads == (1 if tool == "write_bw" else RXE_MAX_QP_RD_ATOM)

    net = FakeNetwork()
    loop = net.scheduler
    dev = make_device("cpu", net, str(s.responder), netdev_mtu=NETDEV_MTU)
    link = net.links[s.responder]
    size = SIZES[tool]
    params = PerfParams.build(TOOLS[tool], size=size, iters=20)
    assert params.out_reads == server.out_reads  # the device's max_qp_rd_atom, like rxe's
    ctx = PerfContext(dev, params, sgid_index=1)
    try:
        (mine,) = ctx.my_dests(psns=[server.psn])
        assert (mine.qpn, mine.out_reads, mine.gid) == (QPN, server.out_reads, server.gid)
        assert dev.query_port().active_mtu == PATH_MTU
        ctx.connect(IbMtu(3), [mine], [client])  # REG_MR included
        # the memory the capture shows behind the VADDR
        remote = _remote_base(s)
        assert remote is not None and remote[0] == server.vaddr and remote[2] == server.rkey
        before, after = _expected_memory(requests, responses, remote[0], remote[1])
        for off in range(0, len(before), 4096):
            dev.host.cpu_write(ctx.cpu_addr(mine.vaddr + off), bytes(before[off : off + 4096]))
        loop.run()
        sent_before = len(link.sent)
        for q in requests:
            rf = _translate(_decode_as_udp_socket(q), server, mine)
            at = max(q.time, loop.time())
            link.deliver(rf, at)
            loop.run(until=at)
        loop.run(until=loop.time() + 10.0)
        ours: list[list[Transmitted]] = [[] for _ in requests]
        for t in link.sent[sent_before:]:
            ours[t.after - 1].append(t)
        for k, q in enumerate(requests):
            got = [_summary(t.packet) for t in ours[k]]
            want = [_summary(d.packet) for d in rxe[k]]
            assert got == want, f"answers to request {q}"
            for t, d in zip(ours[k], rxe[k], strict=True):
                assert t.packet.encode() == d.packet.encode()
                assert t.sport == d.sport == rdma_get_udp_sport(0, QPN, QPN)
        assert ctx.read(mine.vaddr, len(after)) == bytes(after)
        assert dev.stats["rcvd_pkts"] >= len(requests)
    finally:
        ctx.close()


def test_atomic_requests_are_what_perftest_posts() -> None:
    """ib_atomic_bw's FETCH_AND_ADDs add ATOMIC_ADD_VALUE at the VADDR
    stepped by 64 bytes (the cache line), as the BW engine posts them."""
    s = BY_ID["atomic_bw"]
    _, server = _keys(s.capture)
    reqs = [q.packet for q in _requests(s)]
    assert {p.atmeth.swap_add for p in reqs if p.atmeth} == {ATOMIC_ADD_VALUE}
    offsets = [p.atmeth.va - server.vaddr for p in reqs if p.atmeth]
    assert offsets == [64 * k for k in range(20)]


def test_write_requests_all_target_the_vaddr() -> None:
    """8192 bytes is more than half the 4096-byte cycle buffer: every WRITE
    goes to the VADDR itself (no stepping), signalled as perftest does."""
    s = BY_ID["write_bw"]
    _, server = _keys(s.capture)
    firsts = [q.packet for q in _requests(s) if q.packet.reth is not None]
    assert len(firsts) == 20 and {p.reth.va for p in firsts if p.reth} == {server.vaddr}
    assert step_size(8192, 64) == 8192 and not 8192 <= 4096 // 2
