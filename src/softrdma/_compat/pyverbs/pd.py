"""``pyverbs.pd``: protection domains (``ibv_alloc_pd``, ``ibv_dealloc_pd``).

A PD is a softrdma :class:`~softrdma.verbs.pd.ProtectionDomain` of the
context's device; closing it first closes the MRs, QPs and AHs created on
it. Parent domains (``ibv_alloc_parent_domain``) are not supported: their
constructors raise ``EOPNOTSUPP`` so code that probes for them skips.
"""

from __future__ import annotations

import errno
from typing import Any

from pyverbs import _softrdma as sim
from pyverbs.base import PyverbsCM, PyverbsObject
from pyverbs.device import Context
from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from softrdma.errors import SoftRdmaError
from softrdma.verbs.pd import ProtectionDomain

__all__ = ["PD", "ParentDomain", "ParentDomainContext", "ParentDomainInitAttr"]


class PD(PyverbsCM):
    """``struct ibv_pd``: ``PD(context)``."""

    def __init__(self, creator: Context, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(creator, Context):
            raise PyverbsUserError("A PD is created on a Context")
        if kwargs.get("handle") is not None:
            raise PyverbsRDMAError("Failed to import PD", errno.EOPNOTSUPP)
        self.ctx = creator
        dev = creator._alive()
        try:
            self.pd: ProtectionDomain = dev.alloc_pd()
        except SoftRdmaError as ex:
            raise sim.rdma_error("Failed to allocate PD", ex) from None
        self.handle = id(self.pd) & 0xFFFFFFFF
        creator.add_ref(self)

    def alive(self, what: str) -> ProtectionDomain:
        """The softrdma PD, or :class:`PyverbsRDMAError` (``EINVAL``) with
        ``what`` when this PD is closed."""
        if self.closed:
            raise PyverbsRDMAError(f"{what}: the PD is closed", errno.EINVAL)
        return self.pd

    def _release(self) -> None:
        if not self.pd.deallocated:
            self.pd.dealloc()

    def advise_mr(self, advise: int, flags: int, sg_list: list[Any]) -> None:
        """``ibv_advise_mr``: there is no on-demand paging to prefetch for."""
        raise PyverbsRDMAError("Failed to advise MR", errno.EOPNOTSUPP)


class ParentDomainInitAttr(PyverbsObject):
    """``struct ibv_parent_domain_init_attr`` (accepted, see :class:`ParentDomain`)."""

    def __init__(self, pd: PD | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.pd = pd
        self.comp_mask = kwargs.get("comp_mask", 0)
        self.pd_context = kwargs.get("pd_context")


class ParentDomainContext(PyverbsObject):
    """The allocator hooks of a parent domain (accepted, see :class:`ParentDomain`)."""

    def __init__(
        self, pd: PD, alloc_func: Any = None, free_func: Any = None, user_data: Any = None
    ) -> None:
        super().__init__()
        self.pd = pd
        self.alloc_func = alloc_func
        self.free_func = free_func
        self.user_data = user_data


class ParentDomain(PD):
    """``ibv_alloc_parent_domain``: not supported (``EOPNOTSUPP``)."""

    def __init__(self, context: Context, attr: ParentDomainInitAttr | None = None) -> None:
        PyverbsCM.__init__(self)
        self._closed = True
        raise PyverbsRDMAError("Failed to allocate Parent Domain", errno.EOPNOTSUPP)
