"""The iSCSI session state machines (softrdma.ulp.iscsi.session) against
Linux's own iSER session and every error path.

``tests/data/captures/iser_login.pcap`` (SUMMARY.md, iSER section) holds
open-iscsi / ib_iser logging in to LIO / ib_isert, 21 SCSI commands and the
logout. The target machine fed the captured requests must answer with
LIO's responses byte for byte, and the initiator machine must build
open-iscsi's requests byte for byte. One field is not reproducible: the
StatSN of the first Login Response, which LIO draws at random for each
connection (``get_random_bytes`` in ``iscsi_login_set_conn_values``); the
tests hand the captured value to the target machine. The TSIH (1) is not
random: it is LIO's per-TPG counter, and this was the TPG's first session.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softrdma.ulp.iscsi import (
    ISCSI_RESERVED_TAG,
    CommandCompleted,
    ConnectionClosed,
    ConnectionDropped,
    IscsiDataOut,
    IscsiError,
    IscsiInitiatorConnection,
    IscsiInitiatorState,
    IscsiLoginError,
    IscsiLoginRedirect,
    IscsiLoginRequest,
    IscsiLoginResponse,
    IscsiLoginStage,
    IscsiLogoutReason,
    IscsiLogoutRequest,
    IscsiLogoutResponse,
    IscsiNopIn,
    IscsiNopOut,
    IscsiPdu,
    IscsiReject,
    IscsiRejectReason,
    IscsiScsiCommand,
    IscsiScsiResponse,
    IscsiSessionError,
    IscsiStep,
    IscsiTargetConnection,
    IscsiTargetNode,
    IscsiTargetPortal,
    IscsiTargetState,
    IscsiText,
    IscsiTextResponse,
    IscsiTmfFunc,
    IscsiTmfRequest,
    IscsiTmfResponse,
    IscsiTmfResponseCode,
    IscsiUsageError,
    IscsiWindowClosed,
    KeyNegotiator,
    LoggedOut,
    LoginCompleted,
    LoginFailed,
    LogoutRequested,
    NopInReceived,
    PduDropped,
    PduRejected,
    PingAnswered,
    RemoteBuffer,
    ScsiCommandReceived,
    SessionReinstated,
    TaskRejected,
    TextReceived,
    TextResponseReceived,
    TmfCompleted,
    TmfRequested,
    decode_text,
    encode_text,
    linux_iser_initiator,
    sn_add,
    sn_lt,
)
from softrdma.ulp.iser import ISER_HDR_LEN, IserFlag, IserHdr
from softrdma.ulp.scsi import Direction, FileBackstore, Nexus, ScsiTarget

if TYPE_CHECKING:
    from tests.ulp.test_iser_proto import Send

INIT_NAME = "iqn.2026-11.org.peer:init1"
TGT_NAME = "iqn.2026-11.org.peer:disk0"
ISID = 0x00023D000001
CAPTURED_STATSN = 732071364  # the capture's first Login Response StatSN (random in LIO)


def pdus() -> list[tuple[Send, IserHdr, IscsiPdu]]:
    """The capture's SENDs (imported here: only the capture tests read it)."""
    from tests.ulp.test_iser_proto import pdus as captured

    return captured()


TARGET = IPv4Address("10.77.0.1")


def _raw(i: int) -> bytes:
    """The iSCSI part of the capture's i-th SEND."""
    return pdus()[i][0].data[ISER_HDR_LEN:]


def portal(**kw: Any) -> IscsiTargetPortal:
    return IscsiTargetPortal([TGT_NAME], **kw)


def initiator(**overrides: str) -> IscsiInitiatorConnection:
    return IscsiInitiatorConnection(
        linux_iser_initiator(INIT_NAME, TGT_NAME, overrides=overrides), isid=ISID
    )


def one(step: IscsiStep) -> IscsiPdu:
    assert len(step.pdus) == 1, step
    return step.pdus[0]


def logged_in(
    p: IscsiTargetPortal | None = None, **overrides: str
) -> tuple[IscsiTargetConnection, IscsiInitiatorConnection]:
    """A target and an initiator connection in full feature phase."""
    tgt = (p or portal()).connection(initial_statsn=1000)
    ini = initiator(**overrides)
    step = tgt.receive_pdu(ini.login())
    assert any(isinstance(e, LoginCompleted) for e in step.events), step
    ini_step = ini.receive(one(step).encode())
    assert isinstance(ini_step.events[0], LoginCompleted)
    return tgt, ini


def full_offer() -> list[tuple[str, str]]:
    """open-iscsi's whole first Login Request text (the capture's, as
    test_iser_proto shows)."""
    return linux_iser_initiator(INIT_NAME, TGT_NAME).step()


def login_pdu(pairs: list[tuple[str, str]] | None = None, **fields: Any) -> IscsiLoginRequest:
    if pairs is None:
        pairs = full_offer()
    args: dict[str, Any] = {
        "transit": True,
        "csg": IscsiLoginStage.OP_PARMS_NEGOTIATION,
        "nsg": IscsiLoginStage.FULL_FEATURE_PHASE,
        "isid": ISID,
        "data": encode_text(pairs),
    }
    args.update(fields)
    return IscsiLoginRequest(**args)


# --- the capture -----------------------------------------------------------------------------


def test_target_answers_the_captured_login_byte_for_byte() -> None:
    tgt = portal().connection(initial_statsn=CAPTURED_STATSN)
    step = tgt.receive(_raw(0))
    assert one(step).encode() == _raw(1)
    (done,) = step.events
    assert isinstance(done, LoginCompleted)
    assert (done.tsih, done.isid, done.initiator_name, done.target_name) == (
        1,
        ISID,
        INIT_NAME,
        TGT_NAME,
    )
    assert done.session_type == "Normal" and done.negotiated.rdma_extensions
    assert tgt.state is IscsiTargetState.LOGGED_IN
    # The window opens once the login is over: ExpCmdSN 0, depth 64.
    assert (tgt.exp_cmdsn, tgt.max_cmdsn) == (0, 63)


def test_initiator_builds_the_captured_login_byte_for_byte() -> None:
    ini = initiator()
    assert ini.login().encode() == _raw(0)
    step = ini.receive(_raw(1))
    (done,) = step.events
    assert isinstance(done, LoginCompleted) and done.tsih == 1 and step.pdus == []
    assert ini.state is IscsiInitiatorState.LOGGED_IN
    assert ini.exp_statsn == CAPTURED_STATSN + 1
    assert done.negotiated.values["TargetAlias"] == "LIO Target"


