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

import shutil
import struct
import subprocess
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cache
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.cm.cma_hdr import CMA_HDR_SIZE, CmaHdr
from softrdma.cm.messages import CmRep, CmReq, decode_cm_mad
from softrdma.fabric.pcap import read_pcap
from softrdma.transport.errors import NotRoceV2
from softrdma.transport.headers import Reth
from softrdma.transport.opcodes import Opcode
from softrdma.transport.roce import decode_roce_v2
from softrdma.ulp import srp
from softrdma.ulp.srp import (
    SRP_IMM_DATA_OFFSET,
    SrpAerReq,
    SrpAerRsp,
    SrpBufFmt,
    SrpCmd,
    SrpCredReq,
    SrpCredRsp,
    SrpDataBuf,
    SrpDirectBuf,
    SrpEncodeError,
    SrpILogout,
    SrpImmBuf,
    SrpIndirectBuf,
    SrpIu,
    SrpLoginRej,
    SrpLoginRejReason,
    SrpLoginReq,
    SrpLoginReqFlag,
    SrpLoginRsp,
    SrpLoginRspFlag,
    SrpOpcode,
    SrpProtocolError,
    SrpRsp,
    SrpRspFlag,
    SrpTaskAttr,
    SrpTLogout,
    SrpTskMgmt,
    SrpTskMgmtFunc,
    decode_srp_iu,
    int_to_scsilun,
    scsilun_to_int,
)
from softrdma.ulp.srp import proto as srp_proto

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


# --- the login ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAPTURE_NAMES)
def test_login_request_in_rdma_cm_private_data(name: str) -> None:
    s = session(name)
    pd = s.req.private_data
    assert len(pd) == 92  # the REQ's private data: cma_hdr + srp_login_req_rdma
    hdr = CmaHdr.decode(pd)
    assert (hdr.src, hdr.dst) == (INITIATOR, TARGET)
    req = SrpLoginReq.decode_rdma(pd[CMA_HDR_SIZE:])
    assert req.encode_rdma() == pd[CMA_HDR_SIZE:]
    # The 64-byte IB CM form carries the same fields.
    assert SrpLoginReq.decode(req.encode()) == req
    assert decode_srp_iu(req.encode()) == req

    assert req.tag == 0  # srp_send_req
    assert req.req_buf_fmt == SrpBufFmt.DIRECT | SrpBufFmt.INDIRECT
    # Initiator port ID: initiator_ext (0), then the port GUID (the GID's
    # interface ID, from the MAC 52:54:00:77:00:02); target port ID:
    # id_ext, then ioc_guid, both given to add_target.
    assert req.initiator_port_id == bytes(8) + bytes.fromhex("505400fffe770002")
    assert req.target_port_id == bytes.fromhex("505400fffe770001") * 2
    cmd_sg_cnt = 12  # ib_srp's default cmd_sg_entries
    if name == "srp_imm.pcap":
        assert req.req_flags == SrpLoginReqFlag.IMMED_REQUESTED  # and MULTICHAN_SINGLE
        assert req.imm_data_offset == SRP_IMM_DATA_OFFSET == 68
        # srp_max_it_iu_len: room for 8 KiB of immediate data (max_imm_data).
        assert req.req_it_iu_len == SRP_IMM_DATA_OFFSET + 8192
    else:
        assert req.req_flags == 0  # use_imm_data=0
        assert req.imm_data_offset == 0
        # srp_max_it_iu_len: a command, a 16-byte additional CDB and an
        # indirect descriptor with cmd_sg_cnt entries.
        assert req.req_it_iu_len == 48 + 16 + 20 + 16 * cmd_sg_cnt == 276


@pytest.mark.parametrize("name", CAPTURE_NAMES)
def test_login_response_in_cm_rep_private_data(name: str) -> None:
    s = session(name)
    pd = s.rep.private_data
    req, rsp = login(name)
    # ib_srpt hands the 52-byte srp_login_rsp to rdma_accept; the CM pads the
    # REP's private data to 196 bytes with zeros.
    assert len(pd) == 196
    assert rsp.encode() == pd[: SrpLoginRsp.SIZE]
    assert pd[SrpLoginRsp.SIZE :] == bytes(196 - SrpLoginRsp.SIZE)
    assert decode_srp_iu(pd) == rsp
    assert rsp.tag == req.tag
    assert rsp.req_lim_delta == 128  # ch->rq_size (MAX_SRPT_RQ_SIZE)
    # srp_max_req_size's default (ib_srpt.h): 80-byte immediate offset + 4 + 8 KiB.
    assert rsp.max_it_iu_len == 8276
    assert rsp.max_ti_iu_len == req.req_it_iu_len  # echoed by srpt_cm_req_recv
    assert rsp.buf_fmt == SrpBufFmt.DIRECT | SrpBufFmt.INDIRECT
    expected = SrpLoginRspFlag.IMMED_SUPP if name == "srp_imm.pcap" else SrpLoginRspFlag(0)
    assert rsp.rsp_flags == expected  # no other channel: MULTICHAN_NO_CHAN


# --- every IU of the sessions ------------------------------------------------------------------


@pytest.mark.parametrize("name", CAPTURE_NAMES)
def test_every_send_is_an_iu_that_reencodes_exactly(name: str) -> None:
    offset = channel_imm_offset(name)
    kinds: Counter[tuple[IPv4Address, str]] = Counter()
    for m in session(name).messages:
        if m.kind != "send":
            continue
        iu = decode_srp_iu(m.data, offset)
        kinds[m.src, type(iu).__name__] += 1
        if isinstance(iu, SrpCmd):
            assert iu.encode(offset) == m.data, f"frame {m.frame}"
            # Without the offset, the data is taken to end the SEND: same result.
            assert decode_srp_iu(m.data) == iu
            assert SrpCmd.decode(m.data, offset) == iu
        else:
            assert iu.encode() == m.data, f"frame {m.frame}"
            assert type(iu).decode(m.data) == iu
    n = 51 if name == "srp_imm.pcap" else 27
    assert kinds == {(INITIATOR, "SrpCmd"): n, (TARGET, "SrpRsp"): n}


