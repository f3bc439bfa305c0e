"""``pyverbs.providers.mlx5.mlx5dv_objects``: mlx5 direct-verbs objects. softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class

__all__ = ["Mlx5DvObj"]

Mlx5DvObj = unsupported_class("Mlx5DvObj", "mlx5 direct-verbs objects", __name__)
