"""Two RC engines back to back: a tiny deterministic event loop for tests.

``Pair`` connects QP A (qpn 0x11) and QP B (qpn 0x22), each with its own
:class:`FakeMemory`, and :meth:`Pair.run` moves ``poll()`` packets to the
peer's ``receive()`` — optionally through a seeded :class:`Lossy` channel
(drop / duplicate / reorder) and through the wire codec — advancing ``now``
to the earliest ``next_deadline()`` when nothing else happens.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from softrdma.transport.packet import Packet
from softrdma.transport.params import QpParams
from softrdma.transport.rc import RcTransport
from softrdma.transport.wqe import Completion, CqSide, QpEvent, SendWqe
from softrdma.verbs.enums import IbAccess, IbQpState, IbWcOpcode, IbWcStatus
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


def params_for(qpn: int, dest: int, **kw: Any) -> QpParams:
    base = QpParams(
        qpn,
        dest_qpn=dest,
        path_mtu=1024,
        timeout=14,
        retry_cnt=7,
        rnr_retry=7,
        min_rnr_timer=1,
        max_rd_atomic=4,
        max_dest_rd_atomic=4,
        qp_access_flags=REMOTE_ALL,
    )
    return replace(base, **kw)


def connect(rc: RcTransport, params: QpParams) -> None:
    """RESET → INIT → RTR → RTS as ib_modify_qp would."""
    for st in (IbQpState.INIT, IbQpState.RTR, IbQpState.RTS):
        rc.modify(params, st)


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
        self.a = RcTransport(QPN_A, self.mem_a)
        self.b = RcTransport(QPN_B, self.mem_b)
        self.pa = params_for(QPN_A, QPN_B, path_mtu=mtu, sq_psn=psn_a, rq_psn=psn_b, **(a_kw or {}))
        self.pb = params_for(QPN_B, QPN_A, path_mtu=mtu, sq_psn=psn_b, rq_psn=psn_a, **(b_kw or {}))
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
        params = self.pa if side == "a" else self.pb
        rc.post_send(SendWqe.from_wr(wr, sq_sig_all=params.sq_sig_all, inline_data=inline))

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
