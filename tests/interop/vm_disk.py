"""A disk Linux sees in the VM, served by a softrdma target from a host
image: an ext4 file system made on it (the files written and checked in
the VM, then the image checked on the host with ``e2fsck`` and
``debugfs``), or a raw pattern written and read back past a restart of
the target.

Support code, not a test module (``test_srp_linux.py``,
``test_iser_linux.py``). The VM steps run through a :class:`HostTarget`,
so their failures carry the target's output and the VM's kernel log.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from tests.interop.host_process import HostTarget

FILES = ("random.bin", "hello.txt", "dir/seq.txt")
"""8 MiB of random data (immediate data and the target's RDMA READ), a
line of text, 20000 lines of numbers in a directory."""
HOST_CHECK_TIMEOUT = 120.0
"""Bound on ``e2fsck`` of the image on the host."""


def make_ext4(target: HostTarget, dev: str, mnt: str, label: str, sums: str, writer: str) -> None:
    """``mkfs.ext4`` on ``dev``, the :data:`FILES` written through a mount
    on ``mnt`` (their SHA-256 in the VM's file ``sums``; ``writer``, the
    initiator, named in the text file), unmounted, and ``fsck -f -n`` clean
    with exactly those files."""
    target.vm("mkfs.ext4", f"mkfs.ext4 -q -F -L {label} {dev}")
    target.vm(
        "write files",
        f"mkdir -p {mnt} && mount {dev} {mnt} && cd {mnt} && "
        "dd if=/dev/urandom of=random.bin bs=1M count=8 status=none && "
        f"echo 'written by Linux {writer} to a softrdma target' > hello.txt && "
        "mkdir dir && seq 1 20000 > dir/seq.txt && "
        f"sha256sum {' '.join(FILES)} > {sums} && cd / && sync && umount {mnt}",
    )
    fsck = target.vm("fsck", f"fsck.ext4 -f -n {dev}")
    assert f"{label}: 15/" in fsck.stdout, fsck.stdout  # 11 reserved inodes + 4 of ours


def read_back(target: HostTarget, dev: str, mnt: str, sums: str) -> None:
    """Drop the VM's caches, mount ``dev`` read-only and check every file
    against ``sums``."""
    target.vm(
        "read back",
        f"echo 3 > /proc/sys/vm/drop_caches && mount -o ro {dev} {mnt} && "
        f"cd {mnt} && sha256sum -c {sums} && cd / && umount {mnt}",
    )


def vm_sums(target: HostTarget, sums: str) -> dict[str, str]:
    """The SHA-256 of each file, from the VM's file ``sums``."""
    out: dict[str, str] = {}
    for line in target.peer.run(["cat", sums], timeout=30).stdout.splitlines():
        digest, name = line.split()
        out[name] = digest
    return out


def debugfs_cat(image: Path, name: str) -> bytes:
    """A file of the ext4 ``image``, read on the host without mounting it."""
    proc = subprocess.run(
        ["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True, timeout=60, check=True
    )
    return proc.stdout


def check_image(image: Path, sums: dict[str, str], size: int) -> None:
    """On the host: ``image`` is a clean ext4 (``e2fsck -fn``) holding the
    files with the SHA-256 ``sums``, and still sparse (under ``size``
    bytes allocated)."""
    e2fsck = subprocess.run(
        ["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=HOST_CHECK_TIMEOUT
    )
    assert e2fsck.returncode == 0, e2fsck.stdout + e2fsck.stderr
    for name in FILES:
        assert hashlib.sha256(debugfs_cat(image, name)).hexdigest() == sums[name], name
    assert image.stat().st_blocks * 512 < size  # still sparse


PATTERN_DD = "bs=64k count=16"
"""The pattern's size: 1 MiB in 64 KiB direct I/Os."""


def write_pattern(target: HostTarget, dev: str, name: str) -> None:
    """Write 1 MiB of random data to the start of ``dev`` (``O_DIRECT``),
    keeping a copy in the VM's ``/tmp/<name>.pattern``."""
    target.vm(
        "write",
        f"dd if=/dev/urandom of=/tmp/{name}.pattern {PATTERN_DD} status=none && "
        f"dd if=/tmp/{name}.pattern of={dev} bs=64k oflag=direct status=none",
    )


def check_pattern(target: HostTarget, dev: str, name: str, what: str) -> None:
    """Read the start of ``dev`` back (``O_DIRECT``): it must equal what
    :func:`write_pattern` wrote. ``what`` names the step."""
    target.vm(
        what,
        f"dd if={dev} of=/tmp/{name}.back {PATTERN_DD} iflag=direct status=none && "
        f"cmp /tmp/{name}.pattern /tmp/{name}.back",
    )
