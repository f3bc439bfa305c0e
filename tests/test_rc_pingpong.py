"""``softrdma rc-pingpong`` and ``softrdma devinfo`` as separate processes
over loopback UDP (and, as root, across two network namespaces joined by a
veth pair): the flags, exchange and output of rdma-core's tools."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from softrdma.fabric.pcap import read_pcap
from softrdma.transport.roce import decode_roce_v2
from tests.fabric.netaddr import free_tcp_port, loopback_addresses
from tests.tshark import bth_fields

TIMEOUT = 120.0
RESULT = re.compile(
    r"^(\d+) bytes in ([\d.]+) seconds = ([\d.]+) Mbit/sec\n(\d+) iters in ([\d.]+) seconds = ([\d.]+) usec/iter$",
    re.M,
)
ADDRESS = re.compile(
    r"^  (local|remote) address: +LID 0x([0-9a-f]{4}), QPN 0x([0-9a-f]{6}), PSN 0x([0-9a-f]{6}), GID (\S+)$",
    re.M,
)


def softrdma(*args: str, prefix: Sequence[str] = ()) -> list[str]:
    return [*prefix, sys.executable, "-m", "softrdma", *args]


@contextlib.contextmanager
def spawned(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    """A process that is killed if the test leaves it running."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def wait_listening(
    proc: subprocess.Popen[str], port: int, prefix: Sequence[str] = (), timeout: float = 60.0
) -> None:
    """Until ``proc`` listens on TCP ``port`` (read from ``/proc/net/tcp`` of
    its network namespace, without connecting: a connection would be taken
    for the client)."""
    want = re.compile(rf":{port:04X} 0+:0000 0A ")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.communicate()}")
        tables = subprocess.run(
            [*prefix, "cat", "/proc/net/tcp", "/proc/net/tcp6"], capture_output=True, text=True
        ).stdout
        if want.search(tables):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on TCP port {port}")


def pingpong(
    *opts: str,
    server_ip: str,
    client_ip: str,
    server_opts: Sequence[str] = (),
    client_opts: Sequence[str] = (),
    prefix_server: Sequence[str] = (),
    prefix_client: Sequence[str] = (),
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """Run a server and a client to completion; both results."""
    port = free_tcp_port()
    server = softrdma(
        "rc-pingpong", "-g", "1", "-p", str(port), "--ip", server_ip, *opts, *server_opts,
        prefix=prefix_server,
    )  # fmt: skip
    client = softrdma(
        "rc-pingpong", "-g", "1", "-p", str(port), "--ip", client_ip, *opts, *client_opts,
        server_ip, prefix=prefix_client,
    )  # fmt: skip
    with spawned(server) as srv:
        wait_listening(srv, port, prefix_server)
        with spawned(client) as cli:
            c_out, c_err = cli.communicate(timeout=TIMEOUT)
        s_out, s_err = srv.communicate(timeout=TIMEOUT)
    return (
        subprocess.CompletedProcess(server, srv.returncode, s_out, s_err),
        subprocess.CompletedProcess(client, cli.returncode, c_out, c_err),
    )


def check_run(proc: subprocess.CompletedProcess[str], size: int, iters: int) -> None:
    assert proc.returncode == 0, proc.stderr
    m = RESULT.search(proc.stdout)
    assert m, proc.stdout
    assert int(m.group(1)) == size * iters * 2
    assert int(m.group(4)) == iters
    assert float(m.group(3)) > 0 and float(m.group(6)) > 0
    addrs = ADDRESS.findall(proc.stdout)
    assert [a[0] for a in addrs] == ["local", "remote"], proc.stdout


@pytest.mark.parametrize(("size", "iters"), [(1, 20), (4096, 20), (65536, 5), (1 << 20, 2)])
def test_pingpong_between_two_processes(size: int, iters: int) -> None:
    ip_s, ip_c = loopback_addresses(2)
    server, client = pingpong(
        "-s", str(size), "-n", str(iters), "-c", server_ip=ip_s, client_ip=ip_c
    )
    check_run(server, size, iters)
    check_run(client, size, iters)
    (s_local, s_remote), (c_local, c_remote) = (
        ADDRESS.findall(server.stdout),
        ADDRESS.findall(client.stdout),
    )
    # each side's remote line is the other's local line
    assert s_local[1:] == c_remote[1:] and c_local[1:] == s_remote[1:]
    assert s_local[4] == f"::ffff:{ip_s}" and c_local[4] == f"::ffff:{ip_c}"
    assert "invalid data" not in server.stdout + client.stdout


def test_events_mode() -> None:
    ip_s, ip_c = loopback_addresses(2)
    server, client = pingpong("-e", "-n", "30", server_ip=ip_s, client_ip=ip_c)
    check_run(server, 4096, 30)
    check_run(client, 4096, 30)


def test_pcap_on_both_sides(tmp_path: Path) -> None:
    ip_s, ip_c = loopback_addresses(2)
    ps, pc = tmp_path / "s.pcap", tmp_path / "c.pcap"
    server, client = pingpong(
        "-n", "3", "-s", "3000", server_ip=ip_s, client_ip=ip_c,
        server_opts=("--pcap", str(ps)), client_opts=("--pcap", str(pc)),
    )  # fmt: skip
    check_run(server, 3000, 3)
    check_run(client, 3000, 3)
    for path in (ps, pc):
        frames = [decode_roce_v2(r.data) for r in read_pcap(path)]  # ICRC checked
        assert {str(f.src_ip) for f in frames} == {ip_s, ip_c}
        sends = [f for f in frames if f.packet.bth.opcode in (0x00, 0x01, 0x02)]
        assert len(sends) == 3 * 3 * 2  # 3000 B = FIRST, MIDDLE, LAST at MTU 1024
    if shutil.which("tshark"):  # the independent decoder agrees
        rows = bth_fields(pc, "opcode", "psn")
        assert [r[0] for r in rows] == [f.packet.bth.opcode for f in frames]


def _counters(out: str) -> dict[str, int]:
    m = re.search(r"^counters: (.*)$", out, re.M)
    assert m, out
    return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}


