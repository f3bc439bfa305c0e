"""Address handles for UD (``struct rdma_ah_attr``, ``rdma_create_ah``)."""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from softrdma.verbs.errors import VerbsError

if TYPE_CHECKING:
    from softrdma.verbs.pd import ProtectionDomain


@dataclass(frozen=True)
class AhAttr:
    """``struct rdma_ah_attr`` for RoCEv2: the destination GID and the GRH
    fields. ``dgid`` is 16 bytes (``::ffff:a.b.c.d`` for IPv4)."""

    dgid: bytes
    sgid_index: int = 1
    hop_limit: int = 64
    traffic_class: int = 0
    flow_label: int = 0
    port_num: int = 1

    def __post_init__(self) -> None:
        if len(self.dgid) != 16:
            raise VerbsError(errno.EINVAL, "dgid must be 16 bytes")
        if not 0 <= self.flow_label < 1 << 20 or not 0 <= self.hop_limit < 256:
            raise VerbsError(errno.EINVAL, "flow_label / hop_limit out of range")


class AddressHandle:
    """``struct ib_ah``."""

    def __init__(self, pd: ProtectionDomain, attr: AhAttr) -> None:
        self.pd = pd
        self.attr = attr
        self.destroyed = False
        pd.usecnt += 1

    def destroy(self) -> None:
        """``rdma_destroy_ah``."""
        if not self.destroyed:
            self.destroyed = True
            self.pd.usecnt -= 1


def create_ah(pd: ProtectionDomain, attr: AhAttr) -> AddressHandle:
    """``rdma_create_ah``."""
    return AddressHandle(pd, attr)


_V4_MAPPED = bytes(10) + b"\xff\xff"
_IPV4_WORDS = struct.Struct(">10H")


def _ipv4_header_ok(hdr: bytes | bytearray | memoryview) -> bool:
    """An IPv4 header without options whose checksum is right
    (``ib_get_rdma_header_version``'s test)."""
    if len(hdr) < 20 or hdr[0] != 0x45:
        return False
    total: int = sum(_IPV4_WORDS.unpack_from(hdr))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def ah_attr_from_grh(grh: bytes | bytearray | memoryview, port_num: int = 1) -> AhAttr:
    """The address handle attributes that answer a UD receive: its source as
    the destination (``ib_init_ah_attr_from_wc`` with RoCEv2's
    ``ib_get_rdma_header_version``). ``grh`` is the 40-byte network header in
    front of the payload: an IPv4 header in its last 20 bytes (RoCEv2 over
    IPv4), or an IPv6 header / GRH. Raises :class:`VerbsError` when it is
    neither."""
    if len(grh) < 40:
        raise VerbsError(errno.EINVAL, f"network header of {len(grh)} bytes: a GRH is 40")
    ip4 = grh[20:40]
    if _ipv4_header_ok(ip4):
        return AhAttr(
            dgid=_V4_MAPPED + bytes(ip4[12:16]),
            traffic_class=ip4[1],
            port_num=port_num,
        )
    if grh[0] >> 4 == 6:
        word = int.from_bytes(grh[0:4], "big")
        return AhAttr(
            dgid=bytes(grh[8:24]),
            traffic_class=(word >> 20) & 0xFF,
            flow_label=word & 0xFFFFF,
            port_num=port_num,
        )
    raise VerbsError(errno.EINVAL, "network header is neither IPv4 nor IPv6")
