"""The loss matrix: with drop, duplicate and reorder rates up to 30% on the
fabric, every operation still completes byte-exact and in order; corrupted
frames fail the ICRC and are dropped."""

from __future__ import annotations

import os
import random
import struct
from typing import TypedDict

import pytest

from softrdma.fabric.inproc import Fabric
from softrdma.verbs.enums import IbAccess, IbMtu, IbWcOpcode, IbWcStatus, IbWrOpcode
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR
from tests.rdma.nodes import Buffer, FrBuffer, pair

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


@pytest.mark.parametrize("faults", FAULTS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("kinds", [("cpu", "hw-iommu"), ("hw-direct", "cpu")], ids="-".join)
def test_operations_survive_a_lossy_fabric(faults: FaultRates, kinds: tuple[str, str]) -> None:
    fabric, a, b = pair(*kinds, seed=7, mtu=IbMtu.MTU_1024, timeout=8, retry_cnt=7, rnr_retry=7)
    fabric.set_faults(**faults)
    rng = random.Random(11)
    la, lb = a.pd.local_dma_lkey, b.pd.local_dma_lkey
    src = Buffer(a.dev, 64 * 1024)
    sink = Buffer(b.dev, 64 * 1024)
    back = Buffer(a.dev, 64 * 1024)
    target = FrBuffer(b, 32 * 1024, REMOTE)
    counter_off = 32 * 1024 - 8
    target.cpu_write(struct.pack("<Q", 0), counter_off)
    adds = 0
    for round_ in range(ROUNDS):
        size = rng.choice([1, 100, 1024, 1025, 5000, 16000])
        data = rng.randbytes(size)
        src.fill(data)
        b.qp.post_recv(RecvWR(round_, (sink.sge(lb),)))
        wrs = [
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
                (back.sge(la, 60000, 8),),
                remote_addr=target.iova + counter_off,
                compare_add=3,
                rkey=target.rkey,
            ),
        ]
        a.qp.post_send(wrs)
        wcs = a.wait(4)
        assert [(wc.wr_id, wc.status) for wc in wcs] == [
            (i, IbWcStatus.SUCCESS) for i in (1, 2, 3, 4)
        ], (round_, wcs, fabric.stats)
        assert [wc.opcode for wc in wcs] == [
            IbWcOpcode.SEND,
            IbWcOpcode.RDMA_WRITE,
            IbWcOpcode.RDMA_READ,
            IbWcOpcode.FETCH_ADD,
        ]
        (got,) = b.wait(1)
        assert got.status == IbWcStatus.SUCCESS and got.byte_len == size and got.wr_id == round_
        assert sink.read(size) == data
        assert back.read(size) == data, "READ after WRITE sees the written bytes"
        assert struct.unpack("<Q", back.read(8, 60000))[0] == 3 * adds, (
            "atomics execute exactly once"
        )
        adds += 1
    assert struct.unpack("<Q", target.cpu_read(8, counter_off))[0] == 3 * adds
    stats = fabric.stats
    for kind, counter in (
        ("drop", stats.dropped),
        ("duplicate", stats.duplicated),
        ("reorder", stats.reordered),
        ("corrupt", stats.corrupted),
    ):
        if faults.get(kind):
            assert counter > 0, f"no {kind} happened: the test would prove nothing"
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
