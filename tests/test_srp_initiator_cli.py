"""``softrdma srp initiator`` and ``softrdma srp demo``: the initiator in
its own processes over real UDP on loopback addresses, against ``softrdma
srp target`` in another — INQUIRY and READ CAPACITY as the image has them,
the pattern written, verified (and not verified under another seed), read
back as the image file holds it, unaligned ranges by read-modify-write, a
rejected login, a target that is not there, a read-only disk, SIGINT in
the middle of a write, a target stopping under it, bad arguments — and the
demo's every pairing with nothing for the DMA-API debug checker to report;
in one process, a target out of swiotlb space answering BUSY. Every process is bounded
in time and stopped."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from softrdma.cli.srp_initiator import first_mismatch, pattern, stream_blocks
from softrdma.fabric.inproc import Fabric
from softrdma.ulp.scsi import VERSION_SRP, FileBackstore, ScsiTarget
from softrdma.ulp.srp.initiator import SrpInitiator
from softrdma.ulp.srp.target import SrpTarget
from tests.fabric.netaddr import loopback_addresses
from tests.rdma.nodes import make_device
from tests.test_srp_cli import STAMP, TargetProcess, node_guid, softrdma

TIMEOUT = 60.0
"""Bound on every process and every wait (a loaded machine is slow to start
Python); the normal run takes a second or two each."""
DD_LINE = (
    r"(\d+) bytes \([0-9.]+ MB, [0-9.]+ MiB\) {what} at offset (\d+), [0-9.]+ s, [0-9.]+ MB/s\n"
)


@contextlib.contextmanager
def serving(tmp: Path, image: Path, ip: str, *args: str) -> Iterator[TargetProcess]:
    """``softrdma srp target IMAGE --ip ip args`` up (its ``add_target``
    line printed); killed if the test leaves it running."""
    out, err = tmp / "target.out", tmp / "target.err"
    argv = softrdma("target", str(image), "--ip", ip, *args)
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(argv, stdout=o, stderr=e)
    try:
        target = TargetProcess(proc, out, err)
        m = target.wait_line(r"add_target: id_ext=\w+,ioc_guid=\w+,dest=[0-9.]+:(\d+)", TIMEOUT)
        target.port = int(m.group(1))
        yield target
        assert target.terminate() == 0, target.stderr()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)


def initiator(
    target: str, ip: str, *args: str, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    """``softrdma srp initiator --target target --ip ip args``, to its end
    (killed after ``timeout`` seconds)."""
    argv = softrdma("initiator", "--target", target, "--ip", ip, *args)
    return subprocess.run(argv, capture_output=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The stdout of a run that succeeded with nothing on stderr."""
    assert (proc.returncode, proc.stderr) == (0, b""), proc
    return proc.stdout.decode()


def one_line(proc: subprocess.CompletedProcess[bytes], message: str) -> None:
    """The run failed with exit status 1 and one line on stderr."""
    assert proc.returncode == 1, proc
    text = proc.stderr.decode()
    assert re.fullmatch(rf"softrdma srp initiator: {message}\n", text), text


# --------------------------------------------------------------------------- the pattern


def test_the_pattern_depends_only_on_seed_and_offset() -> None:
    whole = pattern(7, 1000, 20000)
    assert len(whole) == 20000
    for off, n in [(0, 1), (3095, 2), (4096 - 1000, 4096), (12345, 7000), (19999, 1)]:
        assert pattern(7, 1000 + off, n) == whole[off : off + n]
    assert pattern(8, 1000, 20000) != whole
    assert pattern(7, 0, 0) == b""
    assert first_mismatch(whole, whole) is None
    broken = bytearray(whole)
    broken[9876] ^= 1
    assert first_mismatch(broken, whole) == 9876
    assert first_mismatch(whole[:5], whole) == 5


