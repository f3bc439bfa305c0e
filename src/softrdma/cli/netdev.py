"""The device a command-line tool opens on the real network, from the same
options for every tool (``-d``, ``--ip``, ``--udp-port``): what
``ibv_get_device_list`` + ``ibv_open_device`` give an rdma-core tool.

Devices (``-d``):

* ``rxe0`` — a CPU-copy device like Linux Soft-RoCE (virtual DMA: its DMA
  addresses are kernel virtual addresses);
* ``hca0`` — a hardware HCA behind an IOMMU (its DMA addresses are IOVAs).

Each binds one IPv4 address of this host on UDP port 4791 (``--ip``;
default: the address the kernel would use to reach the peer).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from softrdma.dma.platform import Platform
from softrdma.drivers.hca import HwHca
from softrdma.drivers.roce import RoceDevice
from softrdma.drivers.rxe import SoftRoce
from softrdma.fabric.netif import route_source
from softrdma.fabric.udp import UdpNetwork
from softrdma.memory.host import Host, MiB
from softrdma.transport.roce import ROCE_V2_UDP_DPORT

__all__ = ["DEVICES", "OpenDevice", "add_device_options", "open_device", "parse_int"]

#: The devices a tool can open, by name, and what they are.
DEVICES: dict[str, str] = {
    "rxe0": "CPU-copy device (Soft-RoCE model: virtual DMA)",
    "hca0": "hardware HCA behind an IOMMU (DMA through IOVAs)",
}
#: The simulated host memory behind a tool's device (touched lazily).
HOST_MEMORY = 1024 * MiB


def parse_int(text: str) -> int:
    """An integer as C's ``strtol(text, NULL, 0)`` reads it (``0x10``, ``010``)."""
    try:
        if len(text) > 1 and text[0] == "0" and text[1] not in "xXbBoO":
            return int(text, 8)
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``-d``, ``--ip`` and ``--udp-port``, shared by every network tool."""
    parser.add_argument(
        "-d",
        "--ib-dev",
        default="rxe0",
        metavar="DEV",
        help=f"use device DEV: {', '.join(DEVICES)} (default rxe0)",
    )
    parser.add_argument(
        "--ip",
        metavar="ADDR",
        help="local IPv4 address for RoCE (default: the one that routes to the peer)",
    )
    parser.add_argument(
        "--udp-port",
        type=parse_int,
        default=ROCE_V2_UDP_DPORT,
        metavar="PORT",
        help=f"RoCEv2 UDP port (default {ROCE_V2_UDP_DPORT}; rxe peers need 4791)",
    )


@dataclass
class OpenDevice:
    """A device and the network it is on; :meth:`close` releases both."""

    device: RoceDevice
    network: UdpNetwork

    def close(self) -> None:
        """Unregister the device and stop the network's progress thread."""
        self.device.unregister()
        self.network.close()


def local_address(args: argparse.Namespace, peer: str | None) -> IPv4Address:
    """``--ip``, else the source address the kernel picks for ``peer``, else
    127.0.0.1."""
    if args.ip:
        return IPv4Address(args.ip)
    if peer is not None:
        return route_source(peer, args.udp_port)
    return IPv4Address("127.0.0.1")


def open_device(
    args: argparse.Namespace, ip: IPv4Address, *, netdev_mtu: int | None = None
) -> OpenDevice:
    """Open the device named by ``-d`` on ``ip``. Raises
    :class:`~softrdma.fabric.udp.LinkError` (address not on this host,
    port taken) or :class:`KeyError` (no such device)."""
    make: Callable[[UdpNetwork], RoceDevice]
    host = Host(HOST_MEMORY, name=f"host-{ip}")
    if args.ib_dev == "rxe0":

        def make(net: UdpNetwork) -> RoceDevice:
            return SoftRoce(Platform(host), net, ip, name="rxe0", netdev_mtu=netdev_mtu)

    elif args.ib_dev == "hca0":

        def make(net: UdpNetwork) -> RoceDevice:
            return HwHca(Platform(host, iommu=True), net, ip, name="hca0", netdev_mtu=netdev_mtu)

    else:
        raise KeyError(args.ib_dev)
    network = UdpNetwork(port=args.udp_port)
    try:
        return OpenDevice(make(network), network)
    except BaseException:
        network.close()
        raise
