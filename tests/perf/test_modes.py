"""``softrdma perf``'s other modes against itself over loopback UDP: UD
send tests (``-c UD``), ``--bidirectional`` BW tests, ``-D`` duration runs
for send_bw and the latency tools, and perftest's separator line for READ
and atomic tests; with perftest's messages for what they refuse."""

from __future__ import annotations

import io
import re

import pytest

from softrdma.cli import build_parser, perf
from softrdma.perf.oob import (
    PINGPONG_DEST_SIZE,
    BwReport,
    Checkpoint,
    Finished,
    OobExchange,
    PingpongDest,
    Role,
)
from softrdma.perf.params import RESULT_LINE, TOOLS, ParamError, PerfParams, Verb, all_sizes
from softrdma.perf.report import duplex_report, info_block, lat_duration_header, lat_duration_line
from tests.perf.runs import addresses, in_process, result_lines, two_processes

LAT_DUR = re.compile(r"^ (\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s*$", re.M)


def _dur_lines(text: str) -> list[tuple[int, int, float, float]]:
    return [
        (int(m.group(1)), int(m.group(2)), float(m.group(3)), float(m.group(4)))
        for m in LAT_DUR.finditer(text)
    ]


# --- UD ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "size", "iters"), [("send_bw", 1024, 40), ("send_bw", 4096, 20), ("send_lat", 64, 30)]
)
def test_ud_in_process(tool: str, size: int, iters: int) -> None:
    r = in_process(tool, size=size, iters=iters, connection="UD", rx_depth=iters)
    lat = tool.endswith("_lat")
    for out in (r.server_out, r.client_out):
        assert " Connection type : UD\t\tUsing SRQ      : OFF" in out
        (line,) = result_lines(out, lat)
        assert (line.size, line.iters) == (size, iters), out
    a, b = addresses(r.server_out), addresses(r.client_out)
    assert a["local"] == b["remote"] and a["remote"] == b["local"]
    # UD key lines carry no RKey / VAddr, as perftest prints SEND's
    assert a["local"][-2:] == (None, None)
    # every message arrived: the receiver counted them all
    assert result_lines(r.server_out, lat)[0].numbers[2 if not lat else 0] > 0


def test_ud_two_processes() -> None:
    server, client = two_processes("send_bw", "-c", "UD", "-s", "512", "-n", "30")
    assert server.returncode == 0, server.stderr
    assert client.returncode == 0, client.stderr
    for out in (server.stdout, client.stdout):
        (line,) = result_lines(out, False)
        assert (line.size, line.iters) == (512, 30)


def test_ud_sweep_stops_at_the_mtu() -> None:
    """``-a`` on UD runs the sizes up to the agreed MTU, one sync each."""
    r = in_process("send_bw", run_all=True, iters=8, connection="UD", mtu=1024)
    for out in (r.server_out, r.client_out):
        sizes = [(ln.size, ln.iters) for ln in result_lines(out, False)]
        assert sizes == [(1 << i, 8) for i in range(1, 11)], out


def test_ud_message_over_the_mtu() -> None:
    """perftest's check_mtu error, on both sides, exit status 1."""
    server, client = two_processes("send_bw", "-c", "UD", "-s", "2048", "-n", "10", "-m", "1024")
    message = (
        " Max message size in UD cannot be greater than MTU \n"
        " Couldn't get context for the device\n"
    )
    assert client.returncode == 1 and client.stderr.endswith(message), client.stderr
    assert server.returncode == 1, server.stderr


def test_ud_limit_to_mtu() -> None:
    p = PerfParams.build(TOOLS["send_lat"], connection="ud", run_all=True)
    p.limit_to_mtu(256)
    assert p.sizes == [2, 4, 8, 16, 32, 64, 128, 256] and p.max_size == 256
    q = PerfParams.build(TOOLS["send_bw"], connection="UD", size=300)
    with pytest.raises(ParamError):
        q.limit_to_mtu(256)
    rc = PerfParams.build(TOOLS["send_bw"], size=300)
    rc.limit_to_mtu(256)  # RC messages span packets
    assert rc.size == 300


def test_ud_buffer_holds_the_grh() -> None:
    p = PerfParams.build(TOOLS["send_bw"], connection="UD", size=4096)
    assert p.buff_size == 4096 + 40


