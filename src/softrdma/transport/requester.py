"""The RC requester: turns send WQEs into request packets.

Kernel counterpart: ``drivers/infiniband/sw/rxe/rxe_req.c`` (``rxe_requester``,
``req_next_wqe``, ``next_opcode_rc``, ``check_init_depth``,
``init_req_packet``, ``finish_packet``, ``update_wqe_state``,
``update_wqe_psn``, ``update_state``, ``req_retry``,
``retry_first_write_send``, ``rxe_do_local_ops``, ``rxe_wqe_is_fenced``,
``rnr_nak_timer``).

The requester walks the send queue of an :class:`~softrdma.transport.rc.RcQp`
from ``req.wqe_index``, starts each WQE in order and segments SEND / RDMA
WRITE into FIRST / MIDDLE* / LAST or ONLY packets of exactly the path MTU
(the last carries the rest); an RDMA READ request reserves one PSN per
response packet it will get, an atomic one PSN. The completer retires
WQEs from ``qp.sq_head`` as ACKs and responses arrive, and asks for a retry
with ``req.need_retry``; the requester then rewinds to the oldest
unacknowledged PSN (go-back-N).

Flow control, as rxe:

* at most :data:`MAX_UNACKED_PSNS` PSNs outstanding (``RXE_MAX_UNACKED_PSNS``);
* at most ``max_rd_atomic`` READ / atomic / FLUSH / ATOMIC WRITE WQEs
  outstanding (``req.rd_atomic`` credits, ``check_init_depth``): the
  responder keeps a ``max_dest_rd_atomic`` resource for each, to replay its
  response;
* AckReq on the last packet of a message and at least every
  :data:`MAX_PKT_PER_ACK` packets (``RXE_MAX_PKT_PER_ACK``);
* ``IB_SEND_FENCE`` waits for every earlier READ / atomic, LOCAL_INV for
  every earlier WQE (``rxe_wqe_is_fenced``).

It runs in RTS, and in SQD for WQEs it had started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from softrdma.transport.burst import SegRun, edge_packet
from softrdma.transport.headers import AtomicEth, BytesLike, Feth, Reth
from softrdma.transport.memory_port import LocalAccessError
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_HALF, PSN_MASK, psn_add, psn_diff
from softrdma.transport.wqe import (
    WQE_DONE,
    WQE_ERROR,
    WQE_PENDING,
    WQE_POSTED,
    WQE_PROCESSING,
    WR_ATOMIC,
    WR_ATOMIC_WRITE,
    WR_FLUSH,
    WR_IMM,
    WR_INV,
    WR_LOCAL,
    WR_READ,
    WR_RESPONSE,
    WR_SEND,
    WR_WRITE,
    OutPacket,
    SendWqe,
)
from softrdma.verbs.enums import IbQpState, IbSendFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.wr import AtomicWR, AtomicWriteWR, BindMwWR, FlushWR, RegWR

if TYPE_CHECKING:
    from softrdma.transport.rc import RcQp

__all__ = [
    "MAX_MSG_SIZE",
    "MAX_PKT_PER_ACK",
    "MAX_UNACKED_PSNS",
    "drained",
    "req_retry",
    "run",
    "start",
]

MAX_UNACKED_PSNS = 128
"""rxe_param.h ``RXE_MAX_UNACKED_PSNS``: the requester stops starting packets
when this many PSNs are unacknowledged."""
MAX_PKT_PER_ACK = 64
"""rxe_param.h ``RXE_MAX_PKT_PER_ACK``: AckReq at least every this many packets."""
MAX_MSG_SIZE = 1 << 31
"""IBTA's largest message (rxe_param.h ``RXE_MAX_MSG_SIZE``); longer WRs fail
with ``IB_WC_LOC_LEN_ERR``."""

_SOLICITED = int(IbSendFlags.SOLICITED)
_FENCE = int(IbSendFlags.FENCE)
_U64 = (1 << 64) - 1


def start(qp: RcQp) -> None:
    """Modify RTR → RTS: start at ``sq_psn`` with every credit free and a
    fresh completer (rxe_qp.c ``rxe_qp_init_req`` / the RTS part of
    ``rxe_qp_from_attr``)."""
    a = qp.attr
    req = qp.req
    req.psn = req.sent_psn = a.sq_psn
    req.noack_pkts = 0
    req.rd_atomic = a.max_rd_atomic
    comp = qp.comp
    comp.psn = a.sq_psn
    comp.opcode = -1
    comp.retry_cnt = a.retry_cnt
    comp.rnr_retry = a.rnr_retry
    comp.started_retry = False


def drained(qp: RcQp) -> bool:
    """Every WQE the requester started has completed (rxe_req.c
    ``req_check_sq_drain_done``). WQEs start in order, so it is enough that
    the oldest left has not started."""
    head = qp.sq_head
    return head == len(qp.sq) or not qp.sq[head].started


# -- retry ------------------------------------------------------------------------------


def req_retry(qp: RcQp) -> None:
    """Rewind to the oldest unacknowledged PSN (rxe_req.c ``req_retry``).

    Every started WQE goes back to POSTED. The first one may be partly
    acknowledged: a SEND / WRITE skips the packets before ``comp.psn`` and
    resumes with MIDDLE / LAST (``retry_first_write_send``); a READ asks
    again only for the bytes not yet received, with a new READ request at
    ``comp.psn``.
    """
    req = qp.req
    comp_psn = qp.comp.psn
    req.wqe_index = qp.sq_head
    req.psn = comp_psn
    req.noack_pkts = 0
    req.retrans_deadline = None  # the resent packets arm it afresh
    mtu = qp.mtu
    first = True
    sq = qp.sq
    for i in range(qp.sq_head, len(sq)):
        wqe = sq[i]
        st = wqe.state
        if st is WQE_POSTED or st is WQE_ERROR:
            break
        if st is WQE_DONE:
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
                _skip_acked(wqe, psn_diff(comp_psn, wqe.first_psn), mtu)
        wqe.state = WQE_POSTED


def _skip_acked(wqe: SendWqe, npsn: int, mtu: int) -> None:
    """Advance past ``npsn`` acknowledged packets of a partly-acked SEND /
    WRITE (rxe_req.c ``retry_first_write_send``): the retry resumes with a
    MIDDLE or LAST packet."""
    npkts = max(1, -(-wqe.length // mtu))
    npsn = min(npsn, npkts - 1)  # never skip the whole message
    if npsn <= 0:
        return
    skip = npsn * mtu
    wqe.resid -= skip
    wqe.offset += skip
    if wqe.mask & WR_WRITE:
        wqe.iova += skip


# -- the requester loop ----------------------------------------------------------------


def run(qp: RcQp, now: float) -> None:
    """Start as many packets as the window, the credits and the fences allow
    (rxe_req.c ``rxe_requester``)."""
    req = qp.req
    if req.need_retry and not req.wait_for_rnr_timer:
        req_retry(qp)
        req.need_retry = False
    sq = qp.sq
    draining = qp.state is IbQpState.SQD
    max_rd_atomic = qp.attr.max_rd_atomic
    while req.wqe_index < len(sq):
        wqe = sq[req.wqe_index]
        wst = wqe.state
        if wst is WQE_ERROR:
            break  # the QP fails once the completer reaches it
        if wst is WQE_DONE:
            # Done before a go-back-N rewind (req_retry leaves these alone):
            # a REG_MR / LOCAL_INV must not run twice.
            req.wqe_index += 1
            continue
        if draining and not wqe.started:
            # SQD: start no new WQE. (rxe lets only a PROCESSING one go on,
            # which stalls a go-back-N retry that falls into SQD.)
            break
        # rxe_wqe_is_fenced(): LOCAL_INV waits for every earlier WQE,
        # IB_SEND_FENCE for every earlier READ / atomic.
        if wst is WQE_POSTED:
            if wqe.opcode is IbWrOpcode.LOCAL_INV:
                if req.wqe_index != qp.sq_head:
                    break
            elif wqe.send_flags & _FENCE and req.rd_atomic != max_rd_atomic:
                break
        mask = wqe.mask
        if mask & WR_LOCAL:
            _do_local_op(qp, wqe)
            continue
        if wqe.length > MAX_MSG_SIZE:
            _error(wqe, IbWcStatus.LOC_LEN_ERR)
            break
        # psn_diff(req.psn, comp.psn) >= MAX_UNACKED_PSNS, written out (per packet)
        if MAX_UNACKED_PSNS <= (req.psn - qp.comp.psn) & PSN_MASK < PSN_HALF:
            break
        if mask & (WR_SEND | WR_WRITE):
            if not _send_write(qp, wqe, now):
                break
        elif mask & WR_RESPONSE:
            # check_init_depth(): a READ / atomic / FLUSH / ATOMIC WRITE
            # needs a credit.
            if not wqe.has_rd_atomic:
                if req.rd_atomic <= 0:
                    break
                req.rd_atomic -= 1
                wqe.has_rd_atomic = True
            if mask & WR_READ:
                _send_read(qp, wqe, now)
            elif mask & WR_ATOMIC:
                _send_atomic(qp, wqe, now)
            else:
                _send_flush_or_atomic_write(qp, wqe, now)
        else:
            # next_opcode() < 0: not an RC operation.
            _error(wqe, IbWcStatus.LOC_QP_OP_ERR)
            break
    # The high-water mark of what was sent, which the completer checks
    # responses against (once per run: within one, the PSN only moves on).
    if 0 < (req.psn - req.sent_psn) & PSN_MASK < PSN_HALF:  # psn_diff(...) > 0
        req.sent_psn = req.psn


def _error(wqe: SendWqe, status: IbWcStatus) -> None:
    """The WQE failed locally (rxe_req.c ``err:``): it completes in error
    when the completer reaches it in order; nothing after it starts."""
    wqe.status = status
    wqe.state = WQE_ERROR
    wqe.started = True


def _arm(qp: RcQp, now: float) -> None:
    # rxe_req.c update_state(): arm the retransmit timer if it is idle.
    req = qp.req
    if req.retrans_deadline is None and qp.ack_timeout is not None:
        req.retrans_deadline = now + qp.ack_timeout


def _do_local_op(qp: RcQp, wqe: SendWqe) -> None:
    """REG_MR / BIND_MW / LOCAL_INV, executed in send queue order
    (rxe_req.c ``rxe_do_local_ops``)."""
    wr = wqe.wr
    try:
        if wqe.opcode is IbWrOpcode.REG_MR:
            assert isinstance(wr, RegWR)  # the driver's check_send_wr made sure
            qp.mem.reg_mr(wr)
        elif wqe.opcode is IbWrOpcode.BIND_MW:
            assert isinstance(wr, BindMwWR)
            qp.mem.bind_mw(wr)
        else:
            qp.mem.local_invalidate(wr.invalidate_rkey)
    except LocalAccessError as e:
        _error(wqe, e.status)
        return
    wqe.state = WQE_DONE
    wqe.started = True
    qp.req.wqe_index += 1


def _send_write(qp: RcQp, wqe: SendWqe, now: float) -> bool:
    """Emit the packets of a SEND / RDMA WRITE that the window allows
    (rxe_req.c ``next_opcode_rc``, ``init_req_packet``, ``finish_packet``,
    ``update_wqe_state``, ``update_wqe_psn``, ``update_state``). Returns
    False when the requester must stop (window full or error).

    The packets of one pass are described once, as a
    :class:`~softrdma.transport.burst.SegRun`: how many the window allows,
    their AckReq positions and payloads. With segmentation offload on
    (:attr:`RcQp.offload <softrdma.transport.rc.RcQp.offload>`) a run of
    two or more packets is handed on as it is, its payload gathered with
    one copy per DMA segment where that cannot be told from a gather per
    packet (:meth:`LocalSgl.gather_bulk
    <softrdma.transport.memory_port.LocalSgl.gather_bulk>`); otherwise
    :meth:`SegRun.packets` makes the packets. A payload not gathered at
    once is gathered packet by packet, as rxe's ``copy_data`` does; a
    gather that fails stops the run at that packet and fails the WQE,
    after the packets before it went out."""
    req = qp.req
    mtu = qp.mtu
    mask = wqe.mask
    wr = wqe.wr
    inline = wqe.inline_data
    # The SGEs are translated once per WQE and kept, retries included
    # (rxe's copy_data looks them up again for every packet).
    sgl = wqe.sgl
    if sgl is None and inline is None:
        sgl = wqe.sgl = qp.mem.map_sgl(wr.sg_list, False)
    if req.retrans_deadline is None and qp.ack_timeout is not None:  # _arm(), per WQE
        req.retrans_deadline = now + qp.ack_timeout
    wqe.started = True
    psn = req.psn
    resid = wqe.resid
    off = wqe.offset
    # Packets left in the message (a zero-length one is one packet), and
    # the room in the window: psn_diff(psn, comp.psn) < MAX_UNACKED_PSNS
    # here (run() checked), and nothing acknowledges while this runs.
    left = -(-resid // mtu) or 1
    room = (MAX_UNACKED_PSNS - (psn - qp.comp.psn)) & PSN_MASK
    count = left if left <= room else room
    # AckReq on the message's last packet and every MAX_PKT_PER_ACK packets.
    noack = req.noack_pkts
    ends = count == left
    acks: tuple[int, ...]
    if noack + count < MAX_PKT_PER_ACK:
        acks = (count - 1,) if ends else ()
        noack = 0 if ends else noack + count
    else:
        acks = tuple(range(MAX_PKT_PER_ACK - 1 - noack, count, MAX_PKT_PER_ACK))
        if ends and acks[-1] != count - 1:
            acks += (count - 1,)
        noack = 0 if acks[-1] == count - 1 else count - 1 - acks[-1]
    nbytes = resid if resid < count * mtu else count * mtu
    offload = qp.offload
    as_run = count > 1 and offload is not None and offload()
    data: BytesLike | None = None
    pieces: list[BytesLike] | None = None
    error: LocalAccessError | None = None
    if inline is not None:
        data = memoryview(inline)[off : off + nbytes]
    elif not nbytes:
        pieces = [b""]
    else:
        assert sgl is not None
        if as_run:
            data = sgl.gather_bulk(off, nbytes)
        if data is None:
            pieces = []
            pos = off
            end = off + nbytes
            try:
                while pos < end:
                    n = end - pos if end - pos < mtu else mtu
                    # bytes now: what the link would copy when sending
                    pieces.append(bytes(sgl.gather(pos, n)))
                    pos += n
            except LocalAccessError as e:
                error = e
            if error is not None:
                # The packets before the failing one go out (copy_data
                # failed in finish_packet of that packet).
                count = len(pieces)
                ends = False
                acks = tuple(i for i in acks if i < count)
                nbytes = count * mtu
    is_write = bool(mask & WR_WRITE)
    # SE only on the last packet of a SEND or WRITE_WITH_IMM (init_req_packet).
    se = bool(wqe.send_flags & _SOLICITED) and bool(mask & (WR_SEND | WR_IMM))
    imm = wr.imm_data if mask & WR_IMM else None
    inv = wr.invalidate_rkey if mask & WR_INV else None
    if count == 1 and ends and off == 0:
        # An ONLY packet, no run to describe: built as SegRun.packets() would.
        if data is None:
            assert pieces is not None
            data = pieces[0]
        pkt = edge_packet(
            wqe.ops[3],
            qp.attr.dest_qp_num,
            psn,
            qp.pkey,
            data,
            nbytes,
            se,
            True,
            tuple.__new__(Reth, (wqe.iova, wqe.rkey, resid)) if is_write else None,
            imm,
            inv,
        )
        qp.out.packets.append(tuple.__new__(OutPacket, (pkt, None, None)))  # unchecked
        wqe.first_psn = wqe.last_psn = psn
    elif count:
        run = SegRun(
            wqe.ops,
            qp.attr.dest_qp_num,
            qp.pkey,
            psn,
            count,
            mtu,
            off,
            resid,
            is_write=is_write,
            va=wqe.iova,
            rkey=wqe.rkey,
            se=se,
            imm=imm,
            inv=inv,
            acks=acks,
            data=data,
            pieces=pieces,
        )
        packets = qp.out.packets
        new = tuple.__new__  # OutPacket(...), unchecked
        if as_run and count > 1:
            packets.append(new(OutPacket, (run.packets(0, 1)[0], None, run)))
        else:
            for pkt in run.packets():
                packets.append(new(OutPacket, (pkt, None, None)))
        if off == 0:
            wqe.first_psn = psn
            wqe.last_psn = (psn + left - 1) & PSN_MASK
    psn = (psn + count) & PSN_MASK
    req.psn = psn
    if error is not None:
        req.noack_pkts = count - 1 - acks[-1] if acks else req.noack_pkts + count
        wqe.resid, wqe.offset = resid - nbytes, off + nbytes
        if mask & WR_WRITE:
            wqe.iova += nbytes
        _error(wqe, error.status)
        return False
    req.noack_pkts = noack
    wqe.resid, wqe.offset = resid - nbytes, off + nbytes
    if mask & WR_WRITE:
        wqe.iova += nbytes
    if ends:
        wqe.state = WQE_PENDING
        req.wqe_index += 1
        return True
    wqe.state = WQE_PROCESSING
    return False


def _send_read(qp: RcQp, wqe: SendWqe, now: float) -> None:
    """An RDMA READ request: RETH with the remaining length; it reserves one
    PSN per expected response packet (rxe_req.c ``update_wqe_psn``)."""
    req = qp.req
    psn = req.psn
    resid = wqe.resid
    npkts = max(1, -(-resid // qp.mtu))
    pkt = Packet.build(
        Opcode.RC_RDMA_READ_REQUEST,
        dest_qp=qp.attr.dest_qp_num,
        psn=psn,
        pkey=qp.pkey,
        ack_req=True,
        reth=Reth(wqe.iova, wqe.rkey, resid),
    )
    _send_request(qp, wqe, pkt, now, npkts)


def _send_atomic(qp: RcQp, wqe: SendWqe, now: float) -> None:
    """A CMP_AND_SWP / FETCH_AND_ADD request, one PSN (rxe_req.c
    ``init_req_packet``: swap / compare for CMP_SWP, add for FETCH_ADD)."""
    req = qp.req
    wr = wqe.wr
    assert isinstance(wr, AtomicWR)  # the driver's check_send_wr made sure
    if wqe.opcode is IbWrOpcode.ATOMIC_CMP_AND_SWP:
        opcode = Opcode.RC_COMPARE_SWAP
        atmeth = AtomicEth(wqe.iova, wqe.rkey, wr.swap & _U64, wr.compare_add & _U64)
    else:
        opcode = Opcode.RC_FETCH_ADD
        atmeth = AtomicEth(wqe.iova, wqe.rkey, wr.compare_add & _U64, 0)
    psn = req.psn
    pkt = Packet.build(
        opcode, dest_qp=qp.attr.dest_qp_num, psn=psn, pkey=qp.pkey, ack_req=True, atmeth=atmeth
    )
    _send_request(qp, wqe, pkt, now)


def _send_request(qp: RcQp, wqe: SendWqe, pkt: Packet, now: float, npkts: int = 1) -> None:
    """Send the one request packet of a READ, an atomic, a FLUSH or an ATOMIC
    WRITE, reserving ``npkts`` PSNs for its responses, and move on to the
    next WQE."""
    req = qp.req
    psn = pkt.bth.psn
    qp.out.packets.append(OutPacket(pkt))
    req.noack_pkts = 0
    wqe.started = True
    wqe.first_psn = psn
    wqe.last_psn = psn_add(psn, npkts - 1)
    req.psn = psn_add(psn, npkts)
    wqe.state = WQE_PENDING
    req.wqe_index += 1
    _arm(qp, now)


def _send_flush_or_atomic_write(qp: RcQp, wqe: SendWqe, now: float) -> None:
    """A FLUSH (FETH + RETH, no payload: oA19-2) or an ATOMIC WRITE (RETH of
    8 bytes and the 8-byte value), one PSN each (rxe_req.c
    ``init_req_packet`` / ``finish_packet``: ``feth_init``, the
    ``dma.atomic_wr`` payload). Both are ordered behind every earlier
    request of the QP by the RC PSN order, so a FLUSH answers only once the
    WRITEs before it were placed."""
    req = qp.req
    wr = wqe.wr
    psn = req.psn
    if wqe.mask & WR_FLUSH:
        assert isinstance(wr, FlushWR)  # the driver's check_send_wr made sure
        pkt = Packet.build(
            Opcode.RC_FLUSH,
            dest_qp=qp.attr.dest_qp_num,
            psn=psn,
            pkey=qp.pkey,
            ack_req=True,
            feth=Feth(wr.placement_type, wr.level),
            reth=Reth(wqe.iova, wqe.rkey, wqe.length),
        )
    else:
        assert wqe.mask & WR_ATOMIC_WRITE and isinstance(wr, AtomicWriteWR)
        pkt = Packet.build(
            Opcode.RC_ATOMIC_WRITE,
            dest_qp=qp.attr.dest_qp_num,
            psn=psn,
            pkey=qp.pkey,
            ack_req=True,
            payload=bytes(wr.atomic_wr),
            reth=Reth(wqe.iova, wqe.rkey, 8),
        )
    _send_request(qp, wqe, pkt, now)
