"""iSER framing (softrdma.ulp.iser) against Linux's own iSER session, and
the iSER header, Hello and CM private data layouts.

``tests/data/captures/iser_login.pcap`` (see its SUMMARY.md) holds an
open-iscsi / ib_iser initiator (10.77.0.2) logging in to LIO's ib_isert
(10.77.0.1) over Soft-RoCE, a SCSI scan, a 4 KiB O_DIRECT read and write,
and the logout. Every SEND in it must decode into the iSER header and a
typed iSCSI PDU (login keys included) and re-encode to the same bytes; the
headers' STags and VAs must be where the target then RDMA-WRITEs, and the
responses' Send-with-Invalidate must name them; the CM REQ / REP private
data must be the iSER CM header.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softrdma.cm.cma_hdr import CMA_HDR_SIZE, CmaHdr
from softrdma.cm.messages import CmRep, CmReq, decode_cm_mad
from softrdma.fabric.pcap import read_pcap
from softrdma.transport.errors import NotRoceV2
from softrdma.transport.headers import Reth
from softrdma.transport.opcodes import Opcode
from softrdma.transport.roce import decode_roce_v2
from softrdma.ulp.iscsi import (
    IscsiLoginRequest,
    IscsiLoginResponse,
    IscsiLoginStage,
    IscsiLoginStatusClass,
    IscsiLogoutReason,
    IscsiLogoutRequest,
    IscsiLogoutResponse,
    IscsiNopOut,
    IscsiPdu,
    IscsiProtocolError,
    IscsiScsiCommand,
    IscsiScsiResponse,
    IscsiTaskAttr,
    decode_text,
    encode_text,
    linux_iser_initiator,
    lio_iser_target,
)
from softrdma.ulp.iser import (
    ISER_HDR_LEN,
    ISER_RSV,
    ISER_SEND_W_INV_NOT_SUP,
    ISER_WSV,
    ISER_ZBVA_NOT_SUP,
    IserCmFlag,
    IserCmHdr,
    IserEncodeError,
    IserFlag,
    IserHdr,
    IserHello,
    IserHelloReply,
    IserOpcode,
    IserProtocolError,
    decode_iser_send,
    encode_iser_send,
)

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "captures"
INITIATOR = IPv4Address("10.77.0.2")
TARGET = IPv4Address("10.77.0.1")
ISCSI_PORT = 3260

SEND_OPS = {
    Opcode.RC_SEND_FIRST,
    Opcode.RC_SEND_MIDDLE,
    Opcode.RC_SEND_LAST,
    Opcode.RC_SEND_ONLY,
    Opcode.RC_SEND_LAST_WITH_INVALIDATE,
    Opcode.RC_SEND_ONLY_WITH_INVALIDATE,
}
SEND_ENDS = SEND_OPS - {Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE}
WRITE_OPS = {
    Opcode.RC_RDMA_WRITE_FIRST,
    Opcode.RC_RDMA_WRITE_MIDDLE,
    Opcode.RC_RDMA_WRITE_LAST,
    Opcode.RC_RDMA_WRITE_ONLY,
}
WRITE_STARTS = {Opcode.RC_RDMA_WRITE_FIRST, Opcode.RC_RDMA_WRITE_ONLY}

# SCSI operation codes of the scan and the I/O.
TEST_UNIT_READY = 0x00
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
READ_10 = 0x28
WRITE_10 = 0x2A
SERVICE_ACTION_IN_16 = 0x9E
REPORT_LUNS = 0xA0
MAINTENANCE_IN = 0xA3


def capture(name: str) -> Path:
    return CAPTURES / name


@dataclass
class Send:
    """One SEND message put back together from its packets."""

    frame: int
    src: IPv4Address
    data: bytes
    inv_rkey: int | None = None  # the IETH of a SEND with Invalidate


@dataclass
class Write:
    """The start of one RDMA WRITE (its RETH)."""

    frame: int
    reth: Reth


@dataclass
class Session:
    req: CmReq
    rep: CmRep
    sends: list[Send] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)


@cache
def session() -> Session:
    """The CM REQ / REP and every SEND in order, multi-packet SENDs
    reassembled (consecutive PSNs; retransmitted PSNs dropped)."""
    cms: list[object] = []
    sends: list[Send] = []
    writes: list[Write] = []
    open_sends: dict[IPv4Address, Send] = {}
    next_psn: dict[IPv4Address, int] = {}
    seen: set[tuple[IPv4Address, int]] = set()
    for index, rec in enumerate(read_pcap(capture("iser_login.pcap"))):
        try:
            frame = decode_roce_v2(rec.data)
        except NotRoceV2:
            continue
        pkt, src = frame.packet, frame.src_ip
        assert isinstance(src, IPv4Address)
        if pkt.opcode == Opcode.UD_SEND_ONLY:
            cms.append(decode_cm_mad(bytes(pkt.payload))[1])
            continue
        if pkt.opcode not in SEND_OPS | WRITE_OPS:
            continue
        if (src, pkt.psn) in seen:
            continue
        seen.add((src, pkt.psn))
        if pkt.opcode in WRITE_OPS:
            if pkt.opcode in WRITE_STARTS:
                assert pkt.reth is not None
                writes.append(Write(index + 1, pkt.reth))
            continue
        if src in open_sends:
            assert pkt.psn == next_psn[src], f"frame {index + 1}: PSN gap"
            msg = open_sends[src]
            msg.data += bytes(pkt.payload)
        else:
            msg = Send(index + 1, src, bytes(pkt.payload))
            open_sends[src] = msg
        next_psn[src] = (pkt.psn + 1) & 0xFFFFFF
        if pkt.opcode in SEND_ENDS:
            if pkt.ieth is not None:
                msg.inv_rkey = pkt.ieth.inv_rkey
            sends.append(open_sends.pop(src))
    assert not open_sends
    req = next(m for m in cms if isinstance(m, CmReq))
    rep = next(m for m in cms if isinstance(m, CmRep))
    return Session(req, rep, sends, writes)


@cache
def pdus() -> list[tuple[Send, IserHdr, IscsiPdu]]:
    return [(s, *decode_iser_send(s.data)) for s in session().sends]


# --- connection setup: the iSER CM header ------------------------------------------------


def test_cm_req_private_data_is_cma_hdr_then_iser_cm_hdr() -> None:
    s = session()
    assert s.req.service_id == 0x0000000001060000 | ISCSI_PORT  # RDMA_PS_TCP, port 3260
    pd = s.req.private_data
    assert len(pd) == 92
    hdr = CmaHdr.decode(pd)
    assert (hdr.src, hdr.dst) == (INITIATOR, TARGET)
    iser = IserCmHdr.decode(pd[CMA_HDR_SIZE:])
    assert iser == IserCmHdr(IserCmFlag.ZBVA_NOT_SUP)
    assert not iser.flags & IserCmFlag.SEND_W_INV_NOT_SUP  # Send with Invalidate is fine
    assert iser.encode() == pd[CMA_HDR_SIZE : CMA_HDR_SIZE + IserCmHdr.SIZE] == b"\x80\0\0\0"
    assert pd[CMA_HDR_SIZE + IserCmHdr.SIZE :] == bytes(92 - CMA_HDR_SIZE - 4)


def test_cm_rep_private_data_is_iser_cm_hdr() -> None:
    pd = session().rep.private_data
    assert len(pd) == 196
    assert IserCmHdr.decode(pd).encode() == pd[:4] == b"\x80\0\0\0"
    assert pd[4:] == bytes(192)


# --- every SEND ---------------------------------------------------------------------------


def test_every_send_decodes_and_reencodes_exactly() -> None:
    kinds: Counter[tuple[IPv4Address, str]] = Counter()
    for send, hdr, pdu in pdus():
        assert encode_iser_send(hdr, pdu) == send.data, f"frame {send.frame}"
        assert hdr.encode() == send.data[:ISER_HDR_LEN]
        assert pdu.encode() == send.data[ISER_HDR_LEN:]
        assert type(pdu).decode(send.data[ISER_HDR_LEN:]) == pdu
        assert len(send.data) % 4 == 0  # the data segment is padded
        kinds[send.src, type(pdu).__name__] += 1
    assert kinds == {
        (INITIATOR, "IscsiLoginRequest"): 1,
        (TARGET, "IscsiLoginResponse"): 1,
        (INITIATOR, "IscsiScsiCommand"): 21,
        (TARGET, "IscsiScsiResponse"): 21,
        (INITIATOR, "IscsiLogoutRequest"): 1,
        (TARGET, "IscsiLogoutResponse"): 1,
    }
    # Only the initiator's headers ever carry STags; no Hello on the wire.
    assert all(h.flags == 0 and h == IserHdr() for s, h, _ in pdus() if s.src == TARGET)
    assert all(s.data[0] & 0xF0 == IserOpcode.ISCSI_CTRL for s in session().sends)


def test_login_request() -> None:
    send, hdr, req = pdus()[0]
    assert hdr == IserHdr()
    assert isinstance(req, IscsiLoginRequest)
    # Operational stage only (no authentication), straight to full feature.
    assert req.immediate and req.transit and not req.cont
    assert (req.csg, req.nsg) == (
        IscsiLoginStage.OP_PARMS_NEGOTIATION,
        IscsiLoginStage.FULL_FEATURE_PHASE,
    )
    assert (req.max_version, req.min_version) == (0, 0)
    assert req.isid == 0x00023D000001  # open-iscsi's default ISID
    assert (req.tsih, req.itt, req.cid, req.cmdsn, req.exp_statsn) == (0, 0, 0, 0, 0)
    assert len(req.data) == 455 and len(send.data) == ISER_HDR_LEN + 48 + 456
    assert decode_text(req.data) == [
        ("InitiatorName", "iqn.2026-11.org.peer:init1"),
        ("InitiatorAlias", "(none)"),
        ("TargetName", "iqn.2026-11.org.peer:disk0"),
        ("SessionType", "Normal"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("InitiatorRecvDataSegmentLength", "262144"),
        ("TargetRecvDataSegmentLength", "8192"),
        ("RDMAExtensions", "Yes"),
    ]


def test_login_response() -> None:
    req = pdus()[0][2]
    _, hdr, rsp = pdus()[1]
    assert isinstance(req, IscsiLoginRequest) and isinstance(rsp, IscsiLoginResponse)
    assert hdr == IserHdr()
    assert not rsp.immediate and rsp.transit and not rsp.cont
    assert (rsp.csg, rsp.nsg) == (req.csg, req.nsg)
    assert (rsp.status_class, rsp.status_detail) == (IscsiLoginStatusClass.SUCCESS, 0)
    assert (rsp.max_version, rsp.active_version) == (0, 0)
    assert rsp.isid == req.isid and rsp.itt == req.itt
    assert rsp.tsih == 1  # LIO's first session
    # LIO leaves ExpCmdSN / MaxCmdSN zero here; the first command still
    # uses CmdSN 0 and the first SCSI Response opens the window.
    assert (rsp.exp_cmdsn, rsp.max_cmdsn) == (0, 0)
    assert len(rsp.data) == 336
    assert dict(decode_text(rsp.data)) == {
        "MaxConnections": "1",
        "TargetAlias": "LIO Target",
        "TargetPortalGroupTag": "1",
        "InitialR2T": "Yes",
        "ImmediateData": "Yes",
        "MaxBurstLength": "262144",
        "FirstBurstLength": "65536",
        "DefaultTime2Wait": "2",
        "DefaultTime2Retain": "0",
        "MaxOutstandingR2T": "1",
        "ErrorRecoveryLevel": "0",
        "IFMarker": "No",
        "OFMarker": "No",
        "RDMAExtensions": "Yes",
        "InitiatorRecvDataSegmentLength": "262144",
        "TargetRecvDataSegmentLength": "8192",
    }


def test_negotiation_engine_reproduces_both_sides_byte_for_byte() -> None:
    """open-iscsi's offer from its defaults, and LIO's answer to it from
    LIO's defaults, are the captured data segments exactly."""
    req = pdus()[0][2]
    rsp = pdus()[1][2]
    initiator = linux_iser_initiator("iqn.2026-11.org.peer:init1", "iqn.2026-11.org.peer:disk0")
    offer = initiator.step()
    target = lio_iser_target()
    answer = target.step(decode_text(req.data))
    assert encode_text(offer) == req.data
    assert encode_text(answer) == rsp.data
    assert initiator.step(answer) == []  # nothing left to answer
    mine, theirs = initiator.finish(), target.finish()
    for n in (mine, theirs):
        assert n.rdma_extensions and n.immediate_data and n.initial_r2t
        assert (n.max_burst_length, n.first_burst_length) == (262144, 65536)
        assert n.initiator_recv_data_segment_length == 262144
        assert n.target_recv_data_segment_length == 8192
        assert (n.max_connections, n.error_recovery_level) == (1, 0)
    assert mine.values["TargetAlias"] == "LIO Target"
    assert theirs.values["InitiatorName"] == "iqn.2026-11.org.peer:init1"


