"""A perftest run's verbs resources (``struct pingpong_context`` and
``perftest_resources.c``: ``ctx_init``, ``create_mr``, ``ctx_connect``,
``ctx_modify_qp_to_init`` / ``_to_rtr`` / ``_to_rts``).

The buffer is one memory region of ``2 × num_qps × BUFF_SIZE`` bytes, as
perftest's: QP *i* sends from slot *i* and announces slot ``num_qps + i``
as its VADDR, which the peer WRITEs to, READs from and does atomics on.
perftest registers user memory with ``ibv_reg_mr``; a kernel consumer
allocates pages, maps them for DMA and registers them with a
fast-registration MR (``ib_alloc_mr`` + ``ib_map_mr_sg`` + ``IB_WR_REG_MR``)
— done here, so a peer's access outside the buffer is refused with a
remote access error as on Linux. The pages are ``kmalloc`` chunks of up to
4 MiB (the buddy allocator's largest order), each naturally aligned; the
MR's page size is the chunk size, so an 8 MiB ``-a`` buffer pair is a
handful of MR pages and one contiguous I/O virtual range.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from dataclasses import dataclass

from softrdma.cm.cma import RdmaCmError, RdmaCmId
from softrdma.dma.types import DMA_BIDIRECTIONAL
from softrdma.errors import SoftRdmaError
from softrdma.memory.scatterlist import Scatterlist, ScatterlistEntry
from softrdma.perf.oob import PingpongDest
from softrdma.perf.params import DEF_QKEY, UD_ADDITION, PerfParams, Verb
from softrdma.verbs.ah import AddressHandle, AhAttr, create_ah
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_unmap_sg
from softrdma.verbs.enums import (
    IbAccess,
    IbMtu,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbSendFlags,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.mr import MemoryRegion, ib_inc_rkey
from softrdma.verbs.qp import IbSigType, QpAttr, QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import RegWR, SendWR, Sge, UdWR

__all__ = ["MAX_CHUNK", "PerfContext", "PerfError", "QpSlot"]

MAX_CHUNK = 4 << 20
"""The largest physically contiguous allocation (buddy order 10)."""
REG_WRID = 0xFFFF_FFFF
#: perftest's QP attributes (``DEF_QP_TIME``, ``DEF_RETRY``...).
QP_TIMEOUT, RETRY_CNT, RNR_RETRY, MIN_RNR_TIMER = 14, 7, 7, 12
#: How long a wait for the REG_MR completion may take.
REG_TIMEOUT = 10.0


class PerfError(SoftRdmaError):
    """A failure the tool reports as perftest does: ``message`` on stderr,
    exit status 1."""


@dataclass(frozen=True)
class QpSlot:
    """One QP's two buffer slots, as addresses in the MR (its iova)."""

    local: int
    """Where it sends from / READs into (``ctx->buf`` + i × BUFF_SIZE)."""
    remote: int
    """What it announces as VADDR (``ctx->buf`` + (num_qps + i) × BUFF_SIZE)."""


