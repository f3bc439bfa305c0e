"""``pyverbs.device``: the device list, device contexts and their queries
(``ibv_get_device_list``, ``ibv_open_device``, ``ibv_query_device``,
``ibv_query_device_ex``, ``ibv_query_port``, ``ibv_query_gid``,
``ibv_query_gid_ex``, ``ibv_query_gid_table``, ``ibv_query_pkey``) and
device memory (``ibv_alloc_dm``, ``ibv_memcpy_to_dm`` / ``from_dm``).

The devices are the softrdma devices of this process
(:mod:`pyverbs._softrdma`). Each port is ACTIVE with link layer Ethernet;
its GID table holds one entry, the RoCEv2 GID of the port's IPv4 address
(``::ffff:a.b.c.d``) — the only kind of GID the RoCEv2 transport routes.
"""

from __future__ import annotations

import errno
import os
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import pyverbs.enums as e
from pyverbs import _clock
from pyverbs import _softrdma as sim
from pyverbs.addr import GID
from pyverbs.base import PyverbsCM, PyverbsObject
from pyverbs.libibverbs_enums import _IBV_DEVICE_CC_DMA_BOUNCE
from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError, PyverbsUserError
from softrdma.dma.types import DmaBackend
from softrdma.drivers.roce import RoceDevice
from softrdma.errors import SoftRdmaError
from softrdma.memory.layout import PAGE_SHIFT
from softrdma.verbs.device import IB_DEVICE_MEM_MGT_EXTENSIONS, IB_DEVICE_XRC, IbEvent
from softrdma.verbs.dm import DM_MAX_SIZE, IbDm, ib_alloc_dm
from softrdma.verbs.enums import (
    IB_DEVICE_ATOMIC_WRITE,
    IB_DEVICE_FLUSH_GLOBAL,
    IB_DEVICE_FLUSH_PERSISTENT,
)
from softrdma.verbs.umem import ib_device_cc_dma_bounce

__all__ = [
    "DM",
    "AllocDmAttr",
    "AsyncEvent",
    "Context",
    "Device",
    "DeviceAttr",
    "DeviceAttrEx",
    "GIDEntry",
    "ODPCaps",
    "PortAttr",
    "PyverbsError",
    "PyverbsRDMAError",
    "PyverbsUserError",
    "get_device_list",
    "phys_state_to_str",
    "speed_to_str",
    "translate_link_layer",
    "translate_mtu",
    "width_to_str",
]

#: ``ibv_port_attr.max_msg_sz`` of rxe (``RXE_PORT_MAX_MSG_SZ``).
#: The GID table's length, rxe's ``RXE_PORT_GID_TBL_LEN``.
GID_TBL_LEN = 1024
MAX_MSG_SZ = 0x80000000
#: The port's P_Key table: the default full-membership key.
DEFAULT_PKEY = 0xFFFF
#: Seconds of device time ``get_async_event`` waits before giving up.
ASYNC_EVENT_TIMEOUT = 30.0

_Obj = TypeVar("_Obj", bound=PyverbsCM)


class UverbsFile:
    """The uverbs command file behind ``Context.cmd_fd`` (the kernel's
    ``ib_uverbs_file`` with its ``ib_ucontext``): the contexts opened on it
    (the first by ``ibv_open_device``, the others by ``ibv_import_device``
    from a duplicate of its descriptor) and so the objects they share by
    handle. The descriptor is a memfd: a file of its own, so ``fstat`` of
    any duplicate names it."""

    def __init__(self, name: str, key: tuple[int, int]) -> None:
        self.name = name
        self.key = key
        self.contexts: list[weakref.ref[Context]] = []

    def live_contexts(self) -> list[Context]:
        """The open contexts on the file."""
        out = [c for r in self.contexts if (c := r()) is not None and not c.closed]
        return out


#: (st_dev, st_ino) of each open command file -> its uverbs file.
_ufiles: dict[tuple[int, int], UverbsFile] = {}


