"""BTH opcodes and the per-opcode table.

Kernel counterparts: ``include/rdma/ib_pack.h`` (``IB_OPCODE_*``) and
``drivers/infiniband/sw/rxe/rxe_opcode.c`` (``rxe_opcode[]``: per opcode the
extension headers, their offsets, the total header length and the
``RXE_*_MASK`` flags). Lookup is O(1): :data:`OPCODE_TABLE` is a 256-entry
tuple indexed by the opcode byte.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum
from typing import TypeAlias

from softrdma.transport.headers import (
    BTH_SIZE,
    Aeth,
    AtomicAckEth,
    AtomicEth,
    CnpRsvd,
    Deth,
    Feth,
    Ieth,
    ImmDt,
    MalformedPacket,
    Reth,
    XrcEth,
)

__all__ = [
    "OPCODE_TABLE",
    "ExtHeaderType",
    "Opcode",
    "OpcodeInfo",
    "Transport",
    "UnknownOpcode",
    "opcode_info",
]


class UnknownOpcode(MalformedPacket):
    """The BTH opcode is not one softrdma (or rxe) knows: reserved values and the
    RD transport. rxe_recv.c drops such packets. Reason ``bad_opcode``."""

    def __init__(self, opcode: int) -> None:
        super().__init__(f"unknown BTH opcode {opcode:#04x}", reason="bad_opcode")
        self.opcode = opcode


class Transport(IntEnum):
    """The transport service encoded in the top 3 opcode bits (ib_pack.h
    ``IB_OPCODE_RC`` … ``IB_OPCODE_CNP``); it is the QP type an opcode belongs to."""

    RC = 0x00
    UC = 0x20
    RD = 0x40
    UD = 0x60
    CNP = 0x80
    XRC = 0xA0


class Opcode(IntEnum):
    """BTH opcodes (ib_pack.h ``IB_OPCODE_<transport>_<op>``).

    ``Opcode.RC_SEND_FIRST`` is ``IB_OPCODE_RC_SEND_FIRST``; RC is ``0x00 + op``,
    UC ``0x20 + op``, UD ``0x60 + op``. ``CNP`` (0x81) is the RoCEv2 congestion
    notification packet.
    """

    RC_SEND_FIRST = 0x00
    RC_SEND_MIDDLE = 0x01
    RC_SEND_LAST = 0x02
    RC_SEND_LAST_WITH_IMMEDIATE = 0x03
    RC_SEND_ONLY = 0x04
    RC_SEND_ONLY_WITH_IMMEDIATE = 0x05
    RC_RDMA_WRITE_FIRST = 0x06
    RC_RDMA_WRITE_MIDDLE = 0x07
    RC_RDMA_WRITE_LAST = 0x08
    RC_RDMA_WRITE_LAST_WITH_IMMEDIATE = 0x09
    RC_RDMA_WRITE_ONLY = 0x0A
    RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE = 0x0B
    RC_RDMA_READ_REQUEST = 0x0C
    RC_RDMA_READ_RESPONSE_FIRST = 0x0D
    RC_RDMA_READ_RESPONSE_MIDDLE = 0x0E
    RC_RDMA_READ_RESPONSE_LAST = 0x0F
    RC_RDMA_READ_RESPONSE_ONLY = 0x10
    RC_ACKNOWLEDGE = 0x11
    RC_ATOMIC_ACKNOWLEDGE = 0x12
    RC_COMPARE_SWAP = 0x13
    RC_FETCH_ADD = 0x14
    RC_SEND_LAST_WITH_INVALIDATE = 0x16
    RC_SEND_ONLY_WITH_INVALIDATE = 0x17
    RC_FLUSH = 0x1C
    RC_ATOMIC_WRITE = 0x1D

    UC_SEND_FIRST = 0x20
    UC_SEND_MIDDLE = 0x21
    UC_SEND_LAST = 0x22
    UC_SEND_LAST_WITH_IMMEDIATE = 0x23
    UC_SEND_ONLY = 0x24
    UC_SEND_ONLY_WITH_IMMEDIATE = 0x25
    UC_RDMA_WRITE_FIRST = 0x26
    UC_RDMA_WRITE_MIDDLE = 0x27
    UC_RDMA_WRITE_LAST = 0x28
    UC_RDMA_WRITE_LAST_WITH_IMMEDIATE = 0x29
    UC_RDMA_WRITE_ONLY = 0x2A
    UC_RDMA_WRITE_ONLY_WITH_IMMEDIATE = 0x2B

    UD_SEND_ONLY = 0x64
    UD_SEND_ONLY_WITH_IMMEDIATE = 0x65

    XRC_SEND_FIRST = 0xA0
    XRC_SEND_MIDDLE = 0xA1
    XRC_SEND_LAST = 0xA2
    XRC_SEND_LAST_WITH_IMMEDIATE = 0xA3
    XRC_SEND_ONLY = 0xA4
    XRC_SEND_ONLY_WITH_IMMEDIATE = 0xA5
    XRC_RDMA_WRITE_FIRST = 0xA6
    XRC_RDMA_WRITE_MIDDLE = 0xA7
    XRC_RDMA_WRITE_LAST = 0xA8
    XRC_RDMA_WRITE_LAST_WITH_IMMEDIATE = 0xA9
    XRC_RDMA_WRITE_ONLY = 0xAA
    XRC_RDMA_WRITE_ONLY_WITH_IMMEDIATE = 0xAB
    XRC_RDMA_READ_REQUEST = 0xAC
    XRC_RDMA_READ_RESPONSE_FIRST = 0xAD
    XRC_RDMA_READ_RESPONSE_MIDDLE = 0xAE
    XRC_RDMA_READ_RESPONSE_LAST = 0xAF
    XRC_RDMA_READ_RESPONSE_ONLY = 0xB0
    XRC_ACKNOWLEDGE = 0xB1
    XRC_ATOMIC_ACKNOWLEDGE = 0xB2
    XRC_COMPARE_SWAP = 0xB3
    XRC_FETCH_ADD = 0xB4
    XRC_SEND_LAST_WITH_INVALIDATE = 0xB6
    XRC_SEND_ONLY_WITH_INVALIDATE = 0xB7

    CNP = 0x81


ExtHeaderType: TypeAlias = (
    type[Reth]
    | type[Aeth]
    | type[AtomicEth]
    | type[AtomicAckEth]
    | type[ImmDt]
    | type[Ieth]
    | type[Deth]
    | type[CnpRsvd]
    | type[Feth]
    | type[XrcEth]
)
"""An extension header class, as listed in :attr:`OpcodeInfo.ext_headers`."""


@dataclass(frozen=True, slots=True)
class OpcodeInfo:
    """One row of the opcode table (rxe_opcode.c ``struct rxe_opcode_info``).

    ``ext_headers`` are the extension header classes in wire order, ``offsets``
    their byte offsets from the BTH, and ``length`` the header bytes before the
    payload (rxe ``.length``: BTH + extension headers). The boolean flags mirror
    rxe's ``RXE_*_MASK`` bits:

    * ``is_request`` (``RXE_REQ_MASK``): requester → responder;
      ``is_response`` (``RXE_ACK_MASK``): responder → requester (read
      responses, ACK, atomic ACK); ``is_ack``: ACKNOWLEDGE / ATOMIC ACKNOWLEDGE;
    * ``is_first`` / ``is_middle`` / ``is_last`` / ``is_only`` from
      ``RXE_START_MASK`` / ``RXE_MIDDLE_MASK`` / ``RXE_END_MASK``;
    * ``has_payload`` (``RXE_PAYLOAD_MASK``), ``has_immediate``
      (``RXE_IMMDT_MASK``), ``has_invalidate`` (``RXE_IETH_MASK``);
    * ``is_send`` / ``is_write`` / ``is_read`` / ``is_atomic``
      (``RXE_SEND_MASK`` / ``RXE_WRITE_MASK`` / ``RXE_READ_MASK`` / ``RXE_ATOMIC_MASK``);
      ``is_flush`` / ``is_atomic_write`` (``RXE_FLUSH_MASK`` /
      ``RXE_ATOMIC_WRITE_MASK``: RC FLUSH and ATOMIC WRITE, IBTA annex A19,
      answered like a READ with an empty READ RESPONSE ONLY);
    * ``consumes_recv_wqe`` (``RXE_RWR_MASK``), ``completes`` (``RXE_COMP_MASK``:
      the responder generates a receive completion);
    * ``requires_ack``: an RC (or XRC) request; the requester keeps it until an ACK or
      response (explicit or coalesced) covers its PSN. UC, UD and CNP are never
      acknowledged.
    """

    opcode: Opcode
    name: str
    qp_type: Transport
    ext_headers: tuple[ExtHeaderType, ...]
    offsets: tuple[int, ...]
    length: int
    is_request: bool
    is_response: bool
    is_ack: bool
    is_first: bool
    is_middle: bool
    is_last: bool
    is_only: bool
    has_payload: bool
    has_immediate: bool
    has_invalidate: bool
    is_send: bool
    is_write: bool
    is_read: bool
    is_atomic: bool
    consumes_recv_wqe: bool
    completes: bool
    requires_ack: bool
    is_flush: bool = False
    is_atomic_write: bool = False

    @property
    def starts_message(self) -> bool:
        """First or only packet of a message (rxe ``RXE_START_MASK``)."""
        return self.is_first or self.is_only

    @property
    def ends_message(self) -> bool:
        """Last or only packet of a message (rxe ``RXE_END_MASK``)."""
        return self.is_last or self.is_only


# Flags used only to build the table below.
(
    _REQ, _RESP, _FIRST, _MIDDLE, _LAST, _PAY, _SEND, _WRITE, _READ, _ATOMIC, _RWR, _COMP,
    _FLUSH, _ATOMIC_WRITE,
) = (1 << i for i in range(14))  # fmt: skip
_ONLY = _FIRST | _LAST


def _row(op: Opcode, flags: int, *ext: ExtHeaderType) -> OpcodeInfo:
    offsets = []
    off = BTH_SIZE
    for h in ext:
        offsets.append(off)
        off += h.SIZE
    transport = Transport(op & 0xE0)
    start, end = bool(flags & _FIRST), bool(flags & _LAST)
    is_ack = op in (Opcode.RC_ACKNOWLEDGE, Opcode.RC_ATOMIC_ACKNOWLEDGE)
    return OpcodeInfo(
        opcode=op,
        name="IB_OPCODE_" + op.name,
        qp_type=transport,
        ext_headers=ext,
        offsets=tuple(offsets),
        length=off,
        is_request=bool(flags & _REQ),
        is_response=bool(flags & _RESP),
        is_ack=is_ack,
        is_first=start and not end,
        is_middle=bool(flags & _MIDDLE),
        is_last=end and not start,
        is_only=start and end,
        has_payload=bool(flags & _PAY),
        has_immediate=ImmDt in ext,
        has_invalidate=Ieth in ext,
        is_send=bool(flags & _SEND),
        is_write=bool(flags & _WRITE),
        is_read=bool(flags & _READ),
        is_atomic=bool(flags & _ATOMIC),
        consumes_recv_wqe=bool(flags & _RWR),
        completes=bool(flags & _COMP),
        requires_ack=transport is Transport.RC and bool(flags & _REQ),
        is_flush=bool(flags & _FLUSH),
        is_atomic_write=bool(flags & _ATOMIC_WRITE),
    )


def _send_write_rows(t: str) -> list[OpcodeInfo]:
    """SEND and RDMA WRITE opcodes, shared by RC and UC (rxe_opcode.c)."""
    o = Opcode.__members__
    rq = _REQ | _PAY
    snd, wr = rq | _SEND, rq | _WRITE
    return [
        _row(o[t + "_SEND_FIRST"], snd | _RWR | _FIRST),
        _row(o[t + "_SEND_MIDDLE"], snd | _MIDDLE),
        _row(o[t + "_SEND_LAST"], snd | _COMP | _LAST),
        _row(o[t + "_SEND_LAST_WITH_IMMEDIATE"], snd | _COMP | _LAST, ImmDt),
        _row(o[t + "_SEND_ONLY"], snd | _COMP | _RWR | _ONLY),
        _row(o[t + "_SEND_ONLY_WITH_IMMEDIATE"], snd | _COMP | _RWR | _ONLY, ImmDt),
        _row(o[t + "_RDMA_WRITE_FIRST"], wr | _FIRST, Reth),
        _row(o[t + "_RDMA_WRITE_MIDDLE"], wr | _MIDDLE),
        _row(o[t + "_RDMA_WRITE_LAST"], wr | _LAST),
        # WRITE with immediate consumes a receive WQE and completes there.
        _row(o[t + "_RDMA_WRITE_LAST_WITH_IMMEDIATE"], wr | _COMP | _RWR | _LAST, ImmDt),
        _row(o[t + "_RDMA_WRITE_ONLY"], wr | _ONLY, Reth),
        _row(o[t + "_RDMA_WRITE_ONLY_WITH_IMMEDIATE"], wr | _COMP | _RWR | _ONLY, Reth, ImmDt),
    ]


_LAST_XRC_TWIN = Opcode.RC_SEND_ONLY_WITH_INVALIDATE
"""XRC has a twin of every RC opcode up to SEND ONLY WITH INVALIDATE
(ib_pack.h ``IB_OPCODE_XRC``; the later RC-only FLUSH / ATOMIC WRITE have none)."""


def _xrc_row(rc: OpcodeInfo) -> OpcodeInfo:
    """The XRC twin of an RC row (IBTA vol. 1 §9.2 / ib_pack.h
    ``IB_OPCODE_XRC + op``): the same operation; a request carries the
    XRCETH right after the BTH, before its other extension headers (rxe's XRC
    series ``rxe_opcode.c``, Wireshark's ``packet-infiniband.c``), a
    response (ACK, READ response, atomic ACK) is laid out as in RC."""
    op = Opcode(rc.opcode | Transport.XRC)
    if not rc.is_request:
        return replace(rc, opcode=op, name="IB_OPCODE_" + op.name, qp_type=Transport.XRC)
    ext = (XrcEth, *rc.ext_headers)
    offsets = (BTH_SIZE, *(o + XrcEth.SIZE for o in rc.offsets))
    return replace(
        rc,
        opcode=op,
        name="IB_OPCODE_" + op.name,
        qp_type=Transport.XRC,
        ext_headers=ext,
        offsets=offsets,
        length=rc.length + XrcEth.SIZE,
    )


def _build_table() -> tuple[OpcodeInfo | None, ...]:
    rows = _send_write_rows("RC") + _send_write_rows("UC")
    rsp = _RESP
    rows += [
        # A READ request carries no payload; its PSN range covers the responses.
        _row(Opcode.RC_RDMA_READ_REQUEST, _REQ | _READ | _ONLY, Reth),
        _row(Opcode.RC_RDMA_READ_RESPONSE_FIRST, rsp | _PAY | _FIRST, Aeth),
        # MIDDLE responses carry no AETH (IBTA 9.7.5.1.2; rxe_opcode.c).
        _row(Opcode.RC_RDMA_READ_RESPONSE_MIDDLE, rsp | _PAY | _MIDDLE),
        _row(Opcode.RC_RDMA_READ_RESPONSE_LAST, rsp | _PAY | _LAST, Aeth),
        _row(Opcode.RC_RDMA_READ_RESPONSE_ONLY, rsp | _PAY | _ONLY, Aeth),
        _row(Opcode.RC_ACKNOWLEDGE, rsp | _ONLY, Aeth),
        _row(Opcode.RC_ATOMIC_ACKNOWLEDGE, rsp | _ONLY, Aeth, AtomicAckEth),
        _row(Opcode.RC_COMPARE_SWAP, _REQ | _ATOMIC | _ONLY, AtomicEth),
        _row(Opcode.RC_FETCH_ADD, _REQ | _ATOMIC | _ONLY, AtomicEth),
        _row(
            Opcode.RC_SEND_LAST_WITH_INVALIDATE,
            _REQ | _PAY | _SEND | _COMP | _LAST,
            Ieth,
        ),
        _row(
            Opcode.RC_SEND_ONLY_WITH_INVALIDATE,
            _REQ | _PAY | _SEND | _COMP | _RWR | _ONLY,
            Ieth,
        ),
        # IBTA annex A19 (rxe_opcode.c): FLUSH is FETH + RETH, no payload;
        # ATOMIC WRITE is a RETH and exactly 8 bytes of payload.
        _row(Opcode.RC_FLUSH, _REQ | _FLUSH | _ONLY, Feth, Reth),
        _row(Opcode.RC_ATOMIC_WRITE, _REQ | _PAY | _ATOMIC_WRITE | _ONLY, Reth),
        _row(Opcode.UD_SEND_ONLY, _REQ | _PAY | _SEND | _COMP | _RWR | _ONLY, Deth),
        _row(
            Opcode.UD_SEND_ONLY_WITH_IMMEDIATE,
            _REQ | _PAY | _SEND | _COMP | _RWR | _ONLY,
            Deth,
            ImmDt,
        ),
        # RoCEv2 CNP (IBTA annex A17): BTH + 16 reserved bytes, no payload.
        _row(Opcode.CNP, 0, CnpRsvd),
    ]
    rows += [_xrc_row(r) for r in rows if r.opcode <= _LAST_XRC_TWIN]
    table: list[OpcodeInfo | None] = [None] * 256
    for r in rows:
        assert table[r.opcode] is None, r
        table[r.opcode] = r
    assert len(rows) == len(Opcode)
    return tuple(table)


OPCODE_TABLE: tuple[OpcodeInfo | None, ...] = _build_table()
"""256 entries indexed by the opcode byte; ``None`` for unknown opcodes
(rxe_opcode.c ``rxe_opcode[RXE_NUM_OPCODE]``)."""


def opcode_info(opcode: int) -> OpcodeInfo:
    """The table row of ``opcode`` (rxe_opcode.c ``rxe_opcode[opcode]``);
    raises :class:`UnknownOpcode` for opcodes not in the table."""
    info = OPCODE_TABLE[opcode & 0xFF] if 0 <= opcode <= 0xFF else None
    if info is None:
        raise UnknownOpcode(opcode)
    return info
