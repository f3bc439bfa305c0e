"""``pyverbs.providers.mlx5.dr_action``: mlx5 software steering actions. softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class, value_class

__all__ = [
    "DrActionDefMiss",
    "DrActionDestArray",
    "DrActionDestAttr",
    "DrActionDestTable",
    "DrActionDestTir",
    "DrActionDrop",
    "DrActionFlowCounter",
    "DrActionFlowSample",
    "DrActionIBPort",
    "DrActionModify",
    "DrActionPacketReformat",
    "DrActionPopVLan",
    "DrActionPushVLan",
    "DrActionQp",
    "DrActionTag",
    "DrActionVPort",
    "DrFlowSamplerAttr",
]

DrActionDefMiss = unsupported_class("DrActionDefMiss", "mlx5 software steering actions", __name__)
DrActionDestArray = unsupported_class(
    "DrActionDestArray", "mlx5 software steering actions", __name__
)
DrActionDestAttr = value_class("DrActionDestAttr", "mlx5 software steering actions", __name__)
DrActionDestTable = unsupported_class(
    "DrActionDestTable", "mlx5 software steering actions", __name__
)
DrActionDestTir = unsupported_class("DrActionDestTir", "mlx5 software steering actions", __name__)
DrActionDrop = unsupported_class("DrActionDrop", "mlx5 software steering actions", __name__)
DrActionFlowCounter = unsupported_class(
    "DrActionFlowCounter", "mlx5 software steering actions", __name__
)
DrActionFlowSample = unsupported_class(
    "DrActionFlowSample", "mlx5 software steering actions", __name__
)
DrActionIBPort = unsupported_class("DrActionIBPort", "mlx5 software steering actions", __name__)
DrActionModify = unsupported_class("DrActionModify", "mlx5 software steering actions", __name__)
DrActionPacketReformat = unsupported_class(
    "DrActionPacketReformat", "mlx5 software steering actions", __name__
)
DrActionPopVLan = unsupported_class("DrActionPopVLan", "mlx5 software steering actions", __name__)
DrActionPushVLan = unsupported_class("DrActionPushVLan", "mlx5 software steering actions", __name__)
DrActionQp = unsupported_class("DrActionQp", "mlx5 software steering actions", __name__)
DrActionTag = unsupported_class("DrActionTag", "mlx5 software steering actions", __name__)
DrActionVPort = unsupported_class("DrActionVPort", "mlx5 software steering actions", __name__)
DrFlowSamplerAttr = value_class("DrFlowSamplerAttr", "mlx5 software steering actions", __name__)
