"""IB CM messages against the Linux CM MADs of tests/data/cm_mads.json:
byte-exact round trips and field values checked against the captures' RC
traffic.
"""

from __future__ import annotations

from functools import cache
from ipaddress import IPv4Address, IPv6Address

import pytest

from softrdma.cm.cma_hdr import (
    CMA_HDR_SIZE,
    CmaHdr,
    RdmaPortSpace,
    service_id_port_space,
)
from softrdma.cm.messages import (
    CmAttrId,
    CmDrep,
    CmDreq,
    CmRep,
    CmReq,
    CmRtu,
    decode_cm_mad,
    encode_cm_mad,
)
from softrdma.fabric.pcap import read_pcap
from softrdma.mad.header import (
    MAD_HDR_SIZE,
    MAD_SIZE,
    MadHdr,
)
from softrdma.transport.opcodes import Opcode
from softrdma.transport.roce import decode_roce_v2, rdma_get_udp_sport
from tests.cm._messages_helpers import (
    ACTIVE,
    CAPTURES,
    EXPECTED,
    PASSIVE,
    RC_QPN,
    RECORDS,
    Record,
    first,
    session,
)


def test_records_are_the_summarys_cm_exchanges() -> None:
    assert len(RECORDS) == 17
    for capture, names in EXPECTED.items():
        assert [
            CmAttrId(MadHdr.decode(r.mad).attr_id).name for r in RECORDS if r.capture == capture
        ] == names
    assert all(len(r.mad) == MAD_SIZE for r in RECORDS)


@pytest.mark.parametrize("capture", ["rping.pcap", "srp_imm.pcap", "srp_rdma.pcap"])
def test_records_match_the_captures_kept_in_the_project(capture: str) -> None:
    """cm_mads.json holds exactly the QP1 payloads of those frames."""
    frames = list(read_pcap(CAPTURES / capture))
    for r in (r for r in RECORDS if r.capture == capture):
        frame = decode_roce_v2(frames[r.frame].data)
        assert frame.packet.bth.dest_qp == 1
        assert (frame.src_ip, frame.dst_ip) == (r.src, r.dst)
        assert bytes(frame.packet.payload) == r.mad


# --------------------------------------------------------------------------
# Byte-exact round trips of the Linux MADs


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: r.id)
def test_linux_mad_round_trips(rec: Record) -> None:
    hdr, msg = decode_cm_mad(rec.mad)
    assert hdr.attr_id == type(msg).ATTR_ID
    assert encode_cm_mad(hdr, msg) == rec.mad
    data = rec.mad[MAD_HDR_SIZE:]
    again = type(msg).decode(data)
    assert again == msg
    assert again.encode() == data
    # Linux leaves every reserved bit clear and sends no ECE vendor ID.
    assert msg.reserved == 0
    assert getattr(msg, "vendor_id", 0) == 0
    assert (hdr.base_version, hdr.mgmt_class, hdr.class_version, hdr.method) == (1, 7, 2, 3)
    assert (hdr.status, hdr.attr_mod, hdr.resv) == (0, 0, 0)


def _swap32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "big"), "little")


@pytest.mark.parametrize("capture", list(EXPECTED))
def test_comm_ids_and_tids_tie_the_exchange_together(capture: str) -> None:
    """REP answers the REQ's comm ID, later messages carry the pair in the
    sender's order. TIDs: cm.c builds them as (agent hi_tid << 32) | the
    requester's local comm ID in host order, so on x86 the low 32 bits are
    the comm ID byte-swapped; REP and RTU reuse the REQ's TID, a DREP its
    DREQ's."""
    msgs = session(capture)
    (rreq, hreq, req), (rrep, hrep, rep) = msgs[0], msgs[1]
    assert isinstance(req, CmReq) and isinstance(rep, CmRep)
    assert (rreq.src, rrep.src) == (ACTIVE, PASSIVE)
    assert rep.remote_comm_id == req.local_comm_id
    assert rep.local_comm_id != req.local_comm_id
    assert hreq.tid >> 32 == 2
    assert hreq.tid & 0xFFFF_FFFF == _swap32(req.local_comm_id)
    assert hrep.tid == hreq.tid
    ids = {
        ACTIVE: (req.local_comm_id, rep.local_comm_id),
        PASSIVE: (rep.local_comm_id, req.local_comm_id),
    }
    last_dreq_tid: dict[IPv4Address, int] = {}
    for rec, hdr, msg in msgs[2:]:
        assert isinstance(msg, CmRtu | CmDreq | CmDrep)
        assert (msg.local_comm_id, msg.remote_comm_id) == ids[rec.src]
        if isinstance(msg, CmRtu):
            assert hdr.tid == hreq.tid
        elif isinstance(msg, CmDreq):
            assert msg.remote_qpn == RC_QPN
            assert hdr.tid & 0xFFFF_FFFF == _swap32(msg.local_comm_id)
            last_dreq_tid[rec.src] = hdr.tid
        else:
            assert hdr.tid == last_dreq_tid[rec.dst]


