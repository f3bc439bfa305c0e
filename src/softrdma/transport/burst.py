"""Segmentation offload: consecutive request packets of one message as one unit.

Kernel counterparts: GSO / GRO (``net/core/gso.c``, ``net/core/gro.c``) —
a NIC that segments a large send itself and a receiver that coalesces
consecutive segments before the stack sees them — applied to the RC
requester's segmentation in ``rxe_req.c`` (``next_opcode_rc``,
``init_req_packet``, ``update_wqe_psn``).

A :class:`SegRun` describes the packets an RC requester emits for one SEND
or RDMA WRITE in one pass — first PSN, count, the opcode sequence, the
AckReq positions, the RETH / ImmDt / IETH of the first and last packet —
and carries their payload back to back. :meth:`SegRun.packets` builds the
real packets from it, and is the only code that does so: the requester
makes its packets with it whether it then hands the run on or the
packets, so a run split into frames (a tap, a fault or a frame filter on
the path) is byte for byte what the requester would have sent.

A run is made only by this process's requester and carried only by the
in-process fabric; nothing decodes one from the wire.
"""

from __future__ import annotations

from softrdma.transport.headers import Bth, BytesLike, Ieth, ImmDt, Reth
from softrdma.transport.packet import HEADER_LENGTHS, Packet
from softrdma.transport.roce import ROCE_V2_UDP_DPORT, RoceFrame

__all__ = ["FRAMING", "BurstItem", "RoceBurst", "SegRun", "edge_packet"]

FRAMING = 14 + 20 + 8 + 4
"""Ethernet, IPv4 and UDP headers and the ICRC around each transport packet
(RoCEv2 over IPv4, no VLAN tag)."""


def edge_packet(
    opcode: int,
    dest_qp: int,
    psn: int,
    pkey: int,
    payload: BytesLike,
    n: int,
    se: bool,
    ack_req: bool,
    reth: Reth | None,
    imm: int | None,
    inv: int | None,
) -> Packet:
    """A message's FIRST, LAST or ONLY request packet with its ``n``-byte
    payload: what ``Packet.build`` makes of these (rxe_req.c
    ``init_req_packet``), built directly (``tuple.__new__`` skips the
    header NamedTuples' argument handling, as ``build`` does)."""
    new = tuple.__new__
    return Packet(
        new(Bth, (opcode, dest_qp, psn, pkey, se, False, -n & 3, 0, False, False, ack_req)),
        payload,
        reth,
        None,
        None,
        None,
        None if imm is None else new(ImmDt, (imm,)),
        None if inv is None else new(Ieth, (inv,)),
    )


