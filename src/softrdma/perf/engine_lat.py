"""The latency tests' data path (``perftest_resources.c``:
``run_iter_lat_write``, ``run_iter_lat``, ``run_iter_lat_send``).

* write_lat: a ping-pong on the last byte of the buffer. Each side WRITEs
  ``size`` bytes from its send slot to the peer's VADDR after storing the
  iteration count (mod 256) in the last byte, then waits until the peer's
  WRITE has put the same count in the last byte of its own VADDR slot; the
  server starts (perftest's ``!(scnt < 1 && machine == SERVER)``). The WRITE's completion is polled each time.
* read_lat: the client READs ``size`` bytes from the peer's VADDR and waits
  for the completion, one at a time; the server only answers.
* send_lat: a SEND ping-pong; each side keeps receives posted, the server
  answers each receive with a SEND.

The time of each post is kept; the report works on the differences
between consecutive posts (a round trip, halved for write and send).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from softrdma.perf.context import PerfContext, PerfError
from softrdma.perf.engine_bw import (
    STALL_TIMEOUT,
    Progress,
    Receives,
    completion_error,
)
from softrdma.verbs.enums import IbQpState, IbSendFlags, IbWcOpcode, IbWcStatus, IbWrOpcode
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.wr import RdmaWR, SendWR, Sge, WorkCompletion

__all__ = ["DurationSample", "run_iter_lat_read", "run_iter_lat_send", "run_iter_lat_write"]

#: How long one wait for the peer's byte sleeps before looking again.
BYTE_WAIT = 0.0005
LINGER = 1.0
"""write_lat ``-D``: seconds this side goes on answering after its run."""


class _Poller:
    """Completions of one QP's CQ, sorted into sends and receives."""

    def __init__(self, ctx: PerfContext) -> None:
        self.ctx = ctx
        self.sends = 0
        self.recvs = 0

    def _take(self, scnt: int, rcnt: int) -> None:
        for wc in self.ctx.cq.poll(16):
            self._check(wc, scnt, rcnt)
            if wc.opcode == IbWcOpcode.RECV:
                self.recvs += 1
            else:
                self.sends += 1

    def _check(self, wc: WorkCompletion, scnt: int, rcnt: int) -> None:
        if wc.status != IbWcStatus.SUCCESS:
            raise completion_error(wc, "client" if self.ctx.params.servername else "server",
                                   scnt, rcnt)  # fmt: skip

    def wait(self, sends: int, recvs: int, scnt: int, rcnt: int, until: float = 0.0) -> bool:
        """Until ``sends`` send and ``recvs`` receive completions have come
        (True), or the ``until`` deadline of a ``-D`` run passed (False)."""
        end = time.monotonic() + STALL_TIMEOUT
        cq = self.ctx.cq
        while self.sends < sends or self.recvs < recvs:
            self._take(scnt, rcnt)
            if self.sends >= sends and self.recvs >= recvs:
                return True
            now = time.monotonic()
            if until and now >= until:
                return False
            if now > end:
                raise PerfError(f" Test stalled: no completion in {STALL_TIMEOUT:.0f} s")
            cq.wait(min(0.05, until - now) if until else 0.05)
        return True


def _post(ctx: PerfContext, wr: SendWR, scnt: int) -> None:
    try:
        ctx.qps[0].post_send(wr)
    except VerbsError as e:
        raise PerfError(f"Couldn't post send: scnt={scnt}: {e}") from None


def _wait_byte(ctx: PerfContext, iova: int, value: int, until: float = 0.0) -> bool:
    """Spin (sleeping a little between looks) until the byte at ``iova``
    is ``value`` (True) or the ``until`` deadline of a ``-D`` run passed
    (False); the peer's WRITE lands there without a completion."""
    end = time.monotonic() + STALL_TIMEOUT
    dev = ctx.dev
    qp = ctx.qps[0]
    value &= 0xFF
    while ctx.read_byte(iova) != value:
        if qp.state == IbQpState.ERR:
            raise PerfError(" The QP went to the error state while waiting for the peer")
        now = time.monotonic()
        if until and now >= until:
            return False
        if now > end:
            raise PerfError(f" Test stalled: the peer wrote nothing for {STALL_TIMEOUT:.0f} s")
        with dev.lock:
            dev.wait(lambda: ctx.read_byte(iova) == value, BYTE_WAIT)
    return True


@dataclass
class DurationSample:
    """What a ``-D`` latency run measured (``print_report_lat_duration``):
    the ping-pongs completed and the seconds they took."""

    iters: int
    seconds: float


