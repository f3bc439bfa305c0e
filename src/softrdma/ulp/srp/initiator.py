"""An SRP initiator: the model of Linux's ``ib_srp`` with the part of the
SCSI midlayer, ``sd`` and the block layer it needs to be a disk.

Kernel counterparts: ``drivers/infiniband/ulp/srp/ib_srp.c`` — the device
setup (``srp_add_one``: fast registration or the PD's unsafe global rkey),
the target port (``add_target_store``: ``mr_per_cmd``, ``sg_tablesize``,
the IU lengths), login over the RDMA CM (``srp_send_req``,
``srp_cm_rep_handler``, ``srp_rdma_cm_handler``,
``srp_rdma_cm_rej_handler``), the channel (``srp_create_ch_ib``,
``srp_alloc_iu_bufs``, ``srp_free_ch_ib``), commands
(``srp_queuecommand``, ``__srp_get_tx_iu`` with its credits,
``srp_post_send``, ``srp_recv_done``, ``srp_process_rsp``,
``srp_process_cred_req``, ``srp_process_aer_req``, ``srp_unmap_data``,
``srp_inv_rkey``), the error handler's hooks (``srp_abort``,
``srp_reset_device``, ``srp_reset_host`` → ``srp_rport_reconnect``) and the
SRP transport class's timers (``reconnect_delay``, ``fast_io_fail_tmo``,
``scsi_transport_srp.c``). The data mapping is :mod:`.initiator_map`.

Progress. Nothing here runs on its own: the application's calls drive it
(:meth:`SrpInitiator.poll`, :meth:`~SrpInitiator.wait` and every blocking
call). They poll the CQs and the RDMA CM event channel without blocking
and, when nothing is there, wait on the device — on simulated time that
runs the simulation (the target included) up to the next deadline of the
initiator (a command timeout, a task-management timeout, a reconnect);
on real time the thread sleeps until the progress thread posts a
completion or an event. So the same code runs on the in-process fabric and
over UDP. Nothing raised while processing a completion escapes: bad input
from the target is counted in :attr:`SrpInitiator.stats` and dropped.

Differences from ib_srp, each toward not handing the target more than
the command's buffer: a command completes (and its pages are unmapped)
only after its SEND has completed and its LOCAL_INVs have completed, not
when they are posted; an MR is registered for the remote access the
command's direction needs; a timed-out command completes only once the
target can no longer reach its buffer (its abort answered, its LUN reset,
or the QP gone). ib_srp never sends SRP_I_LOGOUT and ignores SRP_T_LOGOUT;
this model sends the one at logout and treats the other as the target
leaving.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import errno
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Self

from softrdma.cm.cma import (
    RdmaCmError,
    RdmaCmEvent,
    RdmaCmEventType,
    RdmaCmId,
    RdmaConnParam,
    RdmaEventChannel,
)
from softrdma.cm.messages import CmRejReason
from softrdma.dma.types import DmaDirection
from softrdma.memory.layout import PAGE_SIZE
from softrdma.memory.scatterlist import Scatterlist
from softrdma.ulp.iu import IuBuf, IuMapError, alloc_iu_ring, free_iu_ring
from softrdma.ulp.progress import service_until
from softrdma.ulp.sd_capacity import SdCapacity
from softrdma.ulp.srp.initiator_errors import (
    ScsiCheckCondition,
    ScsiStatusError,
    SrpCommandTimeout,
    SrpConnectError,
    SrpInitiatorError,
    SrpLoginRejected,
    SrpMapError,
    SrpTransportError,
)
from softrdma.ulp.srp.initiator_map import (
    SRP_MAX_PAGES_PER_MR,
    FrDesc,
    FrPool,
    MapParams,
    MappedData,
    SrpBuffer,
    srp_map_data,
    srp_unmap_sg,
)
from softrdma.ulp.srp.initiator_scsi import (
    UNIT_ATTENTION,
    Inquiry,
    ScsiStatus,
    cdb_inquiry,
    cdb_read,
    cdb_read_capacity_10,
    cdb_read_capacity_16,
    cdb_synchronize_cache,
    cdb_write,
    parse_inquiry,
    parse_read_capacity_10,
    parse_read_capacity_16,
    status_error,
)
from softrdma.ulp.srp.proto import (
    SRP_IMM_DATA_OFFSET,
    SRP_MAX_ADD_CDB_LEN,
    SrpAerReq,
    SrpAerRsp,
    SrpBufFmt,
    SrpCmd,
    SrpCredReq,
    SrpCredRsp,
    SrpDataBuf,
    SrpDirectBuf,
    SrpError,
    SrpILogout,
    SrpImmBuf,
    SrpIndirectBuf,
    SrpLoginRej,
    SrpLoginReq,
    SrpLoginReqFlag,
    SrpLoginRsp,
    SrpLoginRspFlag,
    SrpOpcode,
    SrpRsp,
    SrpRspFlag,
    SrpTLogout,
    SrpTskMgmt,
    SrpTskMgmtFunc,
)
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.device import IB_DEVICE_MEM_MGT_EXTENSIONS, IbDevice
from softrdma.verbs.enums import (
    IbPdFlags,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbSendFlags,
    IbWcFlags,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import PostError, VerbsError
from softrdma.verbs.qp import IbSigType, QpAttr, QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import RecvWR, SendWR, WorkCompletion

__all__ = [
    "SRP_ABORT_TIMEOUT_MS",
    "SRP_DEFAULT_CMD_SQ_SIZE",
    "SRP_DEFAULT_QUEUE_SIZE",
    "SRP_DEF_SG_TABLESIZE",
    "SRP_MAX_IMM_DATA",
    "SRP_MAX_SGE",
    "SRP_RDMA_CM_PORT",
    "SRP_RSP_SQ_SIZE",
    "SRP_TAG_NO_REQ",
    "SRP_TAG_TSK_MGMT",
    "SRP_TSK_MGMT_SQ_SIZE",
    "BlockIo",
    "Inquiry",
    "ScsiCheckCondition",
    "ScsiStatusError",
    "SrpBuffer",
    "SrpCommandTimeout",
    "SrpConnectError",
    "SrpInitiator",
    "SrpInitiatorError",
    "SrpLoginRejected",
    "SrpMapError",
    "SrpRequest",
    "SrpState",
    "SrpStats",
    "SrpTransportError",
]

log = logging.getLogger("softrdma.ulp.srp")

# --- ib_srp.h -----------------------------------------------------------------------------

SRP_ABORT_TIMEOUT_MS = 5000
SRP_DEF_SG_TABLESIZE = 12
SRP_DEFAULT_QUEUE_SIZE = 1 << 6
SRP_RSP_SQ_SIZE = 1
SRP_TSK_MGMT_SQ_SIZE = 1
SRP_DEFAULT_CMD_SQ_SIZE = SRP_DEFAULT_QUEUE_SIZE - SRP_RSP_SQ_SIZE - SRP_TSK_MGMT_SQ_SIZE
SRP_MAX_IMM_SGE = 2
SRP_MAX_SGE = SRP_MAX_IMM_SGE + 1
SRP_TAG_NO_REQ = 0xFFFF_FFFF
SRP_TAG_TSK_MGMT = 1 << 31
SRP_MAX_IMM_DATA = 8 * 1024
"""ib_srp's ``max_imm_data`` module parameter default."""
SRP_RDMA_CM_PORT = 5555
"""The RDMA CM port ib_srpt is conventionally configured to listen on."""
SRP_MAX_SECTORS = 1024
"""The SCSI host's ``max_sectors`` default for ib_srp (the ``max_sect`` option)."""
SRP_MAX_TI_IU_LEN = 128 * 1024
"""The largest ``max_ti_iu_len`` this initiator accepts (each receive IU
is that big)."""

_TM_OK = (0x00, 0x08)  # SAM: FUNCTION COMPLETE, FUNCTION SUCCEEDED

# wr_id kinds (the kernel's ib_cqe.done callbacks)
_KIND_SHIFT = 56
_RX, _TX, _REG, _INV = 1, 2, 3, 4
_ID_MASK = (1 << _KIND_SHIFT) - 1


def _wr_id(kind: int, ident: int) -> int:
    return kind << _KIND_SHIFT | (ident & _ID_MASK)


class SrpState(enum.Enum):
    """Where the target port is: ``IDLE`` (not logged in), ``LIVE``,
    ``LOST`` (the channel is gone; commands wait for a reconnect —
    ``SRP_RPORT_BLOCKED``), ``FAILFAST`` (``fast_io_fail_tmo`` expired:
    commands fail at once — ``SRP_RPORT_FAIL_FAST``), ``CLOSED``."""

    IDLE = "idle"
    LIVE = "live"
    LOST = "lost"
    FAILFAST = "fail-fast"
    CLOSED = "closed"


@dataclass
class SrpStats:
    """What the initiator counted (ib_srp's ``zero_req_lim`` and its
    "Null scmnd for RSP", "Unhandled SRP opcode", "no IU available to send
    response" messages, and the recovery actions)."""

    commands: int = 0
    completed: int = 0
    immediate: int = 0
    direct: int = 0
    indirect: int = 0
    external_tables: int = 0
    reg_mr: int = 0
    local_inv: int = 0
    remote_inv: int = 0
    bad_remote_inv: int = 0
    zero_req_lim: int = 0
    unknown_tag: int = 0
    late_rsp: int = 0
    late_tsk_mgmt: int = 0
    malformed_iu: int = 0
    unexpected_iu: int = 0
    credit_violations: int = 0
    cred_req: int = 0
    aer_req: int = 0
    t_logout: int = 0
    wc_errors: int = 0
    retries: int = 0
    aborts: int = 0
    lun_resets: int = 0
    reconnects: int = 0
    resubmitted: int = 0
    map_busy: int = 0
    progress_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Outcome(enum.Enum):
    COMPLETE = "complete"  # an SRP_RSP arrived: judge its status
    REQUEUE = "requeue"  # send it again (reconnect, LUN reset of another command)
    ERROR = "error"  # finish with _error


