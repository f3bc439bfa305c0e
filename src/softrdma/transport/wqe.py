"""Send work queue entries and what the transport engines hand back.

Kernel counterparts: ``struct rxe_send_wqe`` and ``enum wqe_state``
(``drivers/infiniband/sw/rxe/rxe_verbs.h``, ``include/uapi/rdma/rdma_user_rxe.h``),
``wr_opcode_mask()`` / ``rxe_wr_opcode_info[]`` (``rxe_opcode.c``),
``validate_send_wr()`` (``rxe_verbs.c``), ``wr_to_wc_opcode()``
(``rxe_comp.c``).

The engines are sans-IO: a device feeds them work requests, packets and the
time, and takes back an :class:`Output` — packets to put on the wire
(:class:`OutPacket`, with a :class:`UdDest` for UD), work completions
(:class:`Completion`, tagged with the CQ they belong to) and QP events
(:class:`QpFatal`, :class:`SqDrained`).
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from softrdma.transport.burst import SegRun
from softrdma.transport.memory_port import LocalSgl
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.verbs.enums import (
    IbEventType,
    IbQpType,
    IbSendFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.wr import (
    AtomicWR,
    AtomicWriteWR,
    BindMwWR,
    FlushWR,
    RdmaWR,
    RegWR,
    SendWR,
    UdWR,
    WorkCompletion,
)

__all__ = [
    "WQE_DONE",
    "WQE_ERROR",
    "WQE_PENDING",
    "WQE_POSTED",
    "WQE_PROCESSING",
    "WR_ATOMIC",
    "WR_ATOMIC_WRITE",
    "WR_FLUSH",
    "WR_IMM",
    "WR_INV",
    "WR_LOCAL",
    "WR_OPCODE_INFO",
    "WR_READ",
    "WR_RESPONSE",
    "WR_SEND",
    "WR_WRITE",
    "Completion",
    "CqSide",
    "LastWqeReached",
    "OutPacket",
    "Output",
    "QpEvent",
    "QpFatal",
    "SendWqe",
    "SqDrained",
    "SrqLimitReached",
    "UdDest",
    "WqeState",
    "WrOpcodeInfo",
    "check_send_wr",
    "wr_to_wc_opcode",
]


class WqeState(enum.IntEnum):
    """Progress of a send WQE (rxe ``enum wqe_state``).

    ======== ================================================================
    POSTED   queued; the requester has not started it (or rewound it for a
             retry). requester → PROCESSING / PENDING / DONE / ERROR
    PROCESSING  some but not all request packets sent. requester → PENDING
    PENDING  every request packet sent; waiting for the ACK / response.
             completer → retired; req_retry → POSTED
    DONE     finished without an ACK (local operation, UD send); the
             completer retires it in order
    ERROR    failed locally (``status`` says why); the completer reports it
             in order and moves the QP to ERR
    ======== ================================================================
    """

    POSTED = 0
    PROCESSING = 1
    PENDING = 2
    DONE = 3
    ERROR = 4


# The states as module names for the per-packet paths: reading an enum
# member as a class attribute costs ~80 ns in CPython 3.11, a global ~10.
WQE_POSTED = WqeState.POSTED
WQE_PROCESSING = WqeState.PROCESSING
WQE_PENDING = WqeState.PENDING
WQE_DONE = WqeState.DONE
WQE_ERROR = WqeState.ERROR


# WR classification bits (rxe_opcode.c rxe_wr_opcode_info[].mask, WR_*_MASK).
WR_SEND = 1 << 0
WR_WRITE = 1 << 1
WR_READ = 1 << 2
WR_ATOMIC = 1 << 3
WR_LOCAL = 1 << 4
WR_IMM = 1 << 5
WR_INV = 1 << 6
WR_FLUSH = 1 << 7
WR_ATOMIC_WRITE = 1 << 8
_A19 = WR_FLUSH | WR_ATOMIC_WRITE
WR_RESPONSE = WR_READ | WR_ATOMIC | WR_FLUSH | WR_ATOMIC_WRITE
"""WQEs that only a response completes (READ RESPONSE / ATOMIC ACKNOWLEDGE),
never a plain ACK, and that hold one of the ``max_rd_atomic`` credits: the
responder answers them from its ``max_dest_rd_atomic`` resources."""

_RC = frozenset({IbQpType.RC})
_RC_UC = frozenset({IbQpType.RC, IbQpType.UC})
_RC_UC_UD = frozenset({IbQpType.RC, IbQpType.UC, IbQpType.UD, IbQpType.GSI})
_NO_OPS = (-1, -1, -1, -1)


@dataclass(frozen=True, slots=True)
class WrOpcodeInfo:
    """One row of :data:`WR_OPCODE_INFO` (rxe_opcode.c ``struct
    rxe_wr_opcode_info``): what a send work request opcode is.

    ``mask`` — its ``WR_*`` classification bits; ``qp_types`` — the QP types
    that may post it (rxe: a zero mask for the type); ``wr_class`` — the
    work request structure it needs (``ib_rdma_wr``, ``ib_atomic_wr``,
    ``ib_reg_wr``; UD QPs always need ``ib_ud_wr``); ``rc_ops`` — its RC
    wire opcodes as (FIRST, MIDDLE, LAST, ONLY), the table form of rxe_req.c
    ``next_opcode_rc`` (READ and atomics are one request packet);
    ``wc_opcode`` — its completion opcode (rxe_comp.c ``wr_to_wc_opcode``).
    """

    mask: int
    qp_types: frozenset[IbQpType]
    wr_class: type[SendWR]
    rc_ops: tuple[int, int, int, int]
    wc_opcode: IbWcOpcode


WR_OPCODE_INFO: dict[IbWrOpcode, WrOpcodeInfo] = {
    IbWrOpcode.SEND: WrOpcodeInfo(
        WR_SEND, _RC_UC_UD, SendWR,
        (Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE, Opcode.RC_SEND_LAST, Opcode.RC_SEND_ONLY),
        IbWcOpcode.SEND,
    ),
    IbWrOpcode.SEND_WITH_IMM: WrOpcodeInfo(
        WR_SEND | WR_IMM, _RC_UC_UD, SendWR,
        (Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE, Opcode.RC_SEND_LAST_WITH_IMMEDIATE,
         Opcode.RC_SEND_ONLY_WITH_IMMEDIATE),
        IbWcOpcode.SEND,
    ),
    IbWrOpcode.SEND_WITH_INV: WrOpcodeInfo(
        WR_SEND | WR_INV, _RC, SendWR,
        (Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE, Opcode.RC_SEND_LAST_WITH_INVALIDATE,
         Opcode.RC_SEND_ONLY_WITH_INVALIDATE),
        IbWcOpcode.SEND,
    ),
    IbWrOpcode.RDMA_WRITE: WrOpcodeInfo(
        WR_WRITE, _RC_UC, RdmaWR,
        (Opcode.RC_RDMA_WRITE_FIRST, Opcode.RC_RDMA_WRITE_MIDDLE, Opcode.RC_RDMA_WRITE_LAST,
         Opcode.RC_RDMA_WRITE_ONLY),
        IbWcOpcode.RDMA_WRITE,
    ),
    IbWrOpcode.RDMA_WRITE_WITH_IMM: WrOpcodeInfo(
        WR_WRITE | WR_IMM, _RC_UC, RdmaWR,
        (Opcode.RC_RDMA_WRITE_FIRST, Opcode.RC_RDMA_WRITE_MIDDLE,
         Opcode.RC_RDMA_WRITE_LAST_WITH_IMMEDIATE, Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE),
        IbWcOpcode.RDMA_WRITE,
    ),
    IbWrOpcode.RDMA_READ: WrOpcodeInfo(
        WR_READ, _RC, RdmaWR, (Opcode.RC_RDMA_READ_REQUEST,) * 4, IbWcOpcode.RDMA_READ
    ),
    IbWrOpcode.ATOMIC_CMP_AND_SWP: WrOpcodeInfo(
        WR_ATOMIC, _RC, AtomicWR, (Opcode.RC_COMPARE_SWAP,) * 4, IbWcOpcode.COMP_SWAP
    ),
    IbWrOpcode.ATOMIC_FETCH_AND_ADD: WrOpcodeInfo(
        WR_ATOMIC, _RC, AtomicWR, (Opcode.RC_FETCH_ADD,) * 4, IbWcOpcode.FETCH_ADD
    ),
    # IBTA annex A19 (rxe_opcode.c): one request packet each, answered with
    # an RDMA READ RESPONSE ONLY without payload.
    IbWrOpcode.FLUSH: WrOpcodeInfo(
        WR_FLUSH, _RC, FlushWR, (Opcode.RC_FLUSH,) * 4, IbWcOpcode.FLUSH
    ),
    IbWrOpcode.ATOMIC_WRITE: WrOpcodeInfo(
        WR_ATOMIC_WRITE, _RC, AtomicWriteWR, (Opcode.RC_ATOMIC_WRITE,) * 4,
        IbWcOpcode.ATOMIC_WRITE,
    ),
    IbWrOpcode.LOCAL_INV: WrOpcodeInfo(WR_LOCAL, _RC_UC, SendWR, _NO_OPS, IbWcOpcode.LOCAL_INV),
    IbWrOpcode.REG_MR: WrOpcodeInfo(WR_LOCAL, _RC_UC, RegWR, _NO_OPS, IbWcOpcode.REG_MR),
    IbWrOpcode.BIND_MW: WrOpcodeInfo(WR_LOCAL, _RC_UC, BindMwWR, _NO_OPS, IbWcOpcode.BIND_MW),
}  # fmt: skip
"""Every send opcode, as rxe's ``rxe_wr_opcode_info[]``: the one table the
driver validates with and the engines build packets and completions from."""
_SIGNALED = int(IbSendFlags.SIGNALED)
MAX_FLUSH_LEN = (1 << 32) - 1
"""The RETH DMA length of a FLUSH is 32 bits."""


def wr_to_wc_opcode(opcode: IbWrOpcode) -> IbWcOpcode:
    """The completion opcode of a send WR opcode (rxe_comp.c ``wr_to_wc_opcode``)."""
    return WR_OPCODE_INFO[opcode].wc_opcode


def check_send_wr(wr: SendWR, qp_type: IbQpType) -> str | None:
    """Why ``wr`` cannot be posted on a QP of ``qp_type``, or None
    (rxe_verbs.c ``validate_send_wr``: the opcode's mask for the QP type,
    the work request's structure, an atomic's one 8-byte SGE)."""
    info = WR_OPCODE_INFO.get(wr.opcode)
    if info is None or qp_type not in info.qp_types:
        return f"{getattr(wr.opcode, 'name', wr.opcode)} is not valid on a {qp_type.name} QP"
    if qp_type is IbQpType.UD or qp_type is IbQpType.GSI:
        if not isinstance(wr, UdWR) or wr.ah is None:
            return "a UD send needs a UdWR with an address handle"
    elif not isinstance(wr, info.wr_class):
        return f"{wr.opcode.name} needs an {info.wr_class.__name__}"
    if info.mask & WR_ATOMIC and (len(wr.sg_list) != 1 or wr.sg_list[0].length != 8):
        return "an atomic needs one 8-byte SGE for the original value"
    if info.mask & _A19:  # (the wr_class check above made the types sure)
        return _check_a19(wr)
    if isinstance(wr, RegWR) and wr.mr is None:
        return "REG_MR needs a RegWR with an MR"
    if isinstance(wr, BindMwWR) and wr.mw is None:
        return "BIND_MW needs a BindMwWR with an MW"
    return None


def _check_a19(wr: SendWR) -> str | None:
    """A FLUSH's FETH values and length, an ATOMIC WRITE's 8 bytes."""
    if isinstance(wr, FlushWR):
        # ib_user_verbs.h enum ib_placement_type / ib_selectivity_level.
        if not isinstance(wr.placement_type, int) or not 0 < wr.placement_type <= 3:
            return f"FLUSH placement type {wr.placement_type!r} is not GLOBAL and/or PERSISTENT"
        if wr.level not in (0, 1):
            return f"FLUSH selectivity level {wr.level!r} is not RANGE or MR"
        if not isinstance(wr.flush_len, int) or not 0 <= wr.flush_len <= MAX_FLUSH_LEN:
            return f"FLUSH length {wr.flush_len!r} does not fit the RETH"
    elif isinstance(wr, AtomicWriteWR) and (
        not isinstance(wr.atomic_wr, bytes | bytearray) or len(wr.atomic_wr) != 8
    ):
        return "ATOMIC WRITE carries exactly 8 bytes"
    return None


class SendWqe:
    """One send queue entry (rxe ``struct rxe_send_wqe``): the work request,
    whether it produces a completion on success, inline data captured at
    post time, and the engines' progress through it.

    Built by the device in ``post_send`` with :meth:`from_wr`; the engine
    owns it afterwards. Progress fields (rxe names in brackets):

    * ``state`` / ``status`` — :class:`WqeState` and the completion status;
    * ``first_psn`` / ``last_psn`` — PSNs the message occupies (a READ
      reserves one per response packet);
    * ``resid`` [``dma.resid``] — bytes still to send (SEND/WRITE) or still
      requested (READ: the DMA length of the next READ request);
    * ``offset`` [``dma.sge_offset``] — bytes already taken from the SGE list
      (SEND/WRITE) or already received into it (READ);
    * ``iova`` — remote address of the next byte (WRITE/READ/atomic);
    * ``has_rd_atomic`` — holds one of the ``max_rd_atomic`` credits;
    * ``started`` — the requester has begun it (a retry rewinds ``state`` but
      not this); SQD lets only started WQEs run to completion;
    * ``sgl`` — the SGE list translated by the first engine to touch it (the
      requester gathering a SEND / WRITE, the completer scattering a READ
      response), kept for every packet and for retries: rxe's ``copy_data``
      does that translation for each packet.
    """

    __slots__ = (
        "first_psn",
        "has_rd_atomic",
        "inline_data",
        "iova",
        "last_psn",
        "length",
        "mask",
        "offset",
        "opcode",
        "ops",
        "remote_addr",
        "resid",
        "rkey",
        "send_flags",
        "sgl",
        "signaled",
        "started",
        "state",
        "status",
        "wc_opcode",
        "wr",
    )

    def __init__(self, wr: SendWR, signaled: bool = True, inline_data: bytes | None = None) -> None:
        self.wr = wr
        self.signaled = signaled
        self.inline_data = inline_data
        self.opcode = wr.opcode
        self.send_flags = int(wr.send_flags)  # a plain int: IntFlag ops are slow
        info = WR_OPCODE_INFO[wr.opcode]
        self.mask = info.mask
        self.ops = info.rc_ops
        self.wc_opcode = info.wc_opcode
        self.length = len(inline_data) if inline_data is not None else wr.length
        if isinstance(wr, RdmaWR | AtomicWR):
            self.remote_addr = wr.remote_addr
            self.rkey = wr.rkey
        elif self.mask & _A19 and isinstance(wr, FlushWR | AtomicWriteWR):
            self.remote_addr = wr.remote_addr
            self.rkey = wr.rkey
            # rxe: the WQE's dma.length is the FLUSH length (the RETH's; no
            # payload, oA19-2) or the 8 bytes; byte_len reports it.
            self.length = wr.flush_len if isinstance(wr, FlushWR) else 8
        else:
            self.remote_addr = 0
            self.rkey = 0
        self.state = WqeState.POSTED
        self.status = IbWcStatus.SUCCESS
        self.first_psn = 0
        self.last_psn = 0
        self.resid = self.length
        self.offset = 0
        self.iova = self.remote_addr
        self.has_rd_atomic = False
        self.started = False
        self.sgl: LocalSgl | None = None

    @classmethod
    def from_wr(
        cls, wr: SendWR, *, sq_sig_all: bool = False, inline_data: bytes | None = None
    ) -> SendWqe:
        """A WQE for ``wr`` as ``rxe_post_send`` → ``init_send_wqe`` builds it:
        signaled if the WR asks (``IB_SEND_SIGNALED``) or the QP signals all;
        ``inline_data`` is the SGE bytes the device copied at post time for an
        ``IB_SEND_INLINE`` WR (the consumer may reuse its buffers at once)."""
        signaled = sq_sig_all or bool(int(wr.send_flags) & _SIGNALED)
        return cls(wr, signaled, inline_data)

    def reset_progress(self) -> None:
        """Rewind to the start of the message (rxe_req.c ``req_retry``)."""
        self.resid = self.length
        self.offset = 0
        self.iova = self.remote_addr

    def __repr__(self) -> str:
        return (
            f"SendWqe(wr_id={self.wr.wr_id:#x}, {self.opcode.name}, {self.state.name}, "
            f"psn={self.first_psn:#x}..{self.last_psn:#x}, resid={self.resid})"
        )


class CqSide(enum.Enum):
    """Which CQ a completion goes to: the QP's send CQ or its receive CQ."""

    SEND = "send"
    RECV = "recv"


