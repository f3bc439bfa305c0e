"""Honest stand-ins for pyverbs features softrdma does not implement.

Code written for pyverbs imports these names at load time; using them
fails the way rdma-core does on a device without the feature — a
:class:`PyverbsRDMAError` with ``EOPNOTSUPP`` (or, for a vendor's own
context, the vendor's "not a <vendor> device" :class:`PyverbsUserError`)
— so tests that probe for the feature skip.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, NoReturn, cast

from pyverbs.base import PyverbsCM, PyverbsObject
from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError

__all__ = [
    "Unsupported",
    "Value",
    "WrongVendor",
    "unsupported_class",
    "unsupported_function",
    "value_class",
    "wrong_vendor_class",
]


def unsupported_function(name: str, what: str) -> Callable[..., NoReturn]:
    """A function that raises ``EOPNOTSUPP``."""

    def fn(*args: Any, **kwargs: Any) -> NoReturn:
        raise PyverbsRDMAError(f"{what} is not supported by softrdma devices", errno.EOPNOTSUPP)

    fn.__name__ = name
    fn.__doc__ = f"``{name}``: {what} is not supported (raises ``EOPNOTSUPP``)."
    return fn


class _Refusing(type):
    """The metaclass of the stand-ins: any class-level verb (a vendor's
    static query, ``Mlx5QP.query_lag_port(qp)``, ...) refuses too."""

    def __getattr__(cls, name: str) -> Callable[..., NoReturn]:
        if name.startswith("__"):
            raise AttributeError(name)
        return unsupported_function(name, f"{cls.__name__}.{name}")


class Unsupported(PyverbsCM, metaclass=_Refusing):
    """An object of an unsupported feature: constructing it raises
    ``PyverbsRDMAError(..., EOPNOTSUPP)``."""

    what = "This feature"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._closed = True
        raise PyverbsRDMAError(
            f"{self.what} is not supported by softrdma devices", errno.EOPNOTSUPP
        )


class WrongVendor(PyverbsCM, metaclass=_Refusing):
    """A vendor's context: opening it on a softrdma device raises the
    vendor provider's :class:`PyverbsUserError` (not a device of it)."""

    vendor = "vendor"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._closed = True
        raise PyverbsUserError(f"This is not an {self.vendor} device")


class Value(PyverbsObject):
    """An attribute object of an unsupported feature: it holds its
    arguments (so code can build it); the object it configures refuses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args
        for key, value in kwargs.items():
            setattr(self, key, value)


def unsupported_class(name: str, what: str, module: str) -> type[Unsupported]:
    """An :class:`Unsupported` subclass called ``name`` for ``what``."""
    doc = f"``{name}``: {what} is not supported (construction raises ``EOPNOTSUPP``)."
    attrs = {"what": what, "__doc__": doc, "__module__": module}
    return cast(type[Unsupported], _Refusing(name, (Unsupported,), attrs))


def wrong_vendor_class(name: str, vendor: str, module: str) -> type[WrongVendor]:
    """A :class:`WrongVendor` subclass called ``name`` for ``vendor``."""
    doc = f"``{name}``: softrdma devices are not {vendor} devices (raises PyverbsUserError)."
    attrs = {"vendor": vendor, "__doc__": doc, "__module__": module}
    return cast(type[WrongVendor], _Refusing(name, (WrongVendor,), attrs))


def value_class(name: str, what: str, module: str) -> type[Value]:
    """A :class:`Value` subclass called ``name``: attributes for ``what``."""
    doc = f"``{name}``: attributes for {what}, which is not supported."
    return type(name, (Value,), {"__doc__": doc, "__module__": module})
