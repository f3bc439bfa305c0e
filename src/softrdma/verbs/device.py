"""An RDMA device as the RDMA core sees it (``struct ib_device``,
``struct ib_device_attr``, ``struct ib_port_attr``; ``ib_alloc_pd``,
``ib_create_cq``, ``ib_create_qp``, ``ib_alloc_mr``, ``ib_query_*``,
``ib_register_event_handler``).

Device drivers (``softrdma.drivers``) subclass :class:`IbDevice` and
implement its ``ops_*`` hooks (the ``ib_device_ops`` of a driver); the
verbs objects validate their arguments and call them.
"""

from __future__ import annotations

import abc
import errno
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from softrdma.dma.device import Device
from softrdma.memory.host import Host
from softrdma.time.base import Scheduler
from softrdma.verbs.enums import (
    IbAccess,
    IbEventType,
    IbMrType,
    IbMtu,
    IbMwType,
    IbPdFlags,
    IbQpType,
    IbSrqAttrMask,
)
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.mr import MemoryRegion, MrState, MrTable, ib_check_mr_access
from softrdma.verbs.share import QPN_SLOT_SHIFT, DeviceShare

if TYPE_CHECKING:
    from softrdma.verbs.cq import CompletionQueue
    from softrdma.verbs.mw import MemoryWindow
    from softrdma.verbs.pd import ProtectionDomain
    from softrdma.verbs.qp import QpAttr, QpHardware, QpInitAttr, QueuePair
    from softrdma.verbs.srq import SharedReceiveQueue, SrqAttr, SrqHardware, SrqInitAttr
    from softrdma.verbs.wr import RecvWR, SendWR
    from softrdma.verbs.xrcd import XrcDomain

#: ``IB_DEVICE_MEM_MGT_EXTENSIONS``: REG_MR, LOCAL_INV, SEND_WITH_INV.
IB_DEVICE_MEM_MGT_EXTENSIONS = 1 << 21
#: ``IB_DEVICE_XRC``: XRC domains, XRC SRQs and XRC INI / TGT QPs.
IB_DEVICE_XRC = 1 << 20
#: ``IBK_LOCAL_DMA_LKEY``: one device-wide lkey for DMA addresses.
IBK_LOCAL_DMA_LKEY = 1 << 0
#: rxe.h ``RXE_MAX_HDR_LENGTH``: the headers a RoCEv2 packet may carry.
RXE_MAX_HDR_LENGTH = 80


@dataclass(frozen=True)
class DeviceAttr:
    """``struct ib_device_attr`` (the fields kernel consumers read)."""

    max_mr_size: int = 1 << 40
    page_size_cap: int = 0xFFFFF000
    vendor_id: int = 0
    max_qp: int = 0x10000
    max_qp_wr: int = 0x4000
    device_cap_flags: int = IB_DEVICE_MEM_MGT_EXTENSIONS
    kernel_cap_flags: int = 0
    max_send_sge: int = 32
    max_recv_sge: int = 32
    max_sge_rd: int = 32
    max_cq: int = 0x10000
    max_cqe: int = 0x8000
    max_mr: int = 0x10000
    max_pd: int = 0x10000
    max_qp_rd_atom: int = 128
    max_qp_init_rd_atom: int = 128
    max_fast_reg_page_list_len: int = 512
    max_inline_data: int = 256
    max_srq: int = 0x10000
    max_mw: int = 0x10000
    max_srq_wr: int = 0x4000
    max_srq_sge: int = 32
    max_xrcds: int = 0
    """XRC domains the device can hold (a driver capability, mlx4's
    ``caps.max_xrcds``; ``struct ib_device_attr`` has no such field)."""
    local_ca_ack_delay: int = 15
    """``IB_DEVICE``'s ``local_ca_ack_delay`` (rxe's ``RXE_LOCAL_CA_ACK_DELAY``):
    the CA's ACK delay, 4.096 µs × 2**value, sent as the CM REP's target ACK delay."""


@dataclass(frozen=True)
class PortAttr:
    """``struct ib_port_attr`` of a RoCEv2 port."""

    max_mtu: IbMtu
    active_mtu: IbMtu
    gid_tbl_len: int
    state: str = "ACTIVE"


@dataclass(frozen=True)
class IbEvent:
    """``struct ib_event``."""

    event: IbEventType
    device: IbDevice
    qp: QueuePair | None = None
    cq: CompletionQueue | None = None
    reason: str = ""
    srq: SharedReceiveQueue | None = None


EventHandler = Callable[[IbEvent], None]