@pytest.mark.parametrize("name", CAPTURE_NAMES)
def test_commands_and_responses(name: str) -> None:
    exs = exchanges(name)
    opcodes = Counter(ex.cmd.cdb[0] for ex in exs)
    scan = {
        TEST_UNIT_READY: 2,
        INQUIRY: 4,
        REPORT_LUNS: 1,
        SERVICE_ACTION_IN_16: 2,
        MODE_SENSE_6: 6,
        MAINTENANCE_IN: 1,
    }
    if name == "srp_imm.pcap":
        # 3 partition-table reads of the scan, 16 × 4 KiB written and read back.
        assert opcodes == {**scan, READ_10: 3 + 16, WRITE_10: 16}
    else:
        # 64 KiB I/O splits in 48 + 16 KiB: 12 pages is the SG limit (cmd_sg_entries).
        assert opcodes == {**scan, READ_10: 3 + 4, WRITE_10: 4}
    for ex in exs:
        cmd, rsp = ex.cmd, ex.rsp
        assert rsp is not None
        assert rsp.tag == cmd.tag
        assert cmd.lun == 0 and cmd.sol_not == 0 and cmd.add_cdb == b""
        assert cmd.task_attr == SrpTaskAttr.SIMPLE
        assert cmd.data_out_desc_cnt is None and cmd.data_in_desc_cnt is None  # 0 on the wire
        assert rsp.req_lim_delta == 1 and rsp.sol_not == 0 and rsp.resp_data == b""
        assert rsp.raw_flags is None  # flags exactly as the fields imply
        if cmd.cdb[0] == SERVICE_ACTION_IN_16:
            assert cmd.cdb[1] & 0x1F == 0x10  # READ CAPACITY(16)
        if cmd.cdb[0] == MAINTENANCE_IN:
            # LIO does not implement REPORT SUPPORTED OPERATION CODES:
            # CHECK CONDITION, ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
            assert rsp.status == 2
            assert rsp.flags == SrpRspFlag.SNSVALID
            assert len(rsp.sense) == 96  # TRANSPORT_SENSE_BUFFERSIZE
            assert rsp.sense[0] == 0x70 and rsp.sense[2] & 0xF == 5 and rsp.sense[12] == 0x20
        else:
            assert rsp.status == 0 and rsp.sense == b""
        # Tags are blk_mq_unique_tag() in host (little-endian) order: small numbers.
        assert cmd.tag < 0x100
    # Residuals: REPORT LUNS of one LUN (16 of 4096 bytes) and INQUIRY of the
    # supported VPD pages list (a few of 36 bytes) underflow.
    residuals = {(ex.cmd.cdb[0], ex.rsp.data_in_res_cnt) for ex in exs if ex.rsp}
    assert (REPORT_LUNS, 4096 - 16) in residuals
    assert (INQUIRY, 32) in residuals
    assert all(r >= 0 for _, r in residuals)
    for ex in exs:
        assert ex.rsp is not None
        assert ex.rsp.data_out_res_cnt == 0
        assert bool(ex.rsp.flags & SrpRspFlag.DIUNDER) == (ex.rsp.data_in_res_cnt > 0)


@pytest.mark.parametrize("name", CAPTURE_NAMES)
def test_data_in_descriptors_match_the_targets_rdma_writes(name: str) -> None:
    """Each data-in command's direct descriptor is where the target then
    RDMA-WRITEs: the RETH's va and R_Key are the descriptor's, and LIO moves
    the whole buffer (even where the response reports an underflow)."""
    n = 0
    for ex in exchanges(name):
        cmd = ex.cmd
        if cmd.data_in is None:
            assert ex.writes == []
            continue
        assert cmd.data_out is None
        assert isinstance(cmd.data_in, SrpDirectBuf)  # one FR MR per command
        assert cmd.buf_fmt == 0x01
        desc = cmd.data_in
        if ex.rsp is not None and ex.rsp.status != 0:
            assert ex.writes == []
            continue
        assert len(ex.writes) == 1, f"frame {ex.cmd_msg.frame}"
        (w,) = ex.writes
        assert w.reth is not None
        assert (w.reth.va, w.reth.rkey, w.reth.dma_len) == (desc.va, desc.key, desc.len)
        assert len(w.data) == desc.len
        if cmd.cdb[0] in (READ_10, WRITE_10):
            assert desc.len == lba_and_blocks(cmd.cdb)[1] * SECTOR
        else:
            # The allocation length of the CDB is the buffer length.
            alloc = {INQUIRY: cmd.cdb[4] | cmd.cdb[3] << 8, MODE_SENSE_6: cmd.cdb[4]}
            alloc |= {REPORT_LUNS: int.from_bytes(cmd.cdb[6:10])}
            alloc |= {SERVICE_ACTION_IN_16: int.from_bytes(cmd.cdb[10:14])}
            assert desc.len == alloc[cmd.cdb[0]]
        # The address is a kernel virtual address: rxe is a virtual-DMA device.
        assert desc.va >> 47 == 0x1FFFF
        n += 1
    assert n == (32 if name == "srp_imm.pcap" else 20)


