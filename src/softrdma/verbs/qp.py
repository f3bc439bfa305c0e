"""Queue pairs (``struct ib_qp``; ``ib_create_qp``, ``ib_modify_qp`` with
the IBTA state machine of ``ib_modify_qp_is_ok``, ``ib_post_send``,
``ib_post_recv``, ``ib_query_qp``, ``ib_destroy_qp``).

States: RESET → INIT → RTR → RTS ⇄ SQD, SQE → RTS (UD, UC), any → ERR, any →
RESET. Each transition has required and optional attributes per QP type
(IBTA vol. 1 §11.2.5, the kernel's ``qp_state_table``); anything else is
``EINVAL``. Posting in ERR is allowed and completes with
``IB_WC_WR_FLUSH_ERR``.

Who owns what: the verbs layer validates (the transition table, the
attribute values, the work requests' shape); the driver's QP — its
:class:`QpHardware`, rxe's ``struct rxe_qp`` around ``struct ib_qp`` —
owns the QP state, the attributes and the queues, and the verbs layer asks
it. A QP that fails moves itself to ERR in the driver; :attr:`QueuePair.state`
then says so.
"""

from __future__ import annotations

import copy
import enum
import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from softrdma.verbs.ah import AhAttr
from softrdma.verbs.enums import IbAccess, IbMtu, IbQpAttrMask, IbQpState, IbQpType, IbSendFlags
from softrdma.verbs.errors import PostError, VerbsError
from softrdma.verbs.wr import RecvWR, SendWR

if TYPE_CHECKING:
    from softrdma.verbs.cq import CompletionQueue
    from softrdma.verbs.device import EventHandler
    from softrdma.verbs.pd import ProtectionDomain
    from softrdma.verbs.srq import SharedReceiveQueue
    from softrdma.verbs.xrcd import XrcDomain


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
    sq_sig_type: IbSigType = IbSigType.ALL_WR
    event_handler: EventHandler | None = None
    srq: SharedReceiveQueue | None = None
    """Take receive WQEs from this SRQ (same PD) instead of a receive
    queue of the QP's own; ``cap.max_recv_wr`` / ``max_recv_sge`` are then
    ignored."""
    xrcd: XrcDomain | None = None
    """The XRC domain of an ``IB_QPT_XRC_TGT`` QP (create those with
    :meth:`XrcDomain.create_tgt_qp <softrdma.verbs.xrcd.XrcDomain.create_tgt_qp>`)."""


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


_CONNECTED_OPT_RTS = (
    IbQpAttrMask.CUR_STATE
    | IbQpAttrMask.ACCESS_FLAGS
    | IbQpAttrMask.ALT_PATH
    | IbQpAttrMask.MIN_RNR_TIMER
    | IbQpAttrMask.PATH_MIG_STATE
)
_UD_OPT = IbQpAttrMask.CUR_STATE | IbQpAttrMask.QKEY

_UC_OPT_RTS = (
    IbQpAttrMask.CUR_STATE
    | IbQpAttrMask.ACCESS_FLAGS
    | IbQpAttrMask.ALT_PATH
    | IbQpAttrMask.PATH_MIG_STATE
)

