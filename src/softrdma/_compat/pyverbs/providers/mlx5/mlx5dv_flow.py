"""``pyverbs.providers.mlx5.mlx5dv_flow``: mlx5 flow steering. softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class, value_class

__all__ = [
    "Mlx5Flow",
    "Mlx5FlowActionAttr",
    "Mlx5FlowMatchParameters",
    "Mlx5FlowMatcher",
    "Mlx5FlowMatcherAttr",
    "Mlx5PacketReformatFlowAction",
]

Mlx5Flow = unsupported_class("Mlx5Flow", "mlx5 flow steering", __name__)
Mlx5FlowActionAttr = value_class("Mlx5FlowActionAttr", "mlx5 flow steering", __name__)
Mlx5FlowMatchParameters = value_class("Mlx5FlowMatchParameters", "mlx5 flow steering", __name__)
Mlx5FlowMatcher = unsupported_class("Mlx5FlowMatcher", "mlx5 flow steering", __name__)
Mlx5FlowMatcherAttr = value_class("Mlx5FlowMatcherAttr", "mlx5 flow steering", __name__)
Mlx5PacketReformatFlowAction = unsupported_class(
    "Mlx5PacketReformatFlowAction", "mlx5 flow steering", __name__
)
