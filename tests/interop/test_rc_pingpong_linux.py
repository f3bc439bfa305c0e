"""``softrdma rc-pingpong`` against rdma-core's real ``ibv_rc_pingpong`` on Linux rxe.

The Linux side runs in the VM (rdma-core 44, kernel 6.1 rdma_rxe, 10.77.0.1);
softrdma runs on the host inside the VM's namespace (10.77.0.2) with the same
interpreter as pytest. Both roles, several sizes (1 MiB is 1024 packets per
message at the RoCE MTU of 1024), ``-c``, and a pcap of the exchange.

rdma-core 44's ``-c`` checks only the first byte of every page of the
received buffer on the server and prints ``invalid data in page N`` while
still exiting 0, so the output is checked too. The VM runs under TCG:
``-n`` per size keeps every exchange within a few seconds of VM time.
"""

from __future__ import annotations

import itertools
import os
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from tests.interop.linuxvm import CommandResult, LinuxPeer, VmCommandTimeout, VmError

pytestmark = pytest.mark.interop

SRC = Path(__file__).resolve().parents[2] / "src"
#: Bound on one exchange, either side (the VM is emulated).
RUN_TIMEOUT = 180.0
DEFAULT_PORT = 18515

#: (size, iters): iterations per size, so that each exchange stays short under TCG.
SIZES: list[tuple[int, int]] = [(1, 100), (4096, 50), (65536, 10), (1048576, 3)]

_ports = itertools.count(18700)

ADDR_LINE = re.compile(
    r"^\s*(local|remote) address:\s+LID 0x([0-9a-fA-F]{4}), QPN 0x([0-9a-fA-F]{6}), "
    r"PSN 0x([0-9a-fA-F]{6}), GID (\S+)\s*$",
    re.M,
)
BYTES_LINE = re.compile(r"^(\d+) bytes in ([\d.]+) seconds = ([\d.]+) Mbit/sec$", re.M)
ITERS_LINE = re.compile(r"^(\d+) iters in ([\d.]+) seconds = ([\d.]+) usec/iter$", re.M)


@dataclass(frozen=True)
class Endpoint:
    lid: int
    qpn: int
    psn: int
    gid: IPv6Address  # compared as an address; the text is checked in test_output_format


@dataclass(frozen=True)
class PingpongOutput:
    local: Endpoint
    remote: Endpoint
    nbytes: int
    iters: int


def parse_output(text: str, who: str) -> PingpongOutput:
    """The address and result lines that ibv_rc_pingpong prints."""
    addrs = {
        m.group(1): Endpoint(
            int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16), IPv6Address(m.group(5))
        )
        for m in ADDR_LINE.finditer(text)
    }
    nbytes = BYTES_LINE.search(text)
    iters = ITERS_LINE.search(text)
    assert set(addrs) == {"local", "remote"}, f"{who}: no local/remote address lines:\n{text}"
    assert nbytes and iters, f"{who}: no result lines:\n{text}"
    return PingpongOutput(
        addrs["local"], addrs["remote"], int(nbytes.group(1)), int(iters.group(1))
    )


def softrdma_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


def softrdma_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "softrdma", "rc-pingpong", *args]


def describe(who: str, result: CommandResult) -> str:
    return f"--- {who} exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def linux_server_softrdma_client(
    peer: LinuxPeer, args: list[str], port: int, extra_host_args: list[str] | None = None
) -> tuple[CommandResult, CommandResult]:
    """``ibv_rc_pingpong ARGS`` in the VM, ``softrdma rc-pingpong ARGS --ip HOST VM`` on the host.

    Returns (softrdma, linux).
    """
    server = peer.spawn(["ibv_rc_pingpong", *args], timeout=RUN_TIMEOUT)
    try:
        peer.wait_listening(port, timeout=60)
        host_args = [*args, "--ip", peer.host_ip, *(extra_host_args or []), peer.vm_ip]
        try:
            client = peer.host_run(
                softrdma_argv(host_args), timeout=RUN_TIMEOUT, env=softrdma_env()
            )
        except subprocess.TimeoutExpired as e:
            client = CommandResult(-9, _text(e.stdout), _text(e.stderr) + "\n[timed out]")
        try:
            linux = server.wait(RUN_TIMEOUT if client.returncode == 0 else 20.0)
        except VmCommandTimeout as e:
            linux = CommandResult(-9, e.stdout, e.stderr + "\n[timed out]")
        except TimeoutError:
            linux = server.stop() or CommandResult(-9, "", "[no result]")
    finally:
        server.stop()
    return client, linux


