"""Work requests and work completions (``struct ib_sge``, ``ib_send_wr`` and
its ``ib_rdma_wr`` / ``ib_atomic_wr`` / ``ib_reg_wr`` / ``ib_ud_wr``
extensions, ``ib_recv_wr``, ``ib_wc``).

Work requests are immutable values; ``post_send`` / ``post_recv`` take one
or a sequence of them (the kernel's ``next`` chain). As in the kernel, a
send WR names its opcode (there is no default to fall back on) and its
``send_flags`` default to 0: whether it completes is then the QP's
``sq_sig_type`` (``IB_SIGNAL_ALL_WR`` by default, as a zeroed
``ib_qp_init_attr`` gives), or ``IB_SEND_SIGNALED`` per WR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from softrdma.verbs.enums import (
    IbAccess,
    IbSendFlags,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)

if TYPE_CHECKING:
    from softrdma.verbs.ah import AddressHandle
    from softrdma.verbs.mr import MemoryRegion
    from softrdma.verbs.mw import MemoryWindow


_NO_FLAGS = IbSendFlags(0)
_NO_ACCESS = IbAccess(0)


@dataclass(frozen=True, slots=True)
class Sge:
    """``struct ib_sge``: ``length`` bytes at ``addr``, checked with ``lkey``.

    ``addr`` is a DMA address of the device (``local_dma_lkey``) or an
    iova inside the MR that ``lkey`` names."""

    addr: int
    length: int
    lkey: int


@dataclass(frozen=True, slots=True)
class SendWR:
    """``struct ib_send_wr``: SEND, SEND_WITH_IMM, SEND_WITH_INV, LOCAL_INV.

    ``imm_data`` is the 32-bit immediate as carried on the wire (big-endian
    value); ``invalidate_rkey`` is the key SEND_WITH_INV / LOCAL_INV names."""

    wr_id: int
    opcode: IbWrOpcode
    sg_list: tuple[Sge, ...] = ()
    send_flags: IbSendFlags = _NO_FLAGS
    imm_data: int = 0
    invalidate_rkey: int = 0
    xrc_remote_srqn: int = field(default=0, kw_only=True)
    """On an XRC INI QP: the XRC SRQ of the target the request is for,
    carried in the XRCETH (rdma-core ``ibv_send_wr.qp_type.xrc.remote_srqn``)."""

    @property
    def length(self) -> int:
        """Total bytes of the scatter/gather list."""
        sg = self.sg_list
        return sg[0].length if len(sg) == 1 else sum([s.length for s in sg])


@dataclass(frozen=True, slots=True)
class RdmaWR(SendWR):
    """``struct ib_rdma_wr``: RDMA_WRITE(_WITH_IMM) and RDMA_READ."""

    remote_addr: int = 0
    rkey: int = 0


@dataclass(frozen=True, slots=True)
class AtomicWR(SendWR):
    """``struct ib_atomic_wr``: ATOMIC_CMP_AND_SWP / ATOMIC_FETCH_AND_ADD.
    The 8-byte original value lands in the first SGE."""

    remote_addr: int = 0
    compare_add: int = 0
    swap: int = 0
    rkey: int = 0


@dataclass(frozen=True, slots=True)
class FlushWR(SendWR):
    """IB_WR_FLUSH (rxe's ``wr.flush``: ``remote_addr``, ``length``,
    ``rkey``, ``type``, ``level``; rdma-core ``ibv_wr_flush``): make
    ``flush_len`` bytes at ``remote_addr`` (``level`` ``IB_FLUSH_RANGE``)
    or the whole MR ``rkey`` names (``IB_FLUSH_MR``) placed with
    ``placement_type`` (``IB_FLUSH_GLOBAL`` and/or ``IB_FLUSH_PERSISTENT``).
    RC only; no local data (``sg_list`` stays empty)."""

    remote_addr: int = 0
    rkey: int = 0
    flush_len: int = 0
    placement_type: int = 1
    level: int = 0


@dataclass(frozen=True, slots=True)
class AtomicWriteWR(SendWR):
    """IB_WR_ATOMIC_WRITE (rxe's ``dma.atomic_wr``; rdma-core
    ``ibv_wr_atomic_write``): store the 8 bytes ``atomic_wr`` — taken as
    they are, in wire order — at the 8-byte aligned ``remote_addr`` in one
    single-copy atomic write. RC only; no local data."""

    remote_addr: int = 0
    rkey: int = 0
    atomic_wr: bytes = bytes(8)


@dataclass(frozen=True, slots=True)
class RegWR(SendWR):
    """``struct ib_reg_wr``: IB_WR_REG_MR of a fast-registration MR with
    the ``key`` (its low byte may differ from the MR's) and ``access``."""

    mr: MemoryRegion | None = None
    key: int = 0
    access: IbAccess = IbAccess.LOCAL_WRITE


@dataclass(frozen=True, slots=True)
class BindMwWR(SendWR):
    """IB_WR_BIND_MW (rxe's ``wr.mw``; ``struct ibv_mw_bind_info`` in
    user space): bind ``mw`` — its current key is ``mw_rkey`` — to
    ``[addr, addr + length)`` of ``mr`` with ``mw_access``, under the new
    key ``rkey`` (only its low byte is taken). Length 0 unbinds a type 1
    window."""

    mw: MemoryWindow | None = None
    mw_rkey: int = 0
    rkey: int = 0
    mr: MemoryRegion | None = None
    addr: int = 0
    bind_length: int = 0
    mw_access: IbAccess = _NO_ACCESS


@dataclass(frozen=True, slots=True)
class UdWR(SendWR):
    """``struct ib_ud_wr``: a SEND on a UD QP to ``remote_qpn`` via ``ah``."""

    ah: AddressHandle | None = None
    remote_qpn: int = 0
    remote_qkey: int = 0


@dataclass(frozen=True, slots=True)
class RecvWR:
    """``struct ib_recv_wr``."""

    wr_id: int
    sg_list: tuple[Sge, ...] = ()

    @property
    def length(self) -> int:
        return sum(s.length for s in self.sg_list)


@dataclass(slots=True)
class WorkCompletion:
    """``struct ib_wc``."""

    wr_id: int
    status: IbWcStatus
    opcode: IbWcOpcode
    qp_num: int
    byte_len: int = 0
    wc_flags: IbWcFlags = field(default_factory=lambda: IbWcFlags(0))
    imm_data: int = 0
    invalidate_rkey: int = 0
    src_qp: int = 0
    pkey_index: int = 0
    vendor_err: int = 0
    timestamp: float = 0.0
    """The device clock (its scheduler's time, seconds) when the completion
    was pushed to a CQ that stamps completions
    (:attr:`~softrdma.verbs.cq.CompletionQueue.timestamping`, as a CQ made
    with ``IBV_WC_EX_WITH_COMPLETION_TIMESTAMP``); 0.0 otherwise."""

    def __str__(self) -> str:
        return (
            f"wc(wr_id={self.wr_id:#x}, {self.status.kernel_name}, {self.opcode.name}, "
            f"qp={self.qp_num:#x}, len={self.byte_len})"
        )
