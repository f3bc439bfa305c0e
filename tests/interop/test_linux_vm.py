"""Self-checks of the interop VM, without softrdma: Linux rxe against itself."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest

from tests.interop.linuxvm import CommandResult, LinuxPeer

pytestmark = pytest.mark.interop

RESULT_BYTES = re.compile(r"^(\d+) bytes in ([\d.]+) seconds = ([\d.]+) Mbit/sec$", re.M)
RESULT_ITERS = re.compile(r"^(\d+) iters in ([\d.]+) seconds = ([\d.]+) usec/iter$", re.M)


def test_vm_versions(linux_peer: LinuxPeer) -> None:
    assert linux_peer.image is not None
    assert "6.1." in linux_peer.uname
    versions = linux_peer.image.packages
    assert versions["rdma-core"].startswith("44.")
    assert linux_peer.run(["lsmod"]).stdout.count("rdma_rxe") >= 1
    # The boot time is recorded; its budget is the harness's boot timeout, not a test.
    assert linux_peer.boot_seconds is not None and linux_peer.boot_seconds > 0


def test_ibv_devinfo_shows_rxe0(linux_peer: LinuxPeer) -> None:
    result = linux_peer.run(["ibv_devinfo", "-v", "-d", linux_peer.rxe_name], check=True)
    out = result.stdout
    assert f"hca_id:\t{linux_peer.rxe_name}" in out
    assert "transport:\t\t\tInfiniBand (0)" in out
    assert "PORT_ACTIVE" in out
    assert re.search(r"link_layer:\s+Ethernet", out)
    assert re.search(r"active_mtu:\s+1024 \(3\)", out)  # MTU 1500 -> RoCE path MTU 1024
    assert re.search(rf"GID\[\s*1\]:\s+::ffff:{re.escape(linux_peer.vm_ip)}, RoCE v2", out), out
    # GID 0 is the link-local default GID from the MAC; node GUID from the MAC too.
    assert re.search(r"GID\[\s*0\]:\s+fe80::5054:ff:fe77:1, RoCE v2", out)
    assert "node_guid:\t\t\t5054:00ff:fe77:0001" in out


def test_rdma_link_and_netdev(linux_peer: LinuxPeer) -> None:
    link = linux_peer.run(["rdma", "link", "show"], check=True).stdout
    assert re.search(rf"link {linux_peer.rxe_name}/1 state ACTIVE .*netdev eth0", link), link
    addr = linux_peer.run(["ip", "-o", "addr", "show", "dev", "eth0"], check=True).stdout
    assert f"{linux_peer.vm_ip}/{linux_peer.prefix_len}" in addr
    mtu = linux_peer.run(["cat", "/sys/class/net/eth0/mtu"], check=True).stdout.strip()
    assert mtu == str(linux_peer.mtu)


def _pingpong_in_vm(
    peer: LinuxPeer, server_addr: str, args: list[str], port: int
) -> tuple[CommandResult, CommandResult]:
    """ibv_rc_pingpong server and client, both in the VM (rxe talks to itself)."""
    argv = ["ibv_rc_pingpong", "-p", str(port), *args]
    server = peer.spawn(argv, timeout=120)
    try:
        peer.wait_listening(port, timeout=60)
        client = peer.run([*argv, server_addr], timeout=120)
        served = server.wait(60)
    finally:
        server.stop()
    return served, client


@pytest.mark.parametrize(
    ("server_addr", "extra", "port"),
    [
        ("127.0.0.1", [], 18601),
        ("10.77.0.1", [], 18602),
        ("127.0.0.1", ["-c"], 18603),
        ("127.0.0.1", ["-s", "65536"], 18604),
    ],
    ids=["loopback", "vm-ip", "validate", "64k"],
)
def test_ibv_rc_pingpong_within_vm(
    linux_peer: LinuxPeer, server_addr: str, extra: list[str], port: int
) -> None:
    iters = 5
    size = int(extra[1]) if extra[:1] == ["-s"] else 4096
    server, client = _pingpong_in_vm(
        linux_peer, server_addr, ["-g", "1", "-n", str(iters), *extra], port
    )
    for side, result in (("server", server), ("client", client)):
        assert result.returncode == 0, f"{side}: {result}"
        assert "invalid data" not in result.stdout + result.stderr
        m = RESULT_BYTES.search(result.stdout)
        assert m, f"{side}: {result.stdout}"
        assert int(m.group(1)) == size * iters * 2
        m = RESULT_ITERS.search(result.stdout)
        assert m and int(m.group(1)) == iters
        assert f"GID ::ffff:{linux_peer.vm_ip}" in result.stdout


def test_ibv_rc_pingpong_has_validate_flag(linux_peer: LinuxPeer) -> None:
    """rdma-core 44 prints its usage (to stdout, exit 1) for an unknown flag such as -h."""
    result = linux_peer.run(["ibv_rc_pingpong", "-h"])
    assert result.returncode == 1
    assert "-c, --chk" in result.stdout
    assert "(default 18515)" in result.stdout


UDP_PROBE = textwrap.dedent(
    """
    import socket, sys
    host = sys.argv[1]
    result = {}
    for port in (4791, 4792):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3.0)
        s.connect((host, port))
        try:
            # A bogus "RoCEv2" datagram: BTH opcode 0xff, garbage after it.
            s.send(bytes([0xFF]) + bytes(11) + b"softrdma-probe" + bytes(4))
            s.recv(100)
            result[port] = "answered"
        except ConnectionRefusedError:
            result[port] = "refused"
        except TimeoutError:
            result[port] = "silent"
        finally:
            s.close()
    print(result[4791], result[4792])
    """
)


def _udp_in_datagrams(peer: LinuxPeer) -> int:
    snmp = peer.run(["cat", "/proc/net/snmp"], check=True).stdout
    names, values = (line.split()[1:] for line in snmp.splitlines() if line.startswith("Udp:"))
    return int(dict(zip(names, values, strict=True))["InDatagrams"])


def test_udp_4791_reachable_from_host_netns(linux_peer: LinuxPeer) -> None:
    """From the host namespace, rxe's UDP port 4791 listens (no ICMP unreachable, unlike
    4792), it swallows a bogus datagram, and the VM and rxe0 are fine afterwards."""
    before = _udp_in_datagrams(linux_peer)
    probe = linux_peer.host_run([sys.executable, "-c", UDP_PROBE, linux_peer.vm_ip], timeout=60)
    assert probe.returncode == 0, probe
    assert probe.stdout.split() == ["silent", "refused"], probe
    assert _udp_in_datagrams(linux_peer) > before  # rxe's tunnel socket took it
    ping = linux_peer.run(["ping", "-c", "2", "-W", "5", linux_peer.host_ip], timeout=60)
    assert ping.returncode == 0, ping
    dmesg = linux_peer.run(["dmesg"], check=True).stdout
    assert not re.search(r"BUG:|Oops|Call Trace", dmesg), dmesg
    devinfo = linux_peer.run(["ibv_devinfo", "-d", linux_peer.rxe_name], check=True).stdout
    assert "PORT_ACTIVE" in devinfo