def test_suspended_receiver_is_retransmitted_to() -> None:
    """The server is stopped (SIGSTOP) while the client sends its first 1 MiB
    message (1024 packets at MTU 1024, tens of milliseconds on the wire) and
    stays stopped for about four retransmit timeouts (timeout 14 → 67 ms;
    retry_cnt 7): nothing is ACKed meanwhile, so the client retransmits from
    the oldest unacknowledged PSN; after SIGCONT the run completes with the
    data intact (``-c``), and the client's counters show the retries."""
    ip_s, ip_c = loopback_addresses(2)
    port = free_tcp_port()
    size, iters = 1 << 20, 4
    common = ("rc-pingpong", "-g", "1", "-p", str(port), "-s", str(size), "-n", str(iters), "-c")
    with spawned(softrdma(*common, "--ip", ip_s)) as srv:
        wait_listening(srv, port)
        with spawned(softrdma(*common, "--ip", ip_c, "--counters", ip_s)) as cli:
            assert cli.stdout is not None
            lines = [cli.stdout.readline() for _ in range(2)]
            assert "remote address" in lines[1], lines
            os.kill(srv.pid, signal.SIGSTOP)  # the client is sending now
            time.sleep(0.25)
            os.kill(srv.pid, signal.SIGCONT)
            c_out, c_err = cli.communicate(timeout=TIMEOUT)
        s_out, s_err = srv.communicate(timeout=TIMEOUT)
    assert srv.returncode == 0, s_err
    assert cli.returncode == 0, c_err
    check_run(subprocess.CompletedProcess([], 0, "".join(lines) + c_out, ""), size, iters)
    client = _counters(c_out)
    assert client.get("completer_retry_err", 0) >= 1, client
    # its own messages' packets and one ACK per 64 of the server's, plus resends
    packets = size // 1024
    assert client["sent_pkts"] > iters * (packets + packets // 64), client
    assert "invalid data" not in s_out + c_out


def test_errors_are_one_line() -> None:
    ip_s, ip_c = loopback_addresses(2)
    # an address that is not on this host
    r = subprocess.run(
        softrdma("rc-pingpong", "--ip", "198.51.100.77", "-p", str(free_tcp_port())),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "not an address of this host" in r.stderr
    # the RoCE port taken
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((ip_s, 4791))
        r = subprocess.run(
            softrdma("rc-pingpong", "--ip", ip_s, "-p", str(free_tcp_port())),
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
    assert r.returncode == 1 and "UDP port 4791" in r.stderr and "already in use" in r.stderr
    # nobody listening on the TCP port
    r = subprocess.run(
        softrdma("rc-pingpong", "-g", "1", "--ip", ip_c, "-p", str(free_tcp_port()), ip_s),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("Couldn't connect to")


def test_peer_that_never_answers() -> None:
    """The exchange succeeds but no RoCE peer is there: the client's SEND
    exhausts retry_cnt and it says so, as ibv_rc_pingpong does."""
    ip_s, ip_c = loopback_addresses(2)
    port = free_tcp_port()
    client = softrdma("rc-pingpong", "-g", "1", "--ip", ip_c, "-p", str(port), "127.0.0.1")
    with socket.create_server(("127.0.0.1", port)) as listener, spawned(client) as cli:
        conn, _ = listener.accept()
        with conn:
            conn.recv(52)
            gid = (bytes(10) + b"\xff\xff" + socket.inet_aton(ip_s)).hex()
            conn.sendall(f"0000:000011:000000:{gid}".encode() + b"\0")
            conn.recv(5)
        _, err = cli.communicate(timeout=TIMEOUT)
    assert cli.returncode == 1
    assert "Failed status transport retry counter exceeded (12) for wr_id 2" in err


def test_mismatched_sizes() -> None:
    ip_s, ip_c = loopback_addresses(2)
    server, client = pingpong(
        "-n", "2", server_ip=ip_s, client_ip=ip_c,
        server_opts=("-s", "1024"), client_opts=("-s", "8192"),
    )  # fmt: skip
    assert server.returncode == 1 and "local length error (1) for wr_id 1" in server.stderr
    assert client.returncode == 1 and "Failed status" in client.stderr


def test_devinfo() -> None:
    (ip,) = loopback_addresses(1)
    r = subprocess.run(
        softrdma("devinfo", "-v", "--ip", ip), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("hca_id:\trxe0\n")
    assert "\ttransport:\t\t\tInfiniBand (0)\n" in out
    assert "\t\t\tstate:\t\t\tPORT_ACTIVE (4)\n" in out
    assert "\t\t\tactive_mtu:\t\t4096 (5)\n" in out  # lo: MTU 65536
    assert "\t\t\tlink_layer:\t\tEthernet\n" in out
    mapped = socket.inet_aton(ip).hex()
    assert f"GID[  1]:\t\t0000:0000:0000:0000:0000:ffff:{mapped[:4]}:{mapped[4:]}" in out
    assert "ICRC" in out
    r = subprocess.run(softrdma("devinfo", "-l"), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.stdout.splitlines()[:3] == ["2 HCAs found:", "\trxe0", "\thca0"]
    r = subprocess.run(
        softrdma("devinfo", "-d", "hca0", "--ip", ip),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 0 and r.stdout.startswith("hca_id:\thca0\n")


# -- two network namespaces joined by a veth pair (root) ------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def veth_pair() -> Iterator[tuple[list[str], list[str], str, str]]:
    """Namespaces A and B, 10.<r>.<r>.1 and .2 on a veth with MTU 1500."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b = f"srdma-a-{tag}", f"srdma-b-{tag}"
    octet = 10 + int(tag[:2], 16) % 200
    ip_a, ip_b = f"10.{octet}.77.1", f"10.{octet}.77.2"
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip(
            "link",
            "add",
            f"va{tag}",
            "netns",
            ns_a,
            "type",
            "veth",
            "peer",
            f"vb{tag}",
            "netns",
            ns_b,
        )
        for ns, dev, addr in ((ns_a, f"va{tag}", ip_a), (ns_b, f"vb{tag}", ip_b)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "mtu", "1500", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        yield ["ip", "netns", "exec", ns_a], ["ip", "netns", "exec", ns_b], ip_a, ip_b
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_across_two_namespaces(veth_pair: tuple[list[str], list[str], str, str]) -> None:
    in_a, in_b, ip_a, ip_b = veth_pair
    r = subprocess.run(
        softrdma("devinfo", "--ip", ip_a, prefix=in_a),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert "\t\t\tactive_mtu:\t\t1024 (3)\n" in r.stdout, r.stdout + r.stderr  # 1500 → 1024
    port = free_tcp_port()
    opts = ("rc-pingpong", "-g", "1", "-p", str(port), "-s", "65536", "-n", "5", "-c")
    server = softrdma(*opts, prefix=in_a)
    # the client's --ip defaults to the address that routes to the server
    client = softrdma(*opts, ip_a, prefix=in_b)
    with spawned(server) as srv:
        wait_listening(srv, port, in_a)
        with spawned(client) as cli:
            c_out, c_err = cli.communicate(timeout=TIMEOUT)
        s_out, s_err = srv.communicate(timeout=TIMEOUT)
    check_run(subprocess.CompletedProcess(server, srv.returncode, s_out, s_err), 65536, 5)
    check_run(subprocess.CompletedProcess(client, cli.returncode, c_out, c_err), 65536, 5)
    assert f"GID ::ffff:{ip_b}" in c_out and f"GID ::ffff:{ip_a}" in s_out
