"""The QP attributes the transport engines run with.

Kernel counterpart: the fields of ``struct ib_qp_attr`` that
``rxe_qp_from_attr()`` (``drivers/infiniband/sw/rxe/rxe_qp.c``) copies into
``struct rxe_qp`` — path MTU, PSNs, the local ACK timeout, retry counts, the
RNR timer, the RDMA READ / atomic depths, P_Key, Q_Key, the remote access
flags — plus the QP number and type. The device builds one from the verbs
``ib_modify_qp`` attributes and hands it to the engine with every state
change (:meth:`softrdma.transport.rc.RcTransport.modify`).

Units are the wire units: ``path_mtu`` in bytes, ``timeout`` the 5-bit IBTA
exponent, ``min_rnr_timer`` the 5-bit IBTA code. The derived properties turn
them into seconds of simulated time.
"""

from __future__ import annotations

from dataclasses import dataclass

from softrdma.transport.headers import rnr_timer_decode
from softrdma.verbs.enums import IbAccess, IbQpType

_NO_ACCESS = IbAccess(0)

__all__ = [
    "PATH_MTUS",
    "RNR_RETRY_INFINITE",
    "QpParams",
    "local_ack_timeout",
]

PATH_MTUS = (256, 512, 1024, 2048, 4096)
"""The IB MTUs (``enum ib_mtu`` in bytes)."""

RNR_RETRY_INFINITE = 7
"""``rnr_retry`` 7 means retry forever (IBTA 9.7.5.2.8; rxe_comp.c)."""


def local_ack_timeout(timeout: int) -> float | None:
    """The local ACK timeout in seconds: 4.096 µs × 2**timeout, ``None`` for
    ``timeout`` 0 (infinite). Kernel: rxe_qp.c ``rxe_qp_from_attr``
    (``qp_timeout_jiffies = nsecs_to_jiffies(4096ULL << timeout)``)."""
    if not timeout:
        return None
    return 4.096e-6 * (1 << timeout)


@dataclass(frozen=True, slots=True)
class QpParams:
    """The attributes of one QP (``struct ib_qp_attr`` as rxe keeps it).

    * ``qpn`` — this QP's number; ``qp_type`` RC or UD;
    * ``dest_qpn`` — the connected peer (RC; ``IB_QP_DEST_QPN``);
    * ``path_mtu`` — bytes, one of :data:`PATH_MTUS` (``IB_QP_PATH_MTU``);
    * ``sq_psn`` — first PSN the requester sends (``IB_QP_SQ_PSN``);
      ``rq_psn`` — first PSN the responder expects (``IB_QP_RQ_PSN``);
    * ``timeout`` — local ACK timeout exponent, 0 = infinite;
      ``retry_cnt`` — retransmissions without progress before
      ``IB_WC_RETRY_EXC_ERR``; ``rnr_retry`` — RNR retries, 7 = infinite;
    * ``min_rnr_timer`` — RNR NAK timer code this QP's responder advertises;
    * ``max_rd_atomic`` — RDMA READ / atomic requests the requester may have
      outstanding (``IB_QP_MAX_QP_RD_ATOMIC``); ``max_dest_rd_atomic`` — the
      responder resources kept for them (``IB_QP_MAX_DEST_RD_ATOMIC``);
    * ``pkey`` — P_Key put in the BTH; ``qkey`` — this UD QP's Q_Key;
    * ``sq_sig_all`` — ``IB_SIGNAL_ALL_WR``: every send WQE completes;
    * ``qp_access_flags`` — ``IB_QP_ACCESS_FLAGS``: which remote operations
      (``IB_ACCESS_REMOTE_WRITE`` / ``_READ`` / ``_ATOMIC``) the responder
      accepts at all. As in the kernel it defaults to none: a consumer that
      forgets it gets NAK invalid request, as with rxe (rxe_resp.c
      ``check_qp_attr_access``).
    """

    qpn: int
    qp_type: IbQpType = IbQpType.RC
    dest_qpn: int = 0
    path_mtu: int = 1024
    sq_psn: int = 0
    rq_psn: int = 0
    timeout: int = 14
    retry_cnt: int = 7
    rnr_retry: int = 7
    min_rnr_timer: int = 12
    max_rd_atomic: int = 1
    max_dest_rd_atomic: int = 1
    pkey: int = 0xFFFF
    qkey: int = 0
    sq_sig_all: bool = False
    qp_access_flags: IbAccess = _NO_ACCESS

    def __post_init__(self) -> None:
        def check(name: str, value: int, bits: int) -> None:
            if not 0 <= value < (1 << bits):
                raise ValueError(f"QpParams.{name}={value!r} does not fit {bits} bits")

        check("qpn", self.qpn, 24)
        check("dest_qpn", self.dest_qpn, 24)
        check("sq_psn", self.sq_psn, 24)
        check("rq_psn", self.rq_psn, 24)
        check("timeout", self.timeout, 5)
        check("retry_cnt", self.retry_cnt, 3)
        check("rnr_retry", self.rnr_retry, 3)
        check("min_rnr_timer", self.min_rnr_timer, 5)
        check("pkey", self.pkey, 16)
        check("qkey", self.qkey, 32)
        # rxe caps both at RXE_MAX_QP_RD_ATOM (128).
        check("max_rd_atomic", self.max_rd_atomic, 8)
        check("max_dest_rd_atomic", self.max_dest_rd_atomic, 8)
        if self.path_mtu not in PATH_MTUS:
            raise ValueError(f"QpParams.path_mtu={self.path_mtu!r} is not one of {PATH_MTUS}")
        if self.qp_type not in (IbQpType.RC, IbQpType.UD, IbQpType.GSI):
            raise ValueError(f"QpParams.qp_type={self.qp_type!r}: only RC and UD are implemented")

    @property
    def ack_timeout(self) -> float | None:
        """Local ACK timeout in seconds, ``None`` when infinite."""
        return local_ack_timeout(self.timeout)

    @property
    def min_rnr_delay(self) -> float:
        """The delay ``min_rnr_timer`` encodes, in seconds (IBTA table 45)."""
        return rnr_timer_decode(self.min_rnr_timer) * 1e-6
