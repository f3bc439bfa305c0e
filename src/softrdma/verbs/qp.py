"""Queue pairs (``struct ib_qp``; ``ib_create_qp``, ``ib_modify_qp`` with
the IBTA state machine of ``ib_modify_qp_is_ok``, ``ib_post_send``,
``ib_post_recv``, ``ib_query_qp``, ``ib_destroy_qp``).

States: RESET → INIT → RTR → RTS ⇄ SQD, SQE → RTS (UD), any → ERR, any →
RESET. Each transition has required and optional attributes per QP type
(IBTA vol. 1 §11.2.5, the kernel's ``qp_state_table``); anything else is
``EINVAL``. Posting in ERR is allowed and completes with
``IB_WC_WR_FLUSH_ERR``.
"""

from __future__ import annotations

import copy
import enum
import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from softrdma.verbs.ah import AhAttr
from softrdma.verbs.enums import (
    IbAccess,
    IbMtu,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbSendFlags,
    IbWrOpcode,
)
from softrdma.verbs.errors import PostError, VerbsError
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, RegWR, SendWR, UdWR

if TYPE_CHECKING:
    from softrdma.verbs.cq import CompletionQueue
    from softrdma.verbs.device import EventHandler
    from softrdma.verbs.pd import ProtectionDomain

M = IbQpAttrMask
S = IbQpState


class IbSigType(enum.IntEnum):
    """``enum ib_sig_type``."""

    ALL_WR = 0
    REQ_WR = 1


@dataclass
class QpCap:
    """``struct ib_qp_cap``."""

    max_send_wr: int = 64
    max_recv_wr: int = 64
    max_send_sge: int = 4
    max_recv_sge: int = 4
    max_inline_data: int = 0


@dataclass
class QpInitAttr:
    """``struct ib_qp_init_attr``."""

    qp_type: IbQpType
    send_cq: CompletionQueue
    recv_cq: CompletionQueue
    cap: QpCap = field(default_factory=QpCap)
    sq_sig_type: IbSigType = IbSigType.REQ_WR
    event_handler: EventHandler | None = None


@dataclass
class QpAttr:
    """``struct ib_qp_attr``; which fields matter is given by the mask."""

    qp_state: IbQpState = IbQpState.RESET
    cur_qp_state: IbQpState = IbQpState.RESET
    path_mtu: IbMtu = IbMtu.MTU_1024
    qkey: int = 0
    rq_psn: int = 0
    sq_psn: int = 0
    dest_qp_num: int = 0
    qp_access_flags: IbAccess = IbAccess.LOCAL_WRITE
    ah_attr: AhAttr | None = None
    pkey_index: int = 0
    port_num: int = 1
    max_rd_atomic: int = 1
    max_dest_rd_atomic: int = 1
    min_rnr_timer: int = 12
    timeout: int = 14
    retry_cnt: int = 7
    rnr_retry: int = 7
    en_sqd_async_notify: bool = False


_CONNECTED_OPT_RTS = M.CUR_STATE | M.ACCESS_FLAGS | M.ALT_PATH | M.MIN_RNR_TIMER | M.PATH_MIG_STATE
_UD_OPT = M.CUR_STATE | M.QKEY

