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

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python3 tests/interop/linuxvm.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.interop.vm_common import (
    BOOT_TOOLS,
    CONTROL_PORT_NAME,
    DEFAULT_HOST_MAC,
    DEFAULT_VM_MAC,
    HERE,
    HOST_TOOLS,
    NETNS_PREFIX,
    RUN_DIR_PREFIX,
    VM_AGENT_SOURCE,
    VM_INIT_SOURCE,
    CommandResult,
    InteropUnavailable,
    VmCommandTimeout,
    VmError,
    log,
)
from tests.interop.vm_control import VmProcess
from tests.interop.vm_host import (
    cache_root,
    cleanup_stale_netns,
    cleanup_stale_run_dirs,
    ensure_host_tools,
    require_root,
)
from tests.interop.vm_image import (
    BOOT_STUB,
    BOOT_STUB_PATH,
    DEFAULT_MIRROR,
    IMAGE_RECIPE_VERSION,
    PACKAGES,
    SUITE,
    VmImage,
    build_image,
    find_image,
    find_mirror,
    image_dir,
    recipe_key,
)
from tests.interop.vm_peer import LinuxPeer

__all__ = [
    "BOOT_STUB",
    "BOOT_STUB_PATH",
    "BOOT_TOOLS",
    "CONTROL_PORT_NAME",
    "DEFAULT_HOST_MAC",
    "DEFAULT_MIRROR",
    "DEFAULT_VM_MAC",
    "HERE",
    "HOST_TOOLS",
    "IMAGE_RECIPE_VERSION",
    "NETNS_PREFIX",
    "PACKAGES",
    "RUN_DIR_PREFIX",
    "SUITE",
    "VM_AGENT_SOURCE",
    "VM_INIT_SOURCE",
    "CommandResult",
    "InteropUnavailable",
    "LinuxPeer",
    "VmCommandTimeout",
    "VmError",
    "VmImage",
    "VmProcess",
    "build_image",
    "cache_root",
    "cleanup_stale_netns",
    "cleanup_stale_run_dirs",
    "ensure_host_tools",
    "find_image",
    "find_mirror",
    "image_dir",
    "log",
    "main",
    "recipe_key",
    "require_root",
]


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
