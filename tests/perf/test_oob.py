"""perftest's out-of-band exchange (:mod:`softrdma.perf.oob`) against the
TCP payloads of real ``ib_write_bw``, ``ib_read_bw`` and ``ib_atomic_bw``
runs between two Linux rxe hosts: each role, fed the other side's
recorded bytes, writes exactly what the real tool wrote."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softrdma.perf.oob import (
    DONE,
    KEY_MSG_SIZE,
    BwReport,
    Checkpoint,
    Finished,
    MtuAgreed,
    OobError,
    OobExchange,
    PingpongDest,
    RemoteDest,
    ReportReceived,
    Role,
    SysData,
    VersionReceived,
)
from softrdma.perf.params import TOOLS, Tool
from tests.perf.oob_capture import Segment, tcp_segments

CAPTURED = {"write_bw.pcap": "write_bw", "read_bw.pcap": "read_bw", "atomic_bw.pcap": "atomic_bw"}
GID_A = bytes(10) + b"\xff\xff" + bytes([10, 77, 0, 1])
GID_B = bytes(10) + b"\xff\xff" + bytes([10, 77, 0, 2])


def _first_key(segs: list[Segment], client: bool) -> PingpongDest:
    return PingpongDest.unpack(
        next(s.data for s in segs if s.client == client and len(s.data) == KEY_MSG_SIZE)
    )


def _report_words(segs: list[Segment], client: bool) -> list[bytes]:
    return [s.data for s in segs if s.client == client and len(s.data) == 8]


def replay_role(
    tool: Tool, role: Role, segs: list[Segment], report: BwReport | None
) -> tuple[bytes, list[object]]:
    """Run one role against the other side's recorded segments; what it
    wrote and the events it gave."""
    client = role == Role.CLIENT
    ex = OobExchange(tool, role, [_first_key(segs, client)], mtu=3)
    events: list[object] = list(ex.start())
    sent = bytearray(ex.data_to_send())
    for seg in (s for s in segs if s.client != client):
        _settle(ex, report, events, sent)
        events += ex.receive_data(seg.data)
        sent += ex.data_to_send()
        _settle(ex, report, events, sent)
    return bytes(sent), events


def _settle(
    ex: OobExchange, report: BwReport | None, events: list[object], sent: bytearray
) -> None:
    """Resume at every checkpoint until the exchange waits for bytes."""
    while ex.waiting is not None:
        events += ex.resume(report if ex.waiting == "report" else None)
        sent += ex.data_to_send()


@pytest.mark.parametrize("capture", sorted(CAPTURED))
def test_client_writes_what_perftest_wrote(capture: str) -> None:
    segs = tcp_segments(capture)
    tool = TOOLS[CAPTURED[capture]]
    report = BwReport.from_words(_report_words(segs, True))
    assert (report.size == 8 and tool.name == "atomic_bw") or report.size == 8192
    assert report.iters == 20 and report.sane and report.bw_avg > 0
    sent, events = replay_role(tool, Role.CLIENT, segs, report)
    want = b"".join(s.data for s in segs if s.client)
    assert sent == want
    assert [e for e in events if isinstance(e, VersionReceived)] == [VersionReceived("6.06")]
    assert SysData(4096, 64) in events and MtuAgreed(3) in events
    dests = [e for e in events if isinstance(e, RemoteDest)]
    assert [d.first for d in dests] == [True, False, False, False, False]
    assert dests[0].dest == _first_key(segs, False) and dests[0].dest.gid == GID_A
    checkpoints = [e.name for e in events if isinstance(e, Checkpoint)]
    assert checkpoints == ["setup", "connect", "run", "report"]
    got = [e.report for e in events if isinstance(e, ReportReceived)]
    assert len(got) == 1 and got[0].words() == _report_words(segs, False)
    assert isinstance(events[-1], Finished)


@pytest.mark.parametrize("capture", sorted(CAPTURED))
def test_server_writes_what_perftest_wrote(capture: str) -> None:
    """Byte for byte but for the server's own five report words, which a
    bookworm server sends from uninitialised memory (they are not numbers
    it measured: e.g. 0x00007fff5bf470b4 as its "size"); ours carry its size
    and iteration count and zero rates, and are checked for their sizes."""
    segs = tcp_segments(capture)
    tool = TOOLS[CAPTURED[capture]]
    mine = BwReport(0, 0, 0.0, 0.0, 0.0)
    sent, events = replay_role(tool, Role.SERVER, segs, mine)
    theirs = [s.data for s in segs if not s.client]
    words = {i for i, d in enumerate(theirs) if len(d) == 8}
    assert len(words) == 5
    ours = b"".join(mine.words())
    want = b"".join(d if i not in words else b"" for i, d in enumerate(theirs))
    cut = sum(len(d) for i, d in enumerate(theirs) if i < min(words))
    assert sent[:cut] + sent[cut + 40 :] == want
    assert sent[cut : cut + 40] == ours
    client_report = BwReport.from_words(_report_words(segs, True))
    assert [e.report for e in events if isinstance(e, ReportReceived)] == [client_report]
    assert sent.endswith(DONE)
    assert not BwReport.from_words([d for i, d in enumerate(theirs) if i in words]).size < 1 << 32


def _run_pair(tool: Tool, qps: int = 1) -> tuple[list[object], list[object], bytes, bytes]:
    """Two exchanges wired to each other, resuming at every checkpoint."""
    c = OobExchange(tool, Role.CLIENT, [_dest(GID_B, i) for i in range(qps)], mtu=5)
    s = OobExchange(tool, Role.SERVER, [_dest(GID_A, i + 0x40) for i in range(qps)], mtu=3)
    ce: list[object] = list(c.start())
    se: list[object] = list(s.start())
    c_wire, s_wire = bytearray(), bytearray()
    for _ in range(1000):
        progressed = False
        for ex, evs in ((c, ce), (s, se)):
            if ex.waiting is not None:
                evs += ex.resume(BwReport(8, 20, 1.0, 1.0, 0.1) if ex.waiting == "report" else None)
                progressed = True
        out = c.data_to_send()
        if out:
            c_wire += out
            se += s.receive_data(out)
            progressed = True
        out = s.data_to_send()
        if out:
            s_wire += out
            ce += c.receive_data(out)
            progressed = True
        if not progressed:
            break
    return ce, se, bytes(c_wire), bytes(s_wire)


def _dest(gid: bytes, qpn: int) -> PingpongDest:
    return PingpongDest(0, 1, qpn, 0x123456, 0x1000 + qpn, 0x7F00_0000_0000 + qpn, gid)


@pytest.mark.parametrize("name", sorted(TOOLS))
@pytest.mark.parametrize("qps", [1, 3])
def test_both_roles_agree(name: str, qps: int) -> None:
    """Every tool's script runs to the end on both sides, with the same
    message count each way; the MTU is the smaller one."""
    ce, se, cw, sw = _run_pair(TOOLS[name], qps)
    assert isinstance(ce[-1], Finished) and isinstance(se[-1], Finished), (ce, se)
    assert MtuAgreed(3) in ce and MtuAgreed(3) in se
    assert len(cw) == len(sw)
    rem = [e.dest.qpn for e in ce if isinstance(e, RemoteDest) and e.first]
    assert rem == [0x40 + i for i in range(qps)]
    closes = {"write_lat": False}.get(name, True)
    assert cw.endswith(DONE) == closes


def test_key_line_layout() -> None:
    d = PingpongDest(0, 0x80, 0x11, 0x237E20, 0x27B, 0x5585BC2AC000, GID_B)
    raw = d.pack()
    assert len(raw) == 108 and raw[107] == 0 and raw[106:107] == b":"
    assert raw.startswith(b"0000:0080:000011:237e20:0000027b:00005585bc2ac000:00:00:")
    assert PingpongDest.unpack(raw) == d


@given(
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFF),
    st.integers(0, 0xFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 64) - 1),
    st.binary(min_size=16, max_size=16), st.integers(0, 0xFFFFFFFF),
)  # fmt: skip
def test_key_line_round_trip(
    lid: int, out: int, qpn: int, psn: int, rkey: int, va: int, gid: bytes, srqn: int
) -> None:
    d = PingpongDest(lid, out, qpn, psn, rkey, va, gid, srqn)
    assert PingpongDest.unpack(d.pack()) == d


@given(st.floats(allow_nan=False), st.floats(allow_nan=False), st.integers(0, (1 << 64) - 1))
def test_report_round_trip(a: float, b: float, n: int) -> None:
    r = BwReport(n, n, a, b, a)
    assert BwReport.from_words(r.words()) == r
    assert r.sane == (all(math.isfinite(x) and x >= 0 for x in (a, b)))


def _client_until_version() -> OobExchange:
    c = OobExchange(TOOLS["write_bw"], Role.CLIENT, [_dest(GID_B, 1)])
    c.start()
    assert c.data_to_send() == b"6.06".ljust(16, b"\0")
    return c


@pytest.mark.parametrize("version", [b"5.60", b"4.5", b"abc", b""])
def test_old_or_bad_version(version: bytes) -> None:
    c = _client_until_version()
    with pytest.raises(OobError) as e:
        c.receive_data(version.ljust(16, b"\0"))
    assert e.value.message == (
        "Current implementation is not compatible with versions older than 5.70"
    )
    assert e.value.status == 1


def test_newer_version_accepted() -> None:
    c = _client_until_version()
    assert c.receive_data(b"6.29".ljust(16, b"\0")) == [VersionReceived("6.29")]


def test_disconnect_mid_exchange() -> None:
    c = _client_until_version()
    c.receive_data(b"6.06".ljust(16, b"\0"))
    c.data_to_send()
    c.receive_data(b"\0\0")  # half the page size
    assert c.partial
    with pytest.raises(OobError) as e:
        c.receive_data(b"")
    assert e.value.message == " Failed to exchange Page Size data between server and client"


def test_short_key_line() -> None:
    s = OobExchange(TOOLS["read_bw"], Role.SERVER, [_dest(GID_A, 1)])
    s.start()
    for msg in (b"6.06".ljust(16, b"\0"), b"\0\0\x10\0", b"\0\0\0@", b"3\0"):
        s.receive_data(msg)
    assert s.waiting == "setup"
    s.resume()
    s.receive_data(b"0000:0080:000011")
    with pytest.raises(OobError) as e:
        s.short_read()
    assert e.value.message == (
        "ethernet_read_keys: Couldn't read remote address\n"
        " Failed to exchange data between server and clients"
    )


def test_garbled_key_line() -> None:
    s = OobExchange(TOOLS["read_bw"], Role.SERVER, [_dest(GID_A, 1)])
    s.start()
    for msg in (b"6.06".ljust(16, b"\0"), b"\0\0\x10\0", b"\0\0\0@", b"3\0"):
        s.receive_data(msg)
    assert s.waiting == "setup"
    s.resume()
    with pytest.raises(OobError) as e:
        s.receive_data(b"x" * 108)
    assert e.value.message.startswith("Couldn't parse line <xxx")


def test_gid_type_mismatch() -> None:
    s = OobExchange(TOOLS["write_bw"], Role.SERVER, [_dest(GID_A, 1)])
    s.start()
    for msg in (b"6.06".ljust(16, b"\0"), b"\0\0\x10\0", b"\0\0\0@", b"3\0"):
        s.receive_data(msg)
    assert s.waiting == "setup"
    s.resume()
    v6 = bytes.fromhex("fe80000000000000505400fffe770002")
    with pytest.raises(OobError) as e:
        s.receive_data(_dest(v6, 7).pack())
    assert "Found Incompatibility issue with GID types." in e.value.message
    assert "Please Try to use a different IP version." in e.value.message
