"""perftest on softrdma: ``ib_write_bw``, ``ib_read_bw``, ``ib_send_bw``,
``ib_atomic_bw``, ``ib_write_lat``, ``ib_read_lat`` and ``ib_send_lat``
(linux-rdma/perftest), interoperable with perftest 6.06 on Linux rxe.

* :mod:`~softrdma.perf.params` — the tools, flags, defaults and checks;
* :mod:`~softrdma.perf.oob` — the out-of-band TCP exchange, sans I/O;
* :mod:`~softrdma.perf.context` — the verbs resources (PD, CQ, QPs, MR);
* :mod:`~softrdma.perf.engine_bw` / :mod:`~softrdma.perf.engine_lat` —
  the data paths;
* :mod:`~softrdma.perf.report` — what is printed, CSV / JSON, plots;
* :mod:`~softrdma.perf.cm_comm` — the exchange over the RDMA CM (``-z``,
  ``-R``);
* :mod:`~softrdma.perf.rdma_cm` — the test's QP connected by the RDMA CM
  (``-R``);
* :mod:`~softrdma.perf.session` — one run over a socket or the RDMA CM.

The command is ``softrdma perf`` (:mod:`softrdma.cli.perf`).
"""

from softrdma.perf.oob import BwReport, OobError, OobExchange, PingpongDest, Role
from softrdma.perf.params import TOOLS, ParamError, PerfParams, Tool
from softrdma.perf.session import PerfSession

__all__ = [
    "TOOLS",
    "BwReport",
    "OobError",
    "OobExchange",
    "ParamError",
    "PerfParams",
    "PerfSession",
    "PingpongDest",
    "Role",
    "Tool",
]
