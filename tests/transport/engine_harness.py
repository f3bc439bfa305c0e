"""Two RC engines back to back: a tiny deterministic event loop for tests.

``Pair`` connects QP A (qpn 0x11) and QP B (qpn 0x22), each with its own
:class:`FakeMemory`, and :meth:`Pair.run` moves ``poll()`` packets to the
peer's ``receive()`` — optionally through a seeded :class:`Lossy` channel
(drop / duplicate / reorder) and through the wire codec — advancing ``now``
to the earliest ``next_deadline()`` when nothing else happens.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from softrdma.transport.headers import AethType
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.rc import RcQp
from softrdma.transport.wqe import Completion, CqSide, QpEvent, QpFatal, SendWqe
from softrdma.verbs.ah import AhAttr
from softrdma.verbs.enums import (
    IbAccess,
    IbMtu,
    IbQpAttrMask,
    IbQpState,
    IbSendFlags,
    IbWcOpcode,
    IbWcStatus,
)
from softrdma.verbs.qp import QpAttr
from softrdma.verbs.wr import RecvWR, SendWR, WorkCompletion

from .fakemem import FakeMemory

QPN_A = 0x11
QPN_B = 0x22
REMOTE_ALL = IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ | IbAccess.REMOTE_ATOMIC


@dataclass
class Lossy:
    """A seeded faulty link: each packet is dropped with ``drop``, sent twice
    with ``dup``; a batch is shuffled with ``reorder``; ``hold`` delays a
    packet to the next batch (reordering across batches)."""

    rng: random.Random
    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    hold: float = 0.0
    dropped: int = 0
    held: list[Packet] = field(default_factory=list)

    def __call__(self, pkts: list[Packet]) -> list[Packet]:
        out: list[Packet] = self.held
        self.held = []
        rng = self.rng
        for p in pkts:
            if self.drop and rng.random() < self.drop:
                self.dropped += 1
                continue
            if self.hold and rng.random() < self.hold:
                self.held.append(p)
                continue
            out.append(p)
            if self.dup and rng.random() < self.dup:
                out.append(p)
        if self.reorder and len(out) > 1 and rng.random() < self.reorder:
            rng.shuffle(out)
        return out


Channel = Callable[[list[Packet]], list[Packet]]


@dataclass
class DropWhen:
    """Drop packets matching ``pred`` — the first ``times`` of them (all if
    ``times`` is None); everything else passes in order."""

    pred: Callable[[Packet], bool]
    times: int | None = 1
    dropped: list[Packet] = field(default_factory=list)

    def __call__(self, pkts: list[Packet]) -> list[Packet]:
        out = []
        for p in pkts:
            if self.pred(p) and (self.times is None or len(self.dropped) < self.times):
                self.dropped.append(p)
            else:
                out.append(p)
        return out


ALL_ATTRS = IbQpAttrMask(sum(IbQpAttrMask))
"""Every attribute: the engines take what the mask selects."""


def attr_for(dest: int, *, path_mtu: int = 1024, **kw: Any) -> QpAttr:
    """The attributes of an RC QP talking to QP ``dest``, as the verbs layer
    would have validated them; ``path_mtu`` in bytes, the rest by name."""
    attr = QpAttr(
        dest_qp_num=dest,
        path_mtu=IbMtu.from_size(path_mtu),
        ah_attr=AhAttr(dgid=bytes(16)),
        timeout=14,
        retry_cnt=7,
        rnr_retry=7,
        min_rnr_timer=1,
        max_rd_atomic=4,
        max_dest_rd_atomic=4,
        qp_access_flags=REMOTE_ALL,
    )
    for name, value in kw.items():
        setattr(attr, name, value)
    return attr


def to_state(qp: Any, attr: QpAttr, state: IbQpState) -> None:
    """``ib_modify_qp`` to ``state`` with every attribute of ``attr``."""
    a = copy.copy(attr)
    a.qp_state = state
    qp.modify(a, ALL_ATTRS)


def connect(qp: RcQp, attr: QpAttr) -> None:
    """RESET → INIT → RTR → RTS as ib_modify_qp would."""
    for st in (IbQpState.INIT, IbQpState.RTR, IbQpState.RTS):
        to_state(qp, attr, st)


class Pair:
    """Two connected RC QPs with fake memories and a pump."""

    def __init__(
        self,
        *,
        mtu: int = 1024,
        psn_a: int = 0x100,
        psn_b: int = 0x200,
        a_kw: dict[str, Any] | None = None,
        b_kw: dict[str, Any] | None = None,
        ab: Channel | None = None,
        ba: Channel | None = None,
        wire: bool = False,
    ) -> None:
        self.mem_a = FakeMemory()
        self.mem_b = FakeMemory()
        a_kw = dict(a_kw or {})
        b_kw = dict(b_kw or {})
        self.a = RcQp(QPN_A, self.mem_a, sq_sig_all=a_kw.pop("sq_sig_all", True))
        self.b = RcQp(QPN_B, self.mem_b, sq_sig_all=b_kw.pop("sq_sig_all", True))
        self.pa = attr_for(QPN_B, path_mtu=mtu, sq_psn=psn_a, rq_psn=psn_b, **a_kw)
        self.pb = attr_for(QPN_A, path_mtu=mtu, sq_psn=psn_b, rq_psn=psn_a, **b_kw)
        connect(self.a, self.pa)
        connect(self.b, self.pb)
        self.ab = ab
        self.ba = ba
        self.wire = wire
        self.now = 0.0
        self.comps_a: list[Completion] = []
        self.comps_b: list[Completion] = []
        self.events_a: list[QpEvent] = []
        self.events_b: list[QpEvent] = []
        self.sent_a: list[Packet] = []
        self.sent_b: list[Packet] = []
        self.log: list[tuple[float, str, Packet]] = []  # (time, sender, packet)
        self.wr_id = 0
        self.n_send_a = 0
        self.n_recv_b = 0

    # -- convenience ------------------------------------------------------------

    def send_wcs(self, side: str = "a") -> list[WorkCompletion]:
        comps = self.comps_a if side == "a" else self.comps_b
        return [c.wc for c in comps if c.side is CqSide.SEND]

    def recv_wcs(self, side: str = "b") -> list[WorkCompletion]:
        comps = self.comps_a if side == "a" else self.comps_b
        return [c.wc for c in comps if c.side is CqSide.RECV]

    def post(self, wr: SendWR, side: str = "a", inline: bytes | None = None) -> None:
        rc = self.a if side == "a" else self.b
        rc.post_send(SendWqe.from_wr(wr, sq_sig_all=rc.sq_sig_all, inline_data=inline))

    def post_recv(self, wr: RecvWR, side: str = "b") -> None:
        (self.a if side == "a" else self.b).post_recv(wr)

    def next_id(self) -> int:
        self.wr_id += 1
        return self.wr_id

    # -- the pump ---------------------------------------------------------------

    def step(self) -> bool:
        """One round: poll both, deliver. True if anything happened."""
        now = self.now
        oa = self.a.poll(now)
        ob = self.b.poll(now)
        for c in oa.completions:
            self.n_send_a += c.side is CqSide.SEND
        for c in ob.completions:
            self.n_recv_b += c.side is CqSide.RECV
        self.comps_a += oa.completions
        self.comps_b += ob.completions
        self.events_a += oa.events
        self.events_b += ob.events
        pa = [p.pkt for p in oa.packets]
        pb = [p.pkt for p in ob.packets]
        self.sent_a += pa
        self.sent_b += pb
        self.log += [(now, "a", p) for p in pa]
        self.log += [(now, "b", p) for p in pb]
        if self.wire:
            pa = [Packet.decode(p.encode()) for p in pa]
            pb = [Packet.decode(p.encode()) for p in pb]
        held = bool(self.ab and getattr(self.ab, "held", None)) or bool(
            self.ba and getattr(self.ba, "held", None)
        )
        if self.ab is not None:
            pa = self.ab(pa)
        if self.ba is not None:
            pb = self.ba(pb)
        for p in pa:
            self.b.receive(p, now)
        for p in pb:
            self.a.receive(p, now)
        return bool(oa or ob or pa or pb or held)

    def run(
        self,
        until: Callable[[], bool] | None = None,
        *,
        max_time: float = 3600.0,
        max_steps: int = 1_000_000,
    ) -> None:
        """Pump until idle with no timer left, ``until()`` holds, or limits."""
        for _ in range(max_steps):
            busy = self.step()
            if until is not None and until():
                return
            if busy:
                continue
            deadlines = [
                d for d in (self.a.next_deadline(), self.b.next_deadline()) if d is not None
            ]
            if not deadlines:
                return
            self.now = max(self.now, min(deadlines))
            if self.now > max_time:
                return
        raise AssertionError("pump did not settle")

    def run_until_completions(self, n_send: int, n_recv: int = 0, **kw: Any) -> None:
        def done() -> bool:
            return self.n_send_a >= n_send and self.n_recv_b >= n_recv

        self.run(done, **kw)
        # Let trailing ACKs / events settle.
        for _ in range(4):
            self.step()


def ok(wc: WorkCompletion, opcode: IbWcOpcode | None = None) -> bool:
    return wc.status is IbWcStatus.SUCCESS and (opcode is None or wc.opcode is opcode)


# -- helpers for checking what the engines did ------------------------------------------

MTUS = (256, 512, 1024, 2048, 4096)
SIGNALED = IbSendFlags.SIGNALED


MTUS = (256, 512, 1024, 2048, 4096)
SIGNALED = IbSendFlags.SIGNALED


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def opnames(pkts: list[Packet]) -> list[str]:
    return [Opcode(p.bth.opcode).name.removeprefix("RC_") for p in pkts]


def naks(pkts: list[Packet]) -> list[tuple[AethType, int, int]]:
    """(type, value, psn) of every non-ACK AETH among ACKNOWLEDGE packets."""
    out: list[tuple[AethType, int, int]] = []
    for p in pkts:
        if p.bth.opcode == Opcode.RC_ACKNOWLEDGE and p.aeth is not None:
            kind = AethType(p.aeth.syndrome >> 5)
            if kind is not AethType.ACK:
                out.append((kind, p.aeth.syndrome & 0x1F, p.bth.psn))
    return out


def fatal_events(events: list[Any]) -> list[QpFatal]:
    return [e for e in events if isinstance(e, QpFatal)]


def wc_ok(wc: WorkCompletion, opcode: IbWcOpcode) -> None:
    assert wc.status is IbWcStatus.SUCCESS, str(wc)
    assert wc.opcode is opcode, str(wc)
