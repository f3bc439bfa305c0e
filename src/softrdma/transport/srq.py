"""A shared receive queue as the transport engines see it: receive WQEs
posted once and taken by whichever QP attached to it receives a message
first, with the limit that raises ``IB_EVENT_SRQ_LIMIT_REACHED``.

Kernel counterpart: ``struct rxe_srq`` and ``rxe_srq.c``; the responder
takes from it in ``get_srq_wqe`` (rxe_resp.c), which pops the WQE at
once, so a message that spans packets keeps its WQE while other QPs take
the next ones.
"""

from __future__ import annotations

from collections import deque

from softrdma.transport.errors import LocalProtocolError
from softrdma.transport.wqe import QpEvent, SrqLimitReached
from softrdma.verbs.wr import RecvWR

__all__ = ["SharedRq"]


class SharedRq:
    """``struct rxe_srq``: at most ``max_wr`` receive WQEs; ``limit`` is the
    armed low-water mark (0: not armed)."""

    __slots__ = ("error", "limit", "max_sge", "max_wr", "queue", "srqn")

    def __init__(self, srqn: int, max_wr: int, max_sge: int, limit: int = 0) -> None:
        if max_wr < 1 or max_sge < 1:
            raise LocalProtocolError("an SRQ needs max_wr and max_sge of at least 1")
        if not 0 <= limit <= max_wr:
            raise LocalProtocolError(f"srq_limit {limit} above max_wr {max_wr}")
        self.srqn = srqn
        self.max_wr = max_wr
        self.max_sge = max_sge
        self.limit = limit
        self.queue: deque[RecvWR] = deque()
        self.error = False

    def __repr__(self) -> str:
        return f"SharedRq({self.srqn:#x}, {len(self.queue)}/{self.max_wr}, limit {self.limit})"

    def __len__(self) -> int:
        return len(self.queue)

    def post_recv(self, wr: RecvWR) -> None:
        """Queue one receive WQE (rxe_verbs.c ``rxe_post_srq_recv`` →
        ``post_one_recv``): a full queue or too many SGEs is an error."""
        if len(self.queue) >= self.max_wr:
            raise LocalProtocolError(f"SRQ {self.srqn:#x} is full ({self.max_wr} WRs)")
        if len(wr.sg_list) > self.max_sge:
            raise LocalProtocolError(f"{len(wr.sg_list)} SGEs > SRQ max_sge {self.max_sge}")
        self.queue.append(wr)

    def peek(self) -> RecvWR | None:
        """The WQE :meth:`take` would hand out next."""
        return self.queue[0] if self.queue else None

    def take(self, events: list[QpEvent]) -> RecvWR | None:
        """rxe_resp.c ``get_srq_wqe``: pop the next WQE; when that leaves
        fewer than ``limit`` the limit disarms and :class:`SrqLimitReached`
        goes to ``events`` (the taking QP's output), once."""
        queue = self.queue
        if not queue:
            return None
        wr = queue.popleft()
        if self.limit and len(queue) < self.limit:
            self.limit = 0
            events.append(SrqLimitReached(self.srqn))
        return wr

    def modify(self, max_wr: int | None, limit: int | None) -> None:
        """rxe_srq.c ``rxe_srq_chk_attr`` / ``rxe_srq_from_attr``: resize (never
        below the WQEs queued) and/or arm the limit (at most ``max_wr``)."""
        new_max = self.max_wr if max_wr is None else max_wr
        if new_max < 1 or new_max < len(self.queue):
            raise LocalProtocolError(
                f"max_wr {new_max} below 1 or below the {len(self.queue)} WQEs queued"
            )
        if limit is not None and not 0 <= limit <= new_max:
            raise LocalProtocolError(f"srq_limit {limit} above max_wr {new_max}")
        if limit is None and self.limit > new_max:
            raise LocalProtocolError(f"max_wr {new_max} below the armed limit {self.limit}")
        self.max_wr = new_max
        if limit is not None:
            self.limit = limit

    def clear(self) -> list[RecvWR]:
        """Empty the queue (``ib_destroy_srq``); return what was in it."""
        wrs = list(self.queue)
        self.queue.clear()
        return wrs
