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

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from softrdma.ulp.iscsi import (
    ISCSI_RESERVED_TAG,
    CommandCompleted,
    ConnectionClosed,
    ConnectionDropped,
    IscsiInitiatorConnection,
    IscsiInitiatorState,
    IscsiLoginError,
    IscsiLoginRedirect,
    IscsiLoginRequest,
    IscsiLoginResponse,
    IscsiLoginStage,
    IscsiLogoutRequest,
    IscsiLogoutResponse,
    IscsiNopIn,
    IscsiNopOut,
    IscsiReject,
    IscsiRejectReason,
    IscsiScsiCommand,
    IscsiScsiResponse,
    IscsiStep,
    IscsiTargetNode,
    IscsiTargetPortal,
    IscsiTargetState,
    IscsiText,
    IscsiTextResponse,
    IscsiTmfFunc,
    IscsiTmfRequest,
    IscsiTmfResponseCode,
    KeyNegotiator,
    LoggedOut,
    LoginCompleted,
    LoginFailed,
    LogoutRequested,
    NopInReceived,
    RemoteBuffer,
    ScsiCommandReceived,
    SessionReinstated,
    TextReceived,
    TmfCompleted,
    TmfRequested,
    decode_text,
    encode_text,
    linux_iser_initiator,
)
from softrdma.ulp.iser import ISER_HDR_LEN, IserFlag
from softrdma.ulp.scsi import Direction, FileBackstore, Nexus, ScsiTarget

if TYPE_CHECKING:
    pass


from tests.ulp.iscsi_session_helpers import (
    CAPTURED_STATSN,
    INIT_NAME,
    ISID,
    NAMES,
    TARGET,
    TGT_NAME,
    _raw,
    full_offer,
    initiator,
    logged_in,
    login_pdu,
    one,
    pdus,
    portal,
)

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


@pytest.mark.parametrize(
    ("request_", "portal_kw", "status"),
    [
        (login_pdu([("TargetName", TGT_NAME), ("SessionType", "Normal")]), {}, (_I, 0x07)),
        (login_pdu([("InitiatorName", INIT_NAME), ("SessionType", "Normal")]), {}, (_I, 0x07)),
        (login_pdu([("InitiatorName", INIT_NAME), ("TargetName", TGT_NAME)]), {}, (_I, 0x07)),
        (login_pdu([*NAMES[:2], ("SessionType", "Weird")]), {}, (_I, 0x09)),
        # LIO answers an unknown TargetName 0x0301, not the RFC's 0x0203.
        (login_pdu([NAMES[0], ("TargetName", "iqn.x:none"), NAMES[2]]), {}, (_T, 0x01)),
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
