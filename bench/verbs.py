"""Verbs benchmark: RDMA WRITE / READ bandwidth and small-message rates
between two simulated hosts, for a CPU-copy pair and a hardware pair
behind IOMMUs.

Every figure is also given as a ratio to a limit measured in the same run:
bandwidth against a plain memoryview copy of 1 MiB, message rates against
64-byte datagrams through a raw UDP socket on loopback. Prints a table and,
last, one JSON object.

    python bench/verbs.py            # full run
    python bench/verbs.py --quick    # fewer iterations, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from dataclasses import dataclass

from softrdma.dma.platform import Platform
from softrdma.dma.types import DMA_BIDIRECTIONAL
from softrdma.drivers.hca import HwHca
from softrdma.drivers.roce import RoceDevice
from softrdma.drivers.rxe import SoftRoce
from softrdma.fabric.inproc import Fabric
from softrdma.memory.host import Host, MiB
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.dma import ib_dma_map_single
from softrdma.verbs.enums import IbMtu, IbPdFlags, IbQpType, IbSendFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.qp import IbSigType, QpCap, QpInitAttr, QueuePair, connect_qp
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR, Sge

MSG = 1 * MiB
SMALL = 64
DEPTH = 128


@dataclass
class End:
    dev: RoceDevice
    qp: QueuePair
    cq: CompletionQueue
    lkey: int
    rkey: int
    buf: int  # DMA address of a 1 MiB buffer


def make_end(kind: str, fabric: Fabric, ip: str) -> End:
    host = Host(256 * MiB, name=ip)
    if kind == "cpu":
        dev: RoceDevice = SoftRoce(Platform(host, swiotlb_size=None), fabric, ip, netdev_mtu=9000)
    else:
        dev = HwHca(Platform(host, iommu=True), fabric, ip, netdev_mtu=9000)
    pd = dev.alloc_pd(IbPdFlags.UNSAFE_GLOBAL_RKEY)
    cq = dev.create_cq(4 * DEPTH)
    qp = dev.create_qp(
        pd,
        QpInitAttr(
            IbQpType.RC,
            cq,
            cq,
            QpCap(max_send_wr=DEPTH, max_recv_wr=DEPTH),
            sq_sig_type=IbSigType.REQ_WR,  # unsignaled WRs complete silently
        ),
    )
    kva = host.kmalloc(MSG)
    dma = ib_dma_map_single(dev, kva, MSG, DMA_BIDIRECTIONAL)
    return End(dev, qp, cq, pd.local_dma_lkey, pd.unsafe_global_rkey, dma)


def make_pair(kind: str) -> tuple[Fabric, End, End]:
    fabric = Fabric(link_rate=0)
    a, b = make_end(kind, fabric, "10.0.0.1"), make_end(kind, fabric, "10.0.0.2")
    for x, y in ((a, b), (b, a)):
        connect_qp(x.qp, dest_qp_num=y.qp.qp_num, dgid=y.dev.query_gid(), path_mtu=IbMtu.MTU_4096)
    return fabric, a, b


def drain(cq: CompletionQueue, n: int) -> None:
    while n:
        wcs = cq.poll(n)
        for wc in wcs:
            if wc.status != IbWcStatus.SUCCESS:
                raise RuntimeError(str(wc))
        n -= len(wcs)


def bandwidth(kind: str, opcode: IbWrOpcode, iters: int) -> float:
    """Bytes per second of 1 MiB RDMA WRITEs or READs, one at a time."""
    _fabric, a, b = make_pair(kind)
    wr = RdmaWR(
        1,
        opcode,
        (Sge(a.buf, MSG, a.lkey),),
        send_flags=IbSendFlags.SIGNALED,
        remote_addr=b.buf,
        rkey=b.rkey,
    )
    a.qp.post_send(wr)
    drain(a.cq, 1)  # warm up
    t0 = time.perf_counter()
    for _ in range(iters):
        a.qp.post_send(wr)
        drain(a.cq, 1)
    return iters * MSG / (time.perf_counter() - t0)


def message_rate(kind: str, opcode: IbWrOpcode, iters: int, every_op: bool) -> float:
    """64-byte messages per second, DEPTH in flight; a completion for every
    message, or only for the last of each batch (unsignaled sends)."""
    _fabric, a, b = make_pair(kind)
    if opcode == IbWrOpcode.SEND:
        b.qp.post_recv([RecvWR(i, (Sge(b.buf, SMALL, b.lkey),)) for i in range(DEPTH)])
    sge = (Sge(a.buf, SMALL, a.lkey),)
    done = 0
    t0 = time.perf_counter()
    while done < iters:
        batch = min(DEPTH, iters - done)
        wrs = []
        for i in range(batch):
            flags = IbSendFlags.SIGNALED if every_op or i == batch - 1 else IbSendFlags(0)
            if opcode == IbWrOpcode.SEND:
                wrs.append(SendWR(i, opcode, sge, send_flags=flags))
            else:
                wrs.append(RdmaWR(i, opcode, sge, send_flags=flags, remote_addr=b.buf, rkey=b.rkey))
        a.qp.post_send(wrs)
        drain(a.cq, batch if every_op else 1)
        if opcode == IbWrOpcode.SEND:
            drain(b.cq, batch)
            b.qp.post_recv([RecvWR(i, (Sge(b.buf, SMALL, b.lkey),)) for i in range(batch)])
        done += batch
    return iters / (time.perf_counter() - t0)


def memcpy_limit(iters: int) -> float:
    src, dst = bytearray(MSG), bytearray(MSG)
    s, d = memoryview(src), memoryview(dst)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        d[:] = s
        best = min(best, time.perf_counter() - t0)
    return MSG / best


def udp_limit(iters: int) -> float:
    """64-byte datagrams per second through a raw loopback UDP socket pair."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    payload = bytes(SMALL)
    t0 = time.perf_counter()
    for _ in range(iters // 64):
        for _ in range(64):
            tx.send(payload)
        for _ in range(64):
            rx.recv(2048)
    rate = (iters // 64 * 64) / (time.perf_counter() - t0)
    rx.close()
    tx.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    bw_iters, msg_iters = (3, 512) if args.quick else (20, 4096)
    limits = {
        "memoryview_copy_1MiB_bytes_per_s": memcpy_limit(50),
        "udp_loopback_64B_per_s": udp_limit(msg_iters * 4),
    }
    results: dict[str, dict[str, float]] = {}
    for kind in ("cpu", "hw-iommu"):
        r = results[kind] = {}
        r["write_1MiB_bytes_per_s"] = bandwidth(kind, IbWrOpcode.RDMA_WRITE, bw_iters)
        r["read_1MiB_bytes_per_s"] = bandwidth(kind, IbWrOpcode.RDMA_READ, bw_iters)
        for op in (IbWrOpcode.RDMA_WRITE, IbWrOpcode.SEND):
            for every in (True, False):
                key = f"{op.name.lower()}_64B_{'cqe_per_op' if every else 'cqe_per_batch'}_per_s"
                r[key] = message_rate(kind, op, msg_iters, every)
    ratios = {
        kind: {
            k: v
            / (
                limits["memoryview_copy_1MiB_bytes_per_s"]
                if "1MiB" in k
                else limits["udp_loopback_64B_per_s"]
            )
            for k, v in r.items()
        }
        for kind, r in results.items()
    }
    print(f"{'pair':10s} {'metric':34s} {'value':>14s} {'vs limit':>10s}")
    for kind, r in results.items():
        for k, v in r.items():
            shown = f"{v / 1e6:10.1f} MB/s" if "bytes" in k else f"{v:10,.0f} /s"
            print(f"{kind:10s} {k:34s} {shown:>14s} {ratios[kind][k]:10.4f}")
    print(
        f"{'limit':10s} {'memoryview copy of 1 MiB':34s} {limits['memoryview_copy_1MiB_bytes_per_s'] / 1e6:10.1f} MB/s"
    )
    print(
        f"{'limit':10s} {'UDP loopback, 64-byte datagrams':34s} {limits['udp_loopback_64B_per_s']:10,.0f} /s"
    )
    print(json.dumps({"limits": limits, "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
