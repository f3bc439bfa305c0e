"""A real Linux peer with Soft-RoCE (rdma_rxe) under QEMU, for interop tests.

Support code, not a test module. Three parts:

* :func:`build_image` debootstraps Debian bookworm (minbase plus the kernel,
  rdma-core and its tools, perftest, python3, tini, and LIO's targetcli with
  the D-Bus daemon it needs) into a cache directory outside the repository
  and turns it into a raw ext4 image (``mkfs.ext4 -d``, no loop mount) plus
  the kernel and initrd. The result is keyed by a hash of the recipe, built
  once and reused; a changed recipe builds a new one.
* :class:`LinuxPeer` boots that image with QEMU (TCG, no KVM needed) on a tap
  device inside a private network namespace: host side ``10.77.0.2/24``
  (MAC 52:54:00:77:00:02, fixed like the VM's, so host-side GIDs are), VM
  ``10.77.0.1/24``, MTU 1500, the VM's ``rxe0`` on its NIC. Host-side
  programs that talk to the VM run in that namespace
  (:meth:`LinuxPeer.netns_argv`, :meth:`LinuxPeer.host_popen`).
* A command agent in the VM (``vmagent.py``, started by ``vm-init.sh``)
  serves :meth:`LinuxPeer.run` and :meth:`LinuxPeer.spawn` over a
  virtio-serial port, so the VM network carries only the traffic under test
  and no ssh keys are involved. Both files are delivered at every boot on a
  small second disk, so editing them needs no image rebuild.

Environment: ``SOFTRDMA_INTEROP_CACHE`` (cache directory),
``SOFTRDMA_INTEROP_MIRROR`` (Debian mirror for debootstrap),
``SOFTRDMA_INTEROP_KEEP`` = 1 (keep the run directory with the serial console
log and QEMU's output after teardown).

Everything needs root (debootstrap, network namespaces, tap devices);
:class:`InteropUnavailable` says what is missing, and the tests turn it into
a skip.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

log = logging.getLogger("softrdma.interop")

HERE = Path(__file__).resolve().parent
#: Run inside the VM as its init (after the baked-in boot stub); not part of the image.
VM_INIT_SOURCE = HERE / "vm-init.sh"
#: The command agent run inside the VM; not part of the image.
VM_AGENT_SOURCE = HERE / "vmagent.py"

#: Bump to force a rebuild when something outside the hashed recipe changes.
IMAGE_RECIPE_VERSION = "1"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Installed with debootstrap --variant=minbase --include=...
PACKAGES: tuple[str, ...] = (
    "linux-image-amd64",  # its kernel ships rdma_rxe
    "kmod",
    "iproute2",  # ip, rdma, ss
    "rdma-core",
    "ibverbs-providers",  # librxe
    "ibverbs-utils",  # ibv_devinfo, ibv_rc_pingpong, ...
    "rdmacm-utils",  # rping, ucmatose, ...
    "perftest",  # ib_write_bw, ...
    "python3",  # the command agent
    "tini",  # PID 1 that reaps orphans
    "procps",
    "iputils-ping",
    "tcpdump",
    "targetcli-fb",  # LIO's shell (with python3-rtslib-fb); ib_srpt is in the kernel package
    "dbus",  # targetcli asks the system bus for tcmu-runner's backstores at start
)

#: Baked into the image as its init: mounts the tools disk (vdb) and runs the
#: init script from it, so the real init and the agent come from the checkout.
BOOT_STUB = """\
#!/bin/sh
# softrdma interop VM boot stub: run the init script from the tools disk.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /opt/softrdma
if mount -t ext4 -o ro /dev/vdb /opt/softrdma && [ -x /opt/softrdma/init ]; then
    exec /opt/softrdma/init