def _exchanges() -> list[tuple[Send, IserHdr, IscsiScsiCommand, Send, IscsiScsiResponse]]:
    """Each SCSI command with its response, matched by ITT."""
    pending: dict[int, tuple[Send, IserHdr, IscsiScsiCommand]] = {}
    out = []
    for send, hdr, pdu in pdus():
        if isinstance(pdu, IscsiScsiCommand):
            assert pdu.itt not in pending
            pending[pdu.itt] = (send, hdr, pdu)
        elif isinstance(pdu, IscsiScsiResponse):
            cmd_send, cmd_hdr, cmd = pending.pop(pdu.itt)
            out.append((cmd_send, cmd_hdr, cmd, send, pdu))
    assert not pending
    return out


def test_scsi_commands_and_responses() -> None:
    exs = _exchanges()
    assert Counter(cmd.cdb[0] for _, _, cmd, _, _ in exs) == {
        INQUIRY: 4,
        TEST_UNIT_READY: 2,
        REPORT_LUNS: 1,
        SERVICE_ACTION_IN_16: 2,
        MODE_SENSE_6: 6,
        MAINTENANCE_IN: 1,
        READ_10: 4,
        WRITE_10: 1,
    }
    assert sorted(cmd.cmdsn for _, _, cmd, _, _ in exs) == list(range(21))  # one CmdSN each
    for _, hdr, cmd, rsp_send, rsp in exs:
        assert not cmd.immediate and cmd.final and cmd.attr == IscsiTaskAttr.SIMPLE
        assert cmd.lun == 0 and cmd.ahs == ()
        # libiscsi's ITT is its task index in host (little-endian) order.
        assert 0 < int.from_bytes(cmd.itt.to_bytes(4, "big"), "little") < 0x100
        assert rsp.exp_cmdsn == cmd.cmdsn + 1 and rsp.max_cmdsn == cmd.cmdsn + 64
        assert rsp.statsn >= cmd.exp_statsn  # (two commands overlap once)
        if cmd.read:
            # RSV with the buffer the target RDMA-WRITEs; the response
            # invalidates that rkey for the initiator.
            assert hdr.flags == IserFlag.RSV and (hdr.write_stag, hdr.write_va) == (0, 0)
            assert rsp_send.inv_rkey == hdr.read_stag
        else:
            assert hdr == IserHdr() and rsp_send.inv_rkey is None
        if cmd.cdb[0] == MAINTENANCE_IN:
            # CHECK CONDITION, ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE
            # in LIO's 96-byte sense buffer after the 2-byte SenseLength.
            assert rsp.status == 2 and len(rsp.sense) == 96 and rsp.response_data == b""
            assert rsp.sense[0] == 0x70 and rsp.sense[2] & 0xF == 5 and rsp.sense[12] == 0x20
            assert len(rsp_send.data) == ISER_HDR_LEN + 48 + 100
        else:
            assert rsp.status == 0 and rsp.sense == b""
        assert rsp.underflow == (rsp.residual_count > 0)
    residuals = {(c.cdb[0], r.residual_count) for _, _, c, _, r in exs if r.underflow}
    assert residuals == {(REPORT_LUNS, 4096 - 16), (INQUIRY, 32)}


