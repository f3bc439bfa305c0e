"""Management benchmark: MAD request / response round trips through the MAD
layer, and RDMA CM connection cycles (resolve, REQ / REP / RTU, DREQ /
DREP), between two simulated hosts (a CPU-copy device and a hardware HCA
behind an IOMMU), one at a time.

Every figure is also given as a ratio to a limit measured in the same run:
the round trips a raw UDP socket pair does on loopback with datagrams of a
MAD's size (296 bytes: GRH + MAD), one at a time. A MAD round trip is one
UDP round trip; a connection cycle is 5 datagrams (2.5 round trips), so
its ratio is taken against the limit divided by 2.5. Prints a table and,
last, one JSON object.

    python bench/cm.py            # full run
    python bench/cm.py --quick    # fewer iterations, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import socket
import time

from softrdma.cm.cma import RdmaCmEventType, RdmaCmId, RdmaConnParam, RdmaEventChannel
from softrdma.dma.platform import Platform
from softrdma.drivers.hca import HwHca
from softrdma.drivers.rxe import SoftRoce
from softrdma.fabric.inproc import Fabric
from softrdma.mad.agent import MadAgent, MadRecvWc, MadSendBuf, MadSendWc, ib_mad_port
from softrdma.mad.header import MadHdr, MadMethod, MgmtClass, make_mad
from softrdma.memory.host import Host, MiB
from softrdma.verbs.ah import AhAttr
from softrdma.verbs.enums import IbQpType, IbWcStatus
from softrdma.verbs.qp import QpInitAttr

DATAGRAM = 40 + 256  # what a MAD is on a UD receive: GRH + MAD


def devices() -> tuple[Fabric, SoftRoce, HwHca]:
    fabric = Fabric()
    a = SoftRoce(Platform(Host(64 * MiB)), fabric, "10.0.0.1")
    b = HwHca(Platform(Host(64 * MiB), iommu=True), fabric, "10.0.0.2")
    return fabric, a, b


def mad_round_trips(iters: int) -> float:
    """GET → GET_RESP through two MAD layers, one outstanding at a time."""
    fabric, a, b = devices()
    done: list[IbWcStatus] = []

    def answer(agent: MadAgent, buf: MadSendBuf | None, recv: MadRecvWc) -> None:
        agent.respond(recv, make_mad(recv.hdr.response(), b"pong"))

    def sent(agent: MadAgent, wc: MadSendWc) -> None:
        if not wc.send_buf.free_when_done:
            wc.send_buf.free()
        done.append(wc.status)

    client = ib_mad_port(a).register_agent(MgmtClass.DEVICE_MGMT, 1, lambda *_: None, sent)
    ib_mad_port(b).register_agent(MgmtClass.DEVICE_MGMT, 1, answer, sent, methods=[MadMethod.GET])
    ah = AhAttr(b.query_gid())
    t0 = time.perf_counter()
    for _ in range(iters):
        hdr = MadHdr(mgmt_class=MgmtClass.DEVICE_MGMT, class_version=1, method=MadMethod.GET,
                     tid=client.next_tid())  # fmt: skip
        client.post_send_mad(client.create_send_mad(ah, make_mad(hdr), timeout_ms=100))
        fabric.loop.run()
    elapsed = time.perf_counter() - t0
    if done.count(IbWcStatus.SUCCESS) < iters:
        raise RuntimeError(f"{iters - done.count(IbWcStatus.SUCCESS)} requests failed")
    return iters / elapsed


def connection_cycles(iters: int) -> float:
    """Resolve, connect, accept, ESTABLISHED on both sides, disconnect,
    DISCONNECTED on both sides, destroy."""
    _fabric, a, b = devices()
    cch, sch = RdmaEventChannel(a.host), RdmaEventChannel(b.host)
    listener = RdmaCmId(sch)
    listener.bind_addr("10.0.0.2", 7174)
    listener.listen()
    pd_a, cq_a = a.alloc_pd(), a.create_cq(64)
    pd_b, cq_b = b.alloc_pd(), b.create_cq(64)
    E = RdmaCmEventType

    def expect(ch: RdmaEventChannel, event: RdmaCmEventType) -> RdmaCmId:
        ev = ch.get_cm_event()
        if ev.event is not event:
            raise RuntimeError(f"{ev} instead of {event.name}")
        return ev.id

    t0 = time.perf_counter()
    for _ in range(iters):
        cid = RdmaCmId(cch)
        cid.resolve_addr("10.0.0.2", 7174)
        expect(cch, E.ADDR_RESOLVED)
        cid.resolve_route()
        expect(cch, E.ROUTE_RESOLVED)
        cid.create_qp(pd_a, QpInitAttr(IbQpType.RC, cq_a, cq_a))
        cid.connect(RdmaConnParam())
        sid = expect(sch, E.CONNECT_REQUEST)
        sid.create_qp(pd_b, QpInitAttr(IbQpType.RC, cq_b, cq_b))
        sid.accept()
        expect(cch, E.ESTABLISHED)
        expect(sch, E.ESTABLISHED)
        cid.disconnect()
        expect(sch, E.DISCONNECTED)
        sid.disconnect()
        expect(cch, E.DISCONNECTED)
        for id_ in (cid, sid):
            id_.destroy_qp()
            id_.destroy()
    return iters / (time.perf_counter() - t0)


def udp_round_trip_limit(iters: int) -> float:
    """Ping-pong of MAD-sized datagrams between two loopback UDP sockets in
    this process, one at a time."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    payload = bytes(DATAGRAM)
    addr_a, addr_b = a.getsockname(), b.getsockname()
    t0 = time.perf_counter()
    for _ in range(iters):
        a.sendto(payload, addr_b)
        b.recvfrom(2048)
        b.sendto(payload, addr_a)
        a.recvfrom(2048)
    rate = iters / (time.perf_counter() - t0)
    a.close()
    b.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    mad_iters, conn_iters = (100, 20) if args.quick else (2000, 300)
    limit = udp_round_trip_limit(mad_iters * 10)
    results = {
        "mad_round_trips_per_s": mad_round_trips(mad_iters),
        "rdma_cm_connection_cycles_per_s": connection_cycles(conn_iters),
    }
    ratios = {
        "mad_round_trips_per_s": results["mad_round_trips_per_s"] / limit,
        "rdma_cm_connection_cycles_per_s": results["rdma_cm_connection_cycles_per_s"]
        / (limit / 2.5),
    }
    print(f"{'metric':34s} {'value':>12s} {'vs limit':>10s}")
    for k, v in results.items():
        print(f"{k:34s} {v:10,.0f}/s {ratios[k]:10.4f}")
    print(f"{'limit: UDP round trips, 296 B':34s} {limit:10,.0f}/s")
    print(json.dumps({"limits": {"udp_round_trips_296B_per_s": limit}, "results": results,
                      "ratios": ratios}))  # fmt: skip


if __name__ == "__main__":
    main()