def test_immediate_data_commands() -> None:
    """srp_imm: every WRITE(10) carries its 4 KiB inside the SEND at offset 68
    (ib_srp's SRP_IMM_DATA_OFFSET); the imm buffer descriptor sits right
    after the CDB and the 16 bytes between it and the data are stale bytes
    of the reused IU buffer. The data is the pattern the reads return."""
    exs = exchanges("srp_imm.pcap")
    written: dict[int, bytes] = {}
    read_back: dict[int, bytes] = {}
    earlier_descs: list[bytes] = []
    for ex in exs:
        cmd, m = ex.cmd, ex.cmd_msg
        if isinstance(cmd.data_in, SrpDirectBuf):
            earlier_descs.append(cmd.data_in.encode())
        if cmd.cdb[0] == READ_10 and ex.writes:
            lba, blocks = lba_and_blocks(cmd.cdb)
            read_back[lba] = ex.writes[0].data
        if cmd.cdb[0] != WRITE_10:
            assert not isinstance(cmd.data_out, SrpImmBuf)
            continue
        lba, blocks = lba_and_blocks(cmd.cdb)
        assert blocks * SECTOR == 4096
        assert cmd.data_out == SrpImmBuf(4096)
        assert cmd.buf_fmt == 0x30 and cmd.data_in is None
        assert ex.writes == [] and ex.read_reqs == []  # nothing fetched by RDMA
        assert len(m.data) == SRP_IMM_DATA_OFFSET + 4096 == 4164
        assert len(m.frames) == 5  # SEND FIRST, 3 × MIDDLE, LAST at a 1024-byte path MTU
        assert m.data[48:52] == (4096).to_bytes(4)  # srp_imm_buf at add_data + add_cdb_len
        assert cmd.imm_data == m.data[SRP_IMM_DATA_OFFSET:]
        assert cmd.desc_end == 52
        # The gap 52..67: the last 12 bytes of a direct descriptor an earlier
        # command left in the same IU buffer, then 4 bytes never written.
        assert len(cmd.imm_gap) == 16
        assert cmd.imm_gap[12:] == bytes(4)
        assert any(d[4:] == cmd.imm_gap[:12] for d in earlier_descs)
        # decode → encode keeps the stale bytes; a fresh command has zeros there.
        assert replace(cmd, imm_gap=b"").encode()[52:68] == bytes(16)
        written[lba] = cmd.imm_data
    assert sorted(written) == list(range(0, 16 * 8, 8))
    assert len(set(written.values())) == 16  # a random pattern
    for lba, data in written.items():
        assert read_back[lba] == data, f"LBA {lba}"


def test_data_out_descriptors_match_the_targets_rdma_reads() -> None:
    """srp_rdma (no immediate data): each WRITE(10) has a direct data-out
    descriptor (an FR-registered MR); the target RDMA-READs exactly it, and
    what it reads is the pattern the later READ(10)s bring back."""
    exs = exchanges("srp_rdma.pcap")
    s = session("srp_rdma.pcap")
    responses = {m.psn: m for m in s.messages if m.kind == "read_resp"}
    written: dict[int, bytes] = {}
    read_back: dict[int, bytes] = {}
    for ex in exs:
        cmd = ex.cmd
        assert not isinstance(cmd.data_out, SrpImmBuf) and cmd.imm_data == b""
        lba = blocks = 0
        if cmd.cdb[0] in (READ_10, WRITE_10):
            lba, blocks = lba_and_blocks(cmd.cdb)
        if cmd.cdb[0] == READ_10 and blocks * SECTOR > 4096:
            read_back[lba] = ex.writes[0].data
        if cmd.cdb[0] != WRITE_10:
            continue
        assert cmd.buf_fmt == 0x10 and cmd.data_in is None
        assert isinstance(cmd.data_out, SrpDirectBuf)
        assert len(ex.cmd_msg.data) == 64
        desc = cmd.data_out
        assert desc.len == blocks * SECTOR
        assert len(ex.read_reqs) == 1 and ex.writes == []
        (rr,) = ex.read_reqs
        assert rr.reth is not None
        assert (rr.reth.va, rr.reth.rkey, rr.reth.dma_len) == (desc.va, desc.key, desc.len)
        data = responses[rr.psn].data
        assert len(data) == desc.len
        written[lba] = data
    # 64 KiB at LBA 0 and 128 in 48 + 16 KiB pieces.
    assert sorted((lba, len(d)) for lba, d in written.items()) == [
        (0, 49152),
        (96, 16384),
        (128, 49152),
        (224, 16384),
    ]
    for lba, data in written.items():
        assert read_back[lba] == data, f"LBA {lba}"


def test_no_indirect_descriptors_in_the_captures() -> None:
    """Both sessions use one fast-registered MR per command, so every
    descriptor is direct; indirect descriptors are covered by srp.h layouts
    and properties below."""
    for name in CAPTURE_NAMES:
        for ex in exchanges(name):
            assert not isinstance(ex.cmd.data_out, SrpIndirectBuf)
            assert not isinstance(ex.cmd.data_in, SrpIndirectBuf)


def test_target_zero_length_write_after_rtu() -> None:
    """ib_srpt's first RDMA operation is a zero-length RDMA WRITE with R_Key 0
    (srpt_zerolength_write after the RTU), before any SRP IU."""
    for name in CAPTURE_NAMES:
        first = session(name).messages[0]
        assert first.kind == "write" and first.src == TARGET
        assert first.reth == Reth(0, 0, 0) and first.data == b""


# --- tshark, an independent reader --------------------------------------------------------------


def tshark_rows(path: Path) -> dict[int, list[str]]:
    fields = [
        "frame.number",
        "infiniband.bth.opcode",
        "infiniband.reth.va",
        "infiniband.reth.r_key",
        "infiniband.reth.dmalen",
        "infiniband.cm.req.ip_cm.private",
        "infiniband.cm.rep.private",
        "data.data",
    ]
    args = ["tshark", "-r", str(path), "--disable-protocol", "rpcordma", "-T", "fields"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines() if line]
    return {int(r[0]): r[1:] for r in rows}