# --- bidirectional ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "kw"),
    [
        ("write_bw", {"size": 4096, "iters": 40}),
        ("read_bw", {"size": 8192, "iters": 20}),
        ("atomic_bw", {"iters": 30}),
        ("send_bw", {"size": 2048, "iters": 40, "rx_depth": 16}),
    ],
)
def test_bidirectional_in_process(tool: str, kw: dict[str, int]) -> None:
    r = in_process(tool, duplex=True, **kw)
    title = TOOLS[tool].title.replace(" BW Test", " Bidirectional BW Test")
    size = kw.get("size", 8)
    for out in (r.server_out, r.client_out):
        assert f"                    {title}\n" in out
        assert " TX depth        : " in out  # both sides send
        (line,) = result_lines(out, False)
        assert (line.size, line.iters) == (size, kw["iters"]), out
        assert min(line.numbers) > 0
    # both print both directions summed: the same line
    assert result_lines(r.server_out, False) == result_lines(r.client_out, False)
    mine, theirs = r.client.rows[0], r.server.rows[0]
    assert mine == theirs
    assert r.client.remote_report is not None and r.server.remote_report is not None
    assert r.client.remote_report.bw_avg > 0 and r.server.remote_report.bw_avg > 0


def test_bidirectional_two_processes() -> None:
    server, client = two_processes("write_bw", "--bidirectional", "-s", "8192", "-n", "30")
    assert server.returncode == 0, server.stderr
    assert client.returncode == 0, client.stderr
    assert result_lines(server.stdout, False) == result_lines(client.stdout, False)
    (line,) = result_lines(client.stdout, False)
    assert (line.size, line.iters) == (8192, 30)


def test_duplex_report_sums_both_directions() -> None:
    a, b = BwReport(64, 5, 1.0, 0.5, 0.25), BwReport(64, 7, 0.5, 0.125, 0.5)
    assert duplex_report(a, b) == BwReport(64, 5, 1.5, 0.625, 0.75)  # this side's iterations
    assert duplex_report(b, a) == BwReport(64, 7, 1.5, 0.625, 0.75)


def _pair(duplex: bool, rounds: int) -> tuple[list[str], list[str], int]:
    """A write_bw exchange pair: the checkpoints each side met and the
    number of report swaps."""
    gid = bytes(10) + b"\xff\xff\x0a\x00\x00\x01"
    t = TOOLS["write_bw"]
    dest = PingpongDest(0, 1, 0x11, 1, 2, 3, gid)
    c = OobExchange(t, Role.CLIENT, [dest], rounds=rounds, duplex=duplex)
    s = OobExchange(t, Role.SERVER, [dest], rounds=rounds, duplex=duplex)
    seen: dict[Role, list[str]] = {Role.CLIENT: [], Role.SERVER: []}
    reports = 0
    pending = {Role.CLIENT: list(c.start()), Role.SERVER: list(s.start())}
    for _ in range(2000):
        moved = False
        for ex in (c, s):
            for ev in pending[ex.role]:
                if isinstance(ev, Checkpoint):
                    seen[ex.role].append(ev.name)
            pending[ex.role] = []
            if ex.waiting is not None:
                rep = BwReport(8, 5, 1.0, 1.0, 0.1) if ex.waiting == "report" else None
                pending[ex.role] = list(ex.resume(rep))
                moved = True
        for src, dst in ((c, s), (s, c)):
            data = src.data_to_send()
            if data:
                evs = dst.receive_data(data)
                reports += sum(1 for e in evs if type(e).__name__ == "ReportReceived")
                pending[dst.role] += evs
                moved = True
        if not moved:
            break
    assert c.finished and s.finished
    assert any(isinstance(e, Finished) for e in pending[Role.CLIENT] + pending[Role.SERVER]) or (
        c.finished and s.finished
    )
    return seen[Role.CLIENT], seen[Role.SERVER], reports


