"""``pyverbs.dmabuf``: dma-buf allocation from a GPU (``DrmDmaBuf`` through
a DRM render node, ``HabanaLabsDmaBuf`` through a Habana accelerator), the
exporters ``ibv_reg_dmabuf_mr`` imports from.

A softrdma host has no GPU nor accelerator: allocating from one fails as
rdma-core's helpers fail on such a machine — ``DrmDmaBuf`` with
``ENOENT`` (no ``/dev/dri/renderD<128 + gpu>``), ``HabanaLabsDmaBuf`` with
``ENODEV`` — so tests that look for a GPU skip. The memory softrdma does
export as dma-buf is the confidential-computing shared heap
(:mod:`pyverbs.cc_heap`, through ``ibv_alloc_buf``).
"""

from __future__ import annotations

import errno
from enum import Enum

from pyverbs.pyverbs_error import PyverbsRDMAError

__all__ = ["DmaBuf", "DrmDmaBuf", "GpuType", "HabanaLabsDmaBuf"]


class GpuType(Enum):
    """The GPU a test allocates dma-bufs from (as pyverbs numbers them)."""

    drm = (0,)
    habana = (1,)


def _no_render_node(size: int, gpu: int) -> PyverbsRDMAError:
    """The error of ``drm_dmabuf_alloc`` on a host without the render node."""
    return PyverbsRDMAError(
        f"Failed to allocate dmabuf of size {size} on gpu {gpu}: "
        f"no DRM render node /dev/dri/renderD{128 + int(gpu)}",
        errno.ENOENT,
    )


class DmaBuf:
    """A dma-buf of ``size`` bytes from a device exporter: ``dmabuf_fd``,
    ``map_offset``, ``device_fd`` and ``size`` describe it; CPU ``read`` /
    ``write`` are the exporter's to provide (``EOPNOTSUPP`` in the base).

    Constructed directly it is rdma-core 44's ``DmaBuf(size, gpu=0,
    gtt=0)``, the DRM allocation :class:`DrmDmaBuf` took over: ``ENOENT``
    on a softrdma host, which has no render node."""

    def __init__(self, size: int, gpu: int = 0, gtt: int = 0) -> None:
        raise _no_render_node(size, gpu)

    size = 0
    dmabuf_fd = -1
    map_offset = 0
    device_fd = -1

    def read(self, length: int, offset: int) -> bytes:
        raise PyverbsRDMAError("Read from user space isn't supported", errno.EOPNOTSUPP)

    def write(self, data: bytes | str, length: int, offset: int) -> None:
        raise PyverbsRDMAError("Write from user space isn't supported", errno.EOPNOTSUPP)

    def close(self) -> None:
        """Free the buffer (nothing is held by the base class)."""


class DrmDmaBuf(DmaBuf):
    """``drm_dmabuf_alloc(size, gpu, gtt)``: a GEM buffer of the DRM render
    node ``/dev/dri/renderD<128 + gpu>`` exported as dma-buf. No render
    node exists on a softrdma host: raises ``ENOENT``."""

    def __init__(self, size: int, gpu: int = 0, gtt: int = 0) -> None:
        raise _no_render_node(size, gpu)


class HabanaLabsDmaBuf(DmaBuf):
    """``habana_dmabuf_alloc(size)``: device memory of a Habana Labs
    accelerator exported as dma-buf. None exists here: raises ``ENODEV``."""

    def __init__(self, size: int) -> None:
        raise PyverbsRDMAError(
            f"Failed to allocate HL dmabuf of size {size}: no Habana Labs device",
            errno.ENODEV,
        )
