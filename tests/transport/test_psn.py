"""24-bit PSN arithmetic."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from softrdma.transport.psn import (
    PSN_HALF,
    PSN_MASK,
    psn_add,
    psn_after,
    psn_before,
    psn_compare,
    psn_diff,
    psn_in_range,
)

from .strategies import u

psns = u(24)


def test_wrap_examples() -> None:
    assert psn_add(PSN_MASK) == 0
    assert psn_add(PSN_MASK, 2) == 1
    assert psn_add(0, -1) == PSN_MASK
    assert psn_diff(0, PSN_MASK) == 1
    assert psn_diff(PSN_MASK, 0) == -1
    assert psn_after(3, PSN_MASK - 3) and psn_before(PSN_MASK - 3, 3)
    assert psn_diff(PSN_HALF - 1, 0) == PSN_HALF - 1  # largest "ahead"
    assert psn_diff(PSN_HALF, 0) == -PSN_HALF  # half the circle reads "behind"
    assert psn_compare(5, 5) == 0


@given(psns, st.integers(-(1 << 30), 1 << 30))
def test_add_stays_in_range_and_wraps(psn: int, n: int) -> None:
    r = psn_add(psn, n)
    assert 0 <= r <= PSN_MASK
    assert r == (psn + n) % (1 << 24)


@given(psns, st.integers(-PSN_HALF, PSN_HALF - 1))
def test_diff_inverts_add(psn: int, n: int) -> None:
    assert psn_diff(psn_add(psn, n), psn) == n


@given(psns, psns)
def test_diff_range_and_antisymmetry(a: int, b: int) -> None:
    d = psn_diff(a, b)
    assert -PSN_HALF <= d < PSN_HALF
    assert psn_add(b, d) == a
    if d != -PSN_HALF:  # exactly opposite points are "behind" both ways (kernel s32 rule)
        assert psn_diff(b, a) == -d
        assert (psn_compare(a, b) > 0) == (psn_compare(b, a) < 0)
        assert psn_after(a, b) == psn_before(b, a)


@given(psns, psns)
def test_ahead_definition(a: int, b: int) -> None:
    # "a difference in [0, 2^23) is ahead"
    assert (psn_compare(a, b) >= 0) == (((a - b) % (1 << 24)) < PSN_HALF)


@given(psns, st.integers(0, 1000), st.integers(0, 2000))
def test_in_range(first: int, length: int, k: int) -> None:
    last = psn_add(first, length)
    assert psn_in_range(psn_add(first, k), first, last) == (k <= length)
