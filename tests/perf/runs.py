"""Running ``softrdma perf`` over loopback UDP: as two processes, or as two
sessions in this process (each on its own device and address), and
reading what perftest's output says."""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from softrdma.cli.netdev import open_device
from softrdma.perf.params import TOOLS, PerfParams
from softrdma.perf.session import PerfSession, connect_server
from tests.fabric.netaddr import free_tcp_port, loopback_addresses

SRC = Path(__file__).resolve().parents[2] / "src"
TIMEOUT = 120.0
ADDR = re.compile(
    r"^ (local|remote) address: LID (\w+) QPN (0x[0-9a-f]+) PSN (0x[0-9a-f]+)"
    r"(?: OUT (0x[0-9a-f]+))?(?: RKey (0x[0-9a-f]+) VAddr (0x[0-9a-f]+))?$",
    re.M,
)
BW_LINE = re.compile(r"^ (\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", re.M)
LAT_LINE = re.compile(r"^ (\d+)\s+(\d+)\s+((?:[\d.]+\s+){6}[\d.]+)\s*$", re.M)


@dataclass(frozen=True)
class Line:
    """One result line: size, iterations and the numbers after them."""

    size: int
    iters: int
    numbers: tuple[float, ...]


def result_lines(text: str, lat: bool) -> list[Line]:
    """Every result line perftest-style output holds."""
    if lat:
        return [
            Line(int(m.group(1)), int(m.group(2)), tuple(float(x) for x in m.group(3).split()))
            for m in LAT_LINE.finditer(text)
        ]
    return [
        Line(int(m.group(1)), int(m.group(2)), tuple(float(x) for x in m.groups()[2:]))
        for m in BW_LINE.finditer(text)
    ]


def addresses(text: str) -> dict[str, tuple[str | None, ...]]:
    """The "local address" and "remote address" lines, by side."""
    return {m.group(1): m.groups()[1:] for m in ADDR.finditer(text)}


def env() -> dict[str, str]:
    """This checkout's sources first, whatever is installed."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), e.get("PYTHONPATH", "")) if p)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def perf_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "softrdma", "perf", *args]


@contextlib.contextmanager
def spawned(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    """A process that is killed if the test leaves it running."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def wait_listening(proc: subprocess.Popen[str], port: int, timeout: float = 60.0) -> None:
    """Until ``proc`` listens on TCP ``port`` (from /proc/net/tcp, without
    connecting: a connection would be taken for the client)."""
    want = re.compile(rf":{port:04X} 0+:0000 0A ")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.communicate()}")
        tables = Path("/proc/net/tcp").read_text() + Path("/proc/net/tcp6").read_text()
        if want.search(tables):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on TCP port {port}")


def wait_udp_bound(proc: subprocess.Popen[str], ip: str, port: int = 4791,
                   timeout: float = 60.0) -> None:  # fmt: skip
    """Until ``proc`` has opened its RoCE device (its UDP port on ``ip``):
    an RDMA CM server (``-R`` / ``-z``) has no TCP socket to wait for."""
    want = re.compile(
        rf": *{''.join(f'{b:02X}' for b in reversed(bytes(map(int, ip.split('.')))))}:{port:04X} "
    )
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.communicate()}")
        if want.search(Path("/proc/net/udp").read_text()):
            time.sleep(0.3)  # then its CM listens
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing bound UDP {ip}:{port}")


def two_processes(
    tool: str, *opts: str, server_opts: Sequence[str] = (), client_opts: Sequence[str] = ()
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """A server and a client process to completion; (server, client)."""
    ip_s, ip_c = loopback_addresses(2)
    port = free_tcp_port()
    server = perf_argv(tool, "-p", str(port), "--ip", ip_s, *opts, *server_opts)
    client = perf_argv(tool, "-p", str(port), "--ip", ip_c, *opts, *client_opts, ip_s)
    with spawned(server) as srv:
        if {"-R", "-z"} & set(opts):
            wait_udp_bound(srv, ip_s)
        else:
            wait_listening(srv, port)
        with spawned(client) as cli:
            c_out, c_err = cli.communicate(timeout=TIMEOUT)
        s_out, s_err = srv.communicate(timeout=TIMEOUT)
    return (
        subprocess.CompletedProcess(server, srv.returncode, s_out, s_err),
        subprocess.CompletedProcess(client, cli.returncode, c_out, c_err),
    )


@dataclass
class InProcessRun:
    """What each side of an in-process run printed and measured."""

    server: PerfSession
    client: PerfSession
    server_out: str
    client_out: str


def in_process(tool: str, **kw: object) -> InProcessRun:
    """Server and client sessions in this process (the server in a
    thread), each on its own rxe device and loopback address."""
    ip_s, ip_c = loopback_addresses(2)
    port = free_tcp_port()
    t = TOOLS[tool]
    sp = PerfParams.build(t, port=port, **kw)  # type: ignore[arg-type]
    cp = PerfParams.build(t, port=port, servername=ip_s, **kw)  # type: ignore[arg-type]

    class Args:
        ib_dev = "rxe0"
        udp_port = 4791

    s_dev = open_device(Args(), IPv4Address(ip_s))  # type: ignore[arg-type]
    c_dev = open_device(Args(), IPv4Address(ip_c))  # type: ignore[arg-type]
    s_out, c_out = io.StringIO(), io.StringIO()
    server = PerfSession(sp, s_dev.device, s_out, timeout=60.0)
    client = PerfSession(cp, c_dev.device, c_out, timeout=60.0)
    errors: list[BaseException] = []
    listening = threading.Event()

    def serve() -> None:
        try:
            with socket.create_server((ip_s, port)) as lst:
                listening.set()
                lst.settimeout(60)
                conn, _ = lst.accept()
            with conn:
                server.run(conn)
        except BaseException as e:  # reported by the test thread
            errors.append(e)
            listening.set()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        assert listening.wait(30)
        with connect_server(ip_s, port) as sock:
            client.run(sock)
        th.join(TIMEOUT)
        assert not th.is_alive(), "the server session did not finish"
    finally:
        c_dev.close()
        th.join(10)
        s_dev.close()
    if errors:
        raise errors[0]
    return InProcessRun(server, client, s_out.getvalue(), c_out.getvalue())
