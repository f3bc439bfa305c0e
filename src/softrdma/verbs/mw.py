"""Memory windows (``struct ib_mw``; ``ib_alloc_mw`` / ``uverbs_dealloc_mw``,
the HCA side of ``rxe_mw.c``: ``rxe_bind_mw``, ``rxe_invalidate_mw``,
``rxe_lookup_mw``).

A window grants remote access to a range of an MR that allows
``IB_ACCESS_MW_BIND``, under a key of its own, without registering
anything. Its key is ``index << 8 | key byte`` in the same index space as
the MRs, so one rkey names an MR or a window, never both.

* Type 1 — bound and unbound (length 0) by ``ibv_bind_mw``, which posts a
  bind work request; valid from allocation; any QP of the window's PD may
  use its key; it cannot be invalidated.
* Type 2 (2B) — free until an ``IB_WR_BIND_MW`` binds it (to the posting
  QP: only that QP's peer may use the key); ``IB_WR_LOCAL_INV`` or a
  peer's SEND_WITH_INVALIDATE of its key frees it again.

A bind that breaks a rule completes with ``IB_WC_MW_BIND_ERR``; a remote
access outside the bound range or access rights is an R_Key violation.
Windows are virtually addressed: a zero-based bind (``IB_ZERO_BASED``) is
refused with ``IB_WC_MW_BIND_ERR``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from softrdma.verbs.enums import IbAccess, IbMwType
from softrdma.verbs.mr import MemoryRegion, MrKeyError, MrState

if TYPE_CHECKING:
    from softrdma.verbs.pd import ProtectionDomain
    from softrdma.verbs.qp import QueuePair

__all__ = ["MemoryWindow", "MwState"]

_REMOTE_MODIFY = int(IbAccess.REMOTE_WRITE | IbAccess.REMOTE_ATOMIC)
_WINDOW_ACCESS = int(IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ | IbAccess.REMOTE_ATOMIC)


class MwState(enum.Enum):
    """``enum rxe_mw_state``."""

    INVALID = "invalid"
    FREE = "free"
    VALID = "valid"


class MemoryWindow:
    """``struct ib_mw`` with the HCA's state (``struct rxe_mw``). Allocate
    with ``device.alloc_mw(pd, mw_type)``."""

    def __init__(self, pd: ProtectionDomain, mw_type: IbMwType, index: int, key: int) -> None:
        self.pd = pd
        self.device = pd.device
        self.type = mw_type
        self.index = index
        self.rkey = index << 8 | key
        self.state = MwState.VALID if mw_type is IbMwType.TYPE_1 else MwState.FREE
        self.mr: MemoryRegion | None = None
        self.qp: QueuePair | None = None
        """The QP a type 2 window is bound to (``mw->qp``)."""
        self.addr = 0
        self.length = 0
        self.access = IbAccess(0)
        self.deallocated = False

    def __repr__(self) -> str:
        return (
            f"MemoryWindow(type {int(self.type)}, rkey={self.rkey:#x}, "
            f"{self.addr:#x}+{self.length:#x}, {self.state.value})"
        )

    # -- rxe_bind_mw ----------------------------------------------------------------

    def bind(
        self,
        qp: QueuePair,
        mr: MemoryRegion | None,
        new_rkey: int,
        addr: int,
        length: int,
        access: int,
    ) -> None:
        """``rxe_check_bind_mw`` + ``rxe_do_bind_mw`` for a bind work request
        posted on ``qp``; ``mr`` is None for a zero-length (unbinding)
        type 1 bind. Raises :class:`MrKeyError` for every rule broken."""
        if self.state is MwState.INVALID or self.deallocated:
            raise MrKeyError(f"MW {self.rkey:#x} is deallocated")
        if access & IbAccess.ZERO_BASED:
            # o10-36.2.2 forbids it for type 1; softrdma's windows are all
            # virtually addressed.
            raise MrKeyError("zero-based memory windows are not supported")
        if self.type is IbMwType.TYPE_2:
            if self.state is not MwState.FREE:
                raise MrKeyError(f"type 2 MW {self.rkey:#x} is bound (o10-37.2.30)")
            if mr is None or length == 0:
                raise MrKeyError("a type 2 MW binds a non-empty range (o10-37.2.40)")
        if qp.pd is not self.pd:
            raise MrKeyError("the MW belongs to another PD than the QP (C10-72)")
        # Local access means nothing to a window (rxe keeps the bits).
        if access & ~(_WINDOW_ACCESS | IbAccess.LOCAL_WRITE):
            raise MrKeyError(f"bad MW access flags {access:#x}")
        if mr is not None:
            if mr.pd is not self.pd:
                raise MrKeyError("the MR belongs to another PD")
            if mr.state is not MrState.VALID or mr.deregistered:
                raise MrKeyError(f"MR {mr.lkey:#x} is not valid")
            if mr.access & IbAccess.ZERO_BASED:
                raise MrKeyError("a window on a zero-based MR")
            if not mr.access & IbAccess.MW_BIND:
                raise MrKeyError(f"MR {mr.lkey:#x} lacks IB_ACCESS_MW_BIND (C10-73)")
            if access & _REMOTE_MODIFY and not mr.access & IbAccess.LOCAL_WRITE:
                raise MrKeyError("remote write / atomic on an MR without local write (C10-74)")
            if not mr.check_range(addr, length):
                raise MrKeyError(f"window {addr:#x}+{length:#x} outside the MR (C10-75)")
        # rxe_do_bind_mw: the new key byte, the range, the MR and the QP.
        self.rkey = (self.rkey & ~0xFF) | (new_rkey & 0xFF)
        self.access = IbAccess(access)
        self.state = MwState.VALID
        self.addr = addr
        self.length = length if mr is not None else 0
        self._set_mr(mr)
        self.qp = qp if self.type is IbMwType.TYPE_2 else None

    def _set_mr(self, mr: MemoryRegion | None) -> None:
        if self.mr is not None:
            self.mr.num_mw -= 1
        self.mr = mr
        if mr is not None:
            mr.num_mw += 1

    # -- rxe_invalidate_mw ------------------------------------------------------------

    def invalidate(self, rkey: int) -> None:
        """LOCAL_INV or SEND_WITH_INVALIDATE of this window's key: a bound
        type 2 window becomes free; a type 1 window cannot be invalidated."""
        if rkey != self.rkey or self.deallocated:
            raise MrKeyError(f"invalidate of key {rkey:#x}, which names no MW")
        if self.type is IbMwType.TYPE_1:
            raise MrKeyError(f"type 1 MW {rkey:#x} cannot be invalidated")
        if self.state is not MwState.VALID:
            raise MrKeyError(f"invalidate of MW {rkey:#x}, which is not bound")
        self._unbind(MwState.FREE)

    def _unbind(self, state: MwState) -> None:
        """``rxe_do_dealloc_mw`` / ``rxe_do_invalidate_mw``."""
        self._set_mr(None)
        self.qp = None
        self.access = IbAccess(0)
        self.addr = self.length = 0
        self.state = state

    # -- rxe_lookup_mw and the window's range -------------------------------------------

    def check_remote(
        self, rkey: int, pd: ProtectionDomain, qp: QueuePair, va: int, length: int, access: int
    ) -> MemoryRegion:
        """The MR behind a remote access through this window by ``qp``:
        the key, the PD (type 1) or the bound QP (type 2), the state, the
        access rights and the window's range; then the MR must still be
        valid. Returns the MR, in which ``va`` is translated."""
        if rkey != self.rkey or self.deallocated:
            raise MrKeyError(f"rkey {rkey:#x} names no MW")
        if self.state is not MwState.VALID or self.length == 0:
            raise MrKeyError(f"MW {rkey:#x} is not bound")
        if self.pd is not pd or (self.type is IbMwType.TYPE_2 and self.qp is not qp):
            raise MrKeyError(f"MW {rkey:#x} is bound for another PD or QP")
        if access & ~int(self.access):
            raise MrKeyError(f"MW {rkey:#x} lacks {IbAccess(access & ~int(self.access))!r}")
        if va < self.addr or va + length > self.addr + self.length:
            raise MrKeyError(f"rkey {rkey:#x}: {va:#x}+{length:#x} outside the window")
        mr = self.mr
        if mr is None or mr.state is not MrState.VALID:
            raise MrKeyError(f"MW {rkey:#x}: its MR is no longer valid")
        return mr
