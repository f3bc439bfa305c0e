"""Shared helpers for the iSCSI session tests (test_iscsi_session_*.py):
names, the capture's PDUs, and ready-made target / initiator connections."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from softrdma.ulp.iscsi import (
    IscsiInitiatorConnection,
    IscsiLoginRequest,
    IscsiLoginStage,
    IscsiPdu,
    IscsiReject,
    IscsiStep,
    IscsiTargetConnection,
    IscsiTargetPortal,
    LoginCompleted,
    PduRejected,
    encode_text,
    linux_iser_initiator,
)
from softrdma.ulp.iser import ISER_HDR_LEN, IserHdr

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


NAMES = [("InitiatorName", INIT_NAME), ("TargetName", TGT_NAME), ("SessionType", "Normal")]


def _reject_of(step: IscsiStep) -> IscsiReject:
    rej = one(step)
    assert isinstance(rej, IscsiReject)
    assert isinstance(step.events[0], PduRejected) and step.events[0].reason == rej.reason
    return rej