def _fd_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@dataclass
class Device(PyverbsObject):
    """``struct ibv_device`` (an entry of :func:`get_device_list`): ``name``
    is bytes, as pyverbs gives it."""

    name: bytes
    guid: int
    index: int
    node_type: int = e.IBV_NODE_CA
    transport_type: int = e.IBV_TRANSPORT_IB

    def __post_init__(self) -> None:
        PyverbsObject.__init__(self)

    def __str__(self) -> str:
        return f"Device {self.name.decode()}, node type CA, transport IB, guid {self.guid:#018x}"


def get_device_list() -> list[Device]:
    """``ibv_get_device_list``: the devices of this process."""
    proc = sim.process()
    return [
        Device(name.encode(), dev.node_guid, i)
        for i, (name, dev) in enumerate(proc.devices.items())
    ]


@dataclass
class DeviceAttr(PyverbsObject):
    """``struct ibv_device_attr`` (read-only values)."""

    fw_version: str
    node_guid: int
    sys_image_guid: int
    max_mr_size: int
    page_size_cap: int
    vendor_id: int
    vendor_part_id: int
    hw_ver: int
    max_qp: int
    max_qp_wr: int
    device_cap_flags: int
    max_sge: int
    max_sge_rd: int
    max_cq: int
    max_cqe: int
    max_mr: int
    max_pd: int
    max_qp_rd_atom: int
    max_ee_rd_atom: int
    max_res_rd_atom: int
    max_qp_init_rd_atom: int
    max_ee_init_rd_atom: int
    atomic_caps: int
    max_ee: int
    max_rdd: int
    max_mw: int
    max_raw_ipv6_qps: int
    max_raw_ethy_qp: int
    max_mcast_grp: int
    max_mcast_qp_attach: int
    max_total_mcast_qp_attach: int
    max_ah: int
    max_fmr: int
    max_map_per_fmr: int
    max_srq: int
    max_srq_wr: int
    max_srq_sge: int
    max_pkeys: int
    local_ca_ack_delay: int
    phys_port_cnt: int

    def __post_init__(self) -> None:
        PyverbsObject.__init__(self)


def _odp_caps(dev: RoceDevice) -> ODPCaps:
    """On-demand paging (explicit and implicit, whole address space MRs)
    where the DMA does not bounce: every transport's requests and receives
    reach an ODP MR through the same page walk."""
    if dev.dma_device.backend is DmaBackend.SWIOTLB:
        return ODPCaps()
    ops = e.IBV_ODP_SUPPORT_SEND | e.IBV_ODP_SUPPORT_RECV
    rdma = e.IBV_ODP_SUPPORT_WRITE | e.IBV_ODP_SUPPORT_READ | e.IBV_ODP_SUPPORT_ATOMIC
    return ODPCaps(
        general_caps=int(e.IBV_ODP_SUPPORT | e.IBV_ODP_SUPPORT_IMPLICIT),
        rc_odp_caps=int(ops | rdma | e.IBV_ODP_SUPPORT_SRQ_RECV),
        # XRC runs the RC engines; its receives are XRC SRQ receives
        xrc_odp_caps=int(ops | rdma | e.IBV_ODP_SUPPORT_SRQ_RECV),
        uc_odp_caps=int(ops | e.IBV_ODP_SUPPORT_WRITE),
        ud_odp_caps=int(ops),
    )


@dataclass
class ODPCaps(PyverbsObject):
    """``struct ibv_odp_caps`` (see :func:`_odp_caps`)."""

    general_caps: int = 0
    rc_odp_caps: int = 0
    uc_odp_caps: int = 0
    ud_odp_caps: int = 0
    xrc_odp_caps: int = 0

    def __post_init__(self) -> None:
        PyverbsObject.__init__(self)


@dataclass
class _Caps(PyverbsObject):
    """A zero capability block of ``ibv_device_attr_ex`` (TSO, RSS, ...)."""

    values: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        PyverbsObject.__init__(self)

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.values.get(name, 0)