class SrpRequest:
    """One SCSI command and its SRP life (``struct srp_request`` with the
    ``scsi_cmnd`` it carries). Created by :meth:`SrpInitiator.submit`.

    After completion: :attr:`status` and :attr:`sense` (SCSI), :attr:`resid`
    (the residual count of ``DIUNDER`` / ``DOUNDER``), :attr:`error` (a
    typed error, or None), and what was last put on the wire for it:
    :attr:`dma_segments` (what ``ib_dma_map_sg`` produced), :attr:`descriptor`
    (the SRP_CMD's data descriptor) and :attr:`rkeys` (fast registration)."""

    _serials = itertools.count()

    def __init__(
        self,
        cdb: bytes,
        sgl: Scatterlist | None,
        direction: DmaDirection,
        lun: int,
        timeout: float,
        retries: int,
        on_done: Callable[[SrpRequest], None] | None,
    ) -> None:
        self.cdb = bytes(cdb)
        self.sgl = sgl
        self.direction = direction
        self.lun = lun
        self.timeout = timeout
        self.retries_left = retries
        self.serial = next(self._serials)
        self.tag: int | None = None
        self.status: int | None = None
        self.sense = b""
        self.resid = 0
        self.error: SrpInitiatorError | None = None
        self.done = False
        self.transmissions = 0
        self.dma_segments: tuple[tuple[int, int], ...] = ()
        self.descriptor: SrpDataBuf | None = None
        self.rkeys: tuple[int, ...] = ()
        self._callbacks: list[Callable[[SrpRequest], None]] = [] if on_done is None else [on_done]
        # while on the wire
        self._map: MappedData | None = None
        self._table: IuBuf | None = None
        self._deadline = 0.0
        self._claimed = False
        self._send_pending = False
        self._inv_pending = 0
        self._inv_frs: list[FrDesc] = []
        self._remote_inv: set[int] = set()
        self._outcome: _Outcome | None = None
        self._pending_error: SrpInitiatorError | None = None

    def __repr__(self) -> str:
        state = "done" if self.done else ("active" if self.tag is not None else "queued")
        tag = "-" if self.tag is None else f"{self.tag:#x}"
        return f"SrpRequest(#{self.serial}, op={self.cdb[0]:#04x}, tag={tag}, {state})"

    @property
    def data_length(self) -> int:
        """``scsi_bufflen``."""
        return 0 if self.sgl is None else self.sgl.total_length

    def add_done_callback(self, fn: Callable[[SrpRequest], None]) -> None:
        """Call ``fn(request)`` at completion (at once if done). It runs
        inside the initiator's progress and must not wait."""
        if self.done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def result(self) -> SrpRequest:
        """The request itself once done and successful; raises its error
        (or :class:`SrpInitiatorError` when it is not done)."""
        if not self.done:
            raise SrpInitiatorError(f"{self!r} has not completed", errno.EBUSY)
        if self.error is not None:
            raise self.error
        return self


class BlockIo:
    """A read or write of consecutive blocks, split into SCSI commands of
    at most ``max_sectors`` and ``sg_tablesize`` pages (what
    ``blk_rq_map_sg`` and the queue limits do to a bio); each command has
    its own :class:`SrpBuffer`. Done when all its commands are."""

    def __init__(self, lba: int, nblocks: int, block_size: int, is_write: bool) -> None:
        self.lba = lba
        self.nblocks = nblocks
        self.block_size = block_size
        self.is_write = is_write
        self.requests: list[SrpRequest] = []
        self._bufs: dict[int, tuple[SrpBuffer, int]] = {}
        self._data = bytearray() if is_write else bytearray(nblocks * block_size)
        self.error: SrpInitiatorError | None = None

    def __repr__(self) -> str:
        kind = "write" if self.is_write else "read"
        return f"BlockIo({kind} lba={self.lba} n={self.nblocks}, {len(self.requests)} commands)"

    @property
    def done(self) -> bool:
        """Whether every command completed."""
        return all(r.done for r in self.requests)

    def _attach(self, req: SrpRequest, buf: SrpBuffer, offset: int) -> None:
        self.requests.append(req)
        self._bufs[req.serial] = (buf, offset)
        req.add_done_callback(self._one_done)

    def _one_done(self, req: SrpRequest) -> None:
        buf, offset = self._bufs.pop(req.serial)
        try:
            if req.error is None and req.resid:
                req.error = SrpInitiatorError(
                    f"short transfer: {req.resid} of {buf.length} bytes not moved", errno.EIO
                )
            if req.error is None and not self.is_write:
                self._data[offset : offset + buf.length] = buf.read()
            if req.error is not None and self.error is None:
                self.error = req.error
        finally:
            buf.free()

    def result(self) -> bytes | None:
        """The data read (None for a write); raises the first command's error."""
        if not self.done:
            raise SrpInitiatorError(f"{self!r} has not completed", errno.EBUSY)
        if self.error is not None:
            raise self.error
        return None if self.is_write else bytes(self._data)


@dataclass(eq=False)
class _Tm:
    """A task management request in flight (``ch->tsk_mgmt_tag``,
    ``ch->tsk_mgmt_done``, ``ch->tsk_mgmt_status``)."""

    tag: int
    func: SrpTskMgmtFunc
    lun: int
    task_tag: int
    deadline: float
    req: SrpRequest | None
    status: int | None = None


@dataclass(eq=False)
class _Channel:
    """``struct srp_rdma_ch``: one RDMA CM connection and what hangs off it."""

    cm_id: RdmaCmId
    qp: QueuePair
    send_cq: CompletionQueue
    recv_cq: CompletionQueue
    fr_pool: FrPool | None
    max_send_sge: int
    rx_ring: list[IuBuf] = field(default_factory=list)
    tx_ring: list[IuBuf] = field(default_factory=list)
    free_tx: list[IuBuf] = field(default_factory=list)
    tx_owner: dict[int, SrpRequest] = field(default_factory=dict)
    inv_owner: dict[int, SrpRequest] = field(default_factory=dict)
    req_lim: int = 0
    max_ti_iu_len: int = 0
    max_it_iu_len: int = 0
    use_imm_data: bool = False
    max_imm_sge: int = 0
    cmd_sg_cnt: int = 0
    connected: bool = False
    qp_in_error: bool = False
    disconnected: bool = False
    login_rsp: SrpLoginRsp | None = None
    rq_tmo: float = 0.0
    tsk_mgmt_tag: int = 0
    logout_iu: int | None = None
    logout_sent: bool = False


def _be64(value: int | bytes, what: str) -> bytes:
    if isinstance(value, bytes | bytearray):
        if len(value) != 8:
            raise ValueError(f"{what}: 8 bytes expected, got {len(value)}")
        return bytes(value)
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{what}={value!r}: not a 64-bit value")
    return value.to_bytes(8, "big")


def srp_max_it_iu_len(cmd_sg_cnt: int, use_imm_data: bool, max_imm_data: int, limit: int) -> int:
    """``srp_max_it_iu_len``: an SRP_CMD with ``cmd_sg_cnt`` descriptors in
    an indirect descriptor, or with immediate data up to ``max_imm_data``
    after ``SRP_IMM_DATA_OFFSET``; at most ``limit`` (ib_srp's
    ``max_it_iu_size``) unless that is 0."""
    length = (
        SrpCmd.SIZE + SRP_MAX_ADD_CDB_LEN + SrpIndirectBuf.HDR_SIZE + cmd_sg_cnt * SrpDirectBuf.SIZE
    )
    if use_imm_data:
        length = max(length, SRP_IMM_DATA_OFFSET + max_imm_data)
    if limit:
        length = min(length, limit)
    return length


