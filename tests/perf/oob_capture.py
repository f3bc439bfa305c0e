"""The TCP payloads of the perftest captures (``tests/data/captures``):
each segment with data, in capture order, as (sender, bytes)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from softrdma.fabric.pcap import PcapReader

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "captures"
OOB_PORT = 18515


@dataclass(frozen=True)
class Segment:
    """One TCP segment with data: ``client`` when the client sent it."""

    client: bool
    data: bytes


def tcp_segments(name: str) -> list[Segment]:
    """Every TCP segment with a payload to or from port 18515."""
    out: list[Segment] = []
    with PcapReader(CAPTURES / name) as r:
        for rec in r:
            f = bytes(rec.data)
            if f[12:14] != b"\x08\x00" or f[23] != 6:
                continue
            l4 = 14 + (f[14] & 0x0F) * 4
            sport, dport = struct.unpack_from(">HH", f, l4)
            if OOB_PORT not in (sport, dport):
                continue
            data = f[l4 + (f[l4 + 12] >> 4) * 4 : 14 + struct.unpack_from(">H", f, 16)[0]]
            if data:
                out.append(Segment(dport == OOB_PORT, data))
    return out
