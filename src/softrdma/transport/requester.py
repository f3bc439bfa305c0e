"""The RC requester: turns send WQEs into request packets.

Kernel counterpart: ``drivers/infiniband/sw/rxe/rxe_req.c`` (``rxe_requester``,
``req_next_wqe``, ``next_opcode_rc``, ``check_init_depth``,
``init_req_packet``, ``finish_packet``, ``update_wqe_state``,
``update_wqe_psn``, ``update_state``, ``req_retry``,
``retry_first_write_send``, ``rxe_do_local_ops``, ``rxe_wqe_is_fenced``,
``rnr_nak_timer``).

The requester owns the send queue. It walks it from ``wqe_index``, starts
each WQE in order and segments SEND / RDMA WRITE into FIRST / MIDDLE* /
LAST or ONLY packets of exactly ``path_mtu`` payload (the last carries the
rest); an RDMA READ request reserves one PSN per response packet it will
get, an atomic one PSN. The completer (``completer.py``) retires WQEs from
``sq_head`` as ACKs and responses arrive, and asks for a retry by setting
``need_retry``; the requester then rewinds to the oldest unacknowledged PSN
(go-back-N).

Flow control, as rxe:

* at most :data:`MAX_UNACKED_PSNS` PSNs outstanding (``RXE_MAX_UNACKED_PSNS``);
* at most ``max_rd_atomic`` READ / atomic WQEs outstanding (``rd_atomic``
  credits, ``check_init_depth``);
* AckReq on the last packet of a message and at least every
  :data:`MAX_PKT_PER_ACK` packets (``RXE_MAX_PKT_PER_ACK``);
* ``IB_SEND_FENCE`` waits for every earlier READ / atomic, LOCAL_INV for
  every earlier WQE (``rxe_wqe_is_fenced``).

QP-level state (:class:`ReqState`, rxe ``qp->req.state``)::

    RESET  --modify INIT-->  INIT   (RTR also keeps the requester in INIT)
    INIT   --modify RTS--->  READY  (PSN := sq_psn, credits := max_rd_atomic)
    READY  --modify SQD--->  DRAIN  (no new WQE is started)
    DRAIN  --all started WQEs completed-->  DRAINED  (SqDrained event)
    DRAIN / DRAINED  --modify RTS-->  READY
    any    --modify ERR or a fatal completion-->  ERROR
    any    --modify RESET-->  RESET
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from softrdma.transport.headers import AtomicEth, Ieth, ImmDt, Reth
from softrdma.transport.memory_port import LocalAccessError, MemoryPort
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.params import QpParams
from softrdma.transport.psn import PSN_MASK
from softrdma.transport.wqe import (
    WR_ATOMIC,
    WR_IMM,
    WR_INV,
    WR_LOCAL,
    WR_READ,
    WR_SEND,
    WR_WRITE,
    OutPacket,
    Output,
    SendWqe,
    WqeState,
)
from softrdma.verbs.enums import IbSendFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.wr import AtomicWR, RegWR

if TYPE_CHECKING:
    from softrdma.transport.completer import Completer

__all__ = [
    "MAX_MSG_SIZE",
    "MAX_PKT_PER_ACK",
    "MAX_UNACKED_PSNS",
    "REQ_TRANSITIONS",
    "ReqState",
    "Requester",
]

MAX_UNACKED_PSNS = 128
"""rxe_param.h ``RXE_MAX_UNACKED_PSNS``: the requester stops starting packets
when this many PSNs are unacknowledged."""
MAX_PKT_PER_ACK = 64
"""rxe_param.h ``RXE_MAX_PKT_PER_ACK``: AckReq at least every this many packets."""
MAX_MSG_SIZE = 1 << 31
"""IBTA's largest message (rxe_param.h ``RXE_MAX_MSG_SIZE``); longer WRs fail
with ``IB_WC_LOC_LEN_ERR``."""

_POSTED, _PROCESSING, _PENDING, _DONE, _ERROR = (
    WqeState.POSTED,
    WqeState.PROCESSING,
    WqeState.PENDING,
    WqeState.DONE,
    WqeState.ERROR,
)
_tuple_new = tuple.__new__
_FENCE = int(IbSendFlags.FENCE)
_SOLICITED = int(IbSendFlags.SOLICITED)


class ReqState(enum.IntEnum):
    """The requester's QP-level state (rxe ``enum rxe_qp_state`` in
    ``qp->req.state``); see the module docstring for the transitions."""

    RESET = 0
    INIT = 1
    READY = 2
    DRAIN = 3
    DRAINED = 4
    ERROR = 5


REQ_TRANSITIONS: dict[ReqState, frozenset[ReqState]] = {
    ReqState.RESET: frozenset({ReqState.RESET, ReqState.INIT, ReqState.ERROR}),
    ReqState.INIT: frozenset({ReqState.RESET, ReqState.INIT, ReqState.READY, ReqState.ERROR}),
    ReqState.READY: frozenset({ReqState.RESET, ReqState.READY, ReqState.DRAIN, ReqState.ERROR}),
    ReqState.DRAIN: frozenset(
        {ReqState.RESET, ReqState.DRAIN, ReqState.DRAINED, ReqState.READY, ReqState.ERROR}
    ),
    ReqState.DRAINED: frozenset({ReqState.RESET, ReqState.DRAINED, ReqState.READY, ReqState.ERROR}),
    ReqState.ERROR: frozenset({ReqState.RESET, ReqState.ERROR}),
}
"""Allowed requester state changes (the verbs layer has already checked the
QP state machine, ``ib_modify_qp_is_ok``; this documents and asserts the
engine's view of it)."""


class Requester:
    """The send side of one RC QP (rxe ``qp->req`` and the send queue).

    Shared with the completer: ``sq`` / ``sq_head`` (the completer's consumer
    index), ``psn``, ``need_retry``, ``wait_for_rnr_timer``, the
    ``rd_atomic`` credits and the two timers (``retrans_deadline``,
    ``rnr_deadline``; absolute simulated time or ``None``).
    """

    def __init__(self, qpn: int, mem: MemoryPort, out: Output) -> None:
        self.qpn = qpn
        self.mem = mem
        self.out = out
        self.params = QpParams(qpn)
        self.comp: Completer  # set by the transport right after construction
        self.state = ReqState.RESET
        self.sq: list[SendWqe] = []
        self.sq_head = 0  # oldest WQE not yet completed (rxe: queue consumer)
        self.wqe_index = 0  # next WQE to work on (rxe: qp->req.wqe_index)
        self.psn = 0  # next PSN to send (rxe: qp->req.psn)
        self.opcode = -1  # last opcode sent (rxe: qp->req.opcode)
        self.noack_pkts = 0
        self.rd_atomic = 0  # free READ/atomic credits (rxe: qp->req.rd_atomic)
        self.need_rd_atomic = False
        self.need_retry = False
        self.wait_for_rnr_timer = False
        self.wait_psn = False
        self.wait_fence = False
        self.ack_timeout: float | None = None
        self.retrans_deadline: float | None = None
        self.rnr_deadline: float | None = None

    # -- QP state -------------------------------------------------------------

    def set_state(self, new: ReqState) -> None:
        """Change the QP-level state (checked against :data:`REQ_TRANSITIONS`)."""
        if new not in REQ_TRANSITIONS[self.state]:
            raise ValueError(f"requester: {self.state.name} -> {new.name} is not a transition")
        self.state = new

    def set_params(self, params: QpParams) -> None:
        """Adopt new QP attributes (rxe_qp.c ``rxe_qp_from_attr``)."""
        outstanding = self.params.max_rd_atomic - self.rd_atomic
        self.params = params
        self.rd_atomic = max(0, params.max_rd_atomic - outstanding)
        self.ack_timeout = params.ack_timeout

    def start(self) -> None:
        """Enter READY from INIT (modify to RTS): start at ``sq_psn``."""
        p = self.params
        self.psn = p.sq_psn
        self.opcode = -1
        self.noack_pkts = 0
        self.rd_atomic = p.max_rd_atomic
        self.comp.start(p.sq_psn)

    def reset(self) -> None:
        """Back to RESET: drop the send queue without completions
        (rxe_qp.c ``rxe_qp_reset``)."""
        self.sq.clear()
        self.sq_head = self.wqe_index = 0
        self.opcode = -1
        self.need_retry = self.wait_for_rnr_timer = self.need_rd_atomic = False
        self.wait_psn = self.wait_fence = False
        self.retrans_deadline = self.rnr_deadline = None

    def post(self, wqe: SendWqe) -> None:
        """Queue a WQE (rxe_verbs.c ``post_one_send``)."""
        self.sq.append(wqe)

    def drained(self) -> bool:
        """Every WQE the requester started has completed (rxe_req.c
        ``req_check_sq_drain_done``). WQEs start in order, so it is enough
        that the oldest left has not started."""
        head = self.sq_head
        return head == len(self.sq) or not self.sq[head].started

    # -- retry ----------------------------------------------------------------

    def req_retry(self) -> None:
        """Rewind to the oldest unacknowledged PSN (rxe_req.c ``req_retry``).

        Every started WQE goes back to POSTED. The first one may be partly
        acknowledged: a SEND / WRITE skips the packets before ``comp.psn``
        and resumes with MIDDLE / LAST (``retry_first_write_send``); a READ
        asks again only for the bytes not yet received, with a new READ
        request at ``comp.psn``.
        """
        comp_psn = self.comp.psn
        self.wqe_index = self.sq_head
        self.psn = comp_psn
        self.opcode = -1
        self.noack_pkts = 0
        # The resent packets arm the timer afresh.
        self.retrans_deadline = None
        mtu = self.params.path_mtu
        first = True
        sq = self.sq
        for i in range(self.sq_head, len(sq)):
            wqe = sq[i]
            st = wqe.state
            if st is _POSTED or st is _ERROR:
                break
            if st is _DONE:
                continue
            mask = wqe.mask
            if first and mask & WR_READ:
                # Ask only for what has not arrived; non-last responses carry
                # exactly one MTU each, so the received bytes are MTU-aligned.
                got = (wqe.offset // mtu) * mtu
                wqe.offset = got
                wqe.resid = wqe.length - got
                wqe.iova = wqe.remote_addr + got
            else:
                wqe.reset_progress()
            if first:
                first = False
                if mask & (WR_SEND | WR_WRITE):
                    npsn = (comp_psn - wqe.first_psn) & PSN_MASK
                    self._skip_acked(wqe, npsn, mtu)
            wqe.state = _POSTED

    def _skip_acked(self, wqe: SendWqe, npsn: int, mtu: int) -> None:
        """Advance past ``npsn`` acknowledged packets of a partly-acked
        SEND / WRITE (rxe_req.c ``retry_first_write_send``)."""
        npkts = max(1, -(-wqe.length // mtu))
        npsn = min(npsn, npkts - 1)  # never skip the whole message
        if npsn <= 0:
            return
        skip = npsn * mtu
        wqe.resid -= skip
        wqe.offset += skip
        if wqe.mask & WR_WRITE:
            wqe.iova += skip
        self.opcode = wqe.ops[0]  # continuing: the next packet is MIDDLE/LAST

    # -- the requester loop ---------------------------------------------------

    def run(self, now: float) -> None:
        """Start as many packets as the window, the credits and the fences
        allow (rxe_req.c ``rxe_requester``)."""
        st = self.state
        if st is not ReqState.READY and st is not ReqState.DRAIN:
            return
        if self.need_retry and not self.wait_for_rnr_timer:
            self.req_retry()
            self.need_retry = False
        sq = self.sq
        max_rd_atomic = self.params.max_rd_atomic
        while self.wqe_index < len(sq):
            wqe = sq[self.wqe_index]
            wst = wqe.state
            if wst is _ERROR:
                break  # the QP fails once the completer reaches it
            if st is ReqState.DRAIN and not wqe.started:
                # SQD: start no new WQE. (rxe lets only a PROCESSING one go on,
                # which stalls a go-back-N retry that falls into SQD.)
                break
            # rxe_wqe_is_fenced(): LOCAL_INV waits for every earlier WQE,
            # IB_SEND_FENCE for every earlier READ / atomic.
            if wst is _POSTED:
                if wqe.opcode is IbWrOpcode.LOCAL_INV:
                    if self.wqe_index != self.sq_head:
                        self.wait_fence = True
                        break
                elif wqe.wr.send_flags & IbSendFlags.FENCE and self.rd_atomic != max_rd_atomic:
                    self.wait_fence = True
                    break
            mask = wqe.mask
            if mask & WR_LOCAL:
                self._do_local_op(wqe)
                continue
            if wqe.length > MAX_MSG_SIZE:
                self._error(wqe, IbWcStatus.LOC_LEN_ERR)
                break
            if ((self.psn - self.comp.psn) & PSN_MASK) >= MAX_UNACKED_PSNS:
                self.wait_psn = True
                break
            if mask & (WR_SEND | WR_WRITE):
                if not self._send_write(wqe, now):
                    break
            elif mask & (WR_READ | WR_ATOMIC):
                # check_init_depth(): a READ/atomic needs a credit.
                if not wqe.has_rd_atomic:
                    if self.rd_atomic <= 0:
                        self.need_rd_atomic = True
                        break
                    self.rd_atomic -= 1
                    wqe.has_rd_atomic = True
                self.need_rd_atomic = False
                if mask & WR_READ:
                    self._send_read(wqe, now)
                else:
                    self._send_atomic(wqe, now)
            else:
                # next_opcode() < 0: not an RC operation (e.g. a UD WR).
                self._error(wqe, IbWcStatus.LOC_QP_OP_ERR)
                break

    def _error(self, wqe: SendWqe, status: IbWcStatus) -> None:
        """The WQE failed locally (rxe_req.c ``err:``): it completes in error
        when the completer reaches it in order; nothing after it starts."""
        wqe.status = status
        wqe.state = _ERROR
        wqe.started = True

    def _arm(self, now: float) -> None:
        # rxe_req.c update_state(): arm the retransmit timer if it is idle.
        if self.retrans_deadline is None and self.ack_timeout is not None:
            self.retrans_deadline = now + self.ack_timeout

    def _do_local_op(self, wqe: SendWqe) -> None:
        """REG_MR / LOCAL_INV, executed in send queue order
        (rxe_req.c ``rxe_do_local_ops``)."""
        wr = wqe.wr
        try:
            if wqe.opcode is IbWrOpcode.REG_MR:
                if not isinstance(wr, RegWR):
                    raise LocalAccessError(IbWcStatus.LOC_QP_OP_ERR, "REG_MR needs an ib_reg_wr")
                self.mem.reg_mr(wr)
            else:
                self.mem.local_invalidate(wr.invalidate_rkey)
        except LocalAccessError as e:
            self._error(wqe, e.status)
            return
        wqe.state = _DONE
        wqe.started = True
        self.wqe_index += 1

    def _send_write(self, wqe: SendWqe, now: float) -> bool:
        """Emit the packets of a SEND / RDMA WRITE that the window allows
        (rxe_req.c ``next_opcode_rc``, ``init_req_packet``, ``finish_packet``,
        ``update_wqe_state``, ``update_wqe_psn``, ``update_state``).
        Returns False when the requester must stop (window full or error)."""
        p = self.params
        mtu = p.path_mtu
        dest_qp = p.dest_qpn
        pkey = p.pkey
        ops = wqe.ops
        mask = wqe.mask
        wr = wqe.wr
        is_write = bool(mask & WR_WRITE)
        inline = wqe.inline_data
        sges = wr.sg_list
        gather = self.mem.gather
        packets = self.out.packets
        solicited = bool(wqe.send_flags & _SOLICITED)
        # SE only on the last packet of a SEND or WRITE_WITH_IMM (init_req_packet).
        se_ok = solicited and bool(mask & (WR_SEND | WR_IMM))
        comp = self.comp
        self._arm(now)
        wqe.started = True
        while True:
            resid = wqe.resid
            start = wqe.offset == 0
            if resid <= mtu:
                n = resid
                end = True
                opcode = ops[3] if start else ops[2]
            else:
                n = mtu
                end = False
                opcode = ops[0] if start else ops[1]
            off = wqe.offset
            if not n:
                payload: bytes | bytearray | memoryview = b""
            elif inline is not None:
                payload = memoryview(inline)[off : off + n]
            else:
                try:
                    payload = gather(sges, off, n)
                except LocalAccessError as e:
                    self._error(wqe, e.status)
                    return False
            psn = self.psn
            noack = self.noack_pkts + 1
            if end or noack >= MAX_PKT_PER_ACK:
                ack_req = True
                self.noack_pkts = 0
            else:
                ack_req = False
                self.noack_pkts = noack
            pkt = Packet.build(
                opcode,
                dest_qp=dest_qp,
                psn=psn,
                payload=payload,
                pkey=pkey,
                se=end and se_ok,
                ack_req=ack_req,
                reth=Reth(wqe.iova, wqe.rkey, resid) if start and is_write else None,
                immdt=ImmDt(wr.imm_data) if end and mask & WR_IMM else None,
                ieth=Ieth(wr.invalidate_rkey) if end and mask & WR_INV else None,
            )
            packets.append(_tuple_new(OutPacket, (pkt, None)))
            if start:
                wqe.first_psn = psn
                wqe.last_psn = (psn + max(1, -(-resid // mtu)) - 1) & PSN_MASK
            self.psn = (psn + 1) & PSN_MASK
            wqe.resid = resid - n
            wqe.offset = off + n
            if is_write:
                wqe.iova += n
            self.opcode = opcode
            if end:
                wqe.state = _PENDING
                self.wqe_index += 1
                return True
            wqe.state = _PROCESSING
            if ((self.psn - comp.psn) & PSN_MASK) >= MAX_UNACKED_PSNS:
                self.wait_psn = True
                return False

    def _send_read(self, wqe: SendWqe, now: float) -> None:
        """An RDMA READ request: RETH with the remaining length; it reserves
        one PSN per expected response packet (rxe_req.c ``update_wqe_psn``)."""
        p = self.params
        mtu = p.path_mtu
        psn = self.psn
        resid = wqe.resid
        npkts = max(1, -(-resid // mtu))
        pkt = Packet.build(
            Opcode.RC_RDMA_READ_REQUEST,
            dest_qp=p.dest_qpn,
            psn=psn,
            pkey=p.pkey,
            ack_req=True,
            reth=Reth(wqe.iova, wqe.rkey, resid),
        )
        self.out.packets.append(_tuple_new(OutPacket, (pkt, None)))
        self.noack_pkts = 0
        wqe.started = True
        wqe.first_psn = psn
        wqe.last_psn = (psn + npkts - 1) & PSN_MASK
        self.psn = (psn + npkts) & PSN_MASK
        wqe.state = _PENDING
        self.opcode = Opcode.RC_RDMA_READ_REQUEST
        self.wqe_index += 1
        self._arm(now)

    def _send_atomic(self, wqe: SendWqe, now: float) -> None:
        """A CMP_AND_SWP / FETCH_AND_ADD request, one PSN (rxe_req.c
        ``init_req_packet``: swap / compare for CMP_SWP, add for FETCH_ADD)."""
        p = self.params
        wr = wqe.wr
        compare_add = wr.compare_add if isinstance(wr, AtomicWR) else 0
        swap = wr.swap if isinstance(wr, AtomicWR) else 0
        mask64 = (1 << 64) - 1
        if wqe.opcode is IbWrOpcode.ATOMIC_CMP_AND_SWP:
            opcode = Opcode.RC_COMPARE_SWAP
            atmeth = AtomicEth(wqe.iova, wqe.rkey, swap & mask64, compare_add & mask64)
        else:
            opcode = Opcode.RC_FETCH_ADD
            atmeth = AtomicEth(wqe.iova, wqe.rkey, compare_add & mask64, 0)
        psn = self.psn
        pkt = Packet.build(
            opcode, dest_qp=p.dest_qpn, psn=psn, pkey=p.pkey, ack_req=True, atmeth=atmeth
        )
        self.out.packets.append(_tuple_new(OutPacket, (pkt, None)))
        self.noack_pkts = 0
        wqe.started = True
        wqe.first_psn = wqe.last_psn = psn
        self.psn = (psn + 1) & PSN_MASK
        wqe.state = _PENDING
        self.opcode = opcode
        self.wqe_index += 1
        self._arm(now)
