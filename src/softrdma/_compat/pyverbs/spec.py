"""``pyverbs.spec``: flow specifications, not supported (see :mod:`pyverbs.flow`)."""

from __future__ import annotations

from pyverbs._unsupported import value_class

__all__ = ["EthSpec", "Ipv4ExtSpec", "Ipv6Spec", "Spec", "TcpUdpSpec"]

EthSpec = value_class("EthSpec", "Flow steering", __name__)
Ipv4ExtSpec = value_class("Ipv4ExtSpec", "Flow steering", __name__)
Ipv6Spec = value_class("Ipv6Spec", "Flow steering", __name__)
TcpUdpSpec = value_class("TcpUdpSpec", "Flow steering", __name__)
Spec = value_class("Spec", "Flow steering", __name__)