# (from, to) -> {qp type: (required, optional)}; types missing = invalid.
_RC, _UC, _UD = IbQpType.RC, IbQpType.UC, IbQpType.UD
_INLINE = int(IbSendFlags.INLINE)
_TABLE: dict[tuple[IbQpState, IbQpState], dict[IbQpType, tuple[int, int]]] = {
    (IbQpState.RESET, IbQpState.INIT): {
        _RC: (IbQpAttrMask.PKEY_INDEX | IbQpAttrMask.PORT | IbQpAttrMask.ACCESS_FLAGS, 0),
        _UC: (IbQpAttrMask.PKEY_INDEX | IbQpAttrMask.PORT | IbQpAttrMask.ACCESS_FLAGS, 0),
        _UD: (IbQpAttrMask.PKEY_INDEX | IbQpAttrMask.PORT | IbQpAttrMask.QKEY, 0),
    },
    (IbQpState.INIT, IbQpState.INIT): {
        _RC: (0, IbQpAttrMask.PKEY_INDEX | IbQpAttrMask.PORT | IbQpAttrMask.ACCESS_FLAGS),
        _UC: (0, IbQpAttrMask.PKEY_INDEX | IbQpAttrMask.PORT | IbQpAttrMask.ACCESS_FLAGS),
        _UD: (0, IbQpAttrMask.PKEY_INDEX | IbQpAttrMask.PORT | IbQpAttrMask.QKEY),
    },
    (IbQpState.INIT, IbQpState.RTR): {
        _RC: (
            IbQpAttrMask.AV
            | IbQpAttrMask.PATH_MTU
            | IbQpAttrMask.DEST_QPN
            | IbQpAttrMask.RQ_PSN
            | IbQpAttrMask.MAX_DEST_RD_ATOMIC
            | IbQpAttrMask.MIN_RNR_TIMER,
            IbQpAttrMask.ALT_PATH | IbQpAttrMask.ACCESS_FLAGS | IbQpAttrMask.PKEY_INDEX,
        ),
        _UC: (
            IbQpAttrMask.AV | IbQpAttrMask.PATH_MTU | IbQpAttrMask.DEST_QPN | IbQpAttrMask.RQ_PSN,
            IbQpAttrMask.ALT_PATH | IbQpAttrMask.ACCESS_FLAGS | IbQpAttrMask.PKEY_INDEX,
        ),
        _UD: (0, IbQpAttrMask.PKEY_INDEX | IbQpAttrMask.QKEY),
    },
    (IbQpState.RTR, IbQpState.RTS): {
        _RC: (
            IbQpAttrMask.TIMEOUT
            | IbQpAttrMask.RETRY_CNT
            | IbQpAttrMask.RNR_RETRY
            | IbQpAttrMask.SQ_PSN
            | IbQpAttrMask.MAX_QP_RD_ATOMIC,
            _CONNECTED_OPT_RTS,
        ),
        _UC: (IbQpAttrMask.SQ_PSN, _UC_OPT_RTS),
        _UD: (IbQpAttrMask.SQ_PSN, _UD_OPT),
    },
    (IbQpState.RTS, IbQpState.RTS): {
        _RC: (0, _CONNECTED_OPT_RTS),
        _UC: (0, _UC_OPT_RTS),
        _UD: (0, _UD_OPT),
    },
    (IbQpState.RTS, IbQpState.SQD): {
        _RC: (0, IbQpAttrMask.EN_SQD_ASYNC_NOTIFY),
        _UC: (0, IbQpAttrMask.EN_SQD_ASYNC_NOTIFY),
        _UD: (0, IbQpAttrMask.EN_SQD_ASYNC_NOTIFY),
    },
    (IbQpState.SQD, IbQpState.RTS): {
        _RC: (0, _CONNECTED_OPT_RTS),
        _UC: (0, _UC_OPT_RTS),
        _UD: (0, _UD_OPT),
    },
    (IbQpState.SQD, IbQpState.SQD): {
        _RC: (
            0,
            IbQpAttrMask.PKEY_INDEX
            | IbQpAttrMask.QKEY
            | IbQpAttrMask.AV
            | IbQpAttrMask.ALT_PATH
            | IbQpAttrMask.ACCESS_FLAGS
            | IbQpAttrMask.PATH_MTU
            | IbQpAttrMask.TIMEOUT
            | IbQpAttrMask.RETRY_CNT
            | IbQpAttrMask.RNR_RETRY
            | IbQpAttrMask.MAX_QP_RD_ATOMIC
            | IbQpAttrMask.MAX_DEST_RD_ATOMIC
            | IbQpAttrMask.MIN_RNR_TIMER
            | IbQpAttrMask.PATH_MIG_STATE,
        ),
        _UC: (
            0,
            IbQpAttrMask.AV
            | IbQpAttrMask.ALT_PATH
            | IbQpAttrMask.ACCESS_FLAGS
            | IbQpAttrMask.PATH_MIG_STATE,
        ),
        _UD: (0, IbQpAttrMask.PKEY_INDEX | IbQpAttrMask.QKEY),
    },
    (IbQpState.SQE, IbQpState.RTS): {
        _UC: (0, IbQpAttrMask.CUR_STATE | IbQpAttrMask.ACCESS_FLAGS),
        _UD: (0, _UD_OPT),
    },
}
for _state in IbQpState:
    _TABLE[(_state, IbQpState.RESET)] = {_RC: (0, 0), _UC: (0, 0), _UD: (0, 0)}
    _TABLE[(_state, IbQpState.ERR)] = {_RC: (0, 0), _UC: (0, 0), _UD: (0, 0)}
