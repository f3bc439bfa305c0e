"""The RC responder: executes request packets and answers them.

Kernel counterpart: ``drivers/infiniband/sw/rxe/rxe_resp.c`` (``rxe_responder``
and its states ``RESPST_*``: ``check_psn``, ``check_op_seq``,
``check_op_valid``, ``check_resource``, ``rxe_resp_check_length``,
``check_rkey``, ``execute``, ``send_data_in``, ``write_data_in``,
``read_reply``, ``atomic_reply``, ``do_complete``, ``acknowledge``,
``duplicate_request``, ``find_resource``, ``rxe_prepare_res``,
``do_class_ac_error``).

Every request packet runs through the states of :data:`RESPONDER`, the rxe
state machine as a table of state → (handler, states it may go to); what
each state does (where it may go is the table's alone)::

    CHK_PSN        the expected PSN; ahead of it: a sequence NAK the first
                   time (class B), then silently dropped until it comes;
                   behind it: a duplicate
    CHK_OP_SEQ     MIDDLE/LAST continue the message in progress; a new
                   message does not start while one is open
    CHK_OP_VALID   READ / WRITE / atomic need the QP's remote access flag,
                   ATOMIC WRITE REMOTE_WRITE, FLUSH the FLUSH access of its
                   placement type
    CHK_RESOURCE   READ/atomic/FLUSH/ATOMIC WRITE need max_dest_rd_atomic > 0; SEND FIRST/ONLY
                   and WRITE-with-immediate need a posted receive (else an
                   RNR NAK, class B)
    CHK_LENGTH     FIRST/MIDDLE carry exactly one MTU, LAST 1..MTU, ONLY
                   0..MTU, RETH length <= 2**31
    CHK_RKEY       the whole RETH / AtomicETH range is checked on the first
                   packet, before any byte moves; WRITE packet lengths must
                   match what is left
    EXECUTE        SEND: scatter into the receive WQE; WRITE: write memory
    READ_REPLY     up to READ_BURST response packets (FIRST/MIDDLE/LAST/ONLY,
                   AETH on FIRST/LAST/ONLY); the rest after the link has
                   carried them
    ATOMIC_REPLY   execute once, save the original value
    ATOMIC_WRITE_REPLY  store the 8 bytes once (IBTA annex A19)
    PROCESS_FLUSH  a placement barrier: memory here is placed when written,
                   so it only takes the resource and answers
    COMPLETE       the receive completion (or its error)
    ACKNOWLEDGE    a pending NAK, an ATOMIC ACKNOWLEDGE, an empty READ
                   RESPONSE ONLY for FLUSH / ATOMIC WRITE, or an ACK when
                   the request asked for one (AckReq)
    DUPLICATE_REQUEST  SEND/WRITE: re-ACK, never re-execute; READ: read the
                   memory again from the saved resource; atomic: replay the
                   saved original value; FLUSH / ATOMIC WRITE: answer again, never
                   re-execute; no resource: drop (class D)
    ERR_PSN_OUT_OF_SEQ, ERR_RNR  class B: NAK and drop
    ERR_*          class A/C: NAK, the receive WQE completes in error, then
                   the QP enters ERR
    CLEANUP, DONE  stop

The responder works on an :class:`~softrdma.transport.rc.RcQp`'s ``resp``
part and runs in RTR, RTS and SQD.

In-flight replies are bounded (rxe: ``RXE_INFLIGHT_SKBS_PER_QP_HIGH``): a
READ reply is built :data:`READ_BURST` packets at a time, the unfinished
request waits in ``resp.cur`` and the requests behind it in ``resp.queue``;
the device polls the QP again when its link has carried the last burst
(:meth:`~softrdma.transport.rc.RcQp.reply_pending`). So a peer flooding us
with READ requests costs memory in proportion to what is on the wire, not
to what it asked for.

Deviations from rxe, each for a reason given where it happens: a receive
buffer too small for a SEND completes with ``IB_WC_LOC_LEN_ERR`` (rxe:
``IB_WC_REM_INV_REQ_ERR``), any other fault on the receive buffer NAKs
remote operational error with the fault's own status; a failed
SEND_WITH_INVALIDATE NAKs invalid request (rxe ACKs, then errors the QP);
a WRITE with a zero RETH length must carry no payload; RC receive
completions carry no ``IB_WC_GRH`` flag (no GRH is placed for RC); a FLUSH
with a reserved placement type or selectivity level is an invalid request
(rxe runs it as a no-op or a whole-MR flush), a FLUSH without responder
resources too (rxe only checks READ / atomics there), and an ATOMIC WRITE
whose RETH length is not 8 is a length error (rxe reads 8 bytes anyway).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, NamedTuple

from softrdma.transport.headers import (
    AETH_CREDIT_INVALID,
    Aeth,
    AethType,
    AtomicAckEth,
    Bth,
    NakCode,
    aeth_syndrome,
)
from softrdma.transport.memory_port import LocalAccessError, RemoteAccessError
from softrdma.transport.opcodes import OPCODE_TABLE, Opcode, OpcodeInfo
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_HALF, PSN_MASK, psn_add, psn_diff, psn_in_range
from softrdma.transport.recv_wqe import recv_scatter, take_recv_wqe
from softrdma.transport.wqe import Completion, CqSide, OutPacket
from softrdma.verbs.enums import IbAccess, IbEventType, IbWcFlags, IbWcOpcode, IbWcStatus
from softrdma.verbs.wr import WorkCompletion

if TYPE_CHECKING:
    from softrdma.transport.burst import SegRun
    from softrdma.transport.rc import RcQp, RespInfo, RespRes

__all__ = ["READ_BURST", "RESPONDER", "RespState", "Step", "receive", "receive_run", "run", "start"]

READ_BURST = 64
"""READ response packets built per pass (rxe bounds its in-flight packets per
QP with ``RXE_INFLIGHT_SKBS_PER_QP_HIGH``, 64)."""


class RespState(enum.IntEnum):
    """rxe_resp.c ``enum resp_states`` (the subset RC needs): where one
    request packet is (see the module docstring)."""

    CHK_PSN = 2
    CHK_OP_SEQ = 3
    CHK_OP_VALID = 4
    CHK_RESOURCE = 5
    CHK_LENGTH = 6
    CHK_RKEY = 7
    EXECUTE = 8
    READ_REPLY = 9
    ATOMIC_REPLY = 10
    COMPLETE = 11
    ACKNOWLEDGE = 12
    CLEANUP = 13
    DUPLICATE_REQUEST = 14
    ERR_MALFORMED_WQE = 15
    ERR_UNSUPPORTED_OPCODE = 16
    ERR_MISALIGNED_ATOMIC = 17
    ERR_PSN_OUT_OF_SEQ = 18
    ERR_MISSING_OPCODE_FIRST = 19
    ERR_MISSING_OPCODE_LAST_C = 20
    ERR_TOO_MANY_RDMA_ATM_REQ = 21
    ERR_RNR = 22
    ERR_RKEY_VIOLATION = 23
    ERR_INVALIDATE_RKEY = 24
    ERR_LENGTH = 25
    DONE = 27
    ATOMIC_WRITE_REPLY = 28
    PROCESS_FLUSH = 29


# The states as module names (see wqe.py: ~80 ns an enum attribute, ~10 a
# global; each packet takes several transitions).
CHK_PSN = RespState.CHK_PSN
CHK_OP_SEQ = RespState.CHK_OP_SEQ
CHK_OP_VALID = RespState.CHK_OP_VALID
CHK_RESOURCE = RespState.CHK_RESOURCE
CHK_LENGTH = RespState.CHK_LENGTH
CHK_RKEY = RespState.CHK_RKEY
EXECUTE = RespState.EXECUTE
READ_REPLY = RespState.READ_REPLY
ATOMIC_WRITE_REPLY = RespState.ATOMIC_WRITE_REPLY
PROCESS_FLUSH = RespState.PROCESS_FLUSH
ATOMIC_REPLY = RespState.ATOMIC_REPLY
COMPLETE = RespState.COMPLETE
ACKNOWLEDGE = RespState.ACKNOWLEDGE
CLEANUP = RespState.CLEANUP
DUPLICATE_REQUEST = RespState.DUPLICATE_REQUEST
ERR_MALFORMED_WQE = RespState.ERR_MALFORMED_WQE
ERR_UNSUPPORTED_OPCODE = RespState.ERR_UNSUPPORTED_OPCODE
ERR_MISALIGNED_ATOMIC = RespState.ERR_MISALIGNED_ATOMIC
ERR_PSN_OUT_OF_SEQ = RespState.ERR_PSN_OUT_OF_SEQ
ERR_MISSING_OPCODE_FIRST = RespState.ERR_MISSING_OPCODE_FIRST
ERR_MISSING_OPCODE_LAST_C = RespState.ERR_MISSING_OPCODE_LAST_C
ERR_TOO_MANY_RDMA_ATM_REQ = RespState.ERR_TOO_MANY_RDMA_ATM_REQ
ERR_RNR = RespState.ERR_RNR
ERR_RKEY_VIOLATION = RespState.ERR_RKEY_VIOLATION
ERR_INVALIDATE_RKEY = RespState.ERR_INVALIDATE_RKEY
ERR_LENGTH = RespState.ERR_LENGTH
DONE = RespState.DONE


_ACK_SYN: Final = aeth_syndrome(AethType.ACK, AETH_CREDIT_INVALID)
_NAK_SEQ: Final = aeth_syndrome(AethType.NAK, NakCode.PSN_SEQ_ERR)
_NAK_INV: Final = aeth_syndrome(AethType.NAK, NakCode.INVALID_REQUEST)
_NAK_ACC: Final = aeth_syndrome(AethType.NAK, NakCode.REMOTE_ACCESS_ERR)
_NAK_OP: Final = aeth_syndrome(AethType.NAK, NakCode.REMOTE_OP_ERR)
_NAK_SYN: dict[int, int] = {
    NakCode.INVALID_REQUEST: _NAK_INV,
    NakCode.REMOTE_ACCESS_ERR: _NAK_ACC,
    NakCode.REMOTE_OP_ERR: _NAK_OP,
}
_NAK_STATUS: dict[int, IbWcStatus] = {
    NakCode.INVALID_REQUEST: IbWcStatus.REM_INV_REQ_ERR,
    NakCode.REMOTE_OP_ERR: IbWcStatus.REM_OP_ERR,
}
_SEND_CONT = frozenset(
    {
        Opcode.RC_SEND_MIDDLE,
        Opcode.RC_SEND_LAST,
        Opcode.RC_SEND_LAST_WITH_IMMEDIATE,
        Opcode.RC_SEND_LAST_WITH_INVALIDATE,
    }
)
_WRITE_CONT = frozenset(
    {
        Opcode.RC_RDMA_WRITE_MIDDLE,
        Opcode.RC_RDMA_WRITE_LAST,
        Opcode.RC_RDMA_WRITE_LAST_WITH_IMMEDIATE,
    }
)
_SEND_OPEN = frozenset({Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE})
_WRITE_MIDDLE = Opcode.RC_RDMA_WRITE_MIDDLE
_WRITE_LAST = Opcode.RC_RDMA_WRITE_LAST
_WRITE_ONLY = Opcode.RC_RDMA_WRITE_ONLY
_ACK_OP = int(Opcode.RC_ACKNOWLEDGE)
_WRITE_FAST = frozenset({Opcode.RC_RDMA_WRITE_MIDDLE, Opcode.RC_RDMA_WRITE_LAST})
_WRITE_OPEN = frozenset({Opcode.RC_RDMA_WRITE_FIRST, Opcode.RC_RDMA_WRITE_MIDDLE})
_OPEN = _SEND_OPEN | _WRITE_OPEN
_READ_RESPONSES = (
    Opcode.RC_RDMA_READ_RESPONSE_ONLY,
    Opcode.RC_RDMA_READ_RESPONSE_FIRST,
    Opcode.RC_RDMA_READ_RESPONSE_MIDDLE,
    Opcode.RC_RDMA_READ_RESPONSE_LAST,
)
_REMOTE_READ = int(IbAccess.REMOTE_READ)
_REMOTE_WRITE = int(IbAccess.REMOTE_WRITE)
_REMOTE_ATOMIC = int(IbAccess.REMOTE_ATOMIC)
_FLUSH_GLOBAL = int(IbAccess.FLUSH_GLOBAL)
_FLUSH_PERSISTENT = int(IbAccess.FLUSH_PERSISTENT)
_FLUSH_MR = 1  # ib_user_verbs.h IB_FLUSH_MR: the FETH selectivity "whole MR"
_MAX_DMA_LEN = 1 << 31  # IBTA C9-94 (rxe_resp_check_length)
_SUCCESS = IbWcStatus.SUCCESS


class _Pass:
    """One request packet going through the states."""

    __slots__ = ("info", "pkt", "qp", "resp")

    def __init__(self, qp: RcQp, pkt: Packet, info: OpcodeInfo) -> None:
        self.qp = qp
        self.resp: RespInfo = qp.resp
        self.pkt = pkt
        self.info = info


# -- entry points -------------------------------------------------------------------------


def start(qp: RcQp) -> None:
    """Modify INIT → RTR: expect ``rq_psn``, allocate the
    ``max_dest_rd_atomic`` resources (rxe_qp.c ``rxe_qp_init_resp``)."""
    from softrdma.transport.rc import RespInfo, RespRes

    a = qp.attr
    resp = qp.resp = RespInfo()
    resp.psn = resp.ack_psn = a.rq_psn
    resp.resources = [RespRes() for _ in range(a.max_dest_rd_atomic)]


def receive(qp: RcQp, pkt: Packet, info: OpcodeInfo) -> None:
    """Take one request packet (rxe ``rxe_resp_queue_pkt``). It is processed
    at once unless a READ reply is still being generated; then it waits its
    turn, as in rxe's ``req_pkts`` queue."""
    resp = qp.resp
    if resp.cur is not None or resp.queue:
        resp.queue.append((pkt, info))
        return
    opcode = pkt.bth.opcode
    if opcode in _WRITE_FAST and resp.opcode in _WRITE_OPEN and resp.mr is not None:
        state = _write_fast(qp, resp, pkt)
        if state is None:
            return
    elif opcode == _WRITE_ONLY:
        state = _write_only_fast(qp, resp, pkt)
        if state is None:
            return
    else:
        state = CHK_PSN
    _dispatch(_Pass(qp, pkt, info), state)


