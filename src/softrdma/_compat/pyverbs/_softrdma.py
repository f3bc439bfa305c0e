"""The simulated machine behind pyverbs: this process is a user process on
a softrdma host, with RDMA devices on an in-process RoCEv2 network.

* **Host and memory.** One :class:`~softrdma.memory.host.Host` per
  process (1 GiB, touched lazily) and one user address space on it
  (:class:`~softrdma.memory.mm.MmStruct`). Every address pyverbs hands out
  — ``MR.buf``, ``mem_alloc`` results — is a user virtual address in that
  space; registration pins its pages and DMA-maps them for the device
  (:mod:`softrdma.verbs.umem`).
* **Devices.** ``SOFTRDMA_PYVERBS_DEVICES`` lists them as
  ``name:kind[,name:kind...]``; the default is ``rxe0:cpu``. Kinds:
  ``cpu`` (a CPU-copy device like rxe: virtual DMA), ``iommu`` (a
  hardware HCA behind an IOMMU: its DMA addresses are IOVAs), ``swiotlb``
  (a hardware HCA whose DMA bounces through swiotlb slots), ``direct`` (a
  hardware HCA with direct DMA), ``coco`` (a hardware HCA in a
  confidential-computing guest: DMA forced through swiotlb, so it reports
  ``IBV_DEVICE_CC_DMA_BOUNCE``, refuses to register pinned private memory
  and takes shared-heap buffers, ``ibv_alloc_buf`` on a CC parent domain).
  Every device has one port, ACTIVE, link
  layer Ethernet, with a link-local and a RoCEv2 GID (``::ffff:127.0.0.N``
  for the N-th device). The DMA-API debug checker watches every device.
* **Network and time.** The devices share an in-process fabric on
  simulated time, so traffic between contexts is deterministic and the
  hardware runs whenever a CQ is polled or a completion event is awaited.
  A forked child gets its own copy of the whole machine (as it gets its own
  copy of process memory), so nothing is shared between processes.
  With ``SOFTRDMA_PYVERBS_NETWORK=udp[:ADDR]`` the devices are on the real
  network instead (RoCEv2 over UDP on loopback or a local address, the
  first device at ``ADDR``, 127.0.0.1 by default, the next at ``ADDR+1``),
  on real time with a progress thread: processes reach each other, e.g.
  through the RDMA CM (:mod:`pyverbs.cmid`). A forked child builds its
  own machine on first use, with its own progress thread (threads do not
  survive ``fork``), and closes its copies of the parent's sockets. Several
  processes may use one address, as processes share a host's device: the
  first carries it and the others join it
  (:mod:`softrdma.fabric.udp_share`) — rdma-core's CM tests fork a passive
  and an active process that connect from the parent's device to itself.

Contexts of one device share the device — its QP numbers, its keys — as
two ``ibv_open_device`` calls in one process share the hardware.
"""

from __future__ import annotations

import atexit
import errno
import os
import threading
import time
import weakref
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Protocol

from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from softrdma.cm.cm_port import cm_route_key
from softrdma.dma.platform import Platform
from softrdma.dma.types import DmaBackend
from softrdma.drivers.hca import HwHca
from softrdma.drivers.roce import RoceDevice
from softrdma.drivers.rxe import SoftRoce
from softrdma.errors import SoftRdmaError
from softrdma.fabric.inproc import Fabric
from softrdma.fabric.udp import UdpNetwork
from softrdma.memory.host import GiB, Host
from softrdma.memory.mm import MmStruct
from softrdma.verbs.device import IbEvent
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.umem import ib_device_set_cc_dma_bounce

__all__ = [
    "DEFAULT_DEVICES",
    "DEVICE_KINDS",
    "ENV_DEVICES",
    "ENV_NETWORK",
    "DeviceSpec",
    "EventSink",
    "SimProcess",
    "device_address",
    "flush_sends",
    "parse_devices",
    "parse_network",
    "process",
    "rdma_error",
]

