"""The enums of ``<infiniband/efadv.h>`` (values only)."""

from __future__ import annotations

# Macros of the header that are not members of a C enum.
EFADV_DEVICE_ATTR_CAPS_CQ_WITH_SGID = 4
EFADV_DEVICE_ATTR_CAPS_RDMA_READ = 1
EFADV_QP_DRIVER_TYPE_SRD = 0
EFADV_WC_EX_WITH_SGID = 1
