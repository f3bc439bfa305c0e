"""Replayed rxe requesters: softrdma's RC responder answers like rxe, with the
same memory, completions and frames.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from softrdma.transport.opcodes import Opcode
from softrdma.transport.roce import (
    RoceFrame,
    decode_roce_v2,
    encode_roce_v2,
    rdma_get_udp_sport,
)
from softrdma.transport.roce_udp import encode_roce_udp
from softrdma.verbs.enums import IbWcOpcode, IbWcStatus
from softrdma.verbs.qp import connect_qp
from tests.fabric.fakelink import FakeNetwork
from tests.rdma.nodes import make_device, make_node
from tests.transport._replay_capture import (
    _ETH,
    _IP_CSUM,
    _IP_ID,
    BY_ID,
    DEVICE_KINDS,
    HOST_A,
    HOST_B,
    NETDEV_MTU,
    PATH_MTU,
    QPN,
    RXE_MAX_QP_RD_ATOM,
    SCENARIOS,
    Datagram,
    _needed_rd_atomic,
    _oob,
    _rd_atomic,
    _requests,
    _responders,
    _responses,
)
from tests.transport._replay_run import (
    SCENARIO_IDS,
    _pairs,
    _summary,
    replay,
)


def test_responders_found_from_opcodes() -> None:
    """Which host to impersonate follows from the opcodes: A answers in the
    perftest captures, both hosts answer each other in rc_pingpong."""
    for s in SCENARIOS:
        assert s.responder in _responders(s.capture)
        if s.capture != "rc_pingpong.pcap":
            assert _responders(s.capture) == {HOST_A}
    assert _responders("rc_pingpong.pcap") == {HOST_A, HOST_B}


def test_capture_needs() -> None:
    """What the captures require of the responder, and where they repeat
    requests (only A's SENDs in rc_pingpong)."""
    needs = {
        s.id: (_needed_rd_atomic(_requests(s), _responses(s)), _rd_atomic(s)) for s in SCENARIOS
    }
    assert needs == {
        "rc_pingpong-A": (0, 1),
        "rc_pingpong-B": (0, 1),
        "write_bw": (0, 1),
        "read_bw": (17, RXE_MAX_QP_RD_ATOM),
        "atomic_bw": (20, RXE_MAX_QP_RD_ATOM),
    }
    repeated = {}
    for s in SCENARIOS:
        psns = Counter(q.psn for q in _requests(s))
        repeated[s.id] = sorted(p for p, n in psns.items() if n > 1)
    assert repeated == {
        "rc_pingpong-A": [],
        "rc_pingpong-B": [13057431, 13057432, 13057434, 13057436, 13057437, 13057439],
        "write_bw": [],
        "read_bw": [],
        "atomic_bw": [],
    }


@pytest.mark.parametrize("kind", DEVICE_KINDS)
@pytest.mark.parametrize("sid", SCENARIO_IDS)
def test_responses_match_rxe(sid: str, kind: str) -> None:
    """Every response, in order and request by request: opcode, PSN, AETH
    syndrome and MSN, atomic original data, and every transport byte
    (payloads included); sent to the peer from the QP's UDP source port."""
    r = replay(sid, kind)
    ours = [_summary(t.packet) for ans in r.ours for t in ans]
    theirs = [_summary(d.packet) for d in r.responses]
    assert ours == theirs
    for k, q in enumerate(r.requests):
        got = [_summary(t.packet) for t in r.ours[k]]
        want = [_summary(d.packet) for d in r.rxe[k]]
        assert got == want, f"answers to request {q}"
    for t, d in _pairs(r):
        assert t.packet.encode() == d.packet.encode(), f"transport bytes of {d}"
        assert bytes(t.packet.payload) == bytes(d.packet.payload)
        assert t.daddr == d.daddr
        assert t.sport == d.sport == rdma_get_udp_sport(0, QPN, QPN)
    assert r.dev.stats["rcvd_pkts"] == len(r.requests)
    assert r.dev.stats["sent_pkts"] == len(r.responses)
    drops = {k: v for k, v in r.dev.stats.items() if k.startswith("rx_") and v}
    assert not drops
    assert r.node.qp.state.name == "RTS"


@pytest.mark.parametrize("kind", DEVICE_KINDS)
@pytest.mark.parametrize("sid", SCENARIO_IDS)
def test_memory_and_completions(sid: str, kind: str) -> None:
    """The responder's side effects: WRITEs landed (write_bw), READs left
    memory alone, each FETCH_ADD added once; each SEND completed one receive
    with its bytes, duplicates none."""
    r = replay(sid, kind)
    if r.memory is not None:
        assert r.buffer is not None
        before, after = r.memory
        got = r.buffer.read()
        assert got == bytes(after)
        if sid == "write_bw":
            assert got != bytes(before)  # the check above is not vacuous
            last = r.requests[-8:]
            assert got == b"".join(bytes(q.packet.payload) for q in last)
    if r.recv_buffer is not None:
        firsts: dict[int, Datagram] = {}
        for q in r.requests:
            firsts.setdefault(q.psn, q)
        sends = list(firsts.values())
        assert [(wc.wr_id, wc.status, wc.opcode, wc.byte_len) for wc in r.recv_wcs] == [
            (i, IbWcStatus.SUCCESS, IbWcOpcode.RECV, len(q.packet.payload))
            for i, q in enumerate(sends)
        ]
        size = r.scenario.recv_size
        for i, q in enumerate(sends):
            n = len(q.packet.payload)
            assert r.recv_buffer.read(n, i * size) == bytes(q.packet.payload)
    else:
        assert not r.recv_wcs


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_retransmitted_sends_answered_like_rxe(kind: str) -> None:
    """rc_pingpong's six retransmitted SENDs: each is a duplicate (not
    executed again: no receive consumed), acknowledged again exactly as B
    did — same PSN, same MSN as the first ACK."""
    r = replay("rc_pingpong-B", kind)
    seen: dict[int, int] = {}
    dups = 0
    for k, q in enumerate(r.requests):
        (ack,) = r.ours[k]
        (rxe_ack,) = r.rxe[k]
        assert _summary(ack.packet) == _summary(rxe_ack.packet)
        assert ack.packet.opcode == Opcode.RC_ACKNOWLEDGE and ack.packet.psn == q.psn
        assert ack.packet.aeth is not None
        if q.psn in seen:
            dups += 1
            assert ack.packet.aeth.msn == seen[q.psn], "a duplicate must not count"
        seen[q.psn] = ack.packet.aeth.msn
    assert dups == 6
    assert r.dev.stats["duplicate_request"] == 6
    assert len(r.recv_wcs) == len(seen) == 10


@pytest.mark.parametrize("sid", SCENARIO_IDS)
def test_response_frames_byte_identical(sid: str) -> None:
    """Each response as the link would frame it is rxe's frame byte for byte
    (IP and UDP headers, UDP source port, TTL, DF, ICRC) once the Ethernet
    addresses and the IPv4 ID — the host's, not the device's — are rxe's;
    and so is the UDP payload a socket link would send."""
    r = replay(sid)
    saddr = r.scenario.responder.packed
    for t, d in _pairs(r):
        frame = RoceFrame(
            t.packet,
            saddr,
            t.daddr,
            t.sport,
            eth_dst=d.ref.eth_dst,
            eth_src=d.ref.eth_src,
            ip_id=d.ref.ip_id,
        )
        assert encode_roce_v2(frame) == d.frame, d
        assert frame.icrc == d.ref.icrc
        udp = encode_roce_udp(t.packet, saddr, t.daddr, t.sport, ip_id=d.ref.ip_id, df=True)
        assert udp == d.payload, d


@pytest.mark.parametrize("sid", SCENARIO_IDS)
def test_link_frames_differ_only_in_ip_id(sid: str) -> None:
    """The frames the fake link built with its own MAC and IPv4 ID counter:
    every field equals rxe's but the MACs and the ID, so the bytes differ
    only in the MACs, the ID, the IP header checksum and the ICRC."""
    r = replay(sid)
    allowed = set(_ETH) | set(_IP_ID) | set(_IP_CSUM)
    for t, d in _pairs(r):
        mine = decode_roce_v2(t.frame)
        assert (
            dataclasses.replace(
                mine, eth_dst=d.ref.eth_dst, eth_src=d.ref.eth_src, ip_id=d.ref.ip_id
            )
            == d.ref
        )
        assert len(t.frame) == len(d.frame)
        n = len(d.frame)
        diff = {i for i in range(n) if t.frame[i] != d.frame[i]}
        assert diff - allowed <= set(range(n - 4, n)), d


def test_fake_link_datagram_path() -> None:
    """The fake link as a UDP-socket link: a request datagram is decoded and
    answered; a corrupted one is dropped with its reason, counted by the
    device and not answered."""
    s = BY_ID["atomic_bw"]
    q = _requests(s)[0]
    peer = _oob(s.capture)[s.peer]
    net = FakeNetwork()
    dev = make_device("cpu", net, str(s.responder), netdev_mtu=NETDEV_MTU)
    node = make_node(dev)
    connect_qp(
        node.qp,
        dest_qp_num=peer.qpn,
        dgid=peer.gid,
        rq_psn=peer.psn,
        path_mtu=PATH_MTU,
        max_rd_atomic=_rd_atomic(s),
    )
    link = net.links[s.responder]
    net.scheduler.run()
    bad = bytearray(q.payload)
    bad[40] ^= 0x01  # inside the AtomicETH swap/add value
    link.deliver_datagram(bytes(bad), q.saddr, q.sport)
    net.scheduler.run()
    assert dev.stats["rx_bad_icrc"] == 1 and not link.sent
    # The intact request reaches the responder (and fails its rkey check,
    # since rxe's rkey means nothing here: a NAK, as rxe would send).
    link.deliver_datagram(q.payload, q.saddr, q.sport)
    net.scheduler.run()
    assert dev.stats["rcvd_pkts"] == 1
    (nak,) = link.sent
    assert nak.packet.opcode == Opcode.RC_ACKNOWLEDGE and nak.packet.psn == q.psn
    assert nak.packet.aeth is not None and nak.packet.aeth.syndrome == 0x62  # NAK access