def test_read_stags_are_where_the_target_rdma_writes() -> None:
    """Each successful read command's iSER read STag / VA is the RETH of the
    RDMA WRITE that follows, whose length is the expected data transfer
    length (LIO moves the whole buffer even when it reports a residual)."""
    writes = {w.reth.rkey: w for w in session().writes}
    reads = [(h, c, r) for _, h, c, _, r in _exchanges() if c.read]
    assert len(reads) == 18 and len(writes) == 17
    for hdr, cmd, rsp in reads:
        if rsp.status != 0:  # the rejected MAINTENANCE IN moved no data
            assert hdr.read_stag not in writes
            continue
        w = writes[hdr.read_stag]
        assert w.reth.va == hdr.read_va
        assert w.reth.dma_len == cmd.data_length


def test_the_write_travels_as_immediate_data() -> None:
    (cmd_send, hdr, cmd, _, rsp), *_ = [e for e in _exchanges() if e[2].write]
    assert hdr == IserHdr()  # no WSV: nothing left for the target to RDMA READ
    assert not hdr.flags & IserFlag.WSV
    assert cmd.data_length == len(cmd.data) == 4096
    assert len(cmd_send.data) == ISER_HDR_LEN + 48 + 4096
    assert cmd.data[:16] == b"iser-000iser-001"
    lba = int.from_bytes(cmd.cdb[2:6], "big")
    assert lba == 2048 and rsp.status == 0


