"""How an SRP initiator describes a command's data buffer to the target:
DMA-map the pages, then hand the target (address, R_Key, length) triples
it can RDMA to and from — or put the data into the SEND itself.

Kernel counterparts (``drivers/infiniband/ulp/srp/ib_srp.c``):
``srp_map_data`` (the policy), ``srp_map_sg_fr`` / ``srp_map_finish_fr``
(fast registration), ``srp_map_sg_dma`` (the global rkey), ``srp_map_idb``
(registering the indirect descriptor table), ``srp_map_desc``,
``srp_unmap_data``, the FR pool (``srp_create_fr_pool``,
``srp_fr_pool_get`` / ``_put``, ``srp_destroy_fr_pool``), the per-command
``indirect_desc`` table (``srp_init_cmd_priv``), and the block layer's
pages (``alloc_pages`` + ``kmap``) as :class:`SrpBuffer`.

The policy, in ib_srp's order:

1. ``ib_dma_map_sg`` the scatterlist — bus addresses, bounce slots, IOVAs
   or kernel virtual addresses, by device; an IOMMU may merge segments.
2. Immediate data (SRP-2): a write whose mapped segments fit the spare send
   SGEs (``max_imm_sge``) and whose data fits the IU after
   ``SRP_IMM_DATA_OFFSET`` travels in the SEND as extra SGEs.
3. One segment and a global rkey: one direct descriptor.
4. Otherwise a descriptor list: with fast registration, as few MRs as the
   page lists allow (``ib_map_mr_sg`` + ``IB_WR_REG_MR`` under a fresh key,
   one descriptor per MR, at most ``mr_per_cmd``); without, one descriptor
   per segment under the global rkey. One descriptor is sent direct; more
   go in an indirect descriptor whose ``table_desc`` names the command's
   table (mapped ``DMA_TO_DEVICE``, registered when there is no global
   rkey), with at most ``cmd_sg_cnt`` in the IU unless ``allow_ext_sg``.

Where this model is stricter than ib_srp (which registers every MR
``LOCAL_WRITE | REMOTE_READ | REMOTE_WRITE``): a data MR allows only the
remote access the command's direction needs (``REMOTE_WRITE`` for a read,
``REMOTE_READ`` for a write), the table MR only ``REMOTE_READ``, and it
covers exactly the table (ib_srp registers 20 bytes more).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field

from softrdma.dma.types import DmaDirection
from softrdma.memory.host import Host
from softrdma.memory.layout import PAGE_SIZE
from softrdma.memory.page import GFP_HIGHUSER, GFP_KERNEL, Page
from softrdma.memory.scatterlist import Scatterlist
from softrdma.ulp.iu import IuBuf
from softrdma.ulp.srp.initiator_errors import SrpMapError
from softrdma.ulp.srp.proto import (
    SRP_IMM_DATA_OFFSET,
    SrpDataBuf,
    SrpDirectBuf,
    SrpImmBuf,
    SrpIndirectBuf,
)
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_unmap_sg
from softrdma.verbs.enums import IbAccess, IbWrOpcode
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.mr import MemoryRegion, ib_inc_rkey
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.wr import RegWR, Sge

__all__ = [
    "SRP_MAX_PAGES_PER_MR",
    "FrDesc",
    "FrPool",
    "MapParams",
    "MappedData",
    "SrpBuffer",
    "srp_map_data",
    "srp_unmap_sg",
]

SRP_MAX_PAGES_PER_MR = 512
"""ib_srp.h: the largest page list ib_srp gives one MR."""


# --- the block layer's pages ---------------------------------------------------------------


class SrpBuffer:
    """A command's data buffer as the block layer gives it to a SCSI LLD:
    ``length`` bytes in order-0 pages from ``alloc_pages`` (``GFP_HIGHUSER``
    with ``highmem``, so they may have no kernel address), one scatterlist
    entry per page. The CPU reaches a page only through ``kmap`` while it
    copies, and only while the device does not own the buffer."""

    def __init__(self, host: Host, length: int, *, highmem: bool = False) -> None:
        if length <= 0:
            raise ValueError(f"a data buffer needs a positive length, not {length}")
        self.host = host
        self.length = length
        gfp = GFP_HIGHUSER if highmem else GFP_KERNEL
        self.pages: list[Page] = []
        try:
            for _ in range((length + PAGE_SIZE - 1) // PAGE_SIZE):
                self.pages.append(host.alloc_pages(0, gfp, owner="srp-bio"))
        except Exception:
            self.free()
            raise
        chunks = []
        left = length
        for page in self.pages:
            n = min(PAGE_SIZE, left)
            chunks.append((page, 0, n))
            left -= n
        self.sgl = Scatterlist.from_pages(chunks)

    def __repr__(self) -> str:
        high = sum(p.is_highmem for p in self.pages)
        return f"SrpBuffer({self.length} bytes, {len(self.pages)} pages, {high} highmem)"

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Copy ``data`` in at ``offset``, each page ``kmap``ped while it is
        written (``memcpy_to_page``)."""
        self._check(offset, len(data))
        mv = memoryview(data).cast("B")
        pos = 0
        while pos < len(mv):
            index, in_page = divmod(offset + pos, PAGE_SIZE)
            n = min(PAGE_SIZE - in_page, len(mv) - pos)
            page = self.pages[index]
            kva = self.host.kmap(page)
            try:
                self.host.cpu_write(kva + in_page, mv[pos : pos + n])
            finally:
                self.host.kunmap(page)
            pos += n

    def read(self, length: int | None = None, offset: int = 0) -> bytes:
        """Copy ``length`` bytes out from ``offset`` (``memcpy_from_page``)."""
        length = self.length - offset if length is None else length
        self._check(offset, length)
        out = bytearray()
        pos = 0
        while pos < length:
            index, in_page = divmod(offset + pos, PAGE_SIZE)
            n = min(PAGE_SIZE - in_page, length - pos)
            page = self.pages[index]
            kva = self.host.kmap(page)
            try:
                out += self.host.cpu_read(kva + in_page, n)
            finally:
                self.host.kunmap(page)
            pos += n
        return bytes(out)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"{offset}+{length} outside a {self.length}-byte buffer")

    def free(self) -> None:
        """``__free_pages`` each page; idempotent."""
        for page in self.pages:
            self.host.free_pages(page, 0)
        self.pages = []