def _write_fast(qp: RcQp, resp: RespInfo, pkt: Packet) -> RespState | None:
    """The table's fixed outcome for an in-order RDMA WRITE MIDDLE / LAST
    (no immediate) continuing a WRITE whose RETH was checked: CHK_PSN →
    CHK_OP_SEQ → CHK_OP_VALID → CHK_RESOURCE → CHK_LENGTH → CHK_RKEY →
    EXECUTE → ACKNOWLEDGE → CLEANUP in one pass. Anything the walk would
    decide differently returns the state to walk from (``CHK_PSN``, or
    ``ERR_RKEY_VIOLATION`` when the write itself faults)."""
    bth = pkt.bth
    psn = bth.psn
    payload = pkt.payload
    n = len(payload)
    mtu = qp.mtu
    resid = resp.resid
    if (
        psn != resp.psn
        or not qp.access & _REMOTE_WRITE
        or n != (mtu if resid > mtu else resid)
        or (n != mtu if bth.opcode == _WRITE_MIDDLE else (n == 0 or n > mtu))
    ):
        return CHK_PSN
    resp.aeth_syndrome = _ACK_SYN
    resp.status = _SUCCESS
    resp.local_status = None
    resp.sent_psn_nak = False
    mr = resp.mr
    assert mr is not None
    try:
        mr.write(resp.va, payload)
    except RemoteAccessError as e:
        resp.nak = e.nak
        return ERR_RKEY_VIOLATION
    resp.va += n
    resp.resid = resid - n
    if bth.opcode != _WRITE_MIDDLE:
        resp.mr = None  # rxe cleanup() drops qp->resp.mr
        resp.msn = (resp.msn + 1) & PSN_MASK
    resp.psn = resp.ack_psn = (psn + 1) & PSN_MASK
    resp.opcode = bth.opcode
    if bth.ack_req:
        _send_ack(qp, _ACK_SYN, psn)
    resp.res = None  # rxe cleanup()
    return None


