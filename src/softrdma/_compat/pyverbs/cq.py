"""``pyverbs.cq``: completion queues, completion channels and work
completions (``ibv_create_cq``, ``ibv_create_cq_ex``, ``ibv_poll_cq``,
``ibv_start_poll`` / ``ibv_next_poll`` / ``ibv_end_poll``,
``ibv_req_notify_cq``, ``ibv_resize_cq``, ``ibv_create_comp_channel``,
``ibv_get_cq_event``, ``ibv_ack_cq_events``).

A CQ is a softrdma :class:`~softrdma.verbs.cq.CompletionQueue`. The
simulated hardware runs when the application looks at it: polling an
empty CQ, waiting for a completion event or resizing lets it make
progress first, so post-then-poll works as on a device that completes
work on its own.
"""

from __future__ import annotations

import errno
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

import pyverbs.enums as e
from pyverbs import _clock
from pyverbs import _softrdma as sim
from pyverbs.base import PyverbsCM, PyverbsObject
from pyverbs.device import Context
from pyverbs.pd import PD_RES_TYPE_CQ, ParentDomain, cq_buffer_size
from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from softrdma.errors import SoftRdmaError
from softrdma.verbs.cq import CompChannel as IbCompChannel
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.enums import IbWcFlags
from softrdma.verbs.wr import WorkCompletion

if TYPE_CHECKING:
    from pyverbs.qp import QP

__all__ = ["CQ", "CQEX", "WC", "CompChannel", "CqInitAttrEx", "PollCqAttr"]

#: Seconds of simulated time ``get_cq_event`` waits for the hardware
#: before reporting that no event can come.
CQ_EVENT_TIMEOUT = 30.0
#: Completion timestamps: the device clock (raw ticks) or the wall clock.
TIMESTAMP_WC_FLAGS = (
    e.IBV_WC_EX_WITH_COMPLETION_TIMESTAMP | e.IBV_WC_EX_WITH_COMPLETION_TIMESTAMP_WALLCLOCK
)
#: The extended-CQ fields softrdma fills.
SUPPORTED_WC_FLAGS = e.IBV_WC_STANDARD_FLAGS | TIMESTAMP_WC_FLAGS


def _wc_flags(flags: int) -> int:
    """``ibv_wc_flags`` of the kernel's ``ib_wc_flags``."""
    out = 0
    if flags & IbWcFlags.GRH:
        out |= e.IBV_WC_GRH
    if flags & IbWcFlags.WITH_IMM:
        out |= e.IBV_WC_WITH_IMM
    if flags & IbWcFlags.WITH_INVALIDATE:
        out |= e.IBV_WC_WITH_INV
    if flags & IbWcFlags.IP_CSUM_OK:
        out |= e.IBV_WC_IP_CSUM_OK
    return out


class WC(PyverbsObject):
    """``struct ibv_wc``. ``imm_data`` is as the C struct holds it: the
    immediate in network byte order (``ntohl(wc.imm_data)`` is the value
    the sender put through ``htonl``); with ``IBV_WC_WITH_INV`` it holds
    the invalidated rkey."""

    def __init__(
        self,
        wr_id: int = 0,
        status: int = 0,
        opcode: int = 0,
        vendor_err: int = 0,
        byte_len: int = 0,
        qp_num: int = 0,
        src_qp: int = 0,
        imm_data: int = 0,
        wc_flags: int = 0,
        pkey_index: int = 0,
        slid: int = 0,
        sl: int = 0,
        dlid_path_bits: int = 0,
    ) -> None:
        super().__init__()
        self.wr_id = wr_id
        self.status = status
        self.opcode = opcode
        self.vendor_err = vendor_err
        self.byte_len = byte_len
        self.qp_num = qp_num
        self.src_qp = src_qp
        self.imm_data = imm_data
        self.wc_flags = wc_flags
        self.pkey_index = pkey_index
        self.slid = slid
        self.sl = sl
        self.dlid_path_bits = dlid_path_bits

    @classmethod
    def from_ib(cls, wc: WorkCompletion) -> WC:
        """The ``ibv_wc`` of a softrdma completion."""
        flags = _wc_flags(wc.wc_flags)
        if flags & e.IBV_WC_WITH_INV:
            imm = wc.invalidate_rkey
        elif flags & e.IBV_WC_WITH_IMM:
            imm = socket.htonl(wc.imm_data & 0xFFFFFFFF)
        else:
            imm = 0
        return cls(
            wr_id=wc.wr_id,
            status=int(wc.status),
            opcode=int(wc.opcode),
            vendor_err=wc.vendor_err,
            byte_len=wc.byte_len,
            qp_num=wc.qp_num,
            src_qp=wc.src_qp,
            imm_data=imm,
            wc_flags=flags,
            pkey_index=wc.pkey_index,
        )

    def __str__(self) -> str:
        return (
            f"WC: wr_id {self.wr_id:#x}, status {self.status}, opcode {self.opcode}, "
            f"byte_len {self.byte_len}, qp_num {self.qp_num:#x}, flags {self.wc_flags:#x}"
        )