class SrpInitiator(SdCapacity):
    """An SRP target port as ib_srp logs into it, over the RDMA CM, and the
    disk behind LUN ``lun`` (``add_target_store`` with ``dest=ip:port``,
    ``id_ext``, ``ioc_guid``, ``initiator_ext``, ``queue_size``
    (``can_queue`` here), ``max_sect``, ``cmd_sg_entries``,
    ``sg_tablesize``, ``allow_ext_sg``, ``max_it_iu_size``,
    ``tl_retry_count``; and the module parameters ``register_always``,
    ``never_register``, ``use_imm_data``, ``max_imm_data``,
    ``reconnect_delay``, ``fast_io_fail_tmo``).

    Registration modes (``srp_add_one``): on a device with fast
    registration, ``register_always=True`` (the default) registers every
    data buffer with an MR and gives the PD no global rkey;
    ``register_always=False`` keeps FR for multi-segment buffers but asks
    the PD for the unsafe global rkey and uses it for single segments;
    ``never_register=True`` (or a device without FR) describes every
    segment under the global rkey.

    ``cmd_timeout`` is the block layer's request timeout (default: as
    ib_srp sets it, the larger of 30 s and the QP's worst-case retry
    time); ``retries`` bounds how often a command is sent again (BUSY,
    TASK SET FULL, UNIT ATTENTION, reconnects); ``highmem`` puts the block
    layer's pages in ZONE_HIGHMEM when the host has one."""

    def __init__(
        self,
        dev: IbDevice,
        dest: str,
        port: int = SRP_RDMA_CM_PORT,
        *,
        id_ext: int | bytes = 0,
        ioc_guid: int | bytes = 0,
        initiator_ext: int | bytes = 0,
        src: str | None = None,
        lun: int = 0,
        can_queue: int = SRP_DEFAULT_CMD_SQ_SIZE,
        cmd_sg_entries: int = SRP_DEF_SG_TABLESIZE,
        sg_tablesize: int | None = None,
        allow_ext_sg: bool = False,
        use_imm_data: bool = True,
        max_imm_data: int = SRP_MAX_IMM_DATA,
        register_always: bool = True,
        never_register: bool = False,
        max_pages_per_mr: int | None = None,
        max_sectors: int = SRP_MAX_SECTORS,
        max_it_iu_size: int = 0,
        tl_retry_count: int = 7,
        highmem: bool = True,
        cmd_timeout: float | None = None,
        abort_timeout: float = SRP_ABORT_TIMEOUT_MS / 1000,
        retries: int = 5,
        reconnect_delay: float | None = 10.0,
        fast_io_fail_tmo: float | None = 15.0,
    ) -> None:
        if not 1 <= cmd_sg_entries <= 255:
            raise ValueError(f"cmd_sg_entries {cmd_sg_entries} outside 1..255")
        if can_queue < 1:
            raise ValueError(f"can_queue {can_queue} must be positive")
        if not 2 <= tl_retry_count <= 7:
            raise ValueError(f"tl_retry_count {tl_retry_count} outside 2..7")
        self.dev = dev
        self.host = dev.host
        self.dest = dest
        self.port = port
        self.src = src
        self.lun = lun
        self._lock = dev.lock
        # -- srp_add_one: the device --------------------------------------------------
        attrs = dev.attrs
        cap = attrs.page_size_cap
        ffs = (cap & -cap).bit_length() if cap else 0
        mr_page_shift = max(12, ffs - 1)
        self.mr_page_size = 1 << mr_page_shift
        pages = min(SRP_MAX_PAGES_PER_MR, attrs.max_mr_size // self.mr_page_size)
        self.has_fr = bool(attrs.device_cap_flags & IB_DEVICE_MEM_MGT_EXTENSIONS)
        self.use_fast_reg = (
            self.has_fr and not never_register and attrs.max_mr_size >= 2 * self.mr_page_size
        )
        self.register_always = register_always
        flags = IbPdFlags(0)
        if never_register or not register_always or not self.has_fr:
            flags |= IbPdFlags.UNSAFE_GLOBAL_RKEY
        if self.use_fast_reg:
            pages = min(pages, attrs.max_fast_reg_page_list_len)
        if max_pages_per_mr is not None:
            pages = max(1, min(pages, max_pages_per_mr))
        self.max_pages_per_mr = pages
        self.pd = dev.alloc_pd(flags)
        self.global_rkey = self.pd.unsafe_global_rkey if flags else 0
        self.lkey = self.pd.local_dma_lkey
        # -- add_target_store: the target port ----------------------------------------
        self.can_queue = can_queue
        self.queue_size = can_queue + SRP_RSP_SQ_SIZE + SRP_TSK_MGMT_SQ_SIZE
        self.cmd_sg_cnt = cmd_sg_entries
        self.sg_tablesize = max(sg_tablesize or cmd_sg_entries, cmd_sg_entries)
        self.allow_ext_sg = allow_ext_sg
        if not self.use_fast_reg and not allow_ext_sg and self.cmd_sg_cnt < self.sg_tablesize:
            log.warning(
                "No MR pool and no external indirect descriptors, limiting sg_tablesize to cmd_sg_cnt"
            )
            self.sg_tablesize = self.cmd_sg_cnt
        self.max_sectors = max_sectors
        self.mr_per_cmd = 0
        if self.use_fast_reg:
            max_sectors_per_mr = self.max_pages_per_mr << (mr_page_shift - 9)
            self.mr_per_cmd = (
                int(register_always)
                + (max_sectors + 1 + max_sectors_per_mr - 1) // max_sectors_per_mr
            )
        self.mr_pool_size = self.can_queue * self.mr_per_cmd
        self.indirect_size = self.sg_tablesize * SrpDirectBuf.SIZE
        self.use_imm_data = use_imm_data
        self.max_imm_data = max_imm_data
        self.max_it_iu_size = max_it_iu_size
        self.max_iu_len = srp_max_it_iu_len(
            self.cmd_sg_cnt, use_imm_data, max_imm_data, max_it_iu_size
        )
        self.tl_retry_count = tl_retry_count
        sgid = dev.query_gid(1, 0)  # rdma_query_gid(ibdev, port, 0, &target->sgid)
        self.initiator_port_id = _be64(initiator_ext, "initiator_ext") + sgid[8:16]
        self.target_port_id = _be64(id_ext, "id_ext") + _be64(ioc_guid, "ioc_guid")
        self.highmem = highmem
        self._cmd_timeout = cmd_timeout
        self.abort_timeout = abort_timeout
        self.retries = retries
        self.reconnect_delay = reconnect_delay
        self.fast_io_fail_tmo = fast_io_fail_tmo
        # -- state ------------------------------------------------------------------------
        self.state = SrpState.IDLE
        self.stats = SrpStats()
        self.aer_events: list[tuple[int, bytes]] = []
        self.lost_reason = ""
        self._events = RdmaEventChannel(self.host)
        self._ch: _Channel | None = None
        self._tables: list[IuBuf] = []  # srp_init_cmd_priv's indirect_desc, one per command
        self._free_tables: list[IuBuf] = []
        self._pending: deque[SrpRequest] = deque()
        self._active: dict[int, SrpRequest] = {}
        self._finishing: set[SrpRequest] = set()
        self._next_tag = 0
        self._eh_queue: deque[SrpRequest] = deque()
        self._tm: _Tm | None = None
        self._want_reconnect: str | None = None
        self._lost_at = 0.0
        self._next_reconnect: float | None = None
        self._in_service = False
        self._capacity: tuple[int, int] | None = None
        self._connecting: RdmaCmId | None = None
        self._login_events: list[RdmaCmEvent] = []
        self._partial: _Channel | None = None
        try:
            self._tables = alloc_iu_ring(
                dev, self.can_queue, self.indirect_size, DmaDirection.TO_DEVICE
            )
        except IuMapError:
            self.pd.dealloc()
            raise
        self._free_tables = list(self._tables)

    def __repr__(self) -> str:
        return f"SrpInitiator({self.dev.name} -> {self.dest}:{self.port}, {self.state.value})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what the login negotiated ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the channel is up (``ch->connected``)."""
        return self.state is SrpState.LIVE

    @property
    def login_rsp(self) -> SrpLoginRsp | None:
        """The target's SRP_LOGIN_RSP of the current channel."""
        return None if self._ch is None else self._ch.login_rsp

    @property
    def req_lim(self) -> int:
        """The credits left (``ch->req_lim``)."""
        return 0 if self._ch is None else self._ch.req_lim

    @property
    def max_it_iu_len(self) -> int:
        """The largest IU this initiator sends on the channel."""
        return 0 if self._ch is None else self._ch.max_it_iu_len

    @property
    def max_ti_iu_len(self) -> int:
        """The largest IU the target sends (the receive IU size)."""
        return 0 if self._ch is None else self._ch.max_ti_iu_len

    @property
    def imm_data_in_use(self) -> bool:
        """Whether writes may carry immediate data (asked for and granted)."""
        return self._ch is not None and self._ch.use_imm_data

    @property
    def cmd_timeout(self) -> float:
        """The command timeout in seconds (``blk_queue_rq_timeout`` in
        ``srp_sdev_configure``: at least 30 s and the QP's retry time)."""
        if self._cmd_timeout is not None:
            return self._cmd_timeout
        rq_tmo = 0.0 if self._ch is None else self._ch.rq_tmo
        return max(30.0, rq_tmo)

    @property
    def outstanding(self) -> int:
        """Commands sent and not yet answered."""
        return len(self._active)

    @property
    def queued(self) -> int:
        """Commands waiting for a credit, an IU or the channel."""
        return len(self._pending)

    # -- login, logout, reconnect ------------------------------------------------------------

    def login(self, timeout: float | None = None) -> SrpLoginRsp:
        """Connect and log in (``srp_create_ch_ib`` + ``srp_connect_ch``);
        raises :class:`SrpLoginRejected`, :class:`SrpConnectError`."""
        with self._lock:
            if self.state is SrpState.CLOSED:
                raise SrpTransportError("the initiator is closed", errno.ENODEV)
            if self._ch is not None:
                raise SrpInitiatorError("already logged in", errno.EISCONN)
            ch = self._connect(timeout)
            self._ch = ch
            self.state = SrpState.LIVE
            self._next_reconnect = None
            assert ch.login_rsp is not None
            self._service()
            return ch.login_rsp

    def logout(self, timeout: float = 30.0, *, drain: bool = True) -> None:
        """Log out: with ``drain``, let outstanding commands finish first;
        then SRP_I_LOGOUT, ``rdma_disconnect`` and the channel's teardown.
        Commands still outstanding fail with :class:`SrpTransportError`."""
        with self._lock:
            ch = self._ch
            if ch is None:
                return
            if self.state is SrpState.LIVE:
                if drain:
                    self._wait(lambda: not self._active and not self._pending, timeout)
                self._send_i_logout(ch, timeout)
                ch.connected = False
                try:
                    ch.cm_id.disconnect()
                    self._wait_raw(lambda: ch.disconnected, timeout)
                except RdmaCmError:
                    pass
            self._free_channel(ch, requeue=False, reason="logged out")
            self.state = SrpState.IDLE
            self._fail_pending(SrpTransportError("logged out", errno.ESHUTDOWN))

    def reconnect(self, timeout: float | None = None) -> None:
        """``srp_reconnect_rport``: tear the channel down (its QP to ERR,
        every unanswered command taken back), log in again and send the
        unanswered commands again. Raises the login's error (the port
        stays LOST, and ``reconnect_delay`` keeps trying)."""
        with self._lock:
            if self.state is SrpState.CLOSED:
                raise SrpTransportError("the initiator is closed", errno.ENODEV)
            self._reconnect(timeout, "reconnect requested")

    def close(self) -> None:
        """Log out if logged in, fail whatever is left, free every buffer,
        the PD and the IU tables (the device can then be released with no
        mapping left)."""
        with self._lock:
            if self.state is SrpState.CLOSED:
                return
            try:
                self.logout(drain=False)
            finally:
                if self._ch is not None:
                    self._free_channel(self._ch, requeue=False, reason="closed")
                self._fail_pending(SrpTransportError("closed", errno.ESHUTDOWN))
                free_iu_ring(self._tables)
                self._tables = self._free_tables = []
                self.pd.dealloc()
                self.state = SrpState.CLOSED

    # -- submitting ------------------------------------------------------------------------

    def submit(
        self,
        cdb: bytes,
        buf: SrpBuffer | Scatterlist | None = None,
        direction: DmaDirection = DmaDirection.NONE,
        *,
        lun: int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        on_done: Callable[[SrpRequest], None] | None = None,
    ) -> SrpRequest:
        """Queue a SCSI command (``srp_queuecommand``): ``buf`` is its data
        buffer (an :class:`SrpBuffer`, or a scatterlist of pages the caller
        leaves alone until the command completes), ``direction``
        ``DMA_FROM_DEVICE`` for data-in, ``DMA_TO_DEVICE`` for data-out. It
        is sent as soon as a credit and an IU are free."""
        if buf is not None and direction is DmaDirection.NONE:
            raise ValueError("a data buffer needs DMA_TO_DEVICE or DMA_FROM_DEVICE")
        if direction is DmaDirection.BIDIRECTIONAL:
            raise ValueError("bidirectional commands are not supported (ib_srp: -EINVAL)")
        if len(cdb) > 16 + SRP_MAX_ADD_CDB_LEN or not cdb:
            raise ValueError(f"a {len(cdb)}-byte CDB does not fit an SRP_CMD")
        sgl = buf.sgl if isinstance(buf, SrpBuffer) else buf
        with self._lock:
            if self.state in (SrpState.IDLE, SrpState.CLOSED):
                raise SrpTransportError(f"not logged in ({self.state.value})", errno.ENOTCONN)
            req = SrpRequest(
                cdb,
                sgl,
                direction if sgl is not None else DmaDirection.NONE,
                self.lun if lun is None else lun,
                self.cmd_timeout if timeout is None else timeout,
                self.retries if retries is None else retries,
                on_done,
            )
            if self.state is SrpState.FAILFAST:
                self._complete(req, SrpTransportError("transport failed (fast_io_fail)"))
                return req
            self._pending.append(req)
            self.stats.commands += 1
            self._service()
            return req

    def poll(self) -> int:
        """Process whatever completions and events are there, without
        waiting; the number of commands that completed."""
        with self._lock:
            before = self.stats.completed
            self._service()
            return self.stats.completed - before

    def wait(
        self,
        requests: SrpRequest | Iterable[SrpRequest] | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Drive progress until every request given (every outstanding and
        queued one by default) is done or ``timeout`` seconds pass; whether
        they all are. It does not raise for a request's error."""
        with self._lock:
            if requests is None:
                return self._wait(lambda: not self._active and not self._pending, timeout)
            reqs = [requests] if isinstance(requests, SrpRequest) else list(requests)
            return self._wait(lambda: all(r.done for r in reqs), timeout)

    def wait_for(self, pred: Callable[[], bool], timeout: float | None = None) -> bool:
        """Drive progress until ``pred()`` holds or ``timeout`` seconds pass
        (simulated seconds on simulated time); whether it holds."""
        with self._lock:
            return self._wait(pred, timeout)

    def wait_io(self, ios: BlockIo | Sequence[BlockIo], timeout: float | None = None) -> bool:
        """:meth:`wait` for block I/Os."""
        ios = [ios] if isinstance(ios, BlockIo) else list(ios)
        return self.wait([r for io in ios for r in io.requests], timeout)

    def execute(
        self,
        cdb: bytes,
        buf: SrpBuffer | Scatterlist | None = None,
        direction: DmaDirection = DmaDirection.NONE,
        *,
        lun: int | None = None,
        timeout: float | None = None,
    ) -> SrpRequest:
        """Submit and wait (``scsi_execute_cmd``); raises the command's error."""
        req = self.submit(cdb, buf, direction, lun=lun, timeout=timeout)
        self._wait_done([req])
        return req.result()

    # -- the disk -------------------------------------------------------------------------------

    def inquiry(self, lun: int | None = None) -> Inquiry:
        """Standard INQUIRY: vendor, product, revision."""
        data = self._data_in(cdb_inquiry(36), 36, lun)
        return parse_inquiry(data.ljust(36, b" "))

    def read_capacity(self, lun: int | None = None) -> tuple[int, int]:
        """``(blocks, block_size)``: READ CAPACITY(16), or (10) when the
        target refuses the 16-byte form (``sd_read_capacity``)."""
        try:
            blocks, size = parse_read_capacity_16(self._data_in(cdb_read_capacity_16(), 32, lun))
        except ScsiCheckCondition as e:
            if e.sense_key != 0x5:  # ILLEGAL REQUEST: no READ CAPACITY(16)
                raise
            blocks, size = parse_read_capacity_10(self._data_in(cdb_read_capacity_10(), 8, lun))
        if size <= 0 or size % 512:
            raise SrpInitiatorError(f"unusable block size {size}", errno.EINVAL)
        self._keep_capacity(lun, blocks, size)
        return blocks, size

    @property
    def max_transfer_blocks(self) -> int:
        """The most blocks one command moves: ``max_sectors`` and
        ``sg_tablesize`` pages (``blk_queue_max_hw_sectors``,
        ``blk_queue_max_segments``)."""
        limit = min(self.max_sectors * 512, self.sg_tablesize * PAGE_SIZE)
        return max(1, limit // self.block_size)

    def submit_read(
        self, lba: int, nblocks: int, *, lun: int | None = None, timeout: float | None = None
    ) -> BlockIo:
        """Queue a read of ``nblocks`` from ``lba`` (each command with
        ``timeout``, :attr:`cmd_timeout` by default)."""
        return self._submit_rw(lba, nblocks, None, lun, timeout)

    def submit_write(
        self,
        lba: int,
        data: bytes | bytearray | memoryview,
        *,
        lun: int | None = None,
        timeout: float | None = None,
    ) -> BlockIo:
        """Queue a write of ``data`` (whole blocks) at ``lba``."""
        size = self.block_size
        if not data or len(data) % size:
            raise ValueError(f"{len(data)} bytes is not a whole number of {size}-byte blocks")
        return self._submit_rw(lba, len(data) // size, bytes(data), lun, timeout)

    def read(self, lba: int, nblocks: int, *, lun: int | None = None) -> bytes:
        """Read ``nblocks`` blocks from ``lba``."""
        io = self.submit_read(lba, nblocks, lun=lun)
        self._wait_done(io.requests)
        data = io.result()
        assert data is not None
        return data

    def write(
        self, lba: int, data: bytes | bytearray | memoryview, *, lun: int | None = None
    ) -> None:
        """Write whole blocks at ``lba``."""
        io = self.submit_write(lba, data, lun=lun)
        self._wait_done(io.requests)
        io.result()

    def sync(self, lun: int | None = None) -> None:
        """SYNCHRONIZE CACHE (``sd_sync_cache``)."""
        self.execute(cdb_synchronize_cache(), lun=lun)

    def _submit_rw(
        self, lba: int, nblocks: int, data: bytes | None, lun: int | None, timeout: float | None
    ) -> BlockIo:
        size = self.block_size
        if nblocks <= 0 or lba < 0:
            raise ValueError(f"bad range: lba {lba}, {nblocks} blocks")
        io = BlockIo(lba, nblocks, size, data is not None)
        step = self.max_transfer_blocks
        for first in range(0, nblocks, step):
            n = min(step, nblocks - first)
            buf = SrpBuffer(self.host, n * size, highmem=self.highmem)
            offset = first * size
            try:
                if data is not None:
                    buf.write(data[offset : offset + n * size])
                    cdb, direction = cdb_write(lba + first, n), DmaDirection.TO_DEVICE
                else:
                    cdb, direction = cdb_read(lba + first, n), DmaDirection.FROM_DEVICE
                req = self.submit(cdb, buf, direction, lun=lun, timeout=timeout)
            except BaseException:
                buf.free()
                raise
            io._attach(req, buf, offset)
        return io

    def _data_in(self, cdb: bytes, length: int, lun: int | None) -> bytes:
        buf = SrpBuffer(self.host, length, highmem=self.highmem)
        req: SrpRequest | None = None
        try:
            req = self.submit(cdb, buf, DmaDirection.FROM_DEVICE, lun=lun)
            self._wait_done([req])
            req.result()
            return buf.read(max(0, length - req.resid))
        finally:
            if req is None or req.done:  # never free pages the device may still own
                buf.free()

    def _wait_done(self, reqs: Sequence[SrpRequest]) -> None:
        if not self.wait(reqs, None):
            # every active command has a deadline, so this means nothing can happen
            raise SrpTransportError("no progress is possible", errno.EIO)

    # -- the progress loop ------------------------------------------------------------------

    def _has_events(self) -> bool:
        ch = self._ch
        if len(self._events):
            return True
        return ch is not None and (len(ch.recv_cq) > 0 or len(ch.send_cq) > 0)

    def _next_timer(self) -> float | None:
        times: list[float] = []
        if self.state is SrpState.LIVE:
            times += [r._deadline for r in self._active.values() if not r._claimed]
            if self._tm is not None:
                times.append(self._tm.deadline)
            if self._eh_queue and self._tm is None:
                times.append(0.0)
        elif self.state is SrpState.LOST:
            if self._next_reconnect is not None:
                times.append(self._next_reconnect)
            if self.fast_io_fail_tmo is not None:
                times.append(self._lost_at + self.fast_io_fail_tmo)
        return min(times) if times else None

    def _wait(self, pred: Callable[[], bool], timeout: float | None) -> bool:
        """Service the channel until ``pred()`` or ``timeout`` seconds."""
        return service_until(
            self.dev, self._service, pred, timeout, wake=self._has_events,
            next_timer=self._next_timer,
        )  # fmt: skip

    def _wait_raw(self, pred: Callable[[], bool], timeout: float | None) -> bool:
        """Wait for ``pred()`` handling only CM events, not commands (login,
        logout, teardown)."""
        return service_until(
            self.dev, self._pump_cm, pred, timeout, wake=lambda: len(self._events) > 0 or pred()
        )

    def _service(self) -> None:
        """One pass: completions, CM events, timers, deferred recovery,
        dispatch (what softirq, the CM handler, the block layer's timeout
        timer, the SCSI error handler and ``blk_mq_run_hw_queues`` do)."""
        if self._in_service:
            return
        self._in_service = True
        try:
            self._poll_cqs()
            self._pump_cm()
            self._guard(self._check_timers)
            if self._want_reconnect is not None:
                reason, self._want_reconnect = self._want_reconnect, None
                self._try_reconnect(reason)
            self._guard(self._dispatch)
        finally:
            self._in_service = False

    def _try_reconnect(self, reason: str) -> None:
        """A reconnect the initiator decided on itself; a failure leaves
        the port LOST (``reconnect_delay`` tries again). Its login waits no
        longer than ``fast_io_fail_tmo`` allows: that timer cannot fire
        while the progress path waits for the login (ib_srp's reconnect
        runs on a workqueue, beside it)."""
        timeout = None
        if self.fast_io_fail_tmo is not None:
            now = self.dev.scheduler.time()
            lost = self._lost_at if self.state is SrpState.LOST else now
            timeout = max(0.0, lost + self.fast_io_fail_tmo - now)
        try:
            self._reconnect(timeout, reason)
        except SrpInitiatorError as e:
            log.warning("%r: reconnect failed: %s", self, e)
        except Exception:
            self.stats.progress_errors += 1
            log.exception("%r: reconnect failed", self)

    def _guard(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            self.stats.progress_errors += 1
            log.exception("%r: error in the progress path", self)

    def _poll_cqs(self) -> None:
        ch = self._ch
        if ch is None:
            return
        while self._ch is ch and len(ch.recv_cq):
            for wc in ch.recv_cq.poll(16):
                self._guard(self._recv_done, ch, wc)
        while self._ch is ch and len(ch.send_cq):
            for wc in ch.send_cq.poll(16):
                self._guard(self._send_done, ch, wc)

    def _pump_cm(self) -> None:
        """Take the queued RDMA CM events: those of a connection being made
        go to the login, the others to :meth:`_cm_event`."""
        while len(self._events):
            ev = self._events.get_cm_event(0)
            if self._connecting is not None and ev.id is self._connecting:
                self._login_events.append(ev)
            else:
                self._guard(self._cm_event, ev)

    def _cm_event(self, ev: RdmaCmEvent) -> None:
        """``srp_rdma_cm_handler`` for events after the login."""
        ch = self._ch
        if ch is None or ev.id is not ch.cm_id:
            return
        if ev.event is RdmaCmEventType.DISCONNECTED:
            if ch.connected:
                log.warning("%r: received DREQ", self)
                self._transport_lost(ch, "target disconnected")
            ch.disconnected = True
        elif ev.event is RdmaCmEventType.DEVICE_REMOVAL:
            self._transport_lost(ch, "device removed")

    # -- completions --------------------------------------------------------------------------

    def _recv_done(self, ch: _Channel, wc: WorkCompletion) -> None:
        """``srp_recv_done``."""
        index = wc.wr_id & _ID_MASK
        if wc.status != IbWcStatus.SUCCESS:
            self._handle_qp_err(ch, wc, "RECV")
            return
        iu = ch.rx_ring[index]
        data = iu.read(wc.byte_len)  # sync for CPU, copy, sync for device
        try:
            self._handle_iu(ch, data, wc)
        finally:
            if ch.connected and not ch.qp_in_error:
                try:
                    ch.qp.post_recv(RecvWR(_wr_id(_RX, index), (iu.sge(self.lkey),)))
                except (PostError, VerbsError) as e:
                    log.error("%r: Recv failed with error code %s", self, e)

    def _handle_iu(self, ch: _Channel, data: bytes, wc: WorkCompletion) -> None:
        if not data:
            self.stats.malformed_iu += 1
            return
        op = data[0]
        try:
            if op == SrpOpcode.RSP:
                self._process_rsp(ch, SrpRsp.decode(data), wc)
            elif op == SrpOpcode.CRED_REQ:
                cred = SrpCredReq.decode(data)
                self.stats.cred_req += 1
                self._response_common(ch, cred.req_lim_delta, SrpCredRsp(cred.tag).encode())
            elif op == SrpOpcode.AER_REQ:
                aer = SrpAerReq.decode(data)
                self.stats.aer_req += 1
                log.warning("%r: ignoring AER for LUN %d", self, aer.lun)
                self.aer_events.append((aer.lun, aer.sense))
                self._response_common(ch, aer.req_lim_delta, SrpAerRsp(aer.tag).encode())
            elif op == SrpOpcode.T_LOGOUT:
                tlo = SrpTLogout.decode(data)
                self.stats.t_logout += 1
                log.warning("%r: Got target logout request, reason %#x", self, tlo.reason)
                self._transport_lost(ch, f"target logout (reason {tlo.reason:#x})")
            else:
                self.stats.unexpected_iu += 1
                log.warning("%r: Unhandled SRP opcode %#04x", self, op)
        except SrpError:
            self.stats.malformed_iu += 1

    def _credit(self, ch: _Channel, delta: int) -> None:
        ch.req_lim += delta
        if ch.req_lim < 0 or ch.req_lim > 1 << 31:
            self.stats.credit_violations += 1
            ch.req_lim = max(0, min(ch.req_lim, 1 << 31))

    def _process_rsp(self, ch: _Channel, rsp: SrpRsp, wc: WorkCompletion) -> None:
        """``srp_process_rsp``."""
        if rsp.tag & SRP_TAG_TSK_MGMT:
            self._credit(ch, rsp.req_lim_delta)
            tm = self._tm
            if tm is not None and rsp.tag == tm.tag:
                tm.status = rsp.resp_data[3] if len(rsp.resp_data) >= 4 else 0xFF
                self._tm_done(tm)
            else:
                self.stats.late_tsk_mgmt += 1
                log.error("%r: Received tsk mgmt response too late for tag %#x", self, rsp.tag)
            return
        req = self._active.get(rsp.tag)
        inv_key = wc.invalidate_rkey if wc.wc_flags & IbWcFlags.WITH_INVALIDATE else None
        if req is None or req._claimed:
            if req is None:
                self.stats.unknown_tag += 1
                log.error("%r: Null scmnd for RSP w/tag %#x", self, rsp.tag)
            else:
                self.stats.late_rsp += 1
            if inv_key is not None:
                self._note_remote_inv(req, inv_key)
            self._credit(ch, rsp.req_lim_delta)
            return
        if inv_key is not None:
            self._note_remote_inv(req, inv_key)
        del self._active[rsp.tag]
        req.status = rsp.status
        req.sense = rsp.sense if rsp.flags & SrpRspFlag.SNSVALID else b""
        if rsp.flags & SrpRspFlag.DIUNDER:
            req.resid = rsp.data_in_res_cnt
        elif rsp.flags & SrpRspFlag.DOUNDER:
            req.resid = rsp.data_out_res_cnt
        else:
            req.resid = 0
        self._credit(ch, rsp.req_lim_delta)
        self._release(req, _Outcome.COMPLETE)

    def _note_remote_inv(self, req: SrpRequest | None, key: int) -> None:
        """A receive ``IB_WC_WITH_INVALIDATE``: the target invalidated ``key``;
        it must be one of the keys of the command it answers."""
        m = None if req is None else req._map
        if req is not None and m is not None and key in m.keys:
            req._remote_inv.add(key)
            self.stats.remote_inv += 1
        else:
            self.stats.bad_remote_inv += 1

    def _response_common(self, ch: _Channel, delta: int, payload: bytes) -> None:
        """``srp_response_common``: take the credits, answer without using one."""
        self._credit(ch, delta)
        iu = self._get_tx_iu(ch, "rsp")
        if iu is None:
            self.stats.credit_violations += 1
            log.error("%r: no IU available to send response", self)
            return
        iu.write(payload)
        try:
            ch.qp.post_send(
                SendWR(
                    _wr_id(_TX, iu.index),
                    IbWrOpcode.SEND,
                    (iu.sge(self.lkey, len(payload)),),
                    IbSendFlags.SIGNALED,
                )
            )
        except (PostError, VerbsError) as e:
            ch.free_tx.append(iu)
            log.error("%r: unable to post response: %s", self, e)

    def _send_done(self, ch: _Channel, wc: WorkCompletion) -> None:
        """``srp_send_done``, ``srp_inv_rkey_err_done``, ``srp_reg_mr_err_done``."""
        kind, ident = wc.wr_id >> _KIND_SHIFT, wc.wr_id & _ID_MASK
        if kind == _TX:
            iu = ch.tx_ring[ident]
            ch.free_tx.append(iu)
            if ident == ch.logout_iu:
                ch.logout_iu = None
                ch.logout_sent = wc.status == IbWcStatus.SUCCESS
            owner = ch.tx_owner.pop(ident, None)
            if wc.status != IbWcStatus.SUCCESS:
                self._handle_qp_err(ch, wc, "SEND")
            if owner is not None:
                owner._send_pending = False
                self._maybe_complete(owner)
        elif kind == _INV:
            if wc.status != IbWcStatus.SUCCESS:
                self._handle_qp_err(ch, wc, "INV RKEY")
            req = ch.inv_owner.get(ident)
            if req is not None:
                req._inv_pending -= 1
                if req._inv_pending <= 0:
                    del ch.inv_owner[ident]
                    if ch.fr_pool is not None and wc.status == IbWcStatus.SUCCESS:
                        ch.fr_pool.put(req._inv_frs)
                    req._inv_frs = []
                    req._inv_pending = 0
                    self._maybe_complete(req)
        elif kind == _REG and wc.status != IbWcStatus.SUCCESS:
            self._handle_qp_err(ch, wc, "FAST REG")

    def _handle_qp_err(self, ch: _Channel, wc: WorkCompletion, opname: str) -> None:
        """``srp_handle_qp_err``: the first error of a live channel starts the
        transport-error handling (``srp_tl_err_work``)."""
        reason = f"{opname} completed with {wc.status.kernel_name}"
        if ch.connected and not ch.qp_in_error:
            self.stats.wc_errors += 1
            log.error(
                "%r: failed %s status %s (%d)", self, opname, wc.status.kernel_name, wc.status
            )
            ch.qp_in_error = True
            self._transport_lost(ch, reason)
        elif (
            ch is self._ch
            and wc.status != IbWcStatus.WR_FLUSH_ERR
            and self.lost_reason.endswith(IbWcStatus.WR_FLUSH_ERR.kernel_name)
        ):
            self.lost_reason = reason  # the error behind the flushes polled first
        ch.qp_in_error = True

    def _transport_lost(self, ch: _Channel, reason: str) -> None:
        """The channel is gone (DREQ, QP error, target logout): block the
        port (``srp_start_tl_fail_timers``) with the QP in ERR, so nothing
        registered on it can be reached; commands wait for a reconnect."""
        if ch is not self._ch:
            return
        was_connected = ch.connected
        ch.connected = False
        if self.state is SrpState.LIVE:
            self.state = SrpState.LOST
            self.lost_reason = reason
            self._lost_at = self.dev.scheduler.time()
            self._next_reconnect = (
                None if self.reconnect_delay is None else self._lost_at + self.reconnect_delay
            )
            log.warning("%r: transport lost: %s", self, reason)
        if was_connected:
            with contextlib.suppress(RdmaCmError):
                ch.cm_id.disconnect()  # the QP to ERR; DREQ, or the DREP of the target's DREQ
        self._qp_to_err(ch)
        if self._tm is not None:
            self._tm = None  # the error handler will reconnect

    @staticmethod
    def _qp_to_err(ch: _Channel) -> None:
        qp = ch.qp
        if not qp.destroyed and qp.state not in (IbQpState.ERR, IbQpState.RESET):
            qp.modify(QpAttr(qp_state=IbQpState.ERR), IbQpAttrMask.STATE)

    # -- credits and IUs ------------------------------------------------------------------------

    def _get_tx_iu(self, ch: _Channel, kind: str) -> IuBuf | None:
        """``__srp_get_tx_iu``: a free IU and, except for responses, a credit
        (commands leave ``SRP_TSK_MGMT_SQ_SIZE`` for task management)."""
        if not ch.free_tx:
            return None
        if kind != "rsp":
            rsv = 0 if kind == "tm" else SRP_TSK_MGMT_SQ_SIZE
            if ch.req_lim <= rsv:
                self.stats.zero_req_lim += 1
                return None
            ch.req_lim -= 1
        return ch.free_tx.pop()

    def _alloc_tag(self) -> int:
        while True:
            tag = self._next_tag
            self._next_tag = (self._next_tag + 1) & (SRP_TAG_TSK_MGMT - 1)
            if tag not in self._active:
                return tag

    # -- dispatch -------------------------------------------------------------------------------

    def _map_params(self, ch: _Channel) -> MapParams:
        return MapParams(
            dev=self.dev,
            lkey=self.lkey,
            global_rkey=self.global_rkey,
            use_fast_reg=self.use_fast_reg,
            mr_page_size=self.mr_page_size,
            mr_per_cmd=self.mr_per_cmd,
            cmd_sg_cnt=ch.cmd_sg_cnt,
            sg_tablesize=self.sg_tablesize,
            allow_ext_sg=self.allow_ext_sg,
            use_imm_data=ch.use_imm_data,
            max_imm_sge=ch.max_imm_sge,
            max_it_iu_len=ch.max_it_iu_len,
        )

    def _dispatch(self) -> None:
        """Send queued commands while credits, IUs and tables last."""
        ch = self._ch
        if ch is None or self.state is not SrpState.LIVE:
            return
        while self._pending and ch.connected and not ch.qp_in_error:
            if not self._free_tables or not ch.free_tx:
                return
            if ch.req_lim <= SRP_TSK_MGMT_SQ_SIZE:
                self.stats.zero_req_lim += 1
                return
            req = self._pending.popleft()
            if not self._start(ch, req):
                self._pending.appendleft(req)
                return

    def _start(self, ch: _Channel, req: SrpRequest) -> bool:
        """``srp_queuecommand`` for one command; False when it must wait
        (the FR pool or the mapping resources are exhausted)."""
        table = self._free_tables.pop()
        serial = req.serial
        for attempt in itertools.count():
            try:
                m = srp_map_data(
                    self._map_params(ch),
                    req.sgl,
                    req.direction,
                    ch.fr_pool,
                    table,
                    _wr_id(_REG, serial),
                )
                break
            except SrpMapError as e:
                if e.transient and (self._active or self._finishing):
                    self._free_tables.append(table)
                    self.stats.map_busy += 1
                    return False
                if not e.transient or attempt >= self.retries:
                    self._free_tables.append(table)
                    self._complete(req, e)
                    return True
                # TASK SET FULL with nothing else in flight: the midlayer
                # requeues at once, and the mapping comes out differently
                # (swiotlb's next-fit has moved on).
                self.stats.map_busy += 1
        iu = self._get_tx_iu(ch, "cmd")
        assert iu is not None  # checked by _dispatch
        tag = self._alloc_tag()
        payload = self._build_cmd(req, tag, m)
        iu.write(payload)
        sges = (iu.sge(self.lkey, len(payload)),) + (m.imm_sges if m is not None else ())
        wrs: list[SendWR] = list(m.reg_wrs) if m is not None else []
        wrs.append(SendWR(_wr_id(_TX, iu.index), IbWrOpcode.SEND, sges, IbSendFlags.SIGNALED))
        req.tag = tag
        req._map = m
        req._table = table
        req._claimed = False
        req._remote_inv = set()
        req._outcome = None
        req._deadline = self.dev.scheduler.time() + req.timeout
        req.transmissions += 1
        req.dma_segments = () if m is None else m.segments
        req.descriptor = None if m is None else m.desc
        req.rkeys = () if m is None else tuple(m.keys)
        self._count_desc(req.descriptor)
        if m is not None:
            self.stats.reg_mr += len(m.reg_wrs)
        self._active[tag] = req
        ch.tx_owner[iu.index] = req
        req._send_pending = True
        try:
            ch.qp.post_send(wrs)
        except (PostError, VerbsError) as e:
            log.error("%r: Send failed: %s", self, e)
            ch.tx_owner.pop(iu.index, None)
            req._send_pending = False
            ch.free_tx.append(iu)
            self._transport_lost(ch, f"post_send failed: {e}")
        return True

    def _count_desc(self, desc: SrpDataBuf | None) -> None:
        if isinstance(desc, SrpImmBuf):
            self.stats.immediate += 1
        elif isinstance(desc, SrpDirectBuf):
            self.stats.direct += 1
        elif isinstance(desc, SrpIndirectBuf):
            self.stats.indirect += 1
            if desc.external:
                self.stats.external_tables += 1

    @staticmethod
    def _build_cmd(req: SrpRequest, tag: int, m: MappedData | None) -> bytes:
        cdb = req.cdb
        add_cdb = cdb[16:]
        if len(add_cdb) & 3:
            add_cdb += bytes(-len(add_cdb) & 3)
        desc = None if m is None else m.desc
        out_desc = desc if req.direction is DmaDirection.TO_DEVICE else None
        in_desc = desc if req.direction is DmaDirection.FROM_DEVICE else None
        if isinstance(desc, SrpImmBuf):
            # The 68-byte head; the data follows as extra SGEs of the same SEND.
            cmd = SrpCmd(
                tag=tag,
                lun=req.lun,
                cdb=cdb[:16],
                add_cdb=add_cdb,
                data_out=desc,
                imm_data=bytes(desc.len),
            )
            return cmd.encode(SRP_IMM_DATA_OFFSET)[:SRP_IMM_DATA_OFFSET]
        cmd = SrpCmd(
            tag=tag, lun=req.lun, cdb=cdb[:16], add_cdb=add_cdb, data_out=out_desc, data_in=in_desc
        )
        return cmd.encode()

    # -- completion -----------------------------------------------------------------------------

    def _release(
        self, req: SrpRequest, outcome: _Outcome, error: SrpInitiatorError | None = None
    ) -> None:
        """``srp_free_req`` / ``srp_unmap_data``: invalidate the command's
        keys the target did not invalidate itself (LOCAL_INV), then unmap
        once every key is dead and the SEND is done."""
        req._outcome = outcome
        req._pending_error = error
        self._finishing.add(req)
        ch = self._ch
        m = req._map
        if m is not None and m.frs:
            remote = [d for d in m.frs if d.key in req._remote_inv]
            local = [d for d in m.frs if d.key not in req._remote_inv]
            m.frs = []
            if ch is not None and ch.fr_pool is not None:
                ch.fr_pool.put(remote)  # already invalid
            usable = ch is not None and ch.connected and not ch.qp_in_error
            if local and usable and ch is not None:
                wrs = [
                    SendWR(
                        _wr_id(_INV, req.serial),
                        IbWrOpcode.LOCAL_INV,
                        send_flags=IbSendFlags.SIGNALED,
                        invalidate_rkey=d.key,
                    )
                    for d in local
                ]
                req._inv_frs = local
                req._inv_pending = len(wrs)
                ch.inv_owner[req.serial] = req
                try:
                    ch.qp.post_send(wrs)
                    self.stats.local_inv += len(wrs)
                except (PostError, VerbsError) as e:
                    log.error("%r: Queueing INV WR failed: %s", self, e)
                    req._inv_pending = 0
                    req._inv_frs = []
                    ch.inv_owner.pop(req.serial, None)
                    self._transport_lost(ch, f"LOCAL_INV post failed: {e}")
            # Otherwise the QP is in ERR: nothing reaches the MRs, which stay
            # out of the pool until the pool is destroyed with the channel.
        self._maybe_complete(req)

    def _maybe_complete(self, req: SrpRequest) -> None:
        if req._outcome is None or req._send_pending or req._inv_pending:
            return
        self._finishing.discard(req)
        if req._map is not None:
            srp_unmap_sg(self.dev, req._map)
            req._map = None
        if req._table is not None:
            self._free_tables.append(req._table)
            req._table = None
        outcome, error = req._outcome, req._pending_error
        req._outcome = None
        req._pending_error = None
        req.tag = None
        if outcome is _Outcome.REQUEUE:
            self._requeue(req)
        elif outcome is _Outcome.ERROR:
            self._complete(req, error)
        else:
            self._judge(req)

    def _judge(self, req: SrpRequest) -> None:
        """The midlayer's ``scsi_decide_disposition`` for a response."""
        status = req.status or 0
        if status == ScsiStatus.GOOD:
            self._complete(req, None)
            return
        retry = status in (ScsiStatus.BUSY, ScsiStatus.TASK_SET_FULL)
        if status == ScsiStatus.CHECK_CONDITION:
            err = status_error(status, req.sense)
            retry = isinstance(err, ScsiCheckCondition) and err.sense_key == UNIT_ATTENTION
        if retry and req.retries_left > 0:
            req.retries_left -= 1
            self.stats.retries += 1
            self._requeue(req)
            return
        self._complete(req, status_error(status, req.sense))

    def _requeue(self, req: SrpRequest) -> None:
        """Back in the queue in submission order (the midlayer's requeue)."""
        req.status = None
        req.sense = b""
        req.resid = 0
        keys = [r.serial for r in self._pending]
        self._pending.insert(bisect.bisect(keys, req.serial), req)

    def _complete(self, req: SrpRequest, error: SrpInitiatorError | None) -> None:
        """``scsi_done``."""
        req.error = error
        req.done = True
        req.tag = None
        self.stats.completed += 1
        callbacks, req._callbacks = req._callbacks, []
        for fn in callbacks:
            self._guard(fn, req)

    def _fail_pending(self, error: SrpInitiatorError) -> None:
        while self._pending:
            self._complete(self._pending.popleft(), error)

    # -- timers and the error handler -------------------------------------------------------

    def _check_timers(self) -> None:
        now = self.dev.scheduler.time()
        if self.state is SrpState.LIVE:
            for req in list(self._active.values()):
                if not req._claimed and req._deadline <= now:
                    log.error("%r: command tag %#x timed out", self, req.tag or 0)
                    req._claimed = True  # srp_claim_req
                    self._eh_queue.append(req)
            tm = self._tm
            if tm is not None and now >= tm.deadline:
                tm.status = None
                self._tm_done(tm)
            if self._tm is None and self._eh_queue and self._want_reconnect is None:
                self._eh_next()
        elif self.state is SrpState.LOST:
            if self.fast_io_fail_tmo is not None and now >= self._lost_at + self.fast_io_fail_tmo:
                self._fail_fast()
            elif self._next_reconnect is not None and now >= self._next_reconnect:
                self._next_reconnect = (
                    None if self.reconnect_delay is None else now + self.reconnect_delay
                )
                self._try_reconnect(self.lost_reason)

    def _eh_next(self) -> None:
        """``srp_abort`` for the next timed-out command."""
        while self._eh_queue:
            req = self._eh_queue[0]
            if req.tag is None or self._active.get(req.tag) is not req:
                self._eh_queue.popleft()
                continue
            if not self._send_tm(SrpTskMgmtFunc.ABORT_TASK, req.lun, req.tag, req):
                self._want_reconnect = "could not send ABORT TASK"
            return

    def _send_tm(self, func: SrpTskMgmtFunc, lun: int, task_tag: int, req: SrpRequest) -> bool:
        """``srp_send_tsk_mgmt``: an SRP_TSK_MGMT under a tag with
        ``SRP_TAG_TSK_MGMT`` set; it may use the reserved credit."""
        ch = self._ch
        if ch is None or not ch.connected or ch.qp_in_error:
            return False
        iu = self._get_tx_iu(ch, "tm")
        if iu is None:
            return False
        ch.tsk_mgmt_tag = (ch.tsk_mgmt_tag + 1) | SRP_TAG_TSK_MGMT
        tag = ch.tsk_mgmt_tag
        payload = SrpTskMgmt(tag=tag, lun=lun, tsk_mgmt_func=func, task_tag=task_tag).encode()
        iu.write(payload)
        self._tm = _Tm(
            tag, func, lun, task_tag, self.dev.scheduler.time() + self.abort_timeout, req
        )
        log.error("%r: sending %s for tag %#x", self, func.name, task_tag)
        try:
            ch.qp.post_send(
                SendWR(
                    _wr_id(_TX, iu.index),
                    IbWrOpcode.SEND,
                    (iu.sge(self.lkey, len(payload)),),
                    IbSendFlags.SIGNALED,
                )
            )
        except (PostError, VerbsError):
            ch.free_tx.append(iu)
            self._tm = None
            return False
        return True

    def _tm_done(self, tm: _Tm) -> None:
        """A task management function answered (``status``) or timed out
        (None): finish the command or escalate — ABORT TASK, LUN RESET,
        reconnect (``scsi_eh_abort_cmds``, ``scsi_eh_bus_device_reset``,
        ``scsi_eh_host_reset``)."""
        self._tm = None
        req = tm.req
        ok = tm.status in _TM_OK
        if tm.func is SrpTskMgmtFunc.ABORT_TASK:
            if ok and req is not None and req.tag is not None and self._active.get(req.tag) is req:
                self.stats.aborts += 1
                del self._active[req.tag]
                self._eh_drop(req)
                self._release(
                    req, _Outcome.ERROR, SrpCommandTimeout(tm.task_tag, "abort-task", tm.status)
                )
                return
            if ok:
                return
            if req is None or not self._send_tm(
                SrpTskMgmtFunc.LUN_RESET, tm.lun, SRP_TAG_NO_REQ, req
            ):
                self._want_reconnect = "could not send LUN RESET"
            return
        if ok:
            self.stats.lun_resets += 1
            for other in [r for r in self._active.values() if r.lun == tm.lun]:
                assert other.tag is not None
                del self._active[other.tag]
                self._eh_drop(other)
                if other._claimed:
                    err = SrpCommandTimeout(other.tag, "lun-reset", tm.status)
                    self._release(other, _Outcome.ERROR, err)
                else:
                    self.stats.resubmitted += 1
                    self._release(other, _Outcome.REQUEUE)
            return
        self._want_reconnect = f"{tm.func.name} failed (status {tm.status})"

    def _eh_drop(self, req: SrpRequest) -> None:
        if req in self._eh_queue:
            self._eh_queue.remove(req)

    def _fail_fast(self) -> None:
        """``fast_io_fail_tmo`` expired: ``srp_terminate_io``."""
        log.error("%r: fast_io_fail_tmo expired, failing I/O", self)
        ch = self._ch
        err = SrpTransportError(f"transport failed: {self.lost_reason}", errno.ENOTCONN)
        if ch is not None:
            self._free_channel(ch, requeue=False, reason=self.lost_reason)
        self._fail_pending(err)
        self.state = SrpState.FAILFAST

    def _reconnect(self, timeout: float | None, reason: str) -> None:
        """``srp_rport_reconnect``: disconnect, take every unanswered command
        back (the timed-out ones fail, the others go back in the queue),
        new CM ID, QP and FR pool, log in."""
        self.stats.reconnects += 1
        ch = self._ch
        if ch is not None:
            if self.state is SrpState.LIVE:
                self._transport_lost(ch, reason)
            self._free_channel(ch, requeue=True, reason=reason)
        if self.state in (SrpState.LIVE, SrpState.IDLE):
            self.state = SrpState.LOST
            self._lost_at = self.dev.scheduler.time()
            self.lost_reason = reason
        new = self._connect(timeout)
        self._ch = new
        self.state = SrpState.LIVE
        self._next_reconnect = None
        log.info("%r: reconnect succeeded", self)

    # -- the channel ------------------------------------------------------------------------

    def _cm_wait(
        self, cm_id: RdmaCmId, wanted: set[RdmaCmEventType], timeout: float | None
    ) -> RdmaCmEvent:
        self._connecting = cm_id
        if not self._wait_raw(lambda: bool(self._login_events), timeout):
            raise SrpConnectError(f"no answer from {self.dest}:{self.port}", errno.ETIMEDOUT)
        ev = self._login_events.pop(0)
        if ev.event not in wanted:
            raise self._connect_error(ev)
        return ev

    def _connect_error(self, ev: RdmaCmEvent) -> SrpConnectError:
        """``srp_rdma_cm_handler`` / ``srp_rdma_cm_rej_handler``."""
        E = RdmaCmEventType
        if ev.event is E.REJECTED:
            data = b"" if ev.param is None else ev.param.private_data
            if ev.status == CmRejReason.CONSUMER_DEFINED and data[:1] == bytes(
                [SrpOpcode.LOGIN_REJ]
            ):
                try:
                    rej = SrpLoginRej.decode(data)
                except SrpError:
                    return SrpConnectError("malformed SRP_LOGIN_REJ", errno.ECONNRESET, ev.status)
                return SrpLoginRejected(rej.reason, ev.status)
            return SrpConnectError(
                f"REJ reason {ev.status} from {self.dest}:{self.port}", errno.ECONNRESET, ev.status
            )
        if ev.event is E.ADDR_ERROR:
            return SrpConnectError(f"cannot resolve {self.dest}", errno.ENXIO)
        if ev.event in (E.ROUTE_ERROR, E.UNREACHABLE):
            return SrpConnectError(f"{self.dest}:{self.port} unreachable", errno.EHOSTUNREACH)
        return SrpConnectError(f"{ev.event.name} during login", errno.ECONNRESET)

    def _connect(self, timeout: float | None) -> _Channel:
        """``srp_new_rdma_cm_id`` + ``srp_create_ch_ib`` + ``srp_connect_ch``."""
        cm_id = RdmaCmId(self._events, context=self)
        self._connecting = cm_id
        self._login_events = []
        ch: _Channel | None = None
        try:
            try:
                ch = self._login(cm_id, timeout)
            except RdmaCmError as e:
                raise SrpConnectError(str(e), e.errno) from e
            except VerbsError as e:
                raise SrpConnectError(str(e), e.errno) from e
            return ch
        except BaseException:
            self._connecting = None
            ch = self._partial
            self._partial = None
            self._pump_cm()
            if ch is not None:
                self._free_channel(ch, requeue=True, reason="login failed")
            else:
                cm_id.destroy()
            raise
        finally:
            self._connecting = None
            self._login_events = []
            self._partial = None

    def _login(self, cm_id: RdmaCmId, timeout: float | None) -> _Channel:
        """Resolve, create the channel, send the login, take the response."""
        E = RdmaCmEventType
        cm_id.resolve_addr(self.dest, self.port, src=self.src)
        self._cm_wait(cm_id, {E.ADDR_RESOLVED}, timeout)
        cm_id.resolve_route()
        self._cm_wait(cm_id, {E.ROUTE_RESOLVED}, timeout)
        ch = self._create_ch_ib(cm_id)
        self._partial = ch
        req = SrpLoginReq(
            tag=0,
            req_it_iu_len=self.max_iu_len,
            req_buf_fmt=SrpBufFmt.DIRECT | SrpBufFmt.INDIRECT,
            req_flags=SrpLoginReqFlag.IMMED_REQUESTED if self.use_imm_data else 0,
            imm_data_offset=SRP_IMM_DATA_OFFSET if self.use_imm_data else 0,
            initiator_port_id=self.initiator_port_id,
            target_port_id=self.target_port_id,
        )
        param = RdmaConnParam(
            private_data=req.encode_rdma(),
            responder_resources=4,
            initiator_depth=0,
            flow_control=1,
            retry_count=self.tl_retry_count,
            rnr_retry_count=7,
        )
        cm_id.connect(param)
        ev = self._cm_wait(cm_id, {E.ESTABLISHED}, timeout)
        self._rep_handler(ch, b"" if ev.param is None else ev.param.private_data)
        return ch

    def _create_ch_ib(self, cm_id: RdmaCmId) -> _Channel:
        """``srp_create_ch_ib``: the CQs, the QP through the CM ID (``send_cq``
        polled directly, ``IB_SIGNAL_REQ_WR``), the FR pool."""
        dev = self.dev
        m = 1 + (self.mr_per_cmd * 2 if self.use_fast_reg else 0)
        recv_cq = dev.create_cq(self.queue_size + 1)
        send_cq = dev.create_cq(m * self.queue_size)
        max_send_sge = min(SRP_MAX_SGE, dev.attrs.max_send_sge)
        init = QpInitAttr(
            IbQpType.RC,
            send_cq,
            recv_cq,
            QpCap(
                max_send_wr=m * self.queue_size,
                max_recv_wr=self.queue_size + 1,
                max_send_sge=max_send_sge,
                max_recv_sge=1,
            ),
            sq_sig_type=IbSigType.REQ_WR,
        )
        try:
            qp = cm_id.create_qp(self.pd, init)
        except (RdmaCmError, VerbsError):
            send_cq.destroy()
            recv_cq.destroy()
            raise
        pool = None
        if self.use_fast_reg:
            try:
                pool = FrPool(dev, self.pd, self.mr_pool_size, self.max_pages_per_mr)
            except VerbsError:
                cm_id.destroy_qp()
                send_cq.destroy()
                recv_cq.destroy()
                raise
        return _Channel(
            cm_id=cm_id,
            qp=qp,
            send_cq=send_cq,
            recv_cq=recv_cq,
            fr_pool=pool,
            max_send_sge=max_send_sge,
            max_imm_sge=min(max_send_sge - 1, 255),
        )

    def _rep_handler(self, ch: _Channel, private_data: bytes) -> None:
        """``srp_cm_rep_handler``: take the login response's terms, allocate
        and post the receive ring, allocate the send ring."""
        try:
            rsp = SrpLoginRsp.decode(private_data)
        except SrpError as e:
            raise SrpConnectError(f"Unhandled RSP opcode: {e}", errno.ECONNRESET) from e
        if not SrpRsp.SIZE <= rsp.max_ti_iu_len <= SRP_MAX_TI_IU_LEN:
            raise SrpConnectError(
                f"max_ti_iu_len {rsp.max_ti_iu_len} outside {SrpRsp.SIZE}..{SRP_MAX_TI_IU_LEN}",
                errno.ECONNRESET,
            )
        ch.login_rsp = rsp
        ch.max_ti_iu_len = rsp.max_ti_iu_len
        ch.req_lim = rsp.req_lim_delta
        ch.use_imm_data = self.use_imm_data and bool(rsp.rsp_flags & SrpLoginRspFlag.IMMED_SUPP)
        mine = srp_max_it_iu_len(
            self.cmd_sg_cnt, ch.use_imm_data, self.max_imm_data, self.max_it_iu_size
        )
        ch.max_it_iu_len = min(mine, rsp.max_it_iu_len) if rsp.max_it_iu_len else mine
        head = SrpCmd.SIZE + SRP_MAX_ADD_CDB_LEN
        if ch.max_it_iu_len < head + SrpDirectBuf.SIZE:
            raise SrpConnectError(
                f"max_it_iu_len {rsp.max_it_iu_len} is too small for an SRP_CMD", errno.ECONNRESET
            )
        room = (ch.max_it_iu_len - head - SrpIndirectBuf.HDR_SIZE) // SrpDirectBuf.SIZE
        ch.cmd_sg_cnt = max(0, min(self.cmd_sg_cnt, room))
        if ch.use_imm_data and ch.max_it_iu_len < SRP_IMM_DATA_OFFSET:
            ch.use_imm_data = False
        try:
            ch.rx_ring = alloc_iu_ring(
                self.dev, self.queue_size, ch.max_ti_iu_len, DmaDirection.FROM_DEVICE
            )
            ch.tx_ring = alloc_iu_ring(
                self.dev, self.queue_size, ch.max_it_iu_len, DmaDirection.TO_DEVICE
            )
        except IuMapError as e:
            raise SrpConnectError(str(e), errno.ENOMEM) from e
        ch.free_tx = list(ch.tx_ring)
        ch.qp.post_recv([RecvWR(_wr_id(_RX, iu.index), (iu.sge(self.lkey),)) for iu in ch.rx_ring])
        attr, _ = ch.qp.query()
        t_tr = 4096e-9 * (1 << attr.timeout)
        ch.rq_tmo = attr.retry_cnt * 4 * t_tr + 1.0  # srp_compute_rq_tmo
        ch.connected = True

    def _send_i_logout(self, ch: _Channel, timeout: float) -> None:
        """SRP_I_LOGOUT (no credit), waiting for its SEND to complete."""
        iu = self._get_tx_iu(ch, "rsp")
        if iu is None:
            return
        payload = SrpILogout(tag=0).encode()
        iu.write(payload)
        ch.logout_iu = iu.index
        try:
            ch.qp.post_send(
                SendWR(
                    _wr_id(_TX, iu.index),
                    IbWrOpcode.SEND,
                    (iu.sge(self.lkey, len(payload)),),
                    IbSendFlags.SIGNALED,
                )
            )
        except (PostError, VerbsError):
            ch.logout_iu = None
            ch.free_tx.append(iu)
            return
        self._wait(lambda: ch.logout_iu is None or not ch.connected, timeout)

    def _drain(self, ch: _Channel) -> None:
        """``ib_drain_qp``: with the QP in ERR, let every posted work request
        flush and handle the completions."""
        qp = ch.qp
        self._qp_to_err(ch)

        def drained() -> bool:
            return qp.hw.sq_outstanding == 0 and qp.hw.rq_outstanding == 0

        self._wait_raw(drained, 5.0)
        for cq, handler in ((ch.recv_cq, self._recv_done), (ch.send_cq, self._send_done)):
            while len(cq):
                for wc in cq.poll(64):
                    self._guard(handler, ch, wc)

    def _free_channel(self, ch: _Channel, *, requeue: bool, reason: str) -> None:
        """``srp_free_ch_ib``: QP to ERR and drained, every command on it
        taken back (unmapped; requeued or failed, timed-out ones failed),
        MRs deregistered, QP, CQs, CM ID and IU rings freed."""
        ch.connected = False
        self._tm = None
        if not ch.qp.destroyed:
            self._drain(ch)
        active = sorted(self._active.values(), key=lambda r: r.serial)
        self._active.clear()
        self._eh_queue.clear()
        if ch.fr_pool is not None:
            ch.fr_pool.destroy()  # every key of the channel stops working
        err = SrpTransportError(f"channel closed: {reason}", errno.ENOTCONN)
        for req in active:
            e: SrpInitiatorError | None
            if req._claimed and requeue:
                assert req.tag is not None
                out, e = _Outcome.ERROR, SrpCommandTimeout(req.tag, "reconnect")
            elif requeue and req.retries_left > 0:
                req.retries_left -= 1
                self.stats.resubmitted += 1
                out, e = _Outcome.REQUEUE, None
            else:
                out, e = _Outcome.ERROR, err
            if req._map is not None:
                req._map.frs = []
            req._send_pending = False
            req._inv_pending = 0
            req._inv_frs = []
            self._release(req, out, e)
        for req in list(self._finishing):
            req._send_pending = False
            req._inv_pending = 0
            req._inv_frs = []
            self._maybe_complete(req)
        ch.tx_owner.clear()
        ch.inv_owner.clear()
        if self._ch is ch:
            self._ch = None
        ch.cm_id.destroy()
        ch.cm_id.destroy_qp()
        ch.send_cq.destroy()
        ch.recv_cq.destroy()
        free_iu_ring(ch.rx_ring)
        free_iu_ring(ch.tx_ring)
        ch.rx_ring = ch.tx_ring = ch.free_tx = []
