"""The command agent that runs *inside* the interop VM (not imported by the tests).

It is put on the VM's tools disk (``/opt/softrdma/vmagent.py``) at every boot and
started by ``vm-init.sh`` (under ``tini``, which reaps orphans as PID 1).
It serves the host over a virtio-serial port, so the VM's network carries
nothing but the traffic under test.

Protocol: one JSON object per line in each direction, binary data base64.

host -> VM::

    {"op": "ping", "id": N}
    {"op": "run", "id": N, "argv": [...], "timeout": seconds | null,
     "stdin": base64 | null, "env": {...} | null, "cwd": path | null}
    {"op": "signal", "id": N, "target": M, "signal": 15}

VM -> host::

    {"op": "pong", "id": N, "uname": "...", "init_log": "..."}
    {"op": "started", "id": N, "pid": P}
    {"op": "exit", "id": N, "returncode": R, "stdout": b64, "stderr": b64,
     "timed_out": bool}
    {"op": "error", "id": N, "message": "..."}

Every ``run`` gets a ``started`` (or ``error``) and then one ``exit``.
A process that outlives its timeout has its whole process group killed.
Standard library only: the VM has Debian's python3 and nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

PORT_NAME = "org.softrdma.ctl"
INIT_LOG = "/run/softrdma-init.log"


def find_port(name: str) -> str:
    """The /dev node of the virtio-serial port called ``name``."""
    deadline = time.monotonic() + 60.0
    while True:
        link = f"/dev/virtio-ports/{name}"
        if os.path.exists(link):
            return link
        base = "/sys/class/virtio-ports"
        if os.path.isdir(base):
            for vport in sorted(os.listdir(base)):
                try:
                    with open(f"{base}/{vport}/name") as f:
                        if f.read().strip() == name and os.path.exists(f"/dev/{vport}"):
                            return f"/dev/{vport}"
                except OSError:
                    continue
        if time.monotonic() > deadline:
            raise SystemExit(f"softrdma-vmagent: no virtio-serial port named {name}")
        time.sleep(0.2)


class Agent:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.write_lock = threading.Lock()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.procs_lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self.write_lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.fd, view)
                except InterruptedError:
                    continue
                except OSError as e:
                    log(f"write failed: {e}")
                    time.sleep(0.1)
                    continue
                view = view[n:]

    def serve(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except InterruptedError:
                continue
            if not chunk:
                # The host is not connected (virtio-serial reads return 0 then).
                time.sleep(0.1)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    self.dispatch(line)

    def dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
            op = msg["op"]
            ident = int(msg["id"])
        except (ValueError, KeyError, TypeError) as e:
            log(f"bad request {line[:200]!r}: {e}")
            return
        if op == "ping":
            self.send(
                {
                    "op": "pong",
                    "id": ident,
                    "uname": " ".join(os.uname()),
                    "init_log": read_init_log(),
                }
            )
        elif op == "run":
            threading.Thread(target=self.run, args=(ident, msg), daemon=True).start()
        elif op == "signal":
            self.signal(ident, int(msg["target"]), int(msg.get("signal", signal.SIGTERM)))
        else:
            self.send({"op": "error", "id": ident, "message": f"unknown op {op!r}"})

    def run(self, ident: int, msg: dict[str, Any]) -> None:
        argv = [str(a) for a in msg["argv"]]
        timeout = msg.get("timeout")
        stdin_b64 = msg.get("stdin")
        stdin = base64.b64decode(stdin_b64) if stdin_b64 is not None else None
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in (msg.get("env") or {}).items()})
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=msg.get("cwd") or "/root",
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            self.send({"op": "error", "id": ident, "message": f"{argv[0]}: {e}"})
            return
        with self.procs_lock:
            self.procs[ident] = proc
        self.send({"op": "started", "id": ident, "pid": proc.pid})
        timed_out = False
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        finally:
            with self.procs_lock:
                self.procs.pop(ident, None)
        self.send(
            {
                "op": "exit",
                "id": ident,
                "returncode": proc.returncode,
                "stdout": base64.b64encode(out).decode(),
                "stderr": base64.b64encode(err).decode(),
                "timed_out": timed_out,
            }
        )

    def signal(self, ident: int, target: int, sig: int) -> None:
        with self.procs_lock:
            proc = self.procs.get(target)
        if proc is not None:
            kill_group(proc.pid, sig)


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def read_init_log() -> str:
    try:
        with open(INIT_LOG, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def log(text: str) -> None:
    print(f"softrdma-vmagent: {text}", file=sys.stderr, flush=True)


def main() -> None:
    path = find_port(sys.argv[1] if len(sys.argv) > 1 else PORT_NAME)
    fd = os.open(path, os.O_RDWR)
    log(f"serving on {path}")
    Agent(fd).serve()


if __name__ == "__main__":
    main()
