"""Data integrity through SRP: the real initiator against the real target,
random reads and writes of random sizes (one block to several hundred KiB,
most of them larger than one command moves, so they split) at random
offsets, many in flight at once (``submit_read`` / ``submit_write`` +
``wait_io``, more than ``can_queue``), checked against the same operations
on a plain bytearray; at the end, after SYNCHRONIZE CACHE and logout, the
image file holds exactly the reference, no DMA mapping of the session is
left on either host, and the DMA-API debug checker of both has nothing to
report.

On every device pairing (4 × 4) in every registration mode (fast
registration; FR with the global rkey for single segments; the global rkey
only), with highmem pages on and off and 512- and 4096-byte blocks
rotated across them; with packet loss and reordering in process; driven
by Hypothesis; and between two processes over real UDP — in a private
network namespace with packet loss when the host allows it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softrdma.ulp.srp.target import SrpTarget
from tests.fabric.netaddr import loopback_addresses
from tests.test_srp_cli import ADD_TARGET, TIMEOUT, TargetProcess, softrdma, target_process
from tests.ulp.op_strategies import disjoint, op_strategy
from tests.ulp.srp_rig import (
    IMAGE_SIZE,
    KINDS,
    MODES,
    TARGET_IP,
    Op,
    Reference,
    SrpPair,
    check_image,
    make_pair,
    random_io,
    run_batch,
    udp_random_io,
)

SOAK = bool(os.environ.get("SOFTRDMA_SOAK"))
REPO = Path(__file__).resolve().parents[2]


def combos() -> Iterator[tuple[str, str, str, int, bool]]:
    """Every (target kind, initiator kind, mode), with the block size and
    highmem rotated so that every pairing, and every initiator kind in
    every mode, sees both of each."""
    for (ti, tkind), (ii, ikind) in itertools.product(enumerate(KINDS), enumerate(KINDS)):
        for m, mode in enumerate(MODES):
            block_size = (512, 4096)[(ti + ii + m) % 2]
            yield tkind, ikind, mode, block_size, (ti // 2 + ii + m) % 2 == 0


def combo_id(tkind: str, ikind: str, mode: str, block_size: int, highmem: bool) -> str:
    return f"t-{tkind}-i-{ikind}-{mode}-{block_size}-{'high' if highmem else 'low'}"


ALL = [pytest.param(*c, id=combo_id(*c)) for c in combos()]


def session(pair: SrpPair, seed: int, batches: int, width: int = 24) -> Reference:
    """Random batches of concurrent I/O, then a blocking write and read
    across a command boundary; logout; the image must equal the reference."""
    ini = pair.ini
    ref = Reference.zeros(IMAGE_SIZE, pair.block_size)
    rng = random.Random(seed)
    random_io(ini, ref, rng, batches=batches, width=width)
    span = ini.max_transfer_blocks + 3
    lba = rng.randrange(0, pair.blocks - span)
    data = rng.randbytes(span * pair.block_size)
    ini.write(lba, data)
    ref.data[lba * pair.block_size : (lba + span) * pair.block_size] = data
    assert ini.read(lba, span) == data
    pair.logout()
    check_image(pair.image, ref)
    return ref


def check_activity(pair: SrpPair, ref: Reference, mode: str) -> None:
    """The session did what it was meant to: commands beyond ``can_queue``
    queued, transfers split, immediate data, the mode's descriptors."""
    st_ = pair.ini.stats
    assert ref.reads and ref.writes
    # many commands in flight, more waiting for a free slot, transfers split
    assert ref.max_in_flight >= pair.ini.can_queue // 2 and ref.max_queued > 0
    assert st_.commands > ref.reads + ref.writes
    assert st_.immediate > 0 and st_.completed == st_.commands
    if mode == "global" or (mode == "fr+global" and pair.idev.dma_device.platform.iommu):
        # (an IOMMU maps every buffer as one range: one segment, the global rkey)
        assert st_.reg_mr == 0
    else:
        assert st_.reg_mr > 0
    if mode == "fr" and not st_.reconnects:
        assert st_.local_inv == st_.reg_mr  # every key invalidated
    assert st_.progress_errors == 0


