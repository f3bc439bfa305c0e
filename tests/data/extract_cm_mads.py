"""Regenerate ``cm_mads.json``: every IB CM MAD in the Linux captures.

The captures are the ones described in ``captures/SUMMARY.md`` (Linux 6.1
``rdma_rxe`` between 10.77.0.1 and 10.77.0.2): ``rping.pcap``,
``srp_imm.pcap`` and ``srp_rdma.pcap`` (also in ``tests/data/captures``)
and ``iser_login.pcap`` (only in the project's shared capture directory).
CM MADs travel as RoCEv2 UD SEND_ONLY packets to QP1; each record holds the
256-byte MAD (the UD payload) as hex::

    {"capture": "rping.pcap", "frame": 16, "direction": "10.77.0.2->10.77.0.1",
     "mad": "0107..."}

``frame`` is the 0-based record index in the pcap (tshark's frame number
minus one). Frames that are not RoCEv2 (the tools' TCP exchange, ARP) are
skipped. Usage::

    python3 tests/data/extract_cm_mads.py CAPTURE_DIR [OUTPUT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from softrdma.fabric.pcap import read_pcap
from softrdma.transport.errors import RejectedPacket
from softrdma.transport.roce import decode_roce_v2

CAPTURES = ("rping.pcap", "srp_imm.pcap", "srp_rdma.pcap", "iser_login.pcap")
GSI_QPN = 1


def extract(capture_dir: Path) -> list[dict[str, object]]:
    """The CM MAD records of every capture, in capture order."""
    out: list[dict[str, object]] = []
    for name in CAPTURES:
        for index, rec in enumerate(read_pcap(capture_dir / name)):
            try:
                frame = decode_roce_v2(rec.data)
            except RejectedPacket:
                continue
            if frame.packet.bth.dest_qp != GSI_QPN:
                continue
            out.append(
                {
                    "capture": name,
                    "frame": index,
                    "direction": f"{frame.src_ip}->{frame.dst_ip}",
                    "mad": bytes(frame.packet.payload).hex(),
                }
            )
    return out


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 3:
        print(__doc__, file=sys.stderr)
        return 2
    output = Path(argv[2]) if len(argv) == 3 else Path(__file__).with_name("cm_mads.json")
    records = extract(Path(argv[1]))
    output.write_text(json.dumps(records, indent=1) + "\n")
    print(f"{len(records)} CM MADs -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
