"""Every reason a device drops a received frame, one crafted frame each,
put on the in-process fabric by a raw port: each is counted in
``dev.stats`` under its own name and nothing else, draws no answer, leaves
the QP as it was, and the connection keeps working (rxe_recv.c
``rxe_rcv`` / ``hdr_check`` / ``check_addr``, rxe_net.c
``rxe_udp_encap_recv``, rxe_icrc.c ``rxe_icrc_check``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from softrdma.fabric.inproc import Fabric
from softrdma.transport.errors import DROP_REASONS
from softrdma.transport.headers import Deth
from softrdma.transport.opcodes import OPCODE_TABLE, Opcode
from softrdma.transport.packet import Packet
from softrdma.verbs.ah import AhAttr, create_ah
from softrdma.verbs.enums import (
    IbPdFlags,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.qp import QpAttr, QpInitAttr
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR, UdWR
from tests.rdma.helpers_device import (
    BTH_FLAGS,
    BTH_OPCODE,
    IP,
    IP_CSUM,
    IP_FRAG,
    IP_PROTO,
    SIG,
    UDP,
    UDP_DPORT,
    UDP_LEN,
    RawPort,
    attach_raw_port,
    counters,
    delta,
    device_port,
    edit,
    fix_icrc,
    fix_ipv4_checksum,
    roce_frame,
    settle,
)
from tests.rdma.nodes import Buffer, Node, pair

A, B, STRAY = "10.0.0.1", "10.0.0.2", "10.0.0.9"
RESERVED_OPCODE = 0x5F  # in the RD range: rxe does not implement RD
RECV_ID = 0x5EC


def send_only(
    dest_qp: int, psn: int = 0, payload: bytes = b"8 bytes!", pkey: int = 0xFFFF
) -> Packet:
    return Packet.build(
        Opcode.RC_SEND_ONLY, dest_qp=dest_qp, psn=psn, payload=payload, pkey=pkey, ack_req=True
    )


def valid(b: Node, payload: bytes = b"8 bytes!") -> bytes:
    """An RC SEND from the QP's real peer address: it would be accepted."""
    return roce_frame(send_only(b.qp.qp_num, payload=payload), A, B)


Crafter = Callable[[Node], bytes]

# reason -> ways to make a frame that is dropped for it
LINK_DROPS: dict[str, dict[str, Crafter]] = {
    "not_roce": {
        "udp-port-4792": lambda b: edit(valid(b), UDP_DPORT + 1, 4792 & 0xFF),
        "ip-protocol-tcp": lambda b: fix_ipv4_checksum(edit(valid(b), IP_PROTO, 6)),
    },
    "truncated": {
        "inside-udp-header": lambda b: valid(b)[: UDP + 6],
        "no-room-for-icrc": lambda b: valid(b)[:-6],
    },
    "bad_length": {
        "udp-length": lambda b: edit(valid(b), UDP_LEN + 1, valid(b)[UDP_LEN + 1] + 4),
    },
    "bad_version": {
        "bth-tver": lambda b: fix_icrc(edit(valid(b), BTH_FLAGS, valid(b)[BTH_FLAGS] | 0x01)),
        "ip-version": lambda b: edit(valid(b), IP, 0x65),
    },
    "bad_header": {
        "ipv4-more-fragments": lambda b: fix_ipv4_checksum(edit(valid(b), IP_FRAG, 0x60)),
        "ipv4-options": lambda b: _with_ipv4_options(valid(b)),
    },
    "bad_checksum": {
        "ipv4-header": lambda b: edit(valid(b), IP_CSUM, valid(b)[IP_CSUM] ^ 0xFF),
    },
    "bad_opcode": {
        "reserved-opcode": lambda b: fix_icrc(edit(valid(b), BTH_OPCODE, RESERVED_OPCODE)),
    },
    "bad_pad": {
        "padcnt-beyond-payload": lambda b: fix_icrc(
            edit(valid(b, b""), BTH_FLAGS, valid(b, b"")[BTH_FLAGS] | 0x30)
        ),
    },
    "bad_icrc": {
        "payload-bit": lambda b: edit(valid(b), len(valid(b)) - 5, valid(b)[-5] ^ 0x10),
        "icrc-bit": lambda b: edit(valid(b), len(valid(b)) - 1, valid(b)[-1] ^ 0x80),
    },
}


def _with_ipv4_options(frame: bytes) -> bytes:
    """Four bytes of IPv4 options (IHL 6), lengths and checksum fixed: an
    intact IP datagram whose header the RoCEv2 ICRC cannot cover."""
    ip = bytearray(frame[IP : IP + 20])
    ip[0] = 0x46
    total = int.from_bytes(ip[2:4], "big") + 4
    ip[2:4] = total.to_bytes(2, "big")
    out = frame[:IP] + bytes(ip) + b"\x01\x01\x01\x00" + frame[IP + 20 :]
    return fix_ipv4_checksum(out)


CASES = [
    pytest.param(reason, craft, id=f"{reason}:{name}")
    for reason, ways in LINK_DROPS.items()
    for name, craft in ways.items()
]


def test_the_cases_cover_every_drop_reason() -> None:
    assert set(LINK_DROPS) == set(DROP_REASONS)
    assert OPCODE_TABLE[RESERVED_OPCODE] is None


def _drop_exactly(
    fabric: Fabric, port: RawPort, a: Node, b: Node, frame: bytes, counter: str
) -> None:
    """Send ``frame`` from the raw port: exactly ``counter`` moves on ``b``,
    nothing is answered, the QP does not notice."""
    before_a, before_b = counters(a.dev), counters(b.dev)
    fabric.transmit(port, frame)
    settle(fabric)
    assert delta(counters(b.dev), before_b) == {counter: 1}
    assert delta(counters(a.dev), before_a) == {}
    assert port.received == [], "a dropped frame is never answered"
    assert b.qp.state == IbQpState.RTS and len(b.cq) == 0


