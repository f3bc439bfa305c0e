"""How a ULP waits: run its own work, then sleep on the device until
something happens or its next timer is due.

Kernel counterpart: a ULP's completion handlers and work items running,
and a caller in ``wait_event_timeout`` until the condition it waits for
holds. Here the caller drives the ULP's work itself (``service``), since
nothing else would.
"""

from __future__ import annotations

from collections.abc import Callable

from softrdma.verbs.device import IbDevice

__all__ = ["service_until"]

IDLE_SPAN = 3600.0
"""Seconds one sleep on simulated time may span when nothing bounds it."""


def service_until(
    dev: IbDevice,
    service: Callable[[], None],
    pred: Callable[[], bool],
    timeout: float | None,
    *,
    wake: Callable[[], bool],
    next_timer: Callable[[], float | None] = lambda: None,
) -> bool:
    """Run ``service()`` until ``pred()`` holds (True) or ``timeout``
    seconds have passed (False; None: no bound). Between passes, sleep on
    the device until ``wake()`` (events to service) or the earlier of the
    deadline and ``next_timer()``. On simulated time with nothing
    scheduled and nothing to wake for, nothing can happen any more: the
    answer is ``pred()`` as it stands."""
    sched = dev.scheduler
    deadline = None if timeout is None else sched.time() + timeout
    while True:
        service()
        if pred():
            return True
        now = sched.time()
        if deadline is not None and now >= deadline:
            return False
        limits = [t for t in (deadline, next_timer()) if t is not None]
        span = max(0.0, min(limits) - now) if limits else None
        if span is None and sched.simulated:
            if not wake() and getattr(sched, "idle", False):
                return pred()
            span = IDLE_SPAN
        dev.wait(wake, span)
