"""``pyverbs.cmid``: the RDMA connection manager (librdmacm) is not available on pyverbs' softrdma devices yet: every constructor raises ``EOPNOTSUPP``."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class

__all__ = ["CMID", "AddrInfo", "CMEvent", "CMEventChannel", "ConnParam", "JoinMCAttrEx", "UDParam"]

CMID = unsupported_class("CMID", "RDMA CM", __name__)
CMEvent = unsupported_class("CMEvent", "RDMA CM", __name__)
CMEventChannel = unsupported_class("CMEventChannel", "RDMA CM", __name__)
AddrInfo = unsupported_class("AddrInfo", "RDMA CM", __name__)
ConnParam = unsupported_class("ConnParam", "RDMA CM", __name__)
UDParam = unsupported_class("UDParam", "RDMA CM", __name__)
JoinMCAttrEx = unsupported_class("JoinMCAttrEx", "RDMA CM multicast", __name__)
