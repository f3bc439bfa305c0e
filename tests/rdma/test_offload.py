"""Segmentation offload between devices on the in-process fabric: with the
link rate 0 and nothing observing single frames, a device's frames for its
peer travel as bursts and consecutive packets of a message as runs; the
moment a tap, a fault or a frame filter is attached they are real frames
again. Either way every operation does exactly what it does frame by frame:
the same completions, counters, memory and — once a tap is on — the same
capture, and the same seed gives the same run.

The loss matrix runs here on both paths: faults come and go between rounds,
so the retries after a loss run over bursts (offload on) or frames (off).
"""

from __future__ import annotations

import hashlib
import io
import random
from typing import Any, cast

import pytest

from softrdma.fabric.inproc import Fabric
from softrdma.fabric.inproc_link import FabricLink
from softrdma.fabric.pcap import PcapWriter
from softrdma.transport.burst import SegRun
from softrdma.transport.rc import RcQp
from softrdma.verbs.enums import IbMtu, IbWcStatus, IbWrOpcode
from softrdma.verbs.wr import RdmaWR
from tests.rdma.nodes import Buffer, FrBuffer, Node, pair, ram_digest
from tests.rdma.test_loss import REMOTE, FaultRates, Rounds, assert_faults_happened

SIZES = [1, 100, 1024, 1025, 5000, 16000, 70000]  # 70000: 69 packets, AckReq mid-message
FAULTS: list[FaultRates] = [
    {"drop": 0.1},
    {"drop": 0.3},
    {"duplicate": 0.3},
    {"reorder": 0.3},
    {"drop": 0.1, "duplicate": 0.1, "reorder": 0.1, "corrupt": 0.05},
]


