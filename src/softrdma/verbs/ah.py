"""Address handles for UD (``struct rdma_ah_attr``, ``rdma_create_ah``)."""

from __future__ import annotations

import errno
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
