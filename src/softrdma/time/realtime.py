"""Real time: an :mod:`asyncio` event loop on its own progress thread.

Kernel counterparts: the softirq and workqueue context in which rxe
receives packets (``rxe_udp_encap_recv``) and runs its requester,
completer and responder tasks (``rxe_task.c``), and its retransmit and
RNR timers — all of which run whether or not the application polls.

A device on a real network must keep answering while its application is
busy: incoming requests are ACKed, READ responses sent, timers fire. So
the engines run on this loop's thread, and application threads only post
work requests and poll completions. Every callback runs holding
:attr:`RealTimeLoop.lock`; application threads take the same lock around
each verb, so the engines see one thread at a time.

An exception escaping a callback is logged and counted
(:attr:`RealTimeLoop.errors`), never raised out of the progress thread:
the loop keeps serving the other QPs and devices.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVarTuple, Unpack

from softrdma.time.base import EventLoopError

__all__ = ["RealTimeHandle", "RealTimeLoop"]

log = logging.getLogger("softrdma.time")

_Ts = TypeVarTuple("_Ts")
_INF = float("inf")
POLL_YIELD = 1e-4
"""How long a poller that found nothing waits for the progress thread
(:meth:`RealTimeLoop.progress`), in seconds."""


class RealTimeHandle:
    """A callback scheduled on a :class:`RealTimeLoop`. :meth:`cancel` may
    be called from any thread: the callback then does not run (its asyncio
    timer may still wake the loop once, to do nothing)."""

    __slots__ = ("_args", "_callback", "_done", "_inner", "_loop", "_when")

    def __init__(
        self,
        loop: RealTimeLoop,
        when: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
    ) -> None:
        self._loop = loop
        self._when = when
        self._callback: Callable[..., object] | None = callback
        self._args = args
        self._done = False
        self._inner: asyncio.TimerHandle | None = None

    @property
    def when(self) -> float:
        """The loop time (monotonic seconds) the callback is due."""
        return self._when

    @property
    def done(self) -> bool:
        """True once the callback has run or has been cancelled."""
        return self._done

    def cancel(self) -> None:
        """Cancel the callback if it has not run yet."""
        if self._done:
            return
        self._done = True
        self._callback = None
        self._args = ()
        inner = self._inner
        if inner is not None and self._loop.in_progress_thread():
            inner.cancel()

    def _fire(self) -> None:
        callback = self._callback
        if callback is None:
            return
        self._done = True
        self._callback = None
        self._loop._run_callback(callback, self._args)

    def __repr__(self) -> str:
        return f"<RealTimeHandle when={self._when!r} {'done' if self._done else 'pending'}>"


class RealTimeLoop:
    """The real-time :class:`~softrdma.time.base.Scheduler`: starts its
    progress thread at construction, stops it at :meth:`close` (or when
    used as a context manager)."""

    def __init__(self, name: str = "softrdma-progress") -> None:
        self._lock = threading.Condition(threading.RLock())
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self.errors = 0
        """Exceptions that escaped a callback (each one is logged)."""
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    # --- the Scheduler API --------------------------------------------------------------

    @property
    def lock(self) -> threading.Condition:
        """The lock every callback runs under (see :mod:`softrdma.time.base`)."""
        return self._lock

    @property
    def simulated(self) -> bool:
        """Always False: the clock is the system's monotonic clock."""
        return False

    def time(self) -> float:
        """Monotonic seconds (:meth:`asyncio.AbstractEventLoop.time`)."""
        return self._loop.time()

    def in_progress_thread(self) -> bool:
        """True when called from the loop's own thread."""
        return threading.get_ident() == self._thread.ident

    def call_at(
        self, when: float, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts
    ) -> RealTimeHandle:
        """Run ``callback(*args)`` at loop time ``when`` (from any thread)."""
        if when != when or when in (_INF, -_INF):
            raise EventLoopError(f"event time {when!r} is not finite")
        self._check_open()
        handle = RealTimeHandle(self, when, callback, args)
        if self.in_progress_thread():
            handle._inner = self._loop.call_at(when, handle._fire)
        else:
            self._loop.call_soon_threadsafe(self._arm, handle)
        return handle

    def _arm(self, handle: RealTimeHandle) -> None:
        if not handle.done:
            handle._inner = self._loop.call_at(handle.when, handle._fire)

    def call_later(
        self, delay: float, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts
    ) -> RealTimeHandle:
        """Run ``callback(*args)`` ``delay`` seconds from now."""
        if not 0.0 <= delay < _INF:
            raise EventLoopError(f"delay {delay!r} must be finite and >= 0")
        return self.call_at(self.time() + delay, callback, *args)

    def call_soon(self, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts) -> RealTimeHandle:
        """Run ``callback(*args)`` on the progress thread as soon as it is
        free (from any thread: ``call_soon_threadsafe`` wakes the loop)."""
        self._check_open()
        handle = RealTimeHandle(self, self.time(), callback, args)
        if self.in_progress_thread():
            self._loop.call_soon(handle._fire)
        else:
            self._loop.call_soon_threadsafe(handle._fire)
        return handle

    def progress(self, until: Callable[[], bool]) -> None:
        """Give the progress thread a moment: wait up to :data:`POLL_YIELD`
        seconds for ``until()``. A poller that spins on an empty CQ holding
        the GIL would otherwise keep the progress thread from the packet
        it is waiting for until the interpreter's switch interval (5 ms)
        forces a switch; waiting on :attr:`lock` releases both at once."""
        if not self.in_progress_thread():
            with self._lock:
                self._lock.wait_for(until, POLL_YIELD)

    def wait(self, until: Callable[[], bool], timeout: float | None) -> bool:
        """Wait on :attr:`lock` until ``until()`` holds or ``timeout`` real
        seconds pass (None: forever). Callbacks that change what ``until``
        looks at call ``lock.notify_all()``."""
        if self.in_progress_thread():
            return bool(until())  # the loop cannot wait for itself
        with self._lock:
            return self._lock.wait_for(until, timeout)

    # --- I/O ------------------------------------------------------------------------

    def add_reader(self, sock: socket.socket, callback: Callable[[], object]) -> None:
        """Call ``callback()`` on the progress thread, under the lock,
        whenever ``sock`` is readable (:meth:`asyncio.loop.add_reader`)."""
        self._on_loop(self._loop.add_reader, sock, self._run_callback, callback, ())

    def remove_reader(self, sock: socket.socket) -> None:
        """Stop watching ``sock``."""
        if not self._closed:
            self._on_loop(self._loop.remove_reader, sock)

    def _on_loop(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on the loop's thread and wait for it. The wait
        releases :attr:`lock` (a caller may hold it, and the loop may need
        it to finish the callback it is in)."""
        self._check_open()
        if self.in_progress_thread():
            fn(*args)
            return
        done: Future[None] = Future()
        lock = self._lock

        def run() -> None:
            try:
                fn(*args)
                done.set_result(None)
            except BaseException as e:  # handed to the caller's thread
                done.set_exception(e)
            with lock:
                lock.notify_all()

        self._loop.call_soon_threadsafe(run)
        with lock:
            if not lock.wait_for(done.done, 10.0):
                raise EventLoopError("the progress thread did not answer within 10 s")
        done.result()

    # --- running callbacks ------------------------------------------------------------

    def _run_callback(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                callback(*args)
            except Exception:
                self.errors += 1
                log.exception("softrdma: callback %r failed on the progress thread", callback)

    # --- lifecycle --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EventLoopError("the real-time loop is closed")

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def close(self) -> None:
        """Stop the progress thread (waiting for the running callback to
        finish). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.in_progress_thread():
            self._loop.stop()
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10.0)

    def __enter__(self) -> RealTimeLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return f"<RealTimeLoop {self._thread.name} {state}>"