# --- the fast-registration pool ------------------------------------------------------------


@dataclass(eq=False)
class FrDesc:
    """``struct srp_fr_desc``: a fast-registration MR and the key it was
    last registered under (``mr->rkey`` after ``ib_update_fast_reg_key``;
    the HCA's copy changes only when the REG_MR executes)."""

    mr: MemoryRegion
    key: int


class FrPool:
    """``struct srp_fr_pool``: ``size`` MRs of ``max_page_list_len`` pages
    each (``srp_create_fr_pool``). An MR comes back to the pool only once
    its key is invalid (LOCAL_INV completed, or the target invalidated it
    with SEND_WITH_INV)."""

    def __init__(self, dev: IbDevice, pd: ProtectionDomain, size: int, max_page_list_len: int):
        self.dev = dev
        self.size = size
        self.max_page_list_len = max_page_list_len
        self.descs: list[FrDesc] = []
        try:
            for _ in range(size):
                mr = dev.alloc_mr(pd, max_page_list_len)
                self.descs.append(FrDesc(mr, mr.rkey))
        except VerbsError:
            self.destroy()
            raise
        self.free: list[FrDesc] = list(self.descs)

    def get(self) -> FrDesc | None:
        """``srp_fr_pool_get``."""
        return self.free.pop() if self.free else None

    def put(self, descs: Sequence[FrDesc]) -> None:
        """``srp_fr_pool_put``: the keys must be invalid already."""
        self.free.extend(descs)

    def destroy(self) -> None:
        """``srp_destroy_fr_pool``: deregister every MR (whatever its state,
        its keys stop working)."""
        for d in self.descs:
            if not d.mr.deregistered:
                self.dev.dereg_mr(d.mr)
        self.descs = []
        self.free = []


# --- srp_map_data --------------------------------------------------------------------------


