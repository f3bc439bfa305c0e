"""A consumer's CQ with a completion callback per work request, polled from
deferred work: the kernel's ``struct ib_cqe`` (``wc->wr_cqe->done``) on a
CQ allocated with ``IB_POLL_WORKQUEUE`` (``ib_alloc_cq``,
``ib_cq_poll_work``), as LIO's ``ib_srpt`` and ``ib_isert`` use theirs."""

from __future__ import annotations

from collections.abc import Callable

from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.device import IbDevice
from softrdma.verbs.wr import WorkCompletion

__all__ = ["CqWork"]

_BATCH = 32
"""Completions taken per poll (``IB_POLL_BATCH``)."""


class CqWork:
    """A CQ of ``cqe`` entries on ``dev`` whose completions go to the
    ``done`` callback registered with each work request's id
    (:meth:`wr_id`). A completion event schedules one pass on the device's
    scheduler that drains the CQ and re-arms it. ``on_unclaimed`` sees a
    completion without a callback (an unsignaled WR's error); after
    :meth:`destroy` nothing more is delivered."""

    def __init__(
        self,
        dev: IbDevice,
        cqe: int,
        *,
        on_unclaimed: Callable[[WorkCompletion], None] | None = None,
    ) -> None:
        self.dev = dev
        self._done: dict[int, Callable[[WorkCompletion], None]] = {}
        self._next = 1
        self._scheduled = False
        self._destroyed = False
        self._on_unclaimed = on_unclaimed
        self.cq: CompletionQueue = dev.create_cq(cqe, comp_handler=self._event)

    def wr_id(self, done: Callable[[WorkCompletion], None]) -> int:
        """A fresh work-request id whose completion calls ``done``."""
        wr_id = self._next
        self._next += 1
        self._done[wr_id] = done
        return wr_id

    def destroy(self) -> None:
        """Forget every callback and destroy the CQ (``ib_free_cq``)."""
        self._destroyed = True
        self._done.clear()
        self.cq.destroy()

    def _stopped(self) -> bool:
        return self._destroyed

    def _event(self, cq: CompletionQueue) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.dev.scheduler.call_soon(self._process)

    def _process(self) -> None:
        """``ib_cq_poll_work``: drain, re-arm, drain what raced the re-arm."""
        self._scheduled = False
        while not self._stopped():
            wcs = self.cq.poll(_BATCH)
            if not wcs:
                self.cq.req_notify()
                wcs = self.cq.poll(_BATCH)
                if not wcs:
                    return
            for wc in wcs:
                done = self._done.pop(wc.wr_id, None)
                if done is not None:
                    done(wc)
                elif self._on_unclaimed is not None:
                    self._on_unclaimed(wc)
                if self._stopped():  # a callback destroyed it
                    return
