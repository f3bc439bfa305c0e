"""What a user meets when something goes wrong: perftest's message and exit
status 1, never a hang — a peer with an old version, one that disconnects
mid-exchange, sends a short or garbled message, has the other GID type or
vanishes after the exchange; bad flags."""

from __future__ import annotations

import io
import socket
import subprocess
import time

import pytest

from softrdma.cli import build_parser, perf
from softrdma.perf.oob import PingpongDest
from tests.fabric.netaddr import free_tcp_port, loopback_addresses
from tests.perf.runs import TIMEOUT, env, perf_argv, spawned, wait_listening

V606 = b"6.06".ljust(16, b"\0")
PRE = [V606, b"\0\0\x10\0", b"\0\0\0@", b"3\0"]  # what a perftest server answers first


def _client_against(script: list[bytes | None], *opts: str, tool: str = "write_bw") -> (
    subprocess.CompletedProcess[str]
):  # fmt: skip
    """Run our client against a fake server that answers each of the
    client's messages with the next item of ``script`` (None: close)."""
    ip_s, ip_c = loopback_addresses(2)
    port = free_tcp_port()
    argv = perf_argv(tool, "-p", str(port), "--ip", ip_c, "-n", "5", *opts, ip_s)
    with socket.create_server((ip_s, port)) as lst:
        lst.settimeout(30)
        with spawned(argv) as cli:
            conn, _ = lst.accept()
            with conn:
                conn.settimeout(30)
                sizes = [16, 4, 4, 2, 108, 108, 108, 108]
                for i, answer in enumerate(script):
                    want = sizes[i] if i < len(sizes) else 8
                    got = b""
                    while len(got) < want:
                        chunk = conn.recv(want - len(got))
                        if not chunk:
                            break
                        got += chunk
                    if answer is None:
                        break
                    conn.sendall(answer)
                else:
                    # the script ran out: wait for the client (it must fail by itself)
                    out, err = cli.communicate(timeout=TIMEOUT)
                    return subprocess.CompletedProcess(argv, cli.returncode, out, err)
            out, err = cli.communicate(timeout=TIMEOUT)  # the server has closed
    return subprocess.CompletedProcess(argv, cli.returncode, out, err)


def test_old_version() -> None:
    r = _client_against([b"5.60".ljust(16, b"\0")])
    assert r.returncode == 1
    assert (
        r.stderr.strip() == "Current implementation is not compatible with versions older than 5.70"
    )


def test_disconnect_mid_exchange() -> None:
    r = _client_against([V606, None])
    assert r.returncode == 1
    assert r.stderr.strip() == "Failed to exchange Page Size data between server and client"


def test_short_message_does_not_hang() -> None:
    """Half a key line and then silence: perftest's one read would come
    back short; here the rest is given a grace period, then the same error."""
    start = time.monotonic()
    r = _client_against([*PRE, b"0000:0001:000011", None])
    assert r.returncode == 1
    assert "ethernet_read_keys: Couldn't read remote address" in r.stderr
    assert "Failed to exchange data between server and clients" in r.stderr
    assert time.monotonic() - start < 60


def test_garbled_key_line() -> None:
    r = _client_against([*PRE, b"z" * 108])
    assert r.returncode == 1 and r.stderr.startswith("Couldn't parse line <zzz")


def test_other_gid_type() -> None:
    link_local = bytes.fromhex("fe80000000000000505400fffe770001")
    key = PingpongDest(0, 1, 0x11, 1, 0x100, 0x1000, link_local).pack()
    r = _client_against([*PRE, key])
    assert r.returncode == 1
    assert "Found Incompatibility issue with GID types." in r.stderr
    assert "Please Try to use a different IP version." in r.stderr


def test_peer_gone_after_the_exchange() -> None:
    """The exchange completes but no RoCE device answers at the peer's GID:
    the WRITEs exhaust retry_cnt and the client says so."""
    ip_s, _ = loopback_addresses(2)
    gid = bytes(10) + b"\xff\xff" + socket.inet_aton(ip_s)
    key = PingpongDest(0, 1, 0x11, 1, 0x100, 0x7000, gid).pack()
    r = _client_against([*PRE, key, key, key, key], "-s", "64")
    assert r.returncode == 1
    assert " Completion with error at client:" in r.stderr
    assert "Failed status 12:" in r.stderr  # IB_WC_RETRY_EXC_ERR


def test_server_sees_client_vanish() -> None:
    ip_s, _ = loopback_addresses(2)
    port = free_tcp_port()
    with spawned(perf_argv("read_bw", "-p", str(port), "--ip", ip_s)) as srv:
        wait_listening(srv, port)
        with socket.create_connection((ip_s, port)) as c:
            c.sendall(V606)
            assert c.recv(16) == V606
            c.sendall(b"\0\0")  # half the page size, then gone
        _, err = srv.communicate(timeout=TIMEOUT)
    assert srv.returncode == 1
    assert err.strip() == "Failed to exchange Page Size data between server and client"


def test_no_server() -> None:
    ip_s, ip_c = loopback_addresses(2)
    port = free_tcp_port()
    r = subprocess.run(
        perf_argv("write_bw", "-p", str(port), "--ip", ip_c, ip_s),
        capture_output=True, text=True, timeout=TIMEOUT, env=env(),
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith(f"Couldn't connect to {ip_s}:{port}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["write_bw", "-n", "2"], " Iteration num should be between 5 and 100000000"),
        (["write_bw", "-q", "0"], " num of Qps should be between 1 and 16384"),
        (["write_bw", "-Q", "2000"], " CQ moderation should be between 1 and 1024"),
        (["write_bw", "-t", "0"], " Tx depth should be between 1 and 15000"),
        (["write_bw", "-x", "99"], " Gid index should be between 0 and 64"),
        (["write_bw", "-s", "0"], " Message Size should be between 1 and 2147483647"),
        (["write_bw", "-m", "1500"], " Invalid MTU - 1500 "),
        (["atomic_bw", "-s", "64"], " Message size cannot be changed for Atomic tests"),
        (["read_bw", "-o", "500"], " Outstanding reads should be between 1 and 128"),
        (["write_bw", "-o", "4"], " Outstanding reads is only relevant for READ or ATOMIC tests"),
        (["write_bw", "-a", "-s", "64"], " Can't use -a and -s together"),
        (["write_lat", "-D", "0"], " Duration should be a positive number of seconds"),
    ],
)
def test_bad_flags(args: list[str], message: str) -> None:
    parser = build_parser()
    ns = parser.parse_args(["perf", *args])
    out, err = io.StringIO(), io.StringIO()
    assert perf.run(ns, parser, out, err) == 1
    assert err.getvalue().rstrip("\n") == message and out.getvalue() == ""


def test_bad_flag_exit_status() -> None:
    """The same through the command: one line on stderr, exit status 1."""
    r = subprocess.run(
        perf_argv("read_bw", "-n", "3", "-p", str(free_tcp_port())), capture_output=True,
        text=True, timeout=TIMEOUT, env=env(),
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr == " Iteration num should be between 5 and 100000000\n"
