"""Completion queues (``struct ib_cq``; ``ib_poll_cq``,
``ib_req_notify_cq``, ``ib_destroy_cq``).

On an empty CQ, ``poll`` first lets hardware that runs only when driven
(simulated time) make progress until a completion is there or nothing more
can happen; hardware on its own progress thread (real time) is not waited
for: ``poll`` returns what is there, and :meth:`CompletionQueue.wait`
blocks (with a timeout) until something is. So ``post_send`` followed by a
``poll`` loop works as it does against hardware. A completion arriving at
a full CQ overflows it: the completion is lost and ``IB_EVENT_CQ_ERR`` is
raised, as rxe does.

:class:`CompChannel` is the completion channel (``ibv_comp_channel``): a
CQ created with it as ``comp_handler`` queues an event each time it fires,
and a thread sleeps in :meth:`CompChannel.get_cq_event` until one comes.
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
        # Only threads waiting on real time need waking: on simulated time
        # the poller runs the loop itself (Scheduler.wait).
        self._wake = not device.scheduler.simulated
        self.timestamping = False
        """Stamp each completion with the device clock as it is pushed
        (``WorkCompletion.timestamp``; completion timestamps of
        ``ibv_create_cq_ex``). Off by default: no clock read per completion."""
        self._clock = device.scheduler.time

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def armed(self) -> bool:
        """A :meth:`req_notify` is pending: the next completion (a
        solicited one, if asked) calls ``comp_handler``."""
        return self._armed

    def quiet_for(self, n: int) -> bool:
        """``n`` more completions can be pushed without calling anything:
        no notification armed, no overflow event (a driver may then push
        them a moment later, with the same result)."""
        return not self._armed and len(self._entries) + n < self.cqe

    def __repr__(self) -> str:
        return f"CompletionQueue({self.device.name}, {len(self)}/{self.cqe})"

    def poll(self, num_entries: int = 1) -> list[WorkCompletion]:
        """``ib_poll_cq``: up to ``num_entries`` completions, oldest first."""
        if num_entries <= 0:
            raise VerbsError(errno.EINVAL, "num_entries must be positive")
        entries = self._entries
        with self.device.lock:
            if not entries:
                self.device.progress(lambda: bool(entries))
            out: list[WorkCompletion] = []
            while entries and len(out) < num_entries:
                out.append(entries.popleft())
        return out

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the CQ holds a completion or ``timeout`` seconds pass
        (simulated seconds on simulated time; None: no limit on real time,
        the progress budget on simulated time). Returns whether one is
        there; :meth:`poll` then takes it."""
        entries = self._entries
        with self.device.lock:
            return bool(entries) or self.device.wait(lambda: bool(entries), timeout)

    def req_notify(self, solicited_only: bool = False) -> None:
        """``ib_req_notify_cq``: call ``comp_handler`` at the next completion
        (only a solicited one with ``solicited_only``)."""
        self._armed = True
        self._solicited_only = solicited_only

    def push(self, wc: WorkCompletion, solicited: bool = False) -> None:
        """The driver posts a completion (``rxe_cq_post``), holding the
        device lock; threads in :meth:`wait` wake up."""
        if self._wake:
            lock = self.device.lock
            with lock:
                lock.notify_all()
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
        if self.timestamping:
            wc.timestamp = self._clock()
        self._entries.append(wc)
        if self._armed and (solicited or not self._solicited_only):
            self._armed = False
            if self.comp_handler is not None:
                self.comp_handler(self)

    def destroy(self) -> None:
        """``ib_destroy_cq``: no QP may still use it."""
        with self.device.lock:
            if self.usecnt:
                raise VerbsError(errno.EBUSY, f"CQ still used by {self.usecnt} QPs")
            if not self.destroyed:
                self.destroyed = True
                self.device._forget_cq(self)


class CompChannel:
    """A completion channel (``ibv_create_comp_channel``,
    ``ibv_get_cq_event``, ``ibv_ack_cq_events``): pass it as a CQ's
    ``comp_handler``; each notification of an armed CQ
    (:meth:`CompletionQueue.req_notify`) queues one event."""

    def __init__(self) -> None:
        self._events: deque[CompletionQueue] = deque()
        self.unacked = 0
        """Events taken and not yet acknowledged."""

    def __call__(self, cq: CompletionQueue) -> None:
        self._events.append(cq)

    def get_cq_event(self, device: IbDevice, timeout: float | None = None) -> CompletionQueue:
        """``ibv_get_cq_event``: the CQ of the next event, waiting up to
        ``timeout`` seconds on ``device``'s hardware. Raises
        :class:`VerbsError` (``ETIMEDOUT``) when none came."""
        events = self._events
        with device.lock:
            if not events and not device.wait(lambda: bool(events), timeout):
                raise VerbsError(errno.ETIMEDOUT, "no completion event")
            self.unacked += 1
            return events.popleft()

    def ack_cq_events(self, n: int) -> None:
        """``ibv_ack_cq_events``."""
        if not 0 <= n <= self.unacked:
            raise VerbsError(errno.EINVAL, f"acking {n} events, {self.unacked} unacked")
        self.unacked -= n