@pytest.mark.parametrize(("tkind", "ikind", "mode", "block_size", "highmem"), ALL)
def test_random_io_matches_a_plain_file(
    tmp_path: Path, tkind: str, ikind: str, mode: str, block_size: int, highmem: bool
) -> None:
    seed = KINDS.index(tkind) * 12 + KINDS.index(ikind) * 3 + list(MODES).index(mode)
    pair = make_pair(tmp_path, ikind, tkind, mode, block_size=block_size, highmem=highmem)
    ref = session(pair, seed=seed, batches=4)
    check_activity(pair, ref, mode)
    assert pair.ini.stats.reconnects == 0 and pair.ini.stats.wc_errors == 0
    pair.close()


@pytest.mark.parametrize("mode", ["fr", "fr+global"])
def test_swiotlb_fast_registration_of_a_short_last_page(tmp_path: Path, mode: str) -> None:
    """A swiotlb initiator with fast registration and transfers whose last
    page is partly used: swiotlb bounces that short last segment through a
    2 KiB slot that need not be page-aligned (as Linux's does for a device
    without a ``min_align_mask``), one MR cannot follow the gap, and the
    command needs more MRs than ``mr_per_cmd``: "Out of MRs". ib_srp answers
    TASK SET FULL and the midlayer requeues; so does this initiator (after
    the commands in flight, or at once with none), and the next mapping
    lands elsewhere: every transfer completes."""
    pair = make_pair(tmp_path, "hw-swiotlb", "hw-direct", mode, block_size=512)
    ref = Reference.zeros(IMAGE_SIZE, 512)
    # Concurrent transfers of odd sizes leave the bounce pool's free slots
    # at odd 2 KiB offsets.
    random_io(pair.ini, ref, random.Random(3), batches=6, width=24)
    assert pair.ini.stats.map_busy > 0  # the requeues happened
    pair.logout()
    check_image(pair.image, ref)
    pair.close()


# -- packet loss ----------------------------------------------------------------------

LOSSY = [
    pytest.param(
        tkind,
        ikind,
        mode,
        block_size,
        highmem,
        id=combo_id(tkind, ikind, mode, block_size, highmem),
    )
    for n, (tkind, ikind, mode, block_size, highmem) in enumerate(combos())
    if n % 3 == (n // 3) % 3  # one mode per pairing, rotated
]


@pytest.mark.parametrize(("tkind", "ikind", "mode", "block_size", "highmem"), LOSSY)
def test_random_io_with_packet_loss(
    tmp_path: Path, tkind: str, ikind: str, mode: str, block_size: int, highmem: bool
) -> None:
    """5 % of the frames dropped, 5 % reordered, both ways: the RC transport
    retransmits, and the data is still exactly the reference's. (The
    connection may go down and come back: a retransmitted RDMA READ
    request delayed past the end of its command reaches a buffer the
    initiator has invalidated or unmapped meanwhile, the initiator's QP
    NAKs it and enters the error state, as rxe's does; the initiator
    reconnects and sends the unanswered commands again.)"""
    seed = KINDS.index(tkind) * 4 + KINDS.index(ikind)
    pair = make_pair(
        tmp_path, ikind, tkind, mode, block_size=block_size, highmem=highmem, seed=seed
    )
    pair.fabric.set_faults(drop=0.05, reorder=0.05)
    ref = session(pair, seed=seed, batches=3)
    check_activity(pair, ref, mode)
    assert pair.fabric.stats.dropped > 50 and pair.fabric.stats.reordered > 50
    pair.close()


@pytest.mark.parametrize(
    ("tkind", "ikind", "mode"),
    [
        ("cpu", "hw-iommu", "fr"),
        ("hw-swiotlb", "hw-iommu", "global"),
        ("hw-iommu", "hw-direct", "global"),
    ],
)
def test_dropped_frames_leave_the_connection_up(
    tmp_path: Path, tkind: str, ikind: str, mode: str
) -> None:
    """Dropped frames alone (no reordering, so no late duplicates) are the
    RC transport's business: the connection stays up, no work request
    fails, the data is the reference's."""
    pair = make_pair(tmp_path, ikind, tkind, mode, seed=4)
    pair.fabric.set_faults(drop=0.05)
    session(pair, seed=4, batches=3)
    assert (pair.ini.stats.reconnects, pair.ini.stats.wc_errors) == (0, 0)
    assert pair.fabric.stats.dropped > 50
    pair.close()


@pytest.mark.soak
@pytest.mark.parametrize("mode", list(MODES))
def test_soak_random_io_with_loss(tmp_path: Path, mode: str) -> None:
    """Long random runs with loss on every pairing (set SOFTRDMA_SOAK=1);
    by default one pairing, a few batches."""
    pairings = list(itertools.product(KINDS, KINDS)) if SOAK else [("hw-iommu", "hw-swiotlb")]
    for n, (tkind, ikind) in enumerate(pairings):
        block_size = (512, 4096)[n % 2]
        pair = make_pair(tmp_path, ikind, tkind, mode, seed=100 + n, block_size=block_size)
        pair.fabric.set_faults(drop=0.02, reorder=0.02, duplicate=0.01)
        session(pair, seed=100 + n, batches=30 if SOAK else 2)
        pair.close()


# -- Hypothesis -------------------------------------------------------------------------

op_st = op_strategy(4096, 320)  # a small disk: operations of one example overlap often


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    pairing=st.sampled_from(
        [
            (t, i, m)
            for t, i, m in itertools.product(KINDS, KINDS, MODES)
            if i != "hw-swiotlb" or m == "global"  # 512-byte blocks: see SWIOTLB_TAIL
        ]
    ),
    batches=st.lists(st.lists(op_st, min_size=1, max_size=10), min_size=1, max_size=5),
    highmem=st.booleans(),
)
def test_operation_sequences(
    tmp_path_factory: pytest.TempPathFactory,
    pairing: tuple[str, str, str],
    batches: list[list[Op]],
    highmem: bool,
) -> None:
    """Any sequence of batches of concurrent non-overlapping reads and
    writes (overlapping across batches) on a small region, on any pairing
    and mode, reads what was written last."""
    tkind, ikind, mode = pairing
    pair = make_pair(tmp_path_factory.mktemp("hyp"), ikind, tkind, mode, highmem=highmem)
    ref = Reference.zeros(IMAGE_SIZE, 512)
    for batch in batches:
        run_batch(pair.ini, ref, disjoint(batch))
    for op in {(o.lba, o.nblocks) for b in batches for o in b}:
        lba, n = op
        assert pair.ini.read(lba, n) == ref.data[lba * 512 : (lba + n) * 512]
    pair.logout()
    check_image(pair.image, ref)
    pair.close()


