"""pyverbs' base classes (rdma-core ``pyverbs/base.pyx``): every object is
a context manager whose ``close()`` is idempotent and first closes the
objects created from it (a Context closes its PDs, CQs and channels; a
PD its MRs, QPs and AHs), as the C library needs them destroyed in that
order."""

from __future__ import annotations

import errno
import logging
import weakref
from types import TracebackType
from typing import Self

from pyverbs import pyverbs_error
from pyverbs.pyverbs_error import PyverbsRDMAError

__all__ = ["PyverbsCM", "PyverbsObject", "PyverbsRDMAErrno", "inc_rkey"]

log = logging.getLogger("pyverbs")


def PyverbsRDMAErrno(msg: str) -> PyverbsRDMAError:
    """A :class:`PyverbsRDMAError` carrying the errno of the last failed
    verb (pyverbs reads C's ``errno``); ``EIO`` when none failed."""
    return PyverbsRDMAError(msg, pyverbs_error.last_errno or errno.EIO)


def inc_rkey(rkey: int) -> int:
    """``ibv_inc_rkey``: the same key index with the next key byte."""
    return (rkey & 0xFFFFFF00) | ((rkey + 1) & 0xFF)


class PyverbsObject:
    """``pyverbs.base.PyverbsObject``: the root, with a logger."""

    def __init__(self) -> None:
        self.logger = log

    def set_log_level(self, val: int) -> None:
        """Set the level of pyverbs' logger."""
        self.logger.setLevel(val)


class PyverbsCM(PyverbsObject):
    """``pyverbs.base.PyverbsCM``: a context manager whose :meth:`close`
    releases the object once, its dependants first."""

    def __init__(self) -> None:
        super().__init__()
        self._closed = False
        self._dependants: list[weakref.ref[PyverbsCM]] = []

    def add_ref(self, obj: PyverbsCM) -> None:
        """Record an object created from this one (``add_ref``), to be
        closed before it."""
        self._dependants.append(weakref.ref(obj))

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the object (idempotent); its dependants go first."""
        if self._closed:
            return
        for ref in reversed(self._dependants):
            obj = ref()
            if obj is not None:
                obj.close()
        self._dependants.clear()
        self._release()
        self._closed = True

    def _release(self) -> None:
        """Free what the object holds (the subclass's destroy verb)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Like pyverbs' __dealloc__: a dropped object is destroyed.
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:
            log.debug("closing %r at collection failed", self, exc_info=True)
