"""This host's IPv4 interfaces, as a RoCE device bound to an address needs
them: which netdev holds the address, its MTU and MAC, and which local
address the kernel would use to reach a peer.

Kernel counterparts: rxe's netdev (``rdma link add rxe0 type rxe netdev
eth0``), ``dev->mtu`` (``rxe_set_mtu``), ``ip_route_output_key`` for the
source address. Read with rtnetlink ``RTM_GETADDR`` (no privilege needed)
and the ``SIOCGIFMTU`` / ``SIOCGIFHWADDR`` ioctls, falling back to
``SIOCGIFADDR`` per interface where netlink is unavailable.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

__all__ = ["Interface", "interface_for", "interfaces", "route_source"]

_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B
_SIOCGIFMTU = 0x8921
_SIOCGIFHWADDR = 0x8927

_NLMSGHDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class Interface:
    """One IPv4 address of a netdev."""

    name: str
    index: int
    address: IPv4Address
    network: IPv4Network
    mtu: int
    mac: bytes


def _ioctl(name: str, request: int, size: int = 40) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(
            s.fileno(), request, struct.pack("16s", name.encode()[:15]).ljust(size, b"\0")
        )


def _mtu_mac(name: str) -> tuple[int, bytes]:
    try:
        mtu = struct.unpack_from("=i", _ioctl(name, _SIOCGIFMTU), 16)[0]
    except OSError:
        mtu = 1500
    try:
        mac = _ioctl(name, _SIOCGIFHWADDR)[18:24]
    except OSError:
        mac = bytes(6)
    return mtu, mac


def _netlink_addresses() -> list[tuple[int, IPv4Address, int]]:
    """(ifindex, address, prefix length) of every IPv4 address (RTM_GETADDR)."""
    found: list[tuple[int, IPv4Address, int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(2.0)
        body = _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
        nl.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), _RTM_GETADDR,
                               _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body)  # fmt: skip
        for _ in range(1000):  # bounded: a dump is a few datagrams
            data = nl.recv(65536)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    return found
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    raise OSError(errno.EIO, "RTM_GETADDR failed")
                if kind == _RTM_NEWADDR:
                    found.extend(_parse_newaddr(data[off + _NLMSGHDR.size : off + length]))
                off += (length + 3) & ~3
    return found


def _parse_newaddr(msg: bytes) -> list[tuple[int, IPv4Address, int]]:
    family, prefixlen, _, _, index = _IFADDRMSG.unpack_from(msg)
    if family != socket.AF_INET:
        return []
    attrs: dict[int, bytes] = {}
    off = _IFADDRMSG.size
    while off + _RTATTR.size <= len(msg):
        rta_len, rta_type = _RTATTR.unpack_from(msg, off)
        if rta_len < _RTATTR.size:
            break
        attrs[rta_type] = msg[off + _RTATTR.size : off + rta_len]
        off += (rta_len + 3) & ~3
    addr = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
    if addr is None or len(addr) != 4:
        return []
    return [(index, IPv4Address(addr), prefixlen)]


def _ioctl_addresses() -> list[tuple[int, IPv4Address, int]]:
    """Primary IPv4 address of each interface (SIOCGIFADDR), if netlink fails."""
    found = []
    for index, name in socket.if_nameindex():
        try:
            addr = IPv4Address(_ioctl(name, _SIOCGIFADDR)[20:24])
            mask = IPv4Address(_ioctl(name, _SIOCGIFNETMASK)[20:24])
        except OSError:
            continue
        found.append((index, addr, bin(int(mask)).count("1")))
    return found


def interfaces() -> list[Interface]:
    """Every IPv4 address of this host (of this network namespace)."""
    try:
        raw = _netlink_addresses()
    except OSError:
        raw = _ioctl_addresses()
    result = []
    for index, addr, plen in raw:
        try:
            name = socket.if_indextoname(index)
        except OSError:
            continue
        mtu, mac = _mtu_mac(name)
        net = IPv4Network((int(addr), plen), strict=False)
        result.append(Interface(name, index, addr, net, mtu, mac))
    return result


def interface_for(ip: IPv4Address) -> Interface | None:
    """The interface holding ``ip``: its own address first, else the one
    whose local prefix contains it (``127.0.0.2`` belongs to ``lo`` by its
    ``127.0.0.0/8``)."""
    found = interfaces()
    for itf in found:
        if itf.address == ip:
            return itf
    if ip.is_loopback:  # the kernel's "local 127.0.0.0/8" route
        for itf in found:
            if ip in itf.network:
                return itf
    return None


def route_source(peer: str | IPv4Address, port: int = 4791) -> IPv4Address:
    """The local address the kernel would send from to reach ``peer`` (a
    connected UDP socket's name; nothing is sent). Raises :class:`OSError`
    (``ENETUNREACH``) when there is no route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((str(peer), port))
        return IPv4Address(s.getsockname()[0])