def test_logout() -> None:
    (_, _, req), (_, _, rsp) = pdus()[-2:]
    assert isinstance(req, IscsiLogoutRequest) and isinstance(rsp, IscsiLogoutResponse)
    assert req.immediate and req.reason == IscsiLogoutReason.CLOSE_SESSION and req.cid == 0
    assert rsp.itt == req.itt and rsp.response == 0
    assert (rsp.t2wait, rsp.t2retain) == (0, 0)
    assert rsp.exp_cmdsn == req.cmdsn  # an immediate command does not advance CmdSN


# --- an independent decoder: Wireshark's iSER and iSCSI dissectors ---------------------

TSHARK_FIELDS = [
    "frame.number", "iser.flags", "iser.write_stag", "iser.write_base_offset", "iser.read_stag",
    "iser.read_base_offset", "iscsi.opcode", "iscsi.initiatortasktag", "iscsi.cmdsn",
    "iscsi.expstatsn", "iscsi.statsn", "iscsi.keyvalue",
]  # fmt: skip


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_fields_agree_with_wireshark() -> None:
    cmd = ["tshark", "-r", str(capture("iser_login.pcap")), "--disable-protocol", "rpcordma"]
    cmd += ["-Y", "iser", "-T", "fields", "-E", "aggregator=|", "-E", "occurrence=a"]
    for f in TSHARK_FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout
    rows = {int(r.split("\t")[0]): r.split("\t") for r in out.splitlines() if r}
    assert len(rows) == len(pdus())
    for send, hdr, pdu in pdus():
        row = dict(zip(TSHARK_FIELDS, rows[send.frame], strict=True))
        assert int(row["iser.flags"], 16) == 0x10 | hdr.flags
        assert int(row["iser.write_stag"], 16) == hdr.write_stag
        assert int(row["iser.write_base_offset"], 16) == hdr.write_va
        assert int(row["iser.read_stag"], 16) == hdr.read_stag
        assert int(row["iser.read_base_offset"], 16) == hdr.read_va
        assert int(row["iscsi.opcode"], 16) == pdu.opcode
        assert int(row["iscsi.initiatortasktag"], 16) == getattr(pdu, "itt")  # noqa: B009
        for name in ("cmdsn", "exp_statsn", "statsn"):
            field_ = "iscsi." + name.replace("_", "")
            if row[field_]:
                assert int(row[field_]) == getattr(pdu, name), (send.frame, name)
        if isinstance(pdu, IscsiLoginRequest | IscsiLoginResponse):
            assert row["iscsi.keyvalue"].split("|") == [
                f"{k}={v}" for k, v in decode_text(pdu.data)
            ]


