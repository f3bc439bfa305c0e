"""``pyverbs.providers.mlx5.dr_matcher``: mlx5 software steering matchers. softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class

__all__ = ["DrMatcher"]

DrMatcher = unsupported_class("DrMatcher", "mlx5 software steering matchers", __name__)
