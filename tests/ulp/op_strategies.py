"""Hypothesis strategies for the random block I/O the integrity tests of
both block initiators (SRP and iSER) run: single reads and writes of one to
a few hundred blocks on a small disk, and batches of them that may run
concurrently."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.ulp.srp_rig import Op


def op_strategy(disk_blocks: int, max_blocks: int) -> st.SearchStrategy[Op]:
    """One read or write inside the first ``disk_blocks`` blocks (small, so
    that operations of one example overlap often): mostly of 1..16 blocks,
    else of up to ``max_blocks`` (which split into several commands)."""
    return st.builds(
        lambda write, lba, n, seed: Op(write, min(lba, disk_blocks - n), n, seed),
        st.booleans(),
        st.integers(0, disk_blocks - 1),
        st.one_of(st.integers(1, 16), st.integers(17, max_blocks)),
        st.integers(0, 2**32 - 1),
    )


def disjoint(ops: list[Op]) -> list[Op]:
    """Drop the operations that overlap an earlier one of the batch (the
    batch runs concurrently: overlapping ones have no defined result)."""
    kept: list[Op] = []
    for op in ops:
        if not any(op.lba < o.end and o.lba < op.end for o in kept):
            kept.append(op)
    return kept