# XRC INI / TGT QPs move as RC ones (the kernel's qp_state_table), except that
# an INI (no responder) needs no responder attributes for RTR and a TGT (no
# requester) no requester attributes for RTS; they may still be given.
_XRC_INI, _XRC_TGT = IbQpType.XRC_INI, IbQpType.XRC_TGT
_RESPONDER_ATTRS = IbQpAttrMask.MAX_DEST_RD_ATOMIC | IbQpAttrMask.MIN_RNR_TIMER
_REQUESTER_ATTRS = IbQpAttrMask.RETRY_CNT | IbQpAttrMask.RNR_RETRY | IbQpAttrMask.MAX_QP_RD_ATOMIC
for _key, _row in _TABLE.items():
    if _RC in _row:
        _req, _opt = _row[_RC]
        _row[_XRC_INI] = _row[_XRC_TGT] = (_req, _opt)
        if _key == (IbQpState.INIT, IbQpState.RTR):
            _row[_XRC_INI] = (_req & ~_RESPONDER_ATTRS, _opt | _RESPONDER_ATTRS)
        elif _key == (IbQpState.RTR, IbQpState.RTS):
            _row[_XRC_TGT] = (_req & ~_REQUESTER_ATTRS, _opt | _REQUESTER_ATTRS)
_XRC_TYPES = (_XRC_INI, _XRC_TGT)

_W = TypeVar("_W", SendWR, RecvWR)


def _base_type(qp_type: IbQpType) -> IbQpType:
    return _UD if qp_type in (IbQpType.UD, IbQpType.GSI, IbQpType.SMI) else qp_type


def ib_modify_qp_is_ok(cur: IbQpState, new: IbQpState, qp_type: IbQpType, mask: int) -> str | None:
    """``ib_modify_qp_is_ok``: None if allowed, else why not."""
    row = _TABLE.get((cur, new))
    if row is None or _base_type(qp_type) not in row:
        return f"no transition {cur.name} -> {new.name} for {qp_type.name}"
    required, optional = row[_base_type(qp_type)]
    if (
        mask & IbQpAttrMask.CUR_STATE
        and cur not in (IbQpState.SQD, IbQpState.SQE, IbQpState.RTS)
        and new == IbQpState.RTS
    ):
        return "IB_QP_CUR_STATE only from RTS, SQD or SQE"
    missing = required & ~mask
    if missing:
        return f"{cur.name} -> {new.name} requires {IbQpAttrMask(missing)!r}"
    extra = mask & ~(required | optional | IbQpAttrMask.STATE)
    if extra:
        return f"{cur.name} -> {new.name} does not take {IbQpAttrMask(extra)!r}"
    return None


