"""Completion queues (``struct ib_cq``; ``ib_poll_cq``,
``ib_req_notify_cq``, ``ib_destroy_cq``).

``poll`` first lets the simulated hardware make progress until a
completion is there or nothing more can happen (see the README's progress
model), so ``post_send`` followed by a ``poll`` loop works as it does
against hardware. A completion arriving at a full CQ overflows it: the
completion is lost and ``IB_EVENT_CQ_ERR`` is raised, as rxe does.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from softrdma.verbs.enums import IbEventType
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.wr import WorkCompletion

if TYPE_CHECKING:
    from softrdma.verbs.device import EventHandler, IbDevice


class CompletionQueue:
    """``struct ib_cq`` of depth ``cqe``."""

    def __init__(
        self,
        device: IbDevice,
        cqe: int,
        comp_handler: Callable[[CompletionQueue], None] | None,
        event_handler: EventHandler | None,
    ) -> None:
        self.device = device
        self.cqe = cqe
        self.comp_handler = comp_handler
        self.event_handler = event_handler
        self._entries: deque[WorkCompletion] = deque()
        self._armed = False
        self._solicited_only = False
        self.overflowed = False
        self.usecnt = 0
        self.destroyed = False

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"CompletionQueue({self.device.name}, {len(self)}/{self.cqe})"

    def poll(self, num_entries: int = 1) -> list[WorkCompletion]:
        """``ib_poll_cq``: up to ``num_entries`` completions, oldest first."""
        if num_entries <= 0:
            raise VerbsError(errno.EINVAL, "num_entries must be positive")
        if not self._entries:
            self.device.ops_progress(lambda: bool(self._entries))
        out: list[WorkCompletion] = []
        while self._entries and len(out) < num_entries:
            out.append(self._entries.popleft())
        return out

    def req_notify(self, solicited_only: bool = False) -> None:
        """``ib_req_notify_cq``: call ``comp_handler`` at the next completion
        (only a solicited one with ``solicited_only``)."""
        self._armed = True
        self._solicited_only = solicited_only

    def push(self, wc: WorkCompletion, solicited: bool = False) -> None:
        """The driver posts a completion (``rxe_cq_post``)."""
        if len(self._entries) >= self.cqe:
            self.overflowed = True
            from softrdma.verbs.device import IbEvent

            self.device.dispatch_event(
                IbEvent(
                    IbEventType.CQ_ERR,
                    self.device,
                    cq=self,
                    reason=f"CQ overflow: {self.cqe} entries",
                )
            )
            return
        self._entries.append(wc)
        if self._armed and (solicited or not self._solicited_only):
            self._armed = False
            if self.comp_handler is not None:
                self.comp_handler(self)

    def destroy(self) -> None:
        """``ib_destroy_cq``: no QP may still use it."""
        if self.usecnt:
            raise VerbsError(errno.EBUSY, f"CQ still used by {self.usecnt} QPs")
        if not self.destroyed:
            self.destroyed = True
            self.device._forget_cq(self)