# --------------------------------------------------------------------------
# Field values, checked against the captures' RC traffic


@cache
def rc_traffic(capture: str) -> tuple[dict[IPv4Address, int], set[int], set[int]]:
    """From the RC packets of a capture: the first PSN each host sent a
    *request* with (SEND / WRITE / READ request / atomic, not ACKs or read
    responses, which carry the requester's PSN), the QPNs and UDP source
    ports used."""
    responses = {
        Opcode.RC_ACKNOWLEDGE,
        Opcode.RC_ATOMIC_ACKNOWLEDGE,
        Opcode.RC_RDMA_READ_RESPONSE_FIRST,
        Opcode.RC_RDMA_READ_RESPONSE_MIDDLE,
        Opcode.RC_RDMA_READ_RESPONSE_LAST,
        Opcode.RC_RDMA_READ_RESPONSE_ONLY,
    }
    first_psn: dict[IPv4Address, int] = {}
    qpns: set[int] = set()
    sports: set[int] = set()
    for rec in read_pcap(CAPTURES / capture):
        try:
            frame = decode_roce_v2(rec.data, verify_icrc=False)
        except ValueError:
            continue  # the tools' TCP traffic, ARP
        bth = frame.packet.bth
        if bth.dest_qp == 1 or bth.opcode >= 0x20:
            continue
        qpns.add(bth.dest_qp)
        sports.add(frame.sport)
        src = frame.src_ip
        assert isinstance(src, IPv4Address)
        if bth.opcode not in responses:
            first_psn.setdefault(src, bth.psn)
    return first_psn, qpns, sports


def test_rping_req_fields() -> None:
    req = first("rping.pcap", CmReq)
    assert isinstance(req, CmReq)
    assert req.service_id == 0x0000000001061C06
    assert service_id_port_space(req.service_id) == (RdmaPortSpace.TCP, 7174)
    cma = CmaHdr.decode(req.private_data)
    assert (cma.src, cma.dst, cma.version, cma.ip_version) == (ACTIVE, PASSIVE, 0, 4)
    assert cma.src_port == 0xD400  # the active side's RDMA CM source port
    assert req.private_data[CMA_HDR_SIZE:] == bytes(92 - CMA_HDR_SIZE)  # rping sends none
    assert req.local_qpn == RC_QPN
    assert (req.path_mtu, req.retry_count, req.rnr_retry_count) == (3, 7, 7)
    assert (req.transport_service_type, req.max_cm_retries) == (0, 15)  # RC, CMA_MAX_CM_RETRIES
    assert (req.remote_cm_response_timeout, req.local_cm_response_timeout) == (20, 20)
    assert (req.responder_resources, req.initiator_depth) == (1, 1)
    assert req.partition_key == 0xFFFF
    assert req.local_ca_guid == 0x505400FFFE770002
    assert req.primary_local_gid == IPv6Address(f"::ffff:{ACTIVE}").packed
    assert req.primary_remote_gid == IPv6Address(f"::ffff:{PASSIVE}").packed
    assert (req.primary_local_lid, req.primary_remote_lid) == (0xFFFF, 0xFFFF)
    assert (req.primary_hop_limit, req.primary_local_ack_timeout) == (64, 19)
    assert req.primary_flow_label == 0x9C806
    assert not req.end_to_end_flow_control and not req.srq and not req.rdc_exists
    assert req.alternate_local_gid == bytes(16) and req.alternate_local_lid == 0