# -- two processes over UDP -------------------------------------------------------------


@pytest.mark.parametrize("drop", [0.0, 0.02], ids=["lossless", "loss-2%"])
def test_between_two_processes_over_udp(tmp_path: Path, drop: float) -> None:
    """``softrdma srp target`` in its own process on a loopback address; the
    initiator in this process on a UDP network device behind an IOMMU, in
    real time: random I/O verified as it goes, and the image file, once the
    target has stopped, equals the reference. With loss, 2 % of the
    initiator's frames are lost each way on real sockets: the RC transports
    of both processes retransmit."""
    ip_t, ip_i = loopback_addresses(2)
    image = tmp_path / "disk.img"
    with target_process(tmp_path, str(image), "--ip", ip_t, "--create-size", "8M") as target:
        run = udp_random_io(
            ip_t, ip_i, target.target_port_id, port=target.port, batches=4, drop=drop
        )
        assert target.terminate() == 0, target.stderr()
    assert run.reports == []
    assert (run.dropped > 20) == bool(drop), run.dropped
    assert run.stats["reconnects"] == 0 and run.stats["completed"] == run.stats["commands"]
    assert run.ref.reads and run.ref.writes
    check_image(image, run.ref)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)


@contextlib.contextmanager
def network_namespace(loss: str | None) -> Iterator[list[str]]:
    """A private network namespace with its loopback up and, with ``loss``,
    a netem qdisc dropping that share of every packet on it; the command
    prefix that runs a program inside. Removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("a network namespace needs ip and tc (iproute2)")
    name = f"softrdma-srp-{os.getpid()}-{next(_ns_counter)}"
    made = _run("ip", "netns", "add", name)
    if made.returncode:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        up = _run("ip", "-n", name, "link", "set", "lo", "up")
        assert up.returncode == 0, up.stderr
        prefix = ["ip", "netns", "exec", name]
        if loss is not None:
            qdisc = _run(*prefix, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "loss", loss)
            if qdisc.returncode:
                pytest.skip(f"no netem qdisc to drop packets with: {qdisc.stderr.strip()}")
        yield prefix
    finally:
        _run("ip", "netns", "del", name)


_ns_counter = itertools.count(1)


@contextlib.contextmanager
def target_process_in(prefix: list[str], tmp: Path, *args: str) -> Iterator[TargetProcess]:
    """``softrdma srp target`` started under ``prefix``, up; killed if left."""
    out, err = tmp / "target.out", tmp / "target.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen([*prefix, *softrdma("target", *args)], stdout=o, stderr=e)
    try:
        t = TargetProcess(proc, out, err)
        m = t.wait_line(ADD_TARGET.pattern)
        t.target_port_id = bytes.fromhex(m.group(1) + m.group(2))
        t.port = int(m.group(4))
        yield t
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def udp_in_namespace(tmp_path: Path, loss: str | None) -> None:
    """Target and initiator each in a process of their own inside a fresh
    network namespace (lossy with ``loss``): random I/O, the image equals
    the initiator's reference."""
    image, reference = tmp_path / "disk.img", tmp_path / "reference.img"
    ip_t, ip_i = "127.0.0.2", "127.0.0.3"  # the namespace is ours alone
    with (
        network_namespace(loss) as prefix,
        target_process_in(prefix, tmp_path, str(image), "--ip", ip_t, "--create-size", "8M") as t,
    ):
        argv = [*prefix, sys.executable, "-m", "tests.ulp.srp_rig", ip_t, ip_i,
                t.target_port_id.hex(), str(reference), "--mode", "fr", "--batches", "3",
                "--timeout", "60"]  # fmt: skip
        ini = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=REPO)
        assert ini.returncode == 0, ini.stderr[-3000:]
        summary = json.loads(ini.stdout.splitlines()[-1])
        assert t.terminate() == 0, t.stderr()
    assert summary["reports"] == [] and summary["reads"] and summary["writes"]
    assert summary["stats"]["completed"] == summary["stats"]["commands"]
    check_image(image, Reference(512, bytearray(reference.read_bytes())))


