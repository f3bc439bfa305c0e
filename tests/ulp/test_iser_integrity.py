"""Data integrity through iSER: the real initiator (``ib_iser`` + libiscsi
model) against the real target (LIO ``ib_isert`` model), random reads and
writes of random sizes at random offsets, many in flight at once, checked
against the same operations on a plain bytearray; after SYNCHRONIZE CACHE
and logout the image file holds exactly the reference, no DMA mapping of
the session is left on either host, nothing stays kmapped, and both
DMA-API debug checkers have nothing to report.

On every device pairing with frames dropped and reordered (a late
retransmitted RDMA READ may reach a key the initiator has invalidated:
the connection is lost and the session recovered, the I/O still
completes with the right data); driven by Hypothesis; and between two
processes over real UDP (``softrdma iser target`` in a child process),
lossless and with 2 % of the frames lost each way.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.fabric.udp import UdpNetwork
from softrdma.ulp.iser import IserInitiator, IserTarget
from softrdma.ulp.scsi import FileBackstore, ScsiTarget
from tests.fabric.netaddr import loopback_addresses
from tests.rdma.nodes import make_device
from tests.test_iser_cli import target_process
from tests.ulp.op_strategies import disjoint, op_strategy
from tests.ulp.srp_rig import (
    IMAGE_SIZE,
    INITIATOR_IP,
    KINDS,
    TARGET_IP,
    LossyNetwork,
    Op,
    Reference,
    check_image,
    live_mappings,
    mappings_since,
    random_io,
    run_batch,
)

IQN = "iqn.2003-01.org.linux-iscsi.softrdma:integrity"
BS = 512
CAN_QUEUE = 8
MAX_BYTES = 160 << 10
"""Largest random transfer (split into several commands)."""
MAX_SECTORS = 256
"""128 KiB per command: the target's data buffers are 64 KiB chunks, each
bounced whole by a swiotlb host, and a 512 KiB command's eight chunks need
not find room in a fragmented 2 MiB bounce pool (the target then answers
BUSY until one is free)."""


@dataclass
class IserPair:
    """An initiator host and a target host on one simulated fabric."""

    fabric: Fabric
    idev: RoceDevice
    tdev: RoceDevice
    core: ScsiTarget
    backstore: FileBackstore
    target: IserTarget
    ini: IserInitiator
    image: Path
    baseline: list[Counter[str]]

    def logout(self) -> None:
        """SYNCHRONIZE CACHE, log out, let the target release the
        connection: no mapping of the session is left on either side."""
        self.ini.sync()
        self.ini.logout()
        self.fabric.loop.run()
        assert not self.target.conns, self.target.conns
        left = [
            mappings_since(d, b) for d, b in zip((self.idev, self.tdev), self.baseline, strict=True)
        ]
        assert left == [Counter(), Counter()], left

    def close(self) -> None:
        """Close both sides and release both devices: nothing kmapped, no
        leak, no DMA-API debug report."""
        self.ini.close()
        self.target.close()
        self.fabric.loop.run()
        self.backstore.close()
        assert not self.idev.host.pkmap._by_pfn
        for dev in (self.idev, self.tdev):
            dev.unregister()
            dev.dma_device.release()
            debug = dev.dma_device.platform.dma_debug
            assert debug is not None and not debug.reports, [str(r) for r in debug.reports]


def make_iser_pair(
    tmp_path: Path, ikind: str, tkind: str, *, seed: int = 1, rq_size: int = 16, **ini_kw: Any
) -> IserPair:
    """Devices of ``ikind`` (initiator) and ``tkind`` (target), a target
    serving a fresh sparse image, an initiator (``ini_kw``) logged in."""
    fabric = Fabric(seed=seed)
    tdev = make_device(tkind, fabric, TARGET_IP)
    idev = make_device(ikind, fabric, INITIATOR_IP)
    image = tmp_path / f"disk-{ikind}-{tkind}-{seed}.img"
    backstore = FileBackstore(image, BS, size=IMAGE_SIZE, create=True)
    core = ScsiTarget()
    core.add_lun(0, backstore)
    target = IserTarget(tdev.host, core, [IQN], addr=TARGET_IP, rq_size=rq_size, seed=seed)
    baseline = [live_mappings(d) for d in (idev, tdev)]
    ini_kw.setdefault("can_queue", CAN_QUEUE)
    ini_kw.setdefault("max_sectors", MAX_SECTORS)
    ini = IserInitiator(idev, TARGET_IP, target_name=IQN, **ini_kw)
    ini.login()
    assert ini.block_size == BS
    return IserPair(fabric, idev, tdev, core, backstore, target, ini, image, baseline)


def session(pair: IserPair, seed: int, batches: int, width: int = 12) -> Reference:
    """Random batches of concurrent I/O, then a blocking write and read
    across a command boundary; logout; the image equals the reference."""
    ini = pair.ini
    ref = Reference.zeros(IMAGE_SIZE, BS)
    rng = random.Random(seed)
    random_io(ini, ref, rng, batches=batches, width=width, max_bytes=MAX_BYTES)
    span = ini.max_transfer // BS + 3
    lba = rng.randrange(0, IMAGE_SIZE // BS - span)
    data = rng.randbytes(span * BS)
    ini.write(lba, data)
    ref.data[lba * BS : (lba + span) * BS] = data
    assert ini.read(lba, span) == data
    pair.logout()
    check_image(pair.image, ref)
    return ref


PAIRINGS = [pytest.param(t, i, id=f"t-{t}-i-{i}") for t in KINDS for i in KINDS]


@pytest.mark.parametrize(("tkind", "ikind"), PAIRINGS)
def test_random_io_with_drop_and_reorder(tmp_path: Path, tkind: str, ikind: str) -> None:
    """5 % of the frames dropped and 5 % reordered, both ways, on every
    pairing: every I/O completes (none fails) and the data is exactly the
    reference's. Where a late retransmission reaches an invalidated key
    and the connection goes down, the session is reinstated and the
    commands that had not completed are sent again."""
    seed = KINDS.index(tkind) * 4 + KINDS.index(ikind) + 1
    pair = make_iser_pair(tmp_path, ikind, tkind, seed=seed, highmem=seed % 2 == 0)
    pair.fabric.set_faults(drop=0.05, reorder=0.05)
    ref = session(pair, seed, batches=3)
    st_ = pair.ini.stats
    assert ref.reads and ref.writes and ref.max_in_flight >= CAN_QUEUE // 2
    assert pair.fabric.stats.dropped > 20 and pair.fabric.stats.reordered > 20
    assert st_["reinstatements"] == st_["conn_failures"], st_  # every loss recovered
    assert st_["completed"] >= ref.reads + ref.writes and st_["timeouts"] == 0
    pair.fabric.set_faults(drop=0.0, reorder=0.0)
    pair.close()


@pytest.mark.parametrize("seed", [6, 7, 12])
def test_a_lost_connection_under_loss_is_recovered(tmp_path: Path, seed: int) -> None:
    """10 % of the frames dropped and 10 % reordered with many transfers in
    flight: connections are lost (a replayed RDMA READ reaching an
    invalidated key, the retry count running out, a NOP-Out ping
    unanswered in time), commands time out (the target's RDMA READ
    retransmissions take seconds) and are taken back by ABORT TASK or LU
    RESET, a command reusing an ITT the target still holds is rejected
    and sent again under another; each lost connection ends in a
    reinstated session (same ISID, a new TSIH), and the data is right."""
    pair = make_iser_pair(tmp_path, "hw-iommu", "cpu", seed=seed, retries=8)
    pair.fabric.set_faults(drop=0.1, reorder=0.1)
    session(pair, seed, batches=6, width=16)
    st_ = pair.ini.stats
    assert st_["conn_failures"] >= 1 and st_["reinstatements"] == st_["conn_failures"], st_
    assert len(set(pair.ini.tsih_history)) == len(pair.ini.tsih_history) >= 2
    pair.fabric.set_faults(drop=0.0, reorder=0.0)
    pair.close()


# -- Hypothesis -------------------------------------------------------------------------

op_st = op_strategy(2048, 300)  # a small disk: operations of one example overlap often


@settings(
    max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    pairing=st.sampled_from([(t, i) for t in KINDS for i in KINDS]),
    batches=st.lists(st.lists(op_st, min_size=1, max_size=8), min_size=1, max_size=4),
    lossy=st.booleans(),
)
def test_operation_sequences(
    tmp_path_factory: pytest.TempPathFactory,
    pairing: tuple[str, str],
    batches: list[list[Op]],
    lossy: bool,
) -> None:
    """Any sequence of batches of concurrent non-overlapping reads and
    writes (overlapping across batches), on any pairing, with or without
    loss, reads what was written last; the image equals the reference."""
    tkind, ikind = pairing
    pair = make_iser_pair(tmp_path_factory.mktemp("hyp"), ikind, tkind, seed=3)
    if lossy:
        pair.fabric.set_faults(drop=0.03, reorder=0.03)
    ref = Reference.zeros(IMAGE_SIZE, BS)
    for batch in batches:
        run_batch(pair.ini, ref, disjoint(batch))
    for lba, n in {(o.lba, o.nblocks) for b in batches for o in b}:
        assert pair.ini.read(lba, n) == ref.data[lba * BS : (lba + n) * BS]
    pair.logout()
    check_image(pair.image, ref)
    pair.fabric.set_faults(drop=0.0, reorder=0.0)
    pair.close()


# -- two processes over UDP -------------------------------------------------------------


@dataclass(frozen=True)
class UdpRun:
    ref: Reference
    stats: dict[str, int]
    reports: list[str]
    dropped: int


@contextlib.contextmanager
def udp_device(ip: str, drop: float, seed: int) -> Iterator[tuple[RoceDevice, LossyNetwork]]:
    """A device on a UDP network of this process (real time), losing
    ``drop`` of its frames each way; released afterwards."""
    net = UdpNetwork()
    lossy = LossyNetwork(net, drop, seed)
    dev = make_device("hw-iommu", lossy if drop else net, ip, netdev_mtu=None)
    try:
        yield dev, lossy
    finally:
        dev.unregister()
        net.close()


def udp_random_iser_io(
    target_ip: str, ip: str, iqn: str, *, drop: float, seed: int = 1, batches: int = 4
) -> UdpRun:
    """The initiator over UDP to ``softrdma iser target``: random I/O
    against a zeroed reference, SYNCHRONIZE CACHE, logout; the device
    released; its DMA-API debug reports."""
    with udp_device(ip, drop, seed) as (dev, lossy):
        ini = IserInitiator(dev, target_ip, target_name=iqn, can_queue=CAN_QUEUE, timeout=120.0)
        try:
            ini.login()
            ref = Reference.zeros(1 << 20, BS)
            random_io(ini, ref, random.Random(seed), batches=batches, width=8, max_bytes=MAX_BYTES)
            ini.sync()
            ini.logout()
        finally:
            ini.close()
    dev.dma_device.release()
    debug = dev.dma_device.platform.dma_debug
    assert debug is not None
    return UdpRun(ref, dict(ini.stats), [str(r) for r in debug.reports], lossy.dropped)


@pytest.mark.parametrize("drop", [0.0, 0.02], ids=["lossless", "loss-2%"])
def test_between_two_processes_over_udp(tmp_path: Path, drop: float) -> None:
    """``softrdma iser target`` in its own process on a loopback address;
    the initiator in this process on a UDP network device behind an
    IOMMU, in real time: random I/O verified as it goes, and the image
    file, once the target has stopped, equals the reference. With loss, 2 %
    of the initiator's frames are lost each way on real sockets."""
    ip_t, ip_i = loopback_addresses(2)
    image = tmp_path / "disk.img"
    args = [str(image), "--ip", ip_t, "--create-size", "1M"]
    with target_process(tmp_path, *args) as target:
        run = udp_random_iser_io(ip_t, ip_i, target.iqn, drop=drop)
        assert target.stop() == 0, target.stderr()
    assert run.reports == []
    assert (run.dropped > 10) == bool(drop), run.dropped
    assert run.ref.reads and run.ref.writes and run.stats["logouts"] == 1
    assert run.stats["completed"] >= run.ref.reads + run.ref.writes
    check_image(image, run.ref)
