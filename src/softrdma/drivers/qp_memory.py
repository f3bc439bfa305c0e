"""A QP's path to memory: :class:`~softrdma.transport.memory_port.MemoryPort`
implemented with the device's MR table and its bus device's DMA.

Every byte the transport moves goes through ``dma_device.dma_read`` /
``dma_write``: on a hardware HCA that is its bus device's backend (so an
IOMMU blocks what is not mapped and the DMA-API debug checker sees each
access); on a CPU-copy device it is the virtual backend, the CPU through
kernel virtual addresses. Every key, PD, permission and bounds check, and
the DMA reachability of the whole range, is done before the first byte
moves, so a refused request changes nothing.

Kernel counterparts: ``rxe_mr.c`` (``copy_data``, ``lookup_mr``,
``mr_check_range``, ``rxe_mr_do_atomic_op``), ``rxe_resp.c``
(``check_rkey``), ``rxe_req.c`` (``rxe_do_local_ops``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from softrdma.dma.errors import DmaAccessError
from softrdma.memory.layout import BytesLike
from softrdma.transport.headers import NakCode
from softrdma.transport.memory_port import LocalAccessError, RemoteAccessError
from softrdma.verbs.device import IBK_LOCAL_DMA_LKEY
from softrdma.verbs.enums import IbAccess, IbWcStatus
from softrdma.verbs.mr import MrKeyError
from softrdma.verbs.wr import RegWR, Sge

if TYPE_CHECKING:
    from softrdma.verbs.device import IbDevice
    from softrdma.verbs.qp import QueuePair

_U64 = struct.Struct("<Q")  # atomics act on a host-order (little-endian) u64
_MASK64 = (1 << 64) - 1
_T = TypeVar("_T")
# Plain ints for the per-packet checks (IntFlag arithmetic is slow).
_LOCAL_WRITE = int(IbAccess.LOCAL_WRITE)
_REMOTE_MODIFY = int(IbAccess.REMOTE_WRITE | IbAccess.REMOTE_ATOMIC)


class QpMemory:
    """The :class:`MemoryPort` of one QP (its PD scopes every key)."""

    def __init__(self, device: IbDevice, qp: QueuePair) -> None:
        self.device = device
        self.qp = qp
        self.pd = qp.pd
        self.dma = device.dma_device
        self.mrs = device.mr_table
        self._reserved_lkey = (
            device.local_dma_lkey if device.attrs.kernel_cap_flags & IBK_LOCAL_DMA_LKEY else None
        )

    # -- address translation --------------------------------------------------

    def _local_segments(
        self, sges: Sequence[Sge], offset: int, length: int, write: bool
    ) -> list[tuple[int, int]]:
        """DMA segments for ``length`` bytes at ``offset`` into the SGE list,
        every key and range checked and every segment reachable."""
        total = sum(s.length for s in sges)
        if offset + length > total:
            raise LocalAccessError(
                IbWcStatus.LOC_LEN_ERR, f"{offset + length} bytes into SGEs holding {total}"
            )
        access = _LOCAL_WRITE if write else 0
        out: list[tuple[int, int]] = []
        pos = 0
        for sge in sges:
            if length <= 0:
                break
            if pos + sge.length <= offset:
                pos += sge.length
                continue
            start = max(offset - pos, 0)
            take = min(sge.length - start, length)
            addr = sge.addr + start
            if sge.lkey == self._reserved_lkey:
                out.append((addr, take))
            else:
                try:
                    mr = self.mrs.lookup(sge.lkey, self.pd, access, remote=False)
                except MrKeyError as e:
                    raise LocalAccessError(IbWcStatus.LOC_PROT_ERR, str(e)) from e
                if not mr.check_range(addr, take):
                    raise LocalAccessError(
                        IbWcStatus.LOC_PROT_ERR,
                        f"lkey {sge.lkey:#x}: {addr:#x}+{take:#x} outside the MR",
                    )
                out.extend(mr.dma_segments(addr, take))
            length -= take
            pos += sge.length
        self._probe(out, write, local=True)
        return out

    def _remote_segments(
        self, rkey: int, va: int, length: int, access: int
    ) -> list[tuple[int, int]]:
        try:
            mr = self.mrs.lookup(rkey, self.pd, access, remote=True)
        except MrKeyError as e:
            raise RemoteAccessError(NakCode.REMOTE_ACCESS_ERR, str(e)) from e
        if not mr.check_range(va, length):
            raise RemoteAccessError(
                NakCode.REMOTE_ACCESS_ERR, f"rkey {rkey:#x}: {va:#x}+{length:#x} outside the MR"
            )
        return list(mr.dma_segments(va, length))

    def _probe(self, segments: list[tuple[int, int]], write: bool, local: bool) -> None:
        try:
            for dma, n in segments:
                self.dma.dma_probe(dma, n, write)
        except DmaAccessError as e:
            if local:
                raise LocalAccessError(IbWcStatus.LOC_PROT_ERR, f"DMA fault: {e}") from e
            raise RemoteAccessError(NakCode.REMOTE_ACCESS_ERR, f"DMA fault: {e}") from e

    def _read(self, segments: list[tuple[int, int]]) -> BytesLike:
        if len(segments) == 1:
            dma, n = segments[0]
            return self.dma.dma_read(dma, n)
        return b"".join([self.dma.dma_read(dma, n) for dma, n in segments])

    def _write(self, segments: list[tuple[int, int]], data: BytesLike) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        for dma, n in segments:
            self.dma.dma_write(dma, view[pos : pos + n])
            pos += n

    # -- MemoryPort: local ----------------------------------------------------------

    def gather(self, sges: Sequence[Sge], offset: int, length: int) -> BytesLike:
        """``copy_data(..., RXE_FROM_MR_OBJ)``."""
        if length == 0:
            return b""
        return self._read(self._local_segments(sges, offset, length, write=False))

    def scatter(self, sges: Sequence[Sge], offset: int, data: BytesLike) -> None:
        """``copy_data(..., RXE_TO_MR_OBJ)``."""
        n = len(data)
        if n:
            self._write(self._local_segments(sges, offset, n, write=True), data)

    def reg_mr(self, wr: RegWR) -> None:
        """``rxe_reg_fast_mr``."""
        try:
            self.mrs.reg_fast_mr(self.pd, wr.mr, wr.key, wr.access)
        except MrKeyError as e:
            raise LocalAccessError(IbWcStatus.LOC_QP_OP_ERR, str(e)) from e

    def local_invalidate(self, key: int) -> None:
        """``rxe_invalidate_mr`` for IB_WR_LOCAL_INV."""
        try:
            self.mrs.invalidate(self.pd, key, remote=False)
        except MrKeyError as e:
            raise LocalAccessError(IbWcStatus.LOC_QP_OP_ERR, str(e)) from e

    # -- MemoryPort: remote -------------------------------------------------------------

    def check_rkey(self, rkey: int, va: int, length: int, access: int) -> None:
        """``check_rkey``: key, PD, permission, bounds and DMA reachability
        of the whole range; zero-length requests are not checked (C9-88)."""
        if length == 0:
            return
        segments = self._remote_segments(rkey, va, length, access)
        self._probe(segments, bool(int(access) & _REMOTE_MODIFY), local=False)

    def remote_read(self, rkey: int, va: int, length: int) -> BytesLike:
        if length == 0:
            return b""
        return self._guard(
            lambda: self._read(self._remote_segments(rkey, va, length, IbAccess.REMOTE_READ))
        )

    def remote_write(self, rkey: int, va: int, data: BytesLike) -> None:
        if len(data):
            segs = self._remote_segments(rkey, va, len(data), IbAccess.REMOTE_WRITE)
            self._guard(lambda: self._write(segs, data))

    def atomic(self, rkey: int, va: int, compare_swap: bool, compare: int, swap_add: int) -> int:
        """``rxe_mr_do_atomic_op``: 8 aligned bytes, REMOTE_ATOMIC."""
        segs = self._remote_segments(rkey, va, 8, IbAccess.REMOTE_ATOMIC)
        if va & 7 or len(segs) != 1 or segs[0][0] & 7:
            raise RemoteAccessError(NakCode.INVALID_REQUEST, f"misaligned atomic at {va:#x}")
        dma = segs[0][0]

        def run() -> int:
            (orig,) = _U64.unpack(self.dma.dma_read(dma, 8))
            if compare_swap:
                new = swap_add if orig == compare else orig
            else:
                new = (orig + swap_add) & _MASK64
            if new != orig or not compare_swap:
                self.dma.dma_write(dma, _U64.pack(new))
            return int(orig)

        return self._guard(run)

    def remote_invalidate(self, rkey: int) -> None:
        """``invalidate_rkey`` for SEND_WITH_INVALIDATE."""
        try:
            self.mrs.invalidate(self.pd, rkey, remote=True)
        except MrKeyError as e:
            raise RemoteAccessError(NakCode.REMOTE_OP_ERR, str(e)) from e

    @staticmethod
    def _guard(fn: Callable[[], _T]) -> _T:
        """A DMA fault while executing (e.g. an IOMMU mapping removed between
        two packets of one WRITE) is a remote access error."""
        try:
            return fn()
        except DmaAccessError as e:
            raise RemoteAccessError(NakCode.REMOTE_ACCESS_ERR, f"DMA fault: {e}") from e
