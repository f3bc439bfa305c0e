"""Interop VM support (see linuxvm.py): LinuxPeer, the running VM on a tap in a
private network namespace."""

from __future__ import annotations

import atexit
import base64
import contextlib
import itertools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.interop.vm_common import (
    BOOT_TOOLS,
    CONTROL_PORT_NAME,
    DEFAULT_HOST_MAC,
    DEFAULT_VM_MAC,
    NETNS_PREFIX,
    RUN_DIR_PREFIX,
    VM_AGENT_SOURCE,
    VM_INIT_SOURCE,
    CommandResult,
    VmError,
    log,
)
from tests.interop.vm_control import (
    VmProcess,
    _Control,
)
from tests.interop.vm_host import (
    _ip,
    _set_pdeathsig,
    cleanup_stale_netns,
    cleanup_stale_run_dirs,
    ensure_host_tools,
    require_root,
)
from tests.interop.vm_image import (
    BOOT_STUB_PATH,
    VmImage,
    build_image,
)

# --------------------------------------------------------------------------- the peer


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
