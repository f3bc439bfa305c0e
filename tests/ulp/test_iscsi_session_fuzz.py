"""The iSCSI session state machines (softrdma.ulp.iscsi.session) under
random PDU sequences: nothing but the typed errors escapes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softrdma.ulp.iscsi import (
    ISCSI_RESERVED_TAG,
    IscsiError,
    IscsiLoginResponse,
    IscsiLogoutRequest,
    IscsiLogoutResponse,
    IscsiNopIn,
    IscsiNopOut,
    IscsiPdu,
    IscsiReject,
    IscsiScsiCommand,
    IscsiScsiResponse,
    IscsiTargetState,
    IscsiText,
    IscsiTextResponse,
    IscsiTmfRequest,
    IscsiTmfResponse,
    ScsiCommandReceived,
    TmfRequested,
    sn_add,
    sn_lt,
)

if TYPE_CHECKING:
    pass


from tests.ulp.iscsi_session_helpers import (
    NAMES,
    logged_in,
    login_pdu,
    portal,
)

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
