"""Opcode enum and table, checked against ib_pack.h / rxe_opcode.c facts."""

from __future__ import annotations

import pytest

from softrdma.transport.headers import (
    Aeth,
    AtomicAckEth,
    AtomicEth,
    CnpRsvd,
    Deth,
    Ieth,
    ImmDt,
    MalformedPacket,
    Reth,
)
from softrdma.transport.opcodes import (
    OPCODE_TABLE,
    Opcode,
    Transport,
    UnknownOpcode,
    opcode_info,
)

# (value, headers after BTH, header length) from protocols.md / rxe_opcode.c
RC_TABLE = [
    (0x00, (), 12),
    (0x01, (), 12),
    (0x02, (), 12),
    (0x03, (ImmDt,), 16),
    (0x04, (), 12),
    (0x05, (ImmDt,), 16),
    (0x06, (Reth,), 28),
    (0x07, (), 12),
    (0x08, (), 12),
    (0x09, (ImmDt,), 16),
    (0x0A, (Reth,), 28),
    (0x0B, (Reth, ImmDt), 32),
    (0x0C, (Reth,), 28),
    (0x0D, (Aeth,), 16),
    (0x0E, (), 12),
    (0x0F, (Aeth,), 16),
    (0x10, (Aeth,), 16),
    (0x11, (Aeth,), 16),
    (0x12, (Aeth, AtomicAckEth), 24),
    (0x13, (AtomicEth,), 40),
    (0x14, (AtomicEth,), 40),
    (0x16, (Ieth,), 16),
    (0x17, (Ieth,), 16),
]


@pytest.mark.parametrize(("value", "ext", "length"), RC_TABLE)
def test_rc_rows(value: int, ext: tuple[type, ...], length: int) -> None:
    info = opcode_info(value)
    assert info.opcode == value
    assert info.ext_headers == ext
    assert info.length == length
    assert info.qp_type is Transport.RC
    assert OPCODE_TABLE[value] is info


@pytest.mark.parametrize(("value", "ext", "length"), RC_TABLE[:12])
def test_uc_mirrors_rc_send_write(value: int, ext: tuple[type, ...], length: int) -> None:
    uc = opcode_info(0x20 + value)
    rc = opcode_info(value)
    assert uc.ext_headers == ext and uc.length == length
    assert uc.qp_type is Transport.UC
    assert uc.name == rc.name.replace("_RC_", "_UC_")
    for flag in ("is_first", "is_middle", "is_last", "is_only", "has_payload", "is_send"):
        assert getattr(uc, flag) == getattr(rc, flag)
    assert not uc.requires_ack and rc.requires_ack


def test_ud_and_cnp_rows() -> None:
    ud = opcode_info(Opcode.UD_SEND_ONLY)
    assert (ud.opcode, ud.ext_headers, ud.length) == (0x64, (Deth,), 20)
    udi = opcode_info(Opcode.UD_SEND_ONLY_WITH_IMMEDIATE)
    assert (udi.opcode, udi.ext_headers, udi.length, udi.offsets) == (
        0x65,
        (Deth, ImmDt),
        24,
        (12, 20),
    )
    assert ud.qp_type is Transport.UD and ud.is_only and ud.has_payload
    cnp = opcode_info(0x81)
    assert cnp.opcode is Opcode.CNP and cnp.ext_headers == (CnpRsvd,) and cnp.length == 28
    assert cnp.qp_type is Transport.CNP and not cnp.has_payload


def test_offsets_follow_rxe() -> None:
    # rxe_opcode.c: WRITE_ONLY_WITH_IMM has RETH at 12, ImmDt at 28, payload at 32;
    # ATOMIC_ACKNOWLEDGE has AETH at 12, AtomicAckETH at 16.
    assert opcode_info(Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE).offsets == (12, 28)
    assert opcode_info(Opcode.RC_ATOMIC_ACKNOWLEDGE).offsets == (12, 16)


def test_names_and_values() -> None:
    assert int(Opcode.RC_SEND_FIRST) == 0
    assert int(Opcode.RC_RDMA_READ_RESPONSE_MIDDLE) == 0x0E
    assert int(Opcode.UD_SEND_ONLY) == 0x64
    assert opcode_info(0x0E).name == "IB_OPCODE_RC_RDMA_READ_RESPONSE_MIDDLE"
    assert len(Opcode) == 23 + 2 + 12 + 2 + 1 + 23  # RC (+ FLUSH, ATOMIC WRITE), UC, UD, CNP, XRC
    for op in Opcode:
        assert opcode_info(op).opcode is op


def test_flags() -> None:
    info = opcode_info
    # requests vs responses
    assert all(info(v).is_request for v in (0x00, 0x06, 0x0C, 0x13, 0x14, 0x64))
    for v in (0x0D, 0x0E, 0x0F, 0x10, 0x11, 0x12):
        assert info(v).is_response and not info(v).is_request
    assert info(0x11).is_ack and info(0x12).is_ack and not info(0x10).is_ack
    # segmentation
    assert info(0x06).is_first and info(0x07).is_middle and info(0x08).is_last
    assert info(0x0A).is_only and info(0x0C).is_only and info(0x11).is_only
    assert info(0x00).starts_message and not info(0x00).ends_message
    assert info(0x02).ends_message and info(0x04).starts_message and info(0x04).ends_message
    # payload
    assert not info(0x0C).has_payload and not info(0x11).has_payload
    assert not info(0x13).has_payload and info(0x0E).has_payload
    # kinds
    assert info(0x05).has_immediate and info(0x0B).has_immediate and not info(0x0A).has_immediate
    assert info(0x16).has_invalidate and info(0x17).has_invalidate
    assert info(0x09).is_write and info(0x0C).is_read and info(0x14).is_atomic
    assert info(0x17).is_send and not info(0x0D).is_read  # responses carry no op kind
    # rxe RXE_RWR_MASK / RXE_COMP_MASK
    assert info(0x00).consumes_recv_wqe and not info(0x01).consumes_recv_wqe
    assert info(0x09).consumes_recv_wqe and info(0x09).completes
    assert not info(0x08).completes and info(0x02).completes
    assert not info(0x16).consumes_recv_wqe and info(0x17).consumes_recv_wqe
    # exactly one message position for every RC/UC/UD opcode
    for row in OPCODE_TABLE:
        if row is None or row.opcode is Opcode.CNP:
            continue
        assert row.is_first + row.is_middle + row.is_last + row.is_only == 1
        assert row.is_request != row.is_response


@pytest.mark.parametrize(
    "value", [0x15, 0x18, 0x1F, 0x2C, 0x40, 0x44, 0x60, 0x63, 0x66, 0x80, 0x82, 0xFF]
)
def test_unknown_opcodes(value: int) -> None:
    assert OPCODE_TABLE[value] is None
    with pytest.raises(UnknownOpcode) as ei:
        opcode_info(value)
    assert isinstance(ei.value, MalformedPacket) and ei.value.opcode == value


def test_table_is_complete() -> None:
    assert len(OPCODE_TABLE) == 256
    assert sum(r is not None for r in OPCODE_TABLE) == len(Opcode)
    with pytest.raises(UnknownOpcode):
        opcode_info(256)
    with pytest.raises(UnknownOpcode):
        opcode_info(-1)
