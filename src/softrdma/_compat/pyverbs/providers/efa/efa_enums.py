"""``pyverbs.providers.efa.efa_enums``: the enumerators of ``<infiniband/efadv.h>``
as flat names (values only: softrdma has no EFA device)."""

from __future__ import annotations

from pyverbs.providers.efa._efadv_h import (
    EFADV_DEVICE_ATTR_CAPS_CQ_WITH_SGID,
    EFADV_DEVICE_ATTR_CAPS_RDMA_READ,
    EFADV_QP_DRIVER_TYPE_SRD,
    EFADV_WC_EX_WITH_SGID,
)

__all__ = [
    "EFADV_DEVICE_ATTR_CAPS_CQ_WITH_SGID",
    "EFADV_DEVICE_ATTR_CAPS_RDMA_READ",
    "EFADV_QP_DRIVER_TYPE_SRD",
    "EFADV_WC_EX_WITH_SGID",
]