@pytest.mark.skipif(
    shutil.which("tshark") is None,
    reason="tshark is not installed (apt-get install -y tshark); it re-reads the captures",
)
@pytest.mark.parametrize("name", CAPTURE_NAMES)
def test_tshark_agrees(name: str) -> None:
    """tshark (4.0) has no dissector for the SCSI RDMA Protocol, but it
    extracts the RDMA CM private data, each SEND's payload and each RETH on
    its own: the login IUs, the SRP_CMD / SRP_RSP bytes at srp.h's offsets and
    the descriptors' RDMA operations must agree with our decoding."""
    rows = tshark_rows(CAPTURES / name)
    s = session(name)
    req, rsp = login(name)
    req_row = next(r for r in rows.values() if r[4])
    assert bytes.fromhex(req_row[4]) == req.encode_rdma()
    rep_row = next(r for r in rows.values() if r[5])
    assert bytes.fromhex(rep_row[5])[: SrpLoginRsp.SIZE] == rsp.encode()
    checked = 0
    for ex in exchanges(name):
        m = ex.cmd_msg
        if len(m.frames) == 1:
            raw = bytes.fromhex(rows[m.frame][6])
            assert raw == m.data
            # A handful of fields read straight from tshark's bytes.
            assert raw[0] == SrpOpcode.CMD
            assert int.from_bytes(raw[8:16], "little") == ex.cmd.tag
            assert raw[32:48] == ex.cmd.cdb
            assert raw[5] == ex.cmd.buf_fmt
            desc = ex.cmd.data_in or ex.cmd.data_out
            if isinstance(desc, SrpDirectBuf):
                va, key, length = struct.unpack_from(">QII", raw, 48)
                assert (va, key, length) == (desc.va, desc.key, desc.len)
            checked += 1
        for op in ex.writes + ex.read_reqs:
            opcode, va, rkey, dmalen = rows[op.frame][:4]
            desc = ex.cmd.data_in or ex.cmd.data_out
            assert isinstance(desc, SrpDirectBuf)
            assert (int(va, 16), int(rkey, 16), int(dmalen)) == (desc.va, desc.key, desc.len)
            expected = (
                {Opcode.RC_RDMA_WRITE_FIRST, Opcode.RC_RDMA_WRITE_ONLY}
                if op.kind == "write"
                else {Opcode.RC_RDMA_READ_REQUEST}
            )
            assert int(opcode) in expected
        assert ex.rsp is not None
    for m in s.sends(TARGET):
        raw = bytes.fromhex(rows[m.frame][6])
        assert raw == m.data
        iu = decode_srp_iu(raw)
        assert isinstance(iu, SrpRsp)
        assert raw[0] == SrpOpcode.RSP and raw[18] == iu.flags and raw[19] == iu.status
        assert int.from_bytes(raw[8:16], "little") == iu.tag
    assert checked == (51 - 16 if name == "srp_imm.pcap" else 27)  # all but the 4 KiB writes


# --- srp.h's layouts for what the captures lack -------------------------------------------------


