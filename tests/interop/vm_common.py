"""Interop VM support (see linuxvm.py): what every part shares: the logger,
paths of the in-VM init and agent, network constants, errors and CommandResult."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("softrdma.interop")

HERE = Path(__file__).resolve().parent
#: Run inside the VM as its init (after the baked-in boot stub); not part of the image.
VM_INIT_SOURCE = HERE / "vm-init.sh"
#: The command agent run inside the VM; not part of the image.
VM_AGENT_SOURCE = HERE / "vmagent.py"


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
