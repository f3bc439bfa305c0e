"""``pyverbs.providers.efa.efadv``: EFA direct verbs (``efadv``). softrdma has no such device: contexts refuse to open
(the vendor's "not a device of mine" error or ``EOPNOTSUPP``), so vendor
tests skip; attribute objects can be built, the objects they configure
refuse."""

from __future__ import annotations

from pyverbs._unsupported import unsupported_class, unsupported_function, value_class

__all__ = [
    "SRDQP",
    "EfaAH",
    "EfaCQ",
    "EfaContext",
    "EfaDVCQInitAttr",
    "EfaDVDeviceAttr",
    "EfaQPInitAttr",
    "SRDQPEx",
    "dev_cap_to_str",
]

EfaContext = unsupported_class("EfaContext", "EFA direct verbs (``efadv``)", __name__)
EfaAH = unsupported_class("EfaAH", "EFA direct verbs (``efadv``)", __name__)
EfaCQ = unsupported_class("EfaCQ", "EFA direct verbs (``efadv``)", __name__)
EfaDVCQInitAttr = value_class("EfaDVCQInitAttr", "EFA direct verbs (``efadv``)", __name__)
EfaQPInitAttr = value_class("EfaQPInitAttr", "EFA direct verbs (``efadv``)", __name__)
SRDQP = unsupported_class("SRDQP", "EFA direct verbs (``efadv``)", __name__)
SRDQPEx = unsupported_class("SRDQPEx", "EFA direct verbs (``efadv``)", __name__)
EfaDVDeviceAttr = value_class("EfaDVDeviceAttr", "EFA direct verbs (``efadv``)", __name__)
dev_cap_to_str = unsupported_function("dev_cap_to_str", "EFA direct verbs (``efadv``)")
