"""softrdma.time.sim: the discrete-event scheduler in simulated time."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softrdma.time import EventLoopError, SimLoop, TimerHandle


def test_events_run_in_time_order_and_advance_now() -> None:
    loop = SimLoop()
    seen: list[tuple[str, float]] = []

    def record(name: str) -> None:
        seen.append((name, loop.now))

    for t, name in [(3.0, "c"), (1.0, "a"), (2.0, "b")]:
        loop.call_at(t, record, name)
    assert loop.pending == 3 and loop.now == 0.0
    assert loop.run() == 3
    assert seen == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert loop.now == 3.0 and loop.idle and loop.pending == 0 and loop.events_run == 3


def test_equal_times_run_fifo_and_call_soon_goes_last() -> None:
    loop = SimLoop()
    seen: list[int] = []

    def first() -> None:
        seen.append(0)
        loop.call_soon(seen.append, 99)  # after everything already due now
        loop.call_later(0.0, seen.append, 100)

    loop.call_at(1.0, first)
    for i in range(1, 6):
        loop.call_at(1.0, seen.append, i)
    loop.run()
    assert seen == [0, 1, 2, 3, 4, 5, 99, 100]


def test_call_later_is_relative_to_now() -> None:
    loop = SimLoop(start=10.0)
    times: list[float] = []
    loop.call_later(0.5, lambda: loop.call_later(0.25, lambda: times.append(loop.now)))
    loop.run()
    assert times == [10.75]
    assert loop.time() == 10.75


def test_cancel() -> None:
    loop = SimLoop()
    seen: list[str] = []
    h1 = loop.call_at(1.0, seen.append, "a")
    h2 = loop.call_at(2.0, seen.append, "b")
    h3 = loop.call_at(3.0, seen.append, "c")
    assert isinstance(h2, TimerHandle) and h2.when == 2.0
    h2.cancel()
    h2.cancel()  # twice: harmless
    assert h2.cancelled and h2.done and not h1.done
    assert loop.pending == 2
    assert "cancelled" in repr(h2) and "pending" in repr(h1)
    assert loop.step() and seen == ["a"]
    h1.cancel()  # after it ran: no effect on the loop
    assert h1.cancelled and loop.pending == 1
    h3.cancel()
    assert loop.idle and loop.next_time is None
    assert not loop.step()
    assert seen == ["a"]


def test_cancel_from_a_callback_and_rearm() -> None:
    """A retransmit timer re-armed on every ACK (``mod_timer``) fires once."""
    loop = SimLoop()
    fired: list[float] = []
    timer: list[TimerHandle] = []

    def arm() -> None:
        if timer:
            timer[0].cancel()
        timer[:] = [loop.call_later(1.0, lambda: fired.append(loop.now))]

    for t in (0.1, 0.2, 0.3):
        loop.call_at(t, arm)
    loop.run()
    assert fired == [1.3]


def test_cancelled_entries_are_compacted_lazily() -> None:
    loop = SimLoop()
    handles = [loop.call_at(float(i), lambda: None) for i in range(10_000)]
    for h in handles[:9_000]:
        h.cancel()
    assert loop.pending == 1_000
    # compacted when more than half was cancelled: never holds 9k dead entries
    assert len(loop._heap) < 6_000
    assert loop.next_time == 9_000.0
    assert loop.run() == 1_000
    assert loop.now == 9_999.0


def test_time_jumps_to_the_next_timer() -> None:
    """Nothing pending but a 67 ms retransmit timer: it runs next, at once."""
    loop = SimLoop()
    fired: list[float] = []
    loop.call_later(0.067, lambda: fired.append(loop.now))
    for i in range(3):
        loop.call_later(i * 1e-6, lambda: None)
    assert loop.run() == 4
    assert fired == [0.067] and loop.now == 0.067


def test_step() -> None:
    loop = SimLoop()
    assert not loop.step()
    loop.call_at(2.0, lambda: None)
    loop.call_at(1.0, lambda: None)
    assert loop.next_time == 1.0
    assert loop.step() and loop.now == 1.0
    assert loop.step() and loop.now == 2.0
    assert not loop.step() and loop.now == 2.0


def test_run_until_time() -> None:
    loop = SimLoop()
    seen: list[float] = []
    for t in (1.0, 2.0, 2.0, 3.0):
        loop.call_at(t, lambda: seen.append(loop.now))
    assert loop.run(until=2.0) == 3
    assert seen == [1.0, 2.0, 2.0] and loop.now == 2.0 and loop.pending == 1
    assert loop.run(until=2.5) == 0 and loop.now == 2.5  # time passes anyway
    assert loop.run(until=10.0) == 1 and loop.now == 10.0
    with pytest.raises(EventLoopError, match="before the current time"):
        loop.run(until=5.0)


def test_run_max_events() -> None:
    loop = SimLoop()
    for t in range(10):
        loop.call_at(float(t), lambda: None)
    assert loop.run(max_events=4) == 4 and loop.now == 3.0
    assert loop.run(until=100.0, max_events=3) == 3 and loop.now == 6.0  # not advanced
    assert loop.run() == 3 and loop.idle


def test_run_until_predicate() -> None:
    loop = SimLoop()
    box: list[int] = []
    for i in range(10):
        loop.call_at(float(i), box.append, i)
    assert loop.run_until(lambda: True)  # already true: no event runs
    assert loop.events_run == 0
    assert loop.run_until(lambda: len(box) == 4)
    assert box == [0, 1, 2, 3] and loop.now == 3.0  # checked after each event
    assert not loop.run_until(lambda: False, max_events=2)
    assert box[-1] == 5 and loop.now == 5.0
    assert not loop.run_until(lambda: False, timeout=1.5)
    assert box[-1] == 6 and loop.now == 6.5  # advanced to the deadline
    assert not loop.run_until(lambda: False)  # ran out of events
    assert box[-1] == 9 and loop.idle and loop.now == 9.0
    assert not loop.run_until(lambda: False, timeout=2.0)
    assert loop.now == 11.0


def test_run_until_timeout_includes_events_at_the_deadline() -> None:
    loop = SimLoop()
    done: list[bool] = []
    loop.call_at(1.0, done.append, True)
    assert loop.run_until(lambda: bool(done), timeout=1.0)
    assert loop.now == 1.0


def test_bad_times_are_rejected() -> None:
    loop = SimLoop(start=5.0)
    for when in (4.999, math.nan, math.inf, -math.inf):
        with pytest.raises(EventLoopError):
            loop.call_at(when, lambda: None)
        with pytest.raises(EventLoopError):
            loop.post_at(when, lambda: None)
    for delay in (-1e-9, math.nan, math.inf):
        with pytest.raises(EventLoopError):
            loop.call_later(delay, lambda: None)
    with pytest.raises(EventLoopError):
        loop.run_until(lambda: True, timeout=-1.0)
    with pytest.raises(EventLoopError):
        SimLoop(start=math.nan)
    assert loop.idle


def test_not_reentrant() -> None:
    loop = SimLoop()
    errors: list[Exception] = []

    def nested() -> None:
        assert loop.running
        for f in (loop.step, loop.run, lambda: loop.run_until(lambda: True)):
            try:
                f()
            except EventLoopError as e:
                errors.append(e)

    loop.call_soon(nested)
    loop.run()
    assert len(errors) == 3 and "already running" in str(errors[0])
    assert not loop.running


def test_callback_exception_propagates_and_loop_resumes() -> None:
    loop = SimLoop()
    seen: list[int] = []

    def boom() -> None:
        raise ValueError("boom")

    loop.call_at(1.0, seen.append, 1)
    loop.call_at(2.0, boom)
    loop.call_at(3.0, seen.append, 3)
    with pytest.raises(ValueError, match="boom"):
        loop.run()
    assert loop.now == 2.0 and not loop.running and loop.pending == 1
    assert loop.run() == 1 and seen == [1, 3]


def test_post_at_has_no_handle_but_runs_in_order() -> None:
    loop = SimLoop()
    seen: list[int] = []
    loop.post_at(1.0, seen.append, 2)
    loop.call_at(0.5, seen.append, 1)
    loop.post_at(1.0, seen.append, 3)
    loop.run()
    assert seen == [1, 2, 3]


# --- property: nondecreasing time, FIFO at equal times, cancellation honoured --------

# Each action: (delay from the scheduling event's time, cancel it?, children).
Spec = tuple[float, bool, tuple["Spec", ...]]
_action: st.SearchStrategy[Spec] = st.recursive(
    st.tuples(st.sampled_from([0.0, 0.0, 1e-6, 0.5, 1.0, 2.0]), st.booleans(), st.just(())),
    lambda kids: st.tuples(
        st.sampled_from([0.0, 1e-6, 0.5, 1.0]),
        st.booleans(),
        st.lists(kids, max_size=4).map(tuple),
    ),
    max_leaves=40,
)


@given(st.lists(_action, max_size=30), st.sampled_from(["run", "step", "until"]))
def test_property_order(actions: list[Spec], how: str) -> None:
    loop = SimLoop()
    scheduled: list[tuple[float, int, bool]] = []  # (when, seq, cancelled) in scheduling order
    ran: list[tuple[float, int]] = []

    def schedule(spec: Spec) -> None:
        delay, cancel, kids = spec
        seq = len(scheduled)
        h = loop.call_later(delay, fire, seq, kids)
        scheduled.append((h.when, seq, cancel))
        if cancel:
            h.cancel()

    def fire(seq: int, kids: tuple[Spec, ...]) -> None:
        ran.append((loop.now, seq))
        for k in kids:
            schedule(k)

    for a in actions:
        schedule(a)
    if how == "run":
        loop.run()
    elif how == "step":
        while loop.step():
            pass
    else:
        assert not loop.run_until(lambda: False)
    assert loop.idle
    # nondecreasing time; FIFO (scheduling order) among equal times
    assert ran == sorted(ran)
    # exactly the non-cancelled events ran, each at its scheduled time
    expected = {(w, s) for w, s, c in scheduled if not c}
    assert set(ran) == expected and len(ran) == len(expected)
    assert loop.events_run == len(ran)