def test_the_capture_replayed_through_the_target() -> None:
    """Every SCSI Response and the Logout Response come out as LIO sent
    them (StatSN, ExpCmdSN, MaxCmdSN, flags, residuals, sense), given the
    status the SCSI core reported. LIO built each response before it took
    the next command off the wire (ib_isert posts the RDMA WRITE and the
    response together), so each command is answered before the next is fed
    — the order the responses' ExpCmdSN shows."""
    lio = portal()
    tgt = lio.connection(initial_statsn=CAPTURED_STATSN)
    tgt.receive(_raw(0))
    assert list(lio.sessions) == [1]
    responses = {
        p.itt: s.data[ISER_HDR_LEN:]
        for s, _, p in pdus()
        if isinstance(p, IscsiScsiResponse | IscsiLogoutResponse)
    }
    answered = 0
    for send, hdr, pdu in pdus()[2:]:
        if send.src == TARGET:
            continue
        read_buf = RemoteBuffer(hdr.read_stag, hdr.read_va) if hdr.flags & IserFlag.RSV else None
        step = tgt.receive(send.data[ISER_HDR_LEN:], read_buf=read_buf)
        if isinstance(pdu, IscsiLogoutRequest):
            assert one(step).encode() == responses[pdu.itt]
            assert isinstance(step.events[0], LogoutRequested)
            assert step.events[0].outstanding == ()
            assert isinstance(step.events[1], ConnectionClosed)
            continue
        assert isinstance(pdu, IscsiScsiCommand)
        (ev,) = step.events
        assert isinstance(ev, ScsiCommandReceived) and step.pdus == []
        assert (ev.itt, ev.lun, ev.cdb, ev.expected_length) == (
            pdu.itt,
            pdu.lun,
            pdu.cdb,
            pdu.data_length,
        )
        assert ev.read_buf == read_buf and ev.write_buf is None
        assert ev.immediate_data == pdu.data and ev.cmdsn == pdu.cmdsn
        want = IscsiScsiResponse.decode(responses[pdu.itt])
        rsp = tgt.respond(
            ev.itt,
            status=want.status,
            sense=want.sense,
            underflow=want.residual_count if want.underflow else 0,
        )
        assert rsp.encode() == responses[pdu.itt], f"frame {send.frame}"
        answered += 1
    assert answered == 21
    assert tgt.state is IscsiTargetState.FREE and not lio.sessions


def test_the_capture_replayed_through_the_initiator() -> None:
    """open-iscsi's commands and logout come out byte for byte: ITTs from
    libiscsi's task pool, CmdSN, and ExpStatSN — each command is built once
    the initiator has seen the responses its ExpStatSN acknowledges (one
    command crossed the previous response on the wire)."""
    ini = initiator()
    ini.login()
    ini.receive(_raw(1))
    inbound = [s.data[ISER_HDR_LEN:] for s, _, _ in pdus()[2:] if s.src == TARGET]
    outbound = [(s, p) for s, _, p in pdus()[2:] if s.src != TARGET]
    completed = 0
    for send, pdu in outbound:
        assert isinstance(pdu, IscsiScsiCommand | IscsiLogoutRequest)
        while ini.exp_statsn != pdu.exp_statsn:
            step = ini.receive(inbound.pop(0))
            assert isinstance(step.events[0], CommandCompleted)
            completed += 1
        raw = send.data[ISER_HDR_LEN:]
        if isinstance(pdu, IscsiLogoutRequest):
            assert ini.logout().encode() == raw
            continue
        assert isinstance(pdu, IscsiScsiCommand)
        cmd = ini.send_command(
            pdu.cdb,
            read_length=pdu.data_length if pdu.read else 0,
            write_data=pdu.data,
        )
        assert cmd.encode() == raw, f"frame {send.frame}"
    while inbound:
        step = ini.receive(inbound.pop(0))
        completed += 1
    assert completed == 22 and isinstance(step.events[0], LoggedOut)
    assert ini.state is IscsiInitiatorState.CLOSED and ini.outstanding == ()


# --- the two machines together --------------------------------------------------------------


def test_initiator_and_target_over_the_scsi_core(tmp_path: Path) -> None:
    tgt, ini = logged_in()
    scsi = ScsiTarget()
    scsi.add_lun(0, FileBackstore(tmp_path / "disk.img", 512, size=1 << 20, create=True))
    nexus = Nexus(INIT_NAME, TGT_NAME)

    def run(cmd: IscsiScsiCommand, more: bytes = b"") -> tuple[CommandCompleted, bytes]:
        step = tgt.receive_pdu(cmd)
        (ev,) = step.events
        assert isinstance(ev, ScsiCommandReceived)
        plan = scsi.setup(nexus, ev.lun, ev.cdb, tag=ev.itt, expected_length=ev.expected_length)
        data = ev.immediate_data + more if plan.direction is Direction.DATA_OUT else None
        result = scsi.execute(plan, data)
        rsp = tgt.respond(
            ev.itt,
            status=result.status,
            sense=result.sense,
            underflow=result.underflow,
            overflow=result.overflow,
        )
        (done,) = ini.receive(rsp.encode()).events
        assert isinstance(done, CommandCompleted)
        return done, result.data_in

    done, inquiry = run(ini.send_command(bytes([0x12, 0, 0, 0, 96, 0]), read_length=96))
    assert done.status == 0 and inquiry[8:16] == b"SOFTRDMA"
    # 16 KiB write: 8 KiB immediate (TargetRecvDataSegmentLength), the rest by RDMA.
    payload = bytes(range(256)) * 64
    write = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 32, 0])
    cmd = ini.send_command(write, write_data=payload)
    assert len(cmd.data) == 8192 and cmd.data_length == 16384 and cmd.write
    done, _ = run(cmd, payload[8192:])
    assert done.status == 0 and not done.underflow
    done, data = run(ini.send_command(bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 32, 0]), read_length=16384))
    assert data == payload
    # A bad opcode: CHECK CONDITION with sense.
    done, _ = run(ini.send_command(bytes([0xEE] + [0] * 5)))
    assert done.status == 2 and done.sense[12] == 0x20
    # The window moved with every command.
    assert (ini.exp_cmdsn, ini.max_cmdsn) == (4, 4 + 63) == (tgt.exp_cmdsn, tgt.max_cmdsn)
    # NOP ping, TMF, logout.
    nop = ini.nop_out(b"ping")
    (nop_in,) = tgt.receive_pdu(nop).pdus
    assert isinstance(nop_in, IscsiNopIn) and nop_in.data == b"ping" and nop_in.itt == nop.itt
    assert ini.receive(nop_in.encode()).events == [NopInReceived(nop.itt, b"ping")]
    tmf = ini.task_management(IscsiTmfFunc.LOGICAL_UNIT_RESET, lun=0)
    (req,) = tgt.receive_pdu(tmf).events
    assert req == TmfRequested(tmf.itt, IscsiTmfFunc.LOGICAL_UNIT_RESET, 0, ISCSI_RESERVED_TAG, 0)
    rsp = tgt.respond_tmf(tmf.itt, IscsiTmfResponseCode.COMPLETE)
    assert ini.receive(rsp.encode()).events == [TmfCompleted(tmf.itt, 0)]
    out = tgt.receive_pdu(ini.logout())
    (ev,) = ini.receive(one(out).encode()).events
    assert isinstance(ev, LoggedOut) and ev.response == 0
    assert tgt.state is IscsiTargetState.FREE and ini.state is IscsiInitiatorState.CLOSED
    # StatSN: the login, 4 responses, NOP-In, TMF, logout, one each.
    assert tgt.statsn == 1000 + 8 and ini.exp_statsn == 1000 + 8