def be(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def test_indirect_command_layout() -> None:
    """An SRP_CMD with a 4-byte additional CDB and an indirect data-out
    descriptor carrying 2 of a 3-entry table (ib_srp with allow_ext_sg), laid
    out by hand from srp.h's offsets."""
    table = SrpDirectBuf(0xFFFF888000001000, 0x1234, 48)
    d1 = SrpDirectBuf(0x10000, 0x55, 4096)
    d2 = SrpDirectBuf(0x20000, 0x56, 512)
    cmd = SrpCmd(
        tag=0x8000_0001,
        lun=0x0102,
        cdb=bytes.fromhex("2a00") + bytes(14),
        add_cdb=b"\xaa\xbb\xcc\xdd",
        task_attr=SrpTaskAttr.ORDERED,
        data_out=SrpIndirectBuf(table, 4096 + 512 + 1024, (d1, d2)),
    )
    expected = b"".join(
        [
            be(0x02, 1),  # opcode
            be(0, 1),  # sol_not
            bytes(3),
            be(0x20, 1),  # buf_fmt: data-out indirect
            be(2, 1),  # data_out_desc_cnt: the descriptors in the IU
            be(0, 1),  # data_in_desc_cnt
            le(0x8000_0001, 8),  # tag
            bytes(4),
            bytes.fromhex("0102000000000000"),  # int_to_scsilun(0x102)
            bytes(1),
            be(2, 1),  # task_attr ORDERED
            bytes(1),
            be(4, 1),  # add_cdb_len
            bytes.fromhex("2a00") + bytes(14),
            b"\xaa\xbb\xcc\xdd",  # additional CDB
            be(0xFFFF888000001000, 8) + be(0x1234, 4) + be(48, 4),  # table_desc
            be(4096 + 512 + 1024, 4),  # total length
            be(0x10000, 8) + be(0x55, 4) + be(4096, 4),
            be(0x20000, 8) + be(0x56, 4) + be(512, 4),
        ]
    )
    assert cmd.encode() == expected
    assert len(expected) == 48 + 4 + 20 + 32 == cmd.desc_end
    got = SrpCmd.decode(expected)
    assert got == cmd
    assert isinstance(got.data_out, SrpIndirectBuf)
    assert got.data_out.table_count == 3 and got.data_out.external
    assert got.buf_fmt == 0x20
    # A data-in indirect descriptor follows a data-out one (bidirectional).
    bidi = replace(cmd, data_in=SrpIndirectBuf(table, 10, (d1,)))
    raw = bidi.encode()
    assert raw[5] == 0x22 and raw[6:8] == b"\x02\x01"
    assert isinstance(bidi.data_in, SrpIndirectBuf)
    assert raw[-36:] == bidi.data_in.encode()
    assert SrpCmd.decode(raw) == bidi


def test_small_iu_layouts() -> None:
    tag = 0x1122334455667788
    assert SrpILogout(tag).encode() == b"\x03" + bytes(7) + le(tag, 8)
    assert SrpCredRsp(tag).encode() == b"\x41" + bytes(7) + le(tag, 8)
    assert SrpAerRsp(tag).encode() == b"\x42" + bytes(7) + le(tag, 8)
    assert SrpTLogout(tag, reason=3, sol_not=1).encode() == (
        b"\x80\x01" + bytes(2) + be(3, 4) + le(tag, 8)
    )
    assert SrpCredReq(tag, req_lim_delta=-2, sol_not=1).encode() == (
        b"\x81\x01" + bytes(2) + be(0xFFFFFFFE, 4) + le(tag, 8)
    )
    assert SrpTskMgmt(tag, lun=1, tsk_mgmt_func=SrpTskMgmtFunc.LUN_RESET, task_tag=7).encode() == (
        b"\x01\x00"
        + bytes(6)
        + le(tag, 8)
        + bytes(4)
        + bytes.fromhex("0001000000000000")
        + bytes(2)
        + b"\x08\x00"
        + le(7, 8)
        + bytes(8)
    )
    sense = bytes.fromhex("7000060000000000")
    assert SrpAerReq(tag, lun=2, sense=sense, req_lim_delta=1).encode() == (
        b"\x82\x00"
        + bytes(2)
        + be(1, 4)
        + le(tag, 8)
        + bytes(4)
        + bytes.fromhex("0002000000000000")
        + be(8, 4)
        + bytes(4)
        + sense
    )
    rej = SrpLoginRej(tag, SrpLoginRejReason.REQ_IT_IU_LENGTH_TOO_LARGE)
    assert rej.encode() == (
        b"\xc2" + bytes(3) + be(0x00010002, 4) + le(tag, 8) + bytes(8) + be(6, 2) + bytes(6)
    )
    rsp = SrpRsp(
        tag,
        req_lim_delta=1,
        status=2,
        data_out_res_cnt=-5,
        data_in_res_cnt=9,
        sense=b"S" * 3,
        resp_data=b"\0\0\0\x05",
    )
    flags = SrpRspFlag.RSPVALID | SrpRspFlag.SNSVALID | SrpRspFlag.DOOVER | SrpRspFlag.DIUNDER
    assert rsp.flags == flags
    assert rsp.encode() == (
        b"\xc1\x00"
        + bytes(2)
        + be(1, 4)
        + le(tag, 8)
        + bytes(2)
        + be(flags, 1)
        + b"\x02"
        + be(5, 4)
        + be(9, 4)
        + be(3, 4)
        + be(4, 4)
        + b"\0\0\0\x05SSS"
    )
    req = SrpLoginReq(
        tag,
        req_it_iu_len=0x114,
        req_flags=SrpLoginReqFlag.MULTICHAN_MULTI | SrpLoginReqFlag.IMMED_REQUESTED,
        imm_data_offset=68,
        initiator_port_id=bytes(range(16)),
        target_port_id=bytes(range(16, 32)),
    )
    assert req.encode() == (
        b"\x00"
        + bytes(7)
        + le(tag, 8)
        + be(0x114, 4)
        + bytes(4)
        + be(6, 2)
        + b"\x81\x00"
        + be(68, 2)
        + bytes(2)
        + bytes(range(32))
    )
    assert req.encode_rdma() == (
        le(tag, 8) + be(6, 2) + b"\x81\x00" + be(0x114, 4) + bytes(range(32)) + be(68, 2) + bytes(6)
    )
    lrsp = SrpLoginRsp(tag, 64, 0x2054, 0x114, 6, SrpLoginRspFlag.IMMED_SUPP)
    assert lrsp.encode() == (
        b"\xc0"
        + bytes(3)
        + be(64, 4)
        + le(tag, 8)
        + be(0x2054, 4)
        + be(0x114, 4)
        + be(6, 2)
        + b"\x80"
        + bytes(25)
    )
    for iu in (
        SrpILogout(tag),
        SrpCredRsp(tag),
        SrpAerRsp(tag),
        SrpTLogout(tag, 3, 1),
        SrpCredReq(tag, -2, 1),
        rej,
        rsp,
        req,
        lrsp,
    ):
        assert decode_srp_iu(iu.encode()) == iu
    assert SrpLoginReq.decode_rdma(req.encode_rdma()) == req


def test_scsilun() -> None:
    assert int_to_scsilun(0) == bytes(8)
    assert int_to_scsilun(5) == bytes.fromhex("0005000000000000")
    assert int_to_scsilun(0x4001) == bytes.fromhex("4001000000000000")  # flat addressing
    assert int_to_scsilun(0x1122334455667788) == bytes.fromhex("7788556633441122")
    assert scsilun_to_int(bytes.fromhex("7788556633441122")) == 0x1122334455667788


def test_public_names() -> None:
    assert set(srp_proto.__all__) <= set(srp.__all__)  # with the target and the initiator
    for name in srp_proto.__all__:
        assert getattr(srp, name) is getattr(srp_proto, name)
    assert [(o.name, o.value) for o in SrpOpcode] == [
        ("LOGIN_REQ", 0x00),
        ("TSK_MGMT", 0x01),
        ("CMD", 0x02),
        ("I_LOGOUT", 0x03),
        ("LOGIN_RSP", 0xC0),
        ("RSP", 0xC1),
        ("LOGIN_REJ", 0xC2),
        ("T_LOGOUT", 0x80),
        ("CRED_REQ", 0x81),
        ("AER_REQ", 0x82),
        ("CRED_RSP", 0x41),
        ("AER_RSP", 0x42),
    ]
    # srp.h's constants under their kernel names.
    kernel = {name: int(getattr(srp, name)) for name in srp.__all__ if name.startswith("SRP_")}
    assert kernel == {
        "SRP_BUF_FORMAT_DIRECT": 1 << 1,
        "SRP_BUF_FORMAT_INDIRECT": 1 << 2,
        "SRP_NO_DATA_DESC": 0,
        "SRP_DATA_DESC_DIRECT": 1,
        "SRP_DATA_DESC_INDIRECT": 2,
        "SRP_DATA_DESC_IMM": 3,
        "SRP_MULTICHAN_SINGLE": 0,
        "SRP_MULTICHAN_MULTI": 1,
        "SRP_IMMED_REQUESTED": 0x80,
        "SRP_LOGIN_RSP_MULTICHAN_NO_CHAN": 0,
        "SRP_LOGIN_RSP_MULTICHAN_TERMINATED": 1,
        "SRP_LOGIN_RSP_MULTICHAN_MAINTAINED": 2,
        "SRP_LOGIN_RSP_IMMED_SUPP": 0x80,
        "SRP_RSP_FLAG_RSPVALID": 1 << 0,
        "SRP_RSP_FLAG_SNSVALID": 1 << 1,
        "SRP_RSP_FLAG_DOOVER": 1 << 2,
        "SRP_RSP_FLAG_DOUNDER": 1 << 3,
        "SRP_RSP_FLAG_DIOVER": 1 << 4,
        "SRP_RSP_FLAG_DIUNDER": 1 << 5,
        "SRP_REV10_IB_IO_CLASS": 0xFF00,
        "SRP_REV16A_IB_IO_CLASS": 0x0100,
        "SRP_MAX_ADD_CDB_LEN": 16,
        "SRP_IMM_DATA_OFFSET": 68,
    }
    assert {r.name: int(r) for r in SrpLoginRejReason} == {
        "UNABLE_ESTABLISH_CHANNEL": 0x00010000,
        "INSUFFICIENT_RESOURCES": 0x00010001,
        "REQ_IT_IU_LENGTH_TOO_LARGE": 0x00010002,
        "UNABLE_ASSOCIATE_CHANNEL": 0x00010003,
        "UNSUPPORTED_DESCRIPTOR_FMT": 0x00010004,
        "MULTI_CHANNEL_UNSUPPORTED": 0x00010005,
        "CHANNEL_LIMIT_REACHED": 0x00010006,
    }
    assert {f.name: int(f) for f in SrpTskMgmtFunc} == {
        "ABORT_TASK": 0x01,
        "ABORT_TASK_SET": 0x02,
        "CLEAR_TASK_SET": 0x04,
        "LUN_RESET": 0x08,
        "CLEAR_ACA": 0x40,
    }
    assert {a.name: int(a) for a in SrpTaskAttr} == {
        "SIMPLE": 0,
        "HEAD_OF_QUEUE": 1,
        "ORDERED": 2,
        "ACA": 4,
    }
    assert issubclass(SrpProtocolError, ValueError) and issubclass(SrpEncodeError, ValueError)


# --- errors -------------------------------------------------------------------------------------


def test_protocol_errors() -> None:
    with pytest.raises(SrpProtocolError, match="unknown opcode 0x77"):
        decode_srp_iu(b"\x77" + bytes(63))
    with pytest.raises(SrpProtocolError, match="no bytes"):
        decode_srp_iu(b"")
    with pytest.raises(SrpProtocolError, match=r"SRP_RSP: 20 bytes received, 36 needed"):
        decode_srp_iu(b"\xc1" + bytes(19))
    with pytest.raises(SrpProtocolError, match="is not LOGIN_RSP"):
        SrpLoginRsp.decode(b"\xc1" + bytes(51))
    with pytest.raises(SrpProtocolError, match="byte 11"):
        SrpLoginReq.decode_rdma(bytes(11) + b"\x02" + bytes(44))
    base = bytearray(SrpCmd(data_in=SrpDirectBuf(1, 2, 3)).encode())
    bad = bytearray(base)
    bad[5] = 0x05
    with pytest.raises(SrpProtocolError, match="data-in descriptor: format 5"):
        SrpCmd.decode(bad)
    bad[5] = 0x03
    with pytest.raises(
        SrpProtocolError, match=r"not a valid data-in format \(0 none, 1 direct, 2 indirect\)"
    ):
        SrpCmd.decode(bad)
    bad[5] = 0x02  # indirect data-in, 0 descriptors: needs 20 bytes, has 16
    with pytest.raises(SrpProtocolError, match="indirect descriptor with 0 descriptors"):
        SrpCmd.decode(bad)
    bad = bytearray(SrpCmd(data_in=SrpIndirectBuf(SrpDirectBuf(1, 2, 32), 9)).encode())
    bad[7] = 2  # claims two descriptors the IU does not carry
    with pytest.raises(SrpProtocolError, match="2 descriptors"):
        SrpCmd.decode(bad)
    with pytest.raises(SrpProtocolError, match="for add_cdb_len 8"):
        SrpCmd.decode(bytes(base[:31]) + b"\x08" + bytes(base[32:48]))
    imm = SrpCmd(data_out=SrpImmBuf(8), imm_data=b"12345678").encode()
    with pytest.raises(SrpProtocolError, match="8 bytes of immediate data at 68"):
        SrpCmd.decode(imm[:-1], imm_data_offset=68)
    with pytest.raises(SrpProtocolError, match="overlaps the descriptors"):
        SrpCmd.decode(imm, imm_data_offset=50)
    with pytest.raises(SrpProtocolError, match="overlaps the descriptors"):
        SrpCmd.decode(imm[:56])  # inferred offset 48
    rsp = SrpRsp(sense=b"x" * 10).encode()
    with pytest.raises(SrpProtocolError, match="10 bytes of sense data"):
        SrpRsp.decode(rsp[:-1])


def test_encode_errors() -> None:
    with pytest.raises(SrpEncodeError, match=r"SrpCmd.tag=.*64 bits"):
        SrpCmd(tag=1 << 64).encode()
    with pytest.raises(SrpEncodeError, match="LUN"):
        SrpTskMgmt(lun=-1).encode()
    with pytest.raises(SrpEncodeError, match=r"SrpDirectBuf\.key"):
        SrpDirectBuf(0, 1 << 32, 0).encode()
    with pytest.raises(SrpEncodeError, match="cdb: 16 bytes"):
        SrpCmd(cdb=bytes(17)).encode()
    with pytest.raises(SrpEncodeError, match="at most 252"):
        SrpCmd(add_cdb=bytes(256)).encode()
    with pytest.raises(SrpEncodeError, match="only for data-out"):
        SrpCmd(data_in=SrpImmBuf(0)).encode()
    with pytest.raises(SrpEncodeError, match=r"srp_imm_buf\.len 4 but 3 bytes"):
        SrpCmd(data_out=SrpImmBuf(4), imm_data=b"abc").encode()
    with pytest.raises(SrpEncodeError, match="need an SrpImmBuf"):
        SrpCmd(imm_data=b"abc").encode()
    with pytest.raises(SrpEncodeError, match="overlap"):
        SrpCmd(data_out=SrpImmBuf(0), add_cdb=bytes(20)).encode()
    with pytest.raises(SrpEncodeError, match="imm_gap: 3 bytes"):
        SrpCmd(data_out=SrpImmBuf(0), imm_gap=b"abc").encode()
    ind = SrpIndirectBuf(SrpDirectBuf(0, 0, 16), 0, (SrpDirectBuf(0, 0, 0),))
    with pytest.raises(SrpEncodeError, match="needs that count"):
        SrpCmd(data_out=ind, data_out_desc_cnt=3).encode()
    with pytest.raises(SrpEncodeError, match="at most 255"):
        SrpIndirectBuf(SrpDirectBuf(0, 0, 0), 0, (SrpDirectBuf(0, 0, 0),) * 256).encode()
    with pytest.raises(SrpEncodeError, match="req_lim_delta"):
        SrpRsp(req_lim_delta=1 << 31).encode()
    with pytest.raises(SrpEncodeError, match="an overflow, but"):
        SrpRsp(data_in_res_cnt=-3, raw_flags=SrpRspFlag.DIUNDER).encode()
    with pytest.raises(SrpEncodeError, match="an underflow, but"):
        SrpRsp(data_out_res_cnt=3, raw_flags=SrpRspFlag.DOOVER).encode()
    with pytest.raises(SrpEncodeError, match="magnitude"):
        SrpRsp(data_out_res_cnt=1 << 32).encode()
    with pytest.raises(SrpEncodeError, match="initiator_port_id"):
        SrpLoginReq(initiator_port_id=bytes(8)).encode_rdma()
    with pytest.raises(SrpEncodeError, match="imm_data_offset"):
        SrpLoginReq(imm_data_offset=1 << 16).encode()


def test_normalised_fields() -> None:
    """Values that encode alike compare alike: a short CDB, an unaligned
    additional CDB, a zero gap, a count or flags equal to what is implied."""
    assert SrpCmd(cdb=b"\x12") == SrpCmd(cdb=b"\x12" + bytes(15))
    assert SrpCmd(add_cdb=b"ab").add_cdb == b"ab\0\0"
    imm = SrpCmd(data_out=SrpImmBuf(1), imm_data=b"x", imm_gap=bytes(16))
    assert imm.imm_gap == b""
    assert SrpCmd.decode(imm.encode()) == imm
    assert SrpCmd(data_in=SrpDirectBuf(0, 0, 0), data_in_desc_cnt=0).data_in_desc_cnt is None
    # Another initiator's count of 1 with a direct descriptor is kept.
    raw = bytearray(SrpCmd(data_in=SrpDirectBuf(1, 2, 3)).encode())
    raw[7] = 1
    got = SrpCmd.decode(raw)
    assert got.data_in_desc_cnt == 1 and got.encode() == raw
    assert SrpRsp(sense=b"s", raw_flags=SrpRspFlag.SNSVALID).raw_flags is None
    # Flags that disagree with the fields are kept as received.
    odd = bytearray(SrpRsp(data_in_res_cnt=4).encode())
    odd[18] |= SrpRspFlag.DIOVER  # both underflow and overflow
    got_rsp = SrpRsp.decode(odd)
    assert got_rsp.data_in_res_cnt == 4 and got_rsp.raw_flags == 0x30
    assert got_rsp.encode() == odd
    odd[18] = 0  # a residual without its flag
    got_rsp = SrpRsp.decode(odd)
    assert got_rsp.raw_flags == 0 and got_rsp.encode() == odd


# --- properties -------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
s32 = st.integers(-(1 << 31), (1 << 31) - 1)
small_bytes = st.binary(max_size=48)

direct_bufs = st.builds(SrpDirectBuf, u64, u32, u32)
indirect_bufs = st.builds(
    SrpIndirectBuf, direct_bufs, u32, st.lists(direct_bufs, max_size=5).map(tuple)
)


@st.composite
def commands(draw: st.DrawFn) -> tuple[SrpCmd, int | None]:
    """A command and the immediate-data offset to encode it with."""
    out_kind = draw(st.sampled_from(["none", "direct", "indirect", "imm"]))
    data_out: SrpDataBuf | None = None
    imm_data = b""
    if out_kind == "direct":
        data_out = draw(direct_bufs)
    elif out_kind == "indirect":
        data_out = draw(indirect_bufs)
    elif out_kind == "imm":
        imm_data = draw(st.binary(max_size=64))
        data_out = SrpImmBuf(len(imm_data))
    data_in = draw(st.one_of(st.none(), direct_bufs, indirect_bufs))
    cmd = SrpCmd(
        tag=draw(u64),
        lun=draw(u64),
        cdb=draw(st.binary(min_size=16, max_size=16)),
        add_cdb=draw(
            st.integers(0, 63).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))
        ),
        task_attr=draw(u8),
        sol_not=draw(u8),
        data_out=data_out,
        data_in=data_in,
        imm_data=imm_data,
        data_out_desc_cnt=None if out_kind == "indirect" else draw(st.none() | u8),
        data_in_desc_cnt=None if isinstance(data_in, SrpIndirectBuf) else draw(st.none() | u8),
    )
    if out_kind != "imm":
        return cmd, None
    gap = draw(st.integers(0, 24))
    if draw(st.booleans()):
        cmd = replace(cmd, imm_gap=draw(st.binary(min_size=gap, max_size=gap)))
    return cmd, cmd.desc_end + gap


