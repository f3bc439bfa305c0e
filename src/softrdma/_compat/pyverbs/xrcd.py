"""``pyverbs.xrcd``: XRC domains (``ibv_open_xrcd``), not supported: opening one raises ``EOPNOTSUPP``."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class, value_class

__all__ = ["XRCD", "XRCDInitAttr"]

XRCD = unsupported_class("XRCD", "XRC domains", __name__)
XRCDInitAttr = value_class("XRCDInitAttr", "XRC domains", __name__)