class CompChannel(PyverbsCM):
    """``struct ibv_comp_channel`` on a context: CQs created with it queue
    an event each time an armed CQ gets a completion."""

    def __init__(self, context: Context) -> None:
        super().__init__()
        self.context = context
        self.device = context._alive()
        self.channel = IbCompChannel()
        self.cqs: dict[int, CQ] = {}
        context.add_ref(self)

    def get_cq_event(self, expected_cq: CQ | None = None) -> CQ:
        """``ibv_get_cq_event``: the CQ of the next event (waiting for the
        hardware). Raises :class:`PyverbsRDMAError` when no event can come
        (``ETIMEDOUT``) or it is for another CQ than ``expected_cq``."""
        if self.closed:
            raise PyverbsRDMAError("Failed to get CQ event: channel closed", errno.EBADF)
        try:
            ibcq = self.channel.get_cq_event(self.device, CQ_EVENT_TIMEOUT)
        except SoftRdmaError as ex:
            raise sim.rdma_error("Failed to get CQ event", ex) from None
        cq = self.cqs.get(id(ibcq))
        if cq is None or (expected_cq is not None and cq is not expected_cq):
            raise PyverbsRDMAError("Received event on an unexpected CQ", errno.EINVAL)
        cq.num_events += 1
        return cq

    def _release(self) -> None:
        self.cqs.clear()


class CQ(PyverbsCM):
    """``struct ibv_cq``: ``CQ(context, cqe, cq_context=None, channel=None,
    comp_vector=0)``."""

    def __init__(
        self,
        context: Context,
        cqe: int,
        cq_context: object = None,
        channel: CompChannel | None = None,
        comp_vector: int = 0,
    ) -> None:
        super().__init__()
        self._create(context, int(cqe), channel, comp_vector, "Failed to create CQ")
        self.cq_context = cq_context

    def _create(
        self,
        context: Context,
        cqe: int,
        channel: CompChannel | None,
        comp_vector: int,
        what: str,
    ) -> None:
        dev = context._alive()
        if not 0 <= comp_vector < context.num_comp_vectors:
            raise PyverbsRDMAError(f"{what}: comp_vector {comp_vector}", errno.EINVAL)
        if channel is not None and (channel.closed or channel.context.device is not dev):
            raise PyverbsRDMAError(f"{what}: channel of another device", errno.EINVAL)
        try:
            self.cq: CompletionQueue = dev.create_cq(
                cqe, comp_handler=channel.channel if channel is not None else None
            )
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        sim.process().owners[self.cq] = context  # its async events go there
        self.context = context
        self.comp_channel = channel
        self.num_events = 0
        self.acked_events = 0
        self._pending: deque[WorkCompletion] = deque()
        if channel is not None:
            channel.cqs[id(self.cq)] = self
            channel.add_ref(self)
        context.add_ref(self)

    @property
    def cqe(self) -> int:
        return self.cq.cqe

    def _poll_ib(self, num_entries: int) -> list[WorkCompletion]:
        if self.closed:
            raise PyverbsRDMAError("Failed to poll CQ: it is closed", errno.EINVAL)
        out: list[WorkCompletion] = []
        while self._pending and len(out) < num_entries:
            out.append(self._pending.popleft())
        if len(out) < num_entries:
            out.extend(self.cq.poll(num_entries - len(out)))
        return out

    def poll(self, num_entries: int = 1) -> tuple[int, list[WC]]:
        """``ibv_poll_cq``: ``(count, [WC, ...])`` of up to ``num_entries``."""
        if num_entries <= 0:
            raise PyverbsUserError("num_entries must be positive")
        wcs = [WC.from_ib(wc) for wc in self._poll_ib(num_entries)]
        return len(wcs), wcs

    def req_notify(self, solicited_only: bool = False) -> None:
        """``ibv_req_notify_cq``."""
        if self.closed:
            raise PyverbsRDMAError("Request notify CQ failed: CQ is closed", errno.EINVAL)
        self.cq.req_notify(bool(solicited_only))

    def ack_events(self, num_events: int) -> None:
        """``ibv_ack_cq_events``."""
        if not 0 <= num_events <= self.num_events - self.acked_events:
            raise PyverbsUserError(f"Acking {num_events} events, more than were received")
        self.acked_events += num_events
        if self.comp_channel is not None:
            self.comp_channel.channel.ack_cq_events(num_events)

    def resize(self, cqe: int) -> None:
        """``ibv_resize_cq``: ``EINVAL`` beyond ``max_cqe`` or below the
        completions the CQ holds (the hardware runs first, as it would have
        on its own)."""
        dev = self.context._alive()
        cqe = int(cqe)
        with dev.lock:
            dev.progress(lambda: False)
            held = len(self.cq) + len(self._pending)
            if not 0 < cqe <= dev.attrs.max_cqe or cqe < held:
                raise PyverbsRDMAError(
                    f"Failed to resize CQ to {cqe} ({held} completions held)", errno.EINVAL
                )
            self.cq.cqe = cqe

    def clean_qp(self, qp_num: int) -> None:
        """Drop the completions of QP ``qp_num`` (the provider's
        ``mlx5_cq_clean`` when a QP moves to RESET: a reset QP leaves no
        completions behind)."""
        held = list(self._pending)
        if len(self.cq):
            held += self.cq.poll(len(self.cq))
        self._pending = deque(wc for wc in held if wc.qp_num != qp_num)

    def attach_qp(self, qp: QP) -> None:
        """A QP that uses this CQ: closed before it."""
        self.add_ref(qp)

    def _release(self) -> None:
        if self.comp_channel is not None:
            self.comp_channel.cqs.pop(id(self.cq), None)
        self.cq.destroy()


