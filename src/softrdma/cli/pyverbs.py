"""``softrdma pyverbs-path`` and ``softrdma pyverbs-tests``: the opt-in
pyverbs API of softrdma, and rdma-core's own test suite run against it.

``pyverbs-path`` prints the directory that holds softrdma's ``pyverbs``
package; put it first on ``PYTHONPATH`` to run pyverbs code on softrdma
devices (installing softrdma alone never makes ``pyverbs`` importable).

``pyverbs-tests [SUITE_DIR] [unittest args]`` runs an rdma-core ``tests``
directory unmodified: it copies the suite to a temporary directory
(gunzipping Debian's compressed files), runs its ``run_tests.py`` with
softrdma's pyverbs first on ``PYTHONPATH`` and compatible ``rdma`` and
``ip`` commands first on ``PATH`` — for the run only; they describe
softrdma's devices (``rdma link show -j`` with each port's ``netdev``,
``ip -j addr show NETDEV`` with its MAC and, on the real network, its
address) and never call the system's tools — and prints unittest's
output followed by the counts of passed, skipped, failed and erroring
tests. Without ``SUITE_DIR`` it uses the suite Debian ships in
``python3-pyverbs`` (``/usr/share/doc/rdma-core/tests``), installing that
package first when run as root. ``--devices`` sets the devices of the run
(``SOFTRDMA_PYVERBS_DEVICES``, e.g. ``hca0:iommu``), ``--network`` their
network (``SOFTRDMA_PYVERBS_NETWORK``): by default the real one, RoCEv2 over
UDP on a loopback address of the run's own, so that the suite's RDMA CM
tests reach the processes they fork (and two runs at once stay apart);
``inproc`` keeps every device inside its process.
"""

from __future__ import annotations

import argparse
import gzip
import ipaddress
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import softrdma

__all__ = [
    "DEBIAN_SUITE",
    "SuiteCounts",
    "build_parser",
    "parse_counts",
    "prepare_suite",
    "pyverbs_path",
    "run",
    "write_tools",
]

#: Where Debian's ``python3-pyverbs`` installs rdma-core's test suite.
DEBIAN_SUITE = Path("/usr/share/doc/rdma-core/tests")
#: The environment variable the devices are configured with.
ENV_DEVICES = "SOFTRDMA_PYVERBS_DEVICES"
#: The environment variable their network is configured with.
ENV_NETWORK = "SOFTRDMA_PYVERBS_NETWORK"
#: The netdev of the N-th device is ``NETDEV_PREFIX`` + N (``rdma link``'s
#: ``netdev``, answered by the runner's ``ip``).
NETDEV_PREFIX = "srnet"
#: ``netdev_index`` of the first device's netdev.
NETDEV_IFINDEX = 100

_RDMA_TOOL = '''#!{python}
"""A minimal ``rdma`` (iproute2) reporting softrdma's pyverbs devices."""
import json
import os
import sys

from pyverbs import _softrdma as sim

as_json = any(a in ("-j", "-json", "--json") for a in sys.argv[1:])
args = [a for a in sys.argv[1:] if a not in ("-j", "-json", "--json", "-p", "-pretty")]
specs = sim.parse_devices(os.environ.get(sim.ENV_DEVICES, sim.DEFAULT_DEVICES))
if args[:2] in (["link", "show"], ["link"], ["l", "show"], ["link", "list"]):
    # each device's port sits on its own netdev, answered by the runner's ip
    out = [
        {{"ifindex": i + 1, "ifname": s.name, "port": 1, "state": "ACTIVE",
          "physical_state": "LINK_UP", "netdev": f"{netdev}{{i}}",
          "netdev_index": {ifindex_base} + i}}
        for i, s in enumerate(specs)
    ]
elif args[:2] in (["dev", "show"], ["dev"], ["dev", "list"]):
    out = [
        {{"ifindex": i + 1, "ifname": s.name, "node_type": "ca", "fw": "0.1.0"}}
        for i, s in enumerate(specs)
    ]
else:
    print(f"rdma (softrdma): {{' '.join(sys.argv[1:])}} is not supported", file=sys.stderr)
    sys.exit(255)
if as_json:
    print(json.dumps(out))
elif args[0].startswith("l"):
    for o in out:
        print(f"link {{o['ifname']}}/1 state ACTIVE physical_state LINK_UP netdev {{o['netdev']}}")
else:
    for o in out:
        print(f"{{o['ifindex']}}: {{o['ifname']}}: node_type ca fw 0.1.0")
'''