# --- login: every refusal ------------------------------------------------------------------

_I, _T = 0x02, 0x03
NAMES = [("InitiatorName", INIT_NAME), ("TargetName", TGT_NAME), ("SessionType", "Normal")]


@pytest.mark.parametrize(
    ("request_", "portal_kw", "status"),
    [
        (login_pdu([("TargetName", TGT_NAME), ("SessionType", "Normal")]), {}, (_I, 0x07)),
        (login_pdu([("InitiatorName", INIT_NAME), ("SessionType", "Normal")]), {}, (_I, 0x07)),
        (login_pdu([("InitiatorName", INIT_NAME), ("TargetName", TGT_NAME)]), {}, (_I, 0x07)),
        (login_pdu([*NAMES[:2], ("SessionType", "Weird")]), {}, (_I, 0x09)),
        (login_pdu([NAMES[0], ("TargetName", "iqn.x:none"), NAMES[2]]), {}, (_I, 0x03)),
        (login_pdu(min_version=1, max_version=2), {}, (_I, 0x05)),
        (login_pdu(csg=IscsiLoginStage.FULL_FEATURE_PHASE), {}, (_I, 0x00)),
        (login_pdu(nsg=IscsiLoginStage.OP_PARMS_NEGOTIATION), {}, (_I, 0x00)),
        (login_pdu(tsih=7), {}, (_I, 0x0A)),
        (login_pdu([*NAMES, ("MaxBurstLength", "1"), ("MaxBurstLength", "2")]), {}, (_I, 0)),
        (login_pdu([*NAMES, ("ErrorRecoveryLevel", "Reject")]), {}, (_I, 0)),
        (login_pdu(), {"max_sessions": 1}, (_T, 0x02)),
    ],
)
def test_login_refusals(
    request_: IscsiLoginRequest, portal_kw: dict[str, Any], status: tuple[int, int]
) -> None:
    p = portal(**portal_kw)
    if portal_kw:
        logged_in(p)  # fill the one session slot
    tgt = p.connection(initial_statsn=5)
    step = tgt.receive_pdu(request_.__class__(**{**vars(request_), "itt": 0x1234}))
    rsp = one(step)
    assert isinstance(rsp, IscsiLoginResponse)
    assert (rsp.status_class, rsp.status_detail) == status
    # LIO's iscsit_tx_login_rsp: only the opcode, the status and the ITT.
    assert rsp == IscsiLoginResponse(itt=0x1234, status_class=status[0], status_detail=status[1])
    failed, closed = step.events
    assert isinstance(failed, LoginFailed) and isinstance(closed, ConnectionClosed)
    assert (failed.status_class, failed.status_detail) == status
    assert tgt.state is IscsiTargetState.FREE
    assert tgt.receive_pdu(login_pdu()) == IscsiStep()  # nothing more on this connection


@pytest.mark.parametrize(
    ("node", "status"),
    [
        (IscsiTargetNode(TGT_NAME, allowed_initiators=frozenset({"iqn.x:other"})), (_I, 0x02)),
        (IscsiTargetNode(TGT_NAME, auth_required=True), (_I, 0x01)),
        (IscsiTargetNode(TGT_NAME, enabled=False), (_T, 0x01)),
    ],
)
def test_login_refusals_by_target_settings(node: IscsiTargetNode, status: tuple[int, int]) -> None:
    tgt = IscsiTargetPortal([node]).connection(initial_statsn=5)
    ini = initiator()
    rsp = one(tgt.receive_pdu(ini.login()))
    with pytest.raises(IscsiLoginError) as err:
        ini.receive(rsp.encode())
    assert (err.value.status_class, err.value.status_detail) == status
    assert ini.state is IscsiInitiatorState.CLOSED


def test_authentication_required_in_the_security_stage() -> None:
    tgt = IscsiTargetPortal([IscsiTargetNode(TGT_NAME, auth_required=True)]).connection()
    req = login_pdu(
        [*NAMES, ("AuthMethod", "CHAP,None")],
        csg=IscsiLoginStage.SECURITY_NEGOTIATION,
        nsg=IscsiLoginStage.OP_PARMS_NEGOTIATION,
    )
    rsp = one(tgt.receive_pdu(req))
    assert isinstance(rsp, IscsiLoginResponse) and (rsp.status_class, rsp.status_detail) == (2, 1)


def test_malformed_login_request_is_an_initiator_error() -> None:
    raw = bytearray(login_pdu().encode())
    raw[1] |= 0x40  # T and C together
    tgt = portal().connection()
    rsp = one(tgt.receive(bytes(raw)))
    assert isinstance(rsp, IscsiLoginResponse) and (rsp.status_class, rsp.status_detail) == (2, 0)
    bad_text = login_pdu(data=b"InitiatorName")  # no '=', no NUL
    rsp = one(portal().connection().receive_pdu(bad_text))
    assert isinstance(rsp, IscsiLoginResponse) and (rsp.status_class, rsp.status_detail) == (2, 0)


def test_redirect() -> None:
    node = IscsiTargetNode(TGT_NAME, redirect="10.0.0.9:3260,1")
    tgt = IscsiTargetPortal([node]).connection()
    ini = initiator()
    rsp = one(tgt.receive_pdu(ini.login()))
    with pytest.raises(IscsiLoginRedirect) as err:
        ini.receive(rsp.encode())
    assert err.value.target_address == "10.0.0.9:3260,1" and not err.value.permanent
    assert (err.value.status_class, err.value.status_detail) == (1, 1)


