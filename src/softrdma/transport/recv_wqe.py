"""The receive WQE a connected responder (RC, UC) fills with an incoming
SEND: taken by the message's first packet, scattered into packet by packet.

Kernel counterpart: ``drivers/infiniband/sw/rxe/rxe_resp.c`` —
``check_resource`` with ``get_srq_wqe`` (the WQE a message consumes, off
the QP's receive queue or its SRQ) and ``send_data_in`` / ``copy_data``
(the payload written at the message's running offset).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from softrdma.memory.layout import BytesLike
from softrdma.transport.memory_port import LocalSgl, MemoryPort
from softrdma.transport.srq import SharedRq
from softrdma.transport.wqe import QpEvent
from softrdma.verbs.wr import RecvWR

__all__ = ["RecvWqeState", "recv_scatter", "take_recv_wqe"]


class RecvWqeState(Protocol):
    """The part of a responder's state (rxe ``struct rxe_resp_info``) that
    tracks the receive WQE of the message being received: the WQE, its
    SGEs once translated, and the bytes written so far."""

    wqe: RecvWR | None
    sgl: LocalSgl | None
    recv_offset: int


def take_recv_wqe(
    resp: RecvWqeState, rq: Sequence[RecvWR], srq: SharedRq | None, events: list[QpEvent]
) -> bool:
    """rxe_resp.c ``check_resource`` for a request that consumes a receive
    WQE: the one the message holds already, else the head of the QP's
    receive queue (left there until the message completes) or one popped
    off ``srq`` (``get_srq_wqe``; an SRQ limit event goes to ``events``).
    False when there is none (RC answers RNR NAK, UC drops the message)."""
    if srq is not None:
        if resp.wqe is None:
            wqe = srq.take(events)
            if wqe is None:
                return False
            _start(resp, wqe)
        return True
    if not rq:
        return False
    wqe = rq[0]
    if resp.wqe is not wqe:
        _start(resp, wqe)
    return True


def _start(resp: RecvWqeState, wqe: RecvWR) -> None:
    resp.wqe = wqe
    resp.sgl = None  # translated when the first payload lands
    resp.recv_offset = 0


def recv_scatter(resp: RecvWqeState, mem: MemoryPort, payload: BytesLike) -> None:
    """rxe_resp.c ``send_data_in``: write one packet's ``payload`` into the
    held receive WQE at the message's running offset. The WQE's SGEs are
    translated by the first packet and kept for the rest of the message.
    Raises :class:`~softrdma.transport.memory_port.LocalAccessError`
    (``IB_WC_LOC_LEN_ERR`` when the buffer is too small)."""
    sgl = resp.sgl
    if sgl is None:
        wqe = resp.wqe
        assert wqe is not None  # take_recv_wqe() held it
        sgl = resp.sgl = mem.map_sgl(wqe.sg_list, True)
    sgl.scatter(resp.recv_offset, payload)
    resp.recv_offset += len(payload)