class SegRun:
    """``count`` consecutive packets of one SEND / RDMA WRITE message,
    starting at PSN ``psn`` and ``offset`` bytes into the message, with
    ``resid`` bytes of the message left at the first of them.

    ``ops`` are the message's (FIRST, MIDDLE, LAST, ONLY) opcodes;
    ``va`` / ``rkey`` the RETH's address (at the first packet) and key for a
    WRITE; ``se`` whether the message's last packet carries SE; ``imm`` /
    ``inv`` its ImmDt / IETH value or None; ``acks`` the indices (in the
    run) of the packets with AckReq set. The payload is ``data`` (all
    packets' payload back to back) or ``pieces`` (one buffer per packet):
    every packet but the message's last carries exactly ``mtu`` bytes.
    """

    __slots__ = (
        "acks",
        "count",
        "data",
        "dest_qp",
        "imm",
        "inv",
        "is_write",
        "mtu",
        "offset",
        "ops",
        "pieces",
        "pkey",
        "psn",
        "resid",
        "rkey",
        "se",
        "va",
    )

    def __init__(
        self,
        ops: tuple[int, int, int, int],
        dest_qp: int,
        pkey: int,
        psn: int,
        count: int,
        mtu: int,
        offset: int,
        resid: int,
        *,
        is_write: bool,
        va: int,
        rkey: int,
        se: bool,
        imm: int | None,
        inv: int | None,
        acks: tuple[int, ...],
        data: BytesLike | None = None,
        pieces: list[BytesLike] | None = None,
    ) -> None:
        self.ops = ops
        self.dest_qp = dest_qp
        self.pkey = pkey
        self.psn = psn
        self.count = count
        self.mtu = mtu
        self.offset = offset
        self.resid = resid
        self.is_write = is_write
        self.va = va
        self.rkey = rkey
        self.se = se
        self.imm = imm
        self.inv = inv
        self.acks = acks
        self.data = data
        self.pieces = pieces

    @property
    def ends(self) -> bool:
        """True if the message's last packet is the run's last."""
        return self.resid <= self.count * self.mtu

    @property
    def nbytes(self) -> int:
        """Payload bytes of the whole run."""
        return min(self.resid, self.count * self.mtu)

    def opcode(self, i: int) -> int:
        """The opcode of the run's packet ``i``."""
        first, middle, last, only = self.ops
        start = i == 0 and self.offset == 0
        if self.resid - i * self.mtu <= self.mtu:
            return only if start else last
        return first if start else middle

    def wire_len(self) -> int:
        """Encoded length of all the run's frames (:data:`FRAMING` included)."""
        count = self.count
        mtu = self.mtu
        middle = self.ops[1]
        n = 0
        # the first, any middles, the last: only the first and last differ
        op0 = self.opcode(0)
        n0 = self.resid if self.resid < mtu else mtu
        n += HEADER_LENGTHS[op0] + n0 + (-n0 & 3)
        if count > 1:
            opl = self.opcode(count - 1)
            nl = min(mtu, self.resid - (count - 1) * mtu)
            n += HEADER_LENGTHS[opl] + nl + (-nl & 3)
            n += (count - 2) * (HEADER_LENGTHS[middle] + mtu)  # mtu is a multiple of 4
        return n + count * FRAMING

    def payload(self, i: int) -> BytesLike:
        """The payload of the run's packet ``i``."""
        pieces = self.pieces
        if pieces is not None:
            return pieces[i]
        data = self.data
        assert data is not None
        mtu = self.mtu
        return memoryview(data)[i * mtu : min(self.resid, (i + 1) * mtu)]

    def packets(self, start: int = 0, stop: int | None = None) -> list[Packet]:
        """The run's packets (``start`` to ``stop``), as the requester sends
        them one by one (rxe_req.c ``init_req_packet``: RETH on a WRITE's
        FIRST / ONLY, ImmDt / IETH and SE on the last, AckReq where
        ``acks`` says, PadCnt from the payload)."""
        out: list[Packet] = []
        first_op, middle_op, last_op, only_op = self.ops
        mtu = self.mtu
        dest_qp = self.dest_qp
        pkey = self.pkey
        acks = self.acks
        resid = self.resid - start * mtu
        psn = (self.psn + start) & 0xFFFFFF
        pieces = self.pieces
        view = None if pieces is not None else memoryview(self.data or b"")
        start_msg = self.offset == 0 and start == 0
        pos = start * mtu
        se = self.se
        is_write = self.is_write
        new = tuple.__new__
        for i in range(start, self.count if stop is None else stop):
            if resid <= mtu:
                n = resid
                end = True
                opcode = only_op if start_msg else last_op
            else:
                n = mtu
                end = False
                opcode = first_op if start_msg else middle_op
            if pieces is not None:
                payload: BytesLike = pieces[i]
            elif n:
                assert view is not None
                payload = view[pos : pos + n]
            else:
                payload = b""
            ack_req = i in acks
            if start_msg or end:
                pkt = edge_packet(
                    opcode,
                    dest_qp,
                    psn,
                    pkey,
                    payload,
                    n,
                    end and se,
                    ack_req,
                    new(Reth, (self.va, self.rkey, resid)) if start_msg and is_write else None,
                    self.imm if end else None,
                    self.inv if end else None,
                )
            else:
                # A MIDDLE packet: BTH and payload only, what build() would
                # make (its pad is 0: the payload is a full MTU).
                bth = new(
                    Bth, (opcode, dest_qp, psn, pkey, False, False, 0, 0, False, False, ack_req)
                )
                pkt = Packet(bth, payload)
            out.append(pkt)
            psn = (psn + 1) & 0xFFFFFF
            pos += n
            resid -= n
            start_msg = False
        return out

    def __repr__(self) -> str:
        return (
            f"<SegRun psn={self.psn:#x} count={self.count} offset={self.offset}"
            f" resid={self.resid} acks={self.acks}>"
        )


BurstItem = Packet | SegRun
"""What a burst carries: single packets and runs, in transmit order."""


class RoceBurst:
    """Consecutive RoCEv2 frames from one port to one address and UDP
    source port, carried by the in-process fabric as one delivery when
    nothing looks at the single frames (segmentation offload; see
    :mod:`softrdma.fabric.inproc`). ``items`` are the packets and runs in
    order — ``frames`` frames, ``nbytes`` bytes encoded; ``ip_id`` is the
    first frame's IPv4 ID, each next frame's one more (mod 2**16);
    ``saddr`` / ``daddr`` packed IPv4 addresses. :meth:`roce_frames` gives
    the frames one by one, exactly as they would have been sent."""

    __slots__ = (
        "daddr",
        "eth_dst",
        "eth_src",
        "frames",
        "ip_id",
        "items",
        "nbytes",
        "saddr",
        "sport",
    )

    def __init__(
        self,
        items: list[BurstItem],
        saddr: bytes,
        daddr: bytes,
        sport: int,
        eth_dst: bytes,
        eth_src: bytes,
        ip_id: int,
        frames: int,
        nbytes: int,
    ) -> None:
        self.items = items
        self.saddr = saddr
        self.daddr = daddr
        self.sport = sport
        self.eth_dst = eth_dst
        self.eth_src = eth_src
        self.ip_id = ip_id
        self.frames = frames
        self.nbytes = nbytes

    def packets(self) -> list[Packet]:
        """Every packet of the burst, runs segmented (:meth:`SegRun.packets`)."""
        out: list[Packet] = []
        for item in self.items:
            if type(item) is SegRun:
                out += item.packets()
            else:
                assert isinstance(item, Packet)
                out.append(item)
        return out

    def roce_frames(self) -> list[RoceFrame]:
        """The burst's frames one by one (rxe_net.c ``prepare4``: DF, TTL
        64, consecutive IPv4 IDs), as the link builds a single frame."""
        ip_id = self.ip_id
        out = []
        for pkt in self.packets():
            frame = RoceFrame(pkt, self.saddr, self.daddr, self.sport, ROCE_V2_UDP_DPORT)
            frame.eth_dst, frame.eth_src, frame.ip_id = self.eth_dst, self.eth_src, ip_id
            out.append(frame)
            ip_id = (ip_id + 1) & 0xFFFF
        return out

    def __repr__(self) -> str:
        return f"<RoceBurst frames={self.frames} items={len(self.items)} nbytes={self.nbytes}>"
