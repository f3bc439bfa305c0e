"""Interop tests against a real Linux (rdma_rxe under QEMU): opt-in.

Tests marked ``interop`` are skipped unless the run selects the marker
(``python3 -m pytest -m interop tests/interop``) or SOFTRDMA_INTEROP=1 is
set. They need root, QEMU (TCG is enough) and debootstrap; the first run
builds the VM image into the cache (see ``linuxvm.py``). Run them without
``-n``: one VM boots per pytest process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from tests.interop.linuxvm import InteropUnavailable, LinuxPeer, build_image


def interop_selected(config: pytest.Config) -> bool:
    """True if this run asked for the interop tests."""
    if os.environ.get("SOFTRDMA_INTEROP") == "1":
        return True
    markexpr = str(config.getoption("markexpr", "") or "")
    # Selected by the marker expression, and not only negated in it.
    return bool(re.search(r"\binterop\b", markexpr)) and not re.fullmatch(
        r"\s*not\s+interop\s*", markexpr
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if interop_selected(config):
        return
    skip = pytest.mark.skip(
        reason="interop test: run with `pytest -m interop` (or SOFTRDMA_INTEROP=1); "
        "needs root, QEMU and a Debian VM with rdma_rxe"
    )
    for item in items:
        if item.get_closest_marker("interop") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def linux_peer() -> Iterator[LinuxPeer]:
    """A booted Debian VM with rxe0 on 10.77.0.1; the host end 10.77.0.2 in ``.netns``."""
    try:
        image = build_image()
        peer = LinuxPeer(image=image)
        peer.start()
    except InteropUnavailable as e:
        pytest.skip(str(e))
    try:
        yield peer
    finally:
        peer.close()
