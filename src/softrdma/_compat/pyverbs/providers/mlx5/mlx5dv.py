"""``pyverbs.providers.mlx5.mlx5dv``: mlx5 direct verbs (``mlx5dv``). softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import (
    unsupported_class,
    unsupported_function,
    value_class,
    wrong_vendor_class,
)

__all__ = [
    "Mlx5CQ",
    "Mlx5Context",
    "Mlx5Cqe64",
    "Mlx5DCIStreamInitAttr",
    "Mlx5DVCQInitAttr",
    "Mlx5DVContextAttr",
    "Mlx5DVDCInitAttr",
    "Mlx5DVQPInitAttr",
    "Mlx5DevxEq",
    "Mlx5DevxMsiVector",
    "Mlx5DevxObj",
    "Mlx5DmOpAddr",
    "Mlx5PP",
    "Mlx5QP",
    "Mlx5UAR",
    "Mlx5UMEM",
    "Mlx5VAR",
    "Wqe",
    "WqeCtrlSeg",
    "WqeDataSeg",
    "context_flags_to_str",
    "cqe_comp_to_str",
]

Mlx5CQ = unsupported_class("Mlx5CQ", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5Context = wrong_vendor_class("Mlx5Context", "MLX5", __name__)
Mlx5Cqe64 = value_class("Mlx5Cqe64", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5DCIStreamInitAttr = value_class(
    "Mlx5DCIStreamInitAttr", "mlx5 direct verbs (``mlx5dv``)", __name__
)
Mlx5DVCQInitAttr = value_class("Mlx5DVCQInitAttr", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5DVContextAttr = value_class("Mlx5DVContextAttr", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5DVDCInitAttr = value_class("Mlx5DVDCInitAttr", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5DVQPInitAttr = value_class("Mlx5DVQPInitAttr", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5DevxEq = unsupported_class("Mlx5DevxEq", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5DevxMsiVector = unsupported_class(
    "Mlx5DevxMsiVector", "mlx5 direct verbs (``mlx5dv``)", __name__
)
Mlx5DevxObj = unsupported_class("Mlx5DevxObj", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5DmOpAddr = value_class("Mlx5DmOpAddr", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5PP = unsupported_class("Mlx5PP", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5QP = unsupported_class("Mlx5QP", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5UAR = unsupported_class("Mlx5UAR", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5UMEM = unsupported_class("Mlx5UMEM", "mlx5 direct verbs (``mlx5dv``)", __name__)
Mlx5VAR = unsupported_class("Mlx5VAR", "mlx5 direct verbs (``mlx5dv``)", __name__)
Wqe = unsupported_class("Wqe", "mlx5 direct verbs (``mlx5dv``)", __name__)
WqeCtrlSeg = value_class("WqeCtrlSeg", "mlx5 direct verbs (``mlx5dv``)", __name__)
WqeDataSeg = value_class("WqeDataSeg", "mlx5 direct verbs (``mlx5dv``)", __name__)
context_flags_to_str = unsupported_function(
    "context_flags_to_str", "mlx5 direct verbs (``mlx5dv``)"
)
cqe_comp_to_str = unsupported_function("cqe_comp_to_str", "mlx5 direct verbs (``mlx5dv``)")