fi
echo "softrdma-vm-boot: no tools disk on /dev/vdb, powering off" >/dev/console
echo o >/proc/sysrq-trigger
sleep 60
"""
BOOT_STUB_PATH = "/usr/local/sbin/softrdma-vm-boot"

CONTROL_PORT_NAME = "org.softrdma.ctl"
NETNS_PREFIX = "srdma-"
RUN_DIR_PREFIX = "softrdma-vm-"
#: MAC of the VM's NIC; the node GUID rxe derives from it is 5054:00ff:fe77:0001,
#: as in the captures (SRP id_ext 505400fffe770001).
DEFAULT_VM_MAC = "52:54:00:77:00:01"
#: MAC of the host end (the tap); softrdma's devices take their GID 0 (and so an
#: SRP initiator port ID, fe80::5054:ff:fe77:2) from it.
DEFAULT_HOST_MAC = "52:54:00:77:00:02"

HOST_TOOLS: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "ip": "iproute2",
}


#: What booting needs (building also needs debootstrap).
BOOT_TOOLS = ("qemu-system-x86_64", "mkfs.ext4", "ip")


class InteropUnavailable(RuntimeError):
    """This machine cannot run the interop VM (missing tool, not root, ...)."""


class VmError(RuntimeError):
    """The VM failed to build, boot or answer."""


class VmCommandTimeout(VmError):
    """A command in the VM ran past its timeout and was killed there."""

    def __init__(self, argv: Sequence[str], timeout: float, stdout: str, stderr: str) -> None:
        super().__init__(
            f"{shlex.join(argv)} timed out after {timeout:g}s in the VM\n"
            f"--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-3000:]}"
        )
        self.argv = list(argv)
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr


class CommandResult(NamedTuple):
    """Exit status and output of a command (in the VM or on the host)."""

    returncode: int
    stdout: str
    stderr: str

    def check(self, what: str = "command") -> CommandResult:
        """Raise :class:`VmError` with the output unless the exit status is 0."""
        if self.returncode != 0:
            raise VmError(
                f"{what} exited {self.returncode}\n--- stdout ---\n{self.stdout[-3000:]}\n"
                f"--- stderr ---\n{self.stderr[-3000:]}"
            )
        return self


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


def find_mirror() -> str:
    """$SOFTRDMA_INTEROP_MIRROR, else the host's apt mirror for Debian, else deb.debian.org."""
    env = os.environ.get("SOFTRDMA_INTEROP_MIRROR")
    if env:
        return env
    paths = [Path("/etc/apt/sources.list")]
    with contextlib.suppress(OSError):
        paths += sorted(Path("/etc/apt/sources.list.d").iterdir())
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {
                    str(m.group(1)).lower(): str(m.group(2)).strip()
                    for m in re.finditer(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M)
                }
                suites = fields.get("suites", "").split()
                if "deb" in fields.get("types", "").split() and SUITE in suites:
                    for uri in fields.get("uris", "").split():
                        if "security" not in uri:
                            return uri
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                words = [w for w in words if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return DEFAULT_MIRROR


def recipe_key() -> str:
    """Hash of everything that goes into the image; part of the image's directory name."""
    recipe = {
        "version": IMAGE_RECIPE_VERSION,
        "suite": SUITE,
        "variant": "minbase",
        "packages": PACKAGES,
        "stub": BOOT_STUB,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class VmImage:
    """A built image: root file system, kernel, initrd and what went into them."""

    directory: Path
    rootfs: Path
    kernel: Path
    initrd: Path
    manifest: Mapping[str, Any]

    @classmethod
    def load(cls, directory: Path) -> VmImage:
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(
            directory=directory,
            rootfs=directory / "rootfs.img",
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.img",
            manifest=manifest,
        )

    @property
    def kernel_release(self) -> str:
        return str(self.manifest.get("kernel_release", "?"))

    @property
    def packages(self) -> Mapping[str, str]:
        value = self.manifest.get("packages", {})
        return value if isinstance(value, dict) else {}


def image_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root()) / f"{SUITE}-rxe-{recipe_key()}"


def find_image(cache_dir: Path | None = None) -> VmImage | None:
    """The cached image for the current recipe, if it has been built."""
    directory = image_dir(cache_dir)
    if (directory / "manifest.json").is_file():
        return VmImage.load(directory)
    return None


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VmError(f"timed out after {timeout:g}s waiting for {path}") from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_logged(argv: Sequence[str], logfile: Path, timeout: float, what: str) -> None:
    """Run a build step with its output appended to ``logfile``; raise with its tail on failure."""
    log.info("%s: %s", what, shlex.join(argv))
    with open(logfile, "ab") as out:
        out.write(f"\n$ {shlex.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise VmError(f"{what} timed out after {timeout:g}s; see {logfile}") from None
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace")[-4000:]
        raise VmError(f"{what} failed (exit {proc.returncode}); see {logfile}\n{tail}")


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].replace("\\040", " ")
            if mountpoint == prefix or mountpoint.startswith(prefix + "/"):
                found.append(mountpoint)
    return found


def _safe_rmtree(path: Path) -> None:
    """Remove a build tree, but never through a mount (debootstrap may bind-mount /dev)."""
    if not path.exists():
        return
    for mountpoint in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, timeout=60, check=False)
    left = _mounts_under(path)
    if left:
        raise VmError(f"refusing to delete {path}: still mounted: {left}")
    shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_image(
    cache_dir: Path | None = None,
    *,
    mirror: str | None = None,
    timeout: float = 3600.0,
) -> VmImage:
    """The VM image for the current recipe: from the cache, or built now (as root).

    Building takes a few minutes (debootstrap from the network, then
    ``mkfs.ext4 -d``); concurrent callers wait on a lock file and share the
    result. The build log stays next to the image as ``build.log``.
    """
    root = cache_dir or cache_root()
    found = find_image(root)
    if found is not None:
        return found
    require_root()
    ensure_host_tools()
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / ".lock", timeout=timeout):
        found = find_image(root)
        if found is not None:
            return found
        for stale in root.glob(".build-*"):
            m = re.fullmatch(r"\.build-\w+-(\d+)", stale.name)
            if m and not _pid_alive(int(m.group(1))):
                log.info("removing stale build directory %s", stale)
                _safe_rmtree(stale)
        work = root / f".build-{recipe_key()}-{os.getpid()}"
        try:
            _build_into(work, mirror or find_mirror(), timeout)
            final = image_dir(root)
            _safe_rmtree(final)
            work.rename(final)
        finally:
            _safe_rmtree(work)
        return VmImage.load(final)


