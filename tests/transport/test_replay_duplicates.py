"""Replayed rxe requesters: repeated READ, ATOMIC and WRITE requests are
answered like duplicates.
"""

from __future__ import annotations

import dataclasses

import pytest

from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_MASK
from tests.fabric.fakelink import Transmitted
from tests.transport._replay_capture import (
    DEVICE_KINDS,
    FILLER,
    MTU,
    QPN,
    Datagram,
    _decode_as_udp_socket,
    _psn_count,
    _remote_base,
)
from tests.transport._replay_run import (
    Replay,
    _summary,
    _translate,
    fresh_replay,
)


def _again(r: Replay, q: Datagram, **change: int) -> list[Transmitted]:
    """Inject captured request ``q`` once more, translated like the replay,
    with ``psn`` / RETH ``va`` / ``dma_len`` changed by the given offsets;
    return the answers."""
    remote = _remote_base(r.scenario)
    assert remote is not None and r.buffer is not None and r.mr is not None
    rf = _translate(_decode_as_udp_socket(q), remote[0], remote[2], r.buffer, r.mr)
    p = rf.packet
    if change:
        assert p.reth is not None
        p = dataclasses.replace(
            p,
            bth=p.bth._replace(psn=(p.psn + change.get("psn", 0)) & PSN_MASK),
            reth=p.reth._replace(
                va=p.reth.va + change.get("va", 0),
                dma_len=p.reth.dma_len + change.get("dma_len", 0),
            ),
        )
        rf = dataclasses.replace(rf, packet=p)
    n = len(r.sent)
    r.link.deliver(rf)
    r.link.scheduler.run()
    return r.sent[n:]


def _with_msn(p: Packet, msn: int) -> tuple[object, ...]:
    """:func:`_summary` with the AETH MSN (if any) replaced."""
    out = list(_summary(p))
    if p.aeth is not None:
        out[4] = (hex(p.aeth.syndrome), msn)
    return tuple(out)


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_repeated_read_replayed_from_its_resource(kind: str) -> None:
    """Beyond the captures (they repeat no READ): a captured READ injected
    again after the run, as rxe's requester retransmits it, is answered
    from its responder resource as rxe_resp.c ``duplicate_request`` and
    ``read_reply`` do — the same packets and bytes as rxe's first answer,
    except that the AETH carries the current MSN (``prepare_ack_packet``
    sets ``qp->resp.msn``); a repeat of its tail (a PSN inside the READ, VA
    and length moved to match) restarts with MIDDLE. Nothing executes again:
    the MSN and the expected PSN stay."""
    r = fresh_replay("read_bw", kind)
    msn = len(r.requests)
    k = 5
    q = r.requests[k]
    got = _again(r, q)
    assert [_summary(t.packet) for t in got] == [_with_msn(d.packet, msn) for d in r.rxe[k]]
    assert [bytes(t.packet.payload) for t in got] == [bytes(d.packet.payload) for d in r.rxe[k]]
    tail = _again(r, q, psn=3, va=3 * MTU, dma_len=-3 * MTU)
    assert [_summary(t.packet) for t in tail] == [_with_msn(d.packet, msn) for d in r.rxe[k][3:]]
    assert Opcode(tail[0].packet.opcode) is Opcode.RC_RDMA_READ_RESPONSE_MIDDLE
    assert r.dev.stats["duplicate_request"] == 2
    # The next new READ is still answered with the next MSN.
    last = r.requests[-1]
    nxt = _again(r, last, psn=_psn_count(last))
    assert nxt[0].packet.psn == (last.psn + _psn_count(last)) & PSN_MASK
    assert nxt[0].packet.aeth is not None and nxt[0].packet.aeth.msn == msn + 1


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_repeated_atomic_replays_its_original_value(kind: str) -> None:
    """Beyond the captures (they repeat no atomic): a repeated FETCH_ADD is
    not executed again; it gets rxe's ATOMIC ACKNOWLEDGE again with the saved
    original value (the one rxe sent), with the current MSN."""
    r = fresh_replay("atomic_bw", kind)
    assert r.buffer is not None
    before = r.buffer.read()
    msn = len(r.requests)
    for k in (3, len(r.requests) - 1):
        (ack,) = _again(r, r.requests[k])
        (rxe_ack,) = r.rxe[k]
        assert _summary(ack.packet) == _with_msn(rxe_ack.packet, msn)
    assert r.buffer.read() == before
    assert r.dev.stats["duplicate_request"] == 2


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_repeated_write_acknowledged_not_executed(kind: str) -> None:
    """Beyond the captures (they repeat no WRITE): any repeated WRITE packet,
    AckReq or not, is acknowledged with the last PSN executed and the
    current MSN (C9-105; rxe ``duplicate_request``: ``send_ack(qp,
    AETH_ACK_UNLIMITED, prev_psn)``) and writes nothing."""
    r = fresh_replay("write_bw", kind)
    assert r.buffer is not None
    r.buffer.fill(bytes([FILLER]) * r.buffer.size)
    last_psn = r.requests[-1].psn
    for k in (0, 3, 7):  # WRITE_FIRST (RETH), a MIDDLE, a LAST with AckReq
        (ack,) = _again(r, r.requests[k])
        assert _summary(ack.packet) == (
            "RC_ACKNOWLEDGE", last_psn, QPN, False, ("0x1f", 20), None, 0
        )  # fmt: skip
    assert r.buffer.read() == bytes([FILLER]) * r.buffer.size