_IP_TOOL = '''#!{python}
"""A minimal ``ip`` (iproute2) answering ``ip [-j] addr show [DEV]`` for the
netdevs of softrdma's pyverbs devices; it knows no other interface."""
import json
import os
import sys

from pyverbs import _softrdma as sim
from softrdma.fabric.link import mac_for_ip

as_json = any(a in ("-j", "-json", "--json") for a in sys.argv[1:])
args = [a for a in sys.argv[1:] if not a.startswith("-")]
specs = sim.parse_devices(os.environ.get(sim.ENV_DEVICES, sim.DEFAULT_DEVICES))
udp = sim.parse_network(os.environ.get(sim.ENV_NETWORK, ""))
if args[:1] not in (["addr"], ["address"], ["a"]) or args[1:2] not in ([], ["show"], ["list"]):
    print(f"ip (softrdma): {{' '.join(sys.argv[1:])}} is not supported", file=sys.stderr)
    sys.exit(255)
links = []
for i, s in enumerate(specs):
    ip = sim.device_address(udp, i)
    name = f"{netdev}{{i}}"
    # only an address on the real network reaches other processes; the
    # in-process fabric is the process's own, so it lists none
    addrs = [] if udp is None else [
        {{"family": "inet", "local": str(ip), "prefixlen": 8, "scope": "host", "label": name}}
    ]
    links.append({{"ifindex": {ifindex_base} + i, "ifname": name, "flags": ["UP", "LOWER_UP"],
                  "mtu": 1500, "operstate": "UP", "link_type": "ether",
                  "address": mac_for_ip(ip).hex(":"), "broadcast": "ff:ff:ff:ff:ff:ff",
                  "addr_info": addrs}})
want = args[3:4] if args[2:3] == ["dev"] else args[2:3]
if want:
    links = [link for link in links if link["ifname"] == want[0]]
    if not links:
        print(f'Device "{{want[0]}}" does not exist.', file=sys.stderr)
        sys.exit(1)
if as_json:
    print(json.dumps(links))
else:
    for link in links:
        print(f"{{link['ifindex']}}: {{link['ifname']}}: <UP,LOWER_UP> mtu 1500 state UP")
        print(f"    link/ether {{link['address']}} brd ff:ff:ff:ff:ff:ff")
        for a in link["addr_info"]:
            print(f"    inet {{a['local']}}/{{a['prefixlen']}} scope host {{a['label']}}")
'''


def write_tools(bindir: Path) -> None:
    """Write the run's ``rdma`` and ``ip`` into ``bindir`` (put first on
    ``PATH``): they describe softrdma's devices and their netdevs only,
    never calling the system's own tools."""
    for name, text in (("rdma", _RDMA_TOOL), ("ip", _IP_TOOL)):
        tool = bindir / name
        tool.write_text(
            text.format(python=sys.executable, netdev=NETDEV_PREFIX, ifindex_base=NETDEV_IFINDEX)
        )
        tool.chmod(0o755)


def pyverbs_path() -> Path:
    """The directory holding softrdma's ``pyverbs`` package (not itself a
    package, so nothing imports it by accident)."""
    return Path(softrdma.__file__).resolve().parent / "_compat"


