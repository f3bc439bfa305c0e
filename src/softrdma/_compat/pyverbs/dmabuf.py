"""``pyverbs.dmabuf``: dma-buf allocation (from a GPU render node), not supported."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class

__all__ = ["DmaBuf"]

DmaBuf = unsupported_class("DmaBuf", "dma-buf allocation", __name__)
