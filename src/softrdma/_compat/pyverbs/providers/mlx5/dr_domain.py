"""``pyverbs.providers.mlx5.dr_domain``: mlx5 software steering domains. softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class

__all__ = ["DrDomain"]

DrDomain = unsupported_class("DrDomain", "mlx5 software steering domains", __name__)
