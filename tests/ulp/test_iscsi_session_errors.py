"""The iSCSI session state machines (softrdma.ulp.iscsi.session): rejected
PDUs in full feature phase and the initiator's protocol errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from softrdma.ulp.iscsi import (
    ISCSI_RESERVED_TAG,
    ConnectionDropped,
    IscsiDataOut,
    IscsiLoginResponse,
    IscsiNopIn,
    IscsiRejectReason,
    IscsiScsiCommand,
    IscsiScsiResponse,
    IscsiSessionError,
    IscsiTargetState,
    IscsiUsageError,
    ScsiCommandReceived,
    TaskRejected,
)

if TYPE_CHECKING:
    pass


from tests.ulp.iscsi_session_helpers import (
    _reject_of,
    initiator,
    logged_in,
    login_pdu,
    one,
)

# --- full feature phase: rejects --------------------------------------------------------------


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
