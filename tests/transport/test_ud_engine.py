"""The UD engine: DETH, Q_Key rules, MTU limit, GRH placement, completions."""

from __future__ import annotations

import copy
import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softrdma.transport.errors import LocalProtocolError
from softrdma.transport.headers import GSI_QKEY, Deth
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.ud import GRH_SIZE, UdQp, make_grh
from softrdma.transport.wqe import CqSide, QpFatal, SendWqe, SqDrained
from softrdma.verbs.enums import (
    IbQpAttrMask,
    IbQpState,
    IbSendFlags,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.qp import QpAttr
from softrdma.verbs.wr import RdmaWR, RecvWR, Sge, UdWR

from .fakemem import FakeMemory
from .strategies import packets

QKEY = 0x11223344
V4_A = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])
V4_B = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 2])
V6_A = ipaddress.IPv6Address("fe80::1").packed
V6_B = ipaddress.IPv6Address("fe80::2").packed


def to_state(ud: UdQp, state: IbQpState) -> None:
    attr = copy.copy(ud.attr)
    attr.qp_state = state
    ud.modify(attr, IbQpAttrMask.STATE)


def make_ud(qpn: int, mtu: int = 1024, qkey: int = QKEY, sig_all: bool = True) -> UdQp:
    ud = UdQp(qpn, FakeMemory(), sq_sig_all=sig_all)
    ud.mtu = mtu  # the port's MTU, as the driver sets it
    attr = QpAttr(qkey=qkey, sq_psn=0x10)
    ud.modify(attr, IbQpAttrMask.QKEY | IbQpAttrMask.SQ_PSN)
    for state in (IbQpState.INIT, IbQpState.RTR, IbQpState.RTS):
        to_state(ud, state)
    return ud


def mem(ud: UdQp) -> FakeMemory:
    assert isinstance(ud.mem, FakeMemory)
    return ud.mem


def test_send_receive_with_grh_ipv4() -> None:
    a, b = make_ud(0x30), make_ud(0x40)
    src = mem(a).reg(300, fill=bytes(range(256)) + bytes(44))
    rbuf = mem(b).reg(GRH_SIZE + 300)
    b.post_recv(RecvWR(7, (rbuf.sge(),)))
    wr = UdWR(
        1,
        IbWrOpcode.SEND_WITH_IMM,
        (src.sge(),),
        imm_data=0xCAFE,
        remote_qpn=0x40,
        remote_qkey=QKEY,
    )
    a.post_send(SendWqe.from_wr(wr))
    out = a.poll(0.0)
    (op,) = out.packets
    pkt = op.pkt
    assert pkt.bth.opcode == Opcode.UD_SEND_ONLY_WITH_IMMEDIATE
    # AckReq set as rxe sets it on every message's last packet (a UD receiver ignores it).
    assert pkt.bth.dest_qp == 0x40 and pkt.bth.psn == 0x10 and pkt.bth.ack_req
    assert pkt.deth == Deth(QKEY, 0x30)
    assert (
        op.dest is not None
        and op.dest.wr is wr
        and (op.dest.remote_qpn, op.dest.qkey) == (0x40, QKEY)
    )
    (sc,) = out.completions
    assert sc.side is CqSide.SEND and sc.wc.status is IbWcStatus.SUCCESS
    assert sc.wc.opcode is IbWcOpcode.SEND and sc.wc.byte_len == 300
    assert sc.wc.wc_flags & IbWcFlags.WITH_IMM

    b.receive(Packet.decode(pkt.encode()), 0.0, sgid=V4_A, dgid=V4_B)
    (rc,) = b.poll(0.0).completions
    wc = rc.wc
    assert (
        rc.side is CqSide.RECV and wc.status is IbWcStatus.SUCCESS and wc.opcode is IbWcOpcode.RECV
    )
    assert wc.byte_len == GRH_SIZE + 300  # the kernel counts the GRH
    assert wc.src_qp == 0x30 and wc.imm_data == 0xCAFE
    assert wc.wc_flags & IbWcFlags.GRH and wc.wc_flags & IbWcFlags.WITH_IMM
    grh = rbuf[0:GRH_SIZE]
    # rxe layout for IPv4: 20 zero bytes, then the IPv4 header.
    assert grh[:20] == bytes(20) and grh[20] == 0x45 and grh[29] == 17
    assert grh[32:36] == bytes([10, 0, 0, 1]) and grh[36:40] == bytes([10, 0, 0, 2])
    words = struct.unpack(">10H", grh[20:40])
    assert sum(words) % 0xFFFF == 0  # a valid IPv4 header checksum
    assert rbuf[GRH_SIZE : GRH_SIZE + 300] == src[0:300]