# (from, to) -> {qp type: (required, optional)}; types missing = invalid.
_RC, _UD = IbQpType.RC, IbQpType.UD
_TABLE: dict[tuple[IbQpState, IbQpState], dict[IbQpType, tuple[int, int]]] = {
    (S.RESET, S.INIT): {
        _RC: (M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS, 0),
        _UD: (M.PKEY_INDEX | M.PORT | M.QKEY, 0),
    },
    (S.INIT, S.INIT): {
        _RC: (0, M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS),
        _UD: (0, M.PKEY_INDEX | M.PORT | M.QKEY),
    },
    (S.INIT, S.RTR): {
        _RC: (
            M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN | M.MAX_DEST_RD_ATOMIC | M.MIN_RNR_TIMER,
            M.ALT_PATH | M.ACCESS_FLAGS | M.PKEY_INDEX,
        ),
        _UD: (0, M.PKEY_INDEX | M.QKEY),
    },
    (S.RTR, S.RTS): {
        _RC: (
            M.TIMEOUT | M.RETRY_CNT | M.RNR_RETRY | M.SQ_PSN | M.MAX_QP_RD_ATOMIC,
            _CONNECTED_OPT_RTS,
        ),
        _UD: (M.SQ_PSN, _UD_OPT),
    },
    (S.RTS, S.RTS): {_RC: (0, _CONNECTED_OPT_RTS), _UD: (0, _UD_OPT)},
    (S.RTS, S.SQD): {_RC: (0, M.EN_SQD_ASYNC_NOTIFY), _UD: (0, M.EN_SQD_ASYNC_NOTIFY)},
    (S.SQD, S.RTS): {_RC: (0, _CONNECTED_OPT_RTS), _UD: (0, _UD_OPT)},
    (S.SQD, S.SQD): {
        _RC: (
            0,
            M.PKEY_INDEX
            | M.QKEY
            | M.AV
            | M.ALT_PATH
            | M.ACCESS_FLAGS
            | M.PATH_MTU
            | M.TIMEOUT
            | M.RETRY_CNT
            | M.RNR_RETRY
            | M.MAX_QP_RD_ATOMIC
            | M.MAX_DEST_RD_ATOMIC
            | M.MIN_RNR_TIMER
            | M.PATH_MIG_STATE,
        ),
        _UD: (0, M.PKEY_INDEX | M.QKEY),
    },
    (S.SQE, S.RTS): {_UD: (0, _UD_OPT)},
}
for _state in S:
    _TABLE[(_state, S.RESET)] = {_RC: (0, 0), _UD: (0, 0)}
    _TABLE[(_state, S.ERR)] = {_RC: (0, 0), _UD: (0, 0)}

_RC_OPCODES = frozenset(IbWrOpcode)
_UD_OPCODES = frozenset({IbWrOpcode.SEND, IbWrOpcode.SEND_WITH_IMM})
_W = TypeVar("_W", SendWR, RecvWR)


def _base_type(qp_type: IbQpType) -> IbQpType:
    return _UD if qp_type in (IbQpType.UD, IbQpType.GSI, IbQpType.SMI) else qp_type


def ib_modify_qp_is_ok(cur: IbQpState, new: IbQpState, qp_type: IbQpType, mask: int) -> str | None:
    """``ib_modify_qp_is_ok``: None if allowed, else why not."""
    row = _TABLE.get((cur, new))
    if row is None or _base_type(qp_type) not in row:
        return f"no transition {cur.name} -> {new.name} for {qp_type.name}"
    required, optional = row[_base_type(qp_type)]
    if mask & M.CUR_STATE and cur not in (S.SQD, S.SQE, S.RTS) and new == S.RTS:
        return "IB_QP_CUR_STATE only from RTS, SQD or SQE"
    missing = required & ~mask
    if missing:
        return f"{cur.name} -> {new.name} requires {M(missing)!r}"
    extra = mask & ~(required | optional | M.STATE)
    if extra:
        return f"{cur.name} -> {new.name} does not take {M(extra)!r}"
    return None