@dataclass(frozen=True)
class MapParams:
    """What ``srp_map_data`` reads from the device, the target port and the
    channel: the lkey for local SGEs, the global rkey (0 when the PD has
    none), whether fast registration is used and its page size, the MR and
    descriptor limits, and the immediate-data terms of the login."""

    dev: IbDevice
    lkey: int
    global_rkey: int
    use_fast_reg: bool
    mr_page_size: int
    mr_per_cmd: int
    cmd_sg_cnt: int
    sg_tablesize: int
    allow_ext_sg: bool
    use_imm_data: bool
    max_imm_sge: int
    max_it_iu_len: int


@dataclass(eq=False)
class MappedData:
    """A mapped command buffer (``struct srp_request``'s mapping state):
    the DMA segments the device produced, the descriptor for the SRP_CMD,
    the extra send SGEs of immediate data, the MRs it registered with the
    keys handed out (``fr_list`` / ``nmdesc``) and the REG_MR work requests
    to post before the SEND."""

    sgl: Scatterlist
    direction: DmaDirection
    nents: int
    count: int
    segments: tuple[tuple[int, int], ...]
    desc: SrpDataBuf | None = None
    imm_sges: tuple[Sge, ...] = ()
    frs: list[FrDesc] = field(default_factory=list)
    reg_wrs: list[RegWR] = field(default_factory=list)
    mapped: bool = True

    @property
    def keys(self) -> list[int]:
        """The rkeys the target was given (one per MR)."""
        return [d.key for d in self.frs]


def _sg_tail(sgl: Scatterlist, start: int, count: int) -> Scatterlist:
    """The mapped list from DMA segment ``start`` on (``sg_next`` walking
    ``state->sg``): the same entries, ``count - start`` of them mapped."""
    tail = Scatterlist(sgl.entries[start:])
    tail.nents = count - start
    return tail


def _access(direction: DmaDirection) -> IbAccess:
    if direction is DmaDirection.FROM_DEVICE:
        return IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE
    return IbAccess.REMOTE_READ


def _finish_fr(
    p: MapParams,
    pool: FrPool,
    out: MappedData,
    sgl: Scatterlist,
    nents: int,
    access: IbAccess,
    wr_id: int,
) -> tuple[int, SrpDirectBuf]:
    """``srp_map_finish_fr``: one descriptor for as many of the ``nents``
    DMA segments of ``sgl`` as one MR can take (or, for a single segment
    with a global rkey, the segment itself); returns how many it took."""
    if len(out.frs) >= p.mr_per_cmd:
        # -ENOMEM in ib_srp, so TASK SET FULL: retried, not failed (a
        # bounced segment that broke the page list may land aligned next time).
        raise SrpMapError(f"Out of MRs (mr_per_cmd = {p.mr_per_cmd})", errno.ENOMEM, transient=True)
    if nents == 1 and p.global_rkey:
        dma, length = sgl.dma_segments()[0]
        return 1, SrpDirectBuf(dma, p.global_rkey, length)
    fr = pool.get()
    if fr is None:
        raise SrpMapError("the FR pool is empty", errno.ENOMEM, transient=True)
    try:
        n = fr.mr.map_sg(sgl, nents, page_size=p.mr_page_size)
    except VerbsError as e:
        pool.put([fr])
        raise SrpMapError(f"ib_map_mr_sg: {e}", errno.EINVAL) from e
    if n <= 0 or fr.mr.length == 0:
        pool.put([fr])
        raise SrpMapError(
            f"a DMA segment does not fit one MR of {pool.max_page_list_len} pages", errno.EINVAL
        )
    fr.key = ib_inc_rkey(fr.key)
    out.frs.append(fr)
    out.reg_wrs.append(RegWR(wr_id, IbWrOpcode.REG_MR, mr=fr.mr, key=fr.key, access=access))
    return n, SrpDirectBuf(fr.mr.iova, fr.key, fr.mr.length)


