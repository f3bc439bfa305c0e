"""The real SRP initiator (``softrdma.ulp.srp.initiator``) logged in to the
real SRP target (``softrdma.ulp.srp.target``) over a file-backed LUN, on
one in-process fabric; a reference model of the disk (a bytearray) and
random block I/O checked against it; and the teardown every test ends
with: log out, check that neither side keeps a DMA mapping it no longer
needs, release both devices, and the DMA-API debug checker must have
nothing to report.

Used by ``test_srp_integrity.py`` and ``test_srp_hostile.py``."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Protocol

from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.fabric.link import Link, LinkReceiver, Network
from softrdma.time import Scheduler
from softrdma.transport.packet import Packet
from softrdma.transport.roce import RoceFrame
from softrdma.ulp.scsi import FileBackstore, ScsiTarget
from softrdma.ulp.srp.initiator import SrpInitiator
from softrdma.ulp.srp.target import SrpTarget
from tests.rdma.nodes import make_device

KINDS = ("cpu", "hw-direct", "hw-iommu", "hw-swiotlb")
"""Device kinds: a CPU-copy device and a hardware HCA on each DMA platform."""
MODES: dict[str, dict[str, Any]] = {
    "fr": {},  # ib_srp's default: every data buffer fast-registered
    "fr+global": {"register_always": False},  # FR, and the global rkey for one segment
    "global": {"never_register": True},  # the unsafe global rkey only
}
TARGET_IP = "10.0.0.1"
INITIATOR_IP = "10.0.0.2"
IMAGE_SIZE = 8 << 20
CAN_QUEUE = 16
"""The test hosts' swiotlb pool is 2 MiB: 16 commands of up to 48 KiB fit."""


def target_rq_size(tkind: str) -> int:
    """Receive IUs (and credits) a target on ``tkind`` can afford: 32 IUs of
    8 KiB fit a 2 MiB bounce pool next to the data buffers, 128 do not."""
    return 32 if tkind == "hw-swiotlb" else 128


@dataclass
class SrpPair:
    """An initiator host and a target host on one simulated fabric."""

    fabric: Fabric
    idev: RoceDevice
    tdev: RoceDevice
    backstore: FileBackstore
    target: SrpTarget
    ini: SrpInitiator
    image: Path
    block_size: int
    baseline: list[Counter[str]] = field(default_factory=list)
    closed: bool = False

    @property
    def blocks(self) -> int:
        return IMAGE_SIZE // self.block_size

    def live_mappings(self, dev: RoceDevice) -> Counter[str]:
        """The DMA mappings the debug checker tracks for ``dev``, counted by
        where they were made."""
        debug = dev.dma_device.platform.dma_debug
        assert debug is not None
        return Counter(e.location for e in debug.live_mappings(dev.dma_device))

    def snapshot(self) -> None:
        """Remember what is mapped before the login (the initiator's
        descriptor tables, ``srp_init_cmd_priv``'s)."""
        self.baseline = [self.live_mappings(dev) for dev in (self.idev, self.tdev)]

    def session_mappings(self) -> list[Counter[str]]:
        """What is mapped now and was not before the login, leaving out the
        MAD agent's receive buffers (the CM's, posted at its first use and
        kept for the device's life)."""
        out = []
        for dev, before in zip((self.idev, self.tdev), self.baseline, strict=True):
            extra = self.live_mappings(dev) - before
            out.append(Counter({k: n for k, n in extra.items() if "/mad/" not in k}))
        return out

    def logout(self) -> None:
        """SYNCHRONIZE CACHE, log out, let the target release the channel;
        then neither side may hold a mapping of the session (the MAD
        agent's buffers and the initiator's descriptor tables stay until
        the devices go)."""
        self.ini.sync()
        self.ini.logout()
        self.fabric.loop.run()
        assert not self.target.channels, self.target.channels
        assert self.session_mappings() == [Counter(), Counter()], self.session_mappings()

    def close(self) -> None:
        """Close both sides and release both devices: no leak, no report."""
        if self.closed:
            return
        self.closed = True
        self.ini.close()
        self.target.close()
        self.fabric.loop.run()
        self.backstore.close()
        assert self.ini.stats.progress_errors == 0, self.ini.stats
        for dev in (self.idev, self.tdev):
            dev.unregister()
            dev.dma_device.release()
            debug = dev.dma_device.platform.dma_debug
            assert debug is not None and not debug.reports, [str(r) for r in debug.reports]


