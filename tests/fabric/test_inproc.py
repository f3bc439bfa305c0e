"""softrdma.fabric.inproc: routing, timing, fault injection, determinism."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.fabric.inproc import (
    DEFAULT_LATENCY,
    DEFAULT_LINK_RATE,
    Fabric,
    FabricError,
    Faults,
)
from softrdma.time.sim import SimLoop
from softrdma.transport.errors import RejectedPacket
from softrdma.transport.icrc import IcrcError
from softrdma.transport.roce import RoceFrame, decode_roce_v2

from ..transport.strategies import packets, u
from .ports import FakePort, make_frame, make_port


def three(fabric: Fabric) -> tuple[FakePort, FakePort, FakePort]:
    return (
        make_port(fabric, "10.0.0.1"),
        make_port(fabric, "10.0.0.2"),
        make_port(fabric, "10.0.0.3"),
    )


# --- routing --------------------------------------------------------------------------


def test_routes_by_destination_ip() -> None:
    fabric = Fabric()
    a, b, c = three(fabric)
    fabric.transmit(a, make_frame(a, b, psn=1))
    fabric.transmit(a, make_frame(a, c, psn=2))
    fabric.transmit(c, make_frame(c, b, psn=3))
    fabric.transmit(b, make_frame(b, b, psn=4))  # to itself (rxe loopback)
    assert not b.received  # delivery is an event
    fabric.loop.run()
    assert b.psns() == [1, 3, 4] and c.psns() == [2] and a.psns() == []
    assert fabric.stats.sent == 4 and fabric.stats.delivered == 4
    assert fabric.attachment(a).stats.tx_frames == 2
    assert fabric.attachment(b).stats.rx_frames == 3
    assert fabric.attachment(b).stats.rx_bytes == sum(len(f) for f in b.frames)


def test_unroutable_frames_are_dropped_and_counted() -> None:
    fabric = Fabric()
    a, b, _ = three(fabric)
    good = make_frame(a, b)
    fabric.transmit(a, make_frame(a, "10.0.0.99"))  # unknown destination
    fabric.transmit(a, good[:12] + b"\x08\x06" + good[14:])  # ARP ethertype
    fabric.transmit(a, good[:20])  # runt
    fabric.transmit(a, b"")
    fabric.loop.run()
    assert fabric.stats.unroutable == 4 and fabric.stats.delivered == 0
    assert fabric.stats.sent == 4


def test_vlan_tagged_and_ipv6_frames_are_routed() -> None:
    fabric = Fabric()
    a, b, _ = three(fabric)
    v6 = make_port(fabric, "fd00::6")
    fabric.add_address(b, "fe80::2")
    fabric.transmit(a, make_frame(a, b, psn=1, vlan=0x0064))
    fabric.transmit(a, make_frame("fd00::1", v6, psn=2))
    fabric.transmit(a, make_frame("fd00::1", "fe80::2", psn=3, vlan=5))
    fabric.transmit(a, make_frame("fd00::1", "fd00::99", psn=4))
    fabric.loop.run()
    assert b.psns() == [1, 3] and v6.psns() == [2]
    assert decode_roce_v2(b.frames[0]).vlan_tci == 0x64
    assert fabric.stats.unroutable == 1


def test_attach_and_detach() -> None:
    fabric = Fabric()
    a, b, c = three(fabric)
    dup = FakePort(fabric.loop, b.ip, b"\x02" * 6)
    with pytest.raises(FabricError, match="already in use"):
        fabric.attach(dup)
    with pytest.raises(FabricError, match="already attached"):
        fabric.attach(a)
    with pytest.raises(FabricError, match="6 bytes"):
        fabric.attach(FakePort(fabric.loop, IPv4Address("10.0.0.51"), b"\x01"))
    with pytest.raises(FabricError, match="already in use"):
        fabric.add_address(a, "10.0.0.2")
    assert fabric.lookup_mac("10.0.0.2") == b.mac and fabric.lookup_mac("10.9.9.9") is None
    assert fabric.lookup_mac("::ffff:10.0.0.3") == c.mac  # a RoCEv2 GID
    assert fabric.ports == [a, b, c]
    # a frame in flight to b when b leaves is lost
    fabric.transmit(a, make_frame(a, b))
    fabric.detach(b)
    fabric.loop.run()
    assert not b.received and fabric.stats.unroutable == 1
    with pytest.raises(FabricError, match="not attached"):
        fabric.transmit(b, make_frame(b, a))
    with pytest.raises(FabricError, match="not attached"):
        fabric.detach(b)
    fabric.transmit(a, make_frame(a, b))  # b's address is free
    fabric.loop.run()
    assert fabric.stats.unroutable == 2
    fabric.attach(dup)  # the address can be reused now
    att = fabric.attachment(dup)
    att.transmit(make_frame(dup, a, psn=7))
    fabric.loop.run()
    assert a.psns() == [7]
    att.detach()
    assert not att.attached and "detached" in repr(att)
    with pytest.raises(FabricError, match="detached"):
        att.transmit(make_frame(dup, a))


def test_frames_are_copied_from_mutable_buffers() -> None:
    fabric = Fabric()
    a, b, _ = three(fabric)
    buf = bytearray(make_frame(a, b, psn=5))
    fabric.transmit(a, buf)
    fabric.transmit(a, memoryview(buf))
    buf[-1] ^= 0xFF  # the sender reuses its buffer
    fabric.loop.run()
    assert [type(f) for f in b.frames] == [bytes, bytes]
    assert b.psns() == [5, 5]  # ICRC still good


# --- timing ---------------------------------------------------------------------------


def test_latency_plus_serialization() -> None:
    fabric = Fabric()
    assert fabric.latency == DEFAULT_LATENCY and fabric.link_rate == DEFAULT_LINK_RATE
    a, b, _ = three(fabric)
    frame = make_frame(a, b, payload=bytes(1024))
    ser = len(frame) * 8 / 100e9
    for _ in range(3):
        fabric.transmit(a, frame)  # back to back: queue on a's link
    fabric.loop.run()
    times = [t for t, _ in b.received]
    assert times == pytest.approx([1e-6 + ser, 1e-6 + 2 * ser, 1e-6 + 3 * ser], rel=1e-12)
    # after the link went idle, a new frame does not queue behind the old ones
    fabric.loop.run(until=1.0)
    fabric.transmit(a, frame)
    fabric.loop.run()
    assert b.received[-1][0] == pytest.approx(1.0 + 1e-6 + ser, rel=1e-12)


def test_infinite_link_rate_and_custom_latency() -> None:
    fabric = Fabric(latency=5e-6, link_rate=0)
    a, b, c = three(fabric)
    for i in range(3):
        fabric.transmit(a, make_frame(a, b, psn=i, payload=bytes(4000)))
    fabric.transmit(c, make_frame(c, b, psn=9))
    fabric.loop.run()
    assert [t for t, _ in b.received] == [5e-6] * 4
    assert b.psns() == [0, 1, 2, 9]  # FIFO at equal times
    with pytest.raises(FabricError):
        fabric.latency = -1.0
    with pytest.raises(FabricError):
        fabric.link_rate = float("inf")


def test_each_port_has_its_own_link() -> None:
    fabric = Fabric(latency=0.0, link_rate=8e6)  # 1 byte per µs
    a, b, c = three(fabric)
    fa = make_frame(a, c, payload=bytes(100))
    fb = make_frame(b, c, payload=bytes(100))
    fabric.transmit(a, fa)
    fabric.transmit(b, fb)
    fabric.loop.run()
    ts = [t for t, _ in c.received]
    assert ts == pytest.approx([len(fa) * 1e-6, len(fb) * 1e-6])


def test_fifo_survives_a_latency_change() -> None:
    fabric = Fabric(latency=1e-3)
    a, b, _ = three(fabric)
    fabric.transmit(a, make_frame(a, b, psn=0))
    fabric.latency = 1e-6
    fabric.transmit(a, make_frame(a, b, psn=1))
    fabric.loop.run()
    assert b.psns() == [0, 1]


def test_ping_pong_from_receive_frame() -> None:
    """A port that answers from inside ``receive_frame`` (as a responder does)."""
    fabric = Fabric(link_rate=0)
    a, b, _ = three(fabric)

    def echo(frame: bytes) -> None:
        psn = decode_roce_v2(frame).packet.bth.psn
        if psn < 9:
            fabric.transmit(b, make_frame(b, a, psn=psn + 1))

    def back(frame: bytes) -> None:
        psn = decode_roce_v2(frame).packet.bth.psn
        fabric.transmit(a, make_frame(a, b, psn=psn + 1))

    b.respond = echo
    a.respond = back
    fabric.transmit(a, make_frame(a, b, psn=0))
    fabric.loop.run()
    assert b.psns() == [0, 2, 4, 6, 8, 10] and a.psns() == [1, 3, 5, 7, 9]
    assert fabric.loop.now == pytest.approx(11e-6)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),  # sender
            st.integers(0, 2),  # receiver
            st.integers(0, 1500),  # payload bytes
            st.sampled_from([0.0, 0.0, 1e-8, 1e-6, 1e-5]),  # gap before sending
        ),
        max_size=60,
    )
)
def test_property_fifo_per_link_and_causal(sends: list[tuple[int, int, int, float]]) -> None:
    fabric = Fabric()
    ports = three(fabric)
    loop = fabric.loop
    sent_at: dict[int, float] = {}
    for psn, (s, d, size, gap) in enumerate(sends):
        loop.run(until=loop.now + gap)
        sent_at[psn] = loop.now
        fabric.transmit(ports[s], make_frame(ports[s], ports[d], psn=psn, payload=bytes(size)))
    loop.run()
    assert fabric.stats.delivered == len(sends)
    for d, port in enumerate(ports):
        for s in range(3):
            # per (src, dst) direction: in order of sending
            psns = [
                p for p, (t, _) in zip(port.psns(), port.received, strict=True) if sends[p][0] == s
            ]
            assert psns == sorted(psns)
        for p, (t, _) in zip(port.psns(), port.received, strict=True):
            assert sends[p][1] == d
            assert t >= sent_at[p] + fabric.latency


# --- faults ---------------------------------------------------------------------------


def blast(fabric: Fabric, n: int, src: FakePort, dst: FakePort, gap: float = 0.0) -> None:
    for psn in range(n):
        fabric.transmit(src, make_frame(src, dst, psn=psn, payload=bytes(psn % 64)))
        if gap:
            fabric.loop.run(until=fabric.loop.now + gap)
    fabric.loop.run()


def test_faults_at_rate_zero_change_nothing() -> None:
    fabric = Fabric(seed=1, faults=Faults())
    a, b, _ = three(fabric)
    fabric.set_faults(a, b, drop=0, duplicate=0, reorder=0, corrupt=0)
    blast(fabric, 200, a, b)
    assert b.psns() == list(range(200))
    s = fabric.stats.as_dict()
    assert s == {
        "sent": 200,
        "delivered": 200,
        "dropped": 0,
        "duplicated": 0,
        "reordered": 0,
        "corrupted": 0,
        "unroutable": 0,
        "bursts": 0,
    }


@pytest.mark.parametrize("kind", ["drop", "duplicate", "reorder", "corrupt"])
def test_each_fault_at_rate_one(kind: str) -> None:
    fabric = Fabric(seed=3)
    a, b, _ = three(fabric)
    fabric.faults = Faults(**{kind: 1.0})
    n = 100
    blast(fabric, n, a, b, gap=1e-7)
    s = fabric.stats
    if kind == "drop":
        assert s.dropped == n and not b.received
    elif kind == "duplicate":
        assert s.duplicated == n and s.delivered == 2 * n
        assert b.psns() == [p for p in range(n) for _ in (0, 1)]
    elif kind == "reorder":
        assert s.reordered == n and sorted(b.psns()) == list(range(n))
        assert b.psns() != list(range(n))
    else:
        assert s.corrupted == n and s.delivered == n
        for f in b.frames:
            with pytest.raises(RejectedPacket):
                decode_roce_v2(f)


@pytest.mark.parametrize("kind", ["drop", "duplicate", "reorder", "corrupt"])
def test_each_fault_at_rate_point_three(kind: str) -> None:
    fabric = Fabric(seed=1234)
    a, b, _ = three(fabric)
    fabric.faults = Faults(**{kind: 0.3})
    n = 2000
    blast(fabric, n, a, b, gap=2e-6)
    counter = {"drop": "dropped", "duplicate": "duplicated"}.get(kind, kind + "ed")
    hits = getattr(fabric.stats, counter)
    # binomial(2000, 0.3): mean 600, sd 20.5; 5 sd either side
    assert 500 < hits < 700, hits
    others = {"dropped", "duplicated", "reordered", "corrupted"} - {counter}
    assert all(getattr(fabric.stats, o) == 0 for o in others)
    if kind == "drop":
        assert len(b.received) == n - hits
    elif kind == "duplicate":
        assert len(b.received) == n + hits
    elif kind == "reorder":
        psns = b.psns()
        assert sorted(psns) == list(range(n)) and psns != list(range(n))
    else:
        bad = 0
        for f in b.frames:
            try:
                decode_roce_v2(f)
            except RejectedPacket:
                bad += 1
        assert bad == hits


def test_reorder_delay_bounds() -> None:
    fabric = Fabric(seed=5, link_rate=0)
    a, b, _ = three(fabric)
    fabric.set_faults(reorder=1.0, reorder_delay=3e-6)
    blast(fabric, 200, a, b)
    for t, _ in b.received:
        assert 1e-6 < t <= 4e-6
    fabric.set_faults(reorder=1.0, reorder_delay=0.0)  # no extra delay: still in order
    b.received.clear()
    blast(fabric, 50, a, b)
    assert b.psns() == list(range(50))


def test_corruption_flips_exactly_one_checked_bit() -> None:
    fabric = Fabric(seed=9)
    a, b, _ = three(fabric)
    v6 = make_port(fabric, "fd00::2")
    fabric.set_faults(corrupt=1.0)
    to_b: list[bytes] = []
    to_v6: list[bytes] = []
    for psn in range(300):
        for vlan in (None, 7):
            f = make_frame(a, b, psn=psn, payload=bytes(range(psn % 50)), vlan=vlan)
            to_b.append(f)
            fabric.transmit(a, f)
        f = make_frame("fd00::1", v6, psn=psn, payload=b"x" * (psn % 9))
        to_v6.append(f)
        fabric.transmit(a, f)
    fabric.loop.run()
    assert fabric.stats.corrupted == fabric.stats.delivered == len(to_b) + len(to_v6)
    icrc_errors = 0
    for o, f in zip(to_b + to_v6, b.frames + v6.frames, strict=True):
        # exactly one bit differs, after the Ethernet header
        assert len(o) == len(f)
        diff = [(i, x ^ y) for i, (x, y) in enumerate(zip(o, f, strict=True)) if x != y]
        assert len(diff) == 1 and bin(diff[0][1]).count("1") == 1
        assert diff[0][0] >= 14 + (4 if o[12:14] == b"\x81\x00" else 0)
        try:
            decode_roce_v2(f)
        except IcrcError:
            icrc_errors += 1
        except RejectedPacket:
            pass
        else:
            pytest.fail(f"corrupted frame decoded: byte {diff[0][0]} mask {diff[0][1]:#x}")
    assert icrc_errors > len(to_b) // 2  # most bits are in the ICRC-covered part


@st.composite
def roce_frames(draw: st.DrawFn) -> RoceFrame:
    """Any RoCEv2 frame between 10.0.0.1 / fd00::1 and the port at 10.0.0.2 / fd00::2."""
    v6 = draw(st.booleans())
    return RoceFrame.build(
        draw(packets(max_payload=64)),
        "fd00::1" if v6 else "10.0.0.1",
        "fd00::2" if v6 else "10.0.0.2",
        draw(u(16)),
        vlan_tci=draw(st.none() | u(16)),
        tos=draw(u(8)),
        ttl=draw(u(8)),
        ip_id=0 if v6 else draw(u(16)),
        flow_label=draw(u(20)) if v6 else 0,
        udp_checksum=draw(st.booleans()),
        trailer=draw(st.sampled_from([b"", bytes(6), b"\xff" * 3])),
    )


@settings(max_examples=300, deadline=None)
@given(roce_frames(), st.integers(0, 2**32))
def test_property_corrupted_frames_never_decode(frame: RoceFrame, seed: int) -> None:
    fabric = Fabric(seed=seed, faults=Faults(corrupt=1.0))
    a = make_port(fabric, "10.0.0.1")
    b = make_port(fabric, "10.0.0.2")
    fabric.add_address(b, "fd00::2")
    raw = frame.encode()
    decode_roce_v2(raw)
    fabric.transmit(a, raw)
    fabric.loop.run()
    ((_, bad),) = b.received
    assert bad != raw and len(bad) == len(raw)
    with pytest.raises(RejectedPacket):
        decode_roce_v2(bad)


def test_per_direction_overrides() -> None:
    fabric = Fabric(seed=2)
    a, b, c = three(fabric)
    fabric.set_faults(a, b, drop=1.0)
    assert fabric.faults_between(a, b).drop == 1.0
    assert fabric.faults_between("10.0.0.2", "10.0.0.1") == Faults()
    for s, d in ((a, b), (b, a), (a, c), (c, b)):
        fabric.transmit(s, make_frame(s, d, psn=1))
    fabric.loop.run()
    assert [p.psns() for p in (a, b, c)] == [[1], [1], [1]]  # all but a -> b
    assert fabric.stats.dropped == 1
    # wildcards: everything to c, with a more specific override winning
    fabric.set_faults(None, c, duplicate=1.0)
    fabric.set_faults("10.0.0.2", "10.0.0.3")  # b -> c: no faults
    fabric.transmit(a, make_frame(a, c, psn=2))
    fabric.transmit(b, make_frame(b, c, psn=3))
    fabric.loop.run()
    assert c.psns()[1:] == [2, 2, 3]
    # an override replaces the fabric-wide rates; clearing it restores them
    fabric.set_faults(drop=1.0)
    fabric.transmit(b, make_frame(b, c, psn=4))  # (b, c) override: delivered
    fabric.transmit(b, make_frame(b, a, psn=5))  # fabric-wide: dropped
    fabric.loop.run()
    assert c.psns()[-1] == 4 and a.psns() == [1]
    fabric.clear_faults(b, c)
    fabric.clear_faults(a, b)
    assert fabric.faults_between(b, c).duplicate == 1.0  # (*, c) now applies
    fabric.clear_faults()
    assert fabric.faults == Faults() and fabric.faults_between(a, b) == Faults()
    fabric.clear_all_faults()
    assert fabric.faults_between(b, c) == Faults()
    with pytest.raises(FabricError, match="probability"):
        fabric.set_faults(a, b, drop=1.5)
    with pytest.raises(FabricError, match="reorder_delay"):
        Faults(reorder_delay=-1.0)


def test_drop_when_loses_exactly_one_packet() -> None:
    fabric = Fabric()
    a, b, _ = three(fabric)
    flt = fabric.drop_when(lambda f: decode_roce_v2(f).packet.bth.psn == 3, count=1)
    assert fabric.stats.dropped == 0
    assert flt.active
    blast(fabric, 10, a, b)
    fabric.transmit(a, make_frame(a, b, psn=3))  # the filter is gone
    fabric.loop.run()
    assert b.psns() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 3]
    assert flt.dropped == 1 and fabric.stats.dropped == 1
    assert flt.remaining == 0
    assert [x.active for x in (flt,)] == [False]  # removed itself (list: mypy narrowing)
    # without a count: until removed
    every_odd = fabric.drop_when(lambda f: decode_roce_v2(f).packet.bth.psn % 2 == 1)
    b.received.clear()
    blast(fabric, 6, a, b)
    assert b.psns() == [0, 2, 4] and every_odd.dropped == 3
    every_odd.remove()
    every_odd.remove()
    b.received.clear()
    blast(fabric, 4, a, b)
    assert b.psns() == [0, 1, 2, 3]
    with pytest.raises(FabricError):
        fabric.drop_when(lambda f: True, count=0)


# --- determinism ----------------------------------------------------------------------


def _trace(seed: int, extra_traffic: bool = False) -> list[tuple[str, float, bytes]]:
    fabric = Fabric(seed=seed)
    a, b, c = three(fabric)
    fabric.set_faults(drop=0.1, duplicate=0.1, reorder=0.2, corrupt=0.1)
    for psn in range(300):
        fabric.transmit(a, make_frame(a, b, psn=psn, payload=bytes(psn % 100)))
        fabric.transmit(b, make_frame(b, a, psn=psn))
        if extra_traffic:
            # told apart by length (corruption may hit the addresses)
            fabric.transmit(c, make_frame(c, b, psn=psn, payload=bytes(500)))
        fabric.loop.run(until=fabric.loop.now + 1e-6)
    fabric.loop.run()
    return sorted(
        [(str(p.ip), t, f) for p in (a, b) for t, f in p.received if len(f) < 500],
        key=lambda r: (r[1], r[0]),
    )


def test_same_seed_same_deliveries_different_seed_differs() -> None:
    t1 = _trace(42)
    assert t1 == _trace(42)  # bit for bit, times included
    assert t1 != _trace(43)
    # each direction has its own random stream: other traffic does not change it
    a_to_b = [r[2] for r in t1 if r[0] == "10.0.0.2"]
    with_c = [r[2] for r in _trace(42, extra_traffic=True) if r[0] == "10.0.0.2"]
    assert a_to_b == with_c


def test_reseed() -> None:
    fabric = Fabric(seed=1)
    a, b, _ = three(fabric)
    fabric.set_faults(drop=0.5)
    blast(fabric, 100, a, b)
    first = b.psns()
    fabric.reseed(1)
    b.received.clear()
    blast(fabric, 100, a, b)
    assert b.psns() == first and fabric.seed == 1


def test_fabric_shares_a_given_loop() -> None:
    loop = SimLoop()
    fabric = Fabric(loop)
    assert fabric.loop is loop and "Fabric" in repr(fabric)
