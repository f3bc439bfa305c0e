"""What the transport engines need from a device to reach memory.

The RC and UD engines are sans-IO: they never touch memory themselves.
A device implements :class:`MemoryPort` with the verbs MR table (key, PD,
access and bounds checks) and its own way to move bytes — a hardware HCA
through its bus device's DMA, a CPU-copy device through kernel virtual
addresses — so one engine serves every device kind.

Translation is done once per message, not once per packet: the engines
keep what :meth:`MemoryPort.map_sgl` and :meth:`MemoryPort.check_rkey` hand
back — a :class:`LocalSgl` in the send WQE or the receive being filled, a
:class:`RemoteMr` in the responder's state (rxe's ``qp->resp.mr``) — and
use it for every packet of the message. Both stay honest when the MR
changes under them: each access first checks that the MR is still the one
that was checked, and if it was invalidated, deregistered or re-registered
in between, looks it up again with every check, as a new request would.

Failures are exceptions carrying what the transport must do with them:
:class:`LocalAccessError` the completion status of the local work request,
:class:`RemoteAccessError` the NAK code the responder answers with.

Kernel counterparts: ``rxe_mr.c`` (``copy_data``, ``lookup_mr``,
``mr_check_range``, ``rxe_mr_copy``, ``rxe_mr_do_atomic_op``),
``rxe_resp.c`` (``check_rkey``, ``qp->resp.mr``, ``rxe_recheck_mr``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from softrdma.memory.layout import BytesLike
from softrdma.transport.headers import NakCode
from softrdma.verbs.enums import IbWcStatus
from softrdma.verbs.wr import BindMwWR, RegWR, Sge


class LocalAccessError(Exception):
    """A local SGE or local operation failed; ``status`` is the work
    completion status (e.g. ``IB_WC_LOC_PROT_ERR``, ``IB_WC_LOC_LEN_ERR``)."""

    def __init__(self, status: IbWcStatus, why: str) -> None:
        self.status = status
        super().__init__(f"{status.kernel_name}: {why}")


class RemoteAccessError(Exception):
    """A remote request failed its checks; ``nak`` is the NAK code
    (``REMOTE_ACCESS_ERR`` for key / bounds / permission / PD,
    ``INVALID_REQUEST`` for a misaligned atomic or a malformed request,
    ``REMOTE_OP_ERR`` for a fault while executing)."""

    def __init__(self, nak: NakCode, why: str) -> None:
        self.nak = nak
        super().__init__(f"NAK {nak.name}: {why}")


class LocalSgl(Protocol):
    """The SGE list of one work request, translated once and kept for every
    packet of the message (rxe ``copy_data`` walks and looks up the SGEs
    again for each packet). Made by :meth:`MemoryPort.map_sgl`."""

    def gather(self, offset: int, length: int) -> BytesLike:
        """Read ``length`` bytes starting ``offset`` bytes into the list
        (``copy_data(..., RXE_FROM_MR_OBJ)``); errors as
        :meth:`MemoryPort.gather`."""
        ...

    def scatter(self, offset: int, data: BytesLike) -> None:
        """Write ``data`` starting ``offset`` bytes into the list
        (``copy_data(..., RXE_TO_MR_OBJ)``); errors as
        :meth:`MemoryPort.scatter`."""
        ...

    def gather_bulk(self, offset: int, length: int) -> BytesLike | None:
        """The ``length`` bytes at ``offset`` for several packets at once,
        with one copy per DMA segment — or None when that could be told
        apart from a :meth:`gather` per packet (a probe with effects, the
        DMA-API debug checker watching each access, a fault in the range):
        the caller then gathers packet by packet (segmentation offload)."""
        ...


class RemoteMr(Protocol):
    """An R_Key range that passed :meth:`MemoryPort.check_rkey`, kept for the
    rest of its message (rxe ``qp->resp.mr``). Accesses must stay inside the
    checked range; an MR changed since the check is looked up again and
    refused as a new request would be (:class:`RemoteAccessError`)."""

    def read(self, va: int, length: int) -> BytesLike:
        """Read for an RDMA READ response (``rxe_mr_copy`` from the MR)."""
        ...

    def write(self, va: int, data: BytesLike) -> None:
        """Write for an RDMA WRITE (``rxe_mr_copy`` to the MR)."""
        ...

    def write_bulk(self, va: int, data: BytesLike) -> bool:
        """:meth:`write` of several packets' payload at once, with one copy
        per DMA segment. False when that could be told apart from a
        :meth:`write` per packet (as :meth:`LocalSgl.gather_bulk`), or on a
        fault, having changed nothing but bytes a write per packet writes
        the same: the caller then writes packet by packet."""
        ...

    def atomic(self, va: int, compare_swap: bool, compare: int, swap_add: int) -> int:
        """Execute a CMP_AND_SWP (``compare_swap``) or FETCH_AND_ADD on the
        8 bytes at ``va``; returns the original value
        (``rxe_mr_do_atomic_op``). A misaligned target is
        ``INVALID_REQUEST``."""
        ...


class MemoryPort(Protocol):
    """A device's memory, as the transport engines see it."""

    # -- local: the QP's own work requests -------------------------------

    def gather(self, sges: Sequence[Sge], offset: int, length: int) -> BytesLike:
        """Read ``length`` bytes starting ``offset`` bytes into the SGE list
        (lkeys checked for the QP's PD). Raises :class:`LocalAccessError`
        (``LOC_PROT_ERR`` bad key / bounds, ``LOC_LEN_ERR`` past the list)."""
        ...

    def scatter(self, sges: Sequence[Sge], offset: int, data: BytesLike) -> None:
        """Write ``data`` starting ``offset`` bytes into the SGE list (lkeys
        checked with LOCAL_WRITE). Raises :class:`LocalAccessError`
        (``LOC_LEN_ERR`` when the data does not fit)."""
        ...

    def map_sgl(self, sges: Sequence[Sge], write: bool) -> LocalSgl:
        """The SGE list of a work request, for :meth:`LocalSgl.gather`
        (``write`` False) or :meth:`LocalSgl.scatter` (``write`` True, the
        lkeys need LOCAL_WRITE). Checks nothing yet: each SGE is looked up
        when a packet first reaches it, so a bad lkey fails the same packet
        it fails in :meth:`gather` / :meth:`scatter`."""
        ...

    def reg_mr(self, wr: RegWR) -> None:
        """Execute IB_WR_REG_MR. Raises :class:`LocalAccessError`."""
        ...

    def local_invalidate(self, key: int) -> None:
        """Execute IB_WR_LOCAL_INV. Raises :class:`LocalAccessError`."""
        ...

    def bind_mw(self, wr: BindMwWR) -> None:
        """Execute IB_WR_BIND_MW. Raises :class:`LocalAccessError`
        (``IB_WC_MW_BIND_ERR``)."""
        ...

    # -- remote: requests from the peer ----------------------------------

    def check_rkey(self, rkey: int, va: int, length: int, access: int) -> RemoteMr:
        """Validate a remote access of ``length`` bytes at ``va`` with the
        ``IbAccess`` bits in ``access``, before any byte moves, and hand back
        the checked MR for the message's packets (rxe ``check_rkey`` setting
        ``qp->resp.mr``). Zero-length requests are not checked (IBTA C9-88):
        their handle allows no access. Raises :class:`RemoteAccessError`."""
        ...

    def check_rkey_access(self, rkey: int, access: int) -> None:
        """The key, PD, state and ``access`` of ``rkey`` without a range: a
        FLUSH of the whole MR (``IB_FLUSH_MR``) or of an empty range (rxe
        ``check_rkey`` skips ``mr_check_range`` for the first). Raises
        :class:`RemoteAccessError`."""
        ...

    def write_once(self, rkey: int, va: int, data: BytesLike) -> None:
        """:meth:`check_rkey` with REMOTE_WRITE for ``len(data)`` bytes at
        ``va``, then :meth:`RemoteMr.write` of ``data`` there: a one-packet
        RDMA WRITE, which keeps no handle. Raises
        :class:`RemoteAccessError` as the two would."""
        ...

    def remote_invalidate(self, rkey: int) -> None:
        """Invalidate the MR ``rkey`` names (SEND_WITH_INVALIDATE)."""
        ...
