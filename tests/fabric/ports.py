"""Fake device ports and real RoCEv2 frames for the fabric tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from softrdma.fabric.inproc import Fabric
from softrdma.time.sim import SimLoop
from softrdma.transport.headers import Aeth, Deth
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.roce import RoceFrame, decode_roce_v2, encode_roce_v2, rxe_qp_src_port


@dataclass(eq=False)
class FakePort:
    """A port that records what it receives: (simulated time, frame), then
    hands the frame to ``respond`` if set (a port that answers from inside
    ``receive_frame``, as a responder does)."""

    loop: SimLoop
    ip: IPv4Address | IPv6Address
    mac: bytes
    received: list[tuple[float, bytes]] = field(default_factory=list)
    respond: Callable[[bytes], None] | None = None

    def receive_frame(self, frame: bytes) -> None:
        self.received.append((self.loop.now, frame))
        if self.respond is not None:
            self.respond(frame)

    @property
    def frames(self) -> list[bytes]:
        return [f for _, f in self.received]

    def psns(self) -> list[int]:
        """PSNs of the received frames (they must decode)."""
        return [decode_roce_v2(f).packet.bth.psn for f in self.frames]


def make_port(fabric: Fabric, ip: str, attach: bool = True) -> FakePort:
    addr = ip_address(ip)
    mac = b"\x02\x00" + addr.packed[-4:]
    port = FakePort(fabric.loop, addr, mac)
    if attach:
        fabric.attach(port)
    return port


def make_frame(
    src: FakePort | str,
    dst: FakePort | str,
    psn: int = 0,
    payload: bytes = b"",
    *,
    opcode: int = Opcode.RC_SEND_ONLY,
    dest_qp: int = 0x11,
    vlan: int | None = None,
) -> bytes:
    """A real RoCEv2 frame (Ethernet/IP/UDP/BTH.../ICRC) from src to dst."""
    s = src if isinstance(src, str) else str(src.ip)
    d = dst if isinstance(dst, str) else str(dst.ip)
    smac = b"\x02\0\0\0\0\1" if isinstance(src, str) else src.mac
    dmac = b"\x02\0\0\0\0\2" if isinstance(dst, str) else dst.mac
    aeth = Aeth(0, psn) if opcode == Opcode.RC_ACKNOWLEDGE else None
    deth = Deth(0x11111111, 1) if opcode == Opcode.UD_SEND_ONLY else None
    pkt = Packet.build(opcode, dest_qp=dest_qp, psn=psn, payload=payload, aeth=aeth, deth=deth)
    return encode_roce_v2(
        RoceFrame.build(
            pkt, s, d, rxe_qp_src_port(dest_qp), eth_src=smac, eth_dst=dmac, vlan_tci=vlan
        )
    )
