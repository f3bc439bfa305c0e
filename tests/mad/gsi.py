"""A raw sender to a peer's GSI QP (QP1), for hostile and malformed MADs."""

from __future__ import annotations

from collections.abc import Callable

from softrdma.drivers.roce import RoceDevice
from softrdma.transport.headers import GSI_QKEY
from softrdma.verbs.ah import AhAttr, create_ah
from softrdma.verbs.enums import IbQpAttrMask, IbQpState, IbQpType, IbSendFlags, IbWrOpcode
from softrdma.verbs.qp import QpAttr, QpInitAttr
from softrdma.verbs.wr import UdWR
from tests.rdma.nodes import Buffer


def raw_gsi_sender(dev: RoceDevice, dst_gid: bytes) -> Callable[[bytes], None]:
    """A plain UD QP whose Q_Key is QP1's, to put arbitrary bytes on QP1."""
    pd = dev.alloc_pd()
    cq = dev.create_cq(64)
    qp = dev.create_qp(pd, QpInitAttr(IbQpType.UD, cq, cq))
    m = IbQpAttrMask
    qp.modify(
        QpAttr(qp_state=IbQpState.INIT, qkey=GSI_QKEY), m.STATE | m.PKEY_INDEX | m.PORT | m.QKEY
    )
    qp.modify(QpAttr(qp_state=IbQpState.RTR), m.STATE)
    qp.modify(QpAttr(qp_state=IbQpState.RTS, sq_psn=0), m.STATE | m.SQ_PSN)
    ah = create_ah(pd, AhAttr(dst_gid))

    def send(data: bytes) -> None:
        buf = Buffer(dev, 4096)  # one each: the device reads it when it sends
        buf.fill(data)
        sge = buf.sge(pd.local_dma_lkey, 0, len(data))
        qp.post_send(
            UdWR(0, IbWrOpcode.SEND, (sge,) if data else (), IbSendFlags.SIGNALED, ah=ah,
                 remote_qpn=1, remote_qkey=GSI_QKEY)
        )  # fmt: skip

    return send
