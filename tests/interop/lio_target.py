"""LIO, the Linux SCSI target, in the VM, driven by ``targetcli`` as its
users drive it: the fabric module loaded (``ib_srpt`` or ``ib_isert``),
the D-Bus daemon ``targetcli`` asks for tcmu-runner's backstores, a sparse
``fileio`` backstore named ``softrdma``; all of it removed again by
:meth:`LioTarget.remove`.

Support code, not a test module: ``test_srp_lio.py`` and
``test_iser_lio.py`` build their fabric's target on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.interop.linuxvm import CommandResult, LinuxPeer

STEP_TIMEOUT = 120.0
"""Bound on each step in the VM (targetcli takes about 5 s under TCG)."""
BACKSTORE = "softrdma"
"""The name of the fileio backstore (``/backstores/fileio/softrdma``)."""

DBUS_FILES = "/run/dbus/pid /run/dbus/system_bus_socket"
"""What dbus-daemon leaves behind when SIGTERM ends it: a later
``dbus-daemon`` would find them stale, and targetcli its socket refusing."""
DBUS_RUNNING = '[ -f /run/dbus/pid ] && kill -0 "$(cat /run/dbus/pid)" 2>/dev/null'
"""Whether the system bus daemon runs (a shell condition)."""


@dataclass
class LioTarget:
    """LIO in the VM with the fabric module ``module`` and a fileio
    backstore ``disk`` of ``disk_size`` bytes."""

    peer: LinuxPeer
    module: str
    disk: str
    disk_size: int

    def vm(self, script: str, what: str, timeout: float = STEP_TIMEOUT) -> CommandResult:
        """Run a shell step in the VM; it must succeed."""
        result = self.peer.run(script, timeout=timeout)
        if result.returncode != 0:
            pytest.fail(
                f"{what}: exit {result.returncode}\n{result.stdout[-3000:]}\n"
                f"{result.stderr[-3000:]}\n--- dmesg:\n{self.dmesg()[-3000:]}"
            )
        return result

    def targetcli(self, *commands: str) -> str:
        """Run targetcli commands in one session (its start takes seconds);
        what it printed. It goes on after a failed command: callers check
        the output or configfs."""
        script = "\n".join(commands) + "\nexit\n"
        result = self.peer.run(["targetcli"], timeout=STEP_TIMEOUT, input=script)
        return result.stdout + result.stderr

    def dmesg(self) -> str:
        return self.peer.run(["dmesg"], timeout=30).stdout

    def mark(self, text: str) -> str:
        """Put a line in the kernel log; :meth:`since` finds what came after it."""
        line = f"softrdma-lio: {text}"
        self.peer.run(f"echo '{line}' > /dev/kmsg", timeout=30)
        return line

    def since(self, mark: str) -> str:
        log = self.dmesg()
        return log[log.rfind(mark) :] if mark in log else log

    def load(self) -> None:
        """The fabric module and ``target_core_file`` loaded, the system
        bus up (targetcli asks it for tcmu-runner's backstores as it
        starts)."""
        self.vm(
            f"mkdir -p /run/dbus && {{ {DBUS_RUNNING} || {{ rm -f {DBUS_FILES}; "
            f"dbus-daemon --system --fork; }}; }} && modprobe {self.module} && "
            "modprobe target_core_file",
            self.module,
        )

    def backstore_commands(self) -> tuple[str, ...]:
        """The targetcli commands that start every configuration: no saving
        on exit (the VM's disk is a snapshot anyway), the sparse backstore."""
        return (
            "set global auto_save_on_exit=false",
            f"/backstores/fileio create name={BACKSTORE} file_or_dev={self.disk} "
            f"size={self.disk_size} sparse=true",
        )

    def zero_disk(self) -> None:
        """Make the backstore read as zeros again (LIO keeps it open)."""
        self.vm(
            f"fallocate --punch-hole --offset 0 --length {self.disk_size} {self.disk}",
            "zero disk",
        )

    def remove(self, cm_port: int, first: str = "", then: str = "") -> None:
        """Undo everything: the shell ``first``, targetcli's ``clearconfig``,
        the shell ``then``, the module unloaded, the backing file and the
        D-Bus daemon gone. The VM is shared with the other modules: fails
        if the module stays loaded or something still listens on
        ``cm_port``."""
        script = f"""
            {first}
            printf 'clearconfig confirm=True\\nexit\\n' | targetcli
            {then}
            rmmod {self.module}
            rm -f {self.disk}
            [ -f /run/dbus/pid ] && kill $(cat /run/dbus/pid)
            rm -f {DBUS_FILES}
            if lsmod | grep -q '^{self.module} '; then echo '{self.module} still loaded'; fi
            rdma res show cm_id | grep ':{cm_port} ' || true
        """
        left = self.peer.run(script, timeout=STEP_TIMEOUT).stdout
        assert "still loaded" not in left and f":{cm_port} " not in left, left