def test_existing_session_cannot_take_a_second_connection() -> None:
    p = portal()
    logged_in(p)
    rsp = one(p.connection().receive_pdu(login_pdu(tsih=1)))
    assert isinstance(rsp, IscsiLoginResponse) and (rsp.status_class, rsp.status_detail) == (2, 6)


def test_non_login_pdu_during_login_drops_the_connection() -> None:
    tgt = portal().connection()
    step = tgt.receive_pdu(IscsiNopOut(immediate=True, itt=1))
    assert step.pdus == [] and isinstance(step.events[0], ConnectionDropped)
    assert tgt.state is IscsiTargetState.FREE
    tgt = portal().connection()
    assert isinstance(tgt.receive(b"\x03" * 20).events[0], ConnectionDropped)


# --- login: stages, continuation, reinstatement, discovery -------------------------------


def test_security_then_operational_stage() -> None:
    p = portal()
    tgt = p.connection(initial_statsn=10)
    sec = login_pdu(
        [*NAMES, ("AuthMethod", "CHAP,None")],
        csg=IscsiLoginStage.SECURITY_NEGOTIATION,
        nsg=IscsiLoginStage.OP_PARMS_NEGOTIATION,
        cmdsn=5,
    )
    rsp = one(tgt.receive_pdu(sec))
    assert isinstance(rsp, IscsiLoginResponse) and rsp.status_class == 0
    assert rsp.transit and (rsp.csg, rsp.nsg) == (0, 1) and rsp.tsih == 0  # not yet
    assert ("AuthMethod", "None") in decode_text(rsp.data)
    assert (rsp.statsn, rsp.exp_cmdsn, rsp.max_cmdsn) == (10, 5, 5)
    assert tgt.state is IscsiTargetState.IN_LOGIN
    # Operational stage without T first: the target answers and waits.
    ops = [kv for kv in full_offer() if kv not in NAMES and kv[0] != "InitiatorAlias"]
    op = login_pdu(ops, transit=False, nsg=0, cmdsn=5, exp_statsn=11)
    rsp = one(tgt.receive_pdu(op))
    assert isinstance(rsp, IscsiLoginResponse) and not rsp.transit and rsp.status_class == 0
    assert ("RDMAExtensions", "Yes") in decode_text(rsp.data)
    rsp = one(step := tgt.receive_pdu(login_pdu([], cmdsn=5, exp_statsn=12)))
    assert isinstance(rsp, IscsiLoginResponse) and rsp.transit and rsp.nsg == 3 and rsp.tsih == 1
    assert isinstance(step.events[0], LoginCompleted)
    assert (tgt.exp_cmdsn, tgt.max_cmdsn) == (5, 5 + 63)
    # Back to a stage already left, or a changed ITT: initiator errors.
    for isid, bad in ((9, login_pdu(isid=9, csg=0, nsg=1)), (8, login_pdu(isid=8, itt=77))):
        t = p.connection()
        one(t.receive_pdu(IscsiLoginRequest(**{**vars(sec), "isid": isid})))
        rsp = one(t.receive_pdu(bad))
        assert isinstance(rsp, IscsiLoginResponse)
        assert (rsp.status_class, rsp.status_detail) == (2, 0)


def test_target_holds_transit_until_its_proposals_are_answered() -> None:
    """LIO proposes the keys the initiator left out and does not move to
    full feature phase before the answers come back."""
    neg = KeyNegotiator(
        "initiator",
        {"InitiatorName": INIT_NAME, "TargetName": TGT_NAME, "SessionType": "Normal"},
        ["InitiatorName", "TargetName", "SessionType"],
    )
    ini = IscsiInitiatorConnection(neg, isid=ISID)
    tgt = portal().connection(initial_statsn=0)
    rsp = one(tgt.receive_pdu(ini.login()))
    assert isinstance(rsp, IscsiLoginResponse) and not rsp.transit and rsp.status_class == 0
    assert ("MaxConnections", "1") in decode_text(rsp.data)
    step = ini.receive(rsp.encode())
    again = one(step)
    assert isinstance(again, IscsiLoginRequest) and again.transit and again.data
    step = tgt.receive_pdu(again)
    assert isinstance(step.events[0], LoginCompleted)
    assert not step.events[0].negotiated.rdma_extensions  # never offered: No
    assert isinstance(ini.receive(one(step).encode()).events[0], LoginCompleted)


def test_login_text_continued_over_two_pdus() -> None:
    text = encode_text(full_offer())
    tgt = portal().connection(initial_statsn=0)
    first = login_pdu(transit=False, cont=True, nsg=0, data=text[:30])
    rsp = one(tgt.receive_pdu(first))
    assert isinstance(rsp, IscsiLoginResponse) and rsp.data == b"" and rsp.status_class == 0
    step = tgt.receive_pdu(login_pdu(data=text[30:]))
    assert isinstance(step.events[0], LoginCompleted)


def test_session_reinstatement() -> None:
    p = portal()
    old, _ = logged_in(p)
    new, _ = logged_in(p)  # same initiator name and ISID, TSIH 0
    assert old.state is IscsiTargetState.FREE and old.closed_why == "session reinstated"
    assert new.session is not None and new.session.tsih == 2 and list(p.sessions) == [2]
    tgt = p.connection()
    step = tgt.receive_pdu(initiator().login())
    reinstated = step.events[0]
    assert isinstance(reinstated, SessionReinstated) and reinstated.old_tsih == 2
    assert reinstated.old_connections == (new,)
    # Another ISID is another session.
    other = IscsiInitiatorConnection(linux_iser_initiator(INIT_NAME, TGT_NAME), isid=ISID + 1)
    step = p.connection().receive_pdu(other.login())
    assert not any(isinstance(e, SessionReinstated) for e in step.events)
    assert sorted(p.sessions) == [3, 4]


