"""softrdma: the Linux kernel's RDMA model — host memory, the DMA-mapping API,
RDMA verbs, the InfiniBand transport and RoCEv2 — as ordinary Python objects.

Layers are sub-packages; each imports only the ones below it::

    memory, time -> dma -> verbs -> transport -> fabric -> drivers -> ulp -> cli
"""

__version__ = "0.1.0"

import logging as _logging

# A library logs; the application decides where it goes.
_logging.getLogger("softrdma").addHandler(_logging.NullHandler())
