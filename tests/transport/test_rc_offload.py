"""Segmentation offload at the engine level: a requester handing on
:class:`SegRun` runs, and a responder taking them with
:meth:`RcQp.receive_run`, do exactly what the packets one by one do — the
same packets on the wire (runs split), completions, events, memory — with
hostile packets, losses and go-back-N retries in between.

The pump delivers as the device does (:meth:`RoceDevice.receive_burst`): a
run's first packet on its own and a poll, then as many packets as the QP
takes at once and a poll, the rest one by one with a poll after each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softrdma.transport.burst import SegRun
from softrdma.transport.packet import Packet
from softrdma.transport.psn import psn_add
from softrdma.transport.rc import RcQp
from softrdma.transport.wqe import Completion, SendWqe
from softrdma.verbs.enums import IbAccess
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import AtomicWriteWR, FlushWR, RdmaWR, RecvWR, SendWR

from .engine_harness import Pair, pattern
from .strategies import packets

MTU = 256
REMOTE = IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ
# FLUSH and ATOMIC WRITE (single-packet requests) are mixed in with the runs
REMOTE_A19 = REMOTE | IbAccess.FLUSH_GLOBAL


@dataclass
class Trace:
    """Everything one side put out, frames expanded, in order."""

    frames: list[bytes] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    events: list[object] = field(default_factory=list)
    runs: int = 0


def _take(qp: RcQp, now: float, trace: Trace) -> list[Packet | SegRun]:
    out = qp.poll(now)
    trace.completions += out.completions
    trace.events += out.events
    items: list[Packet | SegRun] = []
    for op in out.packets:
        run = op.run
        if run is not None:
            assert op.pkt == run.packets(0, 1)[0]
            trace.runs += 1
            trace.frames += [p.encode() for p in run.packets()]
            items.append(run)
        else:
            trace.frames.append(op.pkt.encode())
            items.append(op.pkt)
    return items


def _deliver(
    dst: RcQp,
    items: list[Packet | SegRun],
    now: float,
    trace: Trace,
    lose: set[int],
    count: list[int],
) -> list[Packet | SegRun]:
    """Deliver ``items`` to ``dst`` as the device does; frames whose index
    (over the whole run of the test) is in ``lose`` are lost — a run with
    a lost frame travels as frames, as behind a fault. Returns what
    ``dst`` sent meanwhile."""
    sent: list[Packet | SegRun] = []
    for item in items:
        if isinstance(item, SegRun):
            first = count[0]
            count[0] += item.count
            if any(first <= i < count[0] for i in lose):
                pkts = item.packets()
                for k, pkt in enumerate(pkts):
                    if first + k not in lose:
                        dst.receive(Packet.decode(pkt.encode()), now)
                        sent += _take(dst, now, trace)
                continue
            i = 0
            while i < item.count:
                took = dst.receive_run(item, i) if i else 0
                if took:
                    i += took
                else:
                    dst.receive(item.packets(i, i + 1)[0], now)
                    i += 1
                sent += _take(dst, now, trace)
        else:
            idx = count[0]
            count[0] += 1
            if idx not in lose:
                dst.receive(item, now)
                sent += _take(dst, now, trace)
    return sent


def _scenario(
    offload: bool, sizes: list[int], hostile: list[Packet], lose: set[int]
) -> tuple[Trace, Trace, bytes, bytes]:
    p = Pair(
        mtu=MTU,
        psn_a=0xFFFFF0,
        psn_b=0x100,
        a_kw={"timeout": 10},
        b_kw={"qp_access_flags": REMOTE_A19},
    )
    if offload:
        p.a.offload = lambda: True
    src = p.mem_a.reg(64 * 1024)
    src.buf[:] = pattern(64 * 1024, 3)
    dst = p.mem_b.reg(64 * 1024, access=REMOTE_A19)
    rbuf = p.mem_b.reg(64 * 1024)
    off = 0
    for k, n in enumerate(sizes):
        if k % 4 == 3:
            # a FLUSH of what was written so far, then an ATOMIC WRITE
            p.post(FlushWR(k, Op.FLUSH, remote_addr=dst.iova, rkey=dst.key, flush_len=off))
            va = dst.iova + (off & ~7)
            p.post(AtomicWriteWR(k, Op.ATOMIC_WRITE, remote_addr=va, rkey=dst.key,
                                 atomic_wr=n.to_bytes(8, "little")))  # fmt: skip
        if k % 3 == 2:
            p.post_recv(RecvWR(k, (rbuf.sge(0, 64 * 1024),)))
            p.post(SendWR(k, Op.SEND, (src.sge(off, n),)))
        else:
            opcode = Op.RDMA_WRITE_WITH_IMM if k % 5 == 4 else Op.RDMA_WRITE
            if opcode is Op.RDMA_WRITE_WITH_IMM:
                p.post_recv(RecvWR(k, (rbuf.sge(0, 16),)))
            p.post(RdmaWR(k, opcode, (src.sge(off, n),), remote_addr=dst.iova + off, rkey=dst.key))
        off = (off + n) % (32 * 1024)
    ta, tb = Trace(), Trace()
    count = [0]
    now = 0.0
    for step in range(400):
        items = _take(p.a, now, ta)
        if step < len(hostile):  # a hostile packet lands between bursts
            q = hostile[step]
            q.bth = q.bth._replace(psn=psn_add(0xFFFFF0, q.bth.psn % 64 - 8))
            p.b.receive(Packet.decode(q.encode()), now)
            items_b = _take(p.b, now, tb)
        else:
            items_b = []
        items_b += _deliver(p.b, items, now, tb, lose, count)
        _deliver(p.a, items_b, now, ta, set(), [0])
        if not items and not items_b:
            deadlines = [d for d in (p.a.next_deadline(), p.b.next_deadline()) if d is not None]
            if not deadlines:
                break
            now = max(now, min(deadlines))
    return ta, tb, bytes(dst.buf), bytes(rbuf.buf)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.integers(0, 100 * MTU), min_size=1, max_size=6),
    st.lists(packets(max_payload=300), max_size=3),
    st.sets(st.integers(0, 400), max_size=4),
)
def test_runs_do_what_the_packets_do(
    sizes: list[int], hostile: list[Packet], lose: set[int]
) -> None:
    """Offload on and off give the same frames, completions, events and
    memory, whatever hostile packets and losses come in between."""
    on = _scenario(True, sizes, [Packet.decode(q.encode()) for q in hostile], lose)
    off = _scenario(False, sizes, [Packet.decode(q.encode()) for q in hostile], lose)
    ta_on, tb_on, dst_on, rb_on = on
    ta_off, tb_off, dst_off, rb_off = off
    assert ta_on.frames == ta_off.frames
    assert tb_on.frames == tb_off.frames
    assert ta_on.completions == ta_off.completions
    assert tb_on.completions == tb_off.completions
    assert ta_on.events == ta_off.events and tb_on.events == tb_off.events
    assert dst_on == dst_off and rb_on == rb_off
    assert ta_off.runs == 0


def test_a_long_write_travels_as_runs_and_lands() -> None:
    """A 12-packet WRITE with offload on is runs (AckReq where the packets
    have it), lands byte-exact and completes."""
    ta, _tb, dst, _ = _scenario(True, [12 * MTU], [], set())
    assert ta.runs >= 1
    assert dst[: 12 * MTU] == pattern(64 * 1024, 3)[: 12 * MTU]
    assert [c.wc.wr_id for c in ta.completions] == [0]


def test_a_wqe_fault_midway_stops_the_run_where_the_packets_stop() -> None:
    """A local protection fault in the middle of a message: the packets
    before it go out, then the WQE fails — the same with offload on."""
    results = []
    for offload in (True, False):
        p = Pair(mtu=MTU)
        if offload:
            p.a.offload = lambda: True
        src = p.mem_a.reg(2 * MTU)
        dst = p.mem_b.reg(8 * MTU, access=REMOTE)
        # the second SGE's lkey is bad: packet 2 of the message faults
        bad = src.sge(0, 2 * MTU)
        sges = (bad, type(bad)(bad.addr, 2 * MTU, bad.lkey ^ 0x1000))
        p.a.post_send(
            SendWqe.from_wr(
                RdmaWR(1, Op.RDMA_WRITE, sges, remote_addr=dst.iova, rkey=dst.key),
                sq_sig_all=True,
            )
        )
        out = p.a.poll(0.0)
        frames = [
            q.encode()
            for op in out.packets
            for q in (op.run.packets() if op.run is not None else [op.pkt])
        ]
        p.run(max_time=1.0)
        results.append((frames, [c.wc.status for c in p.comps_a]))
    assert results[0] == results[1]
    assert len(results[0][0]) == 2
