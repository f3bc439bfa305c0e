"""Interop VM support (see linuxvm.py): the image recipe and building it
(debootstrap, ``mkfs.ext4 -d``) into the cache."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.interop.vm_common import (
    VmError,
    log,
)
from tests.interop.vm_host import (
    _pid_alive,
    cache_root,
    ensure_host_tools,
    require_root,
)

# --------------------------------------------------------------------------- image

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
    "open-iscsi",  # iscsiadm / iscsid, with the ib_iser module from the kernel package
    "e2fsprogs",  # mkfs.ext4 / fsck.ext4 on the iSER disk
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