def run_iter_lat_write(
    ctx: PerfContext,
    size: int,
    remote: tuple[int, int],
    *,
    progress: Progress | None = None,
    duration: float = 0.0,
) -> list[float] | DurationSample:
    """``run_iter_lat_write``; the post times, or with ``duration`` (``-D``)
    what the run did in that many seconds."""
    p = ctx.params
    client = p.servername is not None
    slot = ctx.slot(0)
    post_byte = slot.local + size - 1
    poll_byte = slot.remote + size - 1
    vaddr, rkey = remote
    wr = RdmaWR(0, IbWrOpcode.RDMA_WRITE, (Sge(slot.local, size, ctx.lkey),),
                IbSendFlags.SIGNALED, remote_addr=vaddr, rkey=rkey)  # fmt: skip
    poller = _Poller(ctx)
    tposted: list[float] = []
    clock = time.perf_counter
    scnt = rcnt = done = 0
    iters = (1 << 62) if duration else p.iters
    start = time.monotonic()
    until = start + duration if duration else 0.0
    # -D: perftest's side spins on the byte until its own timer ends and may
    # not look at the timer while it spins, so this side keeps answering for
    # a while after its own end (uncounted) rather than leave it waiting
    stop = until + LINGER if duration else 0.0
    elapsed = 0.0
    while scnt < iters or rcnt < iters:
        if rcnt < iters and not (scnt < 1 and not client):  # the server starts
            rcnt += 1
            if not _wait_byte(ctx, poll_byte, rcnt, stop):
                break
        if scnt >= iters:
            continue  # the last answer is in
        if stop and time.monotonic() >= stop:
            break
        tposted.append(clock())
        scnt += 1
        ctx.write_byte(post_byte, scnt)
        _post(ctx, wr, scnt)
        if not poller.wait(scnt, 0, scnt, rcnt, stop):
            break
        now = time.monotonic()
        if until and now >= until:
            continue  # lingering: not counted
        done += 1
        elapsed = now - start
        if progress is not None:
            progress(1)
    if duration:
        return DurationSample(done, elapsed)
    return tposted


def run_iter_lat_read(
    ctx: PerfContext,
    size: int,
    remote: tuple[int, int],
    *,
    progress: Progress | None = None,
    duration: float = 0.0,
) -> list[float] | DurationSample:
    """``run_iter_lat`` for READ: one outstanding READ at a time (``-D``:
    for that many seconds)."""
    p = ctx.params
    slot = ctx.slot(0)
    vaddr, rkey = remote
    wr = RdmaWR(0, IbWrOpcode.RDMA_READ, (Sge(slot.local, size, ctx.lkey),),
                IbSendFlags.SIGNALED, remote_addr=vaddr, rkey=rkey)  # fmt: skip
    poller = _Poller(ctx)
    tposted: list[float] = []
    clock = time.perf_counter
    start = time.monotonic()
    until = start + duration if duration else 0.0
    done = 0
    for scnt in range(1, (1 << 62 if duration else p.iters) + 1):
        if until and time.monotonic() >= until:
            break
        tposted.append(clock())
        _post(ctx, wr, scnt)
        if not poller.wait(scnt, 0, scnt, 0, until):
            break
        done += 1
        if progress is not None:
            progress(1)
    if duration:
        return DurationSample(done, time.monotonic() - start)
    return tposted


def run_iter_lat_send(
    ctx: PerfContext, recvs: Receives, *, progress: Progress | None = None, duration: float = 0.0
) -> list[float] | DurationSample:
    """``run_iter_lat_send``: the client SENDs first; each side answers a
    receive with a SEND and reposts receives while more are due (``-D``:
    always, for that many seconds)."""
    p = ctx.params
    client = p.servername is not None
    size = recvs.size
    slot = ctx.slot(0)
    wr = ctx.send_wr(0, Sge(slot.local, size, ctx.lkey), IbSendFlags.SIGNALED)
    poller = _Poller(ctx)
    tposted: list[float] = []
    clock = time.perf_counter
    scnt = rcnt = done = 0
    iters = (1 << 62) if duration else p.iters
    start = time.monotonic()
    until = start + duration if duration else 0.0
    while scnt < iters or rcnt < iters:
        if rcnt < iters and not (scnt < 1 and client):
            rcnt += 1
            if not poller.wait(scnt, rcnt, scnt, rcnt, until):
                break
            if recvs.posted[0] < iters:
                recvs.repost(ctx, 0)
        if scnt >= iters:
            continue  # the last answer is in
        if until and time.monotonic() >= until:
            break
        tposted.append(clock())
        scnt += 1
        _post(ctx, wr, scnt)
        if not poller.wait(scnt, 0, scnt, rcnt, until):
            break
        done += 1
        if progress is not None:
            progress(1)
    if duration:
        return DurationSample(done, time.monotonic() - start)
    return tposted