class Completion(NamedTuple):
    """A work completion for the send or the receive CQ. ``solicited`` is the
    BTH SE bit of the message that completed a receive (``rxe_cq_post``'s
    ``solicited`` argument, for ``IB_CQ_SOLICITED`` notification)."""

    side: CqSide
    wc: WorkCompletion
    solicited: bool = False


class UdDest(NamedTuple):
    """Where a UD packet goes: the WR (``wr.ah`` is the address handle with
    the destination GID), the remote QPN and the Q_Key actually sent (the
    QP's own when the WR's has the high bit set)."""

    wr: UdWR
    remote_qpn: int
    qkey: int


class OutPacket(NamedTuple):
    """A packet to transmit. RC packets go to the QP's connected peer
    (``dest`` is ``None``); UD packets carry a :class:`UdDest`.

    With segmentation offload on (:attr:`RcQp.offload
    <softrdma.transport.rc.RcQp.offload>`, which only a driver that handles
    runs turns on) an RC requester hands on several packets of a message
    as one entry: ``run`` is their :class:`~softrdma.transport.burst.SegRun`
    and ``pkt`` its first packet."""

    pkt: Packet
    dest: UdDest | None = None
    run: SegRun | None = None


@dataclass(frozen=True, slots=True)
class QpFatal:
    """The QP hit an error that moves it to ERR (rxe ``rxe_qp_error``).

    ``status`` is the completion status that reported it, ``event`` the
    affiliated asynchronous event (``IB_EVENT_QP_FATAL``, or
    ``IB_EVENT_QP_REQ_ERR`` / ``IB_EVENT_QP_ACCESS_ERR`` for a responder
    that NAKed an invalid request / access violation). The device moves the
    QP to ERR and calls ``flush()``."""

    status: IbWcStatus
    reason: str
    event: IbEventType = IbEventType.QP_FATAL


