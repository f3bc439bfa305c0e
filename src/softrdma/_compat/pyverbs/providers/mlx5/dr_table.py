"""``pyverbs.providers.mlx5.dr_table``: mlx5 software steering tables. softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class

__all__ = ["DrTable"]

DrTable = unsupported_class("DrTable", "mlx5 software steering tables", __name__)
