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
  hardware HCA with direct DMA). Every device has one port, ACTIVE, link
  layer Ethernet, with a link-local and a RoCEv2 GID (``::ffff:127.0.0.N``
  for the N-th device). The DMA-API debug checker watches every device.
* **Network and time.** The devices share an in-process fabric on
  simulated time, so traffic between contexts is deterministic and the
  hardware runs whenever a CQ is polled or a completion event is awaited.
  A forked child gets its own copy of the whole machine (as it gets its own
  copy of process memory), so nothing is shared between processes.

Contexts of one device share the device — its QP numbers, its keys — as
two ``ibv_open_device`` calls in one process share the hardware.
"""

from __future__ import annotations

import errno
import os
import weakref
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Protocol

from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from softrdma.dma.platform import Platform
from softrdma.dma.types import DmaBackend
from softrdma.drivers.hca import HwHca
from softrdma.drivers.roce import RoceDevice
from softrdma.drivers.rxe import SoftRoce
from softrdma.errors import SoftRdmaError
from softrdma.fabric.inproc import Fabric
from softrdma.memory.host import GiB, Host
from softrdma.memory.mm import MmStruct
from softrdma.verbs.device import IbEvent
from softrdma.verbs.errors import VerbsError

__all__ = [
    "DEFAULT_DEVICES",
    "DEVICE_KINDS",
    "ENV_DEVICES",
    "DeviceSpec",
    "EventSink",
    "SimProcess",
    "parse_devices",
    "process",
    "rdma_error",
]

#: The environment variable that configures the devices of the process.
ENV_DEVICES = "SOFTRDMA_PYVERBS_DEVICES"
#: The devices when it is unset.
DEFAULT_DEVICES = "rxe0:cpu"
#: Device kinds and what they model.
DEVICE_KINDS: dict[str, str] = {
    "cpu": "CPU-copy device (Soft-RoCE model: virtual DMA)",
    "iommu": "hardware HCA behind an IOMMU (DMA through IOVAs)",
    "swiotlb": "hardware HCA with bounce buffers (DMA through swiotlb slots)",
    "direct": "hardware HCA with direct DMA (bus addresses)",
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

    def __init__(self, specs: list[DeviceSpec]) -> None:
        self.pid = os.getpid()
        self.host = Host(HOST_MEMORY, name="pyverbs-host")
        self.mm = MmStruct(self.host, name=f"pid {self.pid}")
        self.fabric = Fabric()
        self.specs = specs
        needs_iommu = any(s.kind == "iommu" for s in specs)
        self.platform = Platform(self.host, iommu=needs_iommu, dma_debug=True)
        self.devices: dict[str, RoceDevice] = {}
        for i, spec in enumerate(specs):
            ip = IPv4Address("127.0.0.1") + i
            dev: RoceDevice
            if spec.kind == "cpu":
                dev = SoftRoce(self.platform, self.fabric, ip, name=spec.name)
            else:
                backend = {
                    "iommu": DmaBackend.IOMMU,
                    "swiotlb": DmaBackend.SWIOTLB,
                    "direct": DmaBackend.DIRECT,
                }[spec.kind]
                dev = HwHca(self.platform, self.fabric, ip, name=spec.name, backend=backend)
            self.devices[spec.name] = dev
            dev.register_event_handler(self._on_event)
        self.owners: weakref.WeakKeyDictionary[object, EventSink] = weakref.WeakKeyDictionary()
        """QP or CQ -> the context that created it."""
        self.contexts: dict[str, weakref.WeakSet[EventSink]] = {
            name: weakref.WeakSet() for name in self.devices
        }

    def _on_event(self, event: IbEvent) -> None:
        target = event.qp if event.qp is not None else event.cq
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
        _PROCESS = SimProcess(parse_devices(os.environ.get(ENV_DEVICES, DEFAULT_DEVICES)))
    return _PROCESS


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