#: The environment variable that configures the devices of the process.
ENV_DEVICES = "SOFTRDMA_PYVERBS_DEVICES"
#: The environment variable that puts them on the real network (``udp[:ADDR]``).
ENV_NETWORK = "SOFTRDMA_PYVERBS_NETWORK"
#: The devices when it is unset.
DEFAULT_DEVICES = "rxe0:cpu"
#: Device kinds and what they model.
DEVICE_KINDS: dict[str, str] = {
    "cpu": "CPU-copy device (Soft-RoCE model: virtual DMA)",
    "iommu": "hardware HCA behind an IOMMU (DMA through IOVAs)",
    "swiotlb": "hardware HCA with bounce buffers (DMA through swiotlb slots)",
    "direct": "hardware HCA with direct DMA (bus addresses)",
    "coco": "hardware HCA in a CoCo guest (DMA bounce: shared-heap buffers only)",
}
#: The simulated host's memory (touched lazily: unused pages cost nothing).
HOST_MEMORY = 1 * GiB


@dataclass(frozen=True)
class DeviceSpec:
    """One configured device: its name and kind (a key of :data:`DEVICE_KINDS`)."""

    name: str
    kind: str


def parse_devices(text: str) -> list[DeviceSpec]:
    """Parse ``name:kind[,name:kind...]`` (a bare name is a ``cpu`` device).
    Raises :class:`PyverbsUserError` for an unknown kind, a bad or
    duplicate name."""
    specs: list[DeviceSpec] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, kind = item.partition(":")
        kind = kind or "cpu"
        if kind not in DEVICE_KINDS:
            raise PyverbsUserError(
                f"{ENV_DEVICES}: unknown device kind {kind!r} (one of {', '.join(DEVICE_KINDS)})"
            )
        if not name.isidentifier() or any(s.name == name for s in specs):
            raise PyverbsUserError(f"{ENV_DEVICES}: bad or duplicate device name {name!r}")
        specs.append(DeviceSpec(name, kind))
    return specs


class EventSink(Protocol):
    """What receives a device's asynchronous events: a context."""

    @property
    def closed(self) -> bool: ...

    def queue_async_event(self, event: IbEvent) -> None:
        """Keep ``event`` for ``ibv_get_async_event``."""


class SimProcess:
    """The host, the user address space, the network and the devices of
    this process (see the module documentation).

    Asynchronous events (``ib_event``) go where uverbs sends them: an
    event of a QP or CQ to the context that created it (:attr:`owners`),
    any other to every open context of the device (:attr:`contexts`)."""

    def __init__(self, specs: list[DeviceSpec], udp_addr: IPv4Address | None = None) -> None:
        self.pid = os.getpid()
        self.host = Host(HOST_MEMORY, name="pyverbs-host")
        self.mm = MmStruct(self.host, name=f"pid {self.pid}")
        self.udp_addr = udp_addr
        """The first device's address on the real network; None in-process."""
        # On the real network a device is one device for every process
        # using its address, as the kernel's is: the first process to open
        # it carries it, later ones share it (softrdma.fabric.udp_share).
        self.fabric: Fabric | UdpNetwork = (
            Fabric() if udp_addr is None else UdpNetwork(share=True, gsi_route=cm_route_key)
        )
        self.specs = specs
        needs_iommu = any(s.kind == "iommu" for s in specs)
        self.platform = Platform(self.host, iommu=needs_iommu, dma_debug=True)
        self.devices: dict[str, RoceDevice] = {}
        for i, spec in enumerate(specs):
            ip = device_address(udp_addr, i)
            dev: RoceDevice
            if spec.kind == "cpu":
                dev = SoftRoce(self.platform, self.fabric, ip, name=spec.name)
            else:
                backend = {
                    "iommu": DmaBackend.IOMMU,
                    "swiotlb": DmaBackend.SWIOTLB,
                    "coco": DmaBackend.SWIOTLB,
                    "direct": DmaBackend.DIRECT,
                }[spec.kind]
                dev = HwHca(self.platform, self.fabric, ip, name=spec.name, backend=backend)
                if spec.kind == "coco":
                    ib_device_set_cc_dma_bounce(dev)
            self.devices[spec.name] = dev
            dev.register_event_handler(self._on_event)
        self.owners: weakref.WeakKeyDictionary[object, EventSink] = weakref.WeakKeyDictionary()
        """QP or CQ -> the context that created it."""
        self.contexts: dict[str, weakref.WeakSet[EventSink]] = {
            name: weakref.WeakSet() for name in self.devices
        }

    def _on_event(self, event: IbEvent) -> None:
        target = next((t for t in (event.qp, event.cq, event.srq) if t is not None), None)
        if target is not None:
            owner = self.owners.get(target)
            sinks = [] if owner is None else [owner]
        else:
            sinks = list(self.contexts.get(event.device.name, ()))
        for sink in sinks:
            if not sink.closed:
                sink.queue_async_event(event)

    def kind(self, name: str) -> str:
        """The kind of the device called ``name``."""
        return next(s.kind for s in self.specs if s.name == name)