class PerfContext:
    """``struct pingpong_context``: PD, CQs, QPs and the registered buffer
    on ``dev`` for ``params``."""

    def __init__(
        self, dev: IbDevice, params: PerfParams, *, sgid_index: int, cm_id: RdmaCmId | None = None
    ) -> None:
        self.dev = dev
        self.params = params
        self.sgid_index = sgid_index
        # -R: the QP is the CM ID's (rdma_create_qp), which the CM connects
        self.cm_id = cm_id
        self.qps: list[QueuePair] = []
        self.ahs: list[AddressHandle] = []
        """UD: the address handle of each QP's peer (from its key line's GID)."""
        self.remote_qpns: list[int] = []
        self.chunks: list[int] = []
        self.mr: MemoryRegion | None = None
        self.sgl: Scatterlist | None = None
        self.rkey = 0
        self.pd = dev.alloc_pd()
        try:
            self._init()
        except BaseException:
            self.close()
            raise

    def _init(self) -> None:
        p, dev = self.params, self.dev
        self.buff_size = p.buff_size
        self.length = 2 * p.num_qps * self.buff_size
        self.chunk = min(MAX_CHUNK, 1 << (self.length - 1).bit_length())
        n_chunks = -(-self.length // self.chunk)
        host = dev.host
        for _ in range(n_chunks):
            try:
                self.chunks.append(host.kzalloc(self.chunk))
            except (ValueError, MemoryError, SoftRdmaError) as e:
                raise PerfError(f"Couldn't allocate MR: {self.length} bytes: {e}") from None
        entries = []
        for kva in self.chunks:
            for phys, n in host.kva_segments(kva, self.chunk):
                entries.append(ScatterlistEntry(host.phys_to_page(phys), phys & 4095, n))
        sgl = Scatterlist(entries)
        if ib_dma_map_sg(dev, sgl, DMA_BIDIRECTIONAL) == 0:
            raise PerfError("Couldn't allocate MR")
        self.sgl = sgl
        if p.ud:
            self._init_ud_buffer(sgl)
        else:
            self._init_mr(sgl, n_chunks)
        # One CQ for sends and receives, as perftest without -e on RC.
        depth = max(p.tx_depth, 1) * p.num_qps + max(p.rx_depth, 1) * p.num_qps + 1
        self.cq: CompletionQueue = dev.create_cq(depth)
        qp_type = IbQpType.UD if p.ud else IbQpType.RC
        for _ in range(p.num_qps):
            init = QpInitAttr(
                qp_type,
                self.cq,
                self.cq,
                QpCap(
                    max_send_wr=max(p.tx_depth, p.post_list) + 1,
                    max_recv_wr=max(p.rx_depth, 1),
                    max_send_sge=1,
                    max_recv_sge=1,
                ),
                sq_sig_type=IbSigType.REQ_WR,
            )
            if self.cm_id is not None:
                try:
                    self.qps.append(self.cm_id.create_qp(self.pd, init))
                except RdmaCmError as e:
                    raise PerfError(f" Couldn't create the rdma_cm QP: {e}") from None
                continue  # the CM moves it to INIT with its access flags
            qp = dev.create_qp(self.pd, init)
            self.qps.append(qp)
            m = IbQpAttrMask
            if p.ud:
                qp.modify(
                    QpAttr(qp_state=IbQpState.INIT, pkey_index=0, port_num=1, qkey=DEF_QKEY),
                    m.STATE | m.PKEY_INDEX | m.PORT | m.QKEY,
                )
                continue
            qp.modify(
                QpAttr(
                    qp_state=IbQpState.INIT,
                    pkey_index=0,
                    port_num=1,
                    qp_access_flags=IbAccess.REMOTE_WRITE
                    | IbAccess.LOCAL_WRITE
                    | IbAccess.REMOTE_READ
                    | IbAccess.REMOTE_ATOMIC,
                ),
                m.STATE | m.PKEY_INDEX | m.PORT | m.ACCESS_FLAGS,
            )

    def _init_mr(self, sgl: Scatterlist, n_chunks: int) -> None:
        """A fast-registration MR over the chunks (registered at connect)."""
        mr = self.dev.alloc_mr(self.pd, n_chunks + 1)
        self.mr = mr
        if mr.map_sg(sgl, None, 0, self.chunk) != sgl.nents or mr.length < self.length:
            raise PerfError("Couldn't allocate MR")
        self.rkey = ib_inc_rkey(mr.rkey)  # ib_update_fast_reg_key
        self.base = mr.iova
        self._lkey = self.rkey

    def _init_ud_buffer(self, sgl: Scatterlist) -> None:
        """UD needs no remote access, and a UD QP cannot post REG_MR (as on
        rxe): SGEs name the DMA addresses under the PD's ``local_dma_lkey``,
        which needs the buffer in one DMA-contiguous range."""
        segs = sgl.dma_segments()
        gaps = any(a + n != b for (a, n), (b, _) in itertools.pairwise(segs))
        if gaps or sum(n for _, n in segs) < self.length:
            raise PerfError(f"Couldn't allocate MR: {self.length} bytes are not contiguous")
        self.base = segs[0][0]
        self.rkey = 0
        self._lkey = self.pd.local_dma_lkey

    # -- addresses -------------------------------------------------------------------

    def slot(self, i: int) -> QpSlot:
        """QP ``i``'s slots."""
        bs = self.buff_size
        return QpSlot(self.base + i * bs, self.base + (self.params.num_qps + i) * bs)

    def my_dests(self, psns: list[int] | None = None) -> list[PingpongDest]:
        """This side's key lines (``set_up_connection``): random 24-bit PSNs,
        the MR's rkey and each QP's remote slot; out_reads as the params
        say; the GID of ``sgid_index``."""
        gid = self.dev.query_gid(1, self.sgid_index)
        out = []
        for i, qp in enumerate(self.qps):
            psn = psns[i] if psns else random.getrandbits(24)
            out.append(
                PingpongDest(0, self.params.out_reads, qp.qp_num, psn, self.rkey,
                             self.slot(i).remote, gid)
            )  # fmt: skip
        return out

    def cpu_addr(self, iova: int) -> int:
        """The kernel virtual address behind an MR address."""
        off = iova - self.base
        if not 0 <= off < self.length:
            raise ValueError(f"{iova:#x} outside the buffer")
        return self.chunks[off // self.chunk] + off % self.chunk

    def read_byte(self, iova: int) -> int:
        """What the CPU sees at ``iova`` (the device writes it straight to
        memory: the buffer is mapped bidirectionally with no bounce)."""
        return self.dev.host.cpu_read(self.cpu_addr(iova), 1)[0]

    def write_byte(self, iova: int, value: int) -> None:
        """Store one byte at ``iova`` (write_lat's counter)."""
        self.dev.host.cpu_write(self.cpu_addr(iova), bytes([value & 0xFF]))

    def read(self, iova: int, length: int) -> bytes:
        """``length`` bytes from ``iova``, across chunks."""
        out = bytearray()
        while length > 0:
            kva = self.cpu_addr(iova)
            n = min(length, self.chunk - (iova - self.base) % self.chunk)
            out += self.dev.host.cpu_read(kva, n)
            iova, length = iova + n, length - n
        return bytes(out)

    # -- connection ---------------------------------------------------------------------

    def connect(self, mtu: IbMtu, my: list[PingpongDest], rem: list[PingpongDest]) -> None:
        """``ctx_connect``: each QP to RTR and RTS towards its remote dest,
        then the buffer registered (``IB_WR_REG_MR`` on QP 0, waited for)
        before the peer can be told to go."""
        p = self.params
        if p.ud:
            self._connect_ud(my, rem)
            return
        reads = p.tool.verb in (Verb.READ, Verb.ATOMIC)
        m = IbQpAttrMask
        for qp, me, dest in zip(self.qps, my, rem, strict=True):
            ah = AhAttr(dgid=dest.gid, sgid_index=self.sgid_index, hop_limit=0xFF)
            try:
                qp.modify(
                    QpAttr(
                        qp_state=IbQpState.RTR,
                        path_mtu=mtu,
                        dest_qp_num=dest.qpn,
                        rq_psn=dest.psn,
                        # out_reads: ours bounds what the peer may have outstanding
                        max_dest_rd_atomic=me.out_reads if reads else 1,
                        min_rnr_timer=MIN_RNR_TIMER,
                        ah_attr=ah,
                    ),
                    m.STATE | m.AV | m.PATH_MTU | m.DEST_QPN | m.RQ_PSN
                    | m.MAX_DEST_RD_ATOMIC | m.MIN_RNR_TIMER,
                )  # fmt: skip
            except VerbsError as e:
                raise PerfError(f" Failed to modify QP {qp.qp_num} to RTR: {e}") from None
            try:
                qp.modify(
                    QpAttr(
                        qp_state=IbQpState.RTS,
                        timeout=QP_TIMEOUT,
                        retry_cnt=RETRY_CNT,
                        rnr_retry=RNR_RETRY,
                        sq_psn=me.psn,
                        # the peer's out_reads: what we may have outstanding
                        max_rd_atomic=max(
                            1, min(dest.out_reads, self.dev.attrs.max_qp_init_rd_atom)
                        )
                        if reads
                        else 1,
                    ),
                    m.STATE | m.TIMEOUT | m.RETRY_CNT | m.RNR_RETRY | m.SQ_PSN | m.MAX_QP_RD_ATOMIC,
                )
            except VerbsError as e:
                raise PerfError(f" Failed to modify QP {qp.qp_num} to RTS: {e}") from None
        self.register()

    def _connect_ud(self, my: list[PingpongDest], rem: list[PingpongDest]) -> None:
        """``ctx_connect`` for UD: RTR, RTS at our PSN, and an address
        handle towards the peer's GID (``ibv_create_ah``)."""
        m = IbQpAttrMask
        for qp, me, dest in zip(self.qps, my, rem, strict=True):
            try:
                qp.modify(QpAttr(qp_state=IbQpState.RTR), m.STATE)
                qp.modify(QpAttr(qp_state=IbQpState.RTS, sq_psn=me.psn), m.STATE | m.SQ_PSN)
            except VerbsError as e:
                raise PerfError(f" Failed to modify UD QP {qp.qp_num} to RTS: {e}") from None
            attr = AhAttr(dgid=dest.gid, sgid_index=self.sgid_index, hop_limit=0xFF)
            try:
                self.ahs.append(create_ah(self.pd, attr))
            except VerbsError as e:
                raise PerfError(f" Unable to create AH for UD: {e}") from None
            self.remote_qpns.append(dest.qpn)

    def send_wr(self, i: int, sge: Sge, flags: IbSendFlags) -> SendWR:
        """A SEND of ``sge`` on QP ``i`` (wr_id ``i``): on UD, to the peer's
        QP through its address handle with perftest's QKey."""
        if self.params.ud:
            return UdWR(i, IbWrOpcode.SEND, (sge,), flags, ah=self.ahs[i],
                        remote_qpn=self.remote_qpns[i], remote_qkey=DEF_QKEY)  # fmt: skip
        return SendWR(i, IbWrOpcode.SEND, (sge,), flags)

    def recv_length(self, size: int) -> int:
        """What a receive of a ``size``-byte message needs (UD: the GRH too)."""
        return size + UD_ADDITION if self.params.ud else size

    def register(self) -> None:
        """Register the buffer (``IB_WR_REG_MR`` on QP 0, which must be at
        RTS) and wait for it, before the peer may use the key."""
        assert self.mr is not None
        wr = RegWR(
            REG_WRID,
            IbWrOpcode.REG_MR,
            send_flags=IbSendFlags.SIGNALED,
            mr=self.mr,
            key=self.rkey,
            access=IbAccess.LOCAL_WRITE
            | IbAccess.REMOTE_WRITE
            | IbAccess.REMOTE_READ
            | IbAccess.REMOTE_ATOMIC,
        )
        try:
            self.qps[0].post_send(wr)
        except VerbsError as e:
            raise PerfError(f"Couldn't register MR: {e}") from None
        if not self.cq.wait(REG_TIMEOUT):
            raise PerfError("Couldn't register MR: no completion")
        (wc,) = self.cq.poll(1)
        if wc.wr_id != REG_WRID or wc.status != IbWcStatus.SUCCESS:
            raise PerfError(f"Couldn't register MR: {wc.status.name}")

    @property
    def lkey(self) -> int:
        """The key local SGEs use (the MR is registered with one key; UD:
        the PD's ``local_dma_lkey``)."""
        return self._lkey

    def close(self) -> None:
        """``destroy_ctx``: QPs, CQ, MR, mapping, pages, PD."""
        dev = self.dev
        if self.cm_id is not None:  # rdma_disconnect, then rdma_destroy_id
            cid, self.cm_id = self.cm_id, None
            with contextlib.suppress(RdmaCmError):  # never connected, or the peer left first
                cid.disconnect()
            cid.destroy()
        with dev.lock:
            for qp in self.qps:
                if not qp.destroyed:
                    qp.destroy()
            self.qps = []
            for ah in self.ahs:
                ah.destroy()
            self.ahs = []
            if getattr(self, "cq", None) is not None:
                self.cq.destroy()
                del self.cq
            if self.mr is not None:
                dev.dereg_mr(self.mr)
                self.mr = None
            if self.sgl is not None:
                ib_dma_unmap_sg(dev, self.sgl, DMA_BIDIRECTIONAL)
                self.sgl = None
            for kva in self.chunks:
                dev.host.kfree(kva)
            self.chunks = []
            self.pd.dealloc()
