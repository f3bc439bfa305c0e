"""The opt-in and ``softrdma pyverbs-path`` / ``pyverbs-tests``: our
pyverbs is importable only from the printed directory, and rdma-core's
suite runs against it with a compatible ``rdma`` on ``PATH``."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from softrdma.cli import main
from softrdma.cli.pyverbs import (
    DEBIAN_SUITE,
    SuiteCounts,
    parse_counts,
    prepare_suite,
    pyverbs_path,
)
from tests.pyverbs.conftest import pyverbs_env

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_plain_import_does_not_expose_our_pyverbs() -> None:
    """``import softrdma`` never makes softrdma's pyverbs importable (a
    real pyverbs, if installed, stays what ``import pyverbs`` finds)."""
    code = (
        "import importlib.util, softrdma, softrdma.cli.pyverbs\n"
        "spec = importlib.util.find_spec('pyverbs')\n"
        "print(spec.origin if spec else 'none')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert "_compat" not in out
    assert not (pyverbs_path() / "__init__.py").exists()  # _compat is not a package


def test_pyverbs_path_is_the_opt_in(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pyverbs-path"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == pyverbs_path() and (path / "pyverbs" / "__init__.py").is_file()
    code = "import pyverbs.device as d; print(d.__file__); print(d.get_device_list()[0].name)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=pyverbs_env() | {"SOFTRDMA_PYVERBS_DEVICES": "mydev:iommu"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith(str(path)) and out[1] == "b'mydev'"


def test_parse_counts() -> None:
    assert parse_counts("Ran 12 tests in 0.1s\n\nOK (skipped=3)\n") == SuiteCounts(12, skipped=3)
    counts = parse_counts("...\nRan 5 tests in 1.0s\n\nFAILED (failures=1, errors=2, skipped=1)\n")
    assert counts == SuiteCounts(5, failures=1, errors=2, skipped=1)
    assert counts is not None and counts.passed == 1
    assert parse_counts("Ran 2 tests in 0s\n\nOK\n") == SuiteCounts(2)
    assert parse_counts("Traceback: no summary") is None


def test_prepare_suite_gunzips(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "run_tests.py").write_text("print('hi')\n")
    with gzip.open(src / "base.py.gz", "wt") as f:
        f.write("X = 1\n")
    out = prepare_suite(src, tmp_path / "dest")
    assert (out / "base.py").read_text() == "X = 1\n" and (out / "run_tests.py").is_file()
    with pytest.raises(FileNotFoundError):
        prepare_suite(tmp_path / "dest", tmp_path / "again")


def test_a_suite_runs_with_rdma_on_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A small suite in rdma-core's layout: its test uses pyverbs and the
    ``rdma`` tool the runner provides, and the runner counts the outcome."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "run_tests.py").write_text(
        "import unittest, sys, os\n"
        "sys.path.insert(0, os.path.dirname(__file__))\n"
        "import test_dev\n"
        "unittest.main(module=test_dev)\n"
    )
    (suite / "test_dev.py").write_text(
        "import json, subprocess, unittest\n"
        "import pyverbs.device as d\n"
        "class T(unittest.TestCase):\n"
        "    def test_rdma_link(self):\n"
        "        links = json.loads(subprocess.check_output(['rdma', 'link', 'show', '-j']))\n"
        "        self.assertEqual([l['ifname'] for l in links], ['x0', 'y0'])\n"
        "        self.assertEqual([x.name for x in d.get_device_list()], [b'x0', b'y0'])\n"
        "    def test_skip(self):\n"
        "        raise unittest.SkipTest('not here')\n"
    )
    assert main(["pyverbs-tests", "--devices", "x0:cpu,y0:swiotlb", str(suite)]) == 0
    out = capsys.readouterr().out
    assert "pyverbs-tests: 2 run: 1 passed, 1 skipped, 0 failed, 0 errors" in out


def test_the_run_is_on_the_real_network_of_its_own_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default a run's devices are on the real network (its RDMA CM
    tests fork processes that must reach each other), on a loopback
    address drawn for the run; ``--network inproc`` keeps them in the
    process, and a network that is neither is refused."""
    monkeypatch.delenv("SOFTRDMA_PYVERBS_NETWORK", raising=False)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "run_tests.py").write_text(
        "import json, os, subprocess, unittest\n"
        "class T(unittest.TestCase):\n"
        "    def test_network(self):\n"
        "        [dev] = json.loads(subprocess.check_output(['ip', '-j', 'addr', 'show', 'srnet0']))\n"
        "        print('NET', os.environ['SOFTRDMA_PYVERBS_NETWORK'], dev['addr_info'])\n"
        "unittest.main()\n"
    )
    assert main(["pyverbs-tests", str(suite)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("NET")]
    net, info = line.split(" ", 2)[1:]
    # 127.X.Y.1, drawn per run; the netdev lists it
    assert net.startswith("udp:127.") and net.endswith(".1") and f"'{net[4:]}'" in info
    assert main(["pyverbs-tests", "--network", "inproc", str(suite)]) == 0
    assert "NET inproc []" in capsys.readouterr().out
    assert main(["pyverbs-tests", "--network", "tcp:1.2.3.4", str(suite)]) == 2
    assert "neither inproc nor udp[:ADDR]" in capsys.readouterr().err


def test_a_missing_suite_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pyverbs-tests", str(tmp_path / "nowhere")]) == 2
    assert "no such suite directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["pyverbs-tests", str(tmp_path / "empty")]) == 2
    assert "not an rdma-core test suite" in capsys.readouterr().err


def test_rdma_and_ip_tools_report_devices_and_netdevs(tmp_path: Path) -> None:
    """The ``rdma`` and ``ip`` the runner writes answer what rdma-core's
    ``base.py`` asks — ``rdma link show -j`` with each port's netdev, then
    ``ip -j addr show NETDEV`` — and refuse what they do not know, without
    touching the system's own tools."""
    from softrdma.cli import pyverbs as cli

    cli.write_tools(tmp_path)
    env = pyverbs_env() | {"SOFTRDMA_PYVERBS_DEVICES": "rxe0,hca1:iommu"}

    def run(*argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(tmp_path / argv[0]), *argv[1:]],
            env=env | extra,
            capture_output=True,
            text=True,
            timeout=60,
        )

    links = json.loads(run("rdma", "link", "show", "-j").stdout)
    assert links == [
        {
            "ifindex": 1 + i,
            "ifname": name,
            "port": 1,
            "state": "ACTIVE",
            "physical_state": "LINK_UP",
            "netdev": f"srnet{i}",
            "netdev_index": 100 + i,
        }
        for i, name in enumerate(("rxe0", "hca1"))
    ]
    text = run("rdma", "link").stdout
    assert text.splitlines()[0] == "link rxe0/1 state ACTIVE physical_state LINK_UP netdev srnet0"
    assert run("rdma", "route").returncode == 255
    # in-process devices: the netdev exists, with no address other processes reach
    [dev] = json.loads(run("ip", "-j", "addr", "show", "srnet1").stdout)
    assert (dev["ifname"], dev["address"], dev["addr_info"]) == ("srnet1", "02:00:7f:00:00:02", [])
    # on the real network: the device's UDP address, as base.py reads it
    udp = run("ip", "-j", "addr", "show", "srnet1", SOFTRDMA_PYVERBS_NETWORK="udp:127.0.0.5")
    [dev] = json.loads(udp.stdout)
    assert dev["addr_info"][0]["local"] == "127.0.0.6" and dev["address"] == "02:00:7f:00:00:06"
    assert len(json.loads(run("ip", "-j", "addr").stdout)) == 2
    assert "srnet0:" in run("ip", "addr", "show", "dev", "srnet0").stdout
    # no other interface, no other command: never the system's ip
    lo = run("ip", "-j", "addr", "show", "lo")
    assert lo.returncode == 1 and 'Device "lo" does not exist.' in lo.stderr
    assert run("ip", "route").returncode == 255