class QpHardware(Protocol):
    """The driver's side of a QP, which owns its state, attributes and
    queues (rxe's ``struct rxe_qp``); the verbs layer only asks it."""

    @property
    def state(self) -> IbQpState:
        """The QP state (``qp->attr.qp_state``) — the one source of truth."""
        ...

    @property
    def attr(self) -> QpAttr:
        """The attributes as last modified (``qp->attr``)."""
        ...

    @property
    def sq_outstanding(self) -> int:
        """Send work requests posted and not yet completed."""
        ...

    @property
    def rq_outstanding(self) -> int:
        """Receive work requests posted and not yet completed."""
        ...


def apply_qp_attr(dst: QpAttr, src: QpAttr, mask: int) -> None:
    """Copy the attributes ``mask`` selects from ``src`` into ``dst`` (what
    ``rxe_qp_from_attr`` does field by field), the state included."""
    for m, name in _FIELDS:
        if mask & m:
            setattr(dst, name, copy.copy(getattr(src, name)))
    if mask & IbQpAttrMask.STATE:
        dst.qp_state = src.qp_state


class QueuePair:
    """``struct ib_qp``. Create with ``device.create_qp(pd, init_attr)``; the
    driver attaches its :class:`QpHardware` as :attr:`hw`."""

    hw: QpHardware

    def __init__(self, pd: ProtectionDomain, init_attr: QpInitAttr, qp_num: int) -> None:
        device = pd.device
        cap = init_attr.cap
        attrs = device.attrs
        if init_attr.qp_type not in (
            IbQpType.RC, IbQpType.UC, IbQpType.UD, IbQpType.GSI, *_XRC_TYPES
        ):  # fmt: skip
            raise VerbsError(errno.EOPNOTSUPP, f"{init_attr.qp_type.name} QPs are not supported")
        if init_attr.qp_type in _XRC_TYPES or init_attr.xrcd is not None:
            from softrdma.verbs.xrcd import qp_init_check

            qp_init_check(init_attr)
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
        srq = init_attr.srq
        if srq is not None:
            if srq.destroyed or srq.pd is not pd:
                raise VerbsError(errno.EINVAL, "SRQ destroyed, or of another PD")
            if srq.xrcd is not None:
                raise VerbsError(errno.EINVAL, "an XRC SRQ serves XRC TGT QPs only")
            if init_attr.qp_type == IbQpType.GSI:
                raise VerbsError(errno.EINVAL, "the GSI QP has its own receive queue")
        self.pd = pd
        self.device = device
        self.qp_num = qp_num
        self.qp_type = init_attr.qp_type
        self.init_attr = init_attr
        self.send_cq = init_attr.send_cq
        self.recv_cq = init_attr.recv_cq
        self.cap = copy.copy(cap)
        self.event_handler = init_attr.event_handler
        self.srq = srq
        if srq is not None or self.qp_type in _XRC_TYPES:
            # No receive queue of its own: an SRQ's, or none at all (XRC).
            self.cap.max_recv_wr = self.cap.max_recv_sge = 0
        if srq is not None:
            srq.usecnt += 1
        self.xrcd = init_attr.xrcd
        if self.xrcd is not None:
            self.xrcd.attach(self)
        self.destroyed = False
        pd.usecnt += 1
        self.send_cq.usecnt += 1
        self.recv_cq.usecnt += 1

    def __repr__(self) -> str:
        state = self.hw.state.name if hasattr(self, "hw") else "?"
        return f"QueuePair({self.qp_type.name} {self.qp_num:#x} on {self.device.name}, {state})"

    @property
    def state(self) -> IbQpState:
        """The QP state, as the driver has it (``ib_query_qp``'s ``qp_state``)."""
        return self.hw.state

    @property
    def sq_sig_all(self) -> bool:
        return self.init_attr.sq_sig_type == IbSigType.ALL_WR

    # -- ib_modify_qp ---------------------------------------------------------------

    def modify(self, attr: QpAttr, mask: int) -> None:
        """``ib_modify_qp``: validate the transition and the values, then let
        the driver apply them."""
        with self.device.lock:
            self._alive()
            mask = IbQpAttrMask(mask)
            cur = self.hw.state
            new = attr.qp_state if mask & IbQpAttrMask.STATE else cur
            if mask & IbQpAttrMask.CUR_STATE and attr.cur_qp_state != cur:
                raise VerbsError(
                    errno.EINVAL, f"cur_qp_state {attr.cur_qp_state.name} but QP is {cur.name}"
                )
            why = ib_modify_qp_is_ok(cur, new, self.qp_type, mask)
            if why is not None:
                raise VerbsError(errno.EINVAL, why)
            self._check_values(attr, mask)
            if not mask & IbQpAttrMask.STATE:
                attr = copy.copy(attr)
                attr.qp_state = cur
            self.device.ops_modify_qp(self, attr, mask | IbQpAttrMask.STATE)

    def _check_values(self, attr: QpAttr, mask: int) -> None:
        dev = self.device
        checks = (
            (IbQpAttrMask.PORT, attr.port_num == 1, "port_num must be 1"),
            (IbQpAttrMask.PKEY_INDEX, attr.pkey_index == 0, "pkey_index must be 0 (default P_Key)"),
            (
                IbQpAttrMask.PATH_MTU,
                attr.path_mtu <= dev.query_port().max_mtu,
                "path_mtu above the port's",
            ),
            (IbQpAttrMask.RQ_PSN, 0 <= attr.rq_psn < 1 << 24, "rq_psn is 24 bits"),
            (IbQpAttrMask.SQ_PSN, 0 <= attr.sq_psn < 1 << 24, "sq_psn is 24 bits"),
            (
                IbQpAttrMask.DEST_QPN,
                0 < attr.dest_qp_num < 1 << 24,
                "dest_qp_num is 24 bits, not 0",
            ),
            (IbQpAttrMask.TIMEOUT, 0 <= attr.timeout < 32, "timeout is 5 bits"),
            (IbQpAttrMask.RETRY_CNT, 0 <= attr.retry_cnt < 8, "retry_cnt is 3 bits"),
            (IbQpAttrMask.RNR_RETRY, 0 <= attr.rnr_retry < 8, "rnr_retry is 3 bits"),
            (IbQpAttrMask.MIN_RNR_TIMER, 0 <= attr.min_rnr_timer < 32, "min_rnr_timer is 5 bits"),
            (
                IbQpAttrMask.MAX_QP_RD_ATOMIC,
                0 <= attr.max_rd_atomic <= dev.attrs.max_qp_init_rd_atom,
                f"max_rd_atomic above {dev.attrs.max_qp_init_rd_atom}",
            ),
            (
                IbQpAttrMask.MAX_DEST_RD_ATOMIC,
                0 <= attr.max_dest_rd_atomic <= dev.attrs.max_qp_rd_atom,
                f"max_dest_rd_atomic above {dev.attrs.max_qp_rd_atom}",
            ),
            (IbQpAttrMask.QKEY, 0 <= attr.qkey < 1 << 32, "qkey is 32 bits"),
            (
                IbQpAttrMask.AV,
                attr.ah_attr is not None and attr.ah_attr.sgid_index in (0, 1),
                "AV needs ah_attr with sgid_index 0 or 1",
            ),
            (
                IbQpAttrMask.ACCESS_FLAGS,
                not attr.qp_access_flags
                & ~(
                    IbAccess.LOCAL_WRITE
                    | IbAccess.REMOTE_WRITE
                    | IbAccess.REMOTE_READ
                    | IbAccess.REMOTE_ATOMIC
                    # Checked by the responder against a FLUSH's placement
                    # type (rxe check_qp_attr_access).
                    | IbAccess.FLUSH_GLOBAL
                    | IbAccess.FLUSH_PERSISTENT
                ),
                "unsupported qp_access_flags",
            ),
        )
        for m, ok, why in checks:
            if mask & m and not ok:
                raise VerbsError(errno.EINVAL, why)

    def query(self) -> tuple[QpAttr, QpInitAttr]:
        """``ib_query_qp``: the driver's attributes (a copy) and the init
        attributes."""
        with self.device.lock:
            attr = copy.copy(self.hw.attr)
            attr.qp_state = attr.cur_qp_state = self.hw.state
        return attr, self.init_attr

    # -- posting -----------------------------------------------------------------------

    def post_send(self, wrs: SendWR | Sequence[SendWR]) -> None:
        """``ib_post_send``: the work requests before the first bad one are
        posted; the bad one is in :class:`PostError`'s ``bad_wr``. The
        driver checks what is specific to the opcode (as rxe's
        ``validate_send_wr``)."""
        with self.device.lock:
            batch = _as_list(wrs)
            self._alive()
            state = self.hw.state
            if state in (IbQpState.RESET, IbQpState.INIT, IbQpState.RTR):
                raise PostError(
                    errno.EINVAL, f"post_send on a QP in {state.name}", batch[0] if batch else None
                )
            if self.qp_type == IbQpType.XRC_TGT:
                raise PostError(
                    errno.EINVAL, "an XRC TGT QP has no send queue", batch[0] if batch else None
                )
            good: list[SendWR] = []
            queued = self.hw.sq_outstanding
            try:
                for wr in batch:
                    self._check_send(wr, queued + len(good))
                    good.append(wr)
            finally:
                if good:
                    self.device.ops_post_send(self, good)

    def _check_send(self, wr: SendWR, queued: int) -> None:
        cap = self.cap
        bad = self._bad_wr
        if queued >= cap.max_send_wr:
            raise bad(errno.ENOMEM, f"send queue full ({cap.max_send_wr} WRs)", wr)
        if int(wr.send_flags) & _INLINE:  # (int: IntFlag's & is slow, once per WR)
            if wr.length > cap.max_inline_data:
                raise bad(
                    errno.EINVAL,
                    f"{wr.length} inline bytes > max_inline_data {cap.max_inline_data}",
                    wr,
                )
        elif len(wr.sg_list) > cap.max_send_sge:
            raise bad(errno.EINVAL, f"{len(wr.sg_list)} SGEs > max_send_sge {cap.max_send_sge}", wr)
        total = 0
        for s in wr.sg_list:
            n = s.length
            if not 0 <= n < 1 << 32:
                raise bad(errno.EINVAL, "SGE length out of range", wr)
            total += n
        if total > 1 << 31:
            raise bad(errno.EINVAL, "message larger than 2 GiB", wr)
        if self.qp_type == IbQpType.XRC_INI and not 0 <= wr.xrc_remote_srqn < 1 << 24:
            raise bad(errno.EINVAL, "xrc_remote_srqn is 24 bits", wr)

    def _bad_wr(self, err: int, why: str, wr: SendWR) -> PostError:
        return PostError(err, f"QP {self.qp_num:#x}: {why}", wr)

    def post_recv(self, wrs: RecvWR | Sequence[RecvWR]) -> None:
        """``ib_post_recv``."""
        with self.device.lock:
            batch = _as_list(wrs)
            self._alive()
            if self.hw.state == IbQpState.RESET:
                raise PostError(
                    errno.EINVAL, "post_recv on a QP in RESET", batch[0] if batch else None
                )
            if self.srq is not None:
                raise PostError(
                    errno.EINVAL,
                    f"QP {self.qp_num:#x} receives from SRQ {self.srq.srq_num:#x}",
                    batch[0] if batch else None,
                )
            if self.qp_type in _XRC_TYPES:
                raise PostError(
                    errno.EINVAL,
                    f"XRC QP {self.qp_num:#x} has no receive queue",
                    batch[0] if batch else None,
                )
            good: list[RecvWR] = []
            queued = self.hw.rq_outstanding
            try:
                for wr in batch:
                    if queued + len(good) >= self.cap.max_recv_wr:
                        raise PostError(
                            errno.ENOMEM, f"receive queue full ({self.cap.max_recv_wr} WRs)", wr
                        )
                    if len(wr.sg_list) > self.cap.max_recv_sge:
                        raise PostError(errno.EINVAL, f"{len(wr.sg_list)} SGEs > max_recv_sge", wr)
                    good.append(wr)
            finally:
                if good:
                    self.device.ops_post_recv(self, good)

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
            if self.srq is not None:
                self.srq.usecnt -= 1
            if self.xrcd is not None:
                self.xrcd.detach(self)

    def _alive(self) -> None:
        if self.destroyed:
            raise VerbsError(errno.EINVAL, f"QP {self.qp_num:#x} is destroyed")