# --- layouts and errors ----------------------------------------------------------------


def test_iser_header_layout() -> None:
    hdr = IserHdr(IserFlag.WSV | IserFlag.RSV, 0x11223344, 0x0102030405060708, 0xAABBCCDD, 9)
    raw = hdr.encode()
    assert raw == (
        bytes([0x10 | ISER_WSV | ISER_RSV, 0, 0, 0])
        + bytes.fromhex("11223344 0102030405060708 aabbccdd 0000000000000009")
    )
    assert IserHdr.decode(raw + b"tail") == hdr
    assert int(IserOpcode.ISCSI_CTRL) == 0x10 and (ISER_RSV, ISER_WSV) == (0x04, 0x08)
    assert (ISER_ZBVA_NOT_SUP, ISER_SEND_W_INV_NOT_SUP) == (0x80, 0x40)


def test_hello_and_hello_reply() -> None:
    hello = IserHello(max_ver=1, min_ver=1, ird=16)
    raw = hello.encode()
    assert len(raw) == ISER_HDR_LEN and raw[:4] == b"\x20\x11\x00\x10"
    assert IserHello.decode(raw) == hello
    reply = IserHelloReply(rej=True, max_ver=1, cur_ver=1, ord=4)
    raw = reply.encode()
    assert raw[:4] == b"\x31\x11\x00\x04"
    assert IserHelloReply.decode(raw) == reply
    with pytest.raises(IserProtocolError):
        IserHdr.decode(raw)  # a HelloReply is no iSCSI control header
    with pytest.raises(IserProtocolError):
        IserHello.decode(IserHdr().encode())


