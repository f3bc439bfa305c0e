"""The iSER initiator (ib_iser + libiscsi model) against the iSER target
(LIO ib_isert model) on the in-process fabric: random I/O compared with a
plain bytearray and with the image file, on every device pairing, with
loss, highmem on and off, remote and local invalidation, the CmdSN window
closing, and nothing left mapped after logout."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.ulp.iser import IserInitiator, IserInitiatorError, IserTarget
from softrdma.ulp.scsi import FileBackstore, ScsiTarget
from tests.rdma.nodes import make_device

TARGET_IP = "10.0.0.1"
IQN = "iqn.2003-01.org.linux-iscsi.softrdma:disk"
KINDS = ("cpu", "hw-direct", "hw-swiotlb", "hw-iommu")
SIZE = 4 << 20
BS = 512


def _setup(
    fabric: Fabric, tkind: str, image: Path, rq_size: int = 16
) -> tuple[IserTarget, RoceDevice]:
    tdev = make_device(tkind, fabric, TARGET_IP)
    core = ScsiTarget()
    core.add_lun(0, FileBackstore(image, BS, size=SIZE, create=True))
    return IserTarget(tdev.host, core, [IQN], addr=TARGET_IP, rq_size=rq_size, seed=1), tdev


def _quiet(dev: RoceDevice) -> None:
    debug = dev.dma_device.platform.dma_debug
    assert debug is not None and not debug.reports, debug.reports


def _teardown(fabric: Fabric, target: IserTarget, tdev: RoceDevice, idev: RoceDevice) -> None:
    """Everything unmapped: no kmap left on the initiator, and both DMA-API
    debug checkers silent when the devices go (a leaked mapping is reported
    at release)."""
    fabric.loop.run()
    assert not target.conns
    target.close()
    assert not idev.host.pkmap._by_pfn  # no long-lived kmap
    idev.unregister()
    idev.dma_device.release()
    _quiet(idev)
    tdev.unregister()
    tdev.dma_device.release()
    _quiet(tdev)


def _random_io(ini: IserInitiator, model: bytearray, rng: random.Random, rounds: int) -> None:
    blocks = SIZE // BS
    for _ in range(rounds):
        n = rng.choice([1, 8, rng.randint(1, 64), rng.randint(1, 1100)])
        lba = rng.randrange(0, blocks - n)
        if rng.random() < 0.5:
            data = rng.randbytes(n * BS)
            ini.write(lba, data)
            model[lba * BS : (lba + n) * BS] = data
        else:
            assert ini.read(lba, n) == model[lba * BS : (lba + n) * BS]


def _run(
    tkind: str,
    ikind: str,
    image: Path,
    *,
    seed: int,
    rounds: int = 12,
    faults: bool = False,
    highmem: bool = True,
    send_w_inv: bool = True,
) -> IserInitiator:
    fabric = Fabric(seed=seed)
    target, tdev = _setup(fabric, tkind, image)
    idev = make_device(ikind, fabric, "10.0.0.2")
    if faults:
        fabric.set_faults(drop=0.05, reorder=0.05)
    ini = IserInitiator(
        idev, TARGET_IP, target_name=IQN, can_queue=8, highmem=highmem, send_w_inv=send_w_inv
    )
    done = ini.login()
    assert done.negotiated.rdma_extensions
    assert ini.capacity == SIZE // BS and ini.block_size == BS
    assert ini.inquiry().vendor.strip() == "SOFTRDMA"
    model = bytearray(SIZE)
    rng = random.Random(seed)
    _random_io(ini, model, rng, rounds)
    # A few in parallel.
    ios = []
    for i in range(4):
        data = rng.randbytes(16 * BS)
        ios.append(ini.submit_write(64 * i, data))
        model[64 * i * BS : (64 * i + 16) * BS] = data
    assert ini.wait_io(ios)
    for io in ios:
        io.result()
    ini.sync()
    ini.logout()
    if faults:
        assert fabric.stats.dropped > 0 and fabric.stats.reordered > 0
        fabric.set_faults(drop=0.0, reorder=0.0)
    _teardown(fabric, target, tdev, idev)
    assert image.read_bytes() == bytes(model)
    return ini


@pytest.mark.parametrize("tkind", KINDS)
@pytest.mark.parametrize("ikind", KINDS)
def test_random_io_every_pairing(tkind: str, ikind: str, tmp_path: Path) -> None:
    ini = _run(tkind, ikind, tmp_path / "disk.img", seed=KINDS.index(tkind) * 4 + 1)
    assert ini.stats["remote_inv"] > 0 and ini.stats["logouts"] == 1


@pytest.mark.parametrize(
    ("tkind", "ikind"), [("cpu", "hw-iommu"), ("hw-swiotlb", "cpu"), ("hw-iommu", "hw-swiotlb")]
)
def test_random_io_with_loss(tkind: str, ikind: str, tmp_path: Path) -> None:
    _run(tkind, ikind, tmp_path / "disk.img", seed=21, rounds=8, faults=True)


@pytest.mark.parametrize("highmem", [True, False])
def test_highmem_on_and_off(highmem: bool, tmp_path: Path) -> None:
    ini = _run("hw-iommu", "hw-direct", tmp_path / "disk.img", seed=5, highmem=highmem)
    assert (ini.stats["highmem_pages"] > 0) is highmem


def test_remote_vs_local_invalidation(tmp_path: Path) -> None:
    remote = _run("cpu", "hw-iommu", tmp_path / "a.img", seed=7)
    assert remote.remote_inv and remote.stats["remote_inv"] > 0
    local = _run("cpu", "hw-iommu", tmp_path / "b.img", seed=7, send_w_inv=False)
    assert not local.remote_inv and local.stats["remote_inv"] == 0
    assert local.stats["local_inv"] == local.stats["reg_mr"]


def test_cmdsn_window_closes_and_reopens(tmp_path: Path) -> None:
    """rq_size 8 gives a CmdSN depth of 4: 16 commands queued at once wait
    for the window, then all complete."""
    fabric = Fabric(seed=9)
    image = tmp_path / "disk.img"
    target, tdev = _setup(fabric, "hw-iommu", image, rq_size=8)
    idev = make_device("cpu", fabric, "10.0.0.2")
    ini = IserInitiator(idev, TARGET_IP, target_name=IQN, can_queue=16)
    ini.login()
    datas = [bytes([i + 1]) * (8 * BS) for i in range(16)]
    ios = [ini.submit_write(8 * i, d) for i, d in enumerate(datas)]
    assert ini.stats["window_closed"] > 0 and len(ini._active) == 4
    assert ini.wait_io(ios)
    for io in ios:
        io.result()
    reads = [ini.submit_read(8 * i, 8) for i in range(16)]
    assert ini.wait_io(reads)
    assert [io.result() for io in reads] == datas
    assert ini.stats["max_unanswered"] == 4, "never more commands unanswered than the window"
    assert len(ini.conn.outstanding) == 0 and ini.outstanding == 0
    ini.logout()
    _teardown(fabric, target, tdev, idev)
    assert image.read_bytes()[: 16 * 8 * BS] == b"".join(datas)


def test_cm_header_nop_and_refusing_send_with_invalidate(tmp_path: Path) -> None:
    """The REQ carries 80 00 00 00 (the target answers the same and uses
    SEND_WITH_INV); with ``send_w_inv=False`` the REQ says 0xC0, the target
    sends plain SENDs and every key is invalidated locally."""
    for refuse in (False, True):
        fabric = Fabric(seed=11)
        target, tdev = _setup(fabric, "cpu", tmp_path / f"{refuse}.img")
        idev = make_device("hw-swiotlb", fabric, "10.0.0.2")
        ini = IserInitiator(idev, TARGET_IP, target_name=IQN, send_w_inv=not refuse)
        ini.login()
        assert [c.snd_w_inv for c in target.conns] == [not refuse]
        assert ini.remote_inv is not refuse
        assert ini.nop(b"ping") == b"ping"
        # 4 KiB goes entirely as immediate data: no RDMA READ.
        reads = target.stats["rdma_reads"]
        ini.write(100, b"\x66" * 4096)
        assert target.stats["rdma_reads"] == reads
        # 1 MiB: two commands of at most 512 KiB.
        big = bytes(range(256)) * 4096
        ini.write(2048, big)
        assert ini.read(2048, 2048) == big and ini.read(100, 8) == b"\x66" * 4096
        ini.write(0, b"\x77" * (64 * BS))  # 8 KiB immediate, the rest by RDMA READ
        assert ini.read(0, 64) == b"\x77" * (64 * BS)
        if refuse:
            assert target.stats["send_with_inv"] == 0 and ini.stats["remote_inv"] == 0
        else:
            assert target.stats["send_with_inv"] == ini.stats["remote_inv"] > 0
        assert target.stats["rdma_reads"] > 0 and target.stats["rdma_writes"] > 0
        ini.logout()
        _teardown(fabric, target, tdev, idev)


def test_target_disconnecting_is_recovered_and_close_unmaps(tmp_path: Path) -> None:
    """The target disconnects with commands queued: the initiator logs in
    again with its ISID (session reinstatement), the reads complete, and
    close() leaves nothing mapped."""
    fabric = Fabric(seed=12)
    target, tdev = _setup(fabric, "hw-iommu", tmp_path / "disk.img")
    idev = make_device("hw-iommu", fabric, "10.0.0.2")
    ini = IserInitiator(idev, TARGET_IP, target_name=IQN, can_queue=4)
    ini.login()
    assert ini.read(0, 8) == bytes(8 * BS)
    ini.write(8, b"\x5a" * (8 * BS))
    for conn in list(target.conns):
        conn.close()
    ios = [ini.submit_read(8 * i, 8) for i in range(8)]
    assert ini.wait_io(ios)
    assert [io.result() for io in ios][1] == b"\x5a" * (8 * BS)
    assert ini.stats["conn_failures"] == 1 and ini.stats["reinstatements"] == 1
    assert len(ini.tsih_history) == 2 and len(target.conns) == 1
    ini.close()
    with pytest.raises(IserInitiatorError):
        ini.submit_read(0, 1)
    _teardown(fabric, target, tdev, idev)


def test_login_to_an_unknown_target_is_refused_cleanly(tmp_path: Path) -> None:
    fabric = Fabric(seed=13)
    target, tdev = _setup(fabric, "cpu", tmp_path / "disk.img")
    idev = make_device("hw-swiotlb", fabric, "10.0.0.2")
    ini = IserInitiator(idev, TARGET_IP, target_name="iqn.2003-01.org.example:none")
    with pytest.raises(IserInitiatorError, match="login failed"):
        ini.login()
    ini.close()
    _teardown(fabric, target, tdev, idev)


def test_a_full_bounce_pool_makes_commands_wait(tmp_path: Path) -> None:
    """On the 2 MiB swiotlb host a 1 MiB write (two 512 KiB commands) does
    not fit beside the rings: the second command's ``ib_dma_map_sg`` fails,
    the command waits for the first to complete (host busy), then runs."""
    fabric = Fabric(seed=11)
    target, tdev = _setup(fabric, "cpu", tmp_path / "disk.img")
    idev = make_device("hw-swiotlb", fabric, "10.0.0.2")
    ini = IserInitiator(idev, TARGET_IP, target_name=IQN)
    ini.login()
    big = bytes(range(256)) * 4096
    ini.write(2048, big)
    assert ini.read(2048, 2048) == big
    assert ini.stats["map_busy"] > 0
    ini.logout()
    _teardown(fabric, target, tdev, idev)
    assert (tmp_path / "disk.img").read_bytes()[2048 * BS : 4096 * BS] == big


def test_wait_any_returns_the_ios_that_ended(tmp_path: Path) -> None:
    """``wait_any`` returns once at least one I/O has ended, with those that
    have, in the order given; a window kept full with it moves every I/O;
    with ``timeout=0`` and none ended, []."""
    fabric = Fabric(seed=14)
    target, tdev = _setup(fabric, "cpu", tmp_path / "disk.img")
    idev = make_device("hw-iommu", fabric, "10.0.0.2")
    ini = IserInitiator(idev, TARGET_IP, target_name=IQN, can_queue=4)
    ini.login()
    window = [ini.submit_read(64 * i, 64) for i in range(6)]
    assert ini.wait_any(window, timeout=0.0) == []
    finished = 0
    lba = 6
    while window:
        done = ini.wait_any(window)
        assert done and all(io.done for io in done)
        assert done == [io for io in window if io in done]  # in the order given
        for io in done:
            assert io.result() == bytes(64 * BS)
            window.remove(io)
            finished += 1
            if lba < 12:
                window.append(ini.submit_read(64 * lba, 64))
                lba += 1
    assert finished == 12 and ini.outstanding == 0
    assert ini.wait_for(lambda: True) and not ini.wait_for(lambda: False, 0.5)
    ini.logout()
    _teardown(fabric, target, tdev, idev)
