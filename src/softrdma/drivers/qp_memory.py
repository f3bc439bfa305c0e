"""A QP's path to memory: :class:`~softrdma.transport.memory_port.MemoryPort`
implemented with the device's MR table and its bus device's DMA.

Every byte the transport moves goes through ``dma_device.dma_read`` /
``dma_write``: on a hardware HCA that is its bus device's backend (so an
IOMMU blocks what is not mapped and the DMA-API debug checker sees each
access); on a CPU-copy device it is the virtual backend, the CPU through
kernel virtual addresses. Every key, PD, permission and bounds check, and
the DMA reachability of the whole range, is done before the first byte
moves, so a refused request changes nothing.

Keys are translated once per message, not per packet: a :class:`LocalSgl`
keeps each SGE's MR from the first packet that reaches it, a
:class:`RemoteMr` the MR an R_Key named when the request was checked. Per
packet they only check that the MR is unchanged (see :class:`_SgeMap`),
walk its page list and copy.

Kernel counterparts: ``rxe_mr.c`` (``copy_data``, ``lookup_mr``,
``mr_check_range``, ``rxe_mr_copy``, ``rxe_mr_do_atomic_op``),
``rxe_resp.c`` (``check_rkey``, ``qp->resp.mr``), ``rxe_req.c``
(``rxe_do_local_ops``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from softrdma.dma.errors import DmaAccessError
from softrdma.dma.types import DmaBackend
from softrdma.memory.layout import PAGE_OFFSET, PAGE_SHIFT, BytesLike
from softrdma.transport.headers import NakCode
from softrdma.transport.memory_port import LocalAccessError, RemoteAccessError
from softrdma.verbs.device import IBK_LOCAL_DMA_LKEY
from softrdma.verbs.enums import IbAccess, IbMrType, IbWcStatus
from softrdma.verbs.mr import MemoryRegion, MrKeyError, MrState
from softrdma.verbs.wr import BindMwWR, RegWR, Sge

if TYPE_CHECKING:
    from softrdma.verbs.device import IbDevice
    from softrdma.verbs.pd import ProtectionDomain
    from softrdma.verbs.qp import QueuePair

_U64 = struct.Struct("<Q")  # atomics act on a host-order (little-endian) u64
_MASK64 = (1 << 64) - 1
# Plain ints for the per-packet checks (IntFlag arithmetic is slow).
_LOCAL_WRITE = int(IbAccess.LOCAL_WRITE)
_REMOTE_WRITE = int(IbAccess.REMOTE_WRITE)
_REMOTE_ATOMIC = int(IbAccess.REMOTE_ATOMIC)
_REMOTE_MODIFY = _REMOTE_WRITE | _REMOTE_ATOMIC
_VALID = MrState.VALID
_DMA_MR = IbMrType.DMA
_ACCESS_ERR = NakCode.REMOTE_ACCESS_ERR
_LOC_PROT_ERR = IbWcStatus.LOC_PROT_ERR

Segments = list[tuple[int, int]]
"""DMA address runs, ``(dma, length)``, that do not cross an MR page."""

PROBE_AHEAD = 256 * 1024
"""How much of an SGE a local reachability probe covers at once, where a
probe has no effects: 64 packets of 4 KiB share one probe, and a short
message into a large buffer probes no more than this of it."""


def _translate(mr: MemoryRegion, iova: int, length: int) -> Segments:
    """The DMA runs behind ``[iova, iova + length)`` of a checked MR, as
    :meth:`MemoryRegion.dma_segments` (``rxe_mr_copy``'s page walk) but a
    list."""
    if mr.type == _DMA_MR:
        return [(iova, length)]
    return _page_runs(mr.page_list, mr.page_size, mr.iova, iova, length)


def _page_runs(pages: list[int], size: int, mr_iova: int, iova: int, length: int) -> Segments:
    """The page-list walk of a fast-registration MR, the one-page case
    first: a packet rarely crosses a page."""
    index, offset = divmod(iova - (mr_iova & ~(size - 1)), size)
    if offset + length <= size:
        return [(pages[index] + offset, length)]
    out: Segments = []
    while length > 0:
        chunk = min(size - offset, length)
        out.append((pages[index] + offset, chunk))
        length -= chunk
        index += 1
        offset = 0
    return out


class QpMemory:
    """The :class:`MemoryPort` of one QP (its PD scopes every key; for an
    XRC TGT QP, ``pd`` is the PD of the XRC SRQ a request names)."""

    def __init__(self, device: IbDevice, qp: QueuePair, pd: ProtectionDomain | None = None) -> None:
        self.device = device
        self.qp = qp
        self.pd = qp.pd if pd is None else pd
        self.dma = device.dma_device
        self.mrs = device.mr_table
        self._reserved_lkey = (
            device.local_dma_lkey if device.attrs.kernel_cap_flags & IBK_LOCAL_DMA_LKEY else None
        )
        # Whether a reachability probe has no effects (an IOMMU records a
        # fault): see LocalSgl.
        self._probe_once = self.dma.backend is not DmaBackend.IOMMU
        # An IOMMU copy of one DMA segment translates it whole before moving
        # a byte and faults exactly as a probe would (same range, direction
        # and fault record): its probe is the copy's own. Not with the
        # DMA-API debug checker, which sees an access before it faults.
        self._copy_probes_one = not self._probe_once and self.dma.debug is None
        # Several packets' bytes may move as one copy per DMA segment
        # (segmentation offload) where that cannot be told from a copy per
        # packet: probes without effects, no debug checker seeing accesses.
        self._bulk = self._probe_once and self.dma.debug is None
        # A CPU-copy device moves bytes with the CPU (rxe_mr_copy's memcpy
        # through the direct map): where no DMA-API checker watches, an
        # access inside the direct map (lowmem, which cannot fault) goes to
        # the host's CPU accessors at once — what its virtual DMA backend
        # does there, minus the calls.
        host = self.dma.host
        if self.dma.backend is DmaBackend.VIRTUAL and self.dma.debug is None:
            self._direct_lo = PAGE_OFFSET
            self._direct_hi = PAGE_OFFSET + (host.lowmem_pfn << PAGE_SHIFT)
        else:
            self._direct_lo = self._direct_hi = 0
        self._host = host

    # -- address translation --------------------------------------------------

    def _local_mr(self, lkey: int, access: int) -> MemoryRegion:
        """``lookup_mr`` for an SGE: LOC_PROT_ERR if the key fails."""
        try:
            return self.mrs.lookup(lkey, self.pd, access, remote=False)
        except MrKeyError as e:
            raise LocalAccessError(_LOC_PROT_ERR, str(e)) from e

    def _remote_mr(self, rkey: int, va: int, length: int, access: int) -> MemoryRegion:
        """``lookup_mr`` + ``mr_check_range`` for a remote access; a key
        naming a memory window goes through the window's checks first
        (rxe ``check_rkey``: ``rxe_lookup_mw``)."""
        try:
            mw = self.mrs.mw(rkey)
            if mw is not None:
                mr = mw.check_remote(rkey, self.pd, self.qp, va, length, access)
            else:
                mr = self.mrs.lookup(rkey, self.pd, access, remote=True)
        except MrKeyError as e:
            raise RemoteAccessError(_ACCESS_ERR, str(e)) from e
        if not mr.check_range(va, length):
            raise RemoteAccessError(
                _ACCESS_ERR, f"rkey {rkey:#x}: {va:#x}+{length:#x} outside the MR"
            )
        return mr

    def _probe(self, segments: Segments, write: bool, local: bool) -> None:
        lo, hi = self._direct_lo, self._direct_hi
        try:
            for dma, n in segments:
                if not lo <= dma <= dma + n <= hi:
                    self.dma.dma_probe(dma, n, write)
        except DmaAccessError as e:
            if local:
                raise LocalAccessError(_LOC_PROT_ERR, f"DMA fault: {e}") from e
            raise RemoteAccessError(_ACCESS_ERR, f"DMA fault: {e}") from e

    def _read(self, segments: Segments) -> BytesLike:
        # Most packets are one segment: one DMA read, no join.
        dma_read = self.dma.dma_read
        if len(segments) == 1:
            dma, n = segments[0]
            if self._direct_lo <= dma <= dma + n <= self._direct_hi and n > 0:
                return self._host.cpu_read(dma, n)
            return dma_read(dma, n)
        return b"".join([dma_read(dma, n) for dma, n in segments])

    def _write(self, segments: Segments, data: BytesLike) -> None:
        dma_write = self.dma.dma_write
        if len(segments) == 1:
            dma = segments[0][0]
            if self._direct_lo <= dma <= dma + len(data) <= self._direct_hi and len(data):
                self._host.cpu_write(dma, data)
            else:
                dma_write(dma, data)
            return
        view = memoryview(data).cast("B")
        pos = 0
        for dma, n in segments:
            dma_write(dma, view[pos : pos + n])
            pos += n

    # -- MemoryPort: local ----------------------------------------------------------

    def map_sgl(self, sges: Sequence[Sge], write: bool) -> LocalSgl:
        """An SGE list translated once per work request (see :class:`LocalSgl`)."""
        return LocalSgl(self, sges, write)

    def gather(self, sges: Sequence[Sge], offset: int, length: int) -> BytesLike:
        """``copy_data(..., RXE_FROM_MR_OBJ)`` for a one-off access."""
        if length == 0:
            return b""
        return LocalSgl(self, sges, False, probe_ahead=0).gather(offset, length)

    def scatter(self, sges: Sequence[Sge], offset: int, data: BytesLike) -> None:
        """``copy_data(..., RXE_TO_MR_OBJ)`` for a one-off access."""
        if len(data):
            LocalSgl(self, sges, True, probe_ahead=0).scatter(offset, data)

    def reg_mr(self, wr: RegWR) -> None:
        """``rxe_reg_fast_mr``."""
        try:
            self.mrs.reg_fast_mr(self.pd, wr.mr, wr.key, wr.access)
        except MrKeyError as e:
            raise LocalAccessError(IbWcStatus.LOC_QP_OP_ERR, str(e)) from e

    def local_invalidate(self, key: int) -> None:
        """``rxe_invalidate_mr`` / ``rxe_invalidate_mw`` for IB_WR_LOCAL_INV."""
        try:
            mw = self.mrs.mw(key)
            if mw is not None:
                if mw.pd is not self.pd:
                    raise MrKeyError(f"invalidate of MW {key:#x} of another PD")
                mw.invalidate(key)
            else:
                self.mrs.invalidate(self.pd, key, remote=False)
        except MrKeyError as e:
            raise LocalAccessError(IbWcStatus.LOC_QP_OP_ERR, str(e)) from e

    def bind_mw(self, wr: BindMwWR) -> None:
        """``rxe_bind_mw`` for IB_WR_BIND_MW: the window its ``mw_rkey``
        names, the MR (for a non-empty range), every rule of
        :meth:`MemoryWindow.bind <softrdma.verbs.mw.MemoryWindow.bind>`;
        any failure is ``IB_WC_MW_BIND_ERR``."""
        try:
            mw = self.mrs.mw(wr.mw_rkey)
            if mw is None or mw.rkey != wr.mw_rkey or (wr.mw is not None and wr.mw is not mw):
                raise MrKeyError(f"BIND_MW of key {wr.mw_rkey:#x}, which names no MW")
            mr = None
            if wr.bind_length:
                mr = wr.mr
                if mr is None or mr.deregistered or mr.device is not self.device:
                    raise MrKeyError("BIND_MW of a range of no MR")
            mw.bind(self.qp, mr, wr.rkey, wr.addr, wr.bind_length, int(wr.mw_access))
        except MrKeyError as e:
            raise LocalAccessError(IbWcStatus.MW_BIND_ERR, str(e)) from e

    # -- MemoryPort: remote -------------------------------------------------------------

    def check_rkey(self, rkey: int, va: int, length: int, access: int) -> RemoteMr:
        """``check_rkey``: key, PD, permission, bounds and DMA reachability
        of the whole range, once per request; the MR is kept in the handle
        (``qp->resp.mr``). Zero-length requests are not checked (C9-88)."""
        access = int(access)
        if length == 0:
            return RemoteMr(self, rkey, va, 0, access, None)
        mr = self._remote_mr(rkey, va, length, access)
        self._probe(_translate(mr, va, length), bool(access & _REMOTE_MODIFY), local=False)
        return RemoteMr(self, rkey, va, length, access, mr)

    def check_rkey_access(self, rkey: int, access: int) -> None:
        """``check_rkey`` of a FLUSH of the whole MR or an empty range: the
        key (``lookup_mr`` / ``rxe_lookup_mw``), PD, state and access, no
        range."""
        try:
            mw = self.mrs.mw(rkey)
            if mw is not None:
                mw.check_remote(rkey, self.pd, self.qp, mw.addr, 0, int(access))
            else:
                self.mrs.lookup(rkey, self.pd, int(access), remote=True)
        except MrKeyError as e:
            raise RemoteAccessError(_ACCESS_ERR, str(e)) from e

    def write_once(self, rkey: int, va: int, data: BytesLike) -> None:
        """:meth:`check_rkey` for REMOTE_WRITE and :meth:`RemoteMr.write`
        of a one-packet WRITE (``check_rkey`` + ``rxe_mr_copy``), with no
        handle kept: every check, then the copy."""
        n = len(data)
        mr = self._remote_mr(rkey, va, n, _REMOTE_WRITE)
        segments = [(va, n)] if mr.type == _DMA_MR else _translate(mr, va, n)
        self._probe(segments, True, local=False)
        try:
            self._write(segments, data)
        except DmaAccessError as e:
            raise RemoteAccessError(_ACCESS_ERR, f"DMA fault: {e}") from e

    def remote_invalidate(self, rkey: int) -> None:
        """``invalidate_rkey`` for SEND_WITH_INVALIDATE: an MR, or a type 2
        window (``rxe_invalidate_mw``)."""
        try:
            mw = self.mrs.mw(rkey)
            if mw is not None:
                if mw.pd is not self.pd:
                    raise MrKeyError(f"invalidate of MW {rkey:#x} of another PD")
                mw.invalidate(rkey)
            else:
                self.mrs.invalidate(self.pd, rkey, remote=True)
        except MrKeyError as e:
            raise RemoteAccessError(NakCode.REMOTE_OP_ERR, str(e)) from e


class _SgeMap:
    """One SGE as the first packet reaching it found it: its MR (``None``
    for the reserved lkey) with the access flags and page list it had then
    — an MR is unchanged while it is valid under the same key with these
    (``invalidate`` / ``dereg_mr`` leave it not valid, ``map_mr_sg``, only
    possible while not valid, replaces the page list, ``REG_MR`` the access
    flags) — whether the whole SGE lies inside the MR, and the window of
    it (offsets ``[probe_lo, probe_hi)``) last found reachable."""

    __slots__ = ("access", "in_range", "mr", "paged", "pages", "probe_hi", "probe_lo")

    def __init__(self, mr: MemoryRegion | None, in_range: bool) -> None:
        self.mr = mr
        self.access: object = None if mr is None else mr.access
        self.pages: list[int] = [] if mr is None else mr.page_list
        self.paged = mr is not None and mr.type != _DMA_MR
        self.in_range = in_range
        self.probe_lo = self.probe_hi = 0


class LocalSgl:
    """The SGE list of one work request, each SGE looked up once — when a
    packet first reaches it, so a bad lkey fails the same packet as in
    rxe's ``copy_data``, which looks every SGE up again per packet — and
    kept for the rest of the message, retries included.

    Per packet it only checks that each MR it touches is unchanged (else it
    looks the key up again, as a new lookup per packet would, and fails
    the same way), walks the page list and copies. A cursor makes finding
    the packet's first SGE constant time for in-order packets.

    Reachability is checked before the first byte of each packet moves. A
    probe that has no effects (every backend but an IOMMU, which records a
    fault) is done for up to :data:`PROBE_AHEAD` bytes of the SGE at a
    time and skipped for the packets inside that window; if the window is
    not all reachable, the packet alone is probed, so it fails exactly
    where a probe per packet failed. An IOMMU is probed per packet, as
    before (by the copy itself when the packet is one DMA segment and no
    DMA-API debug checker watches). A mapping lost after its probe faults
    the copy itself, a local protection error all the same.
    """

    __slots__ = (
        "_access",
        "_ahead",
        "_copy_probes_one",
        "_idx",
        "_maps",
        "_port",
        "_pos",
        "_probe_once",
        "_sges",
        "_total",
        "_write",
    )

    def __init__(
        self, port: QpMemory, sges: Sequence[Sge], write: bool, probe_ahead: int = PROBE_AHEAD
    ) -> None:
        self._port = port
        self._ahead = probe_ahead  # 0 for a one-off access: nothing to share a probe with
        # (made once per message, often for one packet: kept cheap)
        self._sges = sges = sges if type(sges) is tuple else tuple(sges)
        self._write = write
        self._access = _LOCAL_WRITE if write else 0
        self._total = sges[0].length if len(sges) == 1 else sum([s.length for s in sges])
        self._probe_once = port._probe_once
        self._copy_probes_one = port._copy_probes_one
        self._maps: list[_SgeMap | None] = [None] * len(sges)
        self._idx = 0  # the cursor: an SGE index and the list offset where it starts
        self._pos = 0

    def _map(self, i: int) -> _SgeMap:
        """Look SGE ``i`` up (``lookup_mr``; LOC_PROT_ERR if it fails)."""
        sge = self._sges[i]
        if sge.lkey == self._port._reserved_lkey:
            m = _SgeMap(None, True)
        else:
            mr = self._port._local_mr(sge.lkey, self._access)
            m = _SgeMap(mr, mr.check_range(sge.addr, sge.length))
        self._maps[i] = m
        return m

    def _probe_window(self, m: _SgeMap, sge: Sge, start: int, take: int, runs: Segments) -> None:
        """Probe ``runs`` (the ``take`` bytes at ``start`` into ``sge``)
        before they move, as part of a window of up to :data:`PROBE_AHEAD`
        bytes when the SGE is all inside its MR; a window that fails is no
        error, the piece alone decides (only used where a probe has no
        effects)."""
        port = self._port
        end = min(sge.length, start + self._ahead)
        if m.in_range and end > start + take:
            addr = sge.addr + start
            mr = m.mr
            window = [(addr, end - start)] if mr is None else _translate(mr, addr, end - start)
            try:
                port._probe(window, self._write, local=True)
            except LocalAccessError:
                pass  # the piece alone decides, below
            else:
                m.probe_lo, m.probe_hi = start, end
                return
        port._probe(runs, self._write, local=True)

    def _segments(self, offset: int, length: int) -> Segments:
        """DMA segments for ``length`` bytes at ``offset`` into the list,
        every key and range checked and every segment reachable."""
        if offset + length > self._total:
            raise LocalAccessError(
                IbWcStatus.LOC_LEN_ERR,
                f"{offset + length} bytes into SGEs holding {self._total}",
            )
        sges = self._sges
        maps = self._maps
        i, pos = self._idx, self._pos
        if offset < pos:  # a retry rewound: walk again from the start
            i = pos = 0
        while pos + sges[i].length <= offset:
            pos += sges[i].length
            i += 1
        self._idx, self._pos = i, pos
        start = offset - pos
        out: Segments = []
        unprobed: Segments | None = None
        port = self._port
        direct_lo, direct_hi = port._direct_lo, port._direct_hi
        while length > 0:
            sge = sges[i]
            take = sge.length - start
            if take > 0:
                if take > length:
                    take = length
                addr = sge.addr + start
                m = maps[i]
                if m is None:
                    m = self._map(i)
                else:
                    mr = m.mr
                    if mr is not None and not (
                        mr.state is _VALID
                        and mr.lkey == sge.lkey
                        and mr.access is m.access
                        and mr.page_list is m.pages
                    ):
                        m = self._map(i)  # the MR changed: look it up again
                mr = m.mr
                if not m.in_range:
                    assert mr is not None
                    if not mr.check_range(addr, take):
                        raise LocalAccessError(
                            _LOC_PROT_ERR,
                            f"lkey {sge.lkey:#x}: {addr:#x}+{take:#x} outside the MR",
                        )
                if m.paged:
                    assert mr is not None
                    runs = _page_runs(m.pages, mr.page_size, mr.iova, addr, take)
                elif direct_lo <= addr <= addr + take <= direct_hi:
                    out.append((addr, take))  # the direct map: nothing to probe
                    length -= take
                    start = 0
                    i += 1
                    continue
                else:
                    runs = [(addr, take)]
                out += runs
                if not self._probe_once:
                    unprobed = runs if unprobed is None else unprobed + runs
                elif not (m.probe_lo <= start and start + take <= m.probe_hi):
                    self._probe_window(m, sge, start, take, runs)
                length -= take
            start = 0
            i += 1
        if unprobed is not None and not (len(unprobed) == 1 and self._copy_probes_one):
            self._port._probe(unprobed, self._write, local=True)
        return out

    def gather(self, offset: int, length: int) -> BytesLike:
        """``copy_data(..., RXE_FROM_MR_OBJ)``."""
        if length == 0:
            return b""
        segments = self._segments(offset, length)
        try:
            return self._port._read(segments)
        except DmaAccessError as e:
            raise LocalAccessError(_LOC_PROT_ERR, f"DMA fault: {e}") from e

    def gather_bulk(self, offset: int, length: int) -> BytesLike | None:
        """Several packets' bytes with one copy per DMA segment, or None
        (see :meth:`MemoryPort.map_sgl`'s ``LocalSgl.gather_bulk``): a
        failure here has no effects, the packets then decide one by one."""
        if not self._port._bulk:
            return None
        try:
            return self._port._read(self._segments(offset, length))
        except (LocalAccessError, DmaAccessError):
            return None

    def scatter(self, offset: int, data: BytesLike) -> None:
        """``copy_data(..., RXE_TO_MR_OBJ)``."""
        n = len(data)
        if not n:
            return
        segments = self._segments(offset, n)
        try:
            self._port._write(segments, data)
        except DmaAccessError as e:
            raise LocalAccessError(_LOC_PROT_ERR, f"DMA fault: {e}") from e


class RemoteMr:
    """An R_Key range checked once per request and kept for its packets
    (rxe ``qp->resp.mr``; rxe looks the key up again for every WRITE packet
    and READ burst). Each access stays inside the checked range and first
    checks that the MR is unchanged (as :class:`_SgeMap`); if it was
    invalidated, deregistered or re-registered since, the key is looked up
    again with every check, as a new request's would be, and refused the
    same way. A DMA fault while copying (an IOMMU mapping removed between
    two packets) is a remote access error."""

    __slots__ = (
        "_access",
        "_end",
        "_mr",
        "_mr_access",
        "_paged",
        "_pages",
        "_port",
        "_rkey",
        "_start",
    )

    def __init__(
        self,
        port: QpMemory,
        rkey: int,
        va: int,
        length: int,
        access: int,
        mr: MemoryRegion | None,
    ) -> None:
        self._port = port
        self._rkey = rkey
        self._access = access
        self._start = va
        self._end = va + length
        self._bind(mr)

    def _bind(self, mr: MemoryRegion | None) -> None:
        self._mr = mr
        self._mr_access: object = None if mr is None else mr.access
        self._pages: list[int] = [] if mr is None else mr.page_list
        self._paged = mr is not None and mr.type != _DMA_MR

    def _segments(self, va: int, length: int) -> Segments:
        if va < self._start or va + length > self._end:
            raise RemoteAccessError(
                _ACCESS_ERR,
                f"rkey {self._rkey:#x}: {va:#x}+{length:#x} outside the checked "
                f"{self._start:#x}..{self._end:#x}",
            )
        mr = self._mr
        assert mr is not None  # an empty range has no non-empty access
        if not (
            mr.state is _VALID
            and mr.rkey == self._rkey
            and mr.access is self._mr_access
            and mr.page_list is self._pages
        ):
            # Changed since the check: look it up as a new request would.
            mr = self._port._remote_mr(self._rkey, va, length, self._access)
            self._bind(mr)
        if self._paged:
            return _page_runs(self._pages, mr.page_size, mr.iova, va, length)
        return [(va, length)]

    def read(self, va: int, length: int) -> BytesLike:
        """``rxe_mr_copy(..., RXE_FROM_MR_OBJ)`` for a READ response."""
        if length == 0:
            return b""
        segments = self._segments(va, length)
        try:
            return self._port._read(segments)
        except DmaAccessError as e:
            raise RemoteAccessError(_ACCESS_ERR, f"DMA fault: {e}") from e

    def write(self, va: int, data: BytesLike) -> None:
        """``rxe_mr_copy(..., RXE_TO_MR_OBJ)`` for a WRITE packet."""
        n = len(data)
        if not n:
            return
        segments = self._segments(va, n)
        try:
            self._port._write(segments, data)
        except DmaAccessError as e:
            raise RemoteAccessError(_ACCESS_ERR, f"DMA fault: {e}") from e

    def write_bulk(self, va: int, data: BytesLike) -> bool:
        """Several WRITE packets' payload with one copy per DMA segment;
        False (the caller writes packet by packet) where that could be told
        apart from a write per packet, or on a fault — after which only
        bytes the packets before the faulting one write the same may have
        changed."""
        if not self._port._bulk:
            return False
        try:
            self._port._write(self._segments(va, len(data)), data)
        except (RemoteAccessError, DmaAccessError):
            return False
        return True

    def atomic(self, va: int, compare_swap: bool, compare: int, swap_add: int) -> int:
        """``rxe_mr_do_atomic_op``: 8 aligned bytes, REMOTE_ATOMIC."""
        segs = self._segments(va, 8)
        if va & 7 or len(segs) != 1 or segs[0][0] & 7:
            raise RemoteAccessError(NakCode.INVALID_REQUEST, f"misaligned atomic at {va:#x}")
        dma = segs[0][0]
        device = self._port.dma
        try:
            (orig,) = _U64.unpack(device.dma_read(dma, 8))
            if compare_swap:
                new = swap_add if orig == compare else orig
            else:
                new = (orig + swap_add) & _MASK64
            if new != orig or not compare_swap:
                device.dma_write(dma, _U64.pack(new))
        except DmaAccessError as e:
            raise RemoteAccessError(_ACCESS_ERR, f"DMA fault: {e}") from e
        return int(orig)
