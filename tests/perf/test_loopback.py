"""``softrdma perf`` against itself over loopback UDP: every tool as two
processes, and in this process (``-a`` sweeps for write_bw and write_lat),
with sane results — the sizes and iterations asked for, positive rates —
and each side's remote address line equal to the other's local one."""

from __future__ import annotations

import csv
import io
import json
import socket
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from softrdma.cli.netdev import open_device
from softrdma.perf.context import PerfContext
from softrdma.perf.oob import BwReport, PingpongDest
from softrdma.perf.params import TOOLS, PerfParams, TestKind, all_sizes
from softrdma.verbs.enums import IbMtu
from tests.fabric.netaddr import free_tcp_port, loopback_addresses
from tests.perf.runs import (
    TIMEOUT,
    addresses,
    in_process,
    perf_argv,
    result_lines,
    spawned,
    two_processes,
    wait_listening,
)

#: (tool, options, size, iters)
CASES = [
    ("write_bw", ("-s", "8192", "-n", "40"), 8192, 40),
    ("read_bw", ("-s", "65536", "-n", "20"), 65536, 20),
    ("send_bw", ("-s", "4096", "-n", "60", "-r", "16"), 4096, 60),
    ("atomic_bw", ("-n", "50"), 8, 50),
    ("write_lat", ("-s", "64", "-n", "30"), 64, 30),
    ("read_lat", ("-s", "1024", "-n", "30"), 1024, 30),
    ("send_lat", ("-s", "16", "-n", "30"), 16, 30),
]


@pytest.mark.parametrize(("tool", "opts", "size", "iters"), CASES, ids=[c[0] for c in CASES])
def test_two_processes(tool: str, opts: tuple[str, ...], size: int, iters: int) -> None:
    server, client = two_processes(tool, *opts)
    assert server.returncode == 0, server.stderr
    assert client.returncode == 0, client.stderr
    a, b = addresses(server.stdout), addresses(client.stdout)
    assert a["local"] == b["remote"] and a["remote"] == b["local"]
    lat = TOOLS[tool].kind == TestKind.LAT
    for who, out in (("server", server.stdout), ("client", client.stdout)):
        lines = result_lines(out, lat)
        if tool == "read_lat" and who == "server":
            assert lines == []  # only the client measures
            continue
        assert len(lines) == 1, out
        (line,) = lines
        assert (line.size, line.iters) == (size, iters), out
        numbers = line.numbers
        if tool == "send_bw" and who == "server":
            assert numbers[0] == 0.0  # no post times on the receiver: peak 0.00, as perftest
            numbers = numbers[1:]
        assert all(x > 0 for x in numbers), out
        if lat:
            t_min, t_max, typical, avg, _, p99, p999 = line.numbers
            assert t_min <= typical <= t_max and t_min <= avg <= t_max
            assert typical <= p99 <= p999 <= t_max


def test_server_prints_the_clients_report() -> None:
    """write_bw's server measures nothing: it prints the client's report,
    which came over the exchange."""
    server, client = two_processes("write_bw", "-s", "4096", "-n", "30")
    assert server.returncode == client.returncode == 0, server.stderr + client.stderr
    assert result_lines(server.stdout, False) == result_lines(client.stdout, False)


def test_in_process_write_bw_sweep(tmp_path: Path) -> None:
    """``-a``: every size from 2 B to 8 MiB, the peer's VADDR and the data
    really written, the report of the last size sent to the server."""
    run = in_process("write_bw", run_all=True, iters=5)
    sizes = all_sizes(TOOLS["write_bw"])
    rows = run.client.rows
    assert [r.size for r in rows] == sizes and all(r.iters == 5 for r in rows)
    assert all(r.bw_avg and r.bw_avg > 0 and r.bw_peak and r.msg_rate_mpps for r in rows)
    lines = result_lines(run.client_out, False)
    assert [(x.size, x.iters) for x in lines] == [(s, 5) for s in sizes]
    assert run.server.remote_report is not None
    last = rows[-1]
    assert run.server.remote_report == BwReport(
        last.size, 5, last.bw_peak or 0, last.bw_avg or 0, last.msg_rate_mpps or 0
    )
    assert result_lines(run.server_out, False)[0].size == 1 << 23


def test_in_process_write_lat_sweep() -> None:
    run = in_process("write_lat", run_all=True, iters=5)
    sizes = all_sizes(TOOLS["write_lat"])
    for session, text in ((run.client, run.client_out), (run.server, run.server_out)):
        assert [r.size for r in session.rows] == sizes
        assert all(r.t_typical_us and r.t_typical_us > 0 for r in session.rows)
        assert [(x.size, x.iters) for x in result_lines(text, True)] == [(s, 5) for s in sizes]


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_in_process_every_tool(tool: str) -> None:
    run = in_process(tool, iters=12, num_qps=1)
    measured = run.client.rows + run.server.rows
    assert measured and all(r.iters == 12 for r in measured)


