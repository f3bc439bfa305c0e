"""The RDMA CM over the IB CM and the MAD layer, between simulated hosts:
connect / accept / reject / disconnect, the QP moved by the CM, errors
(no listener, unreachable peer, a peer that vanishes mid-handshake),
hostile management traffic, many connections, and no leaks."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from softrdma.cm.cm_port import ib_cm_port
from softrdma.cm.cma import (
    RdmaCmError,
    RdmaCmEvent,
    RdmaCmEventType,
    RdmaCmId,
    RdmaCmState,
    RdmaConnParam,
    RdmaEventChannel,
)
from softrdma.cm.cma_hdr import CmaHdr
from softrdma.cm.ib_cm import CmState
from softrdma.cm.messages import CmRejReason, CmRep, CmReq, encode_cm_mad
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.mad.agent import ib_mad_port
from softrdma.mad.header import MadHdr, make_mad
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.enums import IbQpState, IbQpType, IbSendFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import QpInitAttr, QueuePair
from softrdma.verbs.wr import RecvWR, SendWR
from tests.mad.gsi import raw_gsi_sender
from tests.rdma.nodes import Buffer, make_device

E = RdmaCmEventType
PORT = 7174


@dataclass
class Host:
    """One side: a device, its RDMA CM channel, a PD and a CQ."""

    dev: RoceDevice
    ch: RdmaEventChannel
    pd: ProtectionDomain
    cq: CompletionQueue

    @classmethod
    def make(cls, kind: str, fabric: Fabric, ip: str) -> Host:
        dev = make_device(kind, fabric, ip)
        return cls(dev, RdmaEventChannel(dev.host), dev.alloc_pd(), dev.create_cq(256))

    def event(self, expect: RdmaCmEventType | None = None, timeout: float = 60.0) -> RdmaCmEvent:
        ev = self.ch.get_cm_event(timeout)
        if expect is not None:
            assert ev.event is expect, ev
        return ev

    def qp(self, cid: RdmaCmId) -> QueuePair:
        return cid.create_qp(self.pd, QpInitAttr(IbQpType.RC, self.cq, self.cq))


def listen(server: Host, port: int = PORT, backlog: int = 0) -> RdmaCmId:
    lid = RdmaCmId(server.ch)
    lid.bind_addr(server.dev.ip, port)
    lid.listen(backlog)
    return lid


def dial(client: Host, server: Host, port: int = PORT, data: bytes = b"") -> RdmaCmId:
    cid = RdmaCmId(client.ch)
    cid.resolve_addr(server.dev.ip, port)
    client.event(E.ADDR_RESOLVED)
    cid.resolve_route()
    client.event(E.ROUTE_RESOLVED)
    client.qp(cid)
    cid.connect(RdmaConnParam(private_data=data))
    return cid


def connect(client: Host, server: Host, port: int = PORT) -> tuple[RdmaCmId, RdmaCmId]:
    cid = dial(client, server, port, b"hi")
    req = server.event(E.CONNECT_REQUEST)
    server.qp(req.id)
    req.id.accept(RdmaConnParam(private_data=b"yo"))
    client.event(E.ESTABLISHED)
    server.event(E.ESTABLISHED)
    return cid, req.id


def pair(
    kinds: tuple[str, str] = ("cpu", "hw-iommu"), drop: float = 0.0
) -> tuple[Fabric, Host, Host]:
    fabric = Fabric(seed=11)
    fabric.set_faults(drop=drop)
    return fabric, Host.make(kinds[0], fabric, "10.0.0.1"), Host.make(kinds[1], fabric, "10.0.0.2")


KINDS = [("cpu", "hw-iommu"), ("hw-iommu", "cpu"), ("hw-swiotlb", "hw-direct")]


@pytest.mark.parametrize("kinds", KINDS, ids="-".join)
def test_connect_send_and_disconnect(kinds: tuple[str, str]) -> None:
    fabric, client, server = pair(kinds)
    lid = listen(server)
    cid = dial(client, server, data=b"hello")
    req = server.event(E.CONNECT_REQUEST)
    assert req.listen_id is lid and req.param is not None
    assert req.param.private_data[:5] == b"hello" and len(req.param.private_data) == 56
    assert (str(req.id.dst_addr), req.id.dst_port) == ("10.0.0.1", cid.src_port)
    sqp = server.qp(req.id)
    sqp.post_recv(RecvWR(1, (Buffer(server.dev, 64).sge(server.pd.local_dma_lkey),)))
    req.id.accept(RdmaConnParam(private_data=b"welcome"))
    est = client.event(E.ESTABLISHED)
    assert est.param is not None and est.param.private_data[:7] == b"welcome"
    server.event(E.ESTABLISHED)
    cqp = cid.qp
    assert cqp is not None and {cqp.state, sqp.state} == {IbQpState.RTS}
    # Linux's PSN convention (the captures show it): the starting PSN a side
    # sends in its REQ or REP is the one it receives from.
    cm_c, cm_s = cid.cm_id, req.id.cm_id
    assert cm_c is not None and cm_s is not None
    assert cm_c.conn.req is not None and cm_c.conn.rep is not None
    assert cqp.query()[0].rq_psn == cm_c.conn.req.starting_psn == sqp.query()[0].sq_psn
    assert sqp.query()[0].rq_psn == cm_c.conn.rep.starting_psn == cqp.query()[0].sq_psn
    # The QPs are joined the way the CM said: a SEND arrives.
    buf = Buffer(client.dev, 64)
    buf.fill(b"ping")
    cqp.post_send(SendWR(2, IbWrOpcode.SEND, (buf.sge(client.pd.local_dma_lkey, 0, 4),),
                         IbSendFlags.SIGNALED))  # fmt: skip
    [wc] = server.cq.poll(1)
    assert wc.status is IbWcStatus.SUCCESS and wc.byte_len == 4
    assert client.cq.poll(1)[0].status is IbWcStatus.SUCCESS
    # Disconnect: the client's QP flushes what it had posted.
    cqp.post_recv(RecvWR(3, (buf.sge(client.pd.local_dma_lkey),)))
    cid.disconnect()
    assert cqp.state is IbQpState.ERR
    assert client.cq.poll(1)[0].status is IbWcStatus.WR_FLUSH_ERR
    server.event(E.DISCONNECTED)
    req.id.disconnect()
    client.event(E.DISCONNECTED)
    assert {client.event().event, server.event().event} == {E.TIMEWAIT_EXIT}
    assert fabric.loop.time() < 10


def test_reject_with_private_data_and_no_listener() -> None:
    _, client, server = pair()
    listen(server)
    cid = dial(client, server)
    req = server.event(E.CONNECT_REQUEST)
    req.id.reject(b"go away")
    rej = client.event(E.REJECTED)
    assert rej.status == CmRejReason.CONSUMER_DEFINED and rej.id is cid
    assert rej.param is not None and rej.param.private_data[:7] == b"go away"
    # Nobody listens on the next port: the CM answers for the service.
    dial(client, server, PORT + 1)
    rej = client.event(E.REJECTED)
    assert rej.status == CmRejReason.INVALID_SERVICE_ID
    assert ib_cm_port(server.dev).stats["rx_no_listener"] == 1


def test_unreachable_peer_times_out_with_the_cm_retries() -> None:
    fabric, client, server = pair()
    fabric.set_faults(drop=1.0)
    start = fabric.loop.time()
    dial(client, server)
    ev = client.event(E.UNREACHABLE, timeout=3600)
    assert ev.status < 0
    # 16 REQs (15 retries), each waiting 2 × 1024 + 4096 ms.
    assert fabric.loop.time() - start == pytest.approx(16 * 6.144, rel=0.01)
    assert ib_mad_port(client.dev).stats["retries"] == 15


def test_peer_vanishing_mid_handshake_leaves_nothing_half_open() -> None:
    fabric, client, server = pair()
    listen(server)
    cid = dial(client, server)
    req = server.event(E.CONNECT_REQUEST)
    server.qp(req.id)
    # The client disappears before the REP: the server's REP is never answered.
    fabric.set_faults(drop=1.0)
    req.id.accept()
    ev = server.event(timeout=3600)
    assert ev.event is E.UNREACHABLE and ev.id is req.id
    assert req.id.cm_id is not None and req.id.cm_id.state is CmState.IDLE
    assert req.id.qp is not None and req.id.qp.state is IbQpState.ERR
    # The client gave up too, and neither CM still holds the connection.
    assert client.event(timeout=3600).event is E.UNREACHABLE
    for cid_ in (cid, req.id):
        cid_.destroy()
    for host in (client, server):
        port = ib_cm_port(host.dev)
        assert not port._remote and all(i.listening_on for i in port._local.values())


def test_disconnect_flushes_and_a_lost_drep_still_disconnects() -> None:
    fabric, client, server = pair()
    listen(server)
    cid, sid = connect(client, server)
    sqp = sid.qp
    assert sqp is not None
    lkey = server.pd.local_dma_lkey
    sqp.post_recv([RecvWR(i, (Buffer(server.dev, 64).sge(lkey),)) for i in range(4)])
    fabric.set_faults(drop=1.0)  # the DREQ is lost for good
    sid.disconnect()
    assert [wc.status for wc in server.cq.poll(8)] == [IbWcStatus.WR_FLUSH_ERR] * 4
    assert server.event(timeout=3600).event is E.DISCONNECTED  # DREQ_ERROR
    assert cid.qp is not None and cid.qp.state is IbQpState.RTS  # it never heard


@pytest.mark.parametrize("cycles", [12])
def test_connect_disconnect_cycles_leak_nothing(cycles: int) -> None:
    _, client, server = pair(("hw-iommu", "hw-swiotlb"))
    lid = listen(server)
    for _ in range(cycles):
        cid, sid = connect(client, server)
        cid.disconnect()
        server.event(E.DISCONNECTED)
        sid.disconnect()
        client.event(E.DISCONNECTED)
        for side, id_ in ((client, cid), (server, sid)):
            side.event(E.TIMEWAIT_EXIT)
            id_.destroy_qp()
            id_.destroy()
    lid.destroy()
    for host in (client, server):
        assert not ib_cm_port(host.dev)._local
        host.pd.dealloc()
        host.cq.destroy()
        host.dev.unregister()  # closes the CM and MAD ports: their buffers go
        host.dev.dma_device.release()
        debug = host.dev.dma_device.platform.dma_debug
        assert debug is not None and not debug.reports, debug.reports


def test_many_concurrent_connections_to_one_listener() -> None:
    fabric = Fabric(seed=2)
    server = Host.make("hw-iommu", fabric, "10.0.0.100")
    clients = [Host.make("cpu", fabric, f"10.0.0.{i + 1}") for i in range(6)]
    listen(server)
    cids = [dial(c, server, data=bytes([i])) for i, c in enumerate(clients) for _ in range(3)]
    accepted = []
    for _ in cids:
        req = server.event(E.CONNECT_REQUEST)
        server.qp(req.id)
        req.id.accept()
        accepted.append(req.id)
    for c in clients:
        for _ in range(3):
            c.event(E.ESTABLISHED)
    for _ in cids:
        server.event(E.ESTABLISHED)
    # Every connection joins the right two QPs.
    peers = {(str(a.dst_addr), a.dst_port): a for a in accepted}
    for cid in cids:
        sid = peers[(str(cid.src_addr), cid.src_port)]
        assert cid.qp is not None and sid.qp is not None
        assert cid.qp.query()[0].dest_qp_num == sid.qp.qp_num
        assert sid.qp.query()[0].dest_qp_num == cid.qp.qp_num
    assert len(ib_cm_port(server.dev)._remote) == len(cids)


def test_backlog_rejects_excess_requests_without_touching_established() -> None:
    _, client, server = pair()
    listen(server, backlog=2)
    cid, sid = connect(client, server)
    for _ in range(4):
        dial(client, server)
    rejected = [client.event() for _ in range(2)]
    assert all(e.event is E.REJECTED and e.status == CmRejReason.NO_RESOURCES for e in rejected)
    assert ib_cm_port(server.dev).stats["rx_backlog"] == 2
    assert [server.event(E.CONNECT_REQUEST) for _ in range(2)]
    # The established connection still carries traffic.
    assert sid.qp is not None and cid.qp is not None
    sid.qp.post_recv(RecvWR(9, (Buffer(server.dev, 64).sge(server.pd.local_dma_lkey),)))
    buf = Buffer(client.dev, 64)
    cid.qp.post_send(SendWR(1, IbWrOpcode.SEND, (buf.sge(client.pd.local_dma_lkey, 0, 8),)))
    assert server.cq.poll(1)[0].status is IbWcStatus.SUCCESS


def test_hostile_management_traffic_is_counted_and_harmless() -> None:
    fabric, client, server = pair()
    listen(server)
    cid, sid = connect(client, server)
    attacker = make_device("cpu", fabric, "10.0.0.66")
    send = raw_gsi_sender(attacker, server.dev.query_gid())
    cm = MadHdr(mgmt_class=7, class_version=2, method=3, tid=0x42)
    send(make_mad(MadHdr(mgmt_class=7, class_version=2, method=3, attr_id=0x99)))  # bad attr
    send(make_mad(MadHdr(mgmt_class=7, class_version=1, method=3, attr_id=0x10)))  # bad version
    send(encode_cm_mad(cm, CmRep(local_comm_id=5, remote_comm_id=0xDEAD)))  # unasked REP
    # A REQ claiming the client's connected QP: stale, rejected.
    cqp = cid.qp
    assert cqp is not None
    stale = CmReq(
        local_comm_id=77,
        service_id=0x1061C06,
        local_qpn=cqp.qp_num,
        local_ca_guid=client.dev.node_guid,
        private_data=CmaHdr(attacker.ip, server.dev.ip, 999).encode(),
        primary_local_ack_timeout=19,
        max_cm_retries=15,
        path_mtu=3,
    )
    send(encode_cm_mad(cm, stale))
    # The same REQ twice from a new QP: one connection request, one duplicate.
    fresh = replace(stale, local_comm_id=78, local_qpn=0x999)
    send(encode_cm_mad(cm, fresh))
    send(encode_cm_mad(cm, fresh))
    send(encode_cm_mad(cm, replace(fresh, local_comm_id=79, path_mtu=0)))  # no such MTU
    fabric.loop.run(until=fabric.loop.time() + 0.5)
    stats = ib_cm_port(server.dev).stats
    assert stats["rx_malformed"] == 1 and stats["rx_unknown_id"] == 1
    assert stats["rx_stale_conn"] == 1 and stats["rx_dup_req"] == 1 and stats["rx_bad_req"] == 1
    assert ib_mad_port(server.dev).stats["rx_no_agent"] == 1
    req = server.event(E.CONNECT_REQUEST)
    assert req.id.dst_addr == attacker.ip
    # The forged peer never sends its RTU: the accepted request fails, alone.
    server.qp(req.id)
    req.id.accept()
    assert server.event(timeout=3600).event is E.UNREACHABLE
    assert sid.cm_id is not None and sid.cm_id.state is CmState.ESTABLISHED
    assert cid.cm_id is not None and cid.cm_id.state is CmState.ESTABLISHED


def test_api_misuse_raises_typed_errors() -> None:
    _, client, server = pair()
    lid = listen(server)
    other = RdmaCmId(server.ch)
    with pytest.raises(RdmaCmError, match="EADDRINUSE"):
        other.bind_addr(server.dev.ip, PORT)
    with pytest.raises(RdmaCmError, match="EADDRNOTAVAIL"):
        RdmaCmId(client.ch).bind_addr("10.9.9.9")
    cid = RdmaCmId(client.ch)
    with pytest.raises(RdmaCmError, match="EINVAL"):
        cid.connect()
    with pytest.raises(RdmaCmError, match="EINVAL"):
        lid.accept()
    with pytest.raises(RdmaCmError, match="ETIMEDOUT"):
        client.ch.get_cm_event(timeout=0.5)
    cid.resolve_addr(server.dev.ip, PORT)
    client.event(E.ADDR_RESOLVED)
    cid.resolve_route()
    client.event(E.ROUTE_RESOLVED)
    client.qp(cid)
    with pytest.raises(RdmaCmError, match="private data"):
        cid.connect(RdmaConnParam(private_data=bytes(57)))


def test_ack_timeout_and_type_of_service_reach_the_req_and_both_qps() -> None:
    """``rdma_set_ack_timeout`` and ``rdma_set_service_type`` before the
    route: the REQ carries the ToS as traffic class and a packet life time
    of one less than the timeout (cma.c), the active QP gets the timeout
    itself at RTS, the passive one the REQ's; both AVs the traffic class."""
    _, client, server = pair()
    listen(server)
    cid = RdmaCmId(client.ch)
    cid.set_ack_timeout(21)
    cid.set_service_type(0x60)
    cid.resolve_addr(server.dev.ip, PORT)
    client.event(E.ADDR_RESOLVED)
    cid.resolve_route()
    client.event(E.ROUTE_RESOLVED)
    assert (cid.traffic_class, cid.packet_life_time) == (0x60, 20)
    client.qp(cid)
    cid.connect()
    req_ev = server.event(E.CONNECT_REQUEST)
    server.qp(req_ev.id)
    req_ev.id.accept()
    client.event(E.ESTABLISHED)
    server.event(E.ESTABLISHED)
    assert cid.cm_id is not None and cid.cm_id.conn.req is not None
    req = cid.cm_id.conn.req
    assert req.primary_traffic_class == 0x60
    assert req.primary_local_ack_timeout == 21  # cm_ack_timeout(15, 20)
    assert cid.qp is not None and req_ev.id.qp is not None
    c_attr, s_attr = cid.qp.query()[0], req_ev.id.qp.query()[0]
    assert (c_attr.timeout, s_attr.timeout) == (21, req.primary_local_ack_timeout)
    assert c_attr.ah_attr is not None and s_attr.ah_attr is not None
    assert c_attr.ah_attr.traffic_class == s_attr.ah_attr.traffic_class == 0x60
    # without options: RoCE's packet life time 18, the CM's timeout, ToS 0
    plain, _ = connect(client, server)
    assert plain.cm_id is not None and plain.cm_id.conn.req is not None
    assert plain.cm_id.conn.req.primary_local_ack_timeout == 19
    assert plain.qp is not None and plain.qp.query()[0].timeout == 19
    assert plain.traffic_class == 0
    with pytest.raises(RdmaCmError, match="EINVAL"):
        cid.set_ack_timeout(32)
    with pytest.raises(RdmaCmError, match="EINVAL"):
        cid.set_service_type(256)


