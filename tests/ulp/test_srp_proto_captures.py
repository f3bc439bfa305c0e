"""SRP information units against Linux's own SRP sessions in the captures:
the login, every IU of the sessions, and tshark as an independent reader.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections import Counter
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from softrdma.cm.cma_hdr import CMA_HDR_SIZE, CmaHdr
from softrdma.transport.headers import Reth
from softrdma.transport.opcodes import Opcode
from softrdma.ulp.srp import (
    SRP_IMM_DATA_OFFSET,
    SrpBufFmt,
    SrpCmd,
    SrpDirectBuf,
    SrpImmBuf,
    SrpIndirectBuf,
    SrpLoginReq,
    SrpLoginReqFlag,
    SrpLoginRsp,
    SrpLoginRspFlag,
    SrpOpcode,
    SrpRsp,
    SrpRspFlag,
    SrpTaskAttr,
    decode_srp_iu,
)
from tests.ulp._srp_proto_helpers import (
    CAPTURE_NAMES,
    CAPTURES,
    INITIATOR,
    INQUIRY,
    MAINTENANCE_IN,
    MODE_SENSE_6,
    READ_10,
    REPORT_LUNS,
    SECTOR,
    SERVICE_ACTION_IN_16,
    TARGET,
    TEST_UNIT_READY,
    WRITE_10,
    channel_imm_offset,
    exchanges,
    lba_and_blocks,
    login,
    session,
)

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
