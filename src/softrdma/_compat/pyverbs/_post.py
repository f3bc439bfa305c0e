"""Turning pyverbs work requests into softrdma ones, for the QP and SRQ
posting verbs alike.

Kernel / rdma-core counterpart: the WR-chain walk that ``ibv_post_recv`` and
``ibv_post_srq_recv`` share in ``libibverbs`` (and ``rxe_post_recv`` /
``rxe_post_srq_recv`` below it): the WRs before a bad one are posted and
``bad_wr`` names the bad one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pyverbs import _softrdma as sim
from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from pyverbs.wr import SGE, RecvWR, SendWR
from softrdma.errors import SoftRdmaError
from softrdma.verbs import wr as ibwr
from softrdma.verbs.errors import PostError

__all__ = ["ib_sge", "post_error", "post_recv_chain"]


def ib_sge(s: SGE) -> ibwr.Sge:
    """A pyverbs ``SGE`` (``struct ibv_sge``) as a softrdma ``Sge``."""
    if not isinstance(s, SGE):
        raise PyverbsUserError("A scatter/gather list holds SGE objects")
    return ibwr.Sge(s.addr, s.length, s.lkey)


def post_recv_chain(
    post: Callable[[Sequence[ibwr.RecvWR]], None],
    wr: RecvWR,
    bad_wr: RecvWR | None,
    what: str,
) -> None:
    """Post the receive WR chain starting at ``wr`` with ``post`` (a QP's
    or an SRQ's ``post_recv``); on failure ``bad_wr`` gets the bad WR's
    ``wr_id`` and a ``PyverbsRDMAError`` saying ``what`` is raised."""
    chain: list[RecvWR] = []
    ibwrs: list[ibwr.RecvWR] = []
    node: RecvWR | None = wr
    while node is not None:
        chain.append(node)
        ibwrs.append(ibwr.RecvWR(node.wr_id, tuple(ib_sge(s) for s in node.sg_list)))
        node = node.next_wr
    try:
        post(ibwrs)
    except SoftRdmaError as ex:
        raise post_error(what, ex, chain, ibwrs, bad_wr) from None


def post_error(
    what: str,
    ex: SoftRdmaError,
    chain: Sequence[RecvWR] | Sequence[SendWR],
    ibwrs: Sequence[object],
    bad_wr: RecvWR | SendWR | None,
) -> PyverbsRDMAError:
    """The error of a failed post of ``chain`` (posted as ``ibwrs``, one
    for one): when softrdma named the bad WR, its ``wr_id`` goes to
    ``bad_wr`` (libibverbs' ``bad_wr``)."""
    if isinstance(ex, PostError) and bad_wr is not None and ex.bad_wr in ibwrs:
        bad_wr.wr_id = chain[ibwrs.index(ex.bad_wr)].wr_id
    return sim.rdma_error(what, ex)
