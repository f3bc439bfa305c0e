"""``pyverbs.flow``: flow steering (``ibv_create_flow``), not supported (raw packet QPs are not)."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class, value_class

__all__ = ["Flow", "FlowAttr"]

Flow = unsupported_class("Flow", "Flow steering", __name__)
FlowAttr = value_class("FlowAttr", "Flow steering", __name__)