def test_grh_ipv6_layout() -> None:
    grh = make_grh(V6_A, V6_B, 100)
    assert len(grh) == GRH_SIZE
    assert grh[0] >> 4 == 6 and grh[6] == 17
    assert struct.unpack(">H", grh[4:6])[0] == 100 + 12
    assert grh[8:24] == V6_A and grh[24:40] == V6_B


def test_network_hdr_given_by_the_device_is_used() -> None:
    b = make_ud(0x40)
    rbuf = mem(b).reg(64)
    b.post_recv(RecvWR(1, (rbuf.sge(),)))
    pkt = Packet.build(
        Opcode.UD_SEND_ONLY, dest_qp=0x40, psn=0, payload=b"hey!", deth=Deth(QKEY, 9)
    )
    b.receive(pkt, 0.0, network_hdr=b"G" * GRH_SIZE)
    assert b.poll(0.0).completions[0].wc.byte_len == 44
    assert rbuf[0:44] == b"G" * 40 + b"hey!"


def test_qkey_high_bit_means_own_qkey_and_gsi_uses_well_known_qkey() -> None:
    a = make_ud(0x30)
    src = mem(a).reg(8)
    a.post_send(
        SendWqe.from_wr(
            UdWR(1, IbWrOpcode.SEND, sg_list=(src.sge(),), remote_qpn=5, remote_qkey=0x80000000)
        )
    )
    a.post_send(
        SendWqe.from_wr(
            UdWR(2, IbWrOpcode.SEND, sg_list=(src.sge(),), remote_qpn=5, remote_qkey=0x1234)
        )
    )
    p1, p2 = (o.pkt for o in a.poll(0.0).packets)
    assert p1.deth is not None and p1.deth.qkey == QKEY  # the QP's own
    assert p2.deth is not None and p2.deth.qkey == 0x1234
    gsi = make_ud(1, qkey=0)
    src = mem(gsi).reg(8)
    gsi.post_send(
        SendWqe.from_wr(UdWR(1, IbWrOpcode.SEND, sg_list=(src.sge(),), remote_qpn=1, remote_qkey=0))
    )
    (o,) = gsi.poll(0.0).packets
    assert o.pkt.deth is not None and o.pkt.deth.qkey == GSI_QKEY
    # ... and QP1 accepts only that Q_Key.
    rbuf = mem(gsi).reg(100)
    gsi.post_recv(RecvWR(1, (rbuf.sge(),)))
    gsi.receive(Packet.build(Opcode.UD_SEND_ONLY, dest_qp=1, psn=0, deth=Deth(0, 3)), 0.0)
    assert not gsi.poll(0.0).completions
    gsi.receive(Packet.build(Opcode.UD_SEND_ONLY, dest_qp=1, psn=0, deth=Deth(GSI_QKEY, 3)), 0.0)
    assert gsi.poll(0.0).completions[0].wc.src_qp == 3