def softrdma_server_linux_client(
    peer: LinuxPeer, args: list[str], port: int, extra_host_args: list[str] | None = None
) -> tuple[CommandResult, CommandResult]:
    """``softrdma rc-pingpong ARGS --ip HOST`` on the host, ``ibv_rc_pingpong ARGS HOST`` in the VM.

    Returns (softrdma, linux).
    """
    proc = peer.host_popen(
        softrdma_argv([*args, "--ip", peer.host_ip, *(extra_host_args or [])]), env=softrdma_env()
    )
    try:
        deadline = time.monotonic() + 60.0
        while not peer.host_run(["ss", "-Hltn", f"sport = :{port}"], timeout=30).stdout.strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                out, err = proc.communicate(timeout=30)
                failed = CommandResult(proc.returncode, out, err)
                pytest.fail(describe("softrdma server (never listened on its port)", failed))
            time.sleep(0.2)
        try:
            linux = peer.run(["ibv_rc_pingpong", *args, peer.host_ip], timeout=RUN_TIMEOUT)
        except VmCommandTimeout as e:
            linux = CommandResult(-9, e.stdout, e.stderr + "\n[timed out]")
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT if linux.returncode == 0 else 20.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=30)
            err += "\n[killed: did not finish]"
        server = CommandResult(proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    return server, linux


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def check_exchange(
    peer: LinuxPeer, softrdma: CommandResult, linux: CommandResult, size: int, iters: int
) -> None:
    report = describe("softrdma", softrdma) + "\n" + describe("ibv_rc_pingpong", linux)
    assert softrdma.returncode == 0, report
    assert linux.returncode == 0, report
    assert "invalid data" not in softrdma.stdout + linux.stdout, report
    ours = parse_output(softrdma.stdout, "softrdma")
    theirs = parse_output(linux.stdout, "ibv_rc_pingpong")
    for out in (ours, theirs):
        assert out.nbytes == size * iters * 2, report
        assert out.iters == iters, report
    assert ours.local.gid == IPv6Address(f"::ffff:{peer.host_ip}"), report
    assert ours.remote.gid == IPv6Address(f"::ffff:{peer.vm_ip}"), report
    # Each side saw what the other announced.
    assert ours.remote == theirs.local, report
    assert theirs.remote == ours.local, report
    assert ours.local.lid == 0 and theirs.local.lid == 0  # RoCE: no LIDs


ROLES = ["linux-server", "softrdma-server"]


def exchange(
    peer: LinuxPeer, role: str, args: list[str], port: int, extra_host_args: list[str] | None = None
) -> tuple[CommandResult, CommandResult]:
    if role == "linux-server":
        return linux_server_softrdma_client(peer, args, port, extra_host_args)
    return softrdma_server_linux_client(peer, args, port, extra_host_args)


@pytest.mark.parametrize("role", ROLES)
def test_default_port_and_size(linux_peer: LinuxPeer, role: str) -> None:
    """No -p, no -s: TCP port 18515 and 4096-byte messages, as the C tool."""
    iters = 20
    softrdma, linux = exchange(linux_peer, role, ["-g", "1", "-n", str(iters)], DEFAULT_PORT)
    check_exchange(linux_peer, softrdma, linux, 4096, iters)


NUM = r"\d+\.\d\d"


def addr_line(kind: str, ipv4: str) -> str:
    """The pattern of rc_pingpong.c's "%s address: LID 0x%04x, QPN 0x%06x, PSN 0x%06x, GID %s"."""
    label = {"local": "  local address:  ", "remote": "  remote address: "}[kind]
    return rf"{label}LID 0x0000, QPN 0x[0-9a-f]{{6}}, PSN 0x[0-9a-f]{{6}}, GID ::ffff:{re.escape(ipv4)}"


@pytest.mark.parametrize("role", ROLES)
def test_output_format(linux_peer: LinuxPeer, role: str) -> None:
    """softrdma prints the lines ibv_rc_pingpong prints, character for character apart
    from the numbers (GIDs as inet_ntop writes them: ::ffff:10.77.0.2)."""
    iters = 10
    port = next(_ports)
    softrdma, linux = exchange(
        linux_peer, role, ["-g", "1", "-p", str(port), "-n", str(iters)], port
    )
    check_exchange(linux_peer, softrdma, linux, 4096, iters)
    ours = softrdma.stdout.splitlines()
    theirs = linux.stdout.splitlines()
    host, vm = linux_peer.host_ip, linux_peer.vm_ip
    assert len(ours) == len(theirs) == 4, f"{ours}\n{theirs}"
    assert re.fullmatch(addr_line("local", host), ours[0]), ours[0]
    assert re.fullmatch(addr_line("remote", vm), ours[1]), ours[1]
    assert re.fullmatch(rf"{4096 * iters * 2} bytes in {NUM} seconds = {NUM} Mbit/sec", ours[2])
    assert re.fullmatch(rf"{iters} iters in {NUM} seconds = {NUM} usec/iter", ours[3])
    # The patterns fit ibv_rc_pingpong's own lines (addresses swapped).
    assert re.fullmatch(addr_line("local", vm), theirs[0]), theirs[0]
    assert re.fullmatch(addr_line("remote", host), theirs[1]), theirs[1]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("size", "iters"), SIZES, ids=[f"s{s}" for s, _ in SIZES])