@dataclass
class DeviceAttrEx(PyverbsObject):
    """``struct ibv_device_attr_ex``: ``orig_attr`` and the extensions,
    which softrdma's devices report as absent (TSO, RSS, tag matching,
    packet pacing, PCI atomics, CQ moderation) except ODP, device memory
    (``max_dm_size``, see :class:`DM`) and the completion clock
    (``hca_core_clock``, ``completion_timestamp_mask``: see
    :mod:`pyverbs._clock`)."""

    orig_attr: DeviceAttr
    comp_mask: int = 0
    odp_caps: ODPCaps = field(default_factory=ODPCaps)
    completion_timestamp_mask: int = 0
    hca_core_clock: int = 0
    device_cap_flags_ex: int = 0
    tso_caps: _Caps = field(default_factory=_Caps)
    rss_caps: _Caps = field(default_factory=_Caps)
    max_wq_type_rq: int = 0
    packet_pacing_caps: _Caps = field(default_factory=_Caps)
    raw_packet_caps: int = 0
    tm_caps: _Caps = field(default_factory=_Caps)
    cq_mod_caps: _Caps = field(default_factory=_Caps)
    max_dm_size: int = DM_MAX_SIZE
    pci_atomic_caps: _Caps = field(default_factory=_Caps)
    xrc_odp_caps: int = 0
    phys_port_cnt_ex: int = 1

    def __post_init__(self) -> None:
        PyverbsObject.__init__(self)


@dataclass
class PortAttr(PyverbsObject):
    """``struct ibv_port_attr`` of a RoCEv2 port."""

    state: int
    max_mtu: int
    active_mtu: int
    gid_tbl_len: int
    port_cap_flags: int
    max_msg_sz: int
    bad_pkey_cntr: int
    qkey_viol_cntr: int
    pkey_tbl_len: int
    lid: int
    sm_lid: int
    lmc: int
    max_vl_num: int
    sm_sl: int
    subnet_timeout: int
    init_type_reply: int
    active_width: int
    active_speed: int
    phys_state: int
    link_layer: int
    flags: int
    port_cap_flags2: int

    def __post_init__(self) -> None:
        PyverbsObject.__init__(self)


@dataclass
class GIDEntry(PyverbsObject):
    """``struct ibv_gid_entry`` (``ibv_query_gid_ex``)."""

    gid_subnet_prefix: int
    gid_interface_id: int
    gid_index: int
    port_num: int
    gid_type: int
    ndev_ifindex: int

    def __post_init__(self) -> None:
        PyverbsObject.__init__(self)

    def gid_str(self) -> str:
        raw = self.gid_subnet_prefix.to_bytes(8, "big") + self.gid_interface_id.to_bytes(8, "big")
        return GID.from_raw(raw).gid