def test_discovery_session_send_targets() -> None:
    p = IscsiTargetPortal(
        [TGT_NAME, IscsiTargetNode("iqn.x:hidden", allowed_initiators=frozenset())],
        address="192.0.2.1:3260",
    )
    tgt = p.connection(initial_statsn=0)
    ini = IscsiInitiatorConnection(
        linux_iser_initiator(INIT_NAME, "", session_type="Discovery"), isid=ISID
    )
    req = ini.login()
    assert "TargetName" not in dict(decode_text(req.data))  # a Discovery login names none
    step = tgt.receive_pdu(req)
    (done,) = step.events
    assert isinstance(done, LoginCompleted) and done.session_type == "Discovery"
    assert done.target_name is None
    text = IscsiText(itt=5, cmdsn=0, data=encode_text([("SendTargets", "All")]))
    step = tgt.receive_pdu(text)
    rsp = one(step)
    assert isinstance(rsp, IscsiTextResponse) and rsp.itt == 5 and rsp.final
    assert decode_text(rsp.data) == [
        ("TargetName", TGT_NAME),
        ("TargetAddress", "192.0.2.1:3260,1"),
    ]
    assert (rsp.statsn, rsp.exp_cmdsn, rsp.max_cmdsn) == (1, 1, 64)
    assert step.events == [TextReceived(5, (("SendTargets", "All"),))]
    # No SCSI in a discovery session.
    step = tgt.receive_pdu(IscsiScsiCommand(itt=6, cmdsn=1))
    rej = one(step)
    assert isinstance(rej, IscsiReject) and rej.reason == IscsiRejectReason.PROTOCOL_ERROR
    step = tgt.receive_pdu(IscsiTmfRequest(itt=7, cmdsn=2))
    assert one(step).reason == IscsiRejectReason.PROTOCOL_ERROR  # type: ignore[attr-defined]


# --- full feature phase: ordering and the window -----------------------------------------


def test_commands_are_delivered_in_cmdsn_order() -> None:
    tgt, _ = logged_in()
    c2 = IscsiScsiCommand(itt=12, cmdsn=2)
    c1 = IscsiScsiCommand(itt=11, cmdsn=1)
    c0 = IscsiScsiCommand(itt=10, cmdsn=0)
    assert tgt.receive_pdu(c2) == IscsiStep()
    assert tgt.receive_pdu(c1) == IscsiStep()
    assert tgt.exp_cmdsn == 0
    step = tgt.receive_pdu(c0)
    assert [e.itt for e in step.events if isinstance(e, ScsiCommandReceived)] == [10, 11, 12]
    assert tgt.exp_cmdsn == 3 and tgt.max_cmdsn == 63  # nothing answered yet
    # The same CmdSN twice while waiting: the second is dropped.
    tgt.receive_pdu(IscsiScsiCommand(itt=14, cmdsn=4))
    step = tgt.receive_pdu(IscsiScsiCommand(itt=15, cmdsn=4))
    assert isinstance(step.events[0], PduDropped)


def test_out_of_window_cmdsn_is_dropped() -> None:
    tgt, _ = logged_in()
    assert (tgt.exp_cmdsn, tgt.max_cmdsn) == (0, 63)
    step = tgt.receive_pdu(IscsiScsiCommand(itt=1, cmdsn=64))  # past MaxCmdSN
    assert step.pdus == [] and isinstance(step.events[0], PduDropped)
    step = tgt.receive_pdu(IscsiScsiCommand(itt=1, cmdsn=0xFFFFFFFF))  # before ExpCmdSN
    assert step.pdus == [] and isinstance(step.events[0], PduDropped)
    step = tgt.receive_pdu(IscsiNopOut(itt=2, cmdsn=100))
    assert step.pdus == [] and isinstance(step.events[0], PduDropped)
    assert tgt.exp_cmdsn == 0 and tgt.statsn == 1001  # no StatSN taken


def test_window_wraps_around_zero() -> None:
    p = portal(cmdsn_depth=4)
    tgt = p.connection(initial_statsn=0xFFFFFFFF)
    step = tgt.receive_pdu(login_pdu(cmdsn=0xFFFFFFFE))
    assert isinstance(step.events[0], LoginCompleted)
    assert (tgt.exp_cmdsn, tgt.max_cmdsn, tgt.statsn) == (0xFFFFFFFE, 1, 0)
    for n, sn in enumerate((0xFFFFFFFE, 0xFFFFFFFF, 0, 1)):
        (ev,) = tgt.receive_pdu(IscsiScsiCommand(itt=n, cmdsn=sn)).events
        assert isinstance(ev, ScsiCommandReceived)
    assert isinstance(tgt.receive_pdu(IscsiScsiCommand(itt=9, cmdsn=2)).events[0], PduDropped)
    rsp = tgt.respond(0)
    assert (rsp.statsn, rsp.exp_cmdsn, rsp.max_cmdsn) == (0, 2, 2)


def test_initiator_respects_the_window() -> None:
    tgt, ini = logged_in(portal(cmdsn_depth=2))
    a = ini.send_command(bytes(6))
    b = ini.send_command(bytes(6))
    with pytest.raises(IscsiWindowClosed):
        ini.send_command(bytes(6))
    assert not ini.window_open()
    tgt.receive_pdu(a)
    tgt.receive_pdu(b)
    ini.receive(tgt.respond(a.itt).encode())
    assert ini.window_open() and (ini.exp_cmdsn, ini.max_cmdsn) == (2, 2)
    c = ini.send_command(bytes(6))
    assert c.cmdsn == 2
    # A stale or inverted window does not shrink ours.
    ini.receive(tgt.respond(b.itt).encode())
    assert ini.max_cmdsn == 3


def ack(tgt: IscsiTargetConnection) -> int | None:
    return tgt.exp_statsn


def test_exp_statsn_acknowledges() -> None:
    tgt, ini = logged_in()
    assert ack(tgt) is None
    cmd = ini.send_command(bytes(6))
    tgt.receive_pdu(cmd)
    assert ack(tgt) == 1001
    tgt.receive_pdu(IscsiNopOut(immediate=True, itt=ISCSI_RESERVED_TAG, exp_statsn=5000))
    assert ack(tgt) == 1001  # ahead of anything sent: ignored


# --- full feature phase: rejects --------------------------------------------------------------


def _reject_of(step: IscsiStep) -> IscsiReject:
    rej = one(step)
    assert isinstance(rej, IscsiReject)
    assert isinstance(step.events[0], PduRejected) and step.events[0].reason == rej.reason
    return rej


BAD_CMDS = [
    (IscsiScsiCommand(itt=1, read=True, write=True, data_length=8), 0x09),
    (IscsiScsiCommand(itt=1, data_length=8), 0x09),
    (IscsiScsiCommand(itt=1, final=False), 0x09),
    (IscsiScsiCommand(itt=1, read=True, data_length=8, data=b"x" * 8), 0x09),
    (IscsiScsiCommand(itt=1, write=True, data_length=4, data=b"x" * 8), 0x09),
    (IscsiScsiCommand(itt=1, write=True, data_length=1 << 20, data=b"x" * 8196), 0x04),
    (IscsiScsiCommand(itt=1, write=True, final=False, data_length=8, data=b"x" * 8), 0x04),
    (IscsiScsiCommand(itt=ISCSI_RESERVED_TAG), 0x07),
]