_REGISTRY: weakref.WeakKeyDictionary[Host, list[IbDevice]] = weakref.WeakKeyDictionary()


_CLIENTS: list[Callable[[IbDevice], object]] = []


def ib_register_client(add: Callable[[IbDevice], object]) -> None:
    """``ib_register_client``: ``add(device)`` opens a core client (the MAD
    layer and the CM) on a device. The kernel calls it at device
    registration; softrdma calls it when the device first needs it — the
    first management datagram for its QP1 (:meth:`IbDevice.open_clients`)
    — which a peer cannot tell apart, and which costs nothing to devices
    that never see one."""
    if add not in _CLIENTS:
        _CLIENTS.append(add)


def ib_devices(host: Host) -> list[IbDevice]:
    """The registered RDMA devices of ``host`` in registration order (the
    kernel's device list; the RDMA CM picks one by address from it)."""
    return list(_REGISTRY.get(host, ()))


def node_guid_from_mac(mac: bytes) -> int:
    """The EUI-64 of a MAC address (``addrconf_addr_eui48``): FF:FE in the
    middle, the universal/local bit flipped — rxe's node GUID."""
    eui = bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return int.from_bytes(eui, "big")


def gid_for_ipv4(ip: IPv4Address) -> bytes:
    """The RoCEv2 GID of an IPv4 address: ``::ffff:a.b.c.d``."""
    return bytes(10) + b"\xff\xff" + ip.packed


@dataclass
class _Tables:
    pds: list[ProtectionDomain] = field(default_factory=list)
    cqs: list[CompletionQueue] = field(default_factory=list)
    qps: dict[int, QueuePair] = field(default_factory=dict)
    srqs: dict[int, SharedReceiveQueue] = field(default_factory=dict)
    xrcds: list[XrcDomain] = field(default_factory=list)
    xrcds_by_inode: dict[Hashable, XrcDomain] = field(default_factory=dict)
    """The domains opened with a file, by inode (uverbs ``xrcd_table``)."""