def _write_only_fast(qp: RcQp, resp: RespInfo, pkt: Packet) -> RespState | None:
    """The table's fixed outcome for an in-order RDMA WRITE ONLY (no
    immediate) between messages, with a non-empty payload that is the
    whole RETH length: CHK_PSN → CHK_OP_SEQ → CHK_OP_VALID → CHK_RESOURCE →
    CHK_LENGTH → CHK_RKEY → EXECUTE → ACKNOWLEDGE → CLEANUP in one pass,
    the R_Key range checked before the byte move as in the walk. Anything
    the walk would decide differently returns the state to walk from
    (``CHK_PSN``, or ``ERR_RKEY_VIOLATION`` when the check or the write
    fails, with the state the walk leaves by then)."""
    bth = pkt.bth
    psn = bth.psn
    reth = pkt.reth
    payload = pkt.payload
    n = len(payload)
    if (
        psn != resp.psn
        or resp.opcode in _OPEN
        or not qp.access & _REMOTE_WRITE
        or reth is None
        or not 0 < n <= qp.mtu
        or reth.dma_len != n
    ):
        return CHK_PSN
    resp.sent_psn_nak = False
    resp.aeth_syndrome = _ACK_SYN
    resp.status = _SUCCESS
    resp.local_status = None
    va = resp.va = reth.va
    rkey = resp.rkey = reth.rkey
    resp.resid = resp.length = n
    try:
        # check_rkey() and the write in one: the checked MR is not kept
        # (cleanup() drops it after this one packet; an error ends the QP).
        qp.mem.write_once(rkey, va, payload)
    except RemoteAccessError as e:
        resp.nak = e.nak
        return ERR_RKEY_VIOLATION
    resp.va = va + n
    resp.resid = 0
    resp.mr = None  # rxe cleanup() drops qp->resp.mr
    resp.msn = (resp.msn + 1) & PSN_MASK
    resp.psn = resp.ack_psn = (psn + 1) & PSN_MASK
    resp.opcode = _WRITE_ONLY
    if bth.ack_req:
        _send_ack(qp, _ACK_SYN, psn)
    resp.res = None  # rxe cleanup()
    return None


