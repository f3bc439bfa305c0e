"""Errors of the verbs layer: a verb refused (the kernel's negative errno)."""

from __future__ import annotations

import errno

from softrdma.errors import SoftRdmaError


class VerbsError(SoftRdmaError):
    """A verb failed; ``errno`` is what the kernel verb would return (as a
    positive number: ``errno.EINVAL``, ``errno.ENOMEM``, ...)."""

    def __init__(self, err: int, why: str) -> None:
        self.errno = err
        super().__init__(f"{errno.errorcode.get(err, err)}: {why}")


class PostError(VerbsError):
    """``ib_post_send`` / ``ib_post_recv`` refused a work request; ``bad_wr``
    is the first one not posted (the kernel's ``bad_wr``)."""

    def __init__(self, err: int, why: str, bad_wr: object) -> None:
        super().__init__(err, why)
        self.bad_wr = bad_wr
