"""Loopback addresses and TCP ports for tests that use real sockets, unique
per test so that parallel workers never collide."""

from __future__ import annotations

import itertools
import os
import socket

_counter = itertools.count(1)


def loopback_addresses(n: int = 2) -> list[str]:
    """``n`` addresses in 127.0.0.0/8 that no other test of this run uses:
    the second octet from the process id, the third from a counter."""
    k = next(_counter)
    second = 100 + os.getpid() % 150
    third = k % 250
    return [f"127.{second}.{third}.{i + 2}" for i in range(n)]


def free_tcp_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
