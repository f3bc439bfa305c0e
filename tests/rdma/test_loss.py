"""The loss matrix: with drop, duplicate and reorder rates up to 30% on the
fabric, every operation still completes byte-exact and in order; corrupted
frames fail the ICRC and are dropped."""

from __future__ import annotations

import os
import random
import struct
from typing import TypedDict

import pytest

from softrdma.fabric.inproc import Fabric, FabricStats
from softrdma.verbs.enums import IbAccess, IbMtu, IbWcOpcode, IbWcStatus, IbWrOpcode
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR, WorkCompletion
from tests.rdma.nodes import Buffer, FrBuffer, Node, pair

REMOTE = (
    IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ | IbAccess.REMOTE_ATOMIC
)


class FaultRates(TypedDict, total=False):
    """The rates :meth:`Fabric.set_faults` takes."""

    drop: float
    duplicate: float
    reorder: float
    corrupt: float


FAULTS: list[FaultRates] = [
    {"drop": 0.1},
    {"drop": 0.3},
    {"duplicate": 0.3},
    {"reorder": 0.3},
    {"drop": 0.1, "duplicate": 0.1, "reorder": 0.1, "corrupt": 0.05},
    {"drop": 0.3, "duplicate": 0.3, "reorder": 0.3},
]
ROUNDS = 40 if os.environ.get("SOFTRDMA_SOAK") else 8


def assert_faults_happened(stats: FabricStats, faults: FaultRates) -> None:
    """Each kind of fault asked for happened at least once: else the run
    would prove nothing about it."""
    for kind, counter in (
        ("drop", stats.dropped),
        ("duplicate", stats.duplicated),
        ("reorder", stats.reordered),
        ("corrupt", stats.corrupted),
    ):
        if faults.get(kind):
            assert counter > 0, f"no {kind} happened: the test would prove nothing"


class Rounds:
    """The operations of the loss matrix between ``a`` and ``b``: per round
    a SEND, an RDMA WRITE, an RDMA READ of what was written and a
    FETCH_ADD, each checked byte for byte. ``buf_size`` bytes of source,
    sink and read-back buffers; a fast-registered target of
    ``target_size`` bytes, its last 8 the FETCH_ADD counter."""

    def __init__(self, fabric: Fabric, a: Node, b: Node, buf_size: int, target_size: int) -> None:
        self.fabric, self.a, self.b = fabric, a, b
        self.src = Buffer(a.dev, buf_size)
        self.sink = Buffer(b.dev, buf_size)
        self.back = Buffer(a.dev, buf_size)
        self.fetch_off = buf_size - 8
        self.target = FrBuffer(b, target_size, REMOTE)
        self.counter_off = target_size - 8
        self.target.cpu_write(struct.pack("<Q", 0), self.counter_off)

    def run(
        self, r: int, size: int, rng: random.Random
    ) -> tuple[list[WorkCompletion], WorkCompletion]:
        """Round ``r`` (receive wr_id ``r``) with ``size`` random bytes:
        the four send completions (wr_ids 1..4) and the receive's."""
        a, b, src, back, target = self.a, self.b, self.src, self.back, self.target
        la = a.pd.local_dma_lkey
        data = rng.randbytes(size)
        src.fill(data)
        b.qp.post_recv(RecvWR(r, (self.sink.sge(b.pd.local_dma_lkey),)))
        a.qp.post_send(
            [
                SendWR(1, IbWrOpcode.SEND, (src.sge(la, 0, size),)),
                RdmaWR(
                    2,
                    IbWrOpcode.RDMA_WRITE,
                    (src.sge(la, 0, size),),
                    remote_addr=target.iova,
                    rkey=target.rkey,
                ),
                RdmaWR(
                    3,
                    IbWrOpcode.RDMA_READ,
                    (back.sge(la, 0, size),),
                    remote_addr=target.iova,
                    rkey=target.rkey,
                ),
                AtomicWR(
                    4,
                    IbWrOpcode.ATOMIC_FETCH_AND_ADD,
                    (back.sge(la, self.fetch_off, 8),),
                    remote_addr=target.iova + self.counter_off,
                    compare_add=3,
                    rkey=target.rkey,
                ),
            ]
        )
        wcs = a.wait(4)
        assert [(wc.wr_id, wc.status) for wc in wcs] == [
            (i, IbWcStatus.SUCCESS) for i in (1, 2, 3, 4)
        ], (r, wcs, self.fabric.stats)
        (got,) = b.wait(1)
        assert got.status == IbWcStatus.SUCCESS and got.byte_len == size and got.wr_id == r
        assert self.sink.read(size) == data
        assert back.read(size) == data, "READ after WRITE sees the written bytes"
        assert struct.unpack("<Q", back.read(8, self.fetch_off))[0] == 3 * r, (
            "atomics execute exactly once"
        )
        return wcs, got

    def counter(self) -> int:
        """The FETCH_ADD counter as the target's memory holds it."""
        value: int = struct.unpack("<Q", self.target.cpu_read(8, self.counter_off))[0]
        return value


@pytest.mark.parametrize("faults", FAULTS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("kinds", [("cpu", "hw-iommu"), ("hw-direct", "cpu")], ids="-".join)
def test_operations_survive_a_lossy_fabric(faults: FaultRates, kinds: tuple[str, str]) -> None:
    fabric, a, b = pair(*kinds, seed=7, mtu=IbMtu.MTU_1024, timeout=8, retry_cnt=7, rnr_retry=7)
    fabric.set_faults(**faults)
    rng = random.Random(11)
    rounds = Rounds(fabric, a, b, 64 * 1024, 32 * 1024)
    for round_ in range(ROUNDS):
        wcs, _ = rounds.run(round_, rng.choice([1, 100, 1024, 1025, 5000, 16000]), rng)
        assert [wc.opcode for wc in wcs] == [
            IbWcOpcode.SEND,
            IbWcOpcode.RDMA_WRITE,
            IbWcOpcode.RDMA_READ,
            IbWcOpcode.FETCH_ADD,
        ]
    assert rounds.counter() == 3 * ROUNDS
    stats = fabric.stats
    assert_faults_happened(stats, faults)
    if faults.get("corrupt"):
        # Every corrupted frame is dropped by the receiving link, by reason.
        link_drops = sum(
            n
            for dev in (a.dev, b.dev)
            for name, n in dev.stats.items()
            if name.startswith("rx_") and name not in ("rx_wrong_peer", "rx_no_qp")
        )
        assert stats.corrupted <= link_drops <= stats.corrupted + stats.duplicated


def test_same_seed_same_packets() -> None:
    traces = []
    for _ in range(2):
        fabric, a, b = pair("cpu", "hw-iommu", seed=3)
        fabric.set_faults(drop=0.2, reorder=0.2, duplicate=0.1)
        frames: list[tuple[float, bytes]] = []

        def record(
            frame: bytes, fr: list[tuple[float, bytes]] = frames, fab: Fabric = fabric
        ) -> bool:
            fr.append((fab.loop.now, bytes(frame)))
            return False

        fabric.drop_when(record)
        src = Buffer(a.dev, 20000)
        src.fill(bytes(range(256)) * 78)
        sink = Buffer(b.dev, 20000)
        b.qp.post_recv(RecvWR(1, (sink.sge(b.pd.local_dma_lkey),)))
        a.qp.post_send(SendWR(1, IbWrOpcode.SEND, (src.sge(a.pd.local_dma_lkey, 0, 19968),)))
        a.wait_ok()
        b.wait_ok()
        traces.append(frames)
    assert traces[0] == traces[1]
    assert len(traces[0]) > 10, "5 data packets, ACKs, retransmissions"
