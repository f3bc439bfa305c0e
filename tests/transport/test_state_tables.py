"""The completer's and responder's state tables (h11-style): well formed,
what the engines actually do, and what their docstrings say."""

from __future__ import annotations

import contextlib
import enum
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from softrdma.transport import completer, responder
from softrdma.transport.completer import COMPLETER, CompState
from softrdma.transport.responder import RESPONDER, RespState
from softrdma.verbs.enums import IbWrOpcode
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR

from .engine_harness import Lossy, Pair

Op = IbWrOpcode
TERMINAL: dict[str, set[str]] = {"completer": {"DONE"}, "responder": {"CLEANUP", "DONE"}}
TABLES: dict[str, tuple[dict[Any, Any], type[enum.IntEnum], str]] = {
    "completer": (COMPLETER, CompState, completer.__doc__ or ""),
    "responder": (RESPONDER, RespState, responder.__doc__ or ""),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_every_state_has_one_row_and_every_edge_a_target(name: str) -> None:
    table, states, _ = TABLES[name]
    names = {s.name for s in states}
    assert {s.name for s in table} | TERMINAL[name] == names
    for state, step in table.items():
        assert step.next, f"{state.name} leads nowhere"
        assert {t.name for t in step.next} <= names
    # every state but the entry is the target of some row
    entry = "GET_WQE" if name == "completer" else "CHK_PSN"
    targets = {t.name for step in table.values() for t in step.next}
    assert names - targets <= {entry}


def _described(doc: str, names: set[str]) -> set[str]:
    """The states a module docstring's state list gives a row to (``NAME``
    or ``NAME, NAME`` at the start of an indented line; ``ERR_*`` for all
    error states)."""
    found: set[str] = set()
    for line in doc.splitlines():
        m = re.match(r"^    ([A-Z_*]+(?:, [A-Z_]+)*)\s", line)
        if not m:
            continue
        for n in m.group(1).split(", "):
            found |= {x for x in names if x.startswith("ERR_")} if n == "ERR_*" else {n}
    return found


@pytest.mark.parametrize("name", list(TABLES))
def test_the_docstring_describes_exactly_the_states(name: str) -> None:
    """The prose says what each state does; only the table says where it
    goes, so the two cannot drift apart on transitions."""
    _, states, doc = TABLES[name]
    names = {s.name for s in states}
    assert _described(doc, names) == names
    assert "->" not in doc.split("::")[1].split("\n\n")[1], "transitions belong in the table"


@contextlib.contextmanager
def _traced(table: dict[Any, Any], seen: set[tuple[str, str]]) -> Iterator[None]:
    """Wrap each row's handler to record the transitions it takes."""
    originals = dict(table)
    for state, step in originals.items():

        def handler(p: Any, _h: Callable[[Any], Any] = step.handler, _s: Any = state) -> Any:
            nxt = _h(p)
            seen.add((_s.name, nxt.name))
            return nxt

        table[state] = type(step)(handler, step.next)
    try:
        yield
    finally:
        table.update(originals)


def test_random_traffic_takes_only_table_transitions_and_most_of_them() -> None:
    """Random SEND / WRITE / READ / atomic traffic under loss, duplicates and
    reordering: every transition taken is in the tables (the dispatchers
    enforce it), and the run reaches most of what the tables allow outside
    the error rows."""
    seen: set[tuple[str, str]] = set()
    with _traced(COMPLETER, seen), _traced(RESPONDER, seen):
        for seed in range(6):
            rng = random.Random(seed)
            p = Pair(
                mtu=256,
                ab=Lossy(random.Random(seed), drop=0.1, dup=0.1, reorder=0.2),
                ba=Lossy(random.Random(seed + 100), drop=0.1, dup=0.1, reorder=0.2),
            )
            src = p.mem_a.reg(4096, fill=bytes(range(256)) * 16)
            dst = p.mem_b.reg(4096)
            rbuf = p.mem_b.reg(4096)
            n = 24
            for i in range(n):
                p.post_recv(RecvWR(i, (rbuf.sge(),)))
            for i in range(n):
                kind = rng.randrange(4)
                length = rng.randrange(1, 2000)
                sge = (src.sge(0, length),)
                if kind == 0:
                    p.post(SendWR(i, Op.SEND, sge))
                elif kind == 1:
                    p.post(RdmaWR(i, Op.RDMA_WRITE, sge, remote_addr=dst.iova, rkey=dst.key))
                elif kind == 2:
                    p.post(RdmaWR(i, Op.RDMA_READ, sge, remote_addr=dst.iova, rkey=dst.key))
                else:
                    p.post(
                        AtomicWR(
                            i, Op.ATOMIC_FETCH_AND_ADD, (src.sge(0, 8),),
                            remote_addr=dst.iova, rkey=dst.key, compare_add=1,
                        )
                    )  # fmt: skip
            p.run_until_completions(n, max_time=1e4)
    allowed = {
        (s.name, t.name)
        for table in (COMPLETER, RESPONDER)
        for s, step in table.items()
        for t in step.next
    }
    assert seen <= allowed
    normal = {
        (s, t)
        for s, t in allowed
        if not s.startswith("ERR_") and "ERROR" not in (s, t) and not t.startswith("ERR_")
    }
    reached = seen & normal
    assert len(reached) >= 0.6 * len(normal), sorted(normal - reached)


def test_class_ac_error_states_go_only_to_complete() -> None:
    """The responder's dispatcher tests ``nxt is COMPLETE`` before looking a
    state up in its class A/C set; that is only right while every one of
    those states goes to COMPLETE and nowhere else."""
    for state in responder._CLASS_AC:
        assert RESPONDER[state].next == {RespState.COMPLETE}, state.name