@pytest.mark.parametrize("loss", [None, "2%"], ids=["lossless", "netem-loss-2%"])
def test_between_two_processes_in_a_network_namespace(tmp_path: Path, loss: str | None) -> None:
    """Both processes in a namespace of their own: without loss (which
    checks the harness itself), and over a loopback that drops 2 % of the
    packets (netem) when the kernel has it."""
    udp_in_namespace(tmp_path, loss)


# -- a target restart -------------------------------------------------------------------


@pytest.mark.parametrize(("tkind", "ikind"), [("hw-iommu", "cpu"), ("cpu", "hw-swiotlb")])
def test_a_restarted_target_loses_no_acknowledged_write(
    tmp_path: Path, tkind: str, ikind: str
) -> None:
    """The real target stops (every channel gets a DREQ) while writes are on
    the wire, and a new target serves the same image: the initiator
    reconnects by itself after ``reconnect_delay``, sends the writes it had
    no response for again, and every write — acknowledged before the
    restart or after — is in the image."""
    pair = make_pair(tmp_path, ikind, tkind, reconnect_delay=2.0, fast_io_fail_tmo=None)
    ini, bs = pair.ini, pair.block_size
    acked = {lba: bytes([lba & 0xFF]) * 16 * bs for lba in range(0, 320, 64)}
    for lba, data in acked.items():
        ini.write(lba, data)
    inflight = {lba: bytes([0x80 | (lba & 0x7F)]) * 24 * bs for lba in range(1000, 1600, 100)}
    ios = [ini.submit_write(lba, data) for lba, data in inflight.items()]
    core = pair.target.scsi
    pair.target.close()  # before the fabric carries the writes: none is answered
    pair.target = SrpTarget(pair.tdev.host, core, addr=TARGET_IP,
                            rq_size=pair.target.rq_size)  # fmt: skip
    assert ini.wait_io(ios, timeout=60.0)
    assert all(io.result() is None for io in ios)
    assert ini.stats.reconnects == 1 and ini.stats.resubmitted >= 1
    for lba, data in {**acked, **inflight}.items():
        assert ini.read(lba, len(data) // bs) == data
    pair.logout()
    image = pair.image.read_bytes()
    for lba, data in {**acked, **inflight}.items():
        assert image[lba * bs : lba * bs + len(data)] == data
    pair.close()