@pytest.mark.parametrize("rounds", [0, 3])
def test_duplex_exchange(rounds: int) -> None:
    """``--bidirectional``: both sides run every size and swap reports after
    each (with ``-a``, one sync before and one after each size)."""
    cc, sc, reports = _pair(True, rounds)
    n = max(rounds, 1)
    assert cc.count("run") == sc.count("run") == n
    assert cc.count("report") == sc.count("report") == n
    assert reports == 2 * n
    c1, s1, r1 = _pair(False, 0)
    assert c1.count("run") == s1.count("run") == 1 and r1 == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["write_lat", "--bidirectional"],
         " Bidirectional is only available in BW test\n Parser function exited with Error"),
        (["send_lat", "-c", "UD", "-b"],
         " Bidirectional is only available in BW test\n Parser function exited with Error"),
        (["write_bw", "-c", "UD"], " UD connection only possible in SEND verb"),
        (["read_lat", "-c", "UD"], " UD connection only possible in SEND verb"),
    ],
)  # fmt: skip
def test_refused(args: list[str], message: str) -> None:
    parser = build_parser()
    ns = parser.parse_args(["perf", *args])
    out, err = io.StringIO(), io.StringIO()
    assert perf.run(ns, parser, out, err) == 1
    assert err.getvalue().rstrip("\n") == message and out.getvalue() == ""


# --- duration ---------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["write_lat", "send_lat", "read_lat"])
def test_duration_latency(tool: str) -> None:
    r = in_process(tool, duration=1, size=32)
    for who, out in (("server", r.server_out), ("client", r.client_out)):
        if tool == "read_lat" and who == "server":
            assert _dur_lines(out) == [] and "t_avg" not in out
            continue
        assert lat_duration_header() in out
        ((size, iters, t_avg, tps),) = _dur_lines(out)
        assert size == 32 and iters > 0 and t_avg > 0 and tps > 0, out
        # the average is the run over its ping-pongs, a round trip halved
        rtt = 1 if tool == "read_lat" else 2
        assert tps == pytest.approx(1e6 / (t_avg * rtt), rel=0.02)


def test_duration_send_bw() -> None:
    r = in_process("send_bw", duration=1, size=256)
    got = {}
    for who, out in (("server", r.server_out), ("client", r.client_out)):
        (line,) = result_lines(out, False)
        assert line.size == 256 and line.iters > 0, out
        assert line.numbers[0] == 0.0 and line.numbers[1] > 0  # no peak in -D runs
        got[who] = line.iters
    # the server counts what came in its own second, which is about what was sent
    assert got["server"] <= got["client"] + 512


def test_duration_two_processes() -> None:
    server, client = two_processes("send_lat", "-D", "1", "-s", "16", "-n", "5")
    assert server.returncode == 0, server.stderr
    assert client.returncode == 0, client.stderr
    for out in (server.stdout, client.stdout):
        ((size, iters, _, _),) = _dur_lines(out)
        assert size == 16 and iters > 5  # -n is ignored with -D, as perftest does


def test_duration_line_format() -> None:
    """``REPORT_FMT_LAT_DUR`` as ib_write_lat -D printed it on rxe."""
    seconds = 566.52e-6 * 2 * 1769
    line = lat_duration_line(64, 1769, seconds, Verb.WRITE)
    assert line == " 64            1769            566.52         882.58 "
    read = lat_duration_line(64, 44251, 45.23e-6 * 44251, Verb.READ)
    assert read == " 64            44251            45.23          22109.22"


def test_duration_with_all_sizes() -> None:
    parser = build_parser()
    ns = parser.parse_args(["perf", "send_lat", "-D", "2", "-a"])
    out, err = io.StringIO(), io.StringIO()
    assert perf.run(ns, parser, out, err) == 1
    assert out.getvalue() == RESULT_LINE + "\n"
    assert err.getvalue() == "Duration mode currently doesn't support running on all sizes.\n"


# --- the separator line -----------------------------------------------------------------


@pytest.mark.parametrize(("tool", "extra"), [("read_bw", True), ("atomic_bw", True),
                                             ("write_bw", False)])  # fmt: skip
def test_separator_before_the_info_block(tool: str, extra: bool) -> None:
    """READ and atomic tests print one more dash line first (the server
    before its "Waiting for client" banner), as perftest does on rxe."""
    server, client = two_processes(tool, "-n", "10", "-s", "8" if tool == "atomic_bw" else "64")
    assert server.returncode == 0 and client.returncode == 0, (server.stderr, client.stderr)
    c_lines, s_lines = client.stdout.splitlines(), server.stdout.splitlines()
    assert (c_lines[:2] == [RESULT_LINE, RESULT_LINE]) == extra, client.stdout
    assert c_lines[2 if extra else 1].strip() == TOOLS[tool].title
    assert (s_lines[0] == RESULT_LINE) == extra, server.stdout
    assert s_lines[1 if extra else 0] == ""  # perftest's banner starts with a newline