def test_a_target_out_of_mapping_space_answers_busy(tmp_path: Path) -> None:
    """In one process: a target whose swiotlb pool (2 MiB) cannot hold what
    the initiator sends at once answers BUSY for the commands it
    cannot map (ib_srpt's ``target_send_busy``) instead of dropping the
    channel; the initiator sends them again and everything lands."""
    fabric = Fabric(seed=5)
    idev = make_device("cpu", fabric, "10.0.0.1")
    tdev = make_device("hw-swiotlb", fabric, "10.0.0.2")
    backstore = FileBackstore(tmp_path / "disk.img", 512, size=16 << 20, create=True)
    scsi = ScsiTarget(transport_version=VERSION_SRP)
    scsi.add_lun(0, backstore)
    # 32 receive IUs (ib_srpt's 128 would not fit the pool); 62 commands in flight.
    target = SrpTarget(tdev.host, scsi, addr="10.0.0.2", rq_size=32)
    ini = SrpInitiator(idev, "10.0.0.2", id_ext=target.id_ext, ioc_guid=target.ioc_guid)
    ini.login()
    size = 4 << 20
    stream_blocks(ini, 0, size // 512, produce=lambda lba, n: pattern(3, lba * 512, n * 512))
    got: list[bytes] = []
    stream_blocks(ini, 0, size // 512, consume=lambda lba, data: got.append(data))
    assert b"".join(got) == pattern(3, 0, size)
    assert target.stats["busy"] > 0 and ini.stats.retries >= target.stats["busy"]
    assert target.stats["logins"] == 1 and ini.stats.reconnects == 0
    ini.close()
    target.close()
    backstore.close()
    for dev in (idev, tdev):
        dev.unregister()
        dev.dma_device.release()
        assert not dev.dma_device.platform.dma_debug.reports


# --------------------------------------------------------------------------- against a target


def test_info_write_verify_read(tmp_path: Path) -> None:
    ip_t, ip_i = loopback_addresses(2)
    image = tmp_path / "disk.img"
    with serving(tmp_path, image, ip_t, "--create-size", "8M") as target:
        dest = f"{ip_t}:{target.port}"
        lines = ok(initiator(dest, ip_i, "info")).splitlines()
        info = {k.strip(): v.strip() for k, v in (line.split(": ", 1) for line in lines)}
        assert (
            info.items()
            >= {
                "vendor": "SOFTRDMA",
                "product": "FILEIO",
                "revision": "0001",
                "block size": "512 bytes",
                "capacity": f"16384 blocks, {image.stat().st_size} bytes (8 MiB)",
                "target port ID": f"0x{node_guid(ip_t):016x}{node_guid(ip_t):016x}",
            }.items()
        )
        target.wait_line(rf"{STAMP} logout: initiator 0x\w+ from {re.escape(ip_i)}:\d+ "
                         r"\(channel 1\): initiator logout", TIMEOUT)  # fmt: skip

        # 1 MiB at 64 KiB: 22 commands, most of them in flight at once.
        out = ok(initiator(dest, ip_i, "write", "--offset", "64k", "--length", "1M",
                           "--seed", "5"))  # fmt: skip
        assert re.fullmatch(DD_LINE.format(what="written"), out), out
        assert image.read_bytes()[65536 : 65536 + (1 << 20)] == pattern(5, 65536, 1 << 20)
        out = ok(initiator(dest, ip_i, "verify", "--offset", "64k", "--length", "1M",
                           "--seed", "5"))  # fmt: skip
        assert re.fullmatch(DD_LINE.format(what="verified"), out), out
        # Any sub-range verifies by itself; another seed does not.
        ok(initiator(dest, ip_i, "verify", "--offset", "100001", "--length", "5000",
                     "--seed", "5"))  # fmt: skip
        bad = initiator(dest, ip_i, "verify", "--offset", "64k", "--length", "1M",
                        "--seed", "6")  # fmt: skip
        one_line(bad, r"mismatch at offset 65536: read 0x[0-9a-f]{2}, expected 0x[0-9a-f]{2}")
        # Outside what was written the disk is zeros, not the pattern.
        bad = initiator(dest, ip_i, "verify", "--offset", "60k", "--length", "8k", "--seed", "5")
        first = next(i for i, b in enumerate(pattern(5, 61440, 4096)) if b)
        one_line(bad, rf"mismatch at offset {61440 + first}: read 0x00, expected 0x[0-9a-f]{{2}}")

        got = initiator(dest, ip_i, "read", "--offset", "60k", "--length", "1100k")
        assert (got.returncode, got.stderr) == (0, b"")
        data = image.read_bytes()
        assert got.stdout == data[61440 : 61440 + 1100 * 1024]
        assert got.stdout[4096 : 4096 + (1 << 20)] == pattern(5, 65536, 1 << 20)
    log = target.stdout()
    assert len(re.findall(r"^\S+ \S+ login: ", log, re.M)) == 7  # one per run
    assert len(re.findall(r"\): initiator logout$", log, re.M)) == 7
    assert "login rejected" not in log and target.stderr() == ""


def test_unaligned_ranges_read_modify_write(tmp_path: Path) -> None:
    """On 4 KiB blocks: a write that starts and ends inside blocks keeps the
    bytes around it; one inside a single block too; reads and verifies of
    unaligned ranges; the HCA behind an IOMMU as the initiator's device."""
    ip_t, ip_i = loopback_addresses(2)
    image = tmp_path / "disk.img"
    before = os.urandom(1 << 20)
    image.write_bytes(before)
    with serving(tmp_path, image, ip_t, "--block-size", "4096", "-d", "hca0") as target:
        dest = f"{ip_t}:{target.port}"
        hca = ("-d", "hca0")
        ok(initiator(dest, ip_i, *hca, "write", "--offset", "1000", "--length", "70000",
                     "--seed", "3"))  # fmt: skip
        ok(initiator(dest, ip_i, *hca, "write", "--offset", "200005", "--length", "99",
                     "--seed", "4"))  # fmt: skip
        expect = bytearray(before)
        expect[1000:71000] = pattern(3, 1000, 70000)
        expect[200005:200104] = pattern(4, 200005, 99)
        assert image.read_bytes() == expect
        ok(initiator(dest, ip_i, "verify", "--offset", "1000", "--length", "70000",
                     "--seed", "3"))  # fmt: skip
        ok(initiator(dest, ip_i, "verify", "--offset", "200005", "--length", "99",
                     "--seed", "4"))  # fmt: skip
        one_line(
            initiator(dest, ip_i, "verify", "--offset", "999", "--length", "2", "--seed", "3"),
            rf"mismatch at offset 999: read 0x{before[999]:02x}, expected 0x[0-9a-f]{{2}}",
        )
        got = initiator(dest, ip_i, *hca, "read", "--offset", "999", "--length", "70003")
        assert got.returncode == 0 and got.stdout == bytes(expect[999:71002])
        one_line(
            initiator(dest, ip_i, "read", "--offset", "1048000", "--length", "1000"),
            r"read: bytes 1048000\.\.1048999 are beyond the end of the disk \(1048576 bytes\)",
        )


def test_rejected_and_failed_logins_are_one_line(tmp_path: Path) -> None:
    ip_t, ip_i, ip_none = loopback_addresses(3)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with serving(tmp_path, image, ip_t, "--read-only") as target:
        dest = f"{ip_t}:{target.port}"
        guid = f"{node_guid(ip_t):016x}"
        bad = initiator(dest, ip_i, "--id-ext", "1234", "--initiator-ext", "77", "info")
        one_line(
            bad,
            rf"login to {re.escape(dest)} rejected: SRP login rejected, reason "
            r"UNABLE_ASSOCIATE_CHANNEL \(0x00010003\) \(initiator port ID "
            rf"0x0000000000000077\w{{16}}, target port ID 0x0000000000001234{guid}\); "
            r"wrong --id-ext / --ioc-guid\?",
        )
        port_id = re.search(r"initiator port ID (0x\w+)", bad.stderr.decode())
        assert port_id is not None
        target.wait_line(rf"{STAMP} login rejected: initiator {port_id.group(1)} from "
                         rf"{re.escape(ip_i)}:\d+: an invalid target port identifier", TIMEOUT)  # fmt: skip
        one_line(
            initiator(f"{ip_t}:5600", ip_i, "info"),
            rf"cannot log in to {re.escape(ip_t)}:5600: nothing listens on port 5600 \(CM REJ\)",
        )
        # The read-only disk: the write fails with its sense, the login is undone.
        one_line(
            initiator(dest, ip_i, "write", "--length", "64k"),
            r"write: CHECK CONDITION, DATA_PROTECT, WRITE_PROTECTED \(0x27/0x00\)",
        )
        target.wait_line(rf"{STAMP} logout: .* \(channel \d+\): initiator logout", TIMEOUT)
    assert image.read_bytes() == bytes(1 << 20)
    # Nobody at the address: no answer within --timeout.
    start = time.monotonic()
    one_line(
        initiator(ip_none, ip_i, "--timeout", "2", "info"),
        rf"cannot log in to {re.escape(ip_none)}:5555: no answer within 2 s",
    )
    assert time.monotonic() - start < TIMEOUT / 2


def test_sigint_stops_the_write_and_logs_out(tmp_path: Path) -> None:
    ip_t, ip_i = loopback_addresses(2)
    image = tmp_path / "disk.img"
    with serving(tmp_path, image, ip_t, "--create-size", "512M") as target:
        argv = softrdma("initiator", "--target", ip_t, "--ip", ip_i,
                        "write", "--length", "512M", "--seed", "9")  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            target.wait_line(rf"{STAMP} login: .* \(channel 1\)", TIMEOUT)
            time.sleep(1.0)  # into the write
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)
        assert (proc.returncode, out, err) == (
            128 + signal.SIGINT, b"", b"softrdma srp initiator: interrupted by SIGINT\n"
        )  # fmt: skip
        target.wait_line(rf"{STAMP} logout: .* \(channel 1\): .*", TIMEOUT)
        # Each 4 KiB the write reached holds the pattern, the others zeros.
        with image.open("rb") as f:
            head = f.read(4 << 20)
        want = pattern(9, 0, len(head))
        for at in range(0, len(head), 4096):
            assert head[at : at + 4096] in (want[at : at + 4096], bytes(4096)), at


def test_a_target_that_stops_mid_write_is_one_line(tmp_path: Path) -> None:
    """The target logs the initiator out (a DREQ) while commands are in
    flight: they fail at once, one line, exit status 1, no reconnect."""
    ip_t, ip_i = loopback_addresses(2)
    image = tmp_path / "disk.img"
    with serving(tmp_path, image, ip_t, "--create-size", "512M") as target:
        argv = softrdma("initiator", "--target", ip_t, "--ip", ip_i,
                        "write", "--length", "512M")  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            target.wait_line(rf"{STAMP} login: .* \(channel 1\)", TIMEOUT)
            time.sleep(1.0)  # into the write
            target.proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)
        assert proc.returncode == 1 and out == b"", (out, err)
        assert re.fullmatch(
            rb"softrdma srp initiator: write: (channel closed|transport failed): "
            rb"target disconnected\n",
            err,
        ), err
        assert target.proc.wait(TIMEOUT) == 0
        target.wait_line(rf"{STAMP} logout: .* \(channel 1\): target stopping", TIMEOUT)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info"], r"the following arguments are required: --target"),
        (["--target", "nowhere", "info"], r"argument --target: invalid target 'nowhere' .*"),
        (["--target", "IP:0", "info"], r"argument --target: invalid port in .*"),
        (["--target", "IP", "format"], r"argument OPERATION: invalid choice: 'format' .*"),
        (["--target", "IP", "-d", "mlx5_0", "info"], r"no device 'mlx5_0' \(one of rxe0, hca0\)"),
        (
            ["--target", "192.0.2.1", "info"],
            r"192\.0\.2\.1 is not an address of this host: give --id-ext and --ioc-guid .*",
        ),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], message: str) -> None:
    (ip,) = loopback_addresses(1)
    argv = softrdma("initiator", *(a.replace("IP", ip) for a in args))
    proc = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
    one_line(proc, message)


