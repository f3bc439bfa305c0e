"""pyverbs' exceptions (rdma-core ``pyverbs/pyverbs_error.py``): the
message format — ``"<msg>. Errno: <n>, <strerror>"`` — is the same, so
code that matches on it keeps working."""

from __future__ import annotations

import os

__all__ = ["PyverbsError", "PyverbsRDMAError", "PyverbsUserError"]

#: The errno of the last verb that failed in this process (C's ``errno``
#: after the call), for :func:`pyverbs.base.PyverbsRDMAErrno`.
last_errno = 0


class PyverbsError(Exception):
    """Base of pyverbs' exceptions; ``error_code`` is an errno or -1."""

    def __init__(self, msg: str, error_code: int = -1) -> None:
        if error_code != -1:
            msg = f"{msg}. Errno: {error_code}, {os.strerror(error_code)}"
        super().__init__(msg)


class PyverbsRDMAError(PyverbsError):
    """A verb failed (what an rdma-core function returning an error gives);
    ``error_code`` is its errno."""

    def __init__(self, msg: str, error_code: int = -1) -> None:
        global last_errno
        super().__init__(msg, error_code)
        self._error_code = error_code
        if error_code != -1:
            last_errno = abs(error_code)

    @property
    def error_code(self) -> int:
        """The errno of the failure (-1 when there is none)."""
        return self._error_code


class PyverbsUserError(PyverbsError):
    """The caller's input is wrong (found by pyverbs itself)."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