@dataclass(frozen=True)
class SuiteCounts:
    """What unittest reported: tests run and their outcomes."""

    run: int
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    expected_failures: int = 0
    unexpected_successes: int = 0

    @property
    def passed(self) -> int:
        return (
            self.run
            - self.failures
            - self.errors
            - self.skipped
            - self.expected_failures
            - self.unexpected_successes
        )

    def __str__(self) -> str:
        return (
            f"{self.run} run: {self.passed} passed, {self.skipped} skipped, "
            f"{self.failures} failed, {self.errors} errors"
        )


_RAN = re.compile(r"^Ran (\d+) tests? in ")
_RESULT = re.compile(r"^(OK|FAILED)(?: \((.*)\))?\s*$")


def parse_counts(output: str) -> SuiteCounts | None:
    """The counts of unittest's summary (``Ran N tests`` then ``OK`` /
    ``FAILED (failures=.., errors=.., skipped=..)``), None without one."""
    run = None
    counts: dict[str, int] = {}
    for line in output.splitlines():
        m = _RAN.match(line)
        if m:
            run = int(m.group(1))
            counts = {}
            continue
        m = _RESULT.match(line)
        if m and run is not None and m.group(2):
            for part in m.group(2).split(","):
                key, _, value = part.strip().partition("=")
                if value.isdigit():
                    counts[key] = int(value)
    if run is None:
        return None
    return SuiteCounts(
        run,
        counts.get("failures", 0),
        counts.get("errors", 0),
        counts.get("skipped", 0),
        counts.get("expected failures", 0),
        counts.get("unexpected successes", 0),
    )


def prepare_suite(src: Path, dest: Path) -> Path:
    """Copy the suite at ``src`` to ``dest/tests``, gunzipping ``*.gz``
    files; returns the copy. Raises :class:`FileNotFoundError` when
    ``src`` has no ``run_tests.py``."""
    if not (src / "run_tests.py").is_file():
        raise FileNotFoundError(f"{src} is not an rdma-core test suite (no run_tests.py)")
    out = dest / "tests"
    out.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".gz":
            with gzip.open(f, "rb") as zin, open(out / f.stem, "wb") as zout:
                shutil.copyfileobj(zin, zout)
        else:
            shutil.copy2(f, out / f.name)
    return out


