"""``softrdma perf`` against the real perftest 6.06 (Debian bookworm) on Linux rxe.

The Linux side runs in the VM (kernel 6.1 rdma_rxe on 10.77.0.1, perftest's
``ib_*`` tools); softrdma runs on the host inside the VM's namespace
(10.77.0.2) with the same interpreter as pytest. Every tool in both roles:
the exchange must complete on both sides with exit status 0, each side must
report the size and iteration count asked for with positive rates, and each
side's "remote address" line must be the other's "local address" line (QPN,
PSN, RKey and VAddr went across intact). The VM runs under TCG, so ``-n``
stays small.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import time
from dataclasses import dataclass

import pytest

from tests.interop.linuxvm import CommandResult, LinuxPeer, VmCommandTimeout
from tests.interop.test_rc_pingpong_linux import _text, describe, softrdma_env

pytestmark = pytest.mark.interop

import sys  # noqa: E402

RUN_TIMEOUT = 240.0
_ports = itertools.count(18900)

ADDR = re.compile(
    r"^ (local|remote) address: LID (\w+) QPN (0x[0-9a-f]+) PSN (0x[0-9a-f]+)"
    r"(?: OUT (0x[0-9a-f]+))?(?: RKey (0x[0-9a-f]+) VAddr (0x[0-9a-f]+))?\s*$",
    re.M,
)
GID = re.compile(r"^ GID: ((?:\d+:){15}\d+)\s*$", re.M)
BW_LINE = re.compile(r"^ (\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", re.M)
LAT_LINE = re.compile(r"^ (\d+)\s+(\d+)\s+((?:[\d.]+\s+){6}[\d.]+)\s*$", re.M)


@dataclass(frozen=True)
class Case:
    tool: str
    args: tuple[str, ...]
    size: int
    iters: int
    name: str = ""


CASES = [
    Case("write_bw", ("-s", "8192", "-n", "20"), 8192, 20),
    Case("write_bw", ("-s", "4096", "-n", "20", "-q", "2"), 4096, 20, "write_bw_q2"),
    Case("read_bw", ("-s", "8192", "-n", "20"), 8192, 20),
    Case("send_bw", ("-s", "8192", "-n", "20"), 8192, 20),
    Case("send_bw", ("-s", "2048", "-n", "20", "-q", "2"), 2048, 20, "send_bw_q2"),
    Case("read_bw", ("-s", "4096", "-n", "20", "-o", "4", "-Q", "5"), 4096, 20, "read_bw_o4_Q5"),
    Case("atomic_bw", ("-n", "20"), 8, 20),
    Case("write_lat", ("-s", "64", "-n", "20"), 64, 20),
    Case("read_lat", ("-s", "64", "-n", "20"), 64, 20),
    Case("send_lat", ("-s", "64", "-n", "20"), 64, 20),
    Case("send_bw", ("-c", "UD", "-s", "1024", "-n", "20"), 1024, 20, "send_bw_ud"),
    Case("send_lat", ("-c", "UD", "-s", "64", "-n", "20"), 64, 20, "send_lat_ud"),
    Case("write_bw", ("--bidirectional", "-s", "8192", "-n", "20"), 8192, 20, "write_bw_bidir"),
    Case("read_bw", ("--bidirectional", "-s", "4096", "-n", "20"), 4096, 20, "read_bw_bidir"),
    Case("send_bw", ("--bidirectional", "-s", "4096", "-n", "20"), 4096, 20, "send_bw_bidir"),
    Case("write_bw", ("-R", "-s", "8192", "-n", "20"), 8192, 20, "write_bw_rdma_cm"),
    Case("read_bw", ("-R", "-s", "4096", "-n", "20"), 4096, 20, "read_bw_rdma_cm"),
    Case("send_lat", ("-R", "-s", "64", "-n", "20"), 64, 20, "send_lat_rdma_cm"),
    Case("write_bw", ("-z", "-s", "8192", "-n", "20"), 8192, 20, "write_bw_z"),
]
ROLES = ["linux-server", "softrdma-server"]


def softrdma_argv(tool: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "softrdma", "perf", tool, *args]


def linux_argv(tool: str, args: list[str]) -> list[str]:
    return [f"ib_{tool}", "-d", "rxe0", "-x", "1", "-F", *args]


def run_pair(peer: LinuxPeer, role: str, case: Case) -> tuple[CommandResult, CommandResult]:
    """(softrdma, linux) results of one run in ``role``."""
    port = next(_ports)
    args = [*case.args, "-p", str(port)]
    cm = "-R" in case.args or "-z" in case.args  # no TCP: the exchange is over the RDMA CM
    if role == "linux-server":
        server = peer.spawn(linux_argv(case.tool, args), timeout=RUN_TIMEOUT)
        try:
            if cm:
                wait_cm_listening(peer, port)
            else:
                peer.wait_listening(port, timeout=60)
            try:
                ours = peer.host_run(
                    softrdma_argv(case.tool, [*args, "--ip", peer.host_ip, peer.vm_ip]),
                    timeout=RUN_TIMEOUT, env=softrdma_env(),
                )  # fmt: skip
            except subprocess.TimeoutExpired as e:
                ours = CommandResult(-9, _text(e.stdout), _text(e.stderr) + "\n[timed out]")
            try:
                linux = server.wait(RUN_TIMEOUT if ours.returncode == 0 else 20.0)
            except VmCommandTimeout as e:
                linux = CommandResult(-9, e.stdout, e.stderr + "\n[timed out]")
            except TimeoutError:
                linux = server.stop() or CommandResult(-9, "", "[no result]")
        finally:
            server.stop()
        return ours, linux
    proc = peer.host_popen(
        softrdma_argv(case.tool, [*args, "--ip", peer.host_ip]), env=softrdma_env()
    )
    try:
        deadline = time.monotonic() + 60.0
        # an RDMA CM server has opened its device (UDP 4791) when it listens
        probe = ["ss", "-Hlun", "sport = :4791"] if cm else ["ss", "-Hltn", f"sport = :{port}"]
        while not peer.host_run(probe, timeout=30).stdout.strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                out, err = proc.communicate(timeout=30)
                pytest.fail(describe("softrdma server (never listened)", CommandResult(
                    proc.returncode, out, err)))  # fmt: skip
            time.sleep(0.2)
        if cm:
            time.sleep(1.0)  # its CM listener comes right after the device
        try:
            linux = peer.run(linux_argv(case.tool, [*args, peer.host_ip]), timeout=RUN_TIMEOUT)
        except VmCommandTimeout as e:
            linux = CommandResult(-9, e.stdout, e.stderr + "\n[timed out]")
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT if linux.returncode == 0 else 20.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=30)
            err += "\n[killed: did not finish]"
        ours = CommandResult(proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    return ours, linux


def wait_cm_listening(peer: LinuxPeer, port: int, timeout: float = 60.0) -> None:
    """Until an RDMA CM ID in the VM listens on ``port`` (``rdma res show
    cm_id`` lists it with its source address)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = peer.run(["rdma", "res", "show", "cm_id"], timeout=30).stdout
        if any("LISTEN" in line and f":{port}" in line for line in shown.splitlines()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no RDMA CM listener on port {port} in the VM:\n{shown}")
        time.sleep(0.5)


def addresses(text: str) -> dict[str, tuple[str, ...]]:
    return {m.group(1): m.groups()[1:] for m in ADDR.finditer(text)}


def info_block(text: str) -> list[str]:
    """The info block's lines, but for the role's TX / RX depth lines and
    the values that differ between the two hosts."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(" Test"))
    end = lines.index("-" * 87, start)
    return [line for line in lines[start:end] if not line.startswith((" TX depth", " RX depth"))]


def leading_dashes(text: str) -> int:
    """The separator lines before the info block's title (perftest prints
    one more for READ and atomic tests on rxe)."""
    lines = text.splitlines()
    title = next(i for i, line in enumerate(lines) if line.endswith(" Test"))
    return sum(1 for line in lines[:title] if line == "-" * 87)


def check(case: Case, role: str, ours: CommandResult, linux: CommandResult) -> None:
    report = describe("softrdma", ours) + "\n" + describe(f"ib_{case.tool}", linux)
    assert ours.returncode == 0, report
    assert linux.returncode == 0, report
    # the same info block, character for character (MTU, GID index, depths agreed)
    assert info_block(ours.stdout) == info_block(linux.stdout), report
    assert leading_dashes(ours.stdout) == leading_dashes(linux.stdout), report
    a, b = addresses(ours.stdout), addresses(linux.stdout)
    assert set(a) == set(b) == {"local", "remote"}, report
    assert a["remote"] == b["local"] and b["remote"] == a["local"], report
    qps = int(case.args[case.args.index("-q") + 1]) if "-q" in case.args else 1
    assert len(GID.findall(ours.stdout)) == 2 * qps, report
    assert GID.findall(ours.stdout) == GID.findall(linux.stdout)[::-1], report
    lat = case.tool.endswith("_lat")
    # who prints a result line: both for BW (the server prints the client's
    # report) but send_bw's server measures itself; latency: not read_lat's server
    # perftest's own warning: under TCG its cycle counter may not keep time,
    # and its numbers (printed, or sent in its report) are then inf or 0
    clock_broken = "Correlation coefficient r^2" in linux.stdout + linux.stderr
    for who, out in (("softrdma", ours), ("linux", linux)):
        if who == "linux" and clock_broken:
            continue
        server = (who == "softrdma") == (role == "softrdma-server")
        if lat and case.tool == "read_lat" and server:
            assert not LAT_LINE.search(out.stdout), report
            continue
        pattern = LAT_LINE if lat else BW_LINE
        m = pattern.search(out.stdout)
        assert m, f"{who}: no result line\n{report}"
        # the BW tests report the iterations of every QP
        iters = case.iters * (1 if lat else qps)
        assert int(m.group(1)) == case.size and int(m.group(2)) == iters, report
        numbers = [float(x) for x in (m.group(3).split() if lat else m.groups()[2:])]
        if clock_broken:
            continue
        if lat:
            assert all(x > 0 for x in numbers), report
        else:
            # MB/sec with two decimals can print 0.00 for 8-byte atomics under
            # TCG, and a send_bw receiver prints a peak of 0.00: the message
            # rate must be positive, the rest not negative
            assert numbers[2] > 0 and min(numbers) >= 0, report


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", CASES, ids=[c.name or c.tool for c in CASES])
def test_perftest(linux_peer: LinuxPeer, role: str, case: Case) -> None:
    ours, linux = run_pair(linux_peer, role, case)
    check(case, role, ours, linux)


@pytest.mark.parametrize("role", ROLES)
def test_write_bw_sweep(linux_peer: LinuxPeer, role: str) -> None:
    """``-a``: 2 bytes to 8 MiB on one connection, every size's line on the
    client; the server prints the client's last report."""
    case = Case("write_bw", ("-a", "-n", "5"), 1 << 23, 5)
    ours, linux = run_pair(linux_peer, role, case)
    report = describe("softrdma", ours) + "\n" + describe("ib_write_bw", linux)
    assert ours.returncode == 0 and linux.returncode == 0, report
    client = linux if role == "softrdma-server" else ours
    server = ours if role == "softrdma-server" else linux
    lines = [(int(m.group(1)), int(m.group(2))) for m in BW_LINE.finditer(client.stdout)]
    assert lines == [(1 << i, 5) for i in range(1, 24)], report
    last = BW_LINE.findall(server.stdout)
    assert len(last) == 1 and last[0] == BW_LINE.findall(client.stdout)[-1], report


