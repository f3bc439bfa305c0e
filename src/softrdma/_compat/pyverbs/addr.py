"""``pyverbs.addr``: GIDs, global routes, address handle attributes and
address handles (``union ibv_gid``, ``struct ibv_global_route``,
``struct ibv_ah_attr``, ``ibv_create_ah``, ``ibv_destroy_ah``).

An AH becomes a softrdma :class:`~softrdma.verbs.ah.AddressHandle` whose
destination is the GID's IPv4 address; on a RoCE port an AH must carry a
GRH (``is_global``), as ``ibv_create_ah`` requires.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import pyverbs.enums as e
from pyverbs import _softrdma as sim
from pyverbs.base import PyverbsCM, PyverbsObject
from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from softrdma.errors import SoftRdmaError
from softrdma.verbs.ah import AddressHandle, AhAttr, ah_attr_from_grh

if TYPE_CHECKING:
    from pyverbs.pd import PD

__all__ = ["AH", "GID", "AHAttr", "GlobalRoute"]


class GID(PyverbsObject):
    """``union ibv_gid``; ``gid`` is its text, eight groups of four hex
    digits (``fe80:0000:...``)."""

    def __init__(self, val: str | None = None) -> None:
        super().__init__()
        self.raw = bytes(16)
        if val is not None:
            self.gid = val

    @classmethod
    def from_raw(cls, raw: bytes) -> GID:
        """A GID of 16 bytes in network order."""
        if len(raw) != 16:
            raise PyverbsUserError(f"A GID is 16 bytes, not {len(raw)}")
        gid = cls()
        gid.raw = bytes(raw)
        return gid

    @property
    def gid(self) -> str:
        h = self.raw.hex()
        return ":".join(h[i : i + 4] for i in range(0, 32, 4))

    @gid.setter
    def gid(self, val: str) -> None:
        groups = val.split(":")
        if len(groups) != 8 or any(len(g) != 4 for g in groups):
            raise PyverbsUserError(f"Invalid GID value ({groups})")
        try:
            self.raw = bytes.fromhex("".join(groups))
        except ValueError:
            raise PyverbsUserError(f"Invalid GID value ({groups})") from None

    def __str__(self) -> str:
        return self.gid

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GID) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)


class GlobalRoute(PyverbsObject):
    """``struct ibv_global_route``: what goes in the GRH (for RoCEv2, the
    IP header) of the packets sent with it."""

    def __init__(
        self,
        dgid: GID | None = None,
        flow_label: int = 0,
        sgid_index: int = 0,
        hop_limit: int = 1,
        traffic_class: int = 0,
    ) -> None:
        super().__init__()
        self.dgid = dgid if dgid is not None else GID()
        self.flow_label = flow_label
        self.sgid_index = sgid_index
        self.hop_limit = hop_limit
        self.traffic_class = traffic_class

    def __str__(self) -> str:
        return (
            f"Global route: dgid {self.dgid}, flow label {self.flow_label}, sgid index "
            f"{self.sgid_index}, hop limit {self.hop_limit}, traffic class {self.traffic_class}"
        )


class AHAttr(PyverbsObject):
    """``struct ibv_ah_attr``; the GRH fields read through to ``gr`` and
    need ``is_global``."""

    def __init__(
        self,
        dlid: int = 0,
        sl: int = 0,
        src_path_bits: int = 0,
        static_rate: int = 0,
        is_global: int = 0,
        port_num: int = 1,
        gr: GlobalRoute | None = None,
    ) -> None:
        super().__init__()
        self.dlid = dlid
        self.sl = sl
        self.src_path_bits = src_path_bits
        self.static_rate = static_rate
        self.is_global = is_global
        self.port_num = port_num
        self.gr = gr if gr is not None else GlobalRoute()

    def _global(self) -> GlobalRoute:
        if not self.is_global:
            raise PyverbsUserError("This AH is not global")
        return self.gr

    @property
    def dgid(self) -> GID:
        return self._global().dgid

    @dgid.setter
    def dgid(self, val: GID | str) -> None:
        self.is_global = 1
        self.gr.dgid = val if isinstance(val, GID) else GID(val)

    @property
    def sgid_index(self) -> int:
        return self._global().sgid_index

    @sgid_index.setter
    def sgid_index(self, val: int) -> None:
        self.is_global = 1
        self.gr.sgid_index = val

    @property
    def flow_label(self) -> int:
        return self._global().flow_label

    @flow_label.setter
    def flow_label(self, val: int) -> None:
        self.is_global = 1
        self.gr.flow_label = val

    @property
    def traffic_class(self) -> int:
        return self._global().traffic_class

    @traffic_class.setter
    def traffic_class(self, val: int) -> None:
        self.is_global = 1
        self.gr.traffic_class = val

    @property
    def hop_limit(self) -> int:
        return self._global().hop_limit

    @hop_limit.setter
    def hop_limit(self, val: int) -> None:
        self.is_global = 1
        self.gr.hop_limit = val

    def to_softrdma(self, what: str) -> AhAttr:
        """The softrdma ``rdma_ah_attr`` of this one. Raises
        :class:`PyverbsRDMAError` (``EINVAL``) without a GRH — a RoCE
        address needs one — or with values out of range."""
        if not self.is_global:
            raise PyverbsRDMAError(f"{what}: a RoCE address needs a GRH", errno.EINVAL)
        if self.port_num != 1 or self.gr.sgid_index != 0:
            raise PyverbsRDMAError(
                f"{what}: port {self.port_num} / sgid index {self.gr.sgid_index} do not exist",
                errno.EINVAL,
            )
        try:
            # index 1 of the device's kernel GID table is the RoCEv2 GID that
            # index 0 of the port's user-visible table shows
            return AhAttr(
                dgid=self.gr.dgid.raw,
                sgid_index=1,
                hop_limit=self.gr.hop_limit,
                traffic_class=self.gr.traffic_class,
                flow_label=self.gr.flow_label,
            )
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None


class AH(PyverbsCM):
    """``struct ibv_ah``: ``AH(pd, attr=AHAttr)`` (``ibv_create_ah``), or
    ``AH(pd, wc=WC, grh=addr, port_num=1)`` (``ibv_create_ah_from_wc``):
    the address that answers a UD receive, from the 40-byte network header
    at user address ``grh`` (the start of the receive buffer)."""

    def __init__(self, pd: PD, **kwargs: Any) -> None:
        super().__init__()
        what = "Failed to create AH"
        attr = kwargs.get("attr")
        if attr is None:
            attr = self._from_wc(kwargs.get("wc"), kwargs.get("grh"), kwargs.get("port_num", 1))
        if not isinstance(attr, AHAttr):
            raise PyverbsUserError("AH needs an AHAttr, or a WC and its GRH")
        self.pd = pd
        softattr = attr.to_softrdma(what)
        self.ah: AddressHandle = AddressHandle(pd.alive(what), softattr)
        self.ah_attr = attr
        pd.add_ref(self)

    @staticmethod
    def _from_wc(wc: Any, grh: Any, port_num: int) -> AHAttr:
        what = "Failed to create AH from WC"
        if wc is None or not isinstance(grh, int):
            raise PyverbsUserError("AH needs attr=AHAttr, or wc=WC with grh=<address>")
        if not wc.wc_flags & e.IBV_WC_GRH:  # a RoCE receive always has one
            raise PyverbsRDMAError(f"{what}: the completion has no GRH", errno.EINVAL)
        try:
            header = sim.process().mm.read(grh, 40)
            got = ah_attr_from_grh(header, port_num)
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        gr = GlobalRoute(
            GID.from_raw(got.dgid), got.flow_label, 0, got.hop_limit, got.traffic_class
        )
        return AHAttr(is_global=1, port_num=port_num, gr=gr)

    def _release(self) -> None:
        self.ah.destroy()