@pytest.mark.parametrize(("cmd", "reason"), BAD_CMDS)
def test_bad_scsi_commands_are_rejected(cmd: IscsiScsiCommand, reason: int) -> None:
    tgt, _ = logged_in()
    rej = _reject_of(tgt.receive_pdu(cmd))
    assert rej.reason == reason and rej.data == cmd.encode()[:48]
    assert (rej.statsn, rej.exp_cmdsn, rej.max_cmdsn) == (1001, 1, 64)
    # The rejected command's CmdSN is used up: the next one runs.
    (ev,) = tgt.receive_pdu(IscsiScsiCommand(itt=2, cmdsn=1)).events
    assert isinstance(ev, ScsiCommandReceived)


def test_immediate_data_needs_immediate_data_yes() -> None:
    tgt, ini = logged_in(ImmediateData="No")
    assert ini.negotiated is not None and not ini.negotiated.immediate_data
    cmd = ini.send_command(bytes(10), write_data=b"y" * 512)
    assert cmd.data == b""  # the initiator holds back
    forced = IscsiScsiCommand(**{**vars(cmd), "data": b"y" * 512})
    assert _reject_of(tgt.receive_pdu(forced)).reason == IscsiRejectReason.PROTOCOL_ERROR


def test_duplicate_itt_is_task_in_progress() -> None:
    tgt, _ = logged_in()
    tgt.receive_pdu(IscsiScsiCommand(itt=1, cmdsn=0))
    rej = _reject_of(tgt.receive_pdu(IscsiScsiCommand(itt=1, cmdsn=1)))
    assert rej.reason == IscsiRejectReason.TASK_IN_PROGRESS


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (login_pdu().encode(), 0x04),  # a Login in full feature phase
        (IscsiDataOut(itt=1).encode(), 0x04),  # iSER moves data by RDMA READ
        (bytes([0x10, 0x80]) + bytes(46), 0x04),  # SNACK with ErrorRecoveryLevel 0
        (IscsiNopIn(itt=1).encode(), 0x04),  # a target opcode
        (bytes([0x1C, 0x80]) + bytes(46), 0x05),  # no such opcode
        (IscsiScsiCommand(itt=1).encode(), None),
    ],
)
def test_pdus_in_the_wrong_phase_are_rejected(raw: bytes, reason: int | None) -> None:
    tgt, _ = logged_in()
    if reason is None:  # a header announcing more than arrived
        raw = raw[:7] + b"\x10" + raw[8:]
        reason = 0x09
    rej = _reject_of(tgt.receive(raw))
    assert rej.reason == reason and rej.data == raw[:48]
    assert tgt.state is IscsiTargetState.LOGGED_IN


def test_short_pdu_in_full_feature_phase_drops_the_connection() -> None:
    tgt, _ = logged_in()
    assert isinstance(tgt.receive(b"\x01" * 47).events[0], ConnectionDropped)
    assert tgt.state is IscsiTargetState.FREE


def test_reject_reaches_the_initiator() -> None:
    tgt, ini = logged_in()
    cmd = ini.send_command(bytes(6))
    bad = IscsiScsiCommand(**{**vars(cmd), "final": False})
    rej = one(tgt.receive_pdu(bad))
    assert ini.receive(rej.encode()).events == [TaskRejected(cmd.itt, 0x09)]
    assert ini.outstanding == ()


# --- NOP, TMF, logout ----------------------------------------------------------------------


def test_nop_out() -> None:
    tgt, _ = logged_in()
    rsp = one(tgt.receive_pdu(IscsiNopOut(immediate=True, itt=9, lun=3, data=b"abcde")))
    assert isinstance(rsp, IscsiNopIn)
    assert (rsp.itt, rsp.ttt, rsp.lun, rsp.data) == (9, ISCSI_RESERVED_TAG, 3, b"abcde")
    assert (rsp.statsn, rsp.exp_cmdsn, rsp.max_cmdsn) == (1001, 0, 63)
    # Non-immediate: ordered, and it frees its window slot.
    rsp = one(tgt.receive_pdu(IscsiNopOut(itt=10, cmdsn=0)))
    assert isinstance(rsp, IscsiNopIn) and (rsp.exp_cmdsn, rsp.max_cmdsn) == (1, 64)
    # No answer wanted.
    assert tgt.receive_pdu(IscsiNopOut(immediate=True)) == IscsiStep()
    rej = _reject_of(tgt.receive_pdu(IscsiNopOut(immediate=True, itt=11, ttt=5)))
    assert rej.reason == IscsiRejectReason.PROTOCOL_ERROR


def test_initiator_answers_target_ping() -> None:
    _, ini = logged_in()
    ping = IscsiNopIn(ttt=0x55, statsn=1001, exp_cmdsn=0, max_cmdsn=63, data=b"p")
    (reply,) = ini.receive(ping.encode()).pdus
    assert isinstance(reply, IscsiNopOut) and reply.ttt == 0x55 and reply.itt == ISCSI_RESERVED_TAG
    assert reply.immediate and reply.data == b"p"


def test_abort_task() -> None:
    tgt, ini = logged_in()
    cmd = ini.send_command(bytes([0x28] + [0] * 9), read_length=512)
    tgt.receive_pdu(cmd, read_buf=RemoteBuffer(7, 0x1000))
    tmf = ini.task_management(IscsiTmfFunc.ABORT_TASK, rtt=cmd.itt, refcmdsn=cmd.cmdsn)
    (ev,) = tgt.receive_pdu(tmf).events
    assert ev == TmfRequested(tmf.itt, IscsiTmfFunc.ABORT_TASK, 0, cmd.itt, cmd.cmdsn)
    rsp = tgt.respond_tmf(tmf.itt, aborted=[cmd.itt])
    assert isinstance(rsp, IscsiTmfResponse) and rsp.response == 0
    assert (rsp.statsn, rsp.exp_cmdsn, rsp.max_cmdsn) == (1001, 1, 64)
    with pytest.raises(IscsiUsageError):
        tgt.respond(cmd.itt)
    assert ini.receive(rsp.encode()).events == [TmfCompleted(tmf.itt, 0)]