@pytest.mark.parametrize("capture", ["rping.pcap", "srp_imm.pcap", "srp_rdma.pcap"])
def test_req_and_rep_match_the_rc_traffic(capture: str) -> None:
    """The QPNs and starting PSNs of REQ and REP are those of the RC
    connection that follows, and the REQ's flow label picks the UDP source
    port both sides use (``rdma_get_udp_sport``).

    Note the direction of the PSNs: Linux treats the REQ's starting PSN as
    the PSN the *active* side expects to receive (cm.c ``ib_send_cm_req``
    saves it as ``rq_psn``), so it is the first PSN the passive side sends
    with; the REP's is the active side's first send PSN. In rping the first
    RC SEND (from the active side) carries the REP's starting PSN.
    """
    req, rep = first(capture, CmReq), first(capture, CmRep)
    first_psn, qpns, sports = rc_traffic(capture)
    assert qpns == {req.local_qpn} == {rep.local_qpn} == {RC_QPN}
    assert first_psn[PASSIVE] == req.starting_psn
    assert first_psn[ACTIVE] == rep.starting_psn
    assert sports == {rdma_get_udp_sport(req.primary_flow_label, 0, 0)}


def test_rping_rep_fields() -> None:
    rep = first("rping.pcap", CmRep)
    assert isinstance(rep, CmRep)
    assert (rep.local_qpn, rep.starting_psn) == (RC_QPN, 0xFDECD7)
    assert (rep.responder_resources, rep.initiator_depth) == (1, 1)
    assert (rep.target_ack_delay, rep.failover_accepted, rep.rnr_retry_count) == (15, 0, 7)
    assert not rep.end_to_end_flow_control and not rep.srq
    assert rep.local_ca_guid == 0x505400FFFE770001
    assert rep.private_data == bytes(196)


def test_iser_req_and_rep() -> None:
    req, rep = first("iser_login.pcap", CmReq), first("iser_login.pcap", CmRep)
    assert req.service_id == 0x0000000001060CBC
    assert service_id_port_space(req.service_id) == (RdmaPortSpace.TCP, 3260)
    cma = CmaHdr.decode(req.private_data)
    assert (cma.src, cma.dst) == (ACTIVE, PASSIVE)
    # iSER CM header: 0x80 = zero-based virtual addresses not supported.
    assert req.private_data[CMA_HDR_SIZE : CMA_HDR_SIZE + 4] == b"\x80\x00\x00\x00"
    assert rep.private_data[:4] == b"\x80\x00\x00\x00"
    assert req.rnr_retry_count == 6  # ib_iser asks for 6, not 7
    assert (req.responder_resources, rep.initiator_depth) == (0x80, 0x80)  # rxe max_qp_rd_atom


@pytest.mark.parametrize(
    ("capture", "iu_len"), [("srp_imm.pcap", 0x2044), ("srp_rdma.pcap", 0x114)]
)
def test_srp_req_carries_a_login_request(capture: str, iu_len: int) -> None:
    """Over RDMA CM ib_srp sends ``struct srp_login_req_rdma`` (56 bytes, the
    92 - 36 left after the CMA header), whose opcode is at offset 11, not 0:
    tag (8), req_buf_fmt (2), req_flags, opcode, req_it_iu_len (4),
    initiator and target port IDs (16 each), imm_data_offset (2), 6 reserved."""
    req, rep = first(capture, CmReq), first(capture, CmRep)
    assert service_id_port_space(req.service_id) == (RdmaPortSpace.TCP, 5555)
    assert CmaHdr.decode(req.private_data).dst == PASSIVE
    login = req.private_data[CMA_HDR_SIZE:]
    assert len(login) == 56
    assert login[11] == 0x00  # SRP_LOGIN_REQ
    assert int.from_bytes(login[12:16]) == iu_len  # req_it_iu_len
    assert int.from_bytes(login[8:10]) == 0x0006  # direct | indirect descriptors
    assert login[32:48] == bytes.fromhex("505400fffe770001" * 2)  # id_ext, ioc_guid
    assert rep.private_data[0] == 0xC0  # SRP_LOGIN_RSP
    assert rep.end_to_end_flow_control  # ib_srpt sets it; the others do not
    assert req.rnr_retry_count == 7
