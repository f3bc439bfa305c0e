"""pyverbs on softrdma: rdma-core's Python verbs API (``pyverbs``) over the
simulated RDMA devices of this process.

This package is opt-in: it is not importable as ``pyverbs`` unless its
parent directory (printed by ``softrdma pyverbs-path``) is on
``sys.path`` / ``PYTHONPATH``, so installing softrdma never shadows a real
pyverbs. Its modules mirror pyverbs' layout (``pyverbs.device``,
``pyverbs.pd``, ``pyverbs.mr``, ``pyverbs.cq``, ``pyverbs.qp``, ...); the
devices, the user memory and the simulated host behind them are described
in :mod:`pyverbs._softrdma`.
"""

__version__ = "44.0+softrdma"
