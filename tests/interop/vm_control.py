"""Interop VM support (see linuxvm.py): the client of the VM's command agent
(JSON lines over virtio-serial) and VmProcess, a command running in the VM."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shlex
import signal
import socket
import threading
from collections.abc import Sequence
from typing import Any

from tests.interop.vm_common import (
    CommandResult,
    VmCommandTimeout,
    VmError,
    log,
)

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
