"""The device's network boundary (:class:`Network` / :class:`Link`) and the
networks behind it: the in-process simulated :class:`Fabric` and RoCEv2
over real UDP sockets (:class:`UdpNetwork`); interface lookup and pcap.

Kernel counterparts: the wire, ``drivers/infiniband/sw/rxe/rxe_net.c``.
"""

from softrdma.fabric.inproc import Fabric, FabricError, Faults
from softrdma.fabric.link import Link, LinkReceiver, Network
from softrdma.fabric.udp import LinkError, UdpNetwork

__all__ = [
    "Fabric",
    "FabricError",
    "Faults",
    "Link",
    "LinkError",
    "LinkReceiver",
    "Network",
    "UdpNetwork",
]
