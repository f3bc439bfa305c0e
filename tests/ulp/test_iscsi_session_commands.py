"""The iSCSI session state machines (softrdma.ulp.iscsi.session) in full
feature phase: CmdSN ordering and the window, NOP, TMF and logout."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from softrdma.ulp.iscsi import (
    ISCSI_RESERVED_TAG,
    IscsiInitiatorConnection,
    IscsiLoginResponse,
    IscsiLoginStage,
    IscsiLogoutReason,
    IscsiLogoutRequest,
    IscsiLogoutResponse,
    IscsiNopIn,
    IscsiNopOut,
    IscsiRejectReason,
    IscsiScsiCommand,
    IscsiStep,
    IscsiTargetConnection,
    IscsiTargetState,
    IscsiText,
    IscsiTextResponse,
    IscsiTmfFunc,
    IscsiTmfRequest,
    IscsiTmfResponse,
    IscsiUsageError,
    IscsiWindowClosed,
    KeyNegotiator,
    LoggedOut,
    LoginCompleted,
    LogoutRequested,
    PduDropped,
    PingAnswered,
    RemoteBuffer,
    ScsiCommandReceived,
    TextResponseReceived,
    TmfCompleted,
    TmfRequested,
    decode_text,
)

if TYPE_CHECKING:
    pass


from tests.ulp.iscsi_session_helpers import (
    INIT_NAME,
    ISID,
    NAMES,
    TGT_NAME,
    _reject_of,
    logged_in,
    login_pdu,
    one,
    portal,
)

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
