"""``pyverbs.providers.mlx5.mlx5dv_crypto``: mlx5 crypto. softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class, value_class

__all__ = [
    "Mlx5CryptoAttr",
    "Mlx5CryptoExtLoginAttr",
    "Mlx5CryptoLogin",
    "Mlx5CryptoLoginAttr",
    "Mlx5DEK",
    "Mlx5DEKInitAttr",
]

Mlx5CryptoAttr = value_class("Mlx5CryptoAttr", "mlx5 crypto", __name__)
Mlx5CryptoExtLoginAttr = value_class("Mlx5CryptoExtLoginAttr", "mlx5 crypto", __name__)
Mlx5CryptoLogin = unsupported_class("Mlx5CryptoLogin", "mlx5 crypto", __name__)
Mlx5CryptoLoginAttr = value_class("Mlx5CryptoLoginAttr", "mlx5 crypto", __name__)
Mlx5DEK = unsupported_class("Mlx5DEK", "mlx5 crypto", __name__)
Mlx5DEKInitAttr = value_class("Mlx5DEKInitAttr", "mlx5 crypto", __name__)
