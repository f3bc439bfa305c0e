"""``pyverbs.providers.mlx5.mlx5_vfio``: mlx5 VFIO contexts. softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import value_class, wrong_vendor_class

__all__ = ["Mlx5VfioAttr", "Mlx5VfioContext"]

Mlx5VfioAttr = value_class("Mlx5VfioAttr", "mlx5 VFIO contexts", __name__)
Mlx5VfioContext = wrong_vendor_class("Mlx5VfioContext", "MLX5", __name__)