_FIELDS = (
    (IbQpAttrMask.CUR_STATE, "cur_qp_state"),
    (IbQpAttrMask.EN_SQD_ASYNC_NOTIFY, "en_sqd_async_notify"),
    (IbQpAttrMask.ACCESS_FLAGS, "qp_access_flags"),
    (IbQpAttrMask.PKEY_INDEX, "pkey_index"),
    (IbQpAttrMask.PORT, "port_num"),
    (IbQpAttrMask.QKEY, "qkey"),
    (IbQpAttrMask.AV, "ah_attr"),
    (IbQpAttrMask.PATH_MTU, "path_mtu"),
    (IbQpAttrMask.TIMEOUT, "timeout"),
    (IbQpAttrMask.RETRY_CNT, "retry_cnt"),
    (IbQpAttrMask.RNR_RETRY, "rnr_retry"),
    (IbQpAttrMask.RQ_PSN, "rq_psn"),
    (IbQpAttrMask.MAX_QP_RD_ATOMIC, "max_rd_atomic"),
    (IbQpAttrMask.MIN_RNR_TIMER, "min_rnr_timer"),
    (IbQpAttrMask.SQ_PSN, "sq_psn"),
    (IbQpAttrMask.MAX_DEST_RD_ATOMIC, "max_dest_rd_atomic"),
    (IbQpAttrMask.DEST_QPN, "dest_qp_num"),
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
        QpAttr(qp_state=IbQpState.INIT, pkey_index=0, port_num=1, qp_access_flags=access),
        IbQpAttrMask.STATE
        | IbQpAttrMask.PKEY_INDEX
        | IbQpAttrMask.PORT
        | IbQpAttrMask.ACCESS_FLAGS,
    )
    qp.modify(
        QpAttr(
            qp_state=IbQpState.RTR,
            ah_attr=AhAttr(dgid=dgid),
            path_mtu=mtu,
            dest_qp_num=dest_qp_num,
            rq_psn=rq_psn,
            max_dest_rd_atomic=max_rd_atomic,
            min_rnr_timer=min_rnr_timer,
        ),
        IbQpAttrMask.STATE
        | IbQpAttrMask.AV
        | IbQpAttrMask.PATH_MTU
        | IbQpAttrMask.DEST_QPN
        | IbQpAttrMask.RQ_PSN
        | IbQpAttrMask.MAX_DEST_RD_ATOMIC
        | IbQpAttrMask.MIN_RNR_TIMER,
    )
    qp.modify(
        QpAttr(
            qp_state=IbQpState.RTS,
            timeout=timeout,
            retry_cnt=retry_cnt,
            rnr_retry=rnr_retry,
            sq_psn=sq_psn,
            max_rd_atomic=max_rd_atomic,
        ),
        IbQpAttrMask.STATE
        | IbQpAttrMask.TIMEOUT
        | IbQpAttrMask.RETRY_CNT
        | IbQpAttrMask.RNR_RETRY
        | IbQpAttrMask.SQ_PSN
        | IbQpAttrMask.MAX_QP_RD_ATOMIC,
    )
