"""``pyverbs.fork``: ``ibv_fork_init`` / ``ibv_is_fork_initialized``.

A forked child gets its own copy of the simulated machine (see
:mod:`pyverbs._softrdma`), so registered memory never needs fork
protection: fork support is ``IBV_FORK_UNNEEDED``, as on a kernel with
``FOLL_PIN``-based umems.
"""

from __future__ import annotations

import pyverbs.enums as e

__all__ = ["fork_init", "is_fork_initialized"]


def fork_init() -> None:
    """``ibv_fork_init``: nothing to set up."""


def is_fork_initialized() -> int:
    """``ibv_is_fork_initialized``: ``IBV_FORK_UNNEEDED``."""
    return int(e.IBV_FORK_UNNEEDED)
