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

__all__ = ["run_iter_lat_read", "run_iter_lat_send", "run_iter_lat_write"]

#: How long one wait for the peer's byte sleeps before looking again.
BYTE_WAIT = 0.0005


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

    def wait(self, sends: int, recvs: int, scnt: int, rcnt: int) -> None:
        """Until ``sends`` send and ``recvs`` receive completions have come."""
        end = time.monotonic() + STALL_TIMEOUT
        cq = self.ctx.cq
        while self.sends < sends or self.recvs < recvs:
            self._take(scnt, rcnt)
            if self.sends >= sends and self.recvs >= recvs:
                return
            if time.monotonic() > end:
                raise PerfError(f" Test stalled: no completion in {STALL_TIMEOUT:.0f} s")
            cq.wait(0.05)


def _post(ctx: PerfContext, wr: SendWR, scnt: int) -> None:
    try:
        ctx.qps[0].post_send(wr)
    except VerbsError as e:
        raise PerfError(f"Couldn't post send: scnt={scnt}: {e}") from None


def _wait_byte(ctx: PerfContext, iova: int, value: int) -> None:
    """Spin (sleeping a little between looks) until the byte at ``iova``
    is ``value``; the peer's WRITE lands there without a completion."""
    end = time.monotonic() + STALL_TIMEOUT
    dev = ctx.dev
    qp = ctx.qps[0]
    value &= 0xFF
    while ctx.read_byte(iova) != value:
        if qp.state == IbQpState.ERR:
            raise PerfError(" The QP went to the error state while waiting for the peer")
        if time.monotonic() > end:
            raise PerfError(f" Test stalled: the peer wrote nothing for {STALL_TIMEOUT:.0f} s")
        with dev.lock:
            dev.wait(lambda: ctx.read_byte(iova) == value, BYTE_WAIT)


def run_iter_lat_write(
    ctx: PerfContext, size: int, remote: tuple[int, int], *, progress: Progress | None = None
) -> list[float]:
    """``run_iter_lat_write``; the post times."""
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
    scnt = rcnt = 0
    iters = p.iters
    while scnt < iters or rcnt < iters:
        if rcnt < iters and not (scnt < 1 and not client):  # the server starts
            rcnt += 1
            _wait_byte(ctx, poll_byte, rcnt)
        if scnt < iters:
            tposted.append(clock())
            scnt += 1
            ctx.write_byte(post_byte, scnt)
            _post(ctx, wr, scnt)
            poller.wait(scnt, 0, scnt, rcnt)
            if progress is not None:
                progress(1)
    return tposted


def run_iter_lat_read(
    ctx: PerfContext, size: int, remote: tuple[int, int], *, progress: Progress | None = None
) -> list[float]:
    """``run_iter_lat`` for READ: one outstanding READ at a time."""
    p = ctx.params
    slot = ctx.slot(0)
    vaddr, rkey = remote
    wr = RdmaWR(0, IbWrOpcode.RDMA_READ, (Sge(slot.local, size, ctx.lkey),),
                IbSendFlags.SIGNALED, remote_addr=vaddr, rkey=rkey)  # fmt: skip
    poller = _Poller(ctx)
    tposted: list[float] = []
    clock = time.perf_counter
    for scnt in range(1, p.iters + 1):
        tposted.append(clock())
        _post(ctx, wr, scnt)
        poller.wait(scnt, 0, scnt, 0)
        if progress is not None:
            progress(1)
    return tposted


def run_iter_lat_send(
    ctx: PerfContext, recvs: Receives, *, progress: Progress | None = None
) -> list[float]:
    """``run_iter_lat_send``: the client SENDs first; each side answers a
    receive with a SEND and reposts receives while more are due."""
    p = ctx.params
    client = p.servername is not None
    size = recvs.size
    slot = ctx.slot(0)
    wr = SendWR(0, IbWrOpcode.SEND, (Sge(slot.local, size, ctx.lkey),), IbSendFlags.SIGNALED)
    poller = _Poller(ctx)
    tposted: list[float] = []
    clock = time.perf_counter
    scnt = rcnt = 0
    iters = p.iters
    while scnt < iters or rcnt < iters:
        if rcnt < iters and not (scnt < 1 and client):
            rcnt += 1
            poller.wait(scnt, rcnt, scnt, rcnt)
            if recvs.posted[0] < iters:
                recvs.repost(ctx, 0)
        if scnt < iters:
            tposted.append(clock())
            scnt += 1
            _post(ctx, wr, scnt)
            poller.wait(scnt, 0, scnt, rcnt)
            if progress is not None:
                progress(1)
    return tposted
