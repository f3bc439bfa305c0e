"""Hypothesis strategies shared by the transport tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from softrdma.transport.headers import (
    Aeth,
    AtomicAckEth,
    AtomicEth,
    CnpRsvd,
    Deth,
    Feth,
    Ieth,
    ImmDt,
    Reth,
    XrcEth,
)
from softrdma.transport.opcodes import OPCODE_TABLE, OpcodeInfo
from softrdma.transport.packet import Packet

INFOS: list[OpcodeInfo] = [i for i in OPCODE_TABLE if i is not None]


def u(bits: int) -> st.SearchStrategy[int]:
    """Unsigned integers of ``bits`` bits, edges included."""
    return st.integers(0, (1 << bits) - 1)


# Packet attribute for each extension header class (independent of packet.py).
SLOT: dict[type, str] = {
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

HEADER_STRATEGY: dict[type, st.SearchStrategy[Any]] = {
    Reth: st.builds(Reth, u(64), u(32), u(32)),
    Aeth: st.builds(Aeth, u(8), u(24)),
    AtomicEth: st.builds(AtomicEth, u(64), u(32), u(64), u(64)),
    AtomicAckEth: st.builds(AtomicAckEth, u(64)),
    ImmDt: st.builds(ImmDt, u(32)),
    Ieth: st.builds(Ieth, u(32)),
    Deth: st.builds(Deth, u(32), u(24)),
    CnpRsvd: st.builds(CnpRsvd, st.binary(min_size=16, max_size=16)),
    XrcEth: st.builds(XrcEth, u(24)),
    Feth: st.builds(Feth, u(4), u(2)),
}


@st.composite
def packets(draw: st.DrawFn, info: OpcodeInfo | None = None, max_payload: int = 300) -> Packet:
    """A valid packet of ``info``'s opcode (or any opcode) with random fields."""
    if info is None:
        info = draw(st.sampled_from(INFOS))
    payload = draw(st.binary(max_size=max_payload)) if info.has_payload else b""
    hdrs = {SLOT[cls]: draw(HEADER_STRATEGY[cls]) for cls in info.ext_headers}
    return Packet.build(
        info.opcode,
        dest_qp=draw(u(24)),
        psn=draw(u(24)),
        pkey=draw(u(16)),
        se=draw(st.booleans()),
        mig=draw(st.booleans()),
        fecn=draw(st.booleans()),
        becn=draw(st.booleans()),
        ack_req=draw(st.booleans()),
        payload=payload,
        **hdrs,
    )