def test_reuseaddr_shares_a_port_until_one_listens() -> None:
    """``rdma_set_reuseaddr``: IDs that all set it bind one address and
    port; one that did not is refused (``EADDRINUSE``; ``EADDRNOTAVAIL``
    against the wildcard, as ``cma_check_port``); a listener checks again
    without it and clears it, so nobody binds its port after."""
    _, _, server = pair()
    ip = server.dev.ip
    a, b, c = (RdmaCmId(server.ch) for _ in range(3))
    a.set_reuseaddr(True)
    b.set_reuseaddr(True)
    a.bind_addr(ip, PORT)
    b.bind_addr(ip, PORT)
    with pytest.raises(RdmaCmError, match="EADDRINUSE"):
        c.bind_addr(ip, PORT)
    with pytest.raises(RdmaCmError, match="EADDRNOTAVAIL"):
        RdmaCmId(server.ch).bind_addr("0.0.0.0", PORT)
    with pytest.raises(RdmaCmError, match="EADDRINUSE"):
        a.listen()  # b shares the port
    assert a.state is RdmaCmState.ADDR_BOUND
    with pytest.raises(RdmaCmError, match="EINVAL"):
        b.set_reuseaddr(False)  # off only before binding
    b.destroy()
    a.listen()
    assert not a.reuseaddr
    with pytest.raises(RdmaCmError, match="EINVAL"):
        a.set_reuseaddr(True)  # never on a listener
    d = RdmaCmId(server.ch)
    d.set_reuseaddr(True)
    with pytest.raises(RdmaCmError, match="EADDRINUSE"):
        d.bind_addr(ip, PORT)
    d.set_afonly(True)  # IPv4 only here: stored, changes no bind
    a.destroy()
    d.bind_addr(ip, PORT)  # the port is free again
    d.listen()
    with pytest.raises(RdmaCmError, match="EINVAL"):
        d.set_afonly(False)  # not once listening