def receive_run(qp: RcQp, run: SegRun, i: int) -> int:
    """Execute packets ``i``.. of a :class:`~softrdma.transport.burst.SegRun`
    together, as far as each would take :func:`_write_fast`'s fixed path:
    in-order RDMA WRITE MIDDLE packets of a full MTU and the message's
    plain LAST, continuing a WRITE whose RETH was checked, with no READ
    reply in progress. Their bytes move with one copy per DMA segment
    (:meth:`RemoteMr.write_bulk
    <softrdma.transport.memory_port.RemoteMr.write_bulk>`), else packet by
    packet; the responder's state, the ACKs (one per AckReq packet, in PSN
    order) and a fault at one packet come out exactly as from the packets
    one by one (rxe's ``rxe_responder`` per skb). Returns how many packets
    it took: 0 when packet ``i`` needs the full walk (the caller then hands
    it over on its own)."""
    resp = qp.resp
    mtu = qp.mtu
    if (
        resp.cur is not None
        or resp.queue
        or not run.is_write
        or (i == 0 and run.offset == 0)
        or resp.opcode not in _WRITE_OPEN
        or resp.mr is None
        or not qp.access & _REMOTE_WRITE
        or run.mtu != mtu
        or (run.psn + i) & PSN_MASK != resp.psn
    ):
        return 0
    count = run.count - i
    ends = run.ends
    if ends and run.ops[2] != _WRITE_LAST:
        count -= 1  # LAST with immediate completes a receive: on its own
        ends = False
    if count <= 0:
        return 0
    nmid = count - 1 if ends else count
    resid = resp.resid
    if resid <= nmid * mtu:
        return 0  # a MIDDLE would not carry a full MTU of what is left
    total = nmid * mtu
    if ends:
        last = run.resid - (run.count - 1) * mtu
        if resid - total != last or last <= 0:
            return 0
        total += last
    mr = resp.mr
    va = resp.va
    data = run.data
    failed: RemoteAccessError | None = None
    if data is None or not mr.write_bulk(va, memoryview(data)[i * mtu : i * mtu + total]):
        for j in range(count):
            try:
                mr.write(va + j * mtu, run.payload(i + j))
            except RemoteAccessError as e:
                failed = e
                count = j
                total = j * mtu
                break
    # The state after ``count`` packets, as _write_fast leaves it.
    resp.aeth_syndrome = _ACK_SYN
    resp.status = _SUCCESS
    resp.local_status = None
    resp.sent_psn_nak = False
    if count:
        resp.va = va + total
        resp.resid = resid - total
        first_psn = resp.psn
        psn = (first_psn + count - 1) & PSN_MASK
        done_msg = failed is None and ends
        for j in run.acks:
            if i <= j < i + count - (1 if done_msg else 0):
                _send_ack(qp, _ACK_SYN, (run.psn + j) & PSN_MASK)
        if done_msg:
            resp.mr = None  # rxe cleanup() drops qp->resp.mr
            resp.msn = (resp.msn + 1) & PSN_MASK
            resp.opcode = _WRITE_LAST
        else:
            resp.opcode = _WRITE_MIDDLE
        resp.psn = resp.ack_psn = (psn + 1) & PSN_MASK
        if done_msg and run.count - 1 in run.acks:
            _send_ack(qp, _ACK_SYN, psn)
        resp.res = None  # rxe cleanup()
    if failed is None:
        return count
    # The packet that faulted goes through the table's error states.
    pkt = run.packets(i + count, i + count + 1)[0]
    resp.nak = failed.nak
    info = OPCODE_TABLE[pkt.bth.opcode]
    assert info is not None
    _dispatch(_Pass(qp, pkt, info), ERR_RKEY_VIOLATION)
    return count + 1


def run(qp: RcQp) -> None:
    """Continue an unfinished READ reply by up to :data:`READ_BURST` packets,
    then process the requests queued behind it (rxe ``get_req``:
    ``qp->resp.res ? RESPST_READ_REPLY : RESPST_CHK_PSN``)."""
    resp = qp.resp
    if resp.cur is not None:
        pkt, info = resp.cur
        _dispatch(_Pass(qp, pkt, info), READ_REPLY)
    queue = resp.queue
    while qp.resp is resp and resp.cur is None and queue:
        pkt, info = queue.popleft()
        _dispatch(_Pass(qp, pkt, info), CHK_PSN)


def _dispatch(p: _Pass, state: RespState) -> None:
    """rxe_resp.c ``rxe_responder``: run one packet through the table."""
    resp = p.resp
    resp.aeth_syndrome = _ACK_SYN
    resp.status = _SUCCESS
    resp.local_status = None
    goto_error: tuple[IbWcStatus, str, IbEventType] | None = None
    table = RESPONDER
    while state is not CLEANUP and state is not DONE:
        handler, allowed = table[state]
        nxt = handler(p)
        if nxt not in allowed:  # an engine bug, never the peer's doing
            raise AssertionError(f"responder: {state.name} -> {nxt.name} is not in the table")
        # A class A/C error state always goes on to COMPLETE (the table
        # says so): test the cheap identity first, on every transition.
        if nxt is COMPLETE and state in _CLASS_AC:
            goto_error = _class_ac_event(state, resp)
        state = nxt
    if resp.cur is None:
        resp.res = None  # rxe cleanup(): the resource is only kept for replays
    if goto_error is not None:
        p.qp.fatal(*goto_error)


# -- the checks --------------------------------------------------------------------------


def _check_psn(p: _Pass) -> RespState:
    resp = p.resp
    diff = ((p.pkt.bth.psn - resp.psn + PSN_HALF) & PSN_MASK) - PSN_HALF  # psn_diff, per packet
    if diff > 0:
        if resp.sent_psn_nak:
            return CLEANUP
        resp.sent_psn_nak = True
        p.qp.out.counters["out_of_seq_request"] += 1  # once per NAK, as rxe
        return ERR_PSN_OUT_OF_SEQ
    if diff < 0:
        p.qp.out.counters["duplicate_request"] += 1
        return DUPLICATE_REQUEST
    resp.sent_psn_nak = False
    return CHK_OP_SEQ


def _check_op_seq(p: _Pass) -> RespState:
    last = p.resp.opcode
    op = p.pkt.bth.opcode
    if last in _SEND_OPEN:
        return CHK_OP_VALID if op in _SEND_CONT else ERR_MISSING_OPCODE_LAST_C
    if last in _WRITE_OPEN:
        return CHK_OP_VALID if op in _WRITE_CONT else ERR_MISSING_OPCODE_LAST_C
    if op in _SEND_CONT or op in _WRITE_CONT:
        return ERR_MISSING_OPCODE_FIRST
    return CHK_OP_VALID


def _check_op_valid(p: _Pass) -> RespState:
    """rxe_resp.c ``check_qp_attr_access``: the QP must allow the operation."""
    flags = p.qp.access
    info = p.info
    if (
        (info.is_read and not flags & _REMOTE_READ)
        or ((info.is_write or info.is_atomic_write) and not flags & _REMOTE_WRITE)
        or (info.is_atomic and not flags & _REMOTE_ATOMIC)
    ):
        return ERR_UNSUPPORTED_OPCODE
    if info.is_flush:
        feth = p.pkt.feth
        assert feth is not None
        # ib_placement_type: GLOBAL and/or PERSISTENT, each needing the QP's
        # FLUSH access; ib_selectivity_level: RANGE or MR.
        plt = feth.plt
        if not 0 < plt <= 3 or feth.sel > _FLUSH_MR or _flush_access(plt) & ~flags:
            return ERR_UNSUPPORTED_OPCODE
    return CHK_RESOURCE


def _flush_access(plt: int) -> int:
    """The access a FLUSH of placement type ``plt`` needs (rxe
    ``check_qp_attr_access`` / ``check_rkey``)."""
    return (_FLUSH_GLOBAL if plt & 1 else 0) | (_FLUSH_PERSISTENT if plt & 2 else 0)