@dataclass(frozen=True, slots=True)
class SqDrained:
    """In SQD every WQE that was started has completed
    (``IB_EVENT_SQ_DRAINED``)."""


@dataclass(frozen=True, slots=True)
class SrqLimitReached:
    """Taking a WQE left the shared receive queue ``srqn`` below its armed
    limit (``IB_EVENT_SRQ_LIMIT_REACHED``; rxe_resp.c ``get_srq_wqe``)."""

    srqn: int


@dataclass(frozen=True, slots=True)
class LastWqeReached:
    """A QP attached to an SRQ entered ERR: no more receive WQEs will be
    taken for it (``IB_EVENT_QP_LAST_WQE_REACHED``, IBTA 11.6.3.4)."""


QpEvent = QpFatal | SqDrained | SrqLimitReached | LastWqeReached


@dataclass(slots=True)
class Output:
    """What one :meth:`poll` hands back: packets to transmit now, completions
    and events, each in the order they happened."""

    packets: list[OutPacket] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    events: list[QpEvent] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)
    """rxe's ``hw_counters`` the engines bump (``completer_retry_err``,
    ``rcvd_seq_err``, ``duplicate_request``, ...); usually the device's own
    counter, shared by all its QPs, and never reset by :meth:`take`."""

    _empty: Output | None = field(default=None, repr=False, compare=False)
    """What :meth:`take` hands out when nothing was gathered."""

    def __bool__(self) -> bool:
        return bool(self.packets or self.completions or self.events)

    def take(self) -> Output:
        """Hand over everything gathered so far and start empty again (the
        engines keep one :class:`Output` and fill it as they run). Most polls
        gather nothing (a responder is polled for every packet and ACKs one
        in 64): they all get the same empty :class:`Output`, not new ones."""
        packets, completions, events = self.packets, self.completions, self.events
        if not (packets or completions or events):
            empty = self._empty
            if empty is None or empty.packets or empty.completions or empty.events:
                empty = self._empty = Output(counters=self.counters)  # (never a filled one)
            return empty
        self.packets, self.completions, self.events = [], [], []
        return Output(packets, completions, events, self.counters)