def test_tmf_the_machine_answers_itself() -> None:
    tgt, _ = logged_in()
    rsp = one(tgt.receive_pdu(IscsiTmfRequest(itt=3, function=IscsiTmfFunc.TASK_REASSIGN)))
    assert isinstance(rsp, IscsiTmfResponse) and rsp.response == 0x03
    rsp = one(tgt.receive_pdu(IscsiTmfRequest(itt=4, function=0x33)))
    assert isinstance(rsp, IscsiTmfResponse) and rsp.response == 0xFF


def _same(tgt: IscsiTargetConnection) -> IscsiTargetConnection:
    return tgt  # (lets mypy forget the narrowed state)


def test_logout_reasons() -> None:
    tgt, _ = logged_in()
    rsp = one(
        tgt.receive_pdu(
            IscsiLogoutRequest(immediate=True, itt=1, reason=IscsiLogoutReason.RECOVERY)
        )
    )
    assert isinstance(rsp, IscsiLogoutResponse) and rsp.response == 2
    rsp = one(
        tgt.receive_pdu(
            IscsiLogoutRequest(
                immediate=True, itt=2, reason=IscsiLogoutReason.CLOSE_CONNECTION, cid=9
            )
        )
    )
    assert isinstance(rsp, IscsiLogoutResponse) and rsp.response == 1
    assert tgt.state is IscsiTargetState.LOGGED_IN
    tgt.receive_pdu(IscsiScsiCommand(itt=5, cmdsn=0))
    tgt = _same(tgt)
    step = tgt.receive_pdu(
        IscsiLogoutRequest(immediate=True, itt=3, reason=IscsiLogoutReason.CLOSE_CONNECTION)
    )
    rsp = one(step)
    assert isinstance(rsp, IscsiLogoutResponse) and rsp.response == 0
    assert step.events[0] == LogoutRequested(IscsiLogoutReason.CLOSE_CONNECTION, 0, (5,))
    assert tgt.state is IscsiTargetState.FREE
    assert tgt.receive_pdu(IscsiNopOut(immediate=True, itt=1)) == IscsiStep()
    with pytest.raises(IscsiUsageError):
        tgt.respond(5)


def test_no_acceptable_auth_method() -> None:
    sec = login_pdu(
        [*NAMES, ("AuthMethod", "CHAP")],
        csg=IscsiLoginStage.SECURITY_NEGOTIATION,
        nsg=IscsiLoginStage.OP_PARMS_NEGOTIATION,
    )
    rsp = one(portal().connection().receive_pdu(sec))
    assert isinstance(rsp, IscsiLoginResponse) and (rsp.status_class, rsp.status_detail) == (2, 1)


def test_send_targets_in_a_normal_session() -> None:
    tgt, _ = logged_in()
    rsp = one(tgt.receive_pdu(IscsiText(itt=1, cmdsn=0, data=b"SendTargets=\0")))
    assert isinstance(rsp, IscsiTextResponse)
    assert decode_text(rsp.data) == [
        ("TargetName", TGT_NAME),
        ("TargetAddress", "10.77.0.1:3260,1"),
    ]
    rej = _reject_of(tgt.receive_pdu(IscsiText(itt=2, cmdsn=1, data=b"SendTargets=All\0")))
    assert rej.reason == IscsiRejectReason.PROTOCOL_ERROR
    rsp = one(tgt.receive_pdu(IscsiText(itt=3, cmdsn=2, data=b"X-Vendor=1\0")))
    assert isinstance(rsp, IscsiTextResponse)
    assert decode_text(rsp.data) == [("X-Vendor", "NotUnderstood")]
    assert (rsp.exp_cmdsn, rsp.max_cmdsn) == (3, 66)
    rej = _reject_of(tgt.receive_pdu(IscsiText(itt=4, cmdsn=3, cont=True, final=False)))
    assert rej.reason == IscsiRejectReason.CMD_NOT_SUPPORTED


def test_rejected_pdu_ahead_of_its_turn_keeps_its_place() -> None:
    tgt, _ = logged_in()
    step = tgt.receive_pdu(IscsiScsiCommand(itt=2, cmdsn=1, read=True, write=True))
    assert _reject_of(step).statsn == 1001  # rejected at once
    assert tgt.receive_pdu(IscsiScsiCommand(itt=3, cmdsn=2)) == IscsiStep()  # waits
    step = tgt.receive_pdu(IscsiScsiCommand(itt=1, cmdsn=0))
    assert [e.itt for e in step.events if isinstance(e, ScsiCommandReceived)] == [1, 3]
    assert (tgt.exp_cmdsn, tgt.max_cmdsn) == (3, 64)  # the rejected one's slot is free
    # A malformed PDU's CmdSN is read from its bytes.
    nop = IscsiNopOut(itt=9, cmdsn=3).encode()
    raw = nop[:7] + b"\x10" + nop[8:]  # announces 16 bytes of data that are not there
    rej = _reject_of(tgt.receive(raw))
    assert rej.reason == 0x09 and tgt.exp_cmdsn == 4
    rej = _reject_of(tgt.receive_pdu(IscsiLogoutRequest(itt=7, cmdsn=4, reason=3)))
    assert rej.reason == 0x09 and tgt.exp_cmdsn == 5


def test_target_ping_round_trip() -> None:
    tgt, ini = logged_in()
    ping = tgt.ping(b"are you there")
    assert ping.itt == ISCSI_RESERVED_TAG and ping.ttt == 1 and ping.statsn == tgt.statsn == 1001
    (reply,) = ini.receive(ping.encode()).pdus
    step = tgt.receive_pdu(reply)
    assert step == IscsiStep(events=[PingAnswered(1, b"are you there")])
    assert tgt.statsn == 1001  # an unsolicited NOP-In uses no StatSN
    # The same answer again names no ping of ours.
    assert _reject_of(tgt.receive_pdu(reply)).reason == IscsiRejectReason.PROTOCOL_ERROR


def test_discovery_through_the_initiator_machine() -> None:
    neg = KeyNegotiator(
        "initiator",
        {"InitiatorName": INIT_NAME, "SessionType": "Discovery"},
        ["InitiatorName", "SessionType"],
    )
    ini = IscsiInitiatorConnection(neg, isid=ISID)
    tgt = portal().connection(initial_statsn=0)
    step = tgt.receive_pdu(ini.login())
    while not any(isinstance(e, LoginCompleted) for e in step.events):
        step = tgt.receive_pdu(one(ini.receive(one(step).encode())))
    assert isinstance(ini.receive(one(step).encode()).events[0], LoginCompleted)
    req = ini.text([("SendTargets", "All")])
    assert not req.immediate and req.cmdsn == 0 and ini.cmdsn == 1
    (ev,) = ini.receive(one(tgt.receive_pdu(req)).encode()).events
    assert ev == TextResponseReceived(
        req.itt, (("TargetName", TGT_NAME), ("TargetAddress", "10.77.0.1:3260,1"))
    )
    (ev,) = ini.receive(one(tgt.receive_pdu(ini.logout())).encode()).events
    assert isinstance(ev, LoggedOut) and ev.response == 0


