"""``pyverbs.wq``: work queues and RSS indirection tables, not supported."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class, value_class

__all__ = ["WQ", "RwqIndTable", "RwqIndTableInitAttr", "RxHashConf", "WQAttr", "WQInitAttr"]

WQ = unsupported_class("WQ", "Work queues", __name__)
WQAttr = value_class("WQAttr", "Work queues", __name__)
WQInitAttr = value_class("WQInitAttr", "Work queues", __name__)
RwqIndTable = unsupported_class("RwqIndTable", "RSS indirection tables", __name__)
RwqIndTableInitAttr = value_class("RwqIndTableInitAttr", "RSS indirection tables", __name__)
RxHashConf = value_class("RxHashConf", "RSS hashing", __name__)
