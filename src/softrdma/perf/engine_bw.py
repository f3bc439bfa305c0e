"""The BW tests' data path (``perftest_resources.c``: ``ctx_set_send_wqes``,
``ctx_set_recv_wqes``, ``run_iter_bw``, ``run_iter_bw_server``).

The client keeps up to ``tx_depth`` work requests outstanding on each QP,
posted ``post_list`` at a time; one in ``cq_mod`` is signalled, and the
last one always, so each completion stands for the ``cq_mod`` requests
before it (CQ moderation, ``-Q``). Each request targets the peer's VADDR
plus a step: while the size is at most half the ``cycle_buffer`` (the page
size both sides agreed on), the local and remote addresses advance by the
size rounded up to the cache line and wrap every ``cycle_buffer / step``
requests (``increase_rem_addr`` / ``increase_loc_addr``); larger messages
all go to the VADDR itself. Atomics are 8 bytes and step by 64.

send_bw's server posts ``rx_depth`` receives per QP before telling the
client to go and reposts one per completion while more are due.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from softrdma.perf.context import PerfContext, PerfError
from softrdma.perf.params import Verb
from softrdma.verbs.enums import IbSendFlags, IbWcOpcode, IbWcStatus, IbWrOpcode
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR, Sge, WorkCompletion

__all__ = [
    "ATOMIC_ADD_VALUE",
    "STALL_TIMEOUT",
    "BwSamples",
    "Receives",
    "completion_error",
    "ctx_side",
    "post_receives",
    "run_iter_bi",
    "run_iter_bw",
    "run_iter_bw_server",
    "step_size",
]

ATOMIC_ADD_VALUE = 1
"""What each FETCH_AND_ADD adds (``ATOMIC_ADD_VALUE``)."""
STALL_TIMEOUT = 60.0
"""A test with no completion for this long gives up (perftest spins on)."""
WAIT_SLICE = 0.05
POLL_BATCH = 64

Progress = Callable[[int], None]


@dataclass
class BwSamples:
    """What ``print_report_bw`` works from: the time each work request was
    posted and each completed (seconds, ``time.perf_counter``)."""

    size: int
    iters: int
    num_qps: int
    tposted: list[float] = field(default_factory=list)
    tcompleted: list[float] = field(default_factory=list)

    @property
    def completed(self) -> int:
        """Work requests completed, over all QPs."""
        return len(self.tcompleted)


def step_size(size: int, cache_line_size: int) -> int:
    """``INC(size, cache_line_size)``: the size rounded up to a cache line."""
    return -(-size // cache_line_size) * cache_line_size


def completion_error(wc: WorkCompletion, side: str, scnt: int, ccnt: int) -> PerfError:
    """``NOTIFY_COMP_ERROR_SEND`` / ``_RECV``: what perftest prints for a
    completion in error."""
    return PerfError(
        f" Completion with error at {side}:\n"
        f" Failed status {int(wc.status)}: wr_id {wc.wr_id} syndrom 0x{wc.vendor_err:x}\n"
        f"scnt={scnt}, ccnt={ccnt}"
    )


class _Stepper:
    """One QP's local and remote addresses as perftest steps them."""

    def __init__(self, local: int, remote: int, size: int, ctx: PerfContext, atomic: bool) -> None:
        p = ctx.params
        self.local0, self.remote0 = local, remote
        self.local, self.remote = local, remote
        inc = step_size(size, p.cache_line_size)
        self.inc = inc
        # atomics always step (size 8); others only while size <= cycle_buffer / 2
        self.steps = atomic or size <= p.cycle_buffer // 2
        self.wrap = max(1, p.cycle_buffer // inc) if self.steps else 0

    def advance(self, count: int) -> None:
        """After request number ``count`` (0-based) was posted."""
        if not self.steps:
            return
        if (count + 1) % self.wrap == 0:
            self.local, self.remote = self.local0, self.remote0
        else:
            self.local += self.inc
            self.remote += self.inc


def _wr(
    ctx: PerfContext, verb: Verb, wr_id: int, st: _Stepper, size: int, rkey: int, flags: IbSendFlags
) -> SendWR:
    sge = (Sge(st.local, size, ctx.lkey),)
    if verb == Verb.WRITE:
        return RdmaWR(wr_id, IbWrOpcode.RDMA_WRITE, sge, flags, remote_addr=st.remote, rkey=rkey)
    if verb == Verb.READ:
        return RdmaWR(wr_id, IbWrOpcode.RDMA_READ, sge, flags, remote_addr=st.remote, rkey=rkey)
    if verb == Verb.ATOMIC:
        if ctx.params.cmp_swap:
            return AtomicWR(
                wr_id, IbWrOpcode.ATOMIC_CMP_AND_SWP, sge, flags,
                remote_addr=st.remote, compare_add=0, swap=0, rkey=rkey,
            )  # fmt: skip
        return AtomicWR(
            wr_id, IbWrOpcode.ATOMIC_FETCH_AND_ADD, sge, flags,
            remote_addr=st.remote, compare_add=ATOMIC_ADD_VALUE, rkey=rkey,
        )  # fmt: skip
    return ctx.send_wr(wr_id, sge[0], flags)


def run_iter_bw(
    ctx: PerfContext,
    size: int,
    remote: list[tuple[int, int]],
    *,
    duration: float = 0.0,
    progress: Progress | None = None,
) -> BwSamples:
    """``run_iter_bw``: the client's side of a BW test at ``size`` bytes;
    ``remote`` is each QP's (VADDR, RKEY) from the peer's key line. With
    ``duration``, run that many seconds instead of ``iters`` requests."""
    p = ctx.params
    verb = p.tool.verb
    nq = len(ctx.qps)
    iters = p.iters
    limit = iters if not duration else 1 << 62
    atomic = verb == Verb.ATOMIC
    size = 8 if atomic else size
    steppers = [_Stepper(ctx.slot(i).local, remote[i][0], size, ctx, atomic) for i in range(nq)]
    scnt, ccnt = [0] * nq, [0] * nq
    covered: list[deque[int]] = [deque() for _ in range(nq)]
    last_signalled = [0] * nq
    samples = BwSamples(size, iters, nq)
    tposted, tcompleted = samples.tposted, samples.tcompleted
    cq, cq_mod, post_list, tx_depth = ctx.cq, p.cq_mod, p.post_list, p.tx_depth
    clock = time.perf_counter
    end = clock() + duration if duration else 0.0
    stopping = False
    last_progress = clock()
    while True:
        if end and not stopping and clock() >= end:
            stopping = True
            limit = 0
        if not stopping:
            for i, qp in enumerate(ctx.qps):
                st, rkey = steppers[i], remote[i][1]
                while scnt[i] < limit and scnt[i] - ccnt[i] + post_list <= tx_depth:
                    wrs: list[SendWR] = []
                    for _ in range(min(post_list, limit - scnt[i])):
                        k = scnt[i]
                        last = k == limit - 1 and not duration
                        signalled = k % cq_mod == cq_mod - 1 or last
                        flags = IbSendFlags.SIGNALED if signalled else IbSendFlags(0)
                        wrs.append(_wr(ctx, verb, i, st, size, rkey, flags))
                        if signalled:
                            covered[i].append(k + 1 - last_signalled[i])
                            last_signalled[i] = k + 1
                        st.advance(k)
                        scnt[i] = k + 1
                    try:
                        qp.post_send(wrs)
                    except VerbsError as e:
                        raise PerfError(f"Couldn't post send: qp {i} scnt={scnt[i]}: {e}") from None
                    now = clock()
                    tposted.extend([now] * len(wrs))
        if not any(covered) and (stopping or all(c >= iters for c in ccnt)):
            break
        wcs = cq.poll(POLL_BATCH)
        if not wcs:
            if clock() - last_progress > STALL_TIMEOUT:
                raise PerfError(
                    f" Test stalled: no completion in {STALL_TIMEOUT:.0f} s\n"
                    f"scnt={sum(scnt)}, ccnt={sum(ccnt)}"
                )
            cq.wait(WAIT_SLICE)
            continue
        now = last_progress = clock()
        done = 0
        for wc in wcs:
            if wc.status != IbWcStatus.SUCCESS:
                raise completion_error(wc, "client", sum(scnt), sum(ccnt))
            n = covered[wc.wr_id].popleft()
            ccnt[wc.wr_id] += n
            done += n
        tcompleted.extend([now] * done)
        if progress is not None:
            progress(done)
    if duration:
        # print_report_bw in duration mode: the count and the average over
        # the run; no peak (one post time), as perftest prints 0.00
        samples.iters = max(1, len(tcompleted) // nq)
        del tposted[1:]
    return samples


@dataclass
class Receives:
    """The receives posted on each QP so far, and where the next goes."""

    size: int
    posted: list[int]
    steppers: list[_Stepper]

    def repost(self, ctx: PerfContext, i: int) -> None:
        """Post QP ``i``'s next receive."""
        st = self.steppers[i]
        length = ctx.recv_length(self.size)
        try:
            ctx.qps[i].post_recv(RecvWR(i, (Sge(st.local, length, ctx.lkey),)))
        except VerbsError as e:
            raise PerfError(f"Couldn't post receive (qp {i}): {e}") from None
        st.advance(self.posted[i])
        self.posted[i] += 1


def post_receives(ctx: PerfContext, size: int, depth: int | None = None) -> Receives:
    """``ctx_set_recv_wqes`` + the first ``rx_depth`` receives on each QP,
    into its VADDR slot stepped as perftest steps it (UD: each with room
    for the GRH before the message)."""
    p = ctx.params
    posted = []
    steppers = []
    length = ctx.recv_length(size)
    for i, qp in enumerate(ctx.qps):
        slot = ctx.slot(i)
        st = _Stepper(slot.remote, slot.remote, length, ctx, False)
        n = min(depth or p.rx_depth, p.iters)
        wrs = []
        for k in range(n):
            wrs.append(RecvWR(i, (Sge(st.local, length, ctx.lkey),)))
            st.advance(k)
        try:
            qp.post_recv(wrs)
        except VerbsError as e:
            raise PerfError(f"Couldn't post receive (qp {i}): {e}") from None
        steppers.append(st)
        posted.append(n)
    return Receives(size, posted, steppers)


def run_iter_bw_server(
    ctx: PerfContext,
    recvs: Receives,
    *,
    progress: Progress | None = None,
    duration: float = 0.0,
) -> BwSamples:
    """``run_iter_bw_server``: send_bw's receiving side, with the receives
    :func:`post_receives` posted; with ``duration`` (``-D``), counting what
    arrives in that many seconds and reposting every receive (those still
    posted at the end take what the client sends until its own end)."""
    p = ctx.params
    nq = len(ctx.qps)
    iters = (1 << 62) if duration else p.iters
    rcnt = [0] * nq
    samples = BwSamples(recvs.size, p.iters, nq)
    clock = time.perf_counter
    samples.tposted.append(clock())
    end = samples.tposted[0] + duration if duration else 0.0
    last_progress = clock()
    total = iters * nq
    while len(samples.tcompleted) < total:
        if end and clock() >= end:
            break
        wcs = ctx.cq.poll(POLL_BATCH)
        if not wcs:
            if end:
                ctx.cq.wait(min(WAIT_SLICE, max(0.0, end - clock())))
                continue  # nothing may come in a -D run: not a stall
            if clock() - last_progress > STALL_TIMEOUT:
                raise PerfError(
                    f" Test stalled: no completion in {STALL_TIMEOUT:.0f} s\nrcnt={sum(rcnt)}"
                )
            ctx.cq.wait(WAIT_SLICE)
            continue
        now = last_progress = clock()
        for wc in wcs:
            if wc.status != IbWcStatus.SUCCESS:
                raise completion_error(wc, "server", sum(rcnt), sum(rcnt))
            i = wc.wr_id
            rcnt[i] += 1
            samples.tcompleted.append(now)
            if recvs.posted[i] < iters:
                recvs.repost(ctx, i)
        if progress is not None:
            progress(len(wcs))
    if duration:
        samples.iters = len(samples.tcompleted) // nq
    return samples


def run_iter_bi(
    ctx: PerfContext, recvs: Receives, *, progress: Progress | None = None
) -> BwSamples:
    """``run_iter_bi``: send_bw ``--bidirectional``, both sides at once:
    SENDs as :func:`run_iter_bw` posts them (``tx_depth`` outstanding, one
    signalled in ``cq_mod``) while the receives :func:`post_receives`
    posted complete and are reposted; done when every SEND completed and
    every message arrived. The report is the sending side's."""
    p = ctx.params
    nq = len(ctx.qps)
    iters, size = p.iters, recvs.size
    cq_mod, tx_depth = p.cq_mod, p.tx_depth
    steppers = [_Stepper(ctx.slot(i).local, 0, size, ctx, False) for i in range(nq)]
    scnt, ccnt, rcnt = [0] * nq, [0] * nq, [0] * nq
    covered: list[deque[int]] = [deque() for _ in range(nq)]
    last_signalled = [0] * nq
    samples = BwSamples(size, iters, nq)
    clock = time.perf_counter
    last_progress = clock()
    while sum(ccnt) < iters * nq or sum(rcnt) < iters * nq:
        for i, qp in enumerate(ctx.qps):
            st = steppers[i]
            wrs: list[SendWR] = []
            while scnt[i] < iters and scnt[i] - ccnt[i] < tx_depth:
                k = scnt[i]
                signalled = k % cq_mod == cq_mod - 1 or k == iters - 1
                flags = IbSendFlags.SIGNALED if signalled else IbSendFlags(0)
                wrs.append(ctx.send_wr(i, Sge(st.local, size, ctx.lkey), flags))
                if signalled:
                    covered[i].append(k + 1 - last_signalled[i])
                    last_signalled[i] = k + 1
                st.advance(k)
                scnt[i] = k + 1
            if wrs:
                try:
                    qp.post_send(wrs)
                except VerbsError as e:
                    raise PerfError(f"Couldn't post send: qp {i} scnt={scnt[i]}: {e}") from None
                samples.tposted.extend([clock()] * len(wrs))
        wcs = ctx.cq.poll(POLL_BATCH)
        if not wcs:
            if clock() - last_progress > STALL_TIMEOUT:
                raise PerfError(
                    f" Test stalled: no completion in {STALL_TIMEOUT:.0f} s\n"
                    f"scnt={sum(scnt)}, ccnt={sum(ccnt)}, rcnt={sum(rcnt)}"
                )
            ctx.cq.wait(WAIT_SLICE)
            continue
        now = last_progress = clock()
        done = 0
        for wc in wcs:
            if wc.status != IbWcStatus.SUCCESS:
                raise completion_error(wc, ctx_side(ctx), sum(scnt), sum(ccnt))
            i = wc.wr_id
            if wc.opcode == IbWcOpcode.RECV:
                rcnt[i] += 1
                if recvs.posted[i] < iters:
                    recvs.repost(ctx, i)
                continue
            n = covered[i].popleft()
            ccnt[i] += n
            done += n
        samples.tcompleted.extend([now] * done)
        if progress is not None and done:
            progress(done)
    return samples


def ctx_side(ctx: PerfContext) -> str:
    """``client`` or ``server``, as perftest's completion errors name them."""
    return "client" if ctx.params.servername is not None else "server"
