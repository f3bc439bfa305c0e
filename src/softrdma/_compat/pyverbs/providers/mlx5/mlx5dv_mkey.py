"""``pyverbs.providers.mlx5.mlx5dv_mkey``: mlx5 mkeys and signatures. softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class, value_class

__all__ = [
    "Mlx5Mkey",
    "Mlx5MkeyConfAttr",
    "Mlx5MrInterleaved",
    "Mlx5SigBlockAttr",
    "Mlx5SigBlockDomain",
    "Mlx5SigCrc",
    "Mlx5SigT10Dif",
]

Mlx5Mkey = unsupported_class("Mlx5Mkey", "mlx5 mkeys and signatures", __name__)
Mlx5MkeyConfAttr = value_class("Mlx5MkeyConfAttr", "mlx5 mkeys and signatures", __name__)
Mlx5MrInterleaved = value_class("Mlx5MrInterleaved", "mlx5 mkeys and signatures", __name__)
Mlx5SigBlockAttr = value_class("Mlx5SigBlockAttr", "mlx5 mkeys and signatures", __name__)
Mlx5SigBlockDomain = value_class("Mlx5SigBlockDomain", "mlx5 mkeys and signatures", __name__)
Mlx5SigCrc = value_class("Mlx5SigCrc", "mlx5 mkeys and signatures", __name__)
Mlx5SigT10Dif = value_class("Mlx5SigT10Dif", "mlx5 mkeys and signatures", __name__)