def _rounds(
    fabric: Fabric,
    a: Node,
    b: Node,
    *,
    rounds: int,
    faults: FaultRates | None = None,
    hooks: dict[int, Any] | None = None,
) -> list[tuple[int, str, int]]:
    """SEND, WRITE, READ and FETCH_ADD per round, checked byte for byte;
    ``faults`` on odd rounds only; ``hooks[r]`` runs before round ``r``.
    Returns every completion as (wr_id, status, byte_len)."""
    rng = random.Random(11)
    run = Rounds(fabric, a, b, 128 * 1024, 128 * 1024)
    seen: list[tuple[int, str, int]] = []
    for r in range(rounds):
        if hooks and r in hooks:
            hooks[r]()
        if faults:
            if r % 2:
                fabric.set_faults(**faults)
            else:
                fabric.clear_faults()
        wcs, got = run.run(r, rng.choice(SIZES), rng)
        seen += [(wc.wr_id, wc.status.name, wc.byte_len) for wc in (*wcs, got)]
    return seen


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "frames"])
@pytest.mark.parametrize("faults", FAULTS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("kinds", [("cpu", "hw-iommu"), ("hw-direct", "cpu")], ids="-".join)
def test_loss_matrix_on_both_paths(
    faults: FaultRates, offload: bool, kinds: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No DMA-API checker here, so that bulk copies happen where they can
    (a CPU-copy or direct-DMA device); behind an IOMMU they are per packet."""
    taken = [0]
    receive_run = RcQp.receive_run

    def counting(qp: RcQp, run: SegRun, i: int) -> int:
        n = receive_run(qp, run, i)
        taken[0] += n
        return n

    monkeypatch.setattr(RcQp, "receive_run", counting)
    fabric, a, b = pair(
        *kinds,
        seed=7,
        link_rate=0,
        offload=offload,
        debug=False,
        mtu=IbMtu.MTU_1024,
        timeout=8,
        retry_cnt=7,
        rnr_retry=7,
    )
    _rounds(fabric, a, b, rounds=8, faults=faults)
    stats = fabric.stats
    assert (stats.bursts > 0) == offload, stats
    assert (taken[0] > 0) == offload, "WRITE packets taken together"
    assert_faults_happened(stats, faults)


def _observed_run(offload: bool, seed: int) -> tuple[object, ...]:
    """A run at link rate 0 in which a fabric-wide tap, a tap on the
    receiving port, a one-shot frame filter and fault rates come and go,
    attached at simulated times (the same in both modes). Everything
    observable, for comparison."""
    fabric, a, b = pair(
        "cpu",
        "cpu",
        seed=seed,
        link_rate=0,
        offload=offload,
        debug=False,  # bulk copies where the DMA-API checker is off
        mtu=IbMtu.MTU_1024,
        timeout=8,
        retry_cnt=7,
    )
    wide, port = io.BytesIO(), io.BytesIO()
    state: dict[str, Any] = {}

    def tap_on() -> None:
        state["wide"] = fabric.tap(PcapWriter(wide, nanosecond=True))

    def tap_off() -> None:
        state["wide"].close()

    def port_tap_on() -> None:
        link = cast(FabricLink, b.dev.link)
        state["port"] = fabric.tap(PcapWriter(port, nanosecond=True), port=link)

    def port_tap_off() -> None:
        state["port"].close()

    def filter_on() -> None:
        # lose the next RDMA WRITE MIDDLE (BTH opcode 0x07 after 42 bytes)
        state["filter"] = fabric.drop_when(lambda f: f[42] == 0x07, count=1)

    hooks = {2: tap_on, 4: tap_off, 5: port_tap_on, 7: port_tap_off, 8: filter_on}
    seen = _rounds(fabric, a, b, rounds=12, hooks=hooks, faults={"drop": 0.05})
    return (
        seen,
        fabric.stats.as_dict() | {"bursts": 0},
        dict(a.dev.stats),
        dict(b.dev.stats),
        fabric.loop.now,
        ram_digest(a.host),
        ram_digest(b.host),
        hashlib.sha256(wide.getvalue()).hexdigest(),
        hashlib.sha256(port.getvalue()).hexdigest(),
        [fabric.attachment(cast(FabricLink, n.dev.link)).stats for n in (a, b)],
        state["filter"].dropped,
    )


def test_offload_changes_nothing_observable() -> None:
    """Bursts, and taps / filters / faults turning frames real mid-run: the
    completions, counters, memory, captures and simulated time are those
    of the frame-by-frame run."""
    on = _observed_run(True, seed=5)
    off = _observed_run(False, seed=5)
    assert on == off
    assert on[-1] == 1  # the filter did drop a frame


def test_same_seed_same_run_with_offload() -> None:
    assert _observed_run(True, seed=9) == _observed_run(True, seed=9)


def bursting(fabric: Fabric) -> bool:
    """Whether the fabric sends bursts now (a call: the value changes)."""
    return fabric.bursts


def test_bursts_only_where_nothing_observes() -> None:
    """Bursts at link rate 0 with nothing attached; never with a link rate,
    a tap, a fault or a filter, or offload off."""
    fabric, a, b = pair("cpu", "cpu", link_rate=0, mtu=IbMtu.MTU_1024)
    link = cast(FabricLink, a.dev.link)
    assert bursting(fabric) and link.offload_active()
    _rounds(fabric, a, b, rounds=2)
    assert fabric.stats.bursts > 0
    for attach, detach in (
        (lambda: fabric.tap(io.BytesIO()), lambda t: t.close()),
        (lambda: fabric.set_faults(drop=0.1), lambda _: fabric.clear_faults()),
        (lambda: fabric.drop_when(lambda f: False), lambda flt: flt.remove()),
    ):
        handle = attach()
        assert not bursting(fabric)
        before = fabric.stats.bursts
        _rounds(fabric, a, b, rounds=1)
        assert fabric.stats.bursts == before
        detach(handle)
        assert bursting(fabric)
    tap = fabric.tap(io.BytesIO(), port=link)
    assert bursting(fabric) and not link.offload_active()
    tap.close()
    fabric.link_rate = 100e9
    assert not bursting(fabric)
    fabric.link_rate = 0
    fabric.offload = False
    assert not bursting(fabric)


def test_a_write_moves_as_runs_with_one_copy_per_segment() -> None:
    """A 1 MiB WRITE between CPU-copy devices: a handful of deliveries, not
    a thousand, and the bytes land."""
    fabric, a, b = pair("cpu", "cpu", link_rate=0, debug=False, mtu=IbMtu.MTU_1024)
    la = a.pd.local_dma_lkey
    src = Buffer(a.dev, 1 << 20)
    target = FrBuffer(b, 1 << 20, REMOTE)
    data = random.Random(1).randbytes(1 << 20)
    src.fill(data)
    before = fabric.loop.events_run
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_WRITE,
            (src.sge(la, 0, 1 << 20),),
            remote_addr=target.iova,
            rkey=target.rkey,
        )
    )
    (wc,) = a.wait(1)
    assert wc.status == IbWcStatus.SUCCESS
    assert target.cpu_read(1 << 20) == data
    assert fabric.stats.sent >= 1024 + 16  # 1024 data frames, an ACK every 64
    assert fabric.loop.events_run - before < 100
