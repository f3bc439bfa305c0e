"""What the transport engines need from a device to reach memory.

The RC and UD engines are sans-IO: they never touch memory themselves.
A device implements :class:`MemoryPort` with the verbs MR table (key, PD,
access and bounds checks) and its own way to move bytes — a hardware HCA
through its bus device's DMA, a CPU-copy device through kernel virtual
addresses — so one engine serves every device kind.

Failures are exceptions carrying what the transport must do with them:
:class:`LocalAccessError` the completion status of the local work request,
:class:`RemoteAccessError` the NAK code the responder answers with.

Kernel counterparts: ``rxe_mr.c`` (``copy_data``, ``lookup_mr``,
``mr_check_range``, ``rxe_mr_do_atomic_op``), ``rxe_resp.c``
(``check_rkey``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from softrdma.memory.layout import BytesLike
from softrdma.transport.headers import NakCode
from softrdma.verbs.enums import IbWcStatus
from softrdma.verbs.wr import RegWR, Sge


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

    def reg_mr(self, wr: RegWR) -> None:
        """Execute IB_WR_REG_MR. Raises :class:`LocalAccessError`."""
        ...

    def local_invalidate(self, key: int) -> None:
        """Execute IB_WR_LOCAL_INV. Raises :class:`LocalAccessError`."""
        ...

    # -- remote: requests from the peer ----------------------------------

    def check_rkey(self, rkey: int, va: int, length: int, access: int) -> None:
        """Validate a remote access of ``length`` bytes at ``va`` with the
        ``IbAccess`` bits in ``access``, before any byte moves. Zero-length
        requests are not checked (IBTA C9-88). Raises
        :class:`RemoteAccessError`."""
        ...

    def remote_read(self, rkey: int, va: int, length: int) -> BytesLike:
        """Read for an RDMA READ response (after :meth:`check_rkey`)."""
        ...

    def remote_write(self, rkey: int, va: int, data: BytesLike) -> None:
        """Write for an RDMA WRITE (after :meth:`check_rkey`)."""
        ...

    def atomic(self, rkey: int, va: int, compare_swap: bool, compare: int, swap_add: int) -> int:
        """Execute a CMP_AND_SWP (``compare_swap``) or FETCH_AND_ADD on the
        8 bytes at ``va``; returns the original value. Checks rkey, bounds,
        REMOTE_ATOMIC and 8-byte alignment (``INVALID_REQUEST``)."""
        ...

    def remote_invalidate(self, rkey: int) -> None:
        """Invalidate the MR ``rkey`` names (SEND_WITH_INVALIDATE)."""
        ...
