"""The IB transport part of a RoCEv2 packet: BTH, extension headers, payload, pad.

Kernel counterparts: ``drivers/infiniband/sw/rxe/rxe_hdr.h`` (``struct
rxe_pkt_info``, ``header_size()``, ``payload_size()``, ``payload_addr()``),
``rxe_recv.c`` (``hdr_check``, the length checks of ``rxe_rcv``) and
``rxe_req.c`` ``init_req_packet`` / ``rxe_resp.c`` ``prepare_ack_packet``.

The ICRC and the UDP/IP/Ethernet framing live in :mod:`.icrc` and
:mod:`.roce`; here a packet is the bytes from the BTH to the end of the pad.

Data path notes: each opcode has a plan, built once at import, with a
precompiled :class:`struct.Struct` for BTH + all its extension headers, so
encoding is one ``pack`` plus one ``join`` with the payload, and decoding one
``unpack_from`` plus a zero-copy :class:`memoryview` slice for the payload.
:mod:`.roce` packs the same values together with the Ethernet, IP and UDP
headers (:meth:`Packet.wire_values`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from softrdma.transport.headers import (
    BTH_DEF_PKEY,
    BTH_SIZE,
    Aeth,
    AtomicAckEth,
    AtomicEth,
    Bth,
    BytesLike,
    CnpRsvd,
    Deth,
    Feth,
    HeaderFieldError,
    Ieth,
    ImmDt,
    MalformedPacket,
    Reth,
    XrcEth,
)
from softrdma.transport.opcodes import (
    OPCODE_TABLE,
    ExtHeaderType,
    OpcodeInfo,
    UnknownOpcode,
)

# MalformedPacket / UnknownOpcode are re-exported: they are what decode raises.
__all__ = ["HEADER_LENGTHS", "MalformedPacket", "Packet", "UnknownOpcode", "pad_count"]

_PADS = (b"", b"\0", b"\0\0", b"\0\0\0")

# Packet attribute holding each extension header class.
_SLOT: dict[ExtHeaderType, str] = {
    Reth: "reth",
    Aeth: "aeth",
    AtomicEth: "atmeth",
    AtomicAckEth: "atmack",
    ImmDt: "immdt",
    Ieth: "ieth",
    Deth: "deth",
    CnpRsvd: "cnp",
    XrcEth: "xrceth",
    Feth: "feth",
}


def pad_count(payload_len: int) -> int:
    """PadCnt for a payload length: bytes to the next 4-byte multiple
    (rxe_req.c ``pad = (-payload) & 0x3``)."""
    return -payload_len & 3


class _Plan:
    """Precompiled codec for one opcode (built once at import)."""

    __slots__ = (
        "decoders",
        "has_payload",
        "info",
        "length",
        "name",
        "nhdrs",
        "opcode",
        "slots",
        "struct",
    )

    def __init__(self, info: OpcodeInfo) -> None:
        self.info = info
        self.opcode = info.opcode
        self.name = info.name
        self.length = info.length
        self.has_payload = info.has_payload
        fmt = ">" + Bth.STRUCT.format[1:]
        # (Packet attribute, header class, build it with tuple.__new__, first
        # and end index of its values in the unpacked tuple)
        decoders: list[tuple[str, Any, bool, int, int]] = []
        i = 5
        for cls in info.ext_headers:
            fmt += cls.STRUCT.format[1:]
            k = len(cls.STRUCT.unpack(bytes(cls.SIZE)))
            decoders.append((_SLOT[cls], cls, cls.VERBATIM, i, i + k))
            i += k
        self.struct = struct.Struct(fmt)
        assert self.struct.size == info.length, info
        self.decoders = tuple(decoders)
        self.slots = tuple(_SLOT[cls] for cls in info.ext_headers)
        self.nhdrs = len(self.slots)


_PLANS: tuple[_Plan | None, ...] = tuple(
    None if info is None else _Plan(info) for info in OPCODE_TABLE
)

HEADER_LENGTHS: tuple[int, ...] = tuple(0 if p is None else p.length for p in _PLANS)
"""BTH + extension header bytes of each opcode, 0 for an unknown one (rxe
``rxe_opcode[].length``): a packet's encoded length without encoding it."""


