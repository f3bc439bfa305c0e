"""What an SRP pcap holds, for the interop tests: the SRP_LOGIN_REQ of
every CM REQ (after its RDMA CM header) and the SRP_LOGIN_RSP of every
REP, and the RC opcodes each side sent.

Support code, not a test module (``test_srp_linux.py``,
``test_srp_lio.py``). What a test looks for beyond that in the RC packets
(immediate data, the keys in RETHs) it counts in :func:`read_srp_pcap`'s
``on_packet``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from softrdma.cm.cma_hdr import CMA_HDR_SIZE
from softrdma.cm.messages import CmRep, CmReq, decode_cm_mad
from softrdma.fabric.pcap import PcapReader
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.roce import decode_roce_v2
from softrdma.ulp.srp.proto import SrpLoginReq, SrpLoginRsp


@dataclass
class SrpWire:
    """Everything :func:`read_srp_pcap` found."""

    logins: list[SrpLoginReq] = field(default_factory=list)
    responses: list[SrpLoginRsp] = field(default_factory=list)
    opcodes: Counter[str] = field(default_factory=Counter)
    """``"<side> <opcode name>"`` for every RC packet."""


def read_srp_pcap(
    path: Path,
    host_ip: str,
    sides: tuple[str, str],
    on_packet: Callable[[SrpWire, str, Opcode, Packet], None] | None = None,
) -> SrpWire:
    """Decode the capture at ``path``; frames from ``host_ip`` are the
    side ``sides[0]``'s, the rest ``sides[1]``'s. Every RC packet (not the
    CM MADs on QP 1) goes to ``on_packet`` with the wire so far, its side
    and opcode."""
    wire = SrpWire()
    host = IPv4Address(host_ip)
    with PcapReader(path) as reader:
        for rec in reader:
            frame = decode_roce_v2(bytes(rec.data))
            p = frame.packet
            side = sides[0] if IPv4Address(frame.saddr) == host else sides[1]
            if p.bth.dest_qp == 1:
                msg = decode_cm_mad(bytes(p.payload))[1]
                if isinstance(msg, CmReq):
                    wire.logins.append(SrpLoginReq.decode_rdma(msg.private_data[CMA_HDR_SIZE:]))
                elif isinstance(msg, CmRep):
                    wire.responses.append(SrpLoginRsp.decode(msg.private_data))
                continue
            op = Opcode(p.bth.opcode)
            wire.opcodes[f"{side} {op.name}"] += 1
            if on_packet is not None:
                on_packet(wire, side, op, p)
    return wire