def srp_map_data(
    p: MapParams,
    sgl: Scatterlist | None,
    direction: DmaDirection,
    pool: FrPool | None,
    table: IuBuf,
    reg_wr_id: int = 0,
) -> MappedData | None:
    """``srp_map_data``: map ``sgl`` for ``direction`` and describe it.
    None for a command without data. Raises :class:`SrpMapError` (with
    nothing left mapped or taken from the pool) when it cannot."""
    if sgl is None or direction is DmaDirection.NONE:
        return None
    if direction not in (DmaDirection.TO_DEVICE, DmaDirection.FROM_DEVICE):
        raise SrpMapError(f"Unhandled data direction {direction.name}", errno.EINVAL)
    if len(sgl) > p.sg_tablesize:
        raise SrpMapError(
            f"{len(sgl)} scatterlist entries, sg_tablesize is {p.sg_tablesize}", errno.EINVAL
        )
    nents = len(sgl)
    count = ib_dma_map_sg(p.dev, sgl, direction)
    if count == 0:
        raise SrpMapError(f"{p.dev.name}: ib_dma_map_sg failed", errno.EIO, transient=True)
    out = MappedData(sgl, direction, nents, count, tuple(sgl.dma_segments()))
    try:
        _describe(p, out, pool, table, reg_wr_id)
    except BaseException:
        if pool is not None and out.frs:
            pool.put(out.frs)  # never posted: the keys were never valid
        out.frs = []
        out.reg_wrs = []
        srp_unmap_sg(p.dev, out)
        raise
    return out


def _describe(
    p: MapParams, out: MappedData, pool: FrPool | None, table: IuBuf, reg_wr_id: int
) -> None:
    segs = out.segments
    data_len = sum(n for _, n in segs)
    if (
        p.use_imm_data
        and out.count <= p.max_imm_sge
        and SRP_IMM_DATA_OFFSET + data_len <= p.max_it_iu_len
        and out.direction is DmaDirection.TO_DEVICE
    ):
        out.desc = SrpImmBuf(data_len)
        out.imm_sges = tuple(Sge(dma, n, p.lkey) for dma, n in segs)
        return
    if out.count == 1 and p.global_rkey:
        dma, n = segs[0]
        out.desc = SrpDirectBuf(dma, p.global_rkey, n)
        return
    descs: list[SrpDirectBuf] = []
    if p.use_fast_reg:
        if pool is None:
            raise SrpMapError("fast registration without an FR pool", errno.EINVAL)
        access = _access(out.direction)
        start = 0
        while start < out.count:
            tail = _sg_tail(out.sgl, start, out.count)
            n, desc = _finish_fr(p, pool, out, tail, out.count - start, access, reg_wr_id)
            descs.append(desc)
            start += n
    else:
        if not p.global_rkey:
            raise SrpMapError("no global rkey and no fast registration", errno.EINVAL)
        descs = [SrpDirectBuf(dma, p.global_rkey, n) for dma, n in segs]
    if len(descs) == 1:
        out.desc = descs[0]
        return
    if p.cmd_sg_cnt < len(descs) and not p.allow_ext_sg:
        raise SrpMapError("Could not fit S/G list into SRP_CMD", errno.EIO)
    table_len = SrpDirectBuf.SIZE * len(descs)
    if table_len > table.size:
        raise SrpMapError(
            f"{len(descs)} descriptors do not fit the indirect table of {table.size} bytes",
            errno.EIO,
        )
    in_iu = min(len(descs), p.cmd_sg_cnt)
    table.write(b"".join(d.encode() for d in descs))
    if p.global_rkey:
        idb_rkey = p.global_rkey
    else:
        assert pool is not None
        idb = Scatterlist.from_buffer(table.dev.host, table.kva, table_len)
        idb.entries[0].dma_address = table.dma  # srp_map_idb's "hack!"
        idb.entries[0].dma_length = table_len
        idb.nents = 1
        _, idb_desc = _finish_fr(p, pool, out, idb, 1, IbAccess.REMOTE_READ, reg_wr_id)
        idb_rkey = idb_desc.key
    out.desc = SrpIndirectBuf(
        SrpDirectBuf(table.dma, idb_rkey, table_len),
        sum(d.len for d in descs),
        tuple(descs[:in_iu]),
    )


def srp_unmap_sg(dev: IbDevice, m: MappedData) -> None:
    """The ``ib_dma_unmap_sg`` of ``srp_unmap_data`` (with the original
    ``nents``; it syncs for the CPU — swiotlb copies back); idempotent."""
    if m.mapped:
        m.mapped = False
        ib_dma_unmap_sg(dev, m.sgl, m.direction, m.nents)
