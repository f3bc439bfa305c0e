"""Host memory: physical pages, zones, the kernel address space, scatterlists.

Kernel counterparts: ``mm/``, ``include/linux/scatterlist.h``.
"""