# --- initiator errors ------------------------------------------------------------------------


def test_initiator_protocol_errors() -> None:
    _, ini = logged_in()
    with pytest.raises(IscsiSessionError):
        ini.receive(IscsiScsiResponse(itt=0x77).encode())  # no such task
    with pytest.raises(IscsiSessionError):
        ini.receive(IscsiLoginResponse().encode())  # login is over
    with pytest.raises(IscsiSessionError):
        ini.receive(b"\x21" * 10)
    fresh = initiator()
    with pytest.raises(IscsiUsageError):
        fresh.send_command(bytes(6))
    with pytest.raises(IscsiSessionError):
        fresh.receive(IscsiLoginResponse().encode())
    fresh.login()
    with pytest.raises(IscsiSessionError):
        fresh.receive(IscsiNopIn().encode())  # not a Login Response


def test_itts_are_libiscsis_task_indices() -> None:
    tgt, ini = logged_in()
    itts = []
    for _ in range(3):
        cmd = ini.send_command(bytes(6))
        tgt.receive_pdu(cmd)
        ini.receive(tgt.respond(cmd.itt).encode())
        itts.append(cmd.itt)
    # Task 0 was the login's; freed slots go to the back of the pool.
    assert itts == [0x01000000, 0x02000000, 0x03000000]


# --- property: nothing but the typed errors ------------------------------------------------

_FIELDS = st.integers(0, 0xFFFFFFFF)


@st.composite
def _pdu_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    itt = draw(st.sampled_from([0, 1, 2, ISCSI_RESERVED_TAG, 0x01000000]))
    sn = draw(st.integers(0, 80) | _FIELDS)
    imm = draw(st.booleans())
    data = draw(st.binary(max_size=64))
    pdu: IscsiPdu
    if kind == 0:
        pdu = IscsiScsiCommand(
            immediate=imm,
            itt=itt,
            cmdsn=sn,
            read=draw(st.booleans()),
            write=draw(st.booleans()),
            final=draw(st.booleans()),
            data_length=draw(st.integers(0, 100)),
            data=data,
        )
    elif kind == 1:
        pdu = IscsiNopOut(
            immediate=imm,
            itt=itt,
            ttt=draw(st.sampled_from([0, ISCSI_RESERVED_TAG])),
            cmdsn=sn,
            data=data,
        )
    elif kind == 2:
        pdu = IscsiTmfRequest(immediate=imm, itt=itt, cmdsn=sn, function=draw(st.integers(0, 127)))
    elif kind == 3:
        pdu = IscsiLogoutRequest(immediate=imm, itt=itt, cmdsn=sn, reason=draw(st.integers(0, 127)))
    elif kind == 4:
        pdu = IscsiText(
            immediate=imm,
            itt=itt,
            cmdsn=sn,
            data=draw(st.sampled_from([b"SendTargets=All\0", data])),
        )
    elif kind == 5:
        return draw(st.binary(max_size=120))
    elif kind in (6, 7):
        pdu = login_pdu(
            draw(st.sampled_from([None, [*NAMES], [("SessionType", "Discovery"), NAMES[0]], []])),
            transit=draw(st.booleans()),
            nsg=draw(st.sampled_from([0, 1, 3])),
            csg=draw(st.sampled_from([0, 1, 3])),
            tsih=draw(st.sampled_from([0, 1])),
            cmdsn=sn,
        )
    else:
        raw = bytearray(
            draw(
                st.sampled_from([IscsiScsiCommand(itt=1), IscsiNopOut(itt=1), login_pdu()])
            ).encode()
        )
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    return pdu.encode()


@given(st.lists(_pdu_bytes(), max_size=12), st.booleans())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_target_never_raises(seq: list[bytes], login_first: bool) -> None:
    if login_first:
        tgt, _ = logged_in()
    else:
        tgt = portal().connection()
    statsn = tgt.statsn
    for raw in seq:
        before = (tgt.exp_cmdsn, tgt.max_cmdsn)
        step = tgt.receive(raw)
        for pdu in step.pdus:
            assert type(pdu).decode(pdu.encode()) == pdu
            # Every answer takes the next StatSN (failed logins carry none).
            if not (isinstance(pdu, IscsiLoginResponse) and pdu.status_class):
                assert getattr(pdu, "statsn") == statsn  # noqa: B009
                statsn = sn_add(statsn, 1)
        if tgt.session is not None and tgt.state is IscsiTargetState.LOGGED_IN:
            # The window only moves forward, and never closes below ExpCmdSN - 1.
            assert not sn_lt(tgt.exp_cmdsn, before[0]) or before == (0, 0)
            assert not sn_lt(tgt.max_cmdsn, sn_add(tgt.exp_cmdsn, -1))
        for ev in step.events:
            answer: IscsiPdu | None = None
            if isinstance(ev, ScsiCommandReceived):
                answer = tgt.respond(ev.itt)
            elif isinstance(ev, TmfRequested):
                answer = tgt.respond_tmf(ev.itt)
            if answer is not None:
                assert getattr(answer, "statsn") == statsn  # noqa: B009
                statsn = sn_add(statsn, 1)


@given(
    st.lists(
        _pdu_bytes()
        | st.builds(
            lambda p: p.encode(),
            st.sampled_from(
                [
                    IscsiScsiResponse(itt=0x01000000, statsn=1001, exp_cmdsn=1, max_cmdsn=64),
                    IscsiNopIn(itt=0x02000000, statsn=1002),
                    IscsiNopIn(ttt=3),
                    IscsiReject(data=IscsiScsiCommand(itt=0x01000000).encode()[:48]),
                    IscsiLogoutResponse(itt=0x03000000),
                    IscsiTmfResponse(itt=0x02000000),
                    IscsiTextResponse(itt=0x02000000, data=b"A=B\0"),
                ]
            ),
        ),
        max_size=10,
    )
)
@settings(max_examples=300, deadline=None)
def test_initiator_raises_only_typed_errors(seq: list[bytes]) -> None:
    _, ini = logged_in()
    ini.send_command(bytes(6))
    ini.nop_out()
    for raw in seq:
        try:
            ini.receive(raw)
        except IscsiError:
            break
