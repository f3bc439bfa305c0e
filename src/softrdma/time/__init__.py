"""Time: the scheduler devices and links run on — simulated (deterministic,
driven by the application) or real (an asyncio loop on a progress thread),
behind one API (:class:`Scheduler`).

Kernel counterparts: timers (``mod_timer``), tasklets and work items,
``jiffies``.
"""

from softrdma.time.base import EventLoopError, Handle, Scheduler
from softrdma.time.realtime import RealTimeHandle, RealTimeLoop
from softrdma.time.sim import PROGRESS_MAX_EVENTS, PROGRESS_MAX_TIME, SimLoop, TimerHandle

__all__ = [
    "PROGRESS_MAX_EVENTS",
    "PROGRESS_MAX_TIME",
    "EventLoopError",
    "Handle",
    "RealTimeHandle",
    "RealTimeLoop",
    "Scheduler",
    "SimLoop",
    "TimerHandle",
]