def test_silent_drops() -> None:
    b = make_ud(0x40)
    ok = Packet.build(
        Opcode.UD_SEND_ONLY, dest_qp=0x40, psn=0, payload=b"x" * 50, deth=Deth(QKEY, 9)
    )
    # No receive posted: dropped, not queued.
    b.receive(ok, 0.0)
    assert not b.poll(0.0)
    small = mem(b).reg(60)
    b.post_recv(RecvWR(1, (small.sge(),)))
    # Wrong Q_Key: dropped (rxe_recv.c check_keys).
    b.receive(Packet.build(Opcode.UD_SEND_ONLY, dest_qp=0x40, psn=0, deth=Deth(QKEY + 1, 9)), 0.0)
    # GRH + payload longer than the buffer: dropped, WQE kept (class D).
    b.receive(ok, 0.0)
    # An RC opcode on a UD QP: dropped.
    b.receive(Packet.build(Opcode.RC_SEND_ONLY, dest_qp=0x40, psn=0, payload=b"x"), 0.0)
    assert not b.poll(0.0)
    assert small[0:60] == bytes(60)
    b.receive(
        Packet.build(
            Opcode.UD_SEND_ONLY, dest_qp=0x40, psn=0, payload=b"y" * 20, deth=Deth(QKEY, 9)
        ),
        0.0,
    )
    assert b.poll(0.0).completions[0].wc.byte_len == 60


def test_message_longer_than_mtu_is_a_local_length_error() -> None:
    a = make_ud(0x30, mtu=256)
    src = mem(a).reg(300)
    a.post_send(
        SendWqe.from_wr(
            UdWR(1, IbWrOpcode.SEND, sg_list=(src.sge(0, 257),), remote_qpn=5, remote_qkey=QKEY)
        )
    )
    a.post_send(
        SendWqe.from_wr(
            UdWR(2, IbWrOpcode.SEND, sg_list=(src.sge(0, 256),), remote_qpn=5, remote_qkey=QKEY)
        )
    )
    out = a.poll(0.0)
    assert [o.pkt.payload_len for o in out.packets] == [256]
    assert [(c.wc.wr_id, c.wc.status) for c in out.completions] == [
        (1, IbWcStatus.LOC_LEN_ERR),
        (2, IbWcStatus.SUCCESS),
    ]


def test_send_errors_and_unsignaled() -> None:
    a = make_ud(0x30, sig_all=False)
    src = mem(a).reg(64)
    a.post_send(
        SendWqe.from_wr(
            UdWR(1, IbWrOpcode.SEND, sg_list=(src.sge(),), send_flags=IbSendFlags(0), remote_qpn=5)
        )
    )
    a.post_send(
        SendWqe.from_wr(UdWR(2, IbWrOpcode.SEND, sg_list=(Sge(0, 8, 0xBAD00),), remote_qpn=5))
    )
    a.post_send(SendWqe.from_wr(RdmaWR(3, IbWrOpcode.RDMA_WRITE, (src.sge(),))))
    out = a.poll(0.0)
    assert len(out.packets) == 1
    assert [(c.wc.wr_id, c.wc.status) for c in out.completions] == [
        (2, IbWcStatus.LOC_PROT_ERR),
        (3, IbWcStatus.LOC_QP_OP_ERR),
    ]
    # sq_sig_all
    b = make_ud(0x31)
    src = mem(b).reg(8)
    b.post_send(
        SendWqe.from_wr(
            UdWR(1, IbWrOpcode.SEND, sg_list=(src.sge(),), send_flags=IbSendFlags(0), remote_qpn=5),
            sq_sig_all=True,
        )
    )
    assert [c.wc.wr_id for c in b.poll(0.0).completions] == [1]