def _check_resource(p: _Pass) -> RespState:
    info = p.info
    qp = p.qp
    if info.is_read or info.is_atomic or info.is_atomic_write or info.is_flush:
        # The requester must not exceed our resources; we just recycle.
        if qp.attr.max_dest_rd_atomic > 0:
            return CHK_LENGTH
        return ERR_TOO_MANY_RDMA_ATM_REQ
    if info.consumes_recv_wqe and not take_recv_wqe(p.resp, qp.rq, qp.srq, qp.out.events):
        return ERR_RNR
    return CHK_LENGTH


def _check_length(p: _Pass) -> RespState:
    """rxe_resp.c ``rxe_resp_check_length`` (IBTA C9-92, C9-94)."""
    info = p.info
    pkt = p.pkt
    if info.has_payload:
        mtu = p.qp.mtu
        n = len(pkt.payload)
        if info.is_only:
            if n > mtu:
                return ERR_LENGTH
        elif info.is_first or info.is_middle:
            if n != mtu:
                return ERR_LENGTH
        elif info.is_last and (n == 0 or n > mtu):
            return ERR_LENGTH
    reth = pkt.reth
    if reth is not None and reth.dma_len > _MAX_DMA_LEN:
        return ERR_LENGTH
    return CHK_RKEY


def _check_rkey(p: _Pass) -> RespState:
    """rxe_resp.c ``check_rkey``: the whole range of the RETH / AtomicETH is
    validated on the first packet, before any byte is written, and the
    checked MR kept in ``resp.mr`` for the message's packets (rxe's
    ``qp->resp.mr``; rxe looks the key up again on every packet)."""
    info = p.info
    pkt = p.pkt
    resp = p.resp
    if info.is_read or info.is_write:
        reth = pkt.reth
        if reth is not None:
            # qp_resp_from_reth()
            resp.va = reth.va
            resp.rkey = reth.rkey
            resp.resid = resp.length = reth.dma_len
        access = _REMOTE_READ if info.is_read else _REMOTE_WRITE
    elif info.is_atomic:
        atmeth = pkt.atmeth
        assert atmeth is not None
        resp.va = atmeth.va
        resp.rkey = atmeth.rkey
        resp.resid = 8
        access = _REMOTE_ATOMIC
    elif info.is_atomic_write or info.is_flush:
        return _check_rkey_a19(p)
    else:
        return EXECUTE
    if info.is_write:
        # Each WRITE packet must carry exactly its share of the rest.
        mtu = p.qp.mtu
        if len(pkt.payload) != (mtu if resp.resid > mtu else resp.resid):
            return ERR_LENGTH
    if pkt.reth is not None and pkt.reth.dma_len == 0:
        resp.mr = None
        return EXECUTE  # zero-length READ/WRITE: no R_Key check (C9-88)
    if pkt.reth is not None or info.is_atomic:
        try:
            resp.mr = p.qp.mem.check_rkey(resp.rkey, resp.va, resp.resid, access)
        except RemoteAccessError as e:
            resp.nak = e.nak
            return ERR_RKEY_VIOLATION
    if info.is_atomic and resp.va & 7:
        return ERR_MISALIGNED_ATOMIC
    return EXECUTE


def _check_rkey_a19(p: _Pass) -> RespState:
    """``check_rkey`` of an ATOMIC WRITE (REMOTE_WRITE on its 8 bytes, 8-byte
    aligned) or a FLUSH (the FLUSH access of its placement type on its RETH
    range, or on the MR alone for ``IB_FLUSH_MR``)."""
    pkt = p.pkt
    resp = p.resp
    reth = pkt.reth
    assert reth is not None
    resp.va = reth.va
    resp.rkey = reth.rkey
    resp.resid = resp.length = reth.dma_len
    mem = p.qp.mem
    try:
        if p.info.is_atomic_write:
            if reth.dma_len != 8 or len(pkt.payload) != 8:
                return ERR_LENGTH
            resp.mr = mem.check_rkey(reth.rkey, reth.va, 8, _REMOTE_WRITE)
            if reth.va & 7:
                return ERR_MISALIGNED_ATOMIC
            return EXECUTE
        feth = pkt.feth
        assert feth is not None
        access = _flush_access(feth.plt)
        if feth.sel == _FLUSH_MR or not reth.dma_len:
            mem.check_rkey_access(reth.rkey, access)
            resp.mr = None
        else:
            resp.mr = mem.check_rkey(reth.rkey, reth.va, reth.dma_len, access)
    except RemoteAccessError as e:
        resp.mr = None
        resp.nak = e.nak
        return ERR_RKEY_VIOLATION
    return EXECUTE


# -- executing -------------------------------------------------------------------------------


def _execute(p: _Pass) -> RespState:
    """rxe_resp.c ``execute``: a new request, never a repeated one."""
    info = p.info
    pkt = p.pkt
    resp = p.resp
    mem = p.qp.mem
    payload = pkt.payload
    n = len(payload)
    if info.is_send:
        if n:
            try:
                recv_scatter(resp, mem, payload)
            except LocalAccessError as e:
                resp.local_status = e.status
                # A receive buffer too small is an invalid request (rxe
                # send_data_in -ENOSPC); any other fault is class A.
                if e.status is IbWcStatus.LOC_LEN_ERR:
                    return ERR_LENGTH
                return ERR_MALFORMED_WQE
    elif info.is_write:
        if n:
            mr = resp.mr
            assert mr is not None  # check_rkey() kept it for the message
            try:
                mr.write(resp.va, payload)
            except RemoteAccessError as e:
                resp.nak = e.nak
                return ERR_RKEY_VIOLATION
            resp.va += n
            resp.resid -= n
        if info.is_last or info.is_only:
            resp.mr = None  # rxe cleanup() drops qp->resp.mr
    elif info.is_read:
        # The MSN counts the READ now (C9-148).
        resp.msn = psn_add(resp.msn)
        return READ_REPLY
    elif info.is_atomic_write:
        return ATOMIC_WRITE_REPLY
    elif info.is_flush:
        return PROCESS_FLUSH
    else:
        return ATOMIC_REPLY
    if info.has_invalidate:
        ieth = pkt.ieth
        assert ieth is not None
        try:
            mem.remote_invalidate(ieth.inv_rkey)
        except (RemoteAccessError, LocalAccessError):
            return ERR_INVALIDATE_RKEY
    bth = pkt.bth
    if info.is_last or info.is_only:
        resp.msn = (resp.msn + 1) & PSN_MASK  # psn_add, per packet
    resp.psn = resp.ack_psn = (bth.psn + 1) & PSN_MASK
    resp.opcode = bth.opcode
    resp.status = _SUCCESS
    return COMPLETE if info.completes else ACKNOWLEDGE


