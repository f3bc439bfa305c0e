"""Reading a pcap back with tshark, the independent decoder of the tap's
frames (skipped with a reason where tshark is not installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

needs_tshark = pytest.mark.skipif(
    shutil.which("tshark") is None,
    reason="tshark is not installed (apt-get install -y tshark); it checks the pcap tap's frames",
)


def bth_fields(path: Path, *fields: str) -> list[tuple[int, ...]]:
    """One tuple of integers per InfiniBand frame: the ``infiniband.bth.<field>``
    values tshark decodes (RPC-over-RDMA dissection off, as SEND payloads
    would otherwise be mistaken for it)."""
    args = ["tshark", "-r", str(path), "--disable-protocol", "rpcordma", "-T", "fields"]
    for f in fields:
        args += ["-e", f"infiniband.bth.{f}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    return [tuple(int(x, 0) for x in line.split("\t")) for line in out.splitlines() if line]