@dataclass(slots=True, eq=True)
class Packet:
    """BTH, the opcode's extension headers, payload (rxe ``struct rxe_pkt_info``
    plus the packet bytes it points at).

    Exactly the extension headers the opcode carries must be set (``reth`` for
    RDMA WRITE FIRST/ONLY and READ REQUEST, ``aeth`` for ACKs and read
    responses, ``atmeth``, ``atmack``, ``immdt``, ``ieth``, ``deth``, ``cnp``,
    ``xrceth`` for XRC requests, ``feth`` for FLUSH).
    ``bth.pad`` must equal :func:`pad_count` of the payload; :meth:`build`
    fills it in. A decoded packet's ``payload`` is a :class:`memoryview` into
    the received buffer (no copy).
    """

    bth: Bth
    payload: BytesLike = b""
    reth: Reth | None = None
    aeth: Aeth | None = None
    atmeth: AtomicEth | None = None
    atmack: AtomicAckEth | None = None
    immdt: ImmDt | None = None
    ieth: Ieth | None = None
    deth: Deth | None = None
    cnp: CnpRsvd | None = None
    xrceth: XrcEth | None = None
    feth: Feth | None = None

    @classmethod
    def build(
        cls,
        opcode: int,
        *,
        dest_qp: int,
        psn: int,
        payload: BytesLike = b"",
        pkey: int = BTH_DEF_PKEY,
        se: bool = False,
        mig: bool = False,
        fecn: bool = False,
        becn: bool = False,
        ack_req: bool = False,
        reth: Reth | None = None,
        aeth: Aeth | None = None,
        atmeth: AtomicEth | None = None,
        atmack: AtomicAckEth | None = None,
        immdt: ImmDt | None = None,
        ieth: Ieth | None = None,
        deth: Deth | None = None,
        cnp: CnpRsvd | None = None,
        xrceth: XrcEth | None = None,
        feth: Feth | None = None,
    ) -> Packet:
        """A packet with PadCnt computed from the payload (rxe_req.c
        ``init_req_packet`` → ``bth_init``). A CNP gets zero reserved bytes
        unless ``cnp`` is given."""
        n = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if cnp is None and opcode == 0x81:
            cnp = CnpRsvd()
        # tuple.__new__: the NamedTuple's Python-level __new__ checks nothing.
        bth = tuple.__new__(
            Bth, (opcode, dest_qp, psn, pkey, se, mig, -n & 3, 0, fecn, becn, ack_req)
        )
        return cls(bth, payload, reth, aeth, atmeth, atmack, immdt, ieth, deth, cnp, xrceth, feth)

    # Convenience views of the BTH and the opcode row.
    @property
    def opcode(self) -> int:
        """BTH opcode (rxe_hdr.h ``bth_opcode``)."""
        return self.bth.opcode

    @property
    def psn(self) -> int:
        """BTH PSN (rxe_hdr.h ``bth_psn``)."""
        return self.bth.psn

    @property
    def dest_qp(self) -> int:
        """BTH destination QP (rxe_hdr.h ``bth_qpn``)."""
        return self.bth.dest_qp

    @property
    def info(self) -> OpcodeInfo:
        """The opcode table row (rxe ``rxe_opcode[pkt->opcode]``)."""
        return _plan_for_encode(self.bth.opcode).info

    @property
    def payload_len(self) -> int:
        """Payload bytes, pad excluded (rxe_hdr.h ``payload_size``)."""
        p = self.payload
        return p.nbytes if isinstance(p, memoryview) else len(p)

    def __len__(self) -> int:
        """Encoded length, BTH to pad inclusive (no ICRC)."""
        plan = _plan_for_encode(self.bth.opcode)
        n = self.payload_len
        return plan.length + n + (-n & 3)

    def __repr__(self) -> str:
        hdrs = "".join(
            f", {s}={getattr(self, s)!r}" for s in _SLOT.values() if getattr(self, s) is not None
        )
        return f"Packet({self.bth!r}{hdrs}, payload=<{self.payload_len} bytes>)"

    def wire_values(self) -> tuple[struct.Struct, tuple[Any, ...], BytesLike, int]:
        """The validated pieces of the encoding: the opcode's header
        :class:`struct.Struct` (BTH + extension headers), the values for it
        (the first five are the BTH's), the payload and the pad count. The
        struct itself range-checks whole-word fields when packing; a
        :class:`struct.error` from it means a header field is out of range and
        :meth:`encode_parts` names it."""
        bth = self.bth
        plan = _plan_for_encode(bth.opcode)
        payload = self.payload
        n = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        pad = -n & 3
        if bth.pad != pad:
            raise HeaderFieldError(f"Bth.pad={bth.pad!r} but a {n}-byte payload needs PadCnt {pad}")
        if n and not plan.has_payload:
            raise HeaderFieldError(f"{plan.name} carries no payload, got {n} bytes")
        present = (
            (self.reth is not None)
            + (self.aeth is not None)
            + (self.atmeth is not None)
            + (self.atmack is not None)
            + (self.immdt is not None)
            + (self.ieth is not None)
            + (self.deth is not None)
            + (self.cnp is not None)
            + (self.xrceth is not None)
            + (self.feth is not None)
        )
        vals = bth.wire_fields()
        for slot in plan.slots:
            h = getattr(self, slot)
            if h is None:
                raise HeaderFieldError(f"{plan.name} needs a {slot} header")
            vals += h.wire_fields()
        if present != plan.nhdrs:
            extra = [s for s in _SLOT.values() if s not in plan.slots and getattr(self, s)]
            raise HeaderFieldError(f"{plan.name} does not carry {', '.join(extra)}")
        return plan.struct, vals, payload, pad

    def encode_parts(self) -> tuple[bytes, BytesLike, bytes]:
        """(headers, payload, pad) — the packet as three buffers so callers can
        checksum or scatter them without joining (rxe builds the headers in the
        skb and copies the payload behind them)."""
        st, vals, payload, pad = self.wire_values()
        try:
            return st.pack(*vals), payload, _PADS[pad]
        except struct.error:
            raise self._explain_pack_error() from None

    def _explain_pack_error(self) -> HeaderFieldError:
        self.bth.pack()  # raises the precise error if the BTH is at fault
        for slot in _plan_for_encode(self.bth.opcode).slots:
            getattr(self, slot).pack()
        return HeaderFieldError(f"cannot encode {self!r}")

    def encode(self) -> bytes:
        """Wire bytes from the BTH to the end of the pad, without ICRC
        (rxe_req.c ``init_req_packet`` + ``finish_packet``)."""
        st, vals, payload, pad = self.wire_values()
        try:
            hdr = st.pack(*vals)
        except struct.error:
            raise self._explain_pack_error() from None
        return hdr + payload if not pad else b"".join((hdr, payload, _PADS[pad]))

    @classmethod
    def decode(cls, buf: BytesLike) -> Packet:
        """Parse BTH .. pad (no ICRC) with the checks of rxe_recv.c
        ``hdr_check`` / ``rxe_rcv``: known opcode, TVer 0, length covers the
        opcode's headers, length a multiple of 4 (so PadCnt is consistent with
        it), no payload for opcodes that carry none. The payload is a zero-copy
        :class:`memoryview` slice of ``buf``. Raises :class:`MalformedPacket`
        (or its subclass :class:`UnknownOpcode`)."""
        mv = buf if type(buf) is memoryview else memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        if n < BTH_SIZE:
            raise MalformedPacket(
                f"{n} bytes is shorter than a BTH ({BTH_SIZE})", reason="truncated"
            )
        plan = _PLANS[mv[0]]
        if plan is None:
            raise UnknownOpcode(mv[0])
        hlen = plan.length
        if n < hlen:
            raise MalformedPacket(
                f"{plan.name} needs {hlen} header bytes, packet has {n}", reason="truncated"
            )
        if n & 3:
            raise MalformedPacket(f"packet length {n} is not a multiple of 4", reason="bad_length")
        vals = plan.struct.unpack_from(mv)
        b1, w4, w8 = vals[1], vals[3], vals[4]
        if b1 & 0x0F:
            raise MalformedPacket(f"BTH TVer {b1 & 0x0F} is not 0", reason="bad_version")
        pad = (b1 >> 4) & 3
        end = n - pad
        if end < hlen:
            raise MalformedPacket(
                f"PadCnt {pad} exceeds the {n - hlen}-byte payload", reason="bad_pad"
            )
        if end != hlen and not plan.has_payload:
            raise MalformedPacket(
                f"{plan.name} carries no payload, got {n - hlen} bytes after the headers",
                reason="bad_length",
            )
        # tuple.__new__ skips the NamedTuple's Python-level __new__ (hot path);
        # this is Bth.from_wire with its TVer check done above.
        bth = tuple.__new__(
            Bth,
            (
                plan.opcode,
                w4 & 0xFFFFFF,
                w8 & 0xFFFFFF,
                vals[2],
                b1 >> 7 == 1,
                b1 & 0x40 != 0,
                pad,
                0,
                w4 >> 31 == 1,
                w4 & 0x40000000 != 0,
                w8 >> 31 == 1,
            ),
        )
        pkt = cls(bth, mv[hlen:end])
        for slot, hcls, verbatim, i, j in plan.decoders:
            if verbatim:  # the values are the fields: no from_wire call needed
                setattr(pkt, slot, tuple.__new__(hcls, vals[i:j]))
            else:
                setattr(pkt, slot, hcls.from_wire(*vals[i:j]))
        return pkt


def _plan_for_encode(opcode: int) -> _Plan:
    plan = _PLANS[opcode] if isinstance(opcode, int) and 0 <= opcode <= 0xFF else None
    if plan is None:
        raise HeaderFieldError(f"cannot encode unknown opcode {opcode!r}")
    return plan
