"""The RDMA core: devices, the ``ib_dma_*`` wrappers, protection domains,
memory regions, completion queues, queue pairs, work requests and
completions.

Kernel counterparts: ``drivers/infiniband/core``, ``include/rdma/ib_verbs.h``.
"""