class QueuePair:
    """``struct ib_qp``. Create with ``device.create_qp(pd, init_attr)``."""

    def __init__(self, pd: ProtectionDomain, init_attr: QpInitAttr, qp_num: int) -> None:
        device = pd.device
        cap = init_attr.cap
        attrs = device.attrs
        if init_attr.qp_type not in (IbQpType.RC, IbQpType.UD, IbQpType.GSI):
            raise VerbsError(errno.EOPNOTSUPP, f"{init_attr.qp_type.name} QPs are not supported")
        for name, value, limit in (
            ("max_send_wr", cap.max_send_wr, attrs.max_qp_wr),
            ("max_recv_wr", cap.max_recv_wr, attrs.max_qp_wr),
            ("max_send_sge", cap.max_send_sge, attrs.max_send_sge),
            ("max_recv_sge", cap.max_recv_sge, attrs.max_recv_sge),
            ("max_inline_data", cap.max_inline_data, attrs.max_inline_data),
        ):
            if not 0 <= value <= limit:
                raise VerbsError(errno.EINVAL, f"{name} {value} outside 0..{limit}")
        for cq in (init_attr.send_cq, init_attr.recv_cq):
            if cq.device is not device or cq.destroyed:
                raise VerbsError(errno.EINVAL, "CQ of another device, or destroyed")
        self.pd = pd
        self.device = device
        self.qp_num = qp_num
        self.qp_type = init_attr.qp_type
        self.init_attr = init_attr
        self.send_cq = init_attr.send_cq
        self.recv_cq = init_attr.recv_cq
        self.cap = copy.copy(cap)
        self.event_handler = init_attr.event_handler
        self.attr = QpAttr()
        self.state = IbQpState.RESET
        self.sq_outstanding = 0
        self.rq_outstanding = 0
        self.destroyed = False
        pd.usecnt += 1
        self.send_cq.usecnt += 1
        self.recv_cq.usecnt += 1

    def __repr__(self) -> str:
        return f"QueuePair({self.qp_type.name} {self.qp_num:#x} on {self.device.name}, {self.state.name})"

    @property
    def sq_sig_all(self) -> bool:
        return self.init_attr.sq_sig_type == IbSigType.ALL_WR

    # -- ib_modify_qp ---------------------------------------------------------------

    def modify(self, attr: QpAttr, mask: int) -> None:
        """``ib_modify_qp``: validate the transition and the values, then
        apply them."""
        with self.device.lock:
            self._alive()
            mask = M(mask)
            new = attr.qp_state if mask & M.STATE else self.state
            if mask & M.CUR_STATE and attr.cur_qp_state != self.state:
                raise VerbsError(
                    errno.EINVAL,
                    f"cur_qp_state {attr.cur_qp_state.name} but QP is {self.state.name}",
                )
            why = ib_modify_qp_is_ok(self.state, new, self.qp_type, mask)
            if why is not None:
                raise VerbsError(errno.EINVAL, why)
            self._check_values(attr, mask)
            for m, name in _FIELDS:
                if mask & m:
                    setattr(self.attr, name, copy.copy(getattr(attr, name)))
            self.state = new
            self.attr.qp_state = new
            if new == S.RESET:
                self.sq_outstanding = self.rq_outstanding = 0
            self.device.ops_modify_qp(self, attr, mask)

    def _check_values(self, attr: QpAttr, mask: int) -> None:
        dev = self.device
        checks = (
            (M.PORT, attr.port_num == 1, "port_num must be 1"),
            (M.PKEY_INDEX, attr.pkey_index == 0, "pkey_index must be 0 (default P_Key)"),
            (M.PATH_MTU, attr.path_mtu <= dev.query_port().max_mtu, "path_mtu above the port's"),
            (M.RQ_PSN, 0 <= attr.rq_psn < 1 << 24, "rq_psn is 24 bits"),
            (M.SQ_PSN, 0 <= attr.sq_psn < 1 << 24, "sq_psn is 24 bits"),
            (M.DEST_QPN, 0 < attr.dest_qp_num < 1 << 24, "dest_qp_num is 24 bits, not 0"),
            (M.TIMEOUT, 0 <= attr.timeout < 32, "timeout is 5 bits"),
            (M.RETRY_CNT, 0 <= attr.retry_cnt < 8, "retry_cnt is 3 bits"),
            (M.RNR_RETRY, 0 <= attr.rnr_retry < 8, "rnr_retry is 3 bits"),
            (M.MIN_RNR_TIMER, 0 <= attr.min_rnr_timer < 32, "min_rnr_timer is 5 bits"),
            (
                M.MAX_QP_RD_ATOMIC,
                0 <= attr.max_rd_atomic <= dev.attrs.max_qp_init_rd_atom,
                f"max_rd_atomic above {dev.attrs.max_qp_init_rd_atom}",
            ),
            (
                M.MAX_DEST_RD_ATOMIC,
                0 <= attr.max_dest_rd_atomic <= dev.attrs.max_qp_rd_atom,
                f"max_dest_rd_atomic above {dev.attrs.max_qp_rd_atom}",
            ),
            (M.QKEY, 0 <= attr.qkey < 1 << 32, "qkey is 32 bits"),
            (
                M.AV,
                attr.ah_attr is not None and attr.ah_attr.sgid_index in (0, 1),
                "AV needs ah_attr with sgid_index 0 or 1",
            ),
            (
                M.ACCESS_FLAGS,
                not attr.qp_access_flags
                & ~(
                    IbAccess.LOCAL_WRITE
                    | IbAccess.REMOTE_WRITE
                    | IbAccess.REMOTE_READ
                    | IbAccess.REMOTE_ATOMIC
                ),
                "unsupported qp_access_flags",
            ),
        )
        for m, ok, why in checks:
            if mask & m and not ok:
                raise VerbsError(errno.EINVAL, why)

    def query(self) -> tuple[QpAttr, QpInitAttr]:
        """``ib_query_qp``."""
        return copy.copy(self.attr), self.init_attr

    # -- posting -----------------------------------------------------------------------

    def post_send(self, wrs: SendWR | Sequence[SendWR]) -> None:
        """``ib_post_send``: the work requests before the first bad one are
        posted; the bad one is in :class:`PostError`'s ``bad_wr``."""
        with self.device.lock:
            batch = _as_list(wrs)
            self._alive()
            if self.state in (S.RESET, S.INIT, S.RTR):
                raise PostError(
                    errno.EINVAL,
                    f"post_send on a QP in {self.state.name}",
                    batch[0] if batch else None,
                )
            good: list[SendWR] = []
            try:
                for wr in batch:
                    self._check_send(wr, self.sq_outstanding + len(good))
                    good.append(wr)
            finally:
                if good:
                    self.sq_outstanding += len(good)
                    self.device.ops_post_send(self, good)

    def _check_send(self, wr: SendWR, queued: int) -> None:
        def bad(err: int, why: str) -> PostError:
            return PostError(err, f"QP {self.qp_num:#x}: {why}", wr)

        if queued >= self.cap.max_send_wr:
            raise bad(errno.ENOMEM, f"send queue full ({self.cap.max_send_wr} WRs)")
        allowed = _UD_OPCODES if _base_type(self.qp_type) == _UD else _RC_OPCODES
        if wr.opcode not in allowed:
            raise bad(errno.EINVAL, f"{wr.opcode.name} is not valid on a {self.qp_type.name} QP")
        if wr.send_flags & IbSendFlags.INLINE:
            if wr.length > self.cap.max_inline_data:
                raise bad(
                    errno.EINVAL,
                    f"{wr.length} inline bytes > max_inline_data {self.cap.max_inline_data}",
                )
        elif len(wr.sg_list) > self.cap.max_send_sge:
            raise bad(
                errno.EINVAL, f"{len(wr.sg_list)} SGEs > max_send_sge {self.cap.max_send_sge}"
            )
        if any(s.length < 0 or s.length >= 1 << 32 for s in wr.sg_list):
            raise bad(errno.EINVAL, "SGE length out of range")
        if wr.length > 1 << 31:
            raise bad(errno.EINVAL, "message larger than 2 GiB")
        op = wr.opcode
        if op in (IbWrOpcode.RDMA_WRITE, IbWrOpcode.RDMA_WRITE_WITH_IMM, IbWrOpcode.RDMA_READ):
            if not isinstance(wr, RdmaWR):
                raise bad(errno.EINVAL, f"{op.name} needs an RdmaWR (remote_addr, rkey)")
        elif op in (IbWrOpcode.ATOMIC_CMP_AND_SWP, IbWrOpcode.ATOMIC_FETCH_AND_ADD):
            if not isinstance(wr, AtomicWR):
                raise bad(errno.EINVAL, f"{op.name} needs an AtomicWR")
            if len(wr.sg_list) != 1 or wr.sg_list[0].length != 8:
                raise bad(errno.EINVAL, "an atomic needs one 8-byte SGE for the original value")
        elif op == IbWrOpcode.REG_MR and (not isinstance(wr, RegWR) or wr.mr is None):
            raise bad(errno.EINVAL, "REG_MR needs a RegWR with an MR")
        if _base_type(self.qp_type) == _UD and (not isinstance(wr, UdWR) or wr.ah is None):
            raise bad(errno.EINVAL, "a UD send needs a UdWR with an address handle")

    def post_recv(self, wrs: RecvWR | Sequence[RecvWR]) -> None:
        """``ib_post_recv``."""
        with self.device.lock:
            batch = _as_list(wrs)
            self._alive()
            if self.state == S.RESET:
                raise PostError(
                    errno.EINVAL, "post_recv on a QP in RESET", batch[0] if batch else None
                )
            good: list[RecvWR] = []
            try:
                for wr in batch:
                    if self.rq_outstanding + len(good) >= self.cap.max_recv_wr:
                        raise PostError(
                            errno.ENOMEM, f"receive queue full ({self.cap.max_recv_wr} WRs)", wr
                        )
                    if len(wr.sg_list) > self.cap.max_recv_sge:
                        raise PostError(errno.EINVAL, f"{len(wr.sg_list)} SGEs > max_recv_sge", wr)
                    good.append(wr)
            finally:
                if good:
                    self.rq_outstanding += len(good)
                    self.device.ops_post_recv(self, good)

    def to_error(self, reason: str = "") -> None:
        """Move to ERR from inside the driver (a fatal error); flushes."""
        if self.state != S.ERR and not self.destroyed:
            self.modify(QpAttr(qp_state=S.ERR), M.STATE)

    def destroy(self) -> None:
        """``ib_destroy_qp``."""
        with self.device.lock:
            if self.destroyed:
                return
            self.device.ops_destroy_qp(self)
            self.destroyed = True
            self.device._forget_qp(self)
            self.pd.usecnt -= 1
            self.send_cq.usecnt -= 1
            self.recv_cq.usecnt -= 1

    def _alive(self) -> None:
        if self.destroyed:
            raise VerbsError(errno.EINVAL, f"QP {self.qp_num:#x} is destroyed")


