"""Interop VM support (see linuxvm.py): host helpers: cache directory, root and
host tools, process liveness, ``ip`` and cleanup of what killed runs left behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.interop.vm_common import (
    HOST_TOOLS,
    NETNS_PREFIX,
    RUN_DIR_PREFIX,
    CommandResult,
    InteropUnavailable,
    log,
)

# --------------------------------------------------------------------------- host


def cache_root() -> Path:
    """Where images live: $SOFTRDMA_INTEROP_CACHE, else $XDG_CACHE_HOME/softrdma/interop."""
    env = os.environ.get("SOFTRDMA_INTEROP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "softrdma" / "interop"


def require_root() -> None:
    if os.geteuid() != 0:
        raise InteropUnavailable("needs root (debootstrap, network namespaces, tap devices)")


def ensure_host_tools(tools: Sequence[str] = tuple(HOST_TOOLS), *, install: bool = True) -> None:
    """Make sure the host ``tools`` (default: QEMU, debootstrap, mkfs.ext4, ip) exist.

    As root, missing ones are installed with apt-get; otherwise, or if that
    fails, :class:`InteropUnavailable` names them.
    """
    missing = {tool: HOST_TOOLS[tool] for tool in tools if shutil.which(tool) is None}
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        pkgs = sorted(set(missing.values()))
        log.info("installing host tools: %s", " ".join(pkgs))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                ["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600, check=False
            )
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs],
                env=env,
                capture_output=True,
                timeout=1200,
                check=False,
            )
        missing = {tool: pkg for tool, pkg in missing.items() if shutil.which(tool) is None}
    if missing:
        what = ", ".join(f"{tool} (package {pkg})" for tool, pkg in sorted(missing.items()))
        raise InteropUnavailable(f"missing {what}")
    if not Path("/dev/net/tun").exists():
        raise InteropUnavailable("missing /dev/net/tun (tap devices)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _set_pdeathsig() -> None:
    """In the child: die with the parent, so a killed test run leaves no QEMU behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _ip(*args: str, timeout: float = 30.0, check: bool = True) -> CommandResult:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    result = CommandResult(proc.returncode, proc.stdout, proc.stderr)
    if check:
        result.check("ip " + " ".join(args))
    return result


def cleanup_stale_netns() -> list[str]:
    """Delete namespaces left by earlier runs whose process is gone; their names."""
    removed = []
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{NETNS_PREFIX}(\d+)-\d+", name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    return removed


def cleanup_stale_run_dirs() -> list[Path]:
    """Remove run directories (console logs, sockets) of earlier runs whose process is gone."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        m = re.fullmatch(rf"{RUN_DIR_PREFIX}(\d+)-\w+", path.name)
        if m and path.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
