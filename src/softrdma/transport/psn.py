"""24-bit packet sequence number arithmetic.

Kernel counterparts: ``drivers/infiniband/sw/rxe/rxe_verbs.h`` /
``rxe_loc.h`` ``psn_compare()`` and the ``& BTH_PSN_MASK`` idiom used
throughout ``rxe_req.c`` / ``rxe_resp.c`` / ``rxe_comp.c``.

PSNs live on a circle of 2**24 values. The difference ``a - b`` is taken
modulo 2**24 and read as a signed 24-bit number: a difference in
``[0, 2**23)`` means ``a`` is at or ahead of ``b``; in ``[-2**23, 0)`` it is
behind. Exactly half the circle apart (2**23) reads as "behind" in both
directions, as the kernel's sign-extension does.
"""

from __future__ import annotations

__all__ = [
    "PSN_HALF",
    "PSN_MASK",
    "PSN_MODULUS",
    "psn_add",
    "psn_after",
    "psn_before",
    "psn_compare",
    "psn_diff",
    "psn_in_range",
]

PSN_MODULUS = 1 << 24
PSN_MASK = PSN_MODULUS - 1
"""rxe_hdr.h ``BTH_PSN_MASK``."""
PSN_HALF = 1 << 23


def psn_add(psn: int, n: int = 1) -> int:
    """``(psn + n) & BTH_PSN_MASK`` (rxe_req.c ``qp->req.psn = (psn + 1) &
    BTH_PSN_MASK``); ``n`` may be negative."""
    return (psn + n) & PSN_MASK


def psn_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` on the PSN circle, in ``[-2**23, 2**23)``
    (rxe ``psn_compare``: ``(s32)((a - b) << 8)``, here without the scaling)."""
    return ((a - b + PSN_HALF) & PSN_MASK) - PSN_HALF


def psn_compare(a: int, b: int) -> int:
    """Negative, zero or positive as ``a`` is behind, equal to or ahead of ``b``
    (rxe ``psn_compare``)."""
    return psn_diff(a, b)


def psn_after(a: int, b: int) -> bool:
    """``a`` is strictly ahead of ``b`` (``psn_compare(a, b) > 0``)."""
    return psn_diff(a, b) > 0


def psn_before(a: int, b: int) -> bool:
    """``a`` is strictly behind ``b`` (``psn_compare(a, b) < 0``)."""
    return psn_diff(a, b) < 0


def psn_in_range(psn: int, first: int, last: int) -> bool:
    """``first <= psn <= last`` on the circle, for a window shorter than 2**23
    (e.g. the PSNs an RDMA READ request reserves for its responses)."""
    return psn_diff(psn, first) >= 0 and psn_diff(last, psn) >= 0
