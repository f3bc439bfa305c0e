"""The IB CM state machine of one connection, sans-IO: two
:class:`CmConnection` objects fed each other's messages by hand, so every
transition, duplicate and timeout is exercised without a network."""

from __future__ import annotations

import errno
import random

import pytest

from softrdma.cm.ib_cm import (
    TRANSITIONS,
    Cancel,
    CmAction,
    CmConnection,
    CmEvent,
    CmEventType,
    CmState,
    CmStateError,
    ExtendTimeout,
    Send,
    StartTimewait,
    cm_convert_to_ms,
)
from softrdma.cm.messages import (
    CmDrep,
    CmDreq,
    CmMessage,
    CmMra,
    CmRej,
    CmRejReason,
    CmRep,
    CmReq,
    CmRtu,
)

E = CmEventType
S = CmState


def req() -> CmReq:
    return CmReq(
        service_id=0x1061C06,
        local_qpn=0x11,
        starting_psn=0x1234,
        remote_cm_response_timeout=20,
        local_cm_response_timeout=20,
        max_cm_retries=15,
        primary_local_ack_timeout=19,
        path_mtu=3,
        retry_count=7,
        rnr_retry_count=7,
    )


def sends(actions: list[CmAction]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def events(actions: list[CmAction]) -> list[CmEvent]:
    return [a for a in actions if isinstance(a, CmEvent)]


def deliver(conn: CmConnection, msg: CmMessage) -> list[CmAction]:
    """What the port does with a message routed to ``conn``."""
    if isinstance(msg, CmRep):
        conn.recv_rep(msg)
    elif isinstance(msg, CmRtu):
        conn.recv_rtu(msg)
    elif isinstance(msg, CmRej):
        conn.recv_rej(msg)
    elif isinstance(msg, CmMra):
        conn.recv_mra(msg)
    elif isinstance(msg, CmDreq):
        conn.recv_dreq(msg)
    elif isinstance(msg, CmDrep):
        conn.recv_drep(msg)
    else:
        raise AssertionError(msg)
    return conn.take()


def connected() -> tuple[CmConnection, CmConnection]:
    a = CmConnection(local_id=0xA, tid=0x1_0000000A, local_ca_guid=0xAAAA)
    b = CmConnection(local_id=0xB, tid=0x1_0000000A, local_ca_guid=0xBBBB)
    a.send_req(req(), timewait_ms=100)
    [send] = sends(a.take())
    assert isinstance(send.msg, CmReq)
    b.recv_req(send.msg, timewait_ms=100)
    assert [e.type for e in events(b.take())] == [E.REQ_RECEIVED]
    b.send_rep(CmRep(local_qpn=0x22, starting_psn=0x99))
    [rep] = sends(b.take())
    assert [e.type for e in events(deliver(a, rep.msg))] == [E.REP_RECEIVED]
    a.send_rtu()
    [rtu] = sends(a.take())
    assert [e.type for e in events(deliver(b, rtu.msg))] == [E.RTU_RECEIVED]
    return a, b


def test_connect_fills_ids_and_timeouts() -> None:
    a = CmConnection(local_id=0xA, tid=7, local_ca_guid=0xAAAA)
    a.send_req(req(), timewait_ms=100)
    [send] = sends(a.take())
    msg = send.msg
    assert isinstance(msg, CmReq)
    assert (msg.local_comm_id, msg.local_ca_guid) == (0xA, 0xAAAA)
    # 2 × packet life (18 → 1024 ms) + remote CM response time (20 → 4096 ms)
    assert send.timeout_ms == 2 * 1024 + 4096 and send.retries == 15
    assert a.state is S.REQ_SENT


def test_full_handshake_and_disconnect() -> None:
    a, b = connected()
    assert {a.state, b.state} == {S.ESTABLISHED}
    assert (a.remote_id, b.remote_id) == (0xB, 0xA)
    assert (a.remote_qpn, b.remote_qpn) == (0x22, 0x11)
    a.send_dreq()
    [dreq] = sends(a.take())
    assert dreq.timeout_ms and a.state == S.DREQ_SENT
    assert [e.type for e in events(deliver(b, dreq.msg))] == [E.DREQ_RECEIVED]
    b.send_drep()
    out = b.take()
    [drep] = sends(out)
    assert StartTimewait(100) in out and b.state is S.TIMEWAIT
    out = deliver(a, drep.msg)
    assert isinstance(out[0], Cancel) and [a.state] == [S.TIMEWAIT]
    assert [e.type for e in events(out)] == [E.DREP_RECEIVED]
    for c in (a, b):
        c.timewait_expired()
        assert [e.type for e in events(c.take())] == [E.TIMEWAIT_EXIT]
        assert c.state is S.IDLE


def test_duplicates_are_answered_as_cm_c_does() -> None:
    a, b = connected()
    # A REP repeated after we are up: our RTU was lost, send it again.
    rep = b.rep
    assert rep is not None
    [again] = sends(deliver(a, rep))
    assert isinstance(again.msg, CmRtu) and not again.timeout_ms
    # A repeated RTU changes nothing.
    assert deliver(b, CmRtu(local_comm_id=0xA, remote_comm_id=0xB)) == []
    # A DREQ repeated in TIMEWAIT gets the DREP again.
    a.send_dreq()
    [dreq] = sends(a.take())
    deliver(b, dreq.msg)
    b.send_drep()
    b.take()
    [drep_again] = sends(deliver(b, dreq.msg))
    assert isinstance(drep_again.msg, CmDrep)


def test_rtu_lost_then_traffic_establishes() -> None:
    a = CmConnection(local_id=1, tid=1, local_ca_guid=1)
    b = CmConnection(local_id=2, tid=1, local_ca_guid=2)
    a.send_req(req(), 100)
    b.recv_req(sends(a.take())[0].msg, 100)  # type: ignore[arg-type]
    b.take()
    b.send_rep(CmRep(local_qpn=5))
    b.take()
    b.established()
    out = b.take()
    assert isinstance(out[0], Cancel) and [e.type for e in events(out)] == [E.USER_ESTABLISHED]
    assert b.state is S.ESTABLISHED


def test_reject_of_a_request() -> None:
    a = CmConnection(local_id=1, tid=1, local_ca_guid=1)
    b = CmConnection(local_id=2, tid=1, local_ca_guid=2)
    a.send_req(req(), 100)
    b.recv_req(sends(a.take())[0].msg, 100)  # type: ignore[arg-type]
    b.take()
    b.send_rej(CmRejReason.CONSUMER_DEFINED, b"no")
    [rej] = sends(b.take())
    assert b.state is S.IDLE
    assert isinstance(rej.msg, CmRej) and rej.msg.message_rejected == 0
    out = deliver(a, rej.msg)
    [ev] = events(out)
    assert ev.type is E.REJ_RECEIVED and ev.status == CmRejReason.CONSUMER_DEFINED
    assert a.state is S.IDLE and isinstance(out[0], Cancel)


def test_request_that_times_out_fails_with_etimedout() -> None:
    a = CmConnection(local_id=1, tid=1, local_ca_guid=1)
    a.send_req(req(), 100)
    a.take()
    a.send_failed(errno.ETIMEDOUT)
    [ev] = events(a.take())
    assert ev.type is E.REQ_ERROR and ev.status == errno.ETIMEDOUT and a.state is S.IDLE


def test_mra_extends_the_wait() -> None:
    a = CmConnection(local_id=1, tid=1, local_ca_guid=1)
    b = CmConnection(local_id=2, tid=1, local_ca_guid=2)
    a.send_req(req(), 100)
    b.recv_req(sends(a.take())[0].msg, 100)  # type: ignore[arg-type]
    b.take()
    b.send_mra(service_timeout=22)
    [mra] = sends(b.take())
    assert b.state is S.MRA_REQ_SENT
    out = deliver(a, mra.msg)
    assert ExtendTimeout(cm_convert_to_ms(22) + a.timeout_ms) in out
    assert a.state is S.MRA_REQ_RCVD
    b.recv_dup_req()  # the REQ again while we are slow: the MRA again
    assert [s.msg for s in sends(b.take())] == [mra.msg]


def test_misuse_raises_and_the_table_holds() -> None:
    a = CmConnection(local_id=1, tid=1, local_ca_guid=1)
    with pytest.raises(CmStateError):
        a.send_rtu()
    with pytest.raises(CmStateError):
        a.send_dreq()
    with pytest.raises(CmStateError):
        a.send_drep()
    with pytest.raises(CmStateError):
        a.send_rep(CmRep())
    # Every state has a row, and only LISTEN (handled by the port) is a dead end.
    assert set(TRANSITIONS) == set(CmState)
    assert [s for s, nxt in TRANSITIONS.items() if not nxt] == [S.LISTEN]


def test_random_message_storms_stay_inside_the_table() -> None:
    """Any sequence of messages in any state moves only along the table and
    never raises (a peer's nonsense is dropped, not an exception)."""
    msgs: list[CmMessage] = [
        CmRep(local_comm_id=0xB, remote_comm_id=0xA),
        CmRtu(local_comm_id=0xB, remote_comm_id=0xA),
        CmRej(local_comm_id=0xB, remote_comm_id=0xA, reason=CmRejReason.STALE_CONN),
        CmRej(local_comm_id=0xB, remote_comm_id=0xA, reason=CmRejReason.CONSUMER_DEFINED),
        CmMra(local_comm_id=0xB, remote_comm_id=0xA, message_mraed=0, service_timeout=3),
        CmMra(local_comm_id=0xB, remote_comm_id=0xA, message_mraed=1, service_timeout=3),
        CmDreq(local_comm_id=0xB, remote_comm_id=0xA),
        CmDrep(local_comm_id=0xB, remote_comm_id=0xA),
    ]
    rng = random.Random(5)
    seen: set[tuple[CmState, CmState]] = set()
    for _ in range(300):
        a = connected()[0] if rng.random() < 0.5 else None
        conn = a if a is not None else CmConnection(local_id=0xA, tid=1, local_ca_guid=1)
        if a is None and rng.random() < 0.5:
            conn.send_req(req(), 10)
            conn.take()
        for _ in range(6):
            before = conn.state
            if rng.random() < 0.15:
                conn.send_failed(errno.ETIMEDOUT)
            elif rng.random() < 0.1:
                conn.timewait_expired()
            else:
                deliver(conn, rng.choice(msgs))
            conn.take()
            seen.add((before, conn.state))
    assert all(s == t or t in TRANSITIONS[s] for s, t in seen)
    assert len({t for _, t in seen}) >= 5