@st.composite
def responses(draw: st.DrawFn) -> SrpRsp:
    raw = draw(st.none() | u8)
    counts = []
    for under, over in (
        (SrpRspFlag.DOUNDER, SrpRspFlag.DOOVER),
        (SrpRspFlag.DIUNDER, SrpRspFlag.DIOVER),
    ):
        magnitude = draw(u32)
        # The flags, when given, fix the sign (underflow read first, as ib_srp does).
        negative = draw(st.booleans()) if raw is None else not raw & under and bool(raw & over)
        counts.append(-magnitude if negative else magnitude)
    return SrpRsp(
        tag=draw(u64),
        req_lim_delta=draw(s32),
        status=draw(u8),
        data_out_res_cnt=counts[0],
        data_in_res_cnt=counts[1],
        sense=draw(small_bytes),
        resp_data=draw(small_bytes),
        sol_not=draw(u8),
        raw_flags=raw,
    )


port_ids = st.binary(min_size=16, max_size=16)
fixed_ius: st.SearchStrategy[SrpIu] = st.one_of(
    st.builds(SrpLoginReq, u64, u32, u16, u8, u16, port_ids, port_ids),
    st.builds(SrpLoginRsp, u64, s32, u32, u32, u16, u8),
    st.builds(SrpLoginRej, u64, u32, u16),
    st.builds(SrpILogout, u64),
    st.builds(SrpTLogout, u64, u32, u8),
    st.builds(SrpTskMgmt, u64, u64, u8, u64, u8),
    st.builds(SrpCredReq, u64, s32, u8),
    st.builds(SrpCredRsp, u64),
    st.builds(SrpAerReq, u64, u64, small_bytes, s32, u8),
    st.builds(SrpAerRsp, u64),
    responses(),
)