def make_pair(
    tmp_path: Path,
    ikind: str,
    tkind: str,
    mode: str = "fr",
    *,
    block_size: int = 512,
    seed: int = 1,
    login: bool = True,
    rq_size: int | None = None,
    target_cls: type[SrpTarget] = SrpTarget,
    **ini_kw: Any,
) -> SrpPair:
    """Devices of ``ikind`` (initiator) and ``tkind`` (target), a target
    (``target_cls``) serving a fresh sparse image, an initiator in
    registration ``mode`` (``ini_kw`` go to :class:`SrpInitiator`)."""
    fabric = Fabric(seed=seed)
    tdev = make_device(tkind, fabric, TARGET_IP)
    idev = make_device(ikind, fabric, INITIATOR_IP)
    image = tmp_path / f"disk-{ikind}-{tkind}-{mode}-{block_size}-{seed}.img"
    backstore = FileBackstore(image, block_size, size=IMAGE_SIZE, create=True)
    core = ScsiTarget()
    core.add_lun(0, backstore)
    target = target_cls(tdev.host, core, addr=TARGET_IP, rq_size=rq_size or target_rq_size(tkind))
    ini_kw.setdefault("can_queue", CAN_QUEUE)
    ini = SrpInitiator(
        idev,
        TARGET_IP,
        id_ext=target.target_port_id[:8],
        ioc_guid=target.target_port_id[8:],
        **MODES[mode],
        **ini_kw,
    )
    pair = SrpPair(fabric, idev, tdev, backstore, target, ini, image, block_size)
    pair.snapshot()
    if login:
        ini.login()
        assert ini.block_size == block_size
    return pair


# -- random block I/O against a reference ------------------------------------------------


class BlockResult(Protocol):
    """A block I/O in flight (SRP's ``BlockIo``, iSER's ``IserIo``)."""

    @property
    def done(self) -> bool: ...
    def result(self) -> bytes | None: ...


class BlockInitiator(Protocol):
    """What the random I/O below needs of an initiator (SRP's or iSER's)."""

    @property
    def outstanding(self) -> int: ...
    @property
    def queued(self) -> int: ...
    def submit_read(self, lba: int, nblocks: int) -> BlockResult: ...
    def submit_write(self, lba: int, data: bytes) -> BlockResult: ...
    def wait_io(self, ios: Sequence[Any], timeout: float | None = None) -> bool: ...


def live_mappings(dev: RoceDevice) -> Counter[str]:
    """The DMA mappings the debug checker tracks for ``dev``, counted by
    where they were made."""
    debug = dev.dma_device.platform.dma_debug
    assert debug is not None
    return Counter(e.location for e in debug.live_mappings(dev.dma_device))


def mappings_since(dev: RoceDevice, before: Counter[str]) -> Counter[str]:
    """What ``dev`` has mapped now and had not in ``before``, leaving out
    the MAD agent's receive buffers (posted at the CM's first use and kept
    for the device's life)."""
    extra = live_mappings(dev) - before
    return Counter({k: n for k, n in extra.items() if "/mad/" not in k})


@dataclass(frozen=True)
class Op:
    """One read or write of ``nblocks`` at ``lba``; a write's data comes
    from ``seed``."""

    write: bool
    lba: int
    nblocks: int
    seed: int = 0

    def data(self, block_size: int) -> bytes:
        return random.Random(self.seed).randbytes(self.nblocks * block_size)

    @property
    def end(self) -> int:
        return self.lba + self.nblocks


@dataclass
class Reference:
    """What the disk must hold: the same writes applied to a bytearray."""

    block_size: int
    data: bytearray
    reads: int = 0
    writes: int = 0
    bytes_moved: int = 0
    max_in_flight: int = 0
    max_queued: int = 0
    history: list[Op] = field(default_factory=list)

    @classmethod
    def zeros(cls, size: int, block_size: int) -> Reference:
        return cls(block_size, bytearray(size))

    def span(self, op: Op) -> slice:
        return slice(op.lba * self.block_size, op.end * self.block_size)


