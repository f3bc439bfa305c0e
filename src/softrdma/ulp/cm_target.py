"""The RDMA CM side an RDMA target shares, whatever its protocol.

Kernel counterparts: what ``ib_srpt`` and ``ib_isert`` each do for
themselves — a listening ``rdma_cm_id`` (``srpt_rdma_cm_handler`` /
``isert_cma_handler`` receive its events), one PD per device a connection
arrives on (``srpt_device`` / ``isert_device``), and the events of a
connection's own ``cm_id`` after the CONNECT_REQUEST: ESTABLISHED, then a
DREQ (answered with a DREP) or an error, after which the connection's
resources are released.

A target derives from :class:`CmTargetPort`, answers a CONNECT_REQUEST in
``_connect_request`` and keeps its connections in ``_conns``.
"""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address
from typing import Generic, Protocol, TypeVar

from softrdma.cm.cma import RdmaCmError, RdmaCmEvent, RdmaCmEventType, RdmaCmId, RdmaEventChannel
from softrdma.memory.host import Host
from softrdma.verbs.device import IbDevice, ib_devices
from softrdma.verbs.pd import ProtectionDomain

__all__ = ["CmTargetConn", "CmTargetPort", "target_devices"]


class CmTargetConn(Protocol):
    """What :class:`CmTargetPort` asks of a connection (an SRP channel, an
    iSER connection)."""

    @property
    def cm_id(self) -> RdmaCmId: ...

    @property
    def disconnecting(self) -> bool:
        """This side has sent its DREQ already."""
        ...

    def established(self) -> None: ...

    def close(self) -> None: ...

    def release(self) -> None: ...


C = TypeVar("C", bound=CmTargetConn)

_GONE = (
    RdmaCmEventType.DISCONNECTED,
    RdmaCmEventType.REJECTED,
    RdmaCmEventType.UNREACHABLE,
    RdmaCmEventType.DEVICE_REMOVAL,
)


def target_devices(host: Host) -> list[IbDevice]:
    """The host's RDMA devices; ``ENODEV`` if it has none."""
    devices = ib_devices(host)
    if not devices:
        raise RdmaCmError(19, f"no RDMA device on {host!r}")
    return devices


class CmTargetPort(Generic[C]):
    """A target's listener on the RDMA CM at ``addr:port``, its PDs and
    its connections. Call ``__init__`` last in a subclass's: events may
    arrive from the moment it listens."""

    def __init__(self, host: Host, addr: str | IPv4Address, port: int) -> None:
        self._conns: list[C] = []
        self._pds: dict[IbDevice, ProtectionDomain] = {}
        self.channel = RdmaEventChannel(host, handler=self._cm_event)
        self.listener = RdmaCmId(self.channel)
        self.listener.bind_addr(addr, port)
        self.listener.listen()
        self.port = port

    def close(self) -> None:
        """Disconnect every initiator (a DREQ each) and stop listening."""
        for c in list(self._conns):
            c.close()
            c.release()
        self.listener.destroy()
        for pd in self._pds.values():
            pd.dealloc()
        self._pds.clear()

    def disconnect_all(self) -> None:
        """A DREQ to every initiator; each connection is released when its
        DREP (or the CM's timeout) comes."""
        for c in list(self._conns):
            c.close()

    @property
    def idle(self) -> bool:
        """No connection left."""
        return not self._conns

    def _connect_request(self, ev: RdmaCmEvent) -> None:
        raise NotImplementedError

    def _forget(self, c: C) -> None:
        if c in self._conns:
            self._conns.remove(c)

    def _pd(self, dev: IbDevice) -> ProtectionDomain:
        pd = self._pds.get(dev)
        if pd is None:
            pd = self._pds[dev] = dev.alloc_pd()
        return pd

    def _cm_event(self, ev: RdmaCmEvent) -> None:
        if ev.event is RdmaCmEventType.CONNECT_REQUEST:
            self._connect_request(ev)
            return
        c = next((x for x in self._conns if x.cm_id is ev.id), None)
        if c is None:
            return
        if ev.event is RdmaCmEventType.ESTABLISHED:
            c.established()
        elif ev.event in _GONE:
            if not c.disconnecting:
                with contextlib.suppress(RdmaCmError):
                    ev.id.disconnect()  # answer the DREQ
            c.release()