@pytest.mark.parametrize(
    "bad",
    [
        IserHdr(write_stag=1 << 32),
        IserHdr(read_va=-1),
        IserHdr(IserFlag(0x10)),
    ],
)
def test_header_fields_out_of_range(bad: IserHdr) -> None:
    with pytest.raises(IserEncodeError):
        bad.encode()


def test_truncated_or_foreign_bytes() -> None:
    with pytest.raises(IserProtocolError):
        IserHdr.decode(bytes(27))
    with pytest.raises(IserProtocolError):
        IserCmHdr.decode(b"\x80\0\0")
    with pytest.raises(IserProtocolError):
        IserHdr.decode(b"\x13" + bytes(27))  # reserved low bits
    with pytest.raises(IscsiProtocolError):
        decode_iser_send(IserHdr().encode() + bytes(20))  # a BHS cut short


@given(
    flags=st.sampled_from([IserFlag(0), IserFlag.WSV, IserFlag.RSV, IserFlag.WSV | IserFlag.RSV]),
    wstag=st.integers(0, 2**32 - 1),
    wva=st.integers(0, 2**64 - 1),
    rstag=st.integers(0, 2**32 - 1),
    rva=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=64),
)
def test_send_round_trip(
    flags: IserFlag, wstag: int, wva: int, rstag: int, rva: int, data: bytes
) -> None:
    hdr = IserHdr(flags, wstag, wva, rstag, rva)
    pdu = IscsiNopOut(itt=7, data=data)
    raw = encode_iser_send(hdr, pdu)
    assert len(raw) == ISER_HDR_LEN + 48 + len(data) + (-len(data) % 4)
    assert decode_iser_send(raw) == (hdr, pdu)


@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_never_crashes(raw: bytes) -> None:
    try:
        hdr, pdu = decode_iser_send(raw)
    except (IserProtocolError, IscsiProtocolError):
        return
    assert decode_iser_send(encode_iser_send(hdr, pdu)) == (hdr, pdu)
