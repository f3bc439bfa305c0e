"""The RDMA CM header in front of the user's private data, and RDMA CM
service IDs.

Kernel counterparts: ``drivers/infiniband/core/cma.c`` (``struct cma_hdr``,
``union cma_ip_addr``, ``cma_format_hdr``, ``cma_get_ip_ver`` /
``cma_set_ip_ver``, ``cma_get_service_id``, ``CMA_VERSION``) and
``include/rdma/rdma_cm.h`` (``enum rdma_ucm_port_space``,
``RDMA_IB_IP_PS_*``); librdmacm writes the same header.

An IP-addressed RDMA CM connection puts this 36-byte header at the start of
the CM REQ (or SIDR_REQ) private data, so the passive side learns the
active side's IP addresses and *source* port; the destination port travels
in the service ID. All fields big-endian::

    0  cma_version (0x00)    1  ip_version (high nibble: 4 or 6)
    2  port (16, source)
    4  src_addr (16)         20 dst_addr (16)

An IPv4 address sits in the last 4 bytes of its 16 (the first 12 are zero).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from softrdma.mad.header import MadError, MalformedMad
from softrdma.transport.headers import BytesLike

__all__ = [
    "CMA_HDR_SIZE",
    "CMA_VERSION",
    "CmaHdr",
    "RdmaPortSpace",
    "rdma_ps_service_id",
    "service_id_port_space",
]

CMA_HDR_SIZE: Final = 36
"""``sizeof(struct cma_hdr)``."""
CMA_VERSION: Final = 0x00
"""``CMA_VERSION``: the only header version."""

_HDR = struct.Struct(">BBH16s16s")
_V4_PAD = bytes(12)
_PS_MASK = 0xFFFF_FFFF_FFFF_0000
"""``RDMA_IB_IP_PS_MASK``."""


class RdmaPortSpace(enum.IntEnum):
    """``enum rdma_ucm_port_space``: the port space an RDMA CM ID binds in;
    the high bits of its IB service IDs."""

    IPOIB = 0x0002
    TCP = 0x0106
    UDP = 0x0111
    IB = 0x013F


@dataclass(frozen=True, slots=True)
class CmaHdr:
    """``struct cma_hdr`` (cma.c ``cma_format_hdr`` writes it, ``cma_save_ip_info``
    reads it): the active side's source address and port and the
    destination address, both of one family."""

    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    src_port: int
    version: int = CMA_VERSION

    @property
    def ip_version(self) -> int:
        """4 or 6 (``cma_get_ip_ver``)."""
        return self.src.version

    def encode(self) -> bytes:
        """The 36 header bytes. Raises :class:`MadError` if ``src`` and ``dst``
        are of different families, or ``src_port`` / ``version`` is out of range."""
        if self.src.version != self.dst.version:
            raise MadError(
                f"CMA header mixes IPv{self.src.version} source {self.src} "
                f"with IPv{self.dst.version} destination {self.dst}"
            )
        if not 0 <= self.src_port <= 0xFFFF:
            raise MadError(f"CMA header port {self.src_port}: 16 bits")
        if not 0 <= self.version <= 0xFF:
            raise MadError(f"CMA header version {self.version}: 8 bits")
        if isinstance(self.src, IPv4Address):
            src, dst = _V4_PAD + self.src.packed, _V4_PAD + self.dst.packed
        else:
            src, dst = self.src.packed, self.dst.packed
        return _HDR.pack(self.version, self.src.version << 4, self.src_port, src, dst)

    @classmethod
    def decode(cls, data: BytesLike) -> CmaHdr:
        """The header at the start of ``data`` (the REQ private data). Raises
        :class:`MalformedMad` if it is shorter than 36 bytes, its version is not
        0 or its IP version nibble is neither 4 nor 6 (cma.c ``cma_save_ip_info``
        rejects those with -EINVAL / -EAFNOSUPPORT). As the kernel does, the low
        nibble of ``ip_version`` and the 12 bytes in front of an IPv4
        address are ignored."""
        if len(data) < CMA_HDR_SIZE:
            raise MalformedMad(f"CMA header of {len(data)} bytes: it is {CMA_HDR_SIZE} bytes")
        version, ip_ver, port, src, dst = _HDR.unpack_from(data)
        if version != CMA_VERSION:
            raise MalformedMad(f"CMA header version {version:#04x}: only {CMA_VERSION:#04x} exists")
        ip = ip_ver >> 4
        if ip == 4:
            return cls(IPv4Address(src[12:]), IPv4Address(dst[12:]), port, version)
        if ip == 6:
            return cls(IPv6Address(src), IPv6Address(dst), port, version)
        raise MalformedMad(f"CMA header IP version {ip} (byte {ip_ver:#04x}): must be 4 or 6")


def rdma_ps_service_id(port_space: int, port: int) -> int:
    """The IB service ID of ``port`` in ``port_space`` (cma.c
    ``cma_get_service_id``: ``(ps << 16) + port``); TCP port 7174 gives
    0x0000000001061C06. Raises :class:`MadError` for an unknown port space or
    a port outside 16 bits."""
    if port_space not in RdmaPortSpace._value2member_map_:
        known = ", ".join(f"{p.name} {p.value:#06x}" for p in RdmaPortSpace)
        raise MadError(f"RDMA CM port space {port_space:#x}: not one of {known}")
    if not 0 <= port <= 0xFFFF:
        raise MadError(f"RDMA CM port {port}: 16 bits")
    return (port_space << 16) + port


def service_id_port_space(service_id: int) -> tuple[RdmaPortSpace, int]:
    """(port space, port) of an RDMA CM service ID, the inverse of
    :func:`rdma_ps_service_id` (cma.c ``rdma_ps_from_service_id`` /
    ``cma_port_from_service_id``). Raises :class:`MalformedMad` unless the
    ID, under ``RDMA_IB_IP_PS_MASK``, is ``(ps << 16)`` for one of the
    :class:`RdmaPortSpace` values (rdma_cm.h defines ``RDMA_IB_IP_PS_*`` for
    TCP, UDP and IB; IPOIB is accepted as well)."""
    ps = (service_id & _PS_MASK) >> 16
    if not 0 <= service_id <= 0xFFFF_FFFF_FFFF_FFFF or ps not in RdmaPortSpace._value2member_map_:
        raise MalformedMad(f"service ID {service_id:#018x}: not in an RDMA CM port space")
    return RdmaPortSpace(ps), service_id & 0xFFFF