_FIELDS = (
    (M.CUR_STATE, "cur_qp_state"),
    (M.EN_SQD_ASYNC_NOTIFY, "en_sqd_async_notify"),
    (M.ACCESS_FLAGS, "qp_access_flags"),
    (M.PKEY_INDEX, "pkey_index"),
    (M.PORT, "port_num"),
    (M.QKEY, "qkey"),
    (M.AV, "ah_attr"),
    (M.PATH_MTU, "path_mtu"),
    (M.TIMEOUT, "timeout"),
    (M.RETRY_CNT, "retry_cnt"),
    (M.RNR_RETRY, "rnr_retry"),
    (M.RQ_PSN, "rq_psn"),
    (M.MAX_QP_RD_ATOMIC, "max_rd_atomic"),
    (M.MIN_RNR_TIMER, "min_rnr_timer"),
    (M.SQ_PSN, "sq_psn"),
    (M.MAX_DEST_RD_ATOMIC, "max_dest_rd_atomic"),
    (M.DEST_QPN, "dest_qp_num"),
)


def _as_list(wrs: _W | Sequence[_W]) -> list[_W]:
    if isinstance(wrs, (SendWR, RecvWR)):
        return [wrs]
    return list(wrs)


def connect_qp(
    qp: QueuePair,
    *,
    dest_qp_num: int,
    dgid: bytes,
    rq_psn: int = 0,
    sq_psn: int = 0,
    path_mtu: IbMtu | None = None,
    access: IbAccess = IbAccess.LOCAL_WRITE
    | IbAccess.REMOTE_WRITE
    | IbAccess.REMOTE_READ
    | IbAccess.REMOTE_ATOMIC,
    max_rd_atomic: int = 16,
    timeout: int = 14,
    retry_cnt: int = 7,
    rnr_retry: int = 7,
    min_rnr_timer: int = 12,
) -> None:
    """RESET → INIT → RTR → RTS for an RC QP, the three ``ib_modify_qp``
    calls every RC consumer makes (what ``rdma_cm`` does for it)."""
    mtu = qp.device.query_port().active_mtu if path_mtu is None else path_mtu
    qp.modify(
        QpAttr(qp_state=S.INIT, pkey_index=0, port_num=1, qp_access_flags=access),
        M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS,
    )
    qp.modify(
        QpAttr(
            qp_state=S.RTR,
            ah_attr=AhAttr(dgid=dgid),
            path_mtu=mtu,
            dest_qp_num=dest_qp_num,
            rq_psn=rq_psn,
            max_dest_rd_atomic=max_rd_atomic,
            min_rnr_timer=min_rnr_timer,
        ),
        M.STATE
        | M.AV
        | M.PATH_MTU
        | M.DEST_QPN
        | M.RQ_PSN
        | M.MAX_DEST_RD_ATOMIC
        | M.MIN_RNR_TIMER,
    )
    qp.modify(
        QpAttr(
            qp_state=S.RTS,
            timeout=timeout,
            retry_cnt=retry_cnt,
            rnr_retry=rnr_retry,
            sq_psn=sq_psn,
            max_rd_atomic=max_rd_atomic,
        ),
        M.STATE | M.TIMEOUT | M.RETRY_CNT | M.RNR_RETRY | M.SQ_PSN | M.MAX_QP_RD_ATOMIC,
    )
