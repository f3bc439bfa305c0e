from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from softrdma.cli import main
from softrdma.cli.demo_dma import run

ROOT = Path(__file__).resolve().parents[1]


def test_demo_dma_shows_every_backend_and_the_checker() -> None:
    out = io.StringIO()
    assert run(6000, out) == 0
    text = out.getvalue()
    for backend in ("direct", "swiotlb", "iommu", "virtual"):
        assert f"  {backend:8s} dma 0x" in text
    assert text.count("[ok]") == 4 and "MISMATCH" not in text
    assert "blocked, fault recorded: DMAR" in text
    assert "(stale cache line)" in text and "b'fresh from the device'" in text
    assert "7 reports" in text and "[leak]" in text


def test_console_entry_point() -> None:
    assert main(["demo", "dma", "--size", "4096"]) == 0


def test_benchmark_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dma.py"), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    # The benchmark owns its performance limits (machines are shared and
    # noisy): here only the result's shape is checked, never a ratio's value.
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    backends = {"direct", "swiotlb", "iommu", "virtual"}
    assert set(result) == {
        "map_unmap",
        "iommu_map_unmap_by_live",
        "iommu_cost_ratio_max_over_min_live",
        "iommu_fresh_map_by_live",
        "iommu_fresh_cost_ratio_max_over_min_live",
        "read_1MiB",
        "read_1MiB_vs_memoryview_copy",
    }
    assert set(result["map_unmap"]) == backends
    for rates in result["map_unmap"].values():
        assert set(rates) == {"single_4k_ops_per_s", "sg16_ops_per_s"}
    live_counts = set(result["iommu_map_unmap_by_live"])
    assert len(live_counts) >= 2 and set(result["iommu_fresh_map_by_live"]) == live_counts
    assert set(result["read_1MiB"]) == {"memoryview_copy_bytes_per_s"} | {
        f"{kind}_bytes_per_s" for kind in backends
    }
    assert set(result["read_1MiB_vs_memoryview_copy"]) == backends
    numbers = list(_leaves(result))
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in numbers), numbers


def _leaves(tree: object) -> Iterator[object]:
    """The values at the leaves of nested dicts."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def test_demo_rdma_end_to_end(tmp_path: Path) -> None:
    from softrdma.cli.demo_rdma import run as run_rdma
    from softrdma.fabric.pcap import read_pcap

    out = io.StringIO()
    pcap = tmp_path / "demo.pcap"
    assert run_rdma(out, pcap=str(pcap)) == 0
    text = out.getvalue()
    assert (
        text.count(
            "data in the initiator's buffer: True; RDMA READ IB_WC_SUCCESS, same bytes back: True"
        )
        == 2
    )
    assert "= the kernel virtual address (virtual DMA)" in text and "= an IOVA" in text
    assert "got b'not mapped for anyone'" in text
    assert "IB_WC_REM_ACCESS_ERR; IOMMU: DMAR: [DMA read]" in text
    assert "WRITE with a bogus rkey: IB_WC_REM_ACCESS_ERR; QPs now ERR / ERR" in text
    assert len(list(read_pcap(pcap))) > 100


def test_softrdma_demo_runs_every_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0
    assert (tmp_path / "softrdma-demo.pcap").stat().st_size > 0


#: SHA-256 of the pcap ``softrdma demo rdma`` writes (its seed and faults are
#: fixed). The in-process stack is deterministic across versions, not only
#: within a run: a change of this value means the frames on the wire changed —
#: update it only for a deliberate change to the protocol engines, and say so.
DEMO_PCAP_SHA256 = "d09330896bda58321d9b946bb07494f9262bebb8720c0f2b01ec804a44c01f20"


def test_demo_pcap_is_bit_for_bit_stable(tmp_path: Path) -> None:
    import hashlib

    from softrdma.cli.demo_rdma import run as run_rdma

    pcap = tmp_path / "demo.pcap"
    assert run_rdma(io.StringIO(), pcap=str(pcap)) == 0
    assert hashlib.sha256(pcap.read_bytes()).hexdigest() == DEMO_PCAP_SHA256


def test_management_benchmark_smoke() -> None:
    """``bench/cm.py --quick`` runs MAD round trips and RDMA CM connection
    cycles to the end and reports them against its UDP limit (shape only)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cm.py"), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = {"mad_round_trips_per_s", "rdma_cm_connection_cycles_per_s"}
    assert set(result["results"]) == set(result["ratios"]) == metrics
    assert all(v > 0 for v in result["results"].values())


def test_srp_benchmark_smoke() -> None:
    """``bench/srp.py --quick`` runs every SRP workload on every set-up and
    reports each against its ``os.pread`` / ``os.pwrite`` limit (shape only)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "srp.py"), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    setups = {name.split(".")[0] for name in result["metrics"]}
    assert setups == {"cpu", "hw-iommu", "udp"}
    for metric in result["metrics"].values():
        assert metric["value"] > 0 and metric["ratio"] > 0 and metric["baseline"]
    for stats in result["initiator_stats"].values():
        assert stats["commands"] == stats["completed"] > 0 and stats["wc_errors"] == 0


def test_iser_benchmark_smoke() -> None:
    """``bench/iser.py --quick`` runs every iSER workload on every set-up (the
    udp one with the target in a child process) and reports each against
    its ``os.pread`` / ``os.pwrite`` limit (shape only)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "iser.py"), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"config", "baselines", "metrics", "initiator_stats"}
    names = {f"read_4KiB_random_qd{d}" for d in (16, 32)} | {"read_1MiB_seq", "write_1MiB_seq_sync"}
    assert set(result["metrics"]) == {f"{s}.{n}" for s in ("cpu", "hw-iommu", "udp") for n in names}
    for metric in result["metrics"].values():
        assert metric["value"] > 0 and metric["ratio"] > 0 and metric["baseline"]
    assert set(result["initiator_stats"]) == {"cpu", "hw-iommu", "udp"}
    for stats in result["initiator_stats"].values():
        assert stats["logins"] == stats["logouts"] == 1
        assert stats["reads"] > 0 and stats["writes"] > 0 and stats["reg_mr"] > 0
