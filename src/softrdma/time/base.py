"""The one scheduler API that devices and links run on, whatever the clock.

Kernel counterparts: the timer wheel (``mod_timer`` / ``del_timer``), the
tasklets and work items rxe's packet tasks run in (``rxe_task.c``), and
``jiffies``. The method names follow :mod:`asyncio`'s event loop
(``call_at``, ``call_later``, ``call_soon``, ``time``), without coroutines.

Two implementations:

* :class:`~softrdma.time.sim.SimLoop` — simulated time: deterministic, runs
  only when somebody drives it (``cq.poll`` does), timers fire as soon as
  everything before them has run;
* :class:`~softrdma.time.realtime.RealTimeLoop` — real time: an
  :mod:`asyncio` loop on its own progress thread (the hardware, or rxe's
  tasks), which runs whether or not the application polls.

Both own one :attr:`Scheduler.lock`: every callback runs holding it, and
application threads take it around each verb, so the engines see one
thread at a time (rxe's per-QP task serialisation and queue locks, made
one coarse lock). It is a :class:`threading.Condition`, so a thread can
wait on it for a completion (:meth:`Scheduler.wait`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol, TypeVarTuple, Unpack

from softrdma.errors import SoftRdmaError

__all__ = ["EventLoopError", "Handle", "Scheduler"]

_Ts = TypeVarTuple("_Ts")


class EventLoopError(SoftRdmaError, RuntimeError):
    """Misuse of a scheduler: scheduling in the past or at a non-finite
    time, running a simulated loop from inside one of its own callbacks,
    or using a real-time loop after :meth:`~Scheduler.close`."""


class Handle(Protocol):
    """A scheduled callback that can be cancelled (``del_timer`` /
    :class:`asyncio.TimerHandle`). Cancelling after the callback has run,
    or twice, does nothing."""

    @property
    def when(self) -> float:
        """The time the callback is (or was) due, on its scheduler's clock."""
        ...

    @property
    def done(self) -> bool:
        """True once the callback has run or has been cancelled."""
        ...

    def cancel(self) -> None:
        """Cancel the callback if it has not run yet."""
        ...


class Scheduler(Protocol):
    """What a device or a link needs from time: a clock, timers, deferred
    work, one lock, and a way for an application thread to let the
    hardware make progress or wait for it."""

    @property
    def lock(self) -> threading.Condition:
        """The lock every callback runs under; verbs take it too."""
        ...

    @property
    def simulated(self) -> bool:
        """True for simulated time (nothing runs unless driven)."""
        ...

    def time(self) -> float:
        """The current time in seconds (``jiffies``); never decreases."""
        ...

    def call_at(
        self, when: float, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts
    ) -> Handle:
        """Run ``callback(*args)`` at time ``when`` (``mod_timer``)."""
        ...

    def call_later(
        self, delay: float, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts
    ) -> Handle:
        """Run ``callback(*args)`` ``delay`` seconds from now."""
        ...

    def call_soon(self, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts) -> Handle:
        """Run ``callback(*args)`` as soon as possible, after what is already
        due (``tasklet_schedule``). Safe to call from any thread."""
        ...

    def progress(self, until: Callable[[], bool]) -> None:
        """Called by a poller that found nothing (``ib_poll_cq`` on an empty
        CQ): simulated time runs the hardware until ``until()`` holds or it
        has nothing left to do, within a budget; real time, whose progress
        thread is already running, lets it run for a moment (the caller may
        hold :attr:`lock`)."""
        ...

    def wait(self, until: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``until()`` holds or ``timeout`` seconds (simulated or
        real, by clock) have passed; return ``until()``. The caller may hold
        :attr:`lock`."""
        ...

    def close(self) -> None:
        """Stop: no callback runs afterwards."""
        ...