class IbDevice(abc.ABC):
    """``struct ib_device``. ``dma_device`` is the bus device whose DMA API
    the ``ib_dma_*`` wrappers use (a virtual-backend device for CPU-copy
    drivers, see :mod:`softrdma.verbs.dma`).

    ``scheduler`` is the hardware's clock and its timers, tasklets and work
    items (:mod:`softrdma.time`): the driver runs its engines on it, and
    consumers above the verbs (the MAD layer, the CM) run their timers on
    it. Its ``lock`` serialises the verbs with the driver: every verb that
    touches state the hardware also touches (posting, modifying, polling,
    freeing) holds it, and every scheduler callback runs holding it."""

    def __init__(
        self,
        name: str,
        dma_device: Device,
        attrs: DeviceAttr,
        *,
        ip: IPv4Address,
        mac: bytes,
        netdev_mtu: int = 1500,
        local_dma_lkey: int = 0,
        scheduler: Scheduler,
        share: DeviceShare | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.share = share
        """How this copy of a device shares it with other processes' copies
        (:mod:`softrdma.verbs.share`); None when this process has it alone."""
        self.lock = scheduler.lock
        self.name = name
        self.dma_device = dma_device
        self.host: Host = dma_device.host
        self.attrs = attrs
        self.ip = ip
        self.mac = mac
        self.node_guid = node_guid_from_mac(mac)
        """``ib_device.node_guid``: the EUI-64 of the port's MAC, as rxe
        derives it (the CM's ``local_ca_guid``)."""
        self.netdev_mtu = netdev_mtu
        self.local_dma_lkey = local_dma_lkey
        self.mr_table = MrTable(first_index=(local_dma_lkey >> 8) + 1)
        self._tables = _Tables()
        self._event_handlers: list[EventHandler] = []
        # QP0/QP1 are special; rxe starts at 17. A shared device's copy
        # numbers within its slot, so the shared address routes by QPN.
        self._next_qpn = 0x11 | (0 if share is None else share.slot << QPN_SLOT_SHIFT)
        self._next_srqn = 0x40  # rxe's RXE_MIN_SRQ_INDEX
        self.unregistered = False
        self._clients: list[Callable[[], None]] = []
        self._clients_opened = False
        _REGISTRY.setdefault(self.host, []).append(self)  # ib_register_device

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, {self.ip}, dma={self.dma_device.backend.value})"
        )

    # -- queries ---------------------------------------------------------------

    def query_device(self) -> DeviceAttr:
        """``ib_query_device`` (``dev->attrs``)."""
        return self.attrs

    def query_port(self, port_num: int = 1) -> PortAttr:
        """``ib_query_port``: RoCE's active MTU is the largest IB MTU not
        above the netdev MTU minus ``RXE_MAX_HDR_LENGTH`` (80 bytes), as rxe's
        ``rxe_set_mtu`` computes it (1500 → 1024, 4200 → 4096)."""
        self._check_port(port_num)
        active = IbMtu.from_size(self.netdev_mtu - RXE_MAX_HDR_LENGTH)
        return PortAttr(max_mtu=IbMtu.MTU_4096, active_mtu=active, gid_tbl_len=2)

    def query_gid(self, port_num: int = 1, index: int = 1) -> bytes:
        """``rdma_query_gid``: index 0 is the link-local GID of the MAC,
        index 1 the RoCEv2 GID ``::ffff:<ipv4>`` (as on a Linux rxe port)."""
        self._check_port(port_num)
        if index == 0:
            m = self.mac
            eui = bytes([m[0] ^ 2, m[1], m[2], 0xFF, 0xFE, m[3], m[4], m[5]])
            return b"\xfe\x80" + bytes(6) + eui
        if index == 1:
            return gid_for_ipv4(self.ip)
        raise VerbsError(errno.EINVAL, f"GID index {index} is beyond the table")

    @staticmethod
    def _check_port(port_num: int) -> None:
        if port_num != 1:
            raise VerbsError(errno.EINVAL, f"port {port_num} does not exist (one port, number 1)")

    # -- events ------------------------------------------------------------------

    def register_event_handler(self, handler: EventHandler) -> None:
        """``ib_register_event_handler``."""
        self._event_handlers.append(handler)

    def dispatch_event(self, event: IbEvent) -> None:
        """``ib_dispatch_event``: device handlers, then the object's own."""
        for handler in self._event_handlers:
            handler(event)
        if event.qp is not None and event.qp.event_handler is not None:
            event.qp.event_handler(event)
        if event.cq is not None and event.cq.event_handler is not None:
            event.cq.event_handler(event)
        if event.srq is not None and event.srq.event_handler is not None:
            event.srq.event_handler(event)

    # -- object creation ------------------------------------------------------------

    def alloc_pd(self, flags: int = 0) -> ProtectionDomain:
        """``ib_alloc_pd``."""
        from softrdma.verbs.pd import ProtectionDomain

        if len(self._tables.pds) >= self.attrs.max_pd:
            raise VerbsError(errno.ENOMEM, "max_pd reached")
        pd = ProtectionDomain(self, IbPdFlags(flags))
        self._tables.pds.append(pd)
        return pd

    def create_cq(
        self,
        cqe: int,
        comp_handler: Callable[[CompletionQueue], None] | None = None,
        event_handler: EventHandler | None = None,
    ) -> CompletionQueue:
        """``ib_create_cq`` / ``ib_alloc_cq``."""
        from softrdma.verbs.cq import CompletionQueue

        if not 0 < cqe <= self.attrs.max_cqe:
            raise VerbsError(errno.EINVAL, f"cqe {cqe} outside 1..{self.attrs.max_cqe}")
        cq = CompletionQueue(self, cqe, comp_handler, event_handler)
        self._tables.cqs.append(cq)
        return cq

    def create_qp(self, pd: ProtectionDomain, init_attr: QpInitAttr) -> QueuePair:
        """``ib_create_qp``."""
        from softrdma.verbs.qp import QueuePair

        if pd.device is not self:
            raise VerbsError(errno.EINVAL, "PD belongs to another device")
        if len(self._tables.qps) >= self.attrs.max_qp:
            raise VerbsError(errno.ENOMEM, "max_qp reached")
        if init_attr.qp_type == IbQpType.GSI:
            qpn = 1  # the General Services Interface QP of the port
            if qpn in self._tables.qps:
                raise VerbsError(errno.EBUSY, "the port already has its GSI QP (QP1)")
        else:
            qpn = self._next_qpn
            if self.share is not None and qpn >> QPN_SLOT_SHIFT != self.share.slot:
                raise VerbsError(
                    errno.ENOMEM, "this process's QP numbers of the shared device are used up"
                )
            self._next_qpn += 1
        with self.lock:
            qp = QueuePair(pd, init_attr, qpn)
            qp.hw = self.ops_create_qp(qp)
            self._tables.qps[qpn] = qp
        return qp

    def create_srq(self, pd: ProtectionDomain, init_attr: SrqInitAttr) -> SharedReceiveQueue:
        """``ib_create_srq``: ``EOPNOTSUPP`` on a device without SRQs
        (``max_srq`` 0), ``ENOMEM`` past ``max_srq``."""
        from softrdma.verbs.srq import SharedReceiveQueue

        if pd.device is not self:
            raise VerbsError(errno.EINVAL, "PD belongs to another device")
        if not self.attrs.max_srq:
            raise VerbsError(errno.EOPNOTSUPP, f"{self.name} has no shared receive queues")
        with self.lock:
            if len(self._tables.srqs) >= self.attrs.max_srq:
                raise VerbsError(errno.ENOMEM, "max_srq reached")
            srqn = self._next_srqn
            srq = SharedReceiveQueue(pd, init_attr, srqn)
            self._next_srqn += 1
            srq.hw = self.ops_create_srq(srq, init_attr.attr)
            self._tables.srqs[srqn] = srq
        return srq

    def qp_by_num(self, qpn: int) -> QueuePair | None:
        """The QP with number ``qpn`` (``rxe_pool_get_index`` on the QP pool)."""
        return self._tables.qps.get(qpn)

    def alloc_mr(
        self, pd: ProtectionDomain, max_num_sg: int, mr_type: IbMrType = IbMrType.MEM_REG
    ) -> MemoryRegion:
        """``ib_alloc_mr``: a fast-registration MR, free until IB_WR_REG_MR."""
        if mr_type not in (IbMrType.MEM_REG, IbMrType.SG_GAPS):
            raise VerbsError(errno.EINVAL, f"ib_alloc_mr of type {mr_type.name}")
        if not 0 < max_num_sg <= self.attrs.max_fast_reg_page_list_len:
            raise VerbsError(
                errno.EINVAL,
                f"max_num_sg {max_num_sg} outside 1..{self.attrs.max_fast_reg_page_list_len}",
            )
        with self.lock:
            if len(self.mr_table) >= self.attrs.max_mr:
                raise VerbsError(errno.ENOMEM, "max_mr reached")
            mr = self.mr_table.add(pd, IbMrType.MEM_REG, IbAccess(0), max_num_sg)
            pd.usecnt += 1
        return mr

    def get_dma_mr(self, pd: ProtectionDomain, access: IbAccess) -> MemoryRegion:
        """``ops.get_dma_mr``: an MR covering every DMA address of the device."""
        ib_check_mr_access(access)
        with self.lock:
            return self.mr_table.add(pd, IbMrType.DMA, access)

    def dereg_mr(self, mr: MemoryRegion) -> None:
        """``ib_dereg_mr``: refused while memory windows are bound to the MR
        (rxe ``rxe_dereg_mr``)."""
        with self.lock:
            if mr.deregistered:
                raise VerbsError(errno.EINVAL, f"MR {mr.lkey:#x} already deregistered")
            if mr.num_mw:
                raise VerbsError(errno.EINVAL, f"MR {mr.lkey:#x} has {mr.num_mw} bound MWs")
            mr.deregistered = True
            mr.state = MrState.INVALID
            self.mr_table.remove(mr)
            if mr is not mr.pd.internal_mr:
                mr.pd.usecnt -= 1

    def alloc_mw(self, pd: ProtectionDomain, mw_type: int) -> MemoryWindow:
        """``ib_alloc_mw`` (``rxe_alloc_mw``): a type 1 window, valid and
        unbound, or a type 2 window, free until a bind work request.
        Another type is ``EINVAL``; past ``max_mw``, ``ENOMEM``."""
        if pd.device is not self or pd.deallocated:
            raise VerbsError(errno.EINVAL, "PD of another device, or deallocated")
        if mw_type not in (IbMwType.TYPE_1, IbMwType.TYPE_2):
            raise VerbsError(errno.EINVAL, f"no memory window type {mw_type}")
        with self.lock:
            if self.mr_table.num_mws >= self.attrs.max_mw:
                raise VerbsError(errno.ENOMEM, "max_mw reached")
            mw = self.mr_table.add_mw(pd, IbMwType(mw_type))
            pd.usecnt += 1
        return mw

    def dealloc_mw(self, mw: MemoryWindow) -> None:
        """``uverbs_dealloc_mw`` (``rxe_dealloc_mw``): the window's key stops
        working at once, bound or not."""
        from softrdma.verbs.mw import MwState

        with self.lock:
            if mw.deallocated:
                raise VerbsError(errno.EINVAL, f"MW {mw.rkey:#x} already deallocated")
            mw._unbind(MwState.INVALID)
            mw.deallocated = True
            self.mr_table.remove_mw(mw)
            mw.pd.usecnt -= 1

    def progress(self, until: Callable[[], bool]) -> None:
        """Let the hardware run for a poller that found nothing: on simulated
        time, run the scheduler until ``until()`` holds or its budget is
        spent; on real time, give the progress thread a moment to
        (:meth:`Scheduler.progress <softrdma.time.base.Scheduler.progress>`)."""
        self.scheduler.progress(until)

    def wait(self, until: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``until()`` holds or ``timeout`` seconds pass; whether
        it holds (:meth:`Scheduler.wait <softrdma.time.base.Scheduler.wait>`)."""
        return self.scheduler.wait(until, timeout)

    def open_clients(self) -> None:
        """Open the registered core clients on this device (once); see
        :func:`ib_register_client`. A driver calls it for a packet to a QP1
        that does not exist yet."""
        if self._clients_opened or self.unregistered:
            return
        self._clients_opened = True
        for add in list(_CLIENTS):
            add(self)

    def add_client(self, remove: Callable[[], None]) -> None:
        """``ib_register_client`` for this device: ``remove`` runs when the
        device unregisters (the MAD layer and the CM close their ports)."""
        self._clients.append(remove)

    def remove_client(self, remove: Callable[[], None]) -> None:
        """Forget a client that went away by itself."""
        if remove in self._clients:
            self._clients.remove(remove)

    def unregister(self) -> None:
        """``ib_unregister_device``: its clients go first (in reverse order,
        as the kernel removes them), then the driver lets go of its hardware
        (for a RoCE device, its network link). Idempotent."""
        with self.lock:
            if self.unregistered:
                return
            while self._clients:
                self._clients.pop()()
            self.unregistered = True
            devices = _REGISTRY.get(self.host, [])
            if self in devices:
                devices.remove(self)
            self.ops_unregister()

    def _forget_qp(self, qp: QueuePair) -> None:
        self._tables.qps.pop(qp.qp_num, None)

    def _forget_srq(self, srq: SharedReceiveQueue) -> None:
        self._tables.srqs.pop(srq.srq_num, None)

    def _forget_cq(self, cq: CompletionQueue) -> None:
        self._tables.cqs.remove(cq)

    def _forget_pd(self, pd: ProtectionDomain) -> None:
        self._tables.pds.remove(pd)

    # -- the driver's ib_device_ops ------------------------------------------------------

    @abc.abstractmethod
    def ops_create_qp(self, qp: QueuePair) -> QpHardware:
        """Set up the driver's side of a new QP, which owns its state."""

    @abc.abstractmethod
    def ops_modify_qp(self, qp: QueuePair, attr: QpAttr, mask: int) -> None:
        """Apply a validated transition: ``attr.qp_state`` is the new state,
        ``mask`` (with ``IB_QP_STATE``) the attributes to take."""

    @abc.abstractmethod
    def ops_post_send(self, qp: QueuePair, wrs: Sequence[SendWR]) -> None:
        """Queue send work requests and ring the doorbell; a WR the driver
        cannot take (wrong opcode for the QP type, ...) raises
        :class:`~softrdma.verbs.errors.PostError` with it as ``bad_wr``,
        the ones before it being posted (``rxe_post_send``)."""

    @abc.abstractmethod
    def ops_post_recv(self, qp: QueuePair, wrs: Sequence[RecvWR]) -> None:
        """Queue validated receive work requests."""

    @abc.abstractmethod
    def ops_destroy_qp(self, qp: QueuePair) -> None:
        """Tear down the driver's side of a QP."""

    def ops_create_srq(self, srq: SharedReceiveQueue, attr: SrqAttr) -> SrqHardware:
        """Set up the driver's side of a new SRQ (``rxe_create_srq``)."""
        raise VerbsError(errno.EOPNOTSUPP, f"{self.name} has no shared receive queues")

    def ops_post_srq_recv(self, srq: SharedReceiveQueue, wrs: Sequence[RecvWR]) -> None:
        """Queue validated receive work requests on the SRQ."""
        raise VerbsError(errno.EOPNOTSUPP, f"{self.name} has no shared receive queues")

    def ops_modify_srq(self, srq: SharedReceiveQueue, attr: SrqAttr, mask: IbSrqAttrMask) -> None:
        """Apply a validated ``ib_modify_srq``."""
        raise VerbsError(errno.EOPNOTSUPP, f"{self.name} has no shared receive queues")

    def ops_destroy_srq(self, srq: SharedReceiveQueue) -> None:
        """Tear down the driver's side of an SRQ."""
        raise VerbsError(errno.EOPNOTSUPP, f"{self.name} has no shared receive queues")

    @abc.abstractmethod
    def ops_unregister(self) -> None:
        """Release the driver's resources at :meth:`unregister`."""