def test_inline_and_solicited() -> None:
    a, b = make_ud(0x30), make_ud(0x40)
    src = mem(a).reg(16, fill=b"0123456789abcdef")
    wr = UdWR(
        1,
        IbWrOpcode.SEND,
        sg_list=(src.sge(),),
        send_flags=IbSendFlags.SIGNALED | IbSendFlags.INLINE | IbSendFlags.SOLICITED,
        remote_qpn=0x40,
        remote_qkey=QKEY,
    )
    a.post_send(SendWqe.from_wr(wr, inline_data=src[0:16]))
    src.buf[:] = bytes(16)
    (o,) = a.poll(0.0).packets
    assert o.pkt.bth.se and bytes(o.pkt.payload) == b"0123456789abcdef"
    rbuf = mem(b).reg(64)
    b.post_recv(RecvWR(1, (rbuf.sge(),)))
    b.receive(o.pkt, 0.0, sgid=V6_A, dgid=V6_B)
    (c,) = b.poll(0.0).completions
    assert c.solicited and rbuf[40:56] == b"0123456789abcdef"


def test_recv_wqe_fault_moves_qp_to_error() -> None:
    b = make_ud(0x40)
    b.post_recv(RecvWR(1, (Sge(0, 100, 0xBAD00),)))
    b.post_recv(RecvWR(2, ()))
    b.receive(
        Packet.build(Opcode.UD_SEND_ONLY, dest_qp=0x40, psn=0, payload=b"z", deth=Deth(QKEY, 9)),
        0.0,
    )
    out = b.poll(0.0)
    # The failed receive, then the QP's ERR flushes the one behind it.
    assert [(c.wc.wr_id, c.wc.status) for c in out.completions] == [
        (1, IbWcStatus.LOC_PROT_ERR),
        (2, IbWcStatus.WR_FLUSH_ERR),
    ]
    assert [type(e) for e in out.events] == [QpFatal]
    assert b.state is IbQpState.ERR


def test_states_sqd_flush_and_reset() -> None:
    a = make_ud(0x30)
    src = mem(a).reg(8)
    to_state(a, IbQpState.SQD)
    a.post_send(SendWqe.from_wr(UdWR(1, IbWrOpcode.SEND, sg_list=(src.sge(),), remote_qpn=5)))
    out = a.poll(0.0)
    assert out.events == [SqDrained()] and not out.packets
    assert not a.poll(0.0)  # the event is reported once
    to_state(a, IbQpState.RTS)
    assert len(a.poll(0.0).packets) == 1
    a.post_send(SendWqe.from_wr(UdWR(2, IbWrOpcode.SEND, sg_list=(src.sge(),), remote_qpn=5)))
    a.post_recv(RecvWR(3))
    to_state(a, IbQpState.ERR)  # flushes by itself
    a.post_send(SendWqe.from_wr(UdWR(4, IbWrOpcode.SEND)))
    flushed = a.poll(0.0).completions
    assert [(c.side, c.wc.wr_id, c.wc.status) for c in flushed] == [
        (CqSide.SEND, 2, IbWcStatus.WR_FLUSH_ERR),
        (CqSide.RECV, 3, IbWcStatus.WR_FLUSH_ERR),
        (CqSide.SEND, 4, IbWcStatus.WR_FLUSH_ERR),
    ]
    to_state(a, IbQpState.RESET)
    with pytest.raises(LocalProtocolError):
        a.post_send(SendWqe.from_wr(UdWR(5, IbWrOpcode.SEND)))
    assert a.next_deadline() is None


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(packets(max_payload=200), min_size=1, max_size=10), st.binary(min_size=16, max_size=16)
)
def test_hostile_packets_never_raise(pkts: list[Packet], gid: bytes) -> None:
    b = make_ud(0x40, qkey=0)
    rbuf = mem(b).reg(300)
    for i in range(5):
        b.post_recv(RecvWR(i, (rbuf.sge(),)))
    for pkt in pkts:
        b.receive(Packet.decode(pkt.encode()), 0.0, sgid=gid, dgid=gid)
    for c in b.poll(0.0).completions:
        assert c.wc.status is IbWcStatus.SUCCESS and c.wc.byte_len <= 300