def _install_debian_suite(err: TextIO) -> None:
    """``apt-get install python3-pyverbs`` when root and apt-get exists."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    err.write("pyverbs-tests: installing python3-pyverbs for rdma-core's test suite\n")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "python3-pyverbs"]
    try:
        # a fresh machine may have no package lists yet: update, then retry
        for argv in (install, ["apt-get", "update", "-q"], install):
            done = subprocess.run(
                argv, env=env, stdout=subprocess.DEVNULL, check=False, timeout=APT_TIMEOUT
            )
            if argv is install and done.returncode == 0:
                return
    except subprocess.TimeoutExpired:
        err.write(f"pyverbs-tests: apt-get took over {APT_TIMEOUT:.0f} s; giving up\n")


APT_TIMEOUT = 600.0
"""Seconds one apt-get call may take."""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``pyverbs-path`` or ``pyverbs-tests``, by the
    parser's program name."""
    p = parser or argparse.ArgumentParser(prog="softrdma pyverbs-tests")
    if p.prog.endswith("pyverbs-path"):
        p.description = "Print the directory to put on PYTHONPATH for softrdma's pyverbs."
        return p
    p.description = "Run rdma-core's pyverbs test suite against softrdma's devices."
    p.usage = (
        "%(prog)s [--devices SPEC] [--network NET] [--timeout SECONDS] "
        "[SUITE_DIR] [unittest args ...]"
    )
    p.epilog = (
        f"SUITE_DIR defaults to {DEBIAN_SUITE} (python3-pyverbs, installed when run as root). "
        "Everything after SUITE_DIR goes to the suite's run_tests.py (test names, -v, -k ...); "
        "with no SUITE_DIR, put -- before options meant for it."
    )
    p.add_argument(
        "--devices",
        metavar="SPEC",
        help="devices of the run, name:kind[,...] with kind cpu, iommu, swiotlb, direct or coco "
        f"(default: ${ENV_DEVICES}, else rxe0:cpu)",
    )
    p.add_argument(
        "--network",
        metavar="NET",
        help="the devices' network: udp[:ADDR] (RoCEv2 over UDP, processes reach each other) "
        f"or inproc (default: ${ENV_NETWORK}, else udp on a loopback address of the run's own)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop the run after this long (default: no limit)",
    )
    p.add_argument("suite_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run ``pyverbs-path`` or ``pyverbs-tests``."""
    if args.command == "pyverbs-path":
        print(pyverbs_path())
        return 0
    return run_tests(args, sys.stdout, sys.stderr)


def run_tests(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``pyverbs-tests``: returns the suite's exit status (2 when it could
    not be run)."""
    extra: list[str] = [a for a in args.suite_args or [] if a != "--"]
    if args.network and not _valid_network(args.network):
        err.write(f"pyverbs-tests: --network {args.network}: neither inproc nor udp[:ADDR]\n")
        return 2
    suite = None
    if extra and Path(extra[0]).is_dir():
        suite = Path(extra.pop(0))
    elif extra and os.sep in extra[0]:
        err.write(f"pyverbs-tests: {extra[0]}: no such suite directory\n")
        return 2
    if suite is None:
        suite = DEBIAN_SUITE
        if not (suite / "run_tests.py").is_file():
            _install_debian_suite(err)
    with tempfile.TemporaryDirectory(prefix="softrdma-pyverbs-") as tmp:
        try:
            tests = prepare_suite(suite, Path(tmp))
        except (FileNotFoundError, OSError) as ex:
            err.write(f"pyverbs-tests: {ex}\n")
            return 2
        bindir = Path(tmp) / "bin"
        bindir.mkdir()
        write_tools(bindir)
        env = dict(os.environ)
        src = str(Path(softrdma.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(pyverbs_path()), src, *filter(None, [env.get("PYTHONPATH")])]
        )
        env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", "")])
        if args.devices:
            env[ENV_DEVICES] = args.devices
        if args.network:
            env[ENV_NETWORK] = args.network
        elif not env.get(ENV_NETWORK):
            env[ENV_NETWORK] = f"udp:{_run_address()}"
        cmd = [sys.executable, str(tests / "run_tests.py"), *extra]
        status, output = _stream(cmd, env, Path(tmp), out, args.timeout)
    counts = parse_counts(output)
    if counts is None:
        err.write(f"pyverbs-tests: the suite printed no unittest summary (exit {status})\n")
        return status or 2
    out.write(f"pyverbs-tests: {counts}\n")
    return status


def _valid_network(text: str) -> bool:
    """``inproc``, ``udp`` or ``udp:IPV4``, as the pyverbs machine reads
    ``SOFTRDMA_PYVERBS_NETWORK``."""
    kind, _, addr = text.partition(":")
    if text in ("inproc", "udp"):
        return True
    try:
        return kind == "udp" and ipaddress.IPv4Address(addr) is not None
    except ValueError:
        return False


def _run_address() -> str:
    """A loopback address for a run's first device (127.X.Y.1; the others
    follow it): every address of 127.0.0.0/8 is the host's own, and two
    runs at once are unlikely to draw the same one."""
    r = random.SystemRandom()
    return f"127.{r.randrange(1, 255)}.{r.randrange(256)}.1"


def _stream(
    cmd: list[str], env: dict[str, str], cwd: Path, out: TextIO, timeout: float | None
) -> tuple[int, str]:
    """Run ``cmd``, copying its output (stderr included) to ``out`` as it
    comes; ``(exit status, output)``. A run past ``timeout`` is killed."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer is not None:
        timer.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            lines.append(line)
        status = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, "".join(lines)
