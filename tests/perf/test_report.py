"""What ``softrdma perf`` prints, against lines perftest 6.06 printed on
Linux rxe (the interop runs), and the numbers behind them."""

from __future__ import annotations

import io
import math

import pytest

from softrdma.perf.engine_bw import BwSamples
from softrdma.perf.oob import BwReport, PingpongDest
from softrdma.perf.params import TOOLS, PerfParams, Verb
from softrdma.perf.report import (
    RESULT_LINE,
    ResultRow,
    bw_header,
    bw_line,
    bw_report,
    c_hex,
    info_block,
    lat_header,
    lat_line,
    lat_result,
    make_progress,
    pingpong_data,
    write_csv,
)

GID_A = bytes(10) + b"\xff\xff" + bytes([10, 77, 0, 1])

#: ib_atomic_bw's server on rxe (perftest 6.06), its info block
ATOMIC_SERVER = """\
---------------------------------------------------------------------------------------
                    Atomic FETCH_AND_ADD BW Test
 Dual-port       : OFF\t\tDevice         : rxe0
 Number of qps   : 1\t\tTransport type : IB
 Connection type : RC\t\tUsing SRQ      : OFF
 PCIe relax order: ON
 ibv_wr* API     : OFF
 CQ Moderation   : 20
 Mtu             : 1024[B]
 Link type       : Ethernet
 GID index       : 1
 Outstand reads  : 128
 rdma_cm QPs\t : OFF
 Data ex. method : Ethernet
---------------------------------------------------------------------------------------"""


def test_info_block_as_perftest_prints_it() -> None:
    p = PerfParams.build(TOOLS["atomic_bw"], iters=20)
    assert "\n".join(info_block(p, "rxe0", 1024, 1)) == ATOMIC_SERVER
    c = PerfParams.build(TOOLS["atomic_bw"], iters=20, servername="10.77.0.1")
    lines = info_block(c, "rxe0", 1024, 1)
    assert lines[lines.index(" ibv_wr* API     : OFF") + 1] == " TX depth        : 20"


def test_address_lines() -> None:
    d = PingpongDest(0, 0x80, 0x17, 0x41BDCE, 0x819, 0x5583DF398000, GID_A)
    assert pingpong_data("local", d, Verb.ATOMIC) == [
        " local address: LID 0000 QPN 0x0017 PSN 0x41bdce",
        " GID: 00:00:00:00:00:00:00:00:00:00:255:255:10:77:00:01",
    ]
    assert pingpong_data("remote", d, Verb.READ)[0] == (
        " remote address: LID 0000 QPN 0x0017 PSN 0x41bdce OUT 0x80 RKey 0x000819"
        " VAddr 0x005583df398000"
    )
    assert pingpong_data("local", d, Verb.WRITE)[0].endswith("RKey 0x000819 VAddr 0x005583df398000")
    d2 = PingpongDest(0, 1, 0x11, 0xD0264, 0x2D8, 0, GID_A)
    assert (
        pingpong_data("local", d2, Verb.SEND)[0]
        == " local address: LID 0000 QPN 0x0011 PSN 0xd0264"
    )


def test_c_hex() -> None:
    assert [c_hex(0, 4), c_hex(0x11, 6), c_hex(0xD0264, 6), c_hex(0x80, 4)] == [
        "0000", "0x0011", "0xd0264", "0x80",
    ]  # fmt: skip


def test_bw_lines() -> None:
    assert bw_header(False) == (
        " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]"
    )
    assert "Gb/sec" in bw_header(True)
    # ib_atomic_bw's line, as perftest 6.06 printed it
    line = bw_line(BwReport(8, 20, 0.01, 0.01, 0.001764), False)
    assert line == " 8          20               0.01               0.01   \t\t   0.001764"
    # REPORT_FMT_EXT: more digits below 0.1 Gb/s
    assert bw_line(BwReport(8, 20, 0.05, 0.04, 0.0053), True).split()[2] == "0.050000"
    assert len(RESULT_LINE) == 87


def test_bw_numbers() -> None:
    """MB is 2**20 bytes; the average runs from the first post to the last
    completion; Gb/s are 10**9 bits."""
    s = BwSamples(65536, 16, 1)
    s.tposted = [0.0 + i * 0.001 for i in range(16)]
    s.tcompleted = [0.1 + i * 0.01 for i in range(16)]
    r = bw_report(s, False)
    span = s.tcompleted[-1]
    assert r.bw_avg == pytest.approx(65536 * 16 / span / 2**20)
    assert r.msg_rate == pytest.approx(16 / span / 1e6)
    assert r.bw_peak >= r.bw_avg
    g = bw_report(s, True)
    assert g.bw_avg == pytest.approx(65536 * 16 * 8 / span / 1e9)
    recv = BwSamples(4096, 4, 1, [0.0], [0.1, 0.2, 0.3, 0.4])
    assert bw_report(recv, False).bw_peak == 0.0  # perftest's receiver prints 0.00


def test_latency_numbers_and_line() -> None:
    posts = [0.0, 10e-6, 30e-6, 40e-6, 80e-6]  # round trips 10, 20, 10, 40 us
    w = lat_result(2, 5, posts, Verb.WRITE)  # halved
    assert (w.t_min, w.t_max, w.t_typical) == pytest.approx((5.0, 20.0, 7.5))
    assert w.t_avg == pytest.approx(10.0)
    assert w.t_stdev == pytest.approx(math.sqrt(((5 - 10) ** 2 * 2 + 0 + 10**2) / 4))
    r = lat_result(2, 5, posts, Verb.READ)  # not halved
    assert r.t_min == pytest.approx(10.0) and r.p99 == pytest.approx(40.0)
    assert lat_header().startswith(" #bytes #iterations    t_min[usec]    t_max[usec]")
    assert lat_line(w).startswith(" 2       5          5.00           20.00        7.50   ")


def test_csv_and_progress() -> None:
    out = io.StringIO()
    write_csv([ResultRow.from_bw("write_bw", BwReport(2, 5, 1.0, 0.5, 0.25), False)], out)
    head, row = out.getvalue().splitlines()
    assert head.startswith("test,size,iters,bw_peak,bw_avg,msg_rate_mpps,bw_unit")
    assert row.startswith("write_bw,2,5,1.0,0.5,0.25,MB/sec")
    assert make_progress(10, "x", io.StringIO()) is None  # not a terminal: no bar

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    pytest.importorskip("tqdm")
    tty = Tty()
    advance = make_progress(4, "write_bw", tty)
    assert advance is not None
    advance(2)
    advance(2)
    assert "write_bw" in tty.getvalue()