def random_size(rng: random.Random, block_size: int, max_bytes: int) -> int:
    """A transfer size in blocks: a third small (up to 8 KiB: immediate data
    for writes), a third up to 64 KiB, a third up to ``max_bytes`` (split
    into several commands)."""
    pick = rng.random()
    limit = 8192 if pick < 1 / 3 else 65536 if pick < 2 / 3 else max_bytes
    return rng.randint(1, max(1, limit // block_size))


def random_batch(
    rng: random.Random, blocks: int, block_size: int, width: int, max_bytes: int
) -> list[Op]:
    """Up to ``width`` operations on extents that do not overlap (commands
    in flight together have no defined order), at random offsets."""
    ops: list[Op] = []
    for _ in range(width * 4):
        if len(ops) == width:
            break
        n = random_size(rng, block_size, max_bytes)
        lba = rng.randrange(0, blocks - n + 1)
        if any(lba < o.end and o.lba < lba + n for o in ops):
            continue
        ops.append(Op(rng.random() < 0.5, lba, n, rng.getrandbits(32)))
    return ops


def run_batch(
    ini: BlockInitiator, ref: Reference, ops: Sequence[Op], timeout: float = 600.0
) -> None:
    """Submit every operation at once (``submit_read`` / ``submit_write``),
    wait for all (``wait_io``), check each read against the reference and
    apply the writes to it."""
    ios: list[tuple[Op, BlockResult]] = []
    for op in ops:
        if op.write:
            ios.append((op, ini.submit_write(op.lba, op.data(ref.block_size))))
        else:
            ios.append((op, ini.submit_read(op.lba, op.nblocks)))
    ref.max_in_flight = max(ref.max_in_flight, ini.outstanding)
    ref.max_queued = max(ref.max_queued, ini.queued)
    assert ini.wait_io([io for _, io in ios], timeout), "I/O did not complete"
    for op, io in ios:
        got = io.result()
        ref.history.append(op)
        ref.bytes_moved += op.nblocks * ref.block_size
        if op.write:
            assert got is None
            ref.writes += 1
        else:
            ref.reads += 1
            want = bytes(ref.data[ref.span(op)])
            if got != want:
                assert got is not None
                first = next(i for i in range(len(want)) if got[i] != want[i])
                raise AssertionError(
                    f"{op}: first wrong byte at offset {first} "
                    f"(block {op.lba + first // ref.block_size}) after {len(ref.history)} ops"
                )
    for op in ops:
        if op.write:
            ref.data[ref.span(op)] = op.data(ref.block_size)


def random_io(
    ini: BlockInitiator,
    ref: Reference,
    rng: random.Random,
    *,
    batches: int,
    width: int,
    max_bytes: int = 384 << 10,
) -> None:
    """``batches`` rounds of up to ``width`` concurrent random operations."""
    blocks = len(ref.data) // ref.block_size
    for _ in range(batches):
        run_batch(ini, ref, random_batch(rng, blocks, ref.block_size, width, max_bytes))


def check_image(image: Path, ref: Reference) -> None:
    """The image file holds exactly the reference."""
    data = image.read_bytes()
    assert len(data) == len(ref.data)
    if data != ref.data:
        first = next(i for i in range(len(data)) if data[i] != ref.data[i])
        raise AssertionError(f"image differs from the reference at byte {first}")


# -- an initiator process over UDP ------------------------------------------------------


@dataclass(frozen=True)
class UdpRun:
    """What :func:`udp_random_io` did."""

    ref: Reference
    stats: dict[str, int]
    reports: list[str]
    dropped: int = 0


class LossyNetwork:
    """A :class:`~softrdma.fabric.link.Network` that loses a share ``drop``
    of the frames its links send and of those they receive (seeded): packet
    loss between two processes on a real network where the kernel has no
    netem. The wrapped network does the rest."""

    def __init__(self, inner: Network, drop: float, seed: int = 1) -> None:
        self.inner = inner
        self.drop = drop
        self.rng = random.Random(seed)
        self.dropped = 0

    @property
    def scheduler(self) -> Scheduler:
        return self.inner.scheduler

    def lose(self) -> bool:
        if self.rng.random() < self.drop:
            self.dropped += 1
            return True
        return False

    def open_link(
        self, ip: str | IPv4Address, receiver: LinkReceiver, *, mtu: int | None = None
    ) -> Link:
        return _LossyLink(self, self.inner.open_link(ip, _LossyReceiver(self, receiver), mtu=mtu))


class _LossyReceiver:
    def __init__(self, net: LossyNetwork, inner: LinkReceiver) -> None:
        self.net, self.inner = net, inner

    def receive_roce(self, frame: RoceFrame) -> None:
        if not self.net.lose():
            self.inner.receive_roce(frame)

    def receive_error(self, reason: str) -> None:
        self.inner.receive_error(reason)


class _LossyLink:
    def __init__(self, net: LossyNetwork, inner: Link) -> None:
        self.net, self.inner = net, inner

    scheduler = property(lambda self: self.inner.scheduler)
    address = property(lambda self: self.inner.address)
    mac = property(lambda self: self.inner.mac)
    mtu = property(lambda self: self.inner.mtu)
    description = property(lambda self: self.inner.description)
    device_share = property(lambda self: self.inner.device_share)

    def transmit(self, packet: Packet, daddr: bytes, sport: int) -> float | None:
        if self.net.lose():
            return None  # lost on the way: the transport retransmits
        return self.inner.transmit(packet, daddr, sport)

    def close(self) -> None:
        self.inner.close()


def udp_random_io(
    target_ip: str,
    ip: str,
    target_port_id: bytes,
    *,
    port: int = 5555,
    kind: str = "hw-iommu",
    mode: str = "fr",
    seed: int = 1,
    batches: int = 4,
    width: int = 8,
    block_size: int = 512,
    size: int = IMAGE_SIZE,
    timeout: float = 60.0,
    drop: float = 0.0,
) -> UdpRun:
    """The real initiator on a device of ``kind`` at ``ip`` on a
    :class:`~softrdma.fabric.udp.UdpNetwork` (real time), logged in to the
    target at ``target_ip``: random I/O against a zeroed reference, SYNCHRONIZE
    CACHE, logout; the device released; its DMA-API debug reports. With
    ``drop``, that share of the device's frames is lost each way
    (:class:`LossyNetwork`)."""
    from softrdma.fabric.udp import UdpNetwork

    net = UdpNetwork()
    lossy = LossyNetwork(net, drop, seed)
    dev = make_device(kind, lossy if drop else net, ip, netdev_mtu=None)
    try:
        ini = SrpInitiator(
            dev,
            target_ip,
            port,
            id_ext=target_port_id[:8],
            ioc_guid=target_port_id[8:],
            can_queue=CAN_QUEUE,
            cmd_timeout=timeout,
            **MODES[mode],
        )
        try:
            ini.login(timeout=timeout)
            assert ini.block_size == block_size, ini.block_size
            ref = Reference.zeros(size, block_size)
            random_io(ini, ref, random.Random(seed), batches=batches, width=width)
            ini.sync()
            ini.logout(timeout)
        finally:
            ini.close()
        stats = ini.stats.as_dict()
    finally:
        dev.unregister()
        net.close()
    dev.dma_device.release()
    debug = dev.dma_device.platform.dma_debug
    assert debug is not None
    return UdpRun(ref, stats, [str(r) for r in debug.reports], lossy.dropped)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.ulp.srp_rig TARGET_IP IP TARGET_PORT_ID REFERENCE``:
    :func:`udp_random_io` in a process of its own (for a network namespace);
    the reference image goes to the file REFERENCE, a summary to stdout."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m tests.ulp.srp_rig")
    p.add_argument("target_ip")
    p.add_argument("ip")
    p.add_argument("target_port_id", type=bytes.fromhex)
    p.add_argument("reference", type=Path)
    p.add_argument("--mode", choices=list(MODES), default="fr")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    run = udp_random_io(
        args.target_ip,
        args.ip,
        args.target_port_id,
        mode=args.mode,
        seed=args.seed,
        batches=args.batches,
        timeout=args.timeout,
    )
    args.reference.write_bytes(run.ref.data)
    summary = {"reads": run.ref.reads, "writes": run.ref.writes, "reports": run.reports}
    print(json.dumps({**summary, "stats": run.stats}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