@pytest.mark.skipif(
    not (DEBIAN_SUITE / "run_tests.py").is_file(),
    reason=f"rdma-core's test suite is not installed ({DEBIAN_SUITE}; apt-get install python3-pyverbs)",
)
@pytest.mark.parametrize("kind", ["cpu", "iommu"])
def test_debian_suite(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """rdma-core's own suite (Debian's, rdma-core 44) runs unmodified: no
    test fails or errors, and the device, PD, MR, DM, CQ, CQEX, QP, QPEx,
    AH, atomic and traffic tests pass (the rest skip with a reason)."""
    status = main(["pyverbs-tests", "--devices", f"dev0:{kind}", "--timeout", "120"])
    out = capsys.readouterr().out
    counts = parse_counts(out)
    assert counts is not None, out[-2000:]
    assert status == 0 and counts.failures == counts.errors == 0, out[-4000:]
    assert counts.passed >= 85, str(counts)


def _python_with_real_pyverbs() -> str | None:
    """An interpreter (3.11+) where a real rdma-core pyverbs is installed."""
    for python in ("/usr/bin/python3",):
        if not Path(python).exists():
            continue
        probe = subprocess.run(
            [python, "-c", "import sys, pyverbs; assert sys.version_info >= (3, 11)"],
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            timeout=60,
        )
        if probe.returncode == 0:
            return python
    return None


REAL = _python_with_real_pyverbs()


@pytest.mark.skipif(REAL is None, reason="no interpreter with rdma-core's own pyverbs installed")
def test_opt_in_wins_over_an_installed_pyverbs() -> None:
    """With rdma-core's pyverbs installed, ``import pyverbs`` stays the real
    one after ``import softrdma``, and the opt-in path takes precedence."""
    assert REAL is not None
    code = "import softrdma, pyverbs; print(pyverbs.__file__)"
    plain = subprocess.run(
        [REAL, "-c", code], env={"PYTHONPATH": SRC}, capture_output=True, text=True, timeout=60
    )
    assert plain.returncode == 0 and str(pyverbs_path()) not in plain.stdout
    opted = subprocess.run(
        [REAL, "-c", code], env=pyverbs_env(), capture_output=True, text=True, timeout=60
    )
    assert opted.returncode == 0 and opted.stdout.startswith(str(pyverbs_path()))