class Context(PyverbsCM):
    """``struct ibv_context``: an open device. ``Context(name=...)`` opens
    the device of that name (``ibv_open_device``); contexts of one device
    share it. ``Context(cmd_fd=os.dup(ctx.cmd_fd))`` imports ``ctx``
    (``ibv_import_device``): a context on the same command file, which
    can import its objects by handle (``PD(..., handle=)``, ``MR``,
    ``DM``) and owns the descriptor it was given. Closing the context
    closes what was created on it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        if kwargs.get("cmid") is not None:
            raise PyverbsRDMAError("RDMA CM contexts are not supported", errno.EOPNOTSUPP)
        cmd_fd = kwargs.get("cmd_fd")
        if kwargs.get("attr") is not None:
            # provider-specific attributes: the vendor's own open path
            raise PyverbsUserError("Provider attributes are not supported by softrdma devices")
        ufile: UverbsFile | None = None
        if cmd_fd is not None:
            # ibv_import_device: another context on the file of that fd
            ufile = self._ufile_of(cmd_fd)
            name: object = ufile.name
        else:
            name = kwargs.get("name")
        if isinstance(name, bytes):
            name = name.decode()
        if not isinstance(name, str):
            raise PyverbsUserError("Device name must be provided")
        proc: sim.SimProcess
        dev: RoceDevice | None
        if ufile is not None:
            # the device of the file (not whatever now has its name)
            first = ufile.live_contexts()[0]
            proc, dev = first.proc, first.device
        else:
            proc = sim.process()
            dev = proc.devices.get(name)
        if dev is None:
            raise PyverbsRDMAError(f"Failed to open device {name}", errno.ENODEV)
        self.name = name
        self.device: RoceDevice = dev
        self.kind = proc.kind(name)
        self.proc: sim.SimProcess = proc
        self.num_comp_vectors = 1
        self._async_events: deque[IbEvent] = deque()
        proc.contexts[name].add(self)
        if ufile is None:
            # the uverbs command file of the context: a real descriptor, so
            # a dup() of it imports the context (ibv_import_device)
            self.cmd_fd: int = os.memfd_create(f"uverbs-{name}", os.MFD_CLOEXEC)
            ufile = UverbsFile(name, _fd_key(self.cmd_fd))
            _ufiles[ufile.key] = ufile
        else:
            # the imported context owns the descriptor it was given
            assert cmd_fd is not None
            self.cmd_fd = int(cmd_fd)
        self.ufile = ufile
        ufile.contexts.append(weakref.ref(self))

    @staticmethod
    def _ufile_of(cmd_fd: object) -> UverbsFile:
        what = "Failed to import device"
        if not isinstance(cmd_fd, int) or cmd_fd < 0:
            raise PyverbsRDMAError(f"{what}: bad command fd {cmd_fd!r}", errno.EBADF)
        try:
            key = _fd_key(cmd_fd)
        except OSError as ex:
            raise PyverbsRDMAError(
                f"{what}: fd {cmd_fd}: {ex.strerror}", ex.errno or errno.EBADF
            ) from None
        ufile = _ufiles.get(key)
        if ufile is None or not ufile.live_contexts():
            # not the command file of an open softrdma context
            raise PyverbsRDMAError(f"{what}: fd {cmd_fd} is not a uverbs file", errno.EINVAL)
        return ufile

    def import_object(self, cls: type[_Obj], handle: int, what: str) -> _Obj:
        """The object of class ``cls`` with ``handle`` created on a context
        of this context's command file (the kernel's lookup of a uobject
        by handle, behind ``ibv_import_pd`` / ``_mr`` / ``_dm``); imported
        copies do not count. ``ENOENT`` when there is none."""
        self._alive()
        todo: list[PyverbsCM] = list(self.ufile.live_contexts())
        seen: set[int] = set()
        while todo:
            obj = todo.pop()
            if id(obj) in seen:
                continue  # reached again through another parent (a QP's CQ)
            seen.add(id(obj))
            if (
                isinstance(obj, cls)
                and not obj.closed
                and not getattr(obj, "imported", False)
                and getattr(obj, "handle", None) == handle
            ):
                return obj
            todo.extend(d for r in obj._dependants if (d := r()) is not None)
        raise PyverbsRDMAError(f"{what}: no object of handle {handle:#x}", errno.ENOENT)

    def __repr__(self) -> str:
        return f"Context({self.name!r})"

    def _alive(self) -> RoceDevice:
        if self.closed:
            raise PyverbsRDMAError(f"Context of {self.name} is closed", errno.EBADF)
        return self.device

    # -- ibv_query_device ---------------------------------------------------------

    def query_device(self) -> DeviceAttr:
        """``ibv_query_device``."""
        dev = self._alive()
        a = dev.query_device()
        caps = e.IBV_DEVICE_SYS_IMAGE_GUID | e.IBV_DEVICE_RC_RNR_NAK_GEN
        if a.device_cap_flags & IB_DEVICE_MEM_MGT_EXTENSIONS:
            caps |= e.IBV_DEVICE_MEM_MGT_EXTENSIONS
        if a.device_cap_flags & IB_DEVICE_XRC:
            caps |= e.IBV_DEVICE_XRC
        return DeviceAttr(
            fw_version="0.1.0",
            node_guid=dev.node_guid,
            sys_image_guid=dev.node_guid,
            max_mr_size=a.max_mr_size,
            page_size_cap=a.page_size_cap,
            vendor_id=a.vendor_id,
            vendor_part_id=0,  # no vendor's product: provider-specific paths stay off
            hw_ver=0,
            max_qp=a.max_qp,
            max_qp_wr=a.max_qp_wr,
            device_cap_flags=caps,
            max_sge=min(a.max_send_sge, a.max_recv_sge),
            max_sge_rd=a.max_sge_rd,
            max_cq=a.max_cq,
            max_cqe=a.max_cqe,
            max_mr=a.max_mr,
            max_pd=a.max_pd,
            max_qp_rd_atom=a.max_qp_rd_atom,
            max_ee_rd_atom=0,
            max_res_rd_atom=a.max_qp_rd_atom * a.max_qp,
            max_qp_init_rd_atom=a.max_qp_init_rd_atom,
            max_ee_init_rd_atom=0,
            atomic_caps=e.IBV_ATOMIC_HCA,
            max_ee=0,
            max_rdd=0,
            max_mw=a.max_mw,
            max_raw_ipv6_qps=0,
            max_raw_ethy_qp=0,
            max_mcast_grp=0,
            max_mcast_qp_attach=0,
            max_total_mcast_qp_attach=0,
            max_ah=a.max_qp,
            max_fmr=0,
            max_map_per_fmr=0,
            max_srq=a.max_srq,
            max_srq_wr=a.max_srq_wr,
            max_srq_sge=a.max_srq_sge,
            max_pkeys=1,
            local_ca_ack_delay=a.local_ca_ack_delay,
            phys_port_cnt=1,
        )

    def query_device_ex(self, ex_input: object = None) -> DeviceAttrEx:
        """``ibv_query_device_ex``."""
        dev = self._alive()
        # a device in a CoCo guest says it needs shared-heap memory
        cc = _IBV_DEVICE_CC_DMA_BOUNCE if ib_device_cc_dma_bounce(dev) else 0
        orig = self.query_device()
        # IB_UVERBS_DEVICE_FLUSH_GLOBAL / _PERSISTENT / _ATOMIC_WRITE (bits
        # 38..40, which only the 64-bit flags can hold) as the driver reports
        a19 = dev.query_device().device_cap_flags & (
            IB_DEVICE_FLUSH_GLOBAL | IB_DEVICE_FLUSH_PERSISTENT | IB_DEVICE_ATOMIC_WRITE
        )
        return DeviceAttrEx(
            orig_attr=orig,
            device_cap_flags_ex=orig.device_cap_flags | cc | a19,
            odp_caps=_odp_caps(dev),
            completion_timestamp_mask=_clock.COMPLETION_TIMESTAMP_MASK,
            hca_core_clock=_clock.HCA_CORE_CLOCK_KHZ,
        )

    # -- ports and GIDs ------------------------------------------------------------------

    def _check_port(self, port_num: int, what: str) -> RoceDevice:
        dev = self._alive()
        if port_num != 1:
            raise PyverbsRDMAError(f"Failed to {what} of port {port_num}", errno.EINVAL)
        return dev

    def query_port(self, port_num: int = 1) -> PortAttr:
        """``ibv_query_port``."""
        dev = self._check_port(port_num, "query port")
        p = dev.query_port(1)
        return PortAttr(
            state=e.IBV_PORT_ACTIVE,
            max_mtu=int(p.max_mtu),
            active_mtu=int(p.active_mtu),
            gid_tbl_len=GID_TBL_LEN,
            port_cap_flags=e.IBV_PORT_CM_SUP | e.IBV_PORT_IP_BASED_GIDS,
            max_msg_sz=MAX_MSG_SZ,
            bad_pkey_cntr=0,
            qkey_viol_cntr=0,
            pkey_tbl_len=1,
            lid=0,
            sm_lid=0,
            lmc=0,
            max_vl_num=1,
            sm_sl=0,
            subnet_timeout=0,
            init_type_reply=0,
            active_width=2,  # IB_WIDTH_4X
            active_speed=32,  # IB_SPEED_EDR (25 Gb/s lanes: 100 GbE)
            phys_state=5,  # LinkUp
            link_layer=e.IBV_LINK_LAYER_ETHERNET,
            flags=0,
            port_cap_flags2=0,
        )

    def _gid_raw(self, port_num: int, index: int) -> bytes:
        """The GID at ``index``: entry 0 holds the device's RoCEv2 GID of its
        IPv4 address; every other index of the table is empty (``ENODATA``,
        as ``ibv_query_gid_ex`` reports an unused entry)."""
        dev = self._check_port(port_num, "query gid")
        if not 0 <= index < GID_TBL_LEN:
            raise PyverbsRDMAError(f"Failed to query gid {index} of port {port_num}", errno.EINVAL)
        if index:
            raise PyverbsRDMAError(
                f"Failed to query gid {index} of port {port_num}: the entry is empty",
                errno.ENODATA,
            )
        return dev.query_gid(1, 1)

    def query_gid(self, port_num: int, index: int) -> GID:
        """``ibv_query_gid``: an empty entry reads as the zero GID."""
        try:
            return GID.from_raw(self._gid_raw(port_num, index))
        except PyverbsRDMAError as ex:
            if ex.error_code != errno.ENODATA:
                raise
            return GID.from_raw(bytes(16))

    def query_gid_type(self, port_num: int, index: int) -> int:
        """``ibv_query_gid_type``: the one GID is RoCEv2; an empty entry
        reads as IB / RoCE v1, as libibverbs keeps for the old API."""
        try:
            self._gid_raw(port_num, index)
        except PyverbsRDMAError as ex:
            if ex.error_code != errno.ENODATA:
                raise
            return e.IBV_GID_TYPE_SYSFS_IB_ROCE_V1
        return e.IBV_GID_TYPE_SYSFS_ROCE_V2

    def query_gid_ex(self, port_num: int, gid_index: int, flags: int = 0) -> GIDEntry:
        """``ibv_query_gid_ex``."""
        if flags:
            raise PyverbsRDMAError("Failed to query gid: flags must be 0", errno.EINVAL)
        raw = self._gid_raw(port_num, gid_index)
        return GIDEntry(
            int.from_bytes(raw[:8], "big"),
            int.from_bytes(raw[8:], "big"),
            gid_index,
            port_num,
            e.IBV_GID_TYPE_ROCE_V2,
            1,
        )

    def query_gid_table(self, max_entries: int, flags: int = 0) -> list[GIDEntry]:
        """``ibv_query_gid_table``: every valid GID of every port."""
        # ibv_query_gid_table returns a negative errno, and pyverbs raises
        # with it as it is: error_code is -EINVAL here
        if flags:
            raise PyverbsRDMAError("Failed to query gid table: flags must be 0", -errno.EINVAL)
        if max_entries < 1:
            raise PyverbsRDMAError("Failed to query gid table", -errno.EINVAL)
        return [self.query_gid_ex(1, 0)]

    def query_pkey(self, port_num: int, index: int) -> int:
        """``ibv_query_pkey``: the default P_Key at index 0."""
        self._check_port(port_num, "query pkey")
        if index != 0:
            raise PyverbsRDMAError(f"Failed to query pkey {index}", errno.EINVAL)
        return DEFAULT_PKEY

    def _release(self) -> None:
        self._closed = True  # not a live context of its file any more
        if not self.ufile.live_contexts():
            _ufiles.pop(self.ufile.key, None)
        os.close(self.cmd_fd)

    def query_rt_values_ex(self, comp_mask: int = e.IBV_VALUES_MASK_RAW_CLOCK) -> tuple[int, int]:
        """``ibv_query_rt_values_ex``: ``(tv_sec, tv_nsec)`` of the raw
        device clock now (``raw_clock``, ``hca_core_clock`` ticks: at 1 GHz
        a tick is a nanosecond), the clock completion timestamps use.
        ``comp_mask`` must ask for ``IBV_VALUES_MASK_RAW_CLOCK`` only, the
        one value the device has."""
        dev = self._alive()
        if comp_mask != e.IBV_VALUES_MASK_RAW_CLOCK:
            # the provider answers the values it has; pyverbs refuses a
            # reply whose comp_mask differs from the request
            raise PyverbsRDMAError(
                f"Failed to query real time values with requested comp_mask {comp_mask:#x}",
                errno.EOPNOTSUPP,
            )
        with dev.lock:
            raw = _clock.ticks(_clock.device_now(dev))
        return divmod(raw, 1_000_000_000)

    def queue_async_event(self, event: IbEvent) -> None:
        """Keep a device's asynchronous event for :meth:`get_async_event`."""
        self._async_events.append(event)

    def get_async_event(self) -> AsyncEvent:
        """``ibv_get_async_event``: the next asynchronous event of this
        context (its QPs' and CQs' errors, SQ drained, ...), waiting for
        the hardware. Where C blocks forever, this raises
        :class:`PyverbsRDMAError` (``ETIMEDOUT``) once no event can come
        within :data:`ASYNC_EVENT_TIMEOUT` seconds of device time."""
        dev = self._alive()
        events = self._async_events
        with dev.lock:
            if not events and not dev.wait(lambda: bool(events), ASYNC_EVENT_TIMEOUT):
                raise PyverbsRDMAError("Failed to get async event", errno.ETIMEDOUT)
            event = events.popleft()
        return AsyncEvent(int(event.event), event)