@settings(max_examples=300, deadline=None)
@given(fixed_ius, st.data())
def test_iu_round_trip_and_truncation(iu: SrpIu, data: st.DataObject) -> None:
    raw = iu.encode()
    assert type(iu).decode(raw) == iu
    assert decode_srp_iu(raw) == iu
    assert decode_srp_iu(raw).encode() == raw
    # Bytes after the IU (a larger receive buffer, padded private data) are ignored.
    assert decode_srp_iu(raw + b"\xff" * 7) == iu
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    with pytest.raises(SrpProtocolError):
        decode_srp_iu(raw[:cut])
    if isinstance(iu, SrpLoginReq):
        rdma = iu.encode_rdma()
        assert len(rdma) == 56 and SrpLoginReq.decode_rdma(rdma) == iu
        with pytest.raises(SrpProtocolError):
            SrpLoginReq.decode_rdma(rdma[: cut % 56])


@settings(max_examples=300, deadline=None)
@given(commands(), st.data())
def test_command_round_trip_and_truncation(
    case: tuple[SrpCmd, int | None], data: st.DataObject
) -> None:
    cmd, offset = case
    raw = cmd.encode(offset)
    assert SrpCmd.decode(raw, offset) == cmd
    assert decode_srp_iu(raw, offset) == cmd
    assert SrpCmd.decode(raw) == cmd  # immediate data, if any, ends the SEND
    assert SrpCmd.decode(raw, offset).encode(offset) == raw
    assert len(raw) == (cmd.desc_end if offset is None else offset + len(cmd.imm_data))
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    with pytest.raises(SrpProtocolError):
        SrpCmd.decode(raw[:cut], offset if offset is not None else SRP_IMM_DATA_OFFSET)


@given(u64)
def test_scsilun_round_trip(lun: int) -> None:
    assert scsilun_to_int(int_to_scsilun(lun)) == lun
    assert len(int_to_scsilun(lun)) == 8


@given(direct_bufs, indirect_bufs, u32)
def test_descriptor_round_trip(d: SrpDirectBuf, ind: SrpIndirectBuf, n: int) -> None:
    assert SrpDirectBuf.decode(d.encode()) == d
    assert SrpIndirectBuf.decode(ind.encode(), len(ind.desc_list)) == ind
    assert len(ind.encode()) == ind.size == 20 + 16 * len(ind.desc_list)
    assert SrpImmBuf.decode(SrpImmBuf(n).encode()) == SrpImmBuf(n)