LAT_DUR_LINE = re.compile(r"^ (\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s*$", re.M)
DURATION_CASES = [
    Case("send_bw", ("-D", "3", "-s", "256"), 256, 0),
    Case("write_lat", ("-D", "3", "-s", "64"), 64, 0),
    Case("send_lat", ("-D", "3", "-s", "64"), 64, 0),
]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", DURATION_CASES, ids=[c.tool for c in DURATION_CASES])
def test_duration(linux_peer: LinuxPeer, role: str, case: Case) -> None:
    """``-D``: both sides run for the time asked and print perftest's
    duration report (for latency: iterations, average and transactions per
    second; for send_bw: no peak), with the same info block."""
    ours, linux = run_pair(linux_peer, role, case)
    report = describe("softrdma", ours) + "\n" + describe(f"ib_{case.tool}", linux)
    assert ours.returncode == 0 and linux.returncode == 0, report
    assert info_block(ours.stdout) == info_block(linux.stdout), report
    lat = case.tool.endswith("_lat")
    # perftest's own cycle counter can break under TCG (it warns and then
    # reports 0 or inf): its rates say nothing then, ours still must.
    clock_broken = "Correlation coefficient r^2" in linux.stdout + linux.stderr
    for out in (ours.stdout, linux.stdout):
        rates = out is ours.stdout or not clock_broken
        if lat:
            assert " #bytes        #iterations       t_avg[usec]    tps average" in out, report
            m = LAT_DUR_LINE.search(out)
            assert m and int(m.group(1)) == case.size and int(m.group(2)) > 0, report
            assert not rates or (float(m.group(3)) > 0 and float(m.group(4)) > 0), report
        else:
            m = BW_LINE.search(out)
            assert m and int(m.group(1)) == case.size and int(m.group(2)) > 0, report
            assert float(m.group(3)) == 0.0, report  # -D reports no peak
            assert not rates or float(m.group(4)) > 0, report
