"""Simulated time: a deterministic discrete-event scheduler.

Kernel counterparts: the timer wheel (``mod_timer`` / ``del_timer`` /
``timer_setup`` in ``kernel/time/timer.c``) that rxe arms for its
retransmit and RNR-NAK timers (``rxe_qp.c``, ``rxe_comp.c``), the
softirq/workqueue context its packet tasks run in (``rxe_task.c``), and
``jiffies``. It implements :class:`~softrdma.time.base.Scheduler`.

How time advances (the progress model)
--------------------------------------
``now`` is a float in simulated seconds that only moves when an event runs:
it jumps straight to the time of the next event, whatever the gap. Nothing
sleeps, so a 67 ms retransmit timeout fires as soon as everything scheduled
before it has run — instantly in wall time once the fabric has gone quiet.
Events due at the same time run in the order they were scheduled (the heap
is keyed by ``(time, sequence)``), so a run is a pure function of what was
scheduled: same inputs, same order, bit for bit.

Cancelled events stay in the heap and are skipped when they reach the top
(lazy deletion, as in :mod:`asyncio`); the heap is compacted when more than
half of it is cancelled, so cancelling costs O(1) amortised.

An exception raised by a callback propagates out of :meth:`SimLoop.step`
/ :meth:`~SimLoop.run` (the event is already consumed, so the loop can be
resumed); a simulation should fail loudly rather than log and go on.

Who drives it: the application, from ``ib_poll_cq`` (:meth:`SimLoop.progress`
runs events until a completion arrives, nothing is left to do, or a budget
of :data:`PROGRESS_MAX_EVENTS` events / :data:`PROGRESS_MAX_TIME` simulated
seconds is spent, so a QP retrying forever cannot hang the caller), or a
test calling :meth:`~SimLoop.run` itself. Nothing runs on another thread.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from typing import Any, TypeVarTuple, Unpack

from softrdma.time.base import EventLoopError

__all__ = ["PROGRESS_MAX_EVENTS", "PROGRESS_MAX_TIME", "SimLoop", "TimerHandle"]

_Ts = TypeVarTuple("_Ts")
_INF = float("inf")

# A scheduled event is a list [when, seq, callback, args]: lists compare like
# tuples (when first, then the unique seq, never further), and a cancelled or
# consumed entry has its callback slot set to None in place.
_WHEN, _SEQ, _CB, _ARGS = 0, 1, 2, 3
_Entry = list[Any]

_COMPACT_MIN = 256
"""Do not bother compacting heaps with fewer cancelled entries than this."""


#: How long one :meth:`SimLoop.progress` lets the hardware run when nothing
#: completes: events, and seconds of simulated time (like polling hardware,
#: poll then returns empty).
PROGRESS_MAX_EVENTS = 200_000
PROGRESS_MAX_TIME = 1.0


class TimerHandle:
    """A scheduled callback that can be cancelled (``del_timer`` /
    :class:`asyncio.TimerHandle`). Cancelling after the callback has run, or
    twice, does nothing."""

    __slots__ = ("_cancelled", "_entry", "_loop")

    def __init__(self, loop: SimLoop, entry: _Entry) -> None:
        self._loop = loop
        self._entry = entry
        self._cancelled = False

    @property
    def when(self) -> float:
        """The simulated time the callback is (or was) due."""
        return float(self._entry[_WHEN])

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` has been called."""
        return self._cancelled

    @property
    def done(self) -> bool:
        """True if the callback has run or has been cancelled."""
        return self._entry[_CB] is None

    def cancel(self) -> None:
        """Cancel the callback if it has not run yet (``del_timer``). O(1):
        the heap entry is only marked; the loop skips it later."""
        if self._cancelled:
            return
        self._cancelled = True
        entry = self._entry
        if entry[_CB] is not None:
            entry[_CB] = None
            entry[_ARGS] = ()
            self._loop._note_cancelled()

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else "done" if self.done else "pending"
        return f"<TimerHandle when={self.when!r} {state}>"


