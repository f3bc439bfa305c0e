"""softrdma processes on the host side of the VM's link, in its network
namespace: a long-running ``softrdma <ulp> target`` (:class:`HostTarget`,
:func:`host_target`) and a one-shot script printing a JSON result
(:func:`run_host_script`).

Support code, not a test module: ``test_srp_linux.py`` and
``test_iser_linux.py`` run their targets with it, ``test_srp_lio.py`` and
``test_iser_lio.py`` their initiator scripts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.interop.linuxvm import CommandResult, LinuxPeer

ROOT = Path(__file__).resolve().parents[2]
STEP_TIMEOUT = 120.0
"""Bound on each step in the VM (TCG; the slowest, mkfs, takes seconds)."""
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
"""The time stamp a ``softrdma`` target starts each line of its log with."""
STOP_TIMEOUT = 20.0
"""How long a target has to exit after SIGTERM before it is killed."""


def softrdma_env() -> dict[str, str]:
    """The environment of a host-side process: this checkout's ``src`` and
    root (for ``tests.interop`` scripts) on ``PYTHONPATH``, unbuffered
    output."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    paths = (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


@dataclass
class HostTarget:
    """A ``softrdma`` target process on the host side, its output in files."""

    peer: LinuxPeer
    proc: subprocess.Popen[str]
    out: Path
    err: Path
    timings: dict[str, float] = field(default_factory=dict)

    def stdout(self) -> str:
        return self.out.read_text()

    def describe(self) -> str:
        """The target's state and output and the VM's kernel log, for a
        failure message."""
        dmesg = self.peer.run(["dmesg"], timeout=30).stdout
        return (
            f"--- target (exit {self.proc.poll()}):\n{self.stdout()[-4000:]}\n"
            f"{self.err.read_text()[-3000:]}\n--- VM dmesg:\n{dmesg[-5000:]}"
        )

    def wait_lines(self, pattern: str, count: int, timeout: float) -> list[str]:
        """Wait until ``count`` stdout lines match ``pattern``; those lines."""
        end = time.monotonic() + timeout
        while True:
            lines = [ln for ln in self.stdout().splitlines() if re.fullmatch(pattern, ln)]
            if len(lines) >= count:
                return lines
            if self.proc.poll() is not None or time.monotonic() > end:
                pytest.fail(f"{count} lines {pattern!r} expected\n{self.describe()}")
            time.sleep(0.1)

    def vm(self, what: str, script: str, timeout: float = STEP_TIMEOUT) -> CommandResult:
        """Run a step in the VM; it must succeed. Its time is added to
        ``timings[what]``."""
        t0 = time.monotonic()
        result = self.peer.run(script, timeout=timeout)
        self.timings[what] = self.timings.get(what, 0.0) + time.monotonic() - t0
        if result.returncode != 0:
            pytest.fail(
                f"{what}: exit {result.returncode}\n{result.stdout[-3000:]}\n"
                f"{result.stderr[-3000:]}\n{self.describe()}"
            )
        return result

    def wait_dmesg(self, done: Callable[[str], bool], timeout: float) -> str:
        """Poll the VM's kernel log until ``done(log)`` holds (it must
        within ``timeout`` seconds); the log."""
        end = time.monotonic() + timeout
        while not done(dmesg := self.peer.run(["dmesg"], timeout=30).stdout):
            assert time.monotonic() < end, dmesg
            time.sleep(0.5)
        return dmesg

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


T = TypeVar("T", bound=HostTarget)


@contextmanager
def host_target(
    peer: LinuxPeer, tmp: Path, kind: type[T], args: list[str], cleanup: str
) -> Iterator[T]:
    """``python3 -m softrdma ARGS`` in the namespace, its output in
    ``tmp``; afterwards the VM-side ``cleanup`` script runs (whatever
    happened, nothing of the target's stays in the shared VM) and the
    target is stopped."""
    out, err = tmp / "target.out", tmp / "target.err"
    argv = [sys.executable, "-m", "softrdma", *args]
    with out.open("w") as o, err.open("w") as e:
        proc = peer.host_popen(argv, env=softrdma_env(), stdout=o, stderr=e)
    target = kind(peer, proc, out, err)
    try:
        yield target
    finally:
        with suppress(Exception):
            peer.run(cleanup, timeout=STEP_TIMEOUT)
        target.stop()


def run_host_script(
    peer: LinuxPeer, module: str, args: list[str], timeout: float
) -> tuple[int, dict[str, Any], str]:
    """Run ``python3 -m MODULE ARGS`` in the namespace, bounded by
    ``timeout``: its exit status, the JSON object of its last stdout line
    and its stderr. No JSON is a failure of the test."""
    argv = [sys.executable, "-m", module, *args]
    result = peer.host_run(argv, timeout=timeout, env=softrdma_env())
    lines = result.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1]) if lines else {}
    except ValueError:
        out = {}
    if not out:
        pytest.fail(f"{module}: exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result.returncode, out, result.stderr