def _still_works(a: Node, b: Node) -> None:
    """The real peer's SEND at the PSN the forged frames carried lands in the
    receive posted before them, and a WRITE follows it."""
    src, dst = Buffer(a.dev, 4096), Buffer(b.dev, 4096)
    src.fill(b"after the garbage" * 240)
    la = a.pd.local_dma_lkey
    before = counters(b.dev)
    a.qp.post_send(
        [
            SendWR(1, IbWrOpcode.SEND, (src.sge(la, 0, 17),), send_flags=SIG),
            RdmaWR(
                2,
                IbWrOpcode.RDMA_WRITE,
                (src.sge(la),),
                send_flags=SIG,
                remote_addr=dst.dma,
                rkey=b.pd.unsafe_global_rkey,
            ),
        ]
    )
    assert [wc.wr_id for wc in a.wait_ok(2)] == [1, 2]
    (got,) = b.wait_ok()
    assert (got.wr_id, got.byte_len) == (RECV_ID, 17)
    assert dst.read(17 * 240) == b"after the garbage" * 240
    assert not [k for k in delta(counters(b.dev), before) if k.startswith("rx_")]


def _setup(kind: str) -> tuple[Fabric, RawPort, Node, Node, Buffer]:
    fabric, a, b = pair("cpu", kind, pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    sink = Buffer(b.dev, 4096)
    b.qp.post_recv(RecvWR(RECV_ID, (sink.sge(b.pd.local_dma_lkey),)))
    return fabric, attach_raw_port(fabric, STRAY), a, b, sink


@pytest.mark.parametrize(("reason", "craft"), CASES)
@pytest.mark.parametrize("kind", ["cpu", "hw-iommu"])
def test_link_level_drop_is_counted_by_reason(reason: str, craft: Crafter, kind: str) -> None:
    fabric, port, a, b, _sink = _setup(kind)
    _drop_exactly(fabric, port, a, b, craft(b), f"rx_{reason}")
    _still_works(a, b)


@pytest.mark.parametrize("kind", ["cpu", "hw-direct"])
def test_transport_level_drops(kind: str) -> None:
    """After the frame decodes (rxe_rcv): another destination address, a
    P_Key that is not the default one, an unknown QP, and RC from an
    address that is not the QP's peer. Each forged SEND carries the PSN the
    QP expects and would be taken if it got through."""
    fabric, port, a, b, _sink = _setup(kind)
    qpn = b.qp.qp_num
    # The fabric routes a second address to b's port; it is not b's RoCE address.
    fabric.add_address(device_port(fabric, b.dev), "10.0.0.77")
    cases = [
        (roce_frame(send_only(qpn), A, "10.0.0.77"), "rx_wrong_address"),
        (roce_frame(send_only(qpn, pkey=0x7FFF), A, B), "rx_bad_pkey"),
        (roce_frame(send_only(0x777), A, B), "rx_no_qp"),
        (roce_frame(send_only(qpn), STRAY, B), "rx_wrong_peer"),
    ]
    for frame, counter in cases:
        _drop_exactly(fabric, port, a, b, frame, counter)
    _still_works(a, b)


def test_ud_takes_datagrams_from_any_address() -> None:
    """``rx_wrong_peer`` is for connected QPs only (rxe_recv.c ``check_addr``
    returns early for UD): a UD QP takes a datagram from any address, with
    the sender's QPN from the DETH."""
    fabric, a, _b = pair("cpu", "cpu")
    dev = a.dev
    pd = dev.alloc_pd()
    cq = dev.create_cq(16)
    qp = dev.create_qp(pd, QpInitAttr(IbQpType.UD, cq, cq))
    M = IbQpAttrMask
    qp.modify(
        QpAttr(qp_state=IbQpState.INIT, qkey=0x1234), M.STATE | M.PKEY_INDEX | M.PORT | M.QKEY
    )
    qp.modify(QpAttr(qp_state=IbQpState.RTR), M.STATE)
    qp.modify(QpAttr(qp_state=IbQpState.RTS, sq_psn=0), M.STATE | M.SQ_PSN)
    sink = Buffer(dev, 256)
    qp.post_recv(RecvWR(1, (sink.sge(pd.local_dma_lkey),)))
    port = attach_raw_port(fabric, STRAY)
    pkt = Packet.build(
        Opcode.UD_SEND_ONLY, dest_qp=qp.qp_num, psn=7, payload=b"datagram", deth=Deth(0x1234, 0x99)
    )
    before = counters(dev)
    fabric.transmit(port, roce_frame(pkt, STRAY, A))
    settle(fabric)
    (wc,) = cq.poll(2)
    assert (wc.status, wc.opcode, wc.src_qp, wc.byte_len) == (
        IbWcStatus.SUCCESS,
        IbWcOpcode.RECV,
        0x99,
        40 + 8,
    )
    assert sink.read(48)[40:] == b"datagram"
    assert not [k for k in delta(counters(dev), before) if k.startswith("rx_")]
    # and a reply to the stray address goes out through an address handle
    ah = create_ah(pd, AhAttr(dgid=bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 9])))
    qp.post_send(
        UdWR(
            2,
            IbWrOpcode.SEND,
            (sink.sge(pd.local_dma_lkey, 40, 8),),
            send_flags=SIG,
            ah=ah,
            remote_qpn=0x99,
            remote_qkey=0x1234,
        )
    )
    (sent,) = [wc for wc in cq.poll(2) if wc.wr_id == 2]
    assert sent.status == IbWcStatus.SUCCESS
    settle(fabric)
    assert len(port.received) == 1