class SimLoop:
    """Discrete-event scheduler in simulated time (float seconds); see the
    module docstring for the progress model. ``start`` is the initial
    :attr:`now`.

    Not thread-safe, and not re-entrant: callbacks schedule more events but
    must not call :meth:`step`, :meth:`run` or :meth:`run_until` themselves.
    """

    __slots__ = ("_heap", "_lock", "_ncancelled", "_now", "_running", "_seq", "events_run")

    def __init__(self, start: float = 0.0) -> None:
        if not -_INF < start < _INF:
            raise EventLoopError(f"start time {start!r} is not finite")
        self._lock = threading.Condition(threading.RLock())
        self._now = float(start)
        self._heap: list[_Entry] = []
        self._seq = 0
        self._ncancelled = 0
        self._running = False
        self.events_run = 0
        """Number of callbacks run so far (cancelled events not counted)."""

    # --- time -----------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Current simulated time in seconds (``jiffies``); never decreases."""
        return self._now

    def time(self) -> float:
        """:attr:`now`, under :mod:`asyncio`'s name (``loop.time()``)."""
        return self._now

    @property
    def simulated(self) -> bool:
        """Always True: time moves only when the loop runs."""
        return True

    @property
    def lock(self) -> threading.Condition:
        """The scheduler lock (see :mod:`softrdma.time.base`). Everything
        runs on the caller's thread here, so it is only ever contended by
        applications that share a simulation between threads."""
        return self._lock

    # --- scheduling -----------------------------------------------------------------

    def call_at(
        self, when: float, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts
    ) -> TimerHandle:
        """Run ``callback(*args)`` at simulated time ``when`` (``mod_timer``
        with an absolute expiry). ``when`` must be finite and not before
        :attr:`now`. Returns a cancelable :class:`TimerHandle`."""
        if not self._now <= when < _INF:
            raise self._bad_time(when)
        seq = self._seq
        self._seq = seq + 1
        entry: _Entry = [when, seq, callback, args]
        heappush(self._heap, entry)
        return TimerHandle(self, entry)

    def call_later(
        self, delay: float, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts
    ) -> TimerHandle:
        """Run ``callback(*args)`` ``delay`` seconds from now (``mod_timer(t,
        jiffies + delay)``); ``delay`` must be finite and >= 0."""
        if not 0.0 <= delay < _INF:
            raise EventLoopError(f"delay {delay!r} must be finite and >= 0")
        return self.call_at(self._now + delay, callback, *args)

    def call_soon(self, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts) -> TimerHandle:
        """Run ``callback(*args)`` at the current time, after every event
        already scheduled for this time (``tasklet_schedule`` /
        ``queue_work``)."""
        return self.call_at(self._now, callback, *args)

    def post_at(self, when: float, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts) -> None:
        """Like :meth:`call_at` but without a handle (cannot be cancelled):
        the cheap path for per-packet events such as a frame's delivery."""
        if not self._now <= when < _INF:
            raise self._bad_time(when)
        seq = self._seq
        self._seq = seq + 1
        heappush(self._heap, [when, seq, callback, args])

    def _bad_time(self, when: float) -> EventLoopError:
        if when != when or when in (_INF, -_INF):
            return EventLoopError(f"event time {when!r} is not finite")
        return EventLoopError(
            f"event time {when!r} is before the current time {self._now!r}: time never goes back"
        )

    def _note_cancelled(self) -> None:
        self._ncancelled += 1
        n = self._ncancelled
        heap = self._heap
        if n >= _COMPACT_MIN and n > len(heap) >> 1:
            heap[:] = [e for e in heap if e[_CB] is not None]  # in place: run() holds it
            heapify(heap)
            self._ncancelled = 0

    # --- state ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Number of scheduled events that have not run and are not cancelled."""
        return len(self._heap) - self._ncancelled

    @property
    def idle(self) -> bool:
        """True when nothing is scheduled (cancelled events do not count)."""
        return len(self._heap) == self._ncancelled

    @property
    def next_time(self) -> float | None:
        """Time of the next event that will run, or None when idle."""
        heap = self._heap
        while heap and heap[0][_CB] is None:
            heappop(heap)
            self._ncancelled -= 1
        return float(heap[0][_WHEN]) if heap else None

    @property
    def running(self) -> bool:
        """True while :meth:`step`, :meth:`run` or :meth:`run_until` is executing."""
        return self._running

    # --- running --------------------------------------------------------------------

    def _enter(self) -> None:
        if self._running:
            raise EventLoopError(
                "the event loop is already running: a callback cannot run the loop itself"
            )
        self._lock.acquire()  # callbacks run holding the scheduler lock
        self._running = True

    def _leave(self) -> None:
        self._running = False
        self._lock.release()

    def _drain(
        self, limit: float, budget: int, predicate: Callable[[], object] | None
    ) -> tuple[int, bool]:
        """Run due events in order until none is left at or before ``limit``,
        ``budget`` have run, or ``predicate()`` (checked after each) holds.
        Returns how many ran and whether the predicate stopped it."""
        heap = self._heap
        n = 0
        try:
            while heap and n < budget:
                entry = heap[0]
                if entry[_WHEN] > limit:
                    break
                heappop(heap)
                cb = entry[_CB]
                if cb is None:
                    self._ncancelled -= 1
                    continue
                entry[_CB] = None
                self._now = entry[_WHEN]
                n += 1
                cb(*entry[_ARGS])
                if predicate is not None and predicate():
                    return n, True
            return n, False
        finally:
            self.events_run += n

    def step(self) -> bool:
        """Run the next event (advancing :attr:`now` to its time). Returns
        False, doing nothing, when no event is pending."""
        self._enter()
        try:
            return self._drain(_INF, 1, None)[0] == 1
        finally:
            self._leave()

    def run(self, until: float | None = None, max_events: int | None = None) -> int:
        """Run events in time order and return how many ran.

        Without ``until``, runs until no event is left. With ``until``, runs
        every event due at or before ``until`` and then sets :attr:`now` to
        ``until`` (the simulated time has passed even if nothing happened).
        ``max_events`` stops after that many events, leaving :attr:`now` at
        the last one's time.
        """
        if until is not None and not until >= self._now:
            raise EventLoopError(f"run(until={until!r}) is before the current time {self._now!r}")
        budget = sys.maxsize if max_events is None else max_events
        self._enter()
        try:
            n, _ = self._drain(_INF if until is None else until, budget, None)
            if n < budget and until is not None and until > self._now:
                self._now = until
            return n
        finally:
            self._leave()

    def run_until(
        self,
        predicate: Callable[[], object],
        *,
        timeout: float | None = None,
        max_events: int | None = None,
    ) -> bool:
        """Run events until ``predicate()`` is true; return whether it is.

        The predicate is checked before the first event and after each one
        (a busy ``ib_poll_cq`` loop, in simulated time). Stops with False when
        no event is left, after ``max_events`` events, or when the next event
        is more than ``timeout`` simulated seconds away from the start; on a
        timeout :attr:`now` is advanced to the deadline (the time was spent
        waiting).
        """
        if timeout is not None and not 0.0 <= timeout < _INF:
            raise EventLoopError(f"timeout {timeout!r} must be finite and >= 0")
        self._enter()
        try:
            if predicate():
                return True
            deadline = _INF if timeout is None else self._now + timeout
            budget = sys.maxsize if max_events is None else max_events
            n, satisfied = self._drain(deadline, budget, predicate)
            if satisfied:
                return True
            if n < budget and timeout is not None and deadline > self._now:
                self._now = deadline
            return False
        finally:
            self._leave()

    # --- the Scheduler API for pollers ------------------------------------------------

    def progress(self, until: Callable[[], bool]) -> None:
        """Run events until ``until()`` holds, nothing is pending, or the
        budget (:data:`PROGRESS_MAX_EVENTS`, :data:`PROGRESS_MAX_TIME`) is
        spent. Does nothing when called from inside a callback (the loop is
        already running)."""
        if not self._running:
            self.run_until(until, timeout=PROGRESS_MAX_TIME, max_events=PROGRESS_MAX_EVENTS)

    def wait(self, until: Callable[[], bool], timeout: float | None) -> bool:
        """Run events until ``until()`` holds, for at most ``timeout``
        simulated seconds (:data:`PROGRESS_MAX_TIME` if None) and
        :data:`PROGRESS_MAX_EVENTS` events; return ``until()``."""
        if self._running:
            return bool(until())
        limit = PROGRESS_MAX_TIME if timeout is None else timeout
        return self.run_until(until, timeout=limit, max_events=PROGRESS_MAX_EVENTS)

    def close(self) -> None:
        """Drop every pending event."""
        self._heap.clear()
        self._ncancelled = 0

    def __repr__(self) -> str:
        return f"<SimLoop now={self._now!r} pending={self.pending}>"
