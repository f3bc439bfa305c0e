"""What an iSER pcap holds, for the interop tests: the RDMA CM messages
with their iSER CM headers, every iSCSI PDU of every SEND (reassembled
from FIRST / MIDDLE / LAST), and the RC opcodes each side sent.

Support code, not a test module. Retransmitted packets (the same PSN on
the same QP again) are counted once, so a capture taken under loss reads
the same as one without.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypeVar

from softrdma.cm.cma_hdr import CMA_HDR_SIZE
from softrdma.cm.messages import CmRep, CmReq, decode_cm_mad
from softrdma.fabric.pcap import PcapReader
from softrdma.transport.errors import NotRoceV2
from softrdma.transport.opcodes import Opcode
from softrdma.transport.roce import decode_roce_v2
from softrdma.ulp.iscsi.proto import IscsiPdu
from softrdma.ulp.iser.proto import IserCmHdr, IserHdr, decode_iser_send

P = TypeVar("P", bound=IscsiPdu)

_SEND_FIRST_MIDDLE = frozenset({Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE})
_SEND_END = frozenset(
    {
        Opcode.RC_SEND_ONLY,
        Opcode.RC_SEND_LAST,
        Opcode.RC_SEND_ONLY_WITH_INVALIDATE,
        Opcode.RC_SEND_LAST_WITH_INVALIDATE,
        Opcode.RC_SEND_ONLY_WITH_IMMEDIATE,
        Opcode.RC_SEND_LAST_WITH_IMMEDIATE,
    }
)


@dataclass(frozen=True)
class IserMessage:
    """One SEND's iSER header and iSCSI PDU; ``side`` is ``"host"`` or
    ``"vm"``, ``with_inv`` whether it was a SEND_WITH_INVALIDATE (and of
    which rkey)."""

    side: str
    hdr: IserHdr
    pdu: IscsiPdu
    invalidated: int | None


@dataclass
class IserWire:
    """Everything :func:`read_iser_pcap` found."""

    cm: list[tuple[str, str]] = field(default_factory=list)
    """``(side, message type)`` of every CM MAD, in order."""
    req_cm_hdrs: list[IserCmHdr] = field(default_factory=list)
    rep_cm_hdrs: list[IserCmHdr] = field(default_factory=list)
    messages: list[IserMessage] = field(default_factory=list)
    opcodes: Counter[str] = field(default_factory=Counter)
    """``"<side> <opcode name>"`` for every (first) packet."""
    rkeys: Counter[str] = field(default_factory=Counter)
    """``"<side> <rkey>"`` of every RETH a side sent (RDMA READ / WRITE)."""

    def pdus(self, side: str, kind: type[P]) -> list[P]:
        """The PDUs of type ``kind`` that ``side`` sent, in order."""
        return [m.pdu for m in self.messages if m.side == side and isinstance(m.pdu, kind)]


def read_iser_pcap(path: Path, host_ip: str) -> IserWire:
    """Decode the capture at ``path``; frames from ``host_ip`` are the host
    side's, the rest the VM's."""
    wire = IserWire()
    host = IPv4Address(host_ip)
    seen: set[tuple[str, int, int, Opcode]] = set()
    partial: dict[tuple[str, int], bytearray] = {}
    with PcapReader(path) as reader:
        for rec in reader:
            try:
                frame = decode_roce_v2(bytes(rec.data))
            except NotRoceV2:
                continue  # ARP, IPv6 neighbour discovery...
            p = frame.packet
            side = "host" if IPv4Address(frame.saddr) == host else "vm"
            qp = p.bth.dest_qp
            if qp == 1:
                msg = decode_cm_mad(bytes(p.payload))[1]
                wire.cm.append((side, type(msg).__name__))
                if isinstance(msg, CmReq):
                    wire.req_cm_hdrs.append(IserCmHdr.decode(msg.private_data[CMA_HDR_SIZE:]))
                elif isinstance(msg, CmRep):
                    wire.rep_cm_hdrs.append(IserCmHdr.decode(msg.private_data))
                continue
            op = Opcode(p.bth.opcode)
            key = (side, qp, p.bth.psn, op)
            if key in seen and op is not Opcode.RC_ACKNOWLEDGE:
                continue  # a retransmission
            seen.add(key)
            wire.opcodes[f"{side} {op.name}"] += 1
            if p.reth is not None:
                wire.rkeys[f"{side} {p.reth.rkey:#x}"] += 1
            if op in _SEND_FIRST_MIDDLE:
                partial.setdefault((side, qp), bytearray()).extend(bytes(p.payload))
            elif op in _SEND_END:
                data = partial.pop((side, qp), bytearray()) + bytes(p.payload)
                inv = p.ieth.inv_rkey if p.ieth is not None else None
                hdr, pdu = decode_iser_send(bytes(data))
                wire.messages.append(IserMessage(side, hdr, pdu, inv))
    return wire