class AsyncEvent(PyverbsObject):
    """``struct ibv_async_event``: ``event_type`` (``ibv_event_type``);
    ``ack()`` is ``ibv_ack_async_event``. ``event`` is the softrdma
    ``ib_event`` behind it (its QP or CQ, and why)."""

    def __init__(self, event_type: int, event: IbEvent) -> None:
        super().__init__()
        self.event_type = event_type
        self.event = event
        self.acked = False

    def ack(self) -> None:
        """``ibv_ack_async_event`` (once)."""
        if self.acked:
            raise PyverbsUserError("The async event is already acknowledged")
        self.acked = True

    def __str__(self) -> str:
        return f"Async event {self.event_type}: {self.event.reason}"


_PHYS_STATES: Final = {
    1: "Sleep",
    2: "Polling",
    3: "Disabled",
    4: "Port configuration training",
    5: "Link up",
    6: "Link error recovery",
    7: "Phy test",
}
_WIDTHS: Final = {1: "1X", 2: "4X", 4: "8X", 8: "12X", 16: "2X"}
_SPEEDS: Final = {
    1: "2.5 Gbps",
    2: "5.0 Gbps",
    4: "10.0 Gbps",
    8: "10.0 Gbps",
    16: "14.0 Gbps",
    32: "25.0 Gbps",
    64: "50.0 Gbps",
    128: "100.0 Gbps",
}