def test_sizes(linux_peer: LinuxPeer, role: str, size: int, iters: int) -> None:
    port = next(_ports)
    args = ["-g", "1", "-p", str(port), "-s", str(size), "-n", str(iters)]
    softrdma, linux = exchange(linux_peer, role, args, port)
    check_exchange(linux_peer, softrdma, linux, size, iters)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("size", [4096, 65536])
def test_validate(linux_peer: LinuxPeer, role: str, size: int) -> None:
    """-c on both sides: the receiving side checks the buffer (rdma-core: first byte per page)."""
    port = next(_ports)
    iters = 10
    args = ["-g", "1", "-p", str(port), "-s", str(size), "-n", str(iters), "-c"]
    softrdma, linux = exchange(linux_peer, role, args, port)
    check_exchange(linux_peer, softrdma, linux, size, iters)


@pytest.mark.parametrize("role", ROLES)
def test_events_mode(linux_peer: LinuxPeer, role: str) -> None:
    """-e: both sides sleep on completion events instead of polling."""
    port = next(_ports)
    args = ["-g", "1", "-p", str(port), "-n", "20", "-e"]
    softrdma, linux = exchange(linux_peer, role, args, port)
    check_exchange(linux_peer, softrdma, linux, 4096, 20)


# ---------------------------------------------------------------- pcap

ROCE_PORT = 4791
OP_SEND_ONLY = 0x04
OP_SEND_FIRST, OP_SEND_MIDDLE, OP_SEND_LAST = 0x00, 0x01, 0x02
OP_ACK = 0x11


