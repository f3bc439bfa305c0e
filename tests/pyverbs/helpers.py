"""Two pyverbs players on one device, connected the way rdma-core's test
suite connects them (``to_rts`` with a global route to the port's GID)."""

from __future__ import annotations

from dataclasses import dataclass

import pyverbs.enums as e
from pyverbs.addr import AH, AHAttr, GlobalRoute
from pyverbs.cq import CQ, WC
from pyverbs.device import Context
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr, QPInitAttrEx

ALL_ACCESS = (
    e.IBV_ACCESS_LOCAL_WRITE
    | e.IBV_ACCESS_REMOTE_WRITE
    | e.IBV_ACCESS_REMOTE_READ
    | e.IBV_ACCESS_REMOTE_ATOMIC
)
UD_QKEY = 0x11111111


def poll_cq(cq: CQ, n: int = 1) -> list[WC]:
    """``n`` completions of ``cq``, within a bounded number of polls."""
    got: list[WC] = []
    for _ in range(50):
        _, wcs = cq.poll(n - len(got))
        got += wcs
        if len(got) >= n:
            return got
    raise AssertionError(f"{len(got)} of {n} completions")


@dataclass
class Player:
    ctx: Context
    pd: PD
    cq: CQ
    mr: MR
    qp: QP

    def poll(self, n: int = 1) -> list[WC]:
        """``n`` completions of the player's CQ (:func:`poll_cq`)."""
        return poll_cq(self.cq, n)

    def ah(self) -> AH:
        gr = GlobalRoute(dgid=self.ctx.query_gid(1, 0), sgid_index=0)
        return AH(self.pd, attr=AHAttr(port_num=1, is_global=1, gr=gr))


def player(
    dev: str, qp_type: int = e.IBV_QPT_RC, size: int = 8192, access: int = ALL_ACCESS
) -> Player:
    ctx = Context(name=dev)
    pd = PD(ctx)
    cq = CQ(ctx, 64)
    mr = MR(pd, size, access)
    attr = QPAttr(port_num=1)
    if qp_type == e.IBV_QPT_UD:
        attr.qkey = UD_QKEY
    else:
        attr.qp_access_flags = ALL_ACCESS
    init = QPInitAttr(qp_type=qp_type, scq=cq, rcq=cq, cap=QPCap(max_send_wr=16, max_recv_wr=16))
    return Player(ctx, pd, cq, mr, QP(pd, init, attr))


def qpex_init_attr(p: Player, send_ops_flags: int, qp_type: int = e.IBV_QPT_RC) -> QPInitAttrEx:
    """The ``QPInitAttrEx`` of a ``QPEx`` on ``p``'s PD and CQ with
    ``send_ops_flags``, 8 WRs each way."""
    return QPInitAttrEx(
        qp_type=qp_type,
        scq=p.cq,
        rcq=p.cq,
        cap=QPCap(8, 8),
        pd=p.pd,
        comp_mask=e.IBV_QP_INIT_ATTR_PD | e.IBV_QP_INIT_ATTR_SEND_OPS_FLAGS,
        send_ops_flags=send_ops_flags,
    )


def rc_to_rts(qp: QP, ctx: Context, dest_qpn: int, access: int = ALL_ACCESS) -> None:
    """An RC (or XRC) QP to RTS, aimed at QP ``dest_qpn`` of this host."""
    attr = QPAttr(port_num=1)
    attr.qp_access_flags = access
    attr.path_mtu = e.IBV_MTU_1024
    attr.max_dest_rd_atomic = 4
    attr.max_rd_atomic = 4
    attr.min_rnr_timer = 12
    attr.timeout = 14
    attr.retry_cnt = 7
    attr.rnr_retry = 7
    attr.dest_qp_num = dest_qpn
    gr = GlobalRoute(dgid=ctx.query_gid(1, 0), sgid_index=0)
    attr.ah_attr = AHAttr(port_num=1, is_global=1, gr=gr)
    qp.to_rts(attr)


def connect(a: Player, b: Player) -> None:
    """RC: both QPs to RTS, each aimed at the other."""
    for x, y in ((a, b), (b, a)):
        rc_to_rts(x.qp, x.ctx, y.qp.qp_num)