def _port_value_str(names: dict[int, str], value: int, what: str) -> str:
    """pyverbs' port attribute text: ``"<name> (<value>)"``, or
    ``"Invalid <what> <value>"`` for a value the table lacks."""
    return f"{names[value]} ({value})" if value in names else f"Invalid {what} {value}"


def phys_state_to_str(state: int) -> str:
    """The name of a physical port state (``ibv_port_attr.phys_state``)."""
    return _port_value_str(_PHYS_STATES, state, "physical state")


def width_to_str(width: int) -> str:
    """The text of an ``active_width``."""
    return _port_value_str(_WIDTHS, width, "width")


def speed_to_str(speed: int) -> str:
    """The lane rate of an ``active_speed``."""
    return _port_value_str(_SPEEDS, speed, "speed")


def translate_mtu(mtu: int) -> str:
    """The bytes of an ``ibv_mtu``."""
    return f"{128 << mtu} ({mtu})" if 1 <= mtu <= 5 else f"Invalid MTU {mtu}"


def translate_link_layer(link_layer: int) -> str:
    """The name of a link layer (pyverbs' ``translate_link_layer``)."""
    names = {
        e.IBV_LINK_LAYER_UNSPECIFIED: "Unspecified",
        e.IBV_LINK_LAYER_INFINIBAND: "InfiniBand",
        e.IBV_LINK_LAYER_ETHERNET: "Ethernet",
    }
    return names.get(link_layer, f"Invalid link layer {link_layer}")


