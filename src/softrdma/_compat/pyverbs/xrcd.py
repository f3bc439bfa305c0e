"""``pyverbs.xrcd``: XRC domains (``ibv_open_xrcd``, ``ibv_close_xrcd``) on
softrdma's :class:`~softrdma.verbs.xrcd.XrcDomain`.

``XRCD(context, XRCDInitAttr(comp_mask, oflags, fd))``: with
``IBV_XRCD_INIT_ATTR_FD`` the domain is the device's domain of the file's
inode — every context that opens the same file on the same device shares
it; ``O_CREAT`` creates it if it does not exist, ``O_CREAT | O_EXCL``
refuses an existing one. ``fd`` -1 opens a private domain (``O_CREAT``
needed, as in the kernel).
"""

from __future__ import annotations

import errno
import os

import pyverbs.enums as e
from pyverbs import _softrdma as sim
from pyverbs.base import PyverbsCM, PyverbsObject
from pyverbs.device import Context
from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from softrdma.errors import SoftRdmaError
from softrdma.verbs.xrcd import XrcDomain, ib_alloc_xrcd_user, ib_dealloc_xrcd_user

__all__ = ["XRCD", "XRCDInitAttr"]


class XRCDInitAttr(PyverbsObject):
    """``struct ibv_xrcd_init_attr``."""

    def __init__(self, comp_mask: int = 0, oflags: int = 0, fd: int = -1) -> None:
        super().__init__()
        self.comp_mask = comp_mask
        self.oflags = oflags
        self.fd = fd


class XRCD(PyverbsCM):
    """``struct ibv_xrcd``: ``XRCD(context, XRCDInitAttr)`` (``ibv_open_xrcd``)."""

    def __init__(self, context: Context, init_attr: XRCDInitAttr) -> None:
        super().__init__()
        what = "Failed to allocate XRCD"
        if not isinstance(context, Context):
            raise PyverbsUserError("An XRCD is opened on a Context")
        mask = init_attr.comp_mask
        if mask & ~(e.IBV_XRCD_INIT_ATTR_FD | e.IBV_XRCD_INIT_ATTR_OFLAGS):
            raise PyverbsRDMAError(f"{what}: comp_mask {mask:#x}", errno.EINVAL)
        # ibv_open_xrcd reads fd and oflags only when comp_mask says so
        fd = init_attr.fd if mask & e.IBV_XRCD_INIT_ATTR_FD else -1
        oflags = init_attr.oflags if mask & e.IBV_XRCD_INIT_ATTR_OFLAGS else 0
        inode: tuple[int, int] | None = None
        if fd != -1:
            try:
                st = os.fstat(fd)
            except OSError:
                raise PyverbsRDMAError(f"{what}: bad file descriptor {fd}", errno.EBADF) from None
            inode = (st.st_dev, st.st_ino)
        elif not oflags & os.O_CREAT:
            raise PyverbsRDMAError(f"{what}: a private XRCD needs O_CREAT", errno.EINVAL)
        dev = context._alive()
        try:
            self.xrcd: XrcDomain = ib_alloc_xrcd_user(dev, inode, oflags)
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        self.ctx = context
        context.add_ref(self)

    def __str__(self) -> str:
        return f"XRCD on {self.ctx.name}"

    def alive(self, what: str) -> XrcDomain:
        """The softrdma domain, or ``EINVAL`` with ``what`` once closed."""
        if self.closed:
            raise PyverbsRDMAError(f"{what}: the XRCD is closed", errno.EINVAL)
        return self.xrcd

    def _release(self) -> None:
        try:
            ib_dealloc_xrcd_user(self.xrcd)
        except SoftRdmaError as ex:
            raise sim.rdma_error("Failed to dealloc XRCD", ex) from None
