"""SRP information units (softrdma.ulp.srp.proto) against Linux's own SRP
sessions and against srp.h's layouts.

The captures ``tests/data/captures/srp_imm.pcap`` and ``srp_rdma.pcap`` (see
SUMMARY.md) hold a login, a SCSI scan and O_DIRECT I/O between ib_srp
(10.77.0.2) and LIO's ib_srpt (10.77.0.1) over Soft-RoCE: every SRP IU in them
must decode into typed fields and re-encode to the same bytes, and the fields
must agree with what the peers then did on the wire (the RDMA WRITEs and
READs that move the data, the responses that complete the commands). Where
tshark is installed, it extracts the same IUs and RETHs independently.

Then srp.h's layouts byte by byte for the IUs the captures lack (indirect
descriptors, task management, logout, credit and event IUs, login reject),
the error cases, and hypothesis round-trip / truncation properties for every
IU type.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cache
from ipaddress import IPv4Address
from pathlib import Path

from softrdma.cm.cma_hdr import CMA_HDR_SIZE
from softrdma.cm.messages import CmRep, CmReq, decode_cm_mad
from softrdma.fabric.pcap import read_pcap
from softrdma.transport.errors import NotRoceV2
from softrdma.transport.headers import Reth
from softrdma.transport.opcodes import Opcode
from softrdma.transport.roce import decode_roce_v2
from softrdma.ulp.srp import (
    SrpCmd,
    SrpDirectBuf,
    SrpLoginReq,
    SrpLoginReqFlag,
    SrpLoginRsp,
    SrpLoginRspFlag,
    SrpRsp,
    decode_srp_iu,
)

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "captures"
INITIATOR = IPv4Address("10.77.0.2")
TARGET = IPv4Address("10.77.0.1")
SECTOR = 512

# SCSI operation codes (SPC / SBC).
TEST_UNIT_READY = 0x00
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
READ_10 = 0x28
WRITE_10 = 0x2A
SERVICE_ACTION_IN_16 = 0x9E  # READ CAPACITY(16) with service action 0x10
REPORT_LUNS = 0xA0
MAINTENANCE_IN = 0xA3  # REPORT SUPPORTED OPERATION CODES, which LIO rejects here

SEND_OPS = {
    Opcode.RC_SEND_FIRST,
    Opcode.RC_SEND_MIDDLE,
    Opcode.RC_SEND_LAST,
    Opcode.RC_SEND_ONLY,
}
WRITE_OPS = {
    Opcode.RC_RDMA_WRITE_FIRST,
    Opcode.RC_RDMA_WRITE_MIDDLE,
    Opcode.RC_RDMA_WRITE_LAST,
    Opcode.RC_RDMA_WRITE_ONLY,
}
READ_RESP_OPS = {
    Opcode.RC_RDMA_READ_RESPONSE_FIRST,
    Opcode.RC_RDMA_READ_RESPONSE_MIDDLE,
    Opcode.RC_RDMA_READ_RESPONSE_LAST,
    Opcode.RC_RDMA_READ_RESPONSE_ONLY,
}
FIRST_OPS = {
    Opcode.RC_SEND_FIRST,
    Opcode.RC_SEND_ONLY,
    Opcode.RC_RDMA_WRITE_FIRST,
    Opcode.RC_RDMA_WRITE_ONLY,
    Opcode.RC_RDMA_READ_RESPONSE_FIRST,
    Opcode.RC_RDMA_READ_RESPONSE_ONLY,
}
LAST_OPS = {
    Opcode.RC_SEND_LAST,
    Opcode.RC_SEND_ONLY,
    Opcode.RC_RDMA_WRITE_LAST,
    Opcode.RC_RDMA_WRITE_ONLY,
    Opcode.RC_RDMA_READ_RESPONSE_LAST,
    Opcode.RC_RDMA_READ_RESPONSE_ONLY,
}


# --- reading a session out of a capture -------------------------------------------------------


@dataclass
class Message:
    """One RC message put back together from its packets."""

    frame: int  # 1-based frame number of its first packet (tshark's frame.number)
    src: IPv4Address
    kind: str  # "send", "write", "read_req", "read_resp"
    psn: int  # of its first packet
    data: bytes = b""
    reth: Reth | None = None
    frames: list[int] = field(default_factory=list)


@dataclass
class Session:
    """The SRP session in one capture: CM messages and RC messages in order."""

    req: CmReq
    rep: CmRep
    messages: list[Message]

    def sends(self, src: IPv4Address) -> list[Message]:
        return [m for m in self.messages if m.kind == "send" and m.src == src]


@cache
def session(name: str) -> Session:
    """Reassemble the capture: SENDs, RDMA WRITEs and RDMA READ responses per
    direction and QP from their FIRST / MIDDLE / LAST packets, which must
    have consecutive PSNs; a packet whose PSN was seen before in its PSN
    space (a retransmission) is dropped."""
    cms: list[object] = []
    messages: list[Message] = []
    open_msgs: dict[tuple[IPv4Address, int, str], Message] = {}
    seen: set[tuple[IPv4Address, int, str, int]] = set()
    for index, rec in enumerate(read_pcap(CAPTURES / name)):
        try:
            frame = decode_roce_v2(rec.data)
        except NotRoceV2:
            continue  # the non-RoCE frames (ARP, …)
        pkt = frame.packet
        src = frame.src_ip
        assert isinstance(src, IPv4Address)
        op = pkt.opcode
        if op == Opcode.UD_SEND_ONLY:
            cms.append(decode_cm_mad(bytes(pkt.payload))[1])
            continue
        space = "resp" if op in READ_RESP_OPS or op == Opcode.RC_ACKNOWLEDGE else "req"
        key = (src, pkt.dest_qp, space, pkt.psn)
        if key in seen:
            continue
        seen.add(key)
        if op == Opcode.RC_RDMA_READ_REQUEST:
            messages.append(Message(index + 1, src, "read_req", pkt.psn, reth=pkt.reth))
            continue
        if op in SEND_OPS:
            kind = "send"
        elif op in WRITE_OPS:
            kind = "write"
        elif op in READ_RESP_OPS:
            kind = "read_resp"
        else:
            continue
        flow = (src, pkt.dest_qp, kind)
        if op in FIRST_OPS:
            assert flow not in open_msgs, f"frame {index + 1}: a new message before the last ended"
            open_msgs[flow] = Message(index + 1, src, kind, pkt.psn, reth=pkt.reth)
        msg = open_msgs[flow]
        assert pkt.psn == (msg.psn + len(msg.frames)) & 0xFFFFFF, f"frame {index + 1}: PSN gap"
        msg.data += bytes(pkt.payload)
        msg.frames.append(index + 1)
        if op in LAST_OPS:
            messages.append(open_msgs.pop(flow))
    assert not open_msgs
    req, rep = (m for m in cms if isinstance(m, CmReq | CmRep))
    assert isinstance(req, CmReq) and isinstance(rep, CmRep)
    return Session(req, rep, messages)


@dataclass
class Exchange:
    """One SRP command and everything that answered it."""

    cmd: SrpCmd
    cmd_msg: Message
    rsp: SrpRsp | None = None
    writes: list[Message] = field(default_factory=list)  # target RDMA WRITEs to its buffer
    read_reqs: list[Message] = field(default_factory=list)  # target RDMA READs of its buffer


def login(name: str) -> tuple[SrpLoginReq, SrpLoginRsp]:
    s = session(name)
    return (
        SrpLoginReq.decode_rdma(s.req.private_data[CMA_HDR_SIZE:]),
        SrpLoginRsp.decode(s.rep.private_data),
    )


def channel_imm_offset(name: str) -> int | None:
    """The immediate-data offset the channel agreed on, as ib_srpt decides
    it (``srpt_cm_req_recv``): the request's, if immediate data was requested
    and granted."""
    req, rsp = login(name)
    if req.req_flags & SrpLoginReqFlag.IMMED_REQUESTED and rsp.rsp_flags & (
        SrpLoginRspFlag.IMMED_SUPP
    ):
        return req.imm_data_offset
    return None


@cache
def exchanges(name: str) -> list[Exchange]:
    """Commands in order, each with its response (matched by tag among the
    outstanding ones) and the RDMA operations that use its descriptor's
    R_Key."""
    offset = channel_imm_offset(name)
    done: list[Exchange] = []
    pending: dict[int, Exchange] = {}
    by_key: dict[int, Exchange] = {}
    for m in session(name).messages:
        if m.kind == "send" and m.src == INITIATOR:
            cmd = decode_srp_iu(m.data, offset)
            assert isinstance(cmd, SrpCmd)
            assert cmd.tag not in pending, f"tag {cmd.tag:#x} reused while outstanding"
            ex = Exchange(cmd, m)
            pending[cmd.tag] = ex
            done.append(ex)
            for desc in (cmd.data_out, cmd.data_in):
                if isinstance(desc, SrpDirectBuf):
                    by_key[desc.key] = ex
        elif m.kind == "send":
            rsp = decode_srp_iu(m.data)
            assert isinstance(rsp, SrpRsp)
            assert rsp.tag in pending, f"SRP_RSP for tag {rsp.tag:#x}, which is not outstanding"
            pending.pop(rsp.tag).rsp = rsp
        elif m.kind in ("write", "read_req") and m.reth is not None and m.reth.rkey in by_key:
            ex = by_key[m.reth.rkey]
            (ex.writes if m.kind == "write" else ex.read_reqs).append(m)
    assert not pending, f"commands without a response: {sorted(pending)}"
    return done


def lba_and_blocks(cdb: bytes) -> tuple[int, int]:
    """LBA and transfer length of a READ(10) / WRITE(10) CDB."""
    lba, blocks = struct.unpack_from(">xxIxH", cdb)
    return lba, blocks


CAPTURE_NAMES = ["srp_imm.pcap", "srp_rdma.pcap"]


def be(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")