def roce_frames(path: Path) -> list[tuple[str, str, int, int]]:
    """(src ip, dst ip, BTH opcode, PSN) of every RoCEv2 frame in a pcap file.

    Classic pcap, either byte order, Ethernet (1), raw IP (101) or IPv4 (228)
    link type; written here rather than with softrdma's own reader.
    """
    data = path.read_bytes()
    assert len(data) >= 24, f"{path}: no pcap header"
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise AssertionError(f"{path}: not a classic pcap file (magic {magic.hex()})")
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    assert linktype in (1, 101, 228), f"{path}: unexpected link type {linktype}"
    frames = []
    off = 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack(endian + "IIII", data[off : off + 16])
        pkt = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if linktype == 1:
            if len(pkt) < 14 or pkt[12:14] != b"\x08\x00":
                continue
            pkt = pkt[14:]
        if len(pkt) < 20 or pkt[0] >> 4 != 4 or pkt[9] != 17:
            continue
        ihl = (pkt[0] & 0x0F) * 4
        udp = pkt[ihl:]
        if len(udp) < 8 + 12 or struct.unpack("!H", udp[2:4])[0] != ROCE_PORT:
            continue
        bth = udp[8:20]
        src = ".".join(str(b) for b in pkt[12:16])
        dst = ".".join(str(b) for b in pkt[16:20])
        frames.append((src, dst, bth[0], int.from_bytes(bth[9:12], "big")))
    return frames


@pytest.mark.parametrize("role", ROLES)
def test_pcap_has_frames_both_ways(linux_peer: LinuxPeer, role: str, tmp_path: Path) -> None:
    pcap = tmp_path / f"rc-pingpong-{role}.pcap"
    port = next(_ports)
    iters = 10
    size = 2048  # two packets per message at MTU 1024: SEND_FIRST + SEND_LAST
    args = ["-g", "1", "-p", str(port), "-s", str(size), "-n", str(iters)]
    softrdma, linux = exchange(linux_peer, role, args, port, ["--pcap", str(pcap)])
    check_exchange(linux_peer, softrdma, linux, size, iters)
    assert pcap.exists(), describe("softrdma", softrdma)
    frames = roce_frames(pcap)
    host, vm = linux_peer.host_ip, linux_peer.vm_ip
    out = [f for f in frames if (f[0], f[1]) == (host, vm)]
    back = [f for f in frames if (f[0], f[1]) == (vm, host)]
    assert out and back, f"frames {host}->{vm}: {len(out)}, {vm}->{host}: {len(back)}"
    assert len(out) + len(back) == len(frames)
    for direction in (out, back):
        opcodes = {f[2] for f in direction}
        # Each side sends `iters` two-packet messages and acknowledges the other's.
        assert {OP_SEND_FIRST, OP_SEND_LAST} <= opcodes, sorted(opcodes)
        assert OP_ACK in opcodes, sorted(opcodes)
        firsts = [f for f in direction if f[2] == OP_SEND_FIRST]
        assert len({f[3] for f in firsts}) == iters  # distinct PSNs; retransmits repeat one


def test_linux_client_to_missing_server_fails_cleanly(linux_peer: LinuxPeer) -> None:
    """Sanity check of the harness itself: nothing listening -> the Linux client exits non-zero."""
    port = next(_ports)
    result = linux_peer.run(
        ["ibv_rc_pingpong", "-g", "1", "-p", str(port), linux_peer.host_ip], timeout=60
    )
    assert result.returncode != 0
    assert "Couldn't connect" in result.stdout + result.stderr


def test_vm_is_still_healthy(linux_peer: LinuxPeer) -> None:
    """After all the exchanges above, rxe0 is still up and the kernel logged no warning."""
    try:
        dmesg = linux_peer.run(["dmesg"], check=True).stdout
    except VmError as e:  # pragma: no cover - diagnostic
        pytest.fail(f"VM not answering: {e}\n{linux_peer.console_text()}")
    assert not re.search(r"BUG:|Oops|Call Trace", dmesg), dmesg
    assert "PORT_ACTIVE" in linux_peer.run(["ibv_devinfo"], check=True).stdout
