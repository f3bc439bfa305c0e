"""Translation once per message, at the engines: the requester maps a WQE's
SGE list once and keeps it across go-back-N retries, the completer maps a
READ's list once for all its responses, and the responder checks an R_Key
once per RETH / AtomicETH and keeps the checked MR (rxe ``qp->resp.mr``)
for the message's other packets — each packet still moves its own bytes.

Two RC engines back to back (:class:`.engine_harness.Pair`) over
:class:`.fakemem.FakeMemory`, which counts the translations asked for.
"""

from __future__ import annotations

from softrdma.transport.opcodes import Opcode
from softrdma.transport.psn import psn_add
from softrdma.verbs.enums import IbWcOpcode, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR

from .engine_harness import DropWhen, Pair, opnames, pattern, wc_ok


def test_write_maps_once_across_a_retry() -> None:
    """A 10-packet WRITE that loses its third packet: go-back-N resends
    eight MIDDLE / LAST packets through the same translated SGE list, and
    the responder writes them through the MR it checked on the FIRST."""
    p = Pair(mtu=256)
    victim = psn_add(p.pa.sq_psn, 2)
    p.ab = DropWhen(lambda q: q.bth.psn == victim, times=1)
    n = 10 * 256
    src = p.mem_a.reg(n, fill=pattern(n))
    dst = p.mem_b.reg(n)
    p.post(
        RdmaWR(
            1, Op.RDMA_WRITE, (src.sge(0, 1000), src.sge(1000)), remote_addr=dst.iova, rkey=dst.key
        )
    )
    p.run_until_completions(1)
    wc_ok(p.send_wcs()[0], IbWcOpcode.RDMA_WRITE)
    assert dst[0:n] == src[0:n]
    assert opnames(p.sent_a[10:])[0] == "RDMA_WRITE_MIDDLE"  # the retry carries no RETH
    assert (p.mem_a.sgl_maps, p.mem_b.rkey_checks) == (1, 1)
    assert p.mem_b.remote_writes == 10  # one write per packet, none twice


def test_read_maps_once_and_checks_each_request() -> None:
    """A 10-response READ whose tail is lost: the completer scatters every
    response through one translated list; the responder checks the key of
    the first request and of the READ asking for the rest (a new RETH)."""
    p = Pair(mtu=256)
    n = 10 * 256
    remote = p.mem_b.reg(n, fill=pattern(n))
    local = p.mem_a.reg(n)
    first = psn_add(p.pa.sq_psn, 6)
    p.ba = DropWhen(lambda q: q.bth.psn == first, times=1)
    p.post(RdmaWR(1, Op.RDMA_READ, (local.sge(),), remote_addr=remote.iova, rkey=remote.key))
    p.run_until_completions(1)
    wc_ok(p.send_wcs()[0], IbWcOpcode.RDMA_READ)
    assert local[0:n] == remote[0:n]
    reqs = [q for q in p.sent_a if q.bth.opcode == Opcode.RC_RDMA_READ_REQUEST]
    assert len(reqs) == 2
    assert (p.mem_a.sgl_maps, p.mem_b.rkey_checks) == (1, 2)


def test_send_maps_each_side_once() -> None:
    p = Pair(mtu=256)
    n = 7 * 256 + 3
    src = p.mem_a.reg(n, fill=pattern(n))
    rbuf = p.mem_b.reg(4096)
    p.post_recv(RecvWR(5, (rbuf.sge(0, 1000), rbuf.sge(1000))))
    p.post(SendWR(1, Op.SEND, (src.sge(),)))
    p.run_until_completions(1, 1)
    assert [wc.status for wc in p.recv_wcs()] == [IbWcStatus.SUCCESS]
    assert rbuf[0:n] == src[0:n]
    assert (p.mem_a.sgl_maps, p.mem_b.sgl_maps) == (1, 1)


def test_atomic_checks_its_key_once() -> None:
    p = Pair(mtu=256)
    target = p.mem_b.reg(64)
    result = p.mem_a.reg(8)
    p.post(
        AtomicWR(
            1,
            Op.ATOMIC_FETCH_AND_ADD,
            (result.sge(),),
            remote_addr=target.iova + 8,
            compare_add=5,
            rkey=target.key,
        )
    )
    p.run_until_completions(1)
    wc_ok(p.send_wcs()[0], IbWcOpcode.FETCH_ADD)
    assert int.from_bytes(target[8:16], "little") == 5
    assert (p.mem_b.rkey_checks, p.mem_b.atomic_count) == (1, 1)