def test_info_block_connection_type() -> None:
    p = PerfParams.build(TOOLS["send_lat"], connection="UD")
    assert " Connection type : UD\t\tUsing SRQ      : OFF" in info_block(p, "rxe0", 1024, 1)
    assert all_sizes(TOOLS["send_lat"])[-1] == 1 << 23


# --- the RDMA CM (-R, -z) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "opts", "size", "iters"),
    [
        ("write_bw", ("-R", "-s", "4096", "-n", "20"), 4096, 20),
        ("read_bw", ("-R", "-s", "8192", "-n", "20", "-o", "4"), 8192, 20),
        ("send_lat", ("-R", "-s", "64", "-n", "20"), 64, 20),
        ("send_bw", ("-z", "-s", "1024", "-n", "30"), 1024, 30),
    ],
)
def test_rdma_cm_two_processes(tool: str, opts: tuple[str, ...], size: int, iters: int) -> None:
    """``-R``: the QP connected by the RDMA CM and the exchange over a
    second CM connection (perftest 6.06's way); ``-z``: the exchange only."""
    server, client = two_processes(tool, *opts)
    assert server.returncode == 0, server.stderr
    assert client.returncode == 0, client.stderr
    work = "-R" in opts
    for out in (server.stdout, client.stdout):
        assert f" rdma_cm QPs\t : {'ON' if work else 'OFF'}\n" in out
        assert " Data ex. method : rdma_cm\n" in out
    assert (" Waiting for client rdma_cm QP to connect\n" in server.stdout) == work
    a, b = addresses(server.stdout), addresses(client.stdout)
    assert a["local"] == b["remote"] and a["remote"] == b["local"]
    assert a["local"][-2:] == (None, None)  # printed as SEND's: no RKey / VAddr
    lat = tool.endswith("_lat")
    (line,) = result_lines(client.stdout, lat)
    assert (line.size, line.iters) == (size, iters)


def test_rdma_cm_key_message() -> None:
    """``rdma_write_keys``'s binary struct: big-endian fields, 56 bytes."""
    gid = bytes(10) + b"\xff\xff\x0a\x4d\x00\x01"
    d = PingpongDest(0, 16, 0x11, 0x123456, 0x2FF, 0x5651_8515_5000, gid)
    raw = d.pack_binary(gid_index=1)
    assert len(raw) == PINGPONG_DEST_SIZE == 56
    assert raw[8:12] == b"\x00\x00\x00\x11" and raw[24:32] == bytes.fromhex("0000565185155000")
    assert raw[32:48] == gid and raw[52:56] == b"\x00\x00\x00\x01"
    assert PingpongDest.unpack_binary(raw + bytes(8)) == d


def test_rdma_cm_exchange_has_no_done() -> None:
    gid = bytes(10) + b"\xff\xff\x0a\x00\x00\x01"
    dest = PingpongDest(0, 1, 0x11, 1, 2, 3, gid)
    t = TOOLS["write_bw"]
    c = OobExchange(t, Role.CLIENT, [dest], rdma_cm=True)
    s = OobExchange(t, Role.SERVER, [dest], rdma_cm=True)
    c.start()
    s.start()
    sent: list[bytes] = []
    for _ in range(200):
        moved = False
        for ex in (c, s):
            if ex.waiting is not None:
                ex.resume(BwReport(8, 5, 1.0, 1.0, 0.1) if ex.waiting == "report" else None)
                moved = True
        for src, dst in ((c, s), (s, c)):
            for msg in src.messages_to_send():
                sent.append(msg)
                dst.receive_message(msg)
                moved = True
        if not moved:
            break
    assert c.finished and s.finished
    assert b"done\0" not in sent
    assert sorted({len(m) for m in sent}) == [2, 4, 8, 16, 56]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["send_bw", "-R", "-c", "UD"],
         " softrdma's RDMA CM connects RC QPs only: no -c UD with -R or -z"),
        (["write_bw", "-R", "-q", "2"], " -R connects one QP here: use -q 1"),
        (["write_bw", "-z"], " -R / -z: give the address to listen on (--ip or -d ADDR)"),
    ],
)  # fmt: skip
def test_rdma_cm_refused(args: list[str], message: str) -> None:
    parser = build_parser()
    ns = parser.parse_args(["perf", *args])
    out, err = io.StringIO(), io.StringIO()
    assert perf.run(ns, parser, out, err) == 1
    assert err.getvalue().rstrip("\n") == message and out.getvalue() == ""
