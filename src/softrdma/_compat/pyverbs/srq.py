"""``pyverbs.srq``: shared receive queues (``ibv_create_srq``), not supported by softrdma's devices (``max_srq`` is 0): creating one raises ``EOPNOTSUPP``."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class, value_class

__all__ = ["SRQ", "OpsWr", "SrqAttr", "SrqInitAttr", "SrqInitAttrEx"]

SRQ = unsupported_class("SRQ", "Shared receive queues", __name__)
SrqAttr = value_class("SrqAttr", "Shared receive queues", __name__)
SrqInitAttr = value_class("SrqInitAttr", "Shared receive queues", __name__)
SrqInitAttrEx = value_class("SrqInitAttrEx", "Shared receive queues", __name__)
OpsWr = unsupported_class("OpsWr", "Tag matching", __name__)