class AllocDmAttr(PyverbsObject):
    """``struct ibv_alloc_dm_attr``."""

    def __init__(self, length: int = 0, log_align_req: int = 0, comp_mask: int = 0) -> None:
        super().__init__()
        self.length = length
        self.log_align_req = log_align_req
        self.comp_mask = comp_mask


class DM(PyverbsCM):
    """``struct ibv_dm``: ``DM(context, AllocDmAttr(length))`` (``ibv_alloc_dm``),
    device memory the CPU reaches with :meth:`copy_to_dm` /
    :meth:`copy_from_dm` (4-byte multiples) and the device directly
    (:class:`pyverbs.mr.DMMR`); see :mod:`softrdma.verbs.dm`."""

    def __init__(self, context: Context, dm_attr: AllocDmAttr | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.imported = False
        handle = kwargs.get("handle")
        if handle is not None:
            # ibv_import_dm: the DM of that handle on the context's file
            what = "Failed to import DM"
            origin = context.import_object(DM, int(handle), what)
            self.dm: IbDm = origin.dm
            self.context = context
            self.handle = int(handle)
            self.imported = True
            context.add_ref(self)
            return
        if dm_attr is None:
            raise PyverbsUserError("DM needs an AllocDmAttr")
        dev = context._alive()
        length = int(dm_attr.length)
        what = (
            f"Failed to allocate device memory of size {length}. Max available size {DM_MAX_SIZE}."
        )
        if dm_attr.comp_mask or not 0 <= dm_attr.log_align_req <= PAGE_SHIFT:
            raise PyverbsRDMAError(what, errno.EINVAL)
        try:
            self.dm = ib_alloc_dm(dev, length)
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        self.context = context
        self.handle = id(self.dm) & 0xFFFFFFFF
        context.add_ref(self)

    def copy_to_dm(self, dm_offset: int, data: bytes, length: int) -> None:
        """``ibv_memcpy_to_dm``: the first ``length`` bytes of ``data``."""
        if self.closed:
            raise PyverbsRDMAError("Failed to copy to dm: DM is closed", errno.EINVAL)
        try:
            self.dm.copy_to(dm_offset, bytes(data)[:length].ljust(length, b"\0"))
        except SoftRdmaError as ex:
            raise sim.rdma_error("Failed to copy to dm", ex) from None

    def copy_from_dm(self, dm_offset: int, length: int) -> bytes:
        """``ibv_memcpy_from_dm``."""
        if self.closed:
            raise PyverbsRDMAError("Failed to copy from dm: DM is closed", errno.EINVAL)
        try:
            return self.dm.copy_from(dm_offset, length)
        except SoftRdmaError as ex:
            raise sim.rdma_error("Failed to copy from dm", ex) from None

    def unimport(self) -> None:
        """``ibv_unimport_dm``: forget an imported DM without freeing the
        memory, which stays with its other users."""
        if not self.imported:
            raise PyverbsRDMAError("Failed to unimport DM: it was not imported", errno.EINVAL)
        self.imported = False
        self._closed = True
        self._dependants.clear()

    def _release(self) -> None:
        # closing an imported DM frees it for every user, as ibv_free_dm does
        if not self.dm.freed:
            try:
                self.dm.free()
            except SoftRdmaError as ex:
                raise sim.rdma_error("Failed to free device memory", ex) from None
