"""softrdma.time.realtime: the asyncio progress thread behind real-time devices."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from softrdma.time import EventLoopError, RealTimeLoop, Scheduler, SimLoop


@pytest.fixture
def loop() -> Iterator[RealTimeLoop]:
    with RealTimeLoop() as lp:
        yield lp


def test_both_loops_are_schedulers() -> None:
    sim: Scheduler = SimLoop()
    assert sim.simulated
    with RealTimeLoop() as rt:
        real: Scheduler = rt
        assert not real.simulated


def test_call_soon_from_another_thread_runs_on_the_progress_thread(loop: RealTimeLoop) -> None:
    seen: list[tuple[str, bool]] = []
    done = threading.Event()

    def cb(tag: str) -> None:
        seen.append((tag, loop.in_progress_thread()))
        done.set()

    loop.call_soon(cb, "x")
    assert done.wait(5.0)
    assert seen == [("x", True)]


def test_timers_fire_in_order_and_cancel_from_any_thread(loop: RealTimeLoop) -> None:
    order: list[int] = []
    done = threading.Event()
    t0 = loop.time()
    loop.call_at(t0 + 0.05, order.append, 2)
    loop.call_later(0.02, order.append, 1)
    cancelled = loop.call_later(0.03, order.append, 99)
    cancelled.cancel()
    assert cancelled.done
    loop.call_later(0.08, lambda: done.set())
    assert done.wait(5.0)
    assert order == [1, 2]
    assert loop.time() - t0 >= 0.08


def test_callbacks_run_holding_the_lock(loop: RealTimeLoop) -> None:
    """An application thread holding the lock keeps callbacks out (the verbs
    and the engines see one thread at a time)."""
    ran = threading.Event()
    with loop.lock:
        loop.call_soon(ran.set)
        assert not ran.wait(0.2), "a callback ran while the application held the lock"
    assert ran.wait(5.0)


def test_wait_wakes_on_notify_and_times_out(loop: RealTimeLoop) -> None:
    box: list[int] = []

    def produce() -> None:
        box.append(1)
        loop.lock.notify_all()

    loop.call_later(0.05, produce)
    with loop.lock:
        assert loop.wait(lambda: bool(box), 5.0)
    start = time.monotonic()
    assert not loop.wait(lambda: False, 0.1)
    assert time.monotonic() - start >= 0.09


def test_progress_lets_the_progress_thread_in(loop: RealTimeLoop) -> None:
    """A poller that holds the lock and finds nothing lets the progress
    thread run while it waits (a callback needs the lock), instead of
    spinning until the interpreter switches threads."""
    box: list[int] = []
    with loop.lock:
        loop.call_soon(box.append, 1)
        for _ in range(10_000):  # at most POLL_YIELD each: about a second
            loop.progress(lambda: bool(box))
            if box:
                break
        assert box == [1]
    with loop.lock:
        loop.progress(lambda: False)  # nothing comes: it returns anyway


def test_a_failing_callback_is_logged_and_counted_not_raised(
    loop: RealTimeLoop, caplog: pytest.LogCaptureFixture
) -> None:
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("engine bug")

    loop.call_soon(boom)
    loop.call_soon(done.set)
    assert done.wait(5.0), "the loop kept running after a failing callback"
    assert loop.errors == 1
    assert "engine bug" in caplog.text


def test_add_reader_runs_under_the_lock(loop: RealTimeLoop) -> None:
    a, b = socket.socketpair()
    got: list[bytes] = []
    done = threading.Event()

    def readable() -> None:
        loop.lock.notify(0)  # wakes no one; raises RuntimeError unless this thread holds the lock
        got.append(b.recv(100))
        done.set()

    b.setblocking(False)
    loop.add_reader(b, readable)
    a.send(b"ping")
    assert done.wait(5.0)
    loop.remove_reader(b)
    assert got == [b"ping"]
    a.close()
    b.close()


def test_close_stops_the_thread_and_refuses_new_work() -> None:
    lp = RealTimeLoop(name="softrdma-test-close")
    lp.close()
    lp.close()  # idempotent
    assert lp.closed
    assert not any(t.name == "softrdma-test-close" for t in threading.enumerate())
    with pytest.raises(EventLoopError):
        lp.call_soon(print)
    with pytest.raises(EventLoopError):
        lp.call_later(-1.0, print)
