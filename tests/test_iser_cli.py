"""``softrdma iser target`` in its own process on a loopback address, over
real UDP, with an :class:`~softrdma.ulp.iser.IserInitiator` in the test
process on a :class:`UdpNetwork` device: the IQN and ``iscsiadm`` lines,
the login / logout / rejected-login log lines, WRITE and READ through the
served image and the bytes in the image file after SIGTERM, and bad
arguments as one line with exit status 1. Every wait is bounded and every
process killed if a test leaves it running."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from softrdma.cli.iser import default_iqn, iscsiadm_lines
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.udp import UdpNetwork
from softrdma.ulp.iser import IserInitiator
from softrdma.ulp.iser.initiator import IserInitiatorError
from tests.fabric.netaddr import loopback_addresses
from tests.rdma.nodes import make_device

TIMEOUT = 20.0
"""Bound on every wait for the target process or the network."""
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
IQN_LINE = r"iqn: (\S+)"
DEFAULT_IQN = r"iqn\.2003-01\.org\.linux-iscsi\.[a-z0-9-]+\.x8664:sn\.[0-9a-f]{12}"
ISID = 0x00023D000001


SRC = Path(__file__).resolve().parents[1] / "src"


def softrdma(*args: str) -> list[str]:
    return [sys.executable, "-m", "softrdma", "iser", *args]


def softrdma_env() -> dict[str, str]:
    """The environment of a ``softrdma`` subprocess: this tree's sources
    first, whatever copy of the package is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class TargetProcess:
    """``softrdma iser target`` running, its output going to files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    iqn: str = ""

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_line(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first stdout line matching ``pattern`` (whole line), waiting
        up to ``timeout`` seconds for it."""
        end = time.monotonic() + timeout
        while True:
            for line in self.stdout().splitlines():
                m = re.fullmatch(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(
                    f"no line {pattern!r} from the target (exit {self.proc.poll()}):\n"
                    f"{self.stdout()}\n{self.stderr()}"
                )
            time.sleep(0.05)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(TIMEOUT)


@contextlib.contextmanager
def target_process(tmp: Path, *args: str) -> Iterator[TargetProcess]:
    """The target started with ``args`` and up (its last ``iscsiadm``
    line printed); killed if the test leaves it running."""
    out, err = tmp / "target.out", tmp / "target.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(softrdma("target", *args), stdout=o, stderr=e, env=softrdma_env())
    try:
        t = TargetProcess(proc, out, err)
        t.iqn = t.wait_line(IQN_LINE).group(1)
        t.wait_line(r"iscsiadm -m node .* --login")
        yield t
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def initiator_device(ip: str) -> Iterator[RoceDevice]:
    """A device on a UDP network of the test process (real time)."""
    net = UdpNetwork()
    dev: RoceDevice | None = None
    try:
        dev = make_device("cpu", net, ip, netdev_mtu=None)
        yield dev
    finally:
        if dev is not None:
            dev.unregister()
        net.close()


def test_serves_the_image_logs_logins_and_logs_out_on_sigterm(tmp_path: Path) -> None:
    ip_i, ip_t = loopback_addresses(2)
    image = tmp_path / "disk.img"
    args = [str(image), "--ip", ip_t, "--create-size", "1M", "--port", "3260"]
    with target_process(tmp_path, *args) as target, initiator_device(ip_i) as dev:
        assert re.fullmatch(DEFAULT_IQN, target.iqn), target.iqn
        out = target.stdout()
        assert re.search(rf"^{STAMP} serving .*disk\.img as LUN 0: 2048 blocks of 512 bytes "
                         r"\(1 MiB, read-write\)$", out, re.M)  # fmt: skip
        for line in iscsiadm_lines(target.iqn, ip_t, 3260):
            assert f"\n{line}\n" in out
        assert f"iscsiadm -m node -T {target.iqn} -p {ip_t}:3260 -I iser --login" in out
        # open-iscsi's iface "iser" is built in: "-m iface -I iser -o new" fails
        # ("a special interface"), so the lines are the node entry and the login.
        assert iscsiadm_lines(target.iqn, ip_t, 3260) == [
            f"iscsiadm -m node -o new -T {target.iqn} -p {ip_t}:3260 -I iser",
            f"iscsiadm -m node -T {target.iqn} -p {ip_t}:3260 -I iser --login",
        ]
        assert "-m iface" not in out
        ini = IserInitiator(dev, ip_t, 3260, target_name=target.iqn, isid=ISID, timeout=TIMEOUT)
        try:
            ini.login()
            who = rf"initiator {re.escape(ini.initiator_name)} ISID 0x{ISID:012x} from " \
                  rf"{re.escape(ip_i)}:\d+"  # fmt: skip
            target.wait_line(rf"{STAMP} login: {who} \(connection 1\)")
            assert ini.inquiry() is not None
            data = bytes(i * 7 & 0xFF for i in range(24 * 512))
            ini.write(100, data)
            big = bytes(range(256)) * (64 * 1024 // 256)  # past the immediate data: RDMA READ
            ini.write(1000, big)
            ini.sync()
            assert ini.read(100, 24) == data
            assert ini.read(1000, len(big) // 512) == big
            assert target.stop() == 0, target.stderr()
        finally:
            ini.close()
    out = target.stdout()
    assert re.search(rf"^{STAMP} stopping \(SIGTERM\): logging out 1 initiator$", out, re.M), out
    assert re.search(rf"^{STAMP} logout: {who} \(connection 1\): target stopping$", out, re.M), out
    assert re.search(rf"^{STAMP} stopped$", out, re.M), out
    assert target.stderr() == ""
    disk = image.read_bytes()
    assert len(disk) == 1 << 20
    assert disk[100 * 512 : 124 * 512] == data
    assert disk[1000 * 512 : 1000 * 512 + len(big)] == big


def test_logout_and_a_wrong_iqn_rejected(tmp_path: Path) -> None:
    ip_i, ip_t = loopback_addresses(2)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    iqn = "iqn.2024-01.org.example:disk1"
    args = [str(image), "--ip", ip_t, "--iqn", iqn, "--read-only", "--block-size", "4096"]
    with target_process(tmp_path, *args) as target, initiator_device(ip_i) as dev:
        assert target.iqn == iqn
        wrong = IserInitiator(dev, ip_t, target_name=iqn + "x", isid=ISID, timeout=TIMEOUT)
        try:
            with pytest.raises(IserInitiatorError, match="login failed"):
                wrong.login()
        finally:
            wrong.close()
        who = rf"initiator {re.escape(wrong.initiator_name)} ISID 0x{ISID:012x} from " \
              rf"{re.escape(ip_i)}:\d+"  # fmt: skip
        target.wait_line(rf"{STAMP} login rejected: {who}: .+")
        ini = IserInitiator(dev, ip_t, target_name=iqn, isid=ISID + 1, timeout=TIMEOUT)
        try:
            ini.login()
            assert ini.read(0, 2) == bytes(8192)
            ini.logout()
        finally:
            ini.close()
        who = rf"initiator {re.escape(ini.initiator_name)} ISID 0x{ISID + 1:012x} from " \
              rf"{re.escape(ip_i)}:\d+"  # fmt: skip
        target.wait_line(rf"{STAMP} login: {who} \(connection 2\)")
        target.wait_line(rf"{STAMP} logout: {who} \(connection 2\): logged out by the initiator")
        assert target.stop(signal.SIGINT) == 0, target.stderr()
    out = target.stdout()
    assert re.search(rf"^{STAMP} stopping \(SIGINT\): logging out 0 initiators$", out, re.M), out
    assert image.read_bytes() == bytes(1 << 20)


def test_the_iqn_line_is_the_given_one(tmp_path: Path) -> None:
    (ip,) = loopback_addresses(1)
    image = tmp_path / "disk.img"
    args = [str(image), "--ip", ip, "--create-size", "64k", "--iqn", "iqn.2024-01.org.example:d"]
    out, err = tmp_path / "o", tmp_path / "e"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(softrdma("target", *args), stdout=o, stderr=e, env=softrdma_env())
    try:
        end = time.monotonic() + TIMEOUT
        while "--login" not in out.read_text() and proc.poll() is None:
            assert time.monotonic() < end, out.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert "\niqn: iqn.2024-01.org.example:d\n" in out.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], r"the following arguments are required: IMAGE, --ip"),
        (["IMG", "--ip", "IP", "--bogus"], r"unrecognized arguments: --bogus"),
        (["IMG", "--ip", "0.0.0.0"], r"argument --ip: 0\.0\.0\.0: a target needs one address .*"),
        (["IMG", "--ip", "IP", "--block-size", "1024"], r"argument --block-size: invalid choice.*"),
        (
            ["IMG", "--ip", "IP", "--iqn", "disk1"],
            r"argument --iqn: invalid iSCSI name: 'disk1' .*",
        ),
        (["IMG", "--ip", "IP", "--port", "70000"], r"argument --port: invalid port: '70000' .*"),
        (
            ["MISSING", "--ip", "IP"],
            r".*missing\.img: no such image \(--create-size SIZE makes one\)",
        ),
        (["IMG", "--ip", "IP", "--create-size", "2M"], r".*disk\.img: exists with 1048576 .*"),
        (["IMG", "--ip", "IP", "-d", "mlx5_0"], r"no device 'mlx5_0' \(one of rxe0, hca0\)"),
        (["IMG", "--ip", "192.0.2.1"], r"192\.0\.2\.1 is not an address of this host"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_1(
    tmp_path: Path, args: list[str], message: str
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    (ip,) = loopback_addresses(1)
    subst = {"IMG": str(image), "MISSING": str(tmp_path / "missing.img"), "IP": ip}
    argv = softrdma("target", *(subst.get(a, a) for a in args))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=softrdma_env())
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    assert re.fullmatch(rf"softrdma iser target: {message}\n", proc.stderr), proc.stderr
    assert image.stat().st_size == 1 << 20


def test_a_missing_subcommand_is_one_line() -> None:
    proc = subprocess.run(
        softrdma(), capture_output=True, text=True, timeout=TIMEOUT, env=softrdma_env()
    )
    assert (proc.returncode, proc.stderr) == (
        1, "softrdma iser: the following arguments are required: SUBCOMMAND\n"
    )  # fmt: skip


def test_the_default_iqn_is_lio_style_and_stable() -> None:
    a = default_iqn(0x505400FFFE770001, "My_Host.example.org")
    assert re.fullmatch(r"iqn\.2003-01\.org\.linux-iscsi\.my-host\.x8664:sn\.[0-9a-f]{12}", a)
    assert a == default_iqn(0x505400FFFE770001, "my-host")
    assert a != default_iqn(0x505400FFFE770002, "my-host")