@pytest.mark.parametrize("tool", ["write_bw", "read_bw", "atomic_bw", "send_bw"])
def test_several_qps(tool: str) -> None:
    """``-q 3``: one key line per QP each way, every QP's work counted."""
    run = in_process(tool, iters=20, num_qps=3)
    a, b = run.server_out, run.client_out
    assert a.count(" local address:") == b.count(" remote address:") == 3
    (row,) = run.client.rows
    assert row.iters == 3 * 20  # every QP's, as perftest 6.06 reports
    assert row.msg_rate_mpps and row.msg_rate_mpps > 0


def test_cq_moderation_and_duration() -> None:
    run = in_process("write_bw", size=1024, iters=200, cq_mod=7, tx_depth=32)
    assert "CQ Moderation   : 7" in run.client_out and "TX depth        : 32" in run.client_out
    assert run.client.rows[0].iters == 200
    run = in_process("read_bw", size=2048, duration=1)
    (row,) = run.client.rows
    assert row.iters > 0 and row.bw_avg and row.bw_avg > 0


def test_gbits_csv_json_plot(tmp_path: Path) -> None:
    _, client = two_processes(
        "write_bw", "-s", "65536", "-n", "20", "--report_gbits",
        client_opts=("--csv", str(tmp_path / "r.csv"), "--json", "-",
                     "--plot", str(tmp_path / "r.png")),
    )  # fmt: skip
    assert client.returncode == 0, client.stderr
    assert "BW peak[Gb/sec]    BW average[Gb/sec]" in client.stdout
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert len(rows) == 1 and rows[0]["size"] == "65536" and rows[0]["bw_unit"] == "Gb/sec"
    doc = json.loads(client.stdout[client.stdout.index("{") :])
    assert doc["meta"]["test"] == "write_bw" and doc["results"][0]["iters"] == 20
    pytest.importorskip("matplotlib")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_and_swap() -> None:
    """``-A CMP_AND_SWAP``: the title says so and every swap completes."""
    run = in_process("atomic_bw", iters=10, cmp_swap=True)
    assert "Atomic CMP_AND_SWAP BW Test" in run.client_out
    (row,) = run.client.rows
    assert row.size == 8 and row.iters == 10


@pytest.mark.parametrize("tool", ["send_bw", "send_lat"])
def test_in_process_send_sweep(tool: str) -> None:
    """``-a`` for the SEND tools: receives posted for each size, a sync
    before each (and after, for send_bw), as perftest's main does."""
    run = in_process(tool, run_all=True, iters=5, rx_depth=4)
    sizes = all_sizes(TOOLS[tool])
    for session in (run.client, run.server):
        assert [r.size for r in session.rows] == sizes
        assert all(r.iters == 5 for r in session.rows)


def test_out_reads_set_the_qp_limits() -> None:
    """``-o``: each side's out_reads goes in its key line; its QP takes it
    as max_dest_rd_atomic (what the peer may have outstanding at it) and
    the peer's as max_rd_atomic (what it may have outstanding itself)."""

    class Args:
        ib_dev = "rxe0"
        udp_port = 4791

    (ip,) = loopback_addresses(1)
    opened = open_device(Args(), IPv4Address(ip))  # type: ignore[arg-type]
    try:
        p = PerfParams.build(TOOLS["read_bw"], out_reads=4, iters=5)
        ctx = PerfContext(opened.device, p, sgid_index=1)
        try:
            (me,) = ctx.my_dests()
            assert me.out_reads == 4
            peer = PingpongDest(0, 9, 0x99, 7, 0x1234, 0x1000, me.gid)
            ctx.connect(IbMtu.MTU_1024, [me], [peer])
            attr, _ = ctx.qps[0].query()
            assert (attr.max_dest_rd_atomic, attr.max_rd_atomic) == (4, 9)
        finally:
            ctx.close()
    finally:
        opened.close()


def test_device_named_by_its_address() -> None:
    """``-d ADDR``: the rxe0 device on that address, as ``--ip ADDR``."""
    ip_s, ip_c = loopback_addresses(2)
    port = free_tcp_port()
    with spawned(perf_argv("write_lat", "-n", "10", "-p", str(port), "-d", ip_s)) as srv:
        wait_listening(srv, port)
        with spawned(perf_argv("write_lat", "-n", "10", "-p", str(port), "-d", ip_c, ip_s)) as cli:
            c_out, c_err = cli.communicate(timeout=TIMEOUT)
        s_out, s_err = srv.communicate(timeout=TIMEOUT)
    assert srv.returncode == 0 and cli.returncode == 0, s_err + c_err
    assert "Device         : rxe0" in c_out
    gid = ":".join(f"{b:02d}" for b in socket.inet_aton(ip_c))
    assert f" GID: 00:00:00:00:00:00:00:00:00:00:255:255:{gid}" in c_out
    assert len(result_lines(s_out, True)) == len(result_lines(c_out, True)) == 1