def test_write_needs_a_length() -> None:
    (ip,) = loopback_addresses(1)
    proc = subprocess.run(softrdma("initiator", "--target", ip, "write"), capture_output=True,
                          timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 1
    assert (
        proc.stderr
        == b"softrdma srp initiator write: the following arguments are required: --length\n"
    )


# --------------------------------------------------------------------------- the demo


def test_srp_demo_runs_every_pairing_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "softrdma", "srp", "demo", "--size", "256k"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    kinds = ("cpu", "hw-direct", "hw-swiotlb", "hw-iommu")
    rows = {}
    for line in proc.stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())  # columns: two spaces or more apart
        if len(cells) == 10 and cells[0] in kinds:
            rows[cells[0], cells[1]] = cells
    assert set(rows) == {(i, t) for i in kinds for t in kinds}
    for (ikind, tkind), cells in rows.items():
        _, _, wr, rd, rdma, bounced, iovas, regs, debug, data = cells
        assert (debug, data) == ("clean", "verified"), cells
        assert float(wr) > 0 and float(rd) > 0
        reads, writes = map(int, rdma.split("/"))
        assert reads >= 6 and writes >= 6  # 256 KiB in 48 KiB commands each way
        reg, local_inv, _remote = map(int, regs.split("/"))
        assert reg == local_inv > 0
        assert (bounced != "-") == ("hw-swiotlb" in (ikind, tkind))
        assert (iovas != "-") == ("hw-iommu" in (ikind, tkind))
    assert not re.search(r"^    \S", proc.stdout, re.M)  # no problem listed under a row
