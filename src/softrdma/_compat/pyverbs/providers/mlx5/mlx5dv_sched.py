"""``pyverbs.providers.mlx5.mlx5dv_sched``: mlx5 scheduling elements. softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class, value_class

__all__ = ["Mlx5dvSchedAttr", "Mlx5dvSchedLeaf", "Mlx5dvSchedNode"]

Mlx5dvSchedAttr = value_class("Mlx5dvSchedAttr", "mlx5 scheduling elements", __name__)
Mlx5dvSchedLeaf = unsupported_class("Mlx5dvSchedLeaf", "mlx5 scheduling elements", __name__)
Mlx5dvSchedNode = unsupported_class("Mlx5dvSchedNode", "mlx5 scheduling elements", __name__)