def _prepare_res(p: _Pass, is_read: bool) -> RespRes:
    """rxe_resp.c ``rxe_prepare_res``: take the next resource round robin."""
    resp = p.resp
    res = resp.resources[resp.res_head]
    resp.res_head = (resp.res_head + 1) % len(resp.resources)
    res.valid = True
    res.is_read = is_read
    res.replay = False
    res.started = False
    psn = p.pkt.bth.psn
    res.first_psn = res.cur_psn = psn
    res.opcode = p.pkt.bth.opcode
    if is_read:
        res.va = res.va_org = resp.va
        res.resid = res.length = resp.resid
        res.rkey = resp.rkey
        res.last_psn = psn_add(psn, max(1, -(-resp.resid // p.qp.mtu)) - 1)
        res.mr = resp.mr  # the reply reads through the checked MR (rxe hands it over)
    else:
        res.last_psn = psn
        res.mr = None
    resp.mr = None
    return res


def _read_reply(p: _Pass) -> RespState:
    """rxe_resp.c ``read_reply``: the response packets of a READ, at most
    :data:`READ_BURST` per pass; an unfinished reply continues at the next
    :func:`run` (``resp.cur`` holds its request, like the skb rxe leaves at
    the head of ``req_pkts``).

    A new READ starts with FIRST (or ONLY); a repeated one restarts at the
    requested PSN, with FIRST/ONLY at the READ's first PSN and MIDDLE/LAST
    inside it. AETH (ACK, MSN) goes on FIRST, LAST and ONLY. The memory is
    read when each packet is built, so a repeated READ returns the current
    data.
    """
    qp = p.qp
    resp = p.resp
    res = resp.res
    if res is None:
        res = resp.res = _prepare_res(p, True)
    elif not res.started and res.resid:
        # A replay: the MR may have changed since (rxe_recheck_mr).
        try:
            res.mr = qp.mem.check_rkey(res.rkey, res.va, res.resid, _REMOTE_READ)
        except RemoteAccessError as e:
            resp.cur = None
            resp.nak = e.nak
            return ERR_RKEY_VIOLATION
    mtu = qp.mtu
    dest_qp = qp.attr.dest_qp_num
    pkey = qp.pkey
    mr = res.mr
    packets = qp.out.packets
    aeth = Aeth(_ACK_SYN, resp.msn)
    # FIRST / ONLY only at the READ's first PSN.
    first_packet = not res.started and res.cur_psn == res.first_psn
    res.started = True
    va = res.va
    resid = res.resid
    psn = res.cur_psn
    only, first, middle, last = _READ_RESPONSES
    for _ in range(READ_BURST):
        n = resid if resid < mtu else mtu
        if first_packet:
            opcode = only if resid <= mtu else first
        elif resid > mtu:
            opcode = middle
        else:
            opcode = last
        if n:
            assert mr is not None  # check_rkey() checked the non-empty range
            try:
                data = mr.read(va, n)
            except RemoteAccessError as e:
                resp.cur = None
                resp.nak = e.nak
                return ERR_RKEY_VIOLATION
        else:
            data = b""
        if opcode == middle:
            # BTH and payload only, what build() would make (a full MTU: pad 0).
            bth = tuple.__new__(
                Bth, (middle, dest_qp, psn, pkey, False, False, 0, 0, False, False, False)
            )
            pkt_out = Packet(bth, data)
        else:
            pkt_out = Packet.build(
                opcode, dest_qp=dest_qp, psn=psn, payload=data, pkey=pkey, aeth=aeth
            )
        packets.append(tuple.__new__(OutPacket, (pkt_out, None, None)))  # OutPacket(pkt_out)
        va += n
        resid -= n
        psn = (psn + 1) & PSN_MASK  # psn_add, per packet
        first_packet = False
        if resid <= 0:
            break
    res.va, res.resid, res.cur_psn = va, resid, psn
    if resid > 0:
        resp.cur = (p.pkt, p.info)  # more when the link has carried these
        return DONE
    resp.cur = None
    if not res.replay:
        resp.opcode = -1
    if psn_diff(psn, resp.psn) >= 0:
        resp.psn = psn
    return CLEANUP


def _atomic_reply(p: _Pass) -> RespState:
    """rxe_resp.c ``atomic_reply``: execute once and remember the original
    value; a repeated request only replays it."""
    resp = p.resp
    pkt = p.pkt
    res = resp.res
    if res is None:
        atmeth = pkt.atmeth
        mr = resp.mr
        assert atmeth is not None and mr is not None  # check_rkey() kept the MR
        try:
            orig = mr.atomic(
                resp.va,
                pkt.bth.opcode == Opcode.RC_COMPARE_SWAP,
                atmeth.compare,
                atmeth.swap_add,
            )
        except RemoteAccessError as e:
            resp.nak = e.nak
            return ERR_RKEY_VIOLATION
        res = _prepare_res(p, False)
        res.orig = orig
        resp.msn = psn_add(resp.msn)
        resp.psn = resp.ack_psn = psn_add(pkt.bth.psn)
        resp.opcode = pkt.bth.opcode
        resp.status = _SUCCESS
    resp.res = res
    return ACKNOWLEDGE


def _a19_done(p: _Pass) -> RespState:
    """A new FLUSH / ATOMIC WRITE executed: take its resource (rxe
    ``rxe_prepare_res``, kept for a replay) and count it (MSN, next PSN).
    The resource spans the request's PSN, so a repeated FLUSH finds it (rxe
    sets no PSNs on a FLUSH resource and may not)."""
    resp = p.resp
    psn = p.pkt.bth.psn
    resp.res = _prepare_res(p, False)
    resp.msn = psn_add(resp.msn)
    resp.psn = resp.ack_psn = psn_add(psn)
    resp.opcode = p.pkt.bth.opcode
    resp.status = _SUCCESS
    return ACKNOWLEDGE


def _atomic_write_reply(p: _Pass) -> RespState:
    """rxe_resp.c ``atomic_write_reply`` / ``rxe_mr_do_atomic_write``: store
    the 8 bytes, as they came, in one access to the aligned target (one DMA
    write cannot tear); a repeated request only answers again."""
    resp = p.resp
    if resp.res is not None:  # a replay (duplicate_request found it)
        return ACKNOWLEDGE
    mr = resp.mr
    assert mr is not None  # check_rkey() kept the checked 8 bytes
    try:
        mr.write(resp.va, p.pkt.payload)
    except RemoteAccessError as e:
        resp.nak = e.nak
        return ERR_RKEY_VIOLATION
    resp.resid = 0
    return _a19_done(p)


def _process_flush(p: _Pass) -> RespState:
    """rxe_resp.c ``process_flush``: make the range (or the MR) globally
    visible. Every write this responder executed went to memory before it
    answered, and the RC order put the WRITEs before this FLUSH, so there
    is nothing left to push out: the FLUSH takes its resource and answers.
    (Persistence cannot be asked for: no MR has FLUSH_PERSISTENT access.)
    A repeated FLUSH only answers again (oA19-14, oA19-15)."""
    if p.resp.res is not None:
        return ACKNOWLEDGE
    p.resp.mr = None
    return _a19_done(p)


def _do_complete(p: _Pass) -> RespState:
    """rxe_resp.c ``do_complete``: the receive completion (or its error)."""
    qp = p.qp
    resp = p.resp
    info = p.info
    pkt = p.pkt
    wqe = resp.wqe
    if wqe is not None:
        status = resp.status
        if status is _SUCCESS:
            flags = IbWcFlags(0)
            imm = 0
            inv = 0
            if info.has_immediate:
                flags |= IbWcFlags.WITH_IMM
                assert pkt.immdt is not None
                imm = pkt.immdt.imm
            if info.has_invalidate:
                flags |= IbWcFlags.WITH_INVALIDATE
                assert pkt.ieth is not None
                inv = pkt.ieth.inv_rkey
            if info.is_write:
                # WRITE with immediate: byte_len is the RDMA length (rxe).
                wc = WorkCompletion(
                    wqe.wr_id, status, IbWcOpcode.RECV_RDMA_WITH_IMM, qp.qpn,
                    resp.length, flags, imm,
                )  # fmt: skip
            else:
                wc = WorkCompletion(
                    wqe.wr_id, status, IbWcOpcode.RECV, qp.qpn, resp.recv_offset,
                    flags, imm, inv,
                )  # fmt: skip
        else:
            wc = WorkCompletion(wqe.wr_id, status, IbWcOpcode.RECV, qp.qpn)
        qp.out.completions.append(Completion(CqSide.RECV, wc, pkt.bth.se))
        if qp.srq is None:
            qp.rq.popleft()
        resp.wqe = None
        resp.sgl = None
        resp.recv_offset = 0
    return ACKNOWLEDGE


def _send_ack(qp: RcQp, syndrome: int, psn: int) -> None:
    """rxe_resp.c ``send_ack``: an ACKNOWLEDGE with ``syndrome`` for ``psn``
    (what ``Packet.build`` makes of it, built directly: one per AckReq)."""
    new = tuple.__new__
    bth = new(
        Bth, (_ACK_OP, qp.attr.dest_qp_num, psn, qp.pkey, False, False, 0, 0, False, False, False)
    )
    aeth = new(Aeth, (syndrome, qp.resp.msn))
    pkt = Packet(bth, b"", None, aeth)
    qp.out.packets.append(new(OutPacket, (pkt, None, None)))


def _acknowledge(p: _Pass) -> RespState:
    """rxe_resp.c ``acknowledge``: NAKs always, atomics always, otherwise
    only when the requester set AckReq (ACK coalescing)."""
    qp = p.qp
    resp = p.resp
    pkt = p.pkt
    if resp.aeth_syndrome != _ACK_SYN:
        _send_ack(qp, resp.aeth_syndrome, pkt.bth.psn)
    elif p.info.is_atomic:
        res = resp.res
        assert res is not None
        resp.res = None
        ack = Packet.build(
            Opcode.RC_ATOMIC_ACKNOWLEDGE,
            dest_qp=qp.attr.dest_qp_num,
            psn=pkt.bth.psn,
            pkey=qp.pkey,
            aeth=Aeth(_ACK_SYN, resp.msn),
            atmack=AtomicAckEth(res.orig),
        )
        qp.out.packets.append(OutPacket(ack))
    elif p.info.is_flush or p.info.is_atomic_write:
        # rxe send_read_response_ack: a READ RESPONSE ONLY of length zero.
        resp.res = None
        ack = Packet.build(
            Opcode.RC_RDMA_READ_RESPONSE_ONLY,
            dest_qp=qp.attr.dest_qp_num,
            psn=pkt.bth.psn,
            pkey=qp.pkey,
            aeth=Aeth(_ACK_SYN, resp.msn),
        )
        qp.out.packets.append(OutPacket(ack))
    elif pkt.bth.ack_req:
        _send_ack(qp, _ACK_SYN, pkt.bth.psn)
    return CLEANUP


def _duplicate_request(p: _Pass) -> RespState:
    """rxe_resp.c ``duplicate_request``."""
    info = p.info
    pkt = p.pkt
    resp = p.resp
    if info.is_send or info.is_write:
        # C9-105: ACK again with the last PSN executed; never re-execute.
        _send_ack(p.qp, _ACK_SYN, psn_add(resp.ack_psn, -1))
        return CLEANUP
    res = next(
        (
            r
            for r in resp.resources
            if r.valid
            and r.is_read == info.is_read
            and (info.is_read or r.opcode == pkt.bth.opcode)
            and psn_in_range(pkt.bth.psn, r.first_psn, r.last_psn)
        ),
        None,
    )  # rxe find_resource()
    if res is None:
        return CLEANUP  # class D: no resource, drop
    res.replay = True
    res.cur_psn = pkt.bth.psn
    resp.res = res
    if info.is_atomic_write:
        return ATOMIC_WRITE_REPLY
    if info.is_flush:
        return PROCESS_FLUSH
    if not info.is_read:
        return ATOMIC_REPLY
    reth = pkt.reth
    assert reth is not None
    # The repeated READ must be the original or a tail of it.
    if (
        reth.va < res.va_org
        or reth.dma_len > res.length
        or reth.va + reth.dma_len > res.va_org + res.length
        or reth.rkey != res.rkey
    ):
        resp.res = None
        return CLEANUP
    res.started = False
    res.va = reth.va
    res.resid = reth.dma_len
    return READ_REPLY


# -- errors ----------------------------------------------------------------------------------


def _err_psn_out_of_seq(p: _Pass) -> RespState:
    # Class B: NAK with the PSN we expect; the packet is dropped.
    _send_ack(p.qp, _NAK_SEQ, p.resp.psn)
    return CLEANUP


def _err_rnr(p: _Pass) -> RespState:
    # Class B: RNR NAK with our minimum RNR timer, for this PSN.
    qp = p.qp
    qp.out.counters["send_rnr_err"] += 1
    _send_ack(qp, aeth_syndrome(AethType.RNR_NAK, qp.attr.min_rnr_timer), p.pkt.bth.psn)
    return CLEANUP


def _class_ac(resp: RespInfo, syndrome: int, status: IbWcStatus) -> RespState:
    """rxe_resp.c ``do_class_ac_error``: NAK, complete the receive WQE in
    error (COMPLETE), then the QP enters ERR (after the dispatch loop)."""
    resp.aeth_syndrome = syndrome
    resp.status = status
    return COMPLETE


def _err_rkey_violation(p: _Pass) -> RespState:
    resp = p.resp
    status = _NAK_STATUS.get(resp.nak, IbWcStatus.REM_ACCESS_ERR)
    return _class_ac(resp, _NAK_SYN.get(resp.nak, _NAK_ACC), status)


def _err_length(p: _Pass) -> RespState:
    resp = p.resp
    return _class_ac(resp, _NAK_INV, resp.local_status or IbWcStatus.REM_INV_REQ_ERR)


def _err_malformed_wqe(p: _Pass) -> RespState:
    # Class A: the receive WQE could not take the data.
    resp = p.resp
    return _class_ac(resp, _NAK_OP, resp.local_status or IbWcStatus.LOC_QP_OP_ERR)


def _err_invalid_request(p: _Pass) -> RespState:
    # Class C invalid request: a missing FIRST / LAST, an unsupported or
    # misaligned operation, READs / atomics without resources, a bad IETH.
    return _class_ac(p.resp, _NAK_INV, IbWcStatus.REM_INV_REQ_ERR)


_CLASS_AC = frozenset(
    {
        ERR_RKEY_VIOLATION,
        ERR_LENGTH,
        ERR_MALFORMED_WQE,
        ERR_INVALIDATE_RKEY,
        ERR_TOO_MANY_RDMA_ATM_REQ,
        ERR_MISSING_OPCODE_FIRST,
        ERR_MISSING_OPCODE_LAST_C,
        ERR_UNSUPPORTED_OPCODE,
        ERR_MISALIGNED_ATOMIC,
    }
)


def _class_ac_event(state: RespState, resp: RespInfo) -> tuple[IbWcStatus, str, IbEventType]:
    """What the QP's ERR is reported as: ``IB_EVENT_QP_ACCESS_ERR`` for an
    access violation, ``IB_EVENT_QP_REQ_ERR`` for an invalid request,
    ``IB_EVENT_QP_FATAL`` otherwise (rxe_resp.c ``do_class_ac_error``)."""
    syn = resp.aeth_syndrome
    event = (
        IbEventType.QP_ACCESS_ERR
        if syn == _NAK_ACC
        else IbEventType.QP_REQ_ERR
        if syn == _NAK_INV
        else IbEventType.QP_FATAL
    )
    return resp.status, f"responder: {state.name.lower()}", event


class Step(NamedTuple):
    """A row of the responder's state table: the state's handler and the
    states it may go to (h11's explicit state table)."""

    handler: Callable[[_Pass], RespState]
    next: frozenset[RespState]


_TO_COMPLETE = frozenset({COMPLETE})
RESPONDER: dict[RespState, Step] = {
    CHK_PSN: Step(
        _check_psn,
        frozenset(
            {
                CLEANUP,
                ERR_PSN_OUT_OF_SEQ,
                DUPLICATE_REQUEST,
                CHK_OP_SEQ,
            }
        ),
    ),
    CHK_OP_SEQ: Step(
        _check_op_seq,
        frozenset(
            {
                CHK_OP_VALID,
                ERR_MISSING_OPCODE_LAST_C,
                ERR_MISSING_OPCODE_FIRST,
            }
        ),
    ),
    CHK_OP_VALID: Step(_check_op_valid, frozenset({CHK_RESOURCE, ERR_UNSUPPORTED_OPCODE})),
    CHK_RESOURCE: Step(
        _check_resource,
        frozenset({CHK_LENGTH, ERR_TOO_MANY_RDMA_ATM_REQ, ERR_RNR}),
    ),
    CHK_LENGTH: Step(_check_length, frozenset({CHK_RKEY, ERR_LENGTH})),
    CHK_RKEY: Step(
        _check_rkey,
        frozenset(
            {
                EXECUTE,
                ERR_LENGTH,
                ERR_RKEY_VIOLATION,
                ERR_MISALIGNED_ATOMIC,
            }
        ),
    ),
    EXECUTE: Step(
        _execute,
        frozenset(
            {
                COMPLETE,
                ACKNOWLEDGE,
                READ_REPLY,
                ATOMIC_REPLY,
                ATOMIC_WRITE_REPLY,
                PROCESS_FLUSH,
                ERR_LENGTH,
                ERR_MALFORMED_WQE,
                ERR_RKEY_VIOLATION,
                ERR_INVALIDATE_RKEY,
            }
        ),
    ),
    READ_REPLY: Step(_read_reply, frozenset({CLEANUP, DONE, ERR_RKEY_VIOLATION})),
    ATOMIC_REPLY: Step(_atomic_reply, frozenset({ACKNOWLEDGE, ERR_RKEY_VIOLATION})),
    ATOMIC_WRITE_REPLY: Step(_atomic_write_reply, frozenset({ACKNOWLEDGE, ERR_RKEY_VIOLATION})),
    PROCESS_FLUSH: Step(_process_flush, frozenset({ACKNOWLEDGE})),
    COMPLETE: Step(_do_complete, frozenset({ACKNOWLEDGE})),
    ACKNOWLEDGE: Step(_acknowledge, frozenset({CLEANUP})),
    DUPLICATE_REQUEST: Step(
        _duplicate_request,
        frozenset({CLEANUP, READ_REPLY, ATOMIC_REPLY, ATOMIC_WRITE_REPLY, PROCESS_FLUSH}),
    ),
    ERR_PSN_OUT_OF_SEQ: Step(_err_psn_out_of_seq, frozenset({CLEANUP})),
    ERR_RNR: Step(_err_rnr, frozenset({CLEANUP})),
    ERR_RKEY_VIOLATION: Step(_err_rkey_violation, _TO_COMPLETE),
    ERR_LENGTH: Step(_err_length, _TO_COMPLETE),
    ERR_MALFORMED_WQE: Step(_err_malformed_wqe, _TO_COMPLETE),
    ERR_INVALIDATE_RKEY: Step(_err_invalid_request, _TO_COMPLETE),
    ERR_TOO_MANY_RDMA_ATM_REQ: Step(_err_invalid_request, _TO_COMPLETE),
    ERR_MISSING_OPCODE_FIRST: Step(_err_invalid_request, _TO_COMPLETE),
    ERR_MISSING_OPCODE_LAST_C: Step(_err_invalid_request, _TO_COMPLETE),
    ERR_UNSUPPORTED_OPCODE: Step(_err_invalid_request, _TO_COMPLETE),
    ERR_MISALIGNED_ATOMIC: Step(_err_invalid_request, _TO_COMPLETE),
}
"""The responder's state table (``RESPST_*``): every state but CLEANUP and
DONE has a handler; the dispatcher checks each transition against it."""
