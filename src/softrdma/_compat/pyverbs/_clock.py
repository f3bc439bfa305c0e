"""The device clock behind completion timestamps and
``ibv_query_rt_values_ex``.

A softrdma device's free-running clock is its scheduler's time (simulated
seconds on simulated time, monotonic seconds on real time), counted in
ticks of a 1 GHz core clock: ``hca_core_clock`` is 1 000 000 kHz and a
tick is a nanosecond, with a 64-bit ``completion_timestamp_mask``. The
wall clock of ``IBV_WC_EX_WITH_COMPLETION_TIMESTAMP_WALLCLOCK`` is that
clock plus a fixed offset taken the first time the device's clock is
read against the host's ``CLOCK_REALTIME`` (as a NIC's clock is
synchronised to the host once and then runs on its own), so wall-clock
stamps advance exactly as the device clock does.
"""

from __future__ import annotations

import time
from typing import Final
from weakref import WeakKeyDictionary

from softrdma.verbs.device import IbDevice

#: ``ibv_device_attr_ex.hca_core_clock``: the core clock in kHz (1 GHz).
HCA_CORE_CLOCK_KHZ: Final = 1_000_000
#: ``ibv_device_attr_ex.completion_timestamp_mask``: the clock's valid bits.
COMPLETION_TIMESTAMP_MASK: Final = (1 << 64) - 1
_TICKS_PER_SECOND: Final = HCA_CORE_CLOCK_KHZ * 1000
_NS_PER_SECOND: Final = 1_000_000_000

# device -> CLOCK_REALTIME ns at device clock 0
_wall_offset: WeakKeyDictionary[IbDevice, int] = WeakKeyDictionary()


def ticks(seconds: float) -> int:
    """Device clock ticks of a device-clock time in seconds (a
    ``WorkCompletion.timestamp``), masked to the clock's width."""
    return round(seconds * _TICKS_PER_SECOND) & COMPLETION_TIMESTAMP_MASK


def device_now(dev: IbDevice) -> float:
    """The device clock now, in seconds."""
    return dev.scheduler.time()


def wallclock_ns(dev: IbDevice, seconds: float) -> int:
    """``CLOCK_REALTIME`` nanoseconds of a device-clock time in seconds."""
    offset = _wall_offset.get(dev)
    if offset is None:
        offset = time.time_ns() - round(device_now(dev) * _NS_PER_SECOND)
        _wall_offset[dev] = offset
    return offset + round(seconds * _NS_PER_SECOND)