def _build_into(work: Path, mirror: str, timeout: float) -> None:
    t0 = time.monotonic()
    deadline = t0 + timeout
    work.mkdir(parents=True)
    rootdir = work / "rootfs"
    logfile = work / "build.log"
    _run_logged(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(rootdir),
            mirror,
        ],
        logfile,
        deadline - time.monotonic(),
        "debootstrap",
    )
    debootstrap_s = time.monotonic() - t0

    stub = rootdir / BOOT_STUB_PATH.lstrip("/")
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text(BOOT_STUB)
    stub.chmod(0o755)
    (rootdir / "etc" / "hostname").write_text("softrdma-peer\n")
    (rootdir / "etc" / "fstab").write_text("/dev/vda / ext4 rw 0 1\n")
    (rootdir / "opt" / "softrdma").mkdir(parents=True, exist_ok=True)

    kernels = sorted((rootdir / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise VmError(f"no kernel in {rootdir / 'boot'}; see {logfile}")
    kernel = kernels[-1]
    release = kernel.name.removeprefix("vmlinuz-")
    initrd = rootdir / "boot" / f"initrd.img-{release}"
    if not initrd.exists():
        raise VmError(f"no initrd for {release}; see {logfile}")
    rxe = list((rootdir / "lib" / "modules" / release).rglob("rdma_rxe.ko*"))
    if not rxe:
        raise VmError(f"kernel {release} has no rdma_rxe module")
    shutil.copyfile(kernel, work / "vmlinuz")
    shutil.copyfile(initrd, work / "initrd.img")

    query = subprocess.run(
        ["chroot", str(rootdir), "dpkg-query", "-W", "-f", "${Package}\t${Version}\n"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    versions = dict(
        line.split("\t", 1) for line in query.stdout.splitlines() if line.count("\t") == 1
    )

    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootdir / junk).glob("*"):
            if entry.is_file():
                entry.unlink()
    used = int(
        subprocess.run(
            ["du", "-sxb", str(rootdir)], capture_output=True, text=True, timeout=300, check=True
        ).stdout.split()[0]
    )
    size_mib = (used * 5 // 4) // (1 << 20) + 512
    image = work / "rootfs.img"
    _run_logged(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "softrdma-root",
            "-E",
            "root_owner=0:0",
            "-d",
            str(rootdir),
            str(image),
            f"{size_mib}M",
        ],
        logfile,
        max(60.0, deadline - time.monotonic()),
        "mkfs.ext4",
    )
    manifest = {
        "recipe_key": recipe_key(),
        "recipe_version": IMAGE_RECIPE_VERSION,
        "suite": SUITE,
        "mirror": mirror,
        "packages_requested": list(PACKAGES),
        "kernel_release": release,
        "packages": versions,
        "rootfs_bytes_used": used,
        "image_mib": size_mib,
        "debootstrap_seconds": round(debootstrap_s, 1),
        "build_seconds": round(time.monotonic() - t0, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _safe_rmtree(rootdir)
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("built image in %.0fs: %s", manifest["build_seconds"], work)


# --------------------------------------------------------------------------- control


class _Call:
    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.started = threading.Event()
        self.done = threading.Event()
        self.pid: int | None = None
        self.reply: dict[str, Any] = {}


class _Control:
    """Client of the VM's command agent over the virtio-serial unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._closed: str | None = None
        self._reader = threading.Thread(target=self._read, name="vm-control", daemon=True)
        self._reader.start()

    def request(self, op: str, *, reply: bool = True, **fields: Any) -> _Call:
        with self._lock:
            if self._closed is not None:
                raise VmError(f"VM control channel closed: {self._closed}")
            call = _Call(next(self._ids))
            if reply:
                self._calls[call.ident] = call
            data = (json.dumps({"op": op, "id": call.ident, **fields}) + "\n").encode()
            try:
                self._sock.sendall(data)
            except OSError as e:
                self._calls.pop(call.ident, None)
                raise VmError(f"VM control channel: {e}") from e
        return call

    def forget(self, call: _Call) -> None:
        with self._lock:
            self._calls.pop(call.ident, None)

    def _read(self) -> None:
        buf = b""
        reason = "EOF"
        try:
            while True:
                chunk = self._sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._deliver(line)
        except OSError as e:
            reason = str(e)
        with self._lock:
            self._closed = reason
            calls = list(self._calls.values())
            self._calls.clear()
        for call in calls:
            call.reply = {"op": "error", "message": f"VM control channel closed: {reason}"}
            call.started.set()
            call.done.set()

    def _deliver(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
            ident = int(msg["id"])
        except (ValueError, KeyError, TypeError):
            log.warning("bad message from the VM agent: %r", line[:200])
            return
        with self._lock:
            call = self._calls.get(ident)
            if call is not None and msg.get("op") in ("pong", "exit", "error"):
                del self._calls[ident]
        if call is None:
            return
        if msg.get("op") == "started":
            call.pid = int(msg["pid"])
            call.started.set()
            return
        call.reply = msg
        call.started.set()
        call.done.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(timeout=5.0)


class VmProcess:
    """A command running in the VM (from :meth:`LinuxPeer.spawn`)."""

    def __init__(self, control: _Control, call: _Call, argv: Sequence[str], timeout: float) -> None:
        self._control = control
        self._call = call
        self.argv = list(argv)
        self.timeout = timeout

    @property
    def pid(self) -> int | None:
        """The process id in the VM, once it has started."""
        return self._call.pid

    def wait_started(self, timeout: float = 30.0) -> int:
        if not self._call.started.wait(timeout):
            raise VmError(f"{shlex.join(self.argv)} did not start within {timeout:g}s")
        self._raise_error()
        assert self._call.pid is not None
        return self._call.pid

    def poll(self) -> CommandResult | None:
        """The result if it has finished, else None."""
        return self._result() if self._call.done.is_set() else None

    def wait(self, timeout: float) -> CommandResult:
        """Wait at most ``timeout`` s; raise :class:`TimeoutError` if still running.

        Raises :class:`VmCommandTimeout` if the VM killed it for running past
        the timeout it was spawned with.
        """
        if not self._call.done.wait(timeout):
            raise TimeoutError(f"{shlex.join(self.argv)} still running after {timeout:g}s")
        return self._result()

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(VmError):
            self._control.request("signal", reply=False, target=self._call.ident, signal=int(sig))

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> CommandResult | None:
        """Terminate (then kill) it if it still runs; the result, if it came back in time."""
        if self._call.done.is_set():
            return self._result()
        self.terminate()
        if not self._call.done.wait(timeout):
            self.kill()
            self._call.done.wait(timeout)
        return self._result() if self._call.done.is_set() else None

    def _raise_error(self) -> None:
        reply = self._call.reply
        if reply.get("op") == "error":
            raise VmError(str(reply.get("message")))

    def _result(self) -> CommandResult:
        self._raise_error()
        reply = self._call.reply
        stdout = base64.b64decode(reply.get("stdout", "")).decode(errors="replace")
        stderr = base64.b64decode(reply.get("stderr", "")).decode(errors="replace")
        if reply.get("timed_out"):
            raise VmCommandTimeout(self.argv, self.timeout, stdout, stderr)
        return CommandResult(int(reply["returncode"]), stdout, stderr)


# --------------------------------------------------------------------------- the peer


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


_netns_counter = itertools.count()


@dataclass(eq=False, repr=False)
class LinuxPeer:
    """A Debian VM with rxe0 on 10.77.0.1, reached through a tap in a private netns.

    Use as a context manager (or :meth:`start` / :meth:`close`)::

        with LinuxPeer() as peer:
            rc, out, err = peer.run(["ibv_devinfo"], timeout=60)
            server = peer.spawn(["ibv_rc_pingpong", "-g", "1"], timeout=120)
            peer.wait_listening(18515)
            client = peer.host_run(["softrdma", "rc-pingpong", "-g", "1", peer.vm_ip])
            rc, out, err = server.wait(60)

    ``vm_ip`` / ``host_ip`` are the two ends of the tap link (``prefix_len``,
    ``mtu``); the host end lives in :attr:`netns`. QEMU runs with TCG, so
    the VM is slow: budget tens of seconds where hardware takes milliseconds.
    """

    image: VmImage | None = None
    vm_ip: str = "10.77.0.1"
    host_ip: str = "10.77.0.2"
    prefix_len: int = 24
    mtu: int = 1500
    vm_mac: str = DEFAULT_VM_MAC
    host_mac: str = DEFAULT_HOST_MAC
    rxe_name: str = "rxe0"
    memory_mib: int = 1024
    cpus: int = 2
    boot_timeout: float = 300.0
    tap: str = "srdma0"
    keep_run_dir: bool = field(
        default_factory=lambda: os.environ.get("SOFTRDMA_INTEROP_KEEP") == "1"
    )

    netns: str = field(init=False, default="")
    run_dir: Path | None = field(init=False, default=None)
    boot_seconds: float | None = field(init=False, default=None)
    uname: str = field(init=False, default="")
    init_log: str = field(init=False, default="")
    _qemu: subprocess.Popen[bytes] | None = field(init=False, default=None, repr=False)
    _control: _Control | None = field(init=False, default=None, repr=False)
    _netns_made: bool = field(init=False, default=False, repr=False)
    _closed: bool = field(init=False, default=False, repr=False)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._control else "not started"
        return (
            f"LinuxPeer({state}, netns={self.netns!r}, vm_ip={self.vm_ip!r}, "
            f"host_ip={self.host_ip!r}, run_dir={self.run_dir})"
        )

    # ---- lifecycle

    def __enter__(self) -> LinuxPeer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def console_log(self) -> Path | None:
        return self.run_dir / "console.log" if self.run_dir else None

    def console_text(self, tail: int = 6000) -> str:
        """The end of the VM's serial console (kernel messages, init steps)."""
        path = self.console_log
        if path is None or not path.exists():
            return ""
        return path.read_text(errors="replace")[-tail:]

    def start(self) -> LinuxPeer:
        """Build (if needed) and boot the VM; return once its agent answers and rxe0 is up."""
        require_root()
        if self.image is None:
            self.image = build_image()
        ensure_host_tools(BOOT_TOOLS)
        try:
            self._start(self.image)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, image: VmImage) -> None:
        cleanup_stale_netns()
        cleanup_stale_run_dirs()
        atexit.register(self.close)
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
        tools_img = self._make_tools_disk(self.run_dir)

        self.netns = f"{NETNS_PREFIX}{os.getpid()}-{next(_netns_counter)}"
        _ip("netns", "add", self.netns)
        self._netns_made = True
        ns = ("-n", self.netns)
        _ip(*ns, "link", "set", "lo", "up")
        _ip(*ns, "tuntap", "add", "dev", self.tap, "mode", "tap")
        _ip(*ns, "link", "set", self.tap, "mtu", str(self.mtu))
        _ip(*ns, "link", "set", self.tap, "address", self.host_mac)
        _ip(*ns, "addr", "add", f"{self.host_ip}/{self.prefix_len}", "dev", self.tap)
        # Quieter link: no IPv6 router/neighbour chatter from the host end.
        subprocess.run(
            self.netns_argv(["sysctl", "-qw", f"net.ipv6.conf.{self.tap}.disable_ipv6=1"]),
            capture_output=True,
            timeout=30,
            check=False,
        )
        _ip(*ns, "link", "set", self.tap, "up")

        sock_path = self.run_dir / "control.sock"
        append = " ".join(
            [
                "root=/dev/vda",
                "rootfstype=ext4",
                "rw",
                "console=ttyS0,115200",
                f"init={BOOT_STUB_PATH}",
                "net.ifnames=0",
                "panic=-1",
                "loglevel=4",
                f"softrdma.ip={self.vm_ip}/{self.prefix_len}",
                f"softrdma.mtu={self.mtu}",
                f"softrdma.rxe={self.rxe_name}",
            ]
        )
        qemu = [
            "qemu-system-x86_64",
            "-name",
            "softrdma-peer",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            str(self.cpus),
            "-m",
            str(self.memory_mib),
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(image.initrd),
            "-append",
            append,
            "-drive",
            f"file={image.rootfs},format=raw,if=virtio,snapshot=on",
            "-drive",
            f"file={tools_img},format=raw,if=virtio,readonly=on",
            "-netdev",
            f"tap,id=net0,ifname={self.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=net0,mac={self.vm_mac},romfile=",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            f"socket,id=ctl,path={sock_path},server=on,wait=off",
            "-device",
            f"virtserialport,chardev=ctl,name={CONTROL_PORT_NAME}",
            "-chardev",
            f"file,id=con,path={self.run_dir / 'console.log'}",
            "-serial",
            "chardev:con",
            "-device",
            "virtio-rng-pci",
        ]
        argv = self.netns_argv(qemu)
        (self.run_dir / "qemu.cmdline").write_text(shlex.join(argv) + "\n")
        log.info("booting: %s", shlex.join(argv))
        t0 = time.monotonic()
        with open(self.run_dir / "qemu.log", "wb") as qemu_log:
            self._qemu = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                preexec_fn=_set_pdeathsig,
            )
        deadline = t0 + self.boot_timeout
        self._control = _Control(self._connect(sock_path, deadline))
        reply = self._ping(deadline)
        self.boot_seconds = time.monotonic() - t0
        self.uname = str(reply.get("uname", ""))
        self.init_log = str(reply.get("init_log", ""))
        log.info("VM up in %.1fs: %s", self.boot_seconds, self.uname)
        failed = [line for line in self.init_log.splitlines() if line.startswith("FAILED")]
        if failed:
            raise VmError("VM init failed:\n" + self.init_log + "\n" + self.console_text())

    def _make_tools_disk(self, run_dir: Path) -> Path:
        tools = run_dir / "tools"
        tools.mkdir()
        shutil.copyfile(VM_INIT_SOURCE, tools / "init")
        (tools / "init").chmod(0o755)
        shutil.copyfile(VM_AGENT_SOURCE, tools / "vmagent.py")
        image = run_dir / "tools.img"
        proc = subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "softrdma-tools", "-d", str(tools), str(image), "4M"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        CommandResult(proc.returncode, proc.stdout, proc.stderr).check("mkfs.ext4 (tools disk)")
        return image

    def _check_qemu(self, what: str) -> None:
        if self._qemu is not None and self._qemu.poll() is not None:
            out = ""
            if self.run_dir is not None:
                with contextlib.suppress(OSError):
                    out = (self.run_dir / "qemu.log").read_text(errors="replace")[-3000:]
            raise VmError(
                f"QEMU exited ({self._qemu.returncode}) {what}\n--- qemu ---\n{out}\n"
                f"--- console ---\n{self.console_text()}"
            )

    def _connect(self, path: Path, deadline: float) -> socket.socket:
        while True:
            self._check_qemu("before its control socket appeared")
            if path.exists():
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(path))
                    return sock
                except OSError:
                    sock.close()
            if time.monotonic() > deadline:
                raise VmError(f"QEMU control socket {path} did not appear")
            time.sleep(0.1)

    def _ping(self, deadline: float) -> dict[str, Any]:
        assert self._control is not None
        while True:
            call = self._control.request("ping")
            resend = time.monotonic() + 10.0
            while time.monotonic() < min(resend, deadline):
                if call.done.wait(0.5):
                    if call.reply.get("op") == "pong":
                        return call.reply
                    raise VmError(f"VM agent: {call.reply}\n{self.console_text()}")
                self._check_qemu("while booting")
            self._control.forget(call)
            if time.monotonic() >= deadline:
                raise VmError(
                    f"VM not ready within {self.boot_timeout:g}s\n--- console ---\n"
                    f"{self.console_text()}"
                )

    def close(self) -> None:
        """Kill QEMU, delete the namespace (and its tap), remove the run directory."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._qemu is not None and self._qemu.poll() is None:
            self._qemu.terminate()
            try:
                self._qemu.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._qemu.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._qemu.wait(timeout=10)
        if self._control is not None:
            self._control.close()
        if self._netns_made:
            # Host-side helpers still running in the namespace would keep it alive.
            pids = _ip("netns", "pids", self.netns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "delete", self.netns, check=False)
        if self.run_dir is not None:
            if self.keep_run_dir:
                kept = self.run_dir.with_name(
                    self.run_dir.name.replace(RUN_DIR_PREFIX, f"{RUN_DIR_PREFIX}kept-", 1)
                )
                with contextlib.suppress(OSError):
                    self.run_dir = self.run_dir.rename(kept)
                log.warning("kept the VM run directory %s", self.run_dir)
            else:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    # ---- the VM side

    def spawn(
        self,
        argv: Sequence[str] | str,
        *,
        timeout: float = 600.0,
        input: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        line_buffered: bool = True,
    ) -> VmProcess:
        """Start a command in the VM and return at once.

        A string is run with ``sh -c``. The VM kills the command's process
        group after ``timeout`` s, so nothing outlives a test for long.
        ``line_buffered`` runs it under ``stdbuf -oL -eL``, so that what a C
        program printed before it hung or was killed is not lost in its
        stdio buffer.
        """
        if self._control is None:
            raise VmError("the VM is not running")
        args = ["sh", "-c", argv] if isinstance(argv, str) else [str(a) for a in argv]
        data = input.encode() if isinstance(input, str) else input
        call = self._control.request(
            "run",
            argv=["stdbuf", "-oL", "-eL", *args] if line_buffered else args,
            timeout=timeout,
            stdin=base64.b64encode(data).decode() if data is not None else None,
            env=dict(env) if env else None,
            cwd=cwd,
        )
        return VmProcess(self._control, call, args, timeout)

    def run(
        self,
        argv: Sequence[str] | str,
        timeout: float = 120.0,
        *,
        check: bool = False,
        input: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        line_buffered: bool = True,
    ) -> CommandResult:
        """Run a command in the VM: (returncode, stdout, stderr).

        Raises :class:`VmCommandTimeout` if it runs past ``timeout`` (it is
        killed in the VM), and :class:`VmError` if ``check`` and it fails.
        """
        proc = self.spawn(
            argv, timeout=timeout, input=input, env=env, cwd=cwd, line_buffered=line_buffered
        )
        try:
            result = proc.wait(timeout + 30.0)
        except TimeoutError:
            self._check_qemu(f"while running {shlex.join(proc.argv)}")
            raise VmError(f"no answer from the VM for {shlex.join(proc.argv)}") from None
        return result.check(shlex.join(proc.argv)) if check else result

    def wait_listening(self, port: int, *, timeout: float = 60.0, proto: str = "tcp") -> None:
        """Wait until something in the VM listens on ``port``."""
        flag = "-Hltn" if proto == "tcp" else "-Hlun"
        deadline = time.monotonic() + timeout
        while True:
            if self.run(["ss", flag, f"sport = :{port}"], timeout=30).stdout.strip():
                return
            if time.monotonic() > deadline:
                raise VmError(
                    f"nothing listens on {proto} port {port} in the VM after {timeout:g}s"
                )
            time.sleep(0.5)

    # ---- the host side (inside the namespace)

    def netns_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run in the namespace that reaches the VM."""
        if not self.netns:
            raise VmError("the VM is not running")
        return ["ip", "netns", "exec", self.netns, *argv]

    def host_popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start a host-side command in the namespace (text mode, output piped by default)."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.netns_argv(argv), text=True, **kwargs)

    def host_run(
        self, argv: Sequence[str], timeout: float = 120.0, *, env: Mapping[str, str] | None = None
    ) -> CommandResult:
        """Run a host-side command in the namespace; raise TimeoutExpired past ``timeout``."""
        proc = subprocess.run(
            self.netns_argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        return CommandResult(proc.returncode, proc.stdout, proc.stderr)

    def host_wait_listening(self, port: int, *, timeout: float = 60.0) -> None:
        """Wait until something in the host namespace listens on TCP ``port``."""
        deadline = time.monotonic() + timeout
        while True:
            if self.host_run(["ss", "-Hltn", f"sport = :{port}"], timeout=30).stdout.strip():
                return
            if time.monotonic() > deadline:
                raise VmError(
                    f"nothing listens on TCP port {port} in {self.netns} after {timeout:g}s"
                )
            time.sleep(0.2)


# --------------------------------------------------------------------------- manual use


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 tests/interop/linuxvm.py build|boot [command ...]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the image (or find it in the cache) and print its manifest")
    boot = sub.add_parser("boot", help="boot the VM, run a shell command in it, tear down")
    boot.add_argument("command", nargs="*", default=["ibv_devinfo"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    image = build_image()
    print(json.dumps({"directory": str(image.directory), **image.manifest}, indent=2))
    if args.cmd == "boot":
        with LinuxPeer(image=image) as peer:
            print(f"booted in {peer.boot_seconds:.1f}s: {peer.uname} (netns {peer.netns})")
            result = peer.run(" ".join(args.command), timeout=600)
            print(result.stdout, end="")
            print(result.stderr, end="")
            return result.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
