"""Forged peers on the in-process fabric: a scripted requester flooding a
target with READs, and a scripted responder sending ACKs, NAKs and READ
responses for PSNs that were never sent — on both device kinds.

The forged side is a bare fabric port that decodes what it receives and
sends frames it builds itself (real RoCEv2 with a valid ICRC), so the device
under test sees exactly what a hostile peer could put on the wire."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.transport.headers import Aeth, AethType, NakCode, Reth, aeth_syndrome
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.psn import psn_add
from softrdma.transport.responder import READ_BURST
from softrdma.transport.roce import RoceFrame, decode_roce_v2, encode_roce_v2, rdma_ip2gid
from softrdma.verbs.enums import IbMtu, IbPdFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.qp import connect_qp
from softrdma.verbs.wr import RdmaWR
from tests.rdma.nodes import Buffer, Node, make_device, make_node

KINDS = ("cpu", "hw-iommu")
FORGED_IP = "10.0.0.66"
FORGED_QPN = 0x77
ACK = aeth_syndrome(AethType.ACK, 31)
MiB = 1 << 20


class ForgedPeer:
    """A fabric port that records every packet delivered to it and sends
    whatever packet a test builds, from its own address."""

    def __init__(self, fabric: Fabric, ip: str = FORGED_IP) -> None:
        self.fabric = fabric
        self.ip = IPv4Address(ip)
        self.mac = b"\x02\x00" + self.ip.packed
        self.received: list[Packet] = []
        fabric.attach(self)

    def receive_frame(self, frame: bytes) -> None:
        self.received.append(decode_roce_v2(frame).packet)

    def send(self, dev: RoceDevice, pkt: Packet) -> None:
        frame = RoceFrame(
            pkt, self.ip.packed, dev.ip.packed, 0xC001, eth_dst=dev.mac, eth_src=self.mac
        )
        self.fabric.transmit(self, encode_roce_v2(frame))


def target(kind: str, fabric: Fabric, *, mtu: IbMtu, rq_psn: int = 0, sq_psn: int = 0) -> Node:
    """A device whose QP is connected to the forged peer."""
    node = make_node(make_device(kind, fabric, "10.0.0.1"), pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    connect_qp(
        node.qp,
        dest_qp_num=FORGED_QPN,
        dgid=rdma_ip2gid(FORGED_IP),
        rq_psn=rq_psn,
        sq_psn=sq_psn,
        path_mtu=mtu,
        max_rd_atomic=4,  # 4 responder resources
        timeout=14,
        retry_cnt=7,
    )
    return node


# -- a READ flood ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_read_flood_costs_what_is_on_the_wire(kind: str) -> None:
    """64 valid RDMA READ requests of 1 MiB each (4.5 KiB on the wire) at a
    target with 4 responder resources: the target's replies in flight stay
    within one burst of the link, however much was asked; all of it is
    eventually answered, in order, with the right bytes."""
    fabric = Fabric(seed=1)
    mtu = IbMtu.MTU_4096
    node = target(kind, fabric, mtu=mtu)
    peer = ForgedPeer(fabric)
    buf = Buffer(node.dev, MiB)
    buf.fill(bytes(range(256)) * (MiB // 256))
    per_read = MiB // mtu.size  # PSNs a READ reserves
    n_reads = 64
    for k in range(n_reads):
        peer.send(
            node.dev,
            Packet.build(
                Opcode.RC_RDMA_READ_REQUEST,
                dest_qp=node.qp.qp_num,
                psn=k * per_read,
                ack_req=True,
                reth=Reth(buf.dma, node.pd.unsafe_global_rkey, MiB),
            ),
        )
    loop = fabric.loop
    peak = 0
    for _ in range(10_000):  # bounded: runs until everything is answered
        loop.run(max_events=200)
        peak = max(peak, loop.pending)
        if loop.idle:
            break
    assert loop.idle
    # Without a bound this was 14,576 pending frames after 2,000 events.
    assert peak <= 2 * READ_BURST + 8, peak
    responses = [p for p in peer.received if p.bth.opcode != Opcode.RC_ACKNOWLEDGE]
    assert len(responses) == n_reads * per_read
    assert [p.bth.psn for p in responses] == list(range(n_reads * per_read))
    assert bytes(responses[3].payload) == buf.read(mtu.size, 3 * mtu.size)


# -- a forged responder ----------------------------------------------------------------------


def initiator(kind: str, mtu: IbMtu = IbMtu.MTU_256) -> tuple[Fabric, Node, ForgedPeer, Buffer]:
    fabric = Fabric(seed=2)
    node = target(kind, fabric, mtu=mtu, sq_psn=1000)
    peer = ForgedPeer(fabric)
    return fabric, node, peer, Buffer(node.dev, 200 * 256)


def ack(node: Node, psn: int, syndrome: int = ACK, msn: int = 1) -> Packet:
    return Packet.build(
        Opcode.RC_ACKNOWLEDGE, dest_qp=node.qp.qp_num, psn=psn, aeth=Aeth(syndrome, msn)
    )


def write(node: Node, buf: Buffer, length: int, wr_id: int = 1) -> None:
    node.qp.post_send(
        RdmaWR(
            wr_id,
            IbWrOpcode.RDMA_WRITE,
            (buf.sge(node.pd.local_dma_lkey, 0, length),),
            remote_addr=0x1000,
            rkey=0x1234,
        )
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "forged",
    [
        "ack-one-past",
        "ack-far-beyond",
        "access-nak-far-beyond",
        "seq-nak-far-beyond",
        "read-response-far-beyond",
    ],
)
def test_a_response_for_a_psn_never_sent_acknowledges_nothing(kind: str, forged: str) -> None:
    """A one-packet WRITE at PSN 1000: a forged ACK, NAK or READ response for
    PSN 1001 (one past) or 2000 (far beyond) is ignored — the WRITE is not
    reported done although it never arrived, the QP stays up, and no retry
    is spent; the real ACK then completes it."""
    fabric, node, peer, buf = initiator(kind)
    write(node, buf, 64)
    fabric.loop.run(until=fabric.loop.now + 1e-3)
    (sent,) = peer.received
    assert sent.bth.psn == 1000
    psn = 1001 if forged == "ack-one-past" else 2000
    if forged.startswith("read-response"):
        bogus = Packet.build(
            Opcode.RC_RDMA_READ_RESPONSE_ONLY,
            dest_qp=node.qp.qp_num,
            psn=psn,
            payload=b"x" * 64,
            aeth=Aeth(ACK, 1),
        )
    elif forged.startswith("access-nak"):
        bogus = ack(node, psn, aeth_syndrome(AethType.NAK, NakCode.REMOTE_ACCESS_ERR))
    elif forged.startswith("seq-nak"):
        bogus = ack(node, psn, aeth_syndrome(AethType.NAK, NakCode.PSN_SEQ_ERR))
    else:
        bogus = ack(node, psn)
    peer.send(node.dev, bogus)
    fabric.loop.run(until=fabric.loop.now + 1e-3)  # well within the 67 ms timeout
    assert len(node.cq) == 0, "a lost write reported as done"
    assert node.qp.state.name == "RTS"
    assert node.dev.stats["completer_retry_err"] == 0
    peer.send(node.dev, ack(node, 1000))
    (wc,) = node.wait(1)
    assert wc.status is IbWcStatus.SUCCESS and wc.wr_id == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_ghost_ack_inside_a_long_write_does_not_freeze_the_qp(kind: str) -> None:
    """A 200-packet WRITE at MTU 256 has 128 packets in flight (the window);
    a forged ACK and a forged sequence NAK for PSN+150 are ignored, the real
    ACK for PSN+127 opens the window, the rest is sent, and the WRITE
    completes once its last PSN is acknowledged."""
    fabric, node, peer, buf = initiator(kind)
    write(node, buf, 200 * 256)
    fabric.loop.run(until=fabric.loop.now + 1e-3)
    assert [p.bth.psn for p in peer.received] == [1000 + k for k in range(128)]
    peer.send(node.dev, ack(node, 1150))
    peer.send(node.dev, ack(node, 1150, aeth_syndrome(AethType.NAK, NakCode.PSN_SEQ_ERR)))
    fabric.loop.run(until=fabric.loop.now + 1e-3)
    assert len(peer.received) == 128 and len(node.cq) == 0
    peer.send(node.dev, ack(node, 1127))
    fabric.loop.run(until=fabric.loop.now + 1e-3)
    assert [p.bth.psn for p in peer.received[128:]] == [1128 + k for k in range(72)]
    assert len(node.cq) == 0  # its last packet is not acknowledged yet
    peer.send(node.dev, ack(node, psn_add(1000, 199)))
    (wc,) = node.wait(1)
    assert wc.status is IbWcStatus.SUCCESS
    assert node.dev.stats["completer_retry_err"] == 0