_PROCESS: SimProcess | None = None


def process() -> SimProcess:
    """The machine of this process, built on first use from
    :data:`ENV_DEVICES`."""
    global _PROCESS
    if _PROCESS is None:
        specs = parse_devices(os.environ.get(ENV_DEVICES, DEFAULT_DEVICES))
        _PROCESS = SimProcess(specs, parse_network(os.environ.get(ENV_NETWORK, "")))
    return _PROCESS


def device_address(udp_addr: IPv4Address | None, index: int) -> IPv4Address:
    """The IPv4 address of the ``index``-th device: ``udp_addr + index`` on
    the real network, ``127.0.0.1 + index`` on the in-process fabric."""
    return (udp_addr or IPv4Address("127.0.0.1")) + index


def parse_network(text: str) -> IPv4Address | None:
    """The first device's address of ``udp[:ADDR]`` (127.0.0.1 for a bare
    ``udp``), None for the in-process fabric (empty or ``inproc``). Raises
    :class:`PyverbsUserError` for anything else."""
    text = text.strip()
    if text in ("", "inproc"):
        return None
    kind, _, addr = text.partition(":")
    if kind != "udp":
        raise PyverbsUserError(f"{ENV_NETWORK}: {text!r} is neither inproc nor udp[:ADDR]")
    try:
        return IPv4Address(addr or "127.0.0.1")
    except ValueError:
        raise PyverbsUserError(f"{ENV_NETWORK}: bad address {addr!r}") from None


#: Seconds an exiting process gives its progress thread to send what is
#: queued (a CM's DREP, the last ACKs), as the kernel would after it.
EXIT_FLUSH = 0.5


def _own_udp_network() -> UdpNetwork | None:
    """This process's real network, if its machine is on one (a forked
    child's copy of its parent's machine is not its own)."""
    proc = _PROCESS
    if proc is None or proc.pid != os.getpid() or not isinstance(proc.fabric, UdpNetwork):
        return None
    return proc.fabric


def flush_sends() -> None:
    """On the real network: wait (up to :data:`EXIT_FLUSH` seconds) until
    the progress thread has sent what is queued, as the kernel has a MAD
    once the call that posted it returns. For a last message the process
    may not outlive — ``rdma_reject``, ``rdma_disconnect`` — since a
    ``multiprocessing`` child ends in ``os._exit``, without ``atexit``."""
    network = _own_udp_network()
    if network is None:
        return
    loop = network.scheduler
    done = threading.Event()
    deadline = time.monotonic() + EXIT_FLUSH
    # rounds of "everything queued before this has run": a packet may take
    # a few hops through the loop (send queue, then the link)
    for _ in range(8):
        done.clear()
        try:
            loop.call_soon(done.set)
        except SoftRdmaError:
            return
        if not done.wait(max(0.0, deadline - time.monotonic())):
            break


def _flush_at_exit() -> None:
    network = _own_udp_network()
    if network is not None:
        flush_sends()
        network.close()


atexit.register(_flush_at_exit)


def _after_fork_in_child() -> None:
    # a machine on the real network has a progress thread, which the child
    # lacks: it builds its own on first use, sharing the devices' addresses
    # with the parent (the in-process one is copied)
    global _PROCESS
    if _PROCESS is not None and isinstance(_PROCESS.fabric, UdpNetwork):
        _PROCESS.fabric.close_after_fork()
        _PROCESS = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def rdma_error(msg: str, exc: SoftRdmaError | int) -> PyverbsRDMAError:
    """The :class:`PyverbsRDMAError` of a failed verb: ``exc`` is the
    softrdma error (its errno when it has one, else ``EINVAL``) or an errno.
    """
    if isinstance(exc, int):
        err = exc
    else:
        got = exc.errno if isinstance(exc, VerbsError) else getattr(exc, "errno", errno.EINVAL)
        err = got if isinstance(got, int) else errno.EINVAL
    return PyverbsRDMAError(msg, err)