class CqInitAttrEx(PyverbsObject):
    """``struct ibv_cq_init_attr_ex``."""

    def __init__(
        self,
        cqe: int = 100,
        cq_context: object = None,
        channel: CompChannel | None = None,
        comp_vector: int = 0,
        wc_flags: int = 0,
        comp_mask: int = 0,
        flags: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.cqe = cqe
        self.cq_context = cq_context
        self.comp_channel = channel
        self.comp_vector = comp_vector
        self.wc_flags = wc_flags
        self.comp_mask = comp_mask
        self.flags = flags
        self.parent_domain = kwargs.get("parent_domain")


class PollCqAttr(PyverbsObject):
    """``struct ibv_poll_cq_attr``."""

    def __init__(self) -> None:
        super().__init__()
        self.comp_mask = 0


class CQEX(CQ):
    """``struct ibv_cq_ex`` (``ibv_create_cq_ex``) with the standard
    ``wc_flags`` and completion timestamps: with
    ``IBV_WC_EX_WITH_COMPLETION_TIMESTAMP`` (``read_timestamp``, device
    clock ticks, see ``hca_core_clock``) or ``..._WALLCLOCK``
    (``read_completion_wallclock_ns``) each completion is stamped with the
    device clock when the hardware writes it. CVLAN, flow tags and
    tag-matching info are not supported (``EOPNOTSUPP``). With
    ``IBV_CQ_INIT_ATTR_MASK_PD`` the CQ belongs to a parent domain, whose
    allocators give its ring, and is closed before it."""

    def __init__(self, context: Context, init_attr: CqInitAttrEx) -> None:
        PyverbsCM.__init__(self)
        what = "Failed to create extended CQ"
        if init_attr.wc_flags & ~SUPPORTED_WC_FLAGS:
            raise PyverbsRDMAError(f"{what}: wc_flags {init_attr.wc_flags:#x}", errno.EOPNOTSUPP)
        if init_attr.comp_mask & ~(e.IBV_CQ_INIT_ATTR_MASK_FLAGS | e.IBV_CQ_INIT_ATTR_MASK_PD):
            raise PyverbsRDMAError(f"{what}: comp_mask {init_attr.comp_mask:#x}", errno.EINVAL)
        domain = (
            init_attr.parent_domain if init_attr.comp_mask & e.IBV_CQ_INIT_ATTR_MASK_PD else None
        )
        if init_attr.comp_mask & e.IBV_CQ_INIT_ATTR_MASK_PD and (
            not isinstance(domain, ParentDomain)
            or domain.closed
            or domain.ctx.device is not context._alive()
        ):
            # rdma-core: the PD of ibv_cq_init_attr_ex must be a parent domain
            raise PyverbsRDMAError(f"{what}: parent_domain is not a parent domain", errno.EINVAL)
        if init_attr.comp_mask & e.IBV_CQ_INIT_ATTR_MASK_FLAGS and init_attr.flags & ~(
            e.IBV_CREATE_CQ_ATTR_SINGLE_THREADED
        ):
            raise PyverbsRDMAError(f"{what}: flags {init_attr.flags:#x}", errno.EOPNOTSUPP)
        self.wc_flags = init_attr.wc_flags
        self._create(
            context, int(init_attr.cqe), init_attr.comp_channel, init_attr.comp_vector, what
        )
        self.cq_context = init_attr.cq_context
        self.parent_domain = domain
        # the hardware stamps completions as it writes them
        self.cq.timestamping = bool(self.wc_flags & TIMESTAMP_WC_FLAGS)
        if domain is not None:
            # the CQ's ring comes from the parent domain's allocators
            try:
                ring = domain.queue_buffer(cq_buffer_size(self.cq.cqe), PD_RES_TYPE_CQ, what)
            except BaseException:
                self.close()
                raise
            self.add_ref(ring)
            domain.add_ref(self)
        self._cur: WorkCompletion | None = None
        self._polling = False

    def _next(self) -> int:
        got = self._poll_ib(1)
        self._cur = got[0] if got else None
        return 0 if got else errno.ENOENT

    def start_poll(self, attr: PollCqAttr) -> int:
        """``ibv_start_poll``: 0 with the first completion current,
        ``ENOENT`` when there is none."""
        if self._polling:
            raise PyverbsUserError("start_poll while polling: call end_poll first")
        ret = self._next()
        self._polling = ret == 0
        return ret

    def poll_next(self) -> int:
        """``ibv_next_poll``."""
        if not self._polling:
            raise PyverbsUserError("poll_next without start_poll")
        return self._next()

    def end_poll(self) -> None:
        """``ibv_end_poll``."""
        self._polling = False
        self._cur = None

    def _wc(self) -> WorkCompletion:
        if self._cur is None:
            raise PyverbsUserError("No current completion: start_poll first")
        return self._cur

    @property
    def status(self) -> int:
        return int(self._wc().status)

    @property
    def wr_id(self) -> int:
        return self._wc().wr_id

    def read_opcode(self) -> int:
        return int(self._wc().opcode)

    def read_vendor_err(self) -> int:
        return self._wc().vendor_err

    def read_byte_len(self) -> int:
        return self._wc().byte_len

    def read_imm_data(self) -> int:
        wc = WC.from_ib(self._wc())
        return wc.imm_data

    def read_qp_num(self) -> int:
        return self._wc().qp_num

    def read_src_qp(self) -> int:
        return self._wc().src_qp

    def read_wc_flags(self) -> int:
        return _wc_flags(self._wc().wc_flags)

    def read_slid(self) -> int:
        return 0

    def read_sl(self) -> int:
        return 0

    def read_dlid_path_bits(self) -> int:
        return 0

    def _stamp(self, flag: int, what: str) -> float:
        wc = self._wc()
        if not self.wc_flags & flag:
            raise PyverbsUserError(f"{what}: the CQ was not created with wc_flags {flag:#x}")
        return wc.timestamp

    def read_timestamp(self) -> int:
        """``ibv_wc_read_completion_ts``: the device clock, in
        ``hca_core_clock`` ticks, when the completion was written."""
        flag = e.IBV_WC_EX_WITH_COMPLETION_TIMESTAMP
        return _clock.ticks(self._stamp(flag, "read_timestamp"))

    def read_completion_wallclock_ns(self) -> int:
        """``ibv_wc_read_completion_wallclock_ns``: the wall-clock
        (``CLOCK_REALTIME``) nanoseconds when the completion was written."""
        flag = e.IBV_WC_EX_WITH_COMPLETION_TIMESTAMP_WALLCLOCK
        ns = _clock.wallclock_ns(self.cq.device, self._stamp(flag, "read_completion_wallclock_ns"))
        return ns
