"""One RDMA connection of the iSER initiator and its resources.

Kernel counterpart: ``struct iser_conn`` with its ``struct ib_conn``
(``drivers/infiniband/ulp/iser/iser_verbs.c``): the RDMA CM ID, the CQ and
the RC QP made by ``iser_create_ib_conn_res``, the receive descriptors
(``iser_alloc_rx_descriptors``), the command and control transmit
descriptors, and the fast-registration pool (``iser_alloc_fastreg_pool``,
one descriptor per command slot). Everything here lives as long as one
connection: session recovery frees it (``iser_conn_release``) and makes
a new one for the next login, as ib_iser does for each ``ep_connect``.
"""

from __future__ import annotations

import contextlib

from softrdma.cm.cma import RdmaCmId, RdmaConnParam, RdmaEventChannel
from softrdma.dma.types import DMA_FROM_DEVICE, DMA_TO_DEVICE
from softrdma.ulp.iscsi.proto import IscsiPdu
from softrdma.ulp.iscsi.session import IscsiInitiatorConnection
from softrdma.ulp.iser.proto import ISER_HDR_LEN, IserCmHdr, IserHdr, encode_iser_send
from softrdma.ulp.iu import IuBuf, alloc_iu_ring, free_iu_ring
from softrdma.ulp.srp.initiator_map import FrPool
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.device import IbDevice
from softrdma.verbs.enums import IbQpType, IbSendFlags, IbWrOpcode
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import RecvWR, SendWR

__all__ = ["RX_DATA", "TX_SIZE", "IserConn", "wr_id"]

RX_DATA = 8192
"""The receive descriptor's data segment (``ISER_RX_PAYLOAD_SIZE``'s part;
what we declare in MaxRecvDataSegmentLength terms for responses)."""
TX_SIZE = ISER_HDR_LEN + 48
"""``struct iser_tx_desc``: the iSER header and the BHS; data goes as
further SGEs."""
_TX_CTRL = ISER_HDR_LEN + 48 + RX_DATA
_CTRL_DESCS = 8
"""Control descriptors: login, NOP-Out (ours and answers to the target's
pings), TMF and Logout."""
MAX_SEND_SGE = 4
"""The BHS descriptor and up to three segments of immediate data."""

K_SEND, K_REG, K_INV, K_RECV, K_CTRL = range(5)


def wr_id(kind: int, ident: int) -> int:
    """A work request ID: the kind in the low four bits."""
    return ident << 4 | kind


class IserConn:
    """``struct iser_conn`` + ``struct ib_conn``: the CM ID now; the CQ, QP,
    rings and FR pool once the route is resolved (:meth:`create_ib_conn_res`);
    ``iscsi`` the connection's iSCSI machine (a new one per login)."""

    def __init__(
        self,
        dev: IbDevice,
        pd: ProtectionDomain,
        channel: RdmaEventChannel,
        iscsi: IscsiInitiatorConnection,
        can_queue: int,
        max_pages: int,
    ) -> None:
        self.dev = dev
        self.pd = pd
        self.lkey = pd.local_dma_lkey
        self.iscsi = iscsi
        self.can_queue = can_queue
        self.max_pages = max_pages
        self.cid = RdmaCmId(channel)
        self.cq: CompletionQueue | None = None
        self.qp: QueuePair | None = None
        self.pool: FrPool | None = None
        self.rx: list[IuBuf] = []
        self.tx: list[IuBuf] = []
        self.free_tx: list[IuBuf] = []
        self.ctrl: list[IuBuf] = []
        self.free_ctrl: list[IuBuf] = []
        self.ctrl_busy: dict[int, IuBuf] = {}
        self.established = False
        self.disconnected = False
        self.remote_inv = False

    def __repr__(self) -> str:
        return f"<IserConn {self.iscsi!r} established={self.established}>"

    def create_ib_conn_res(self) -> None:
        """``iser_create_ib_conn_res`` + ``iser_alloc_rx_descriptors`` +
        ``iser_alloc_fastreg_pool``; every receive posted."""
        n_rx = self.can_queue + 8
        self.cq = self.dev.create_cq(n_rx + 4 * self.can_queue + 2 * _CTRL_DESCS)
        cap = QpCap(
            max_send_wr=3 * self.can_queue + 2 * _CTRL_DESCS,
            max_recv_wr=n_rx,
            max_send_sge=MAX_SEND_SGE,
            max_recv_sge=1,
        )
        self.qp = self.cid.create_qp(self.pd, QpInitAttr(IbQpType.RC, self.cq, self.cq, cap))
        self.rx = alloc_iu_ring(self.dev, n_rx, ISER_HDR_LEN + 48 + RX_DATA, DMA_FROM_DEVICE)
        self.tx = alloc_iu_ring(self.dev, self.can_queue, TX_SIZE, DMA_TO_DEVICE)
        self.free_tx = list(self.tx)
        self.ctrl = alloc_iu_ring(self.dev, _CTRL_DESCS, _TX_CTRL, DMA_TO_DEVICE)
        self.free_ctrl = list(self.ctrl)
        self.pool = FrPool(self.dev, self.pd, self.can_queue, self.max_pages)
        for i, iu in enumerate(self.rx):
            self.qp.post_recv([RecvWR(wr_id(K_RECV, i), (iu.sge(self.lkey),))])

    def connect(self, send_w_inv: bool) -> None:
        """``iser_route_handler``: the REQ with the iSER CM header
        (``80 00 00 00``; 0xC0 refuses Send with Invalidate)."""
        flags = IserCmHdr().encode()
        if not send_w_inv:
            flags = bytes([flags[0] | 0x40]) + flags[1:]
        self.cid.connect(RdmaConnParam(private_data=flags, rnr_retry_count=7))

    def repost_recv(self, index: int) -> None:
        assert self.qp is not None
        iu = self.rx[index]
        self.qp.post_recv([RecvWR(wr_id(K_RECV, index), (iu.sge(self.lkey),))])

    def post_ctrl(self, pdu: IscsiPdu, ident: int) -> bool:
        """``iser_send_control``: a PDU with its data in a control
        descriptor; False when none is free."""
        assert self.qp is not None
        if not self.free_ctrl:
            return False
        iu = self.free_ctrl.pop()
        data = encode_iser_send(IserHdr(), pdu)
        iu.write(data)
        self.ctrl_busy[ident] = iu
        sge = iu.sge(self.lkey, len(data))
        self.qp.post_send(
            [SendWR(wr_id(K_CTRL, ident), IbWrOpcode.SEND, (sge,), IbSendFlags.SIGNALED)]
        )
        return True

    def ctrl_done(self, ident: int) -> None:
        iu = self.ctrl_busy.pop(ident, None)
        if iu is not None:
            self.free_ctrl.append(iu)

    def disconnect(self) -> None:
        """``iser_conn_terminate``: DREQ (once; it may be gone already)."""
        if self.established and not self.disconnected:
            with contextlib.suppress(Exception):
                self.cid.disconnect()
        self.established = False

    def destroy_qp(self) -> None:
        """The QP goes first: once it is destroyed the device no longer
        touches any buffer, so they can be unmapped."""
        if self.qp is not None:
            self.cid.destroy_qp()
            self.qp = None

    def release(self) -> None:
        """``iser_conn_release`` / ``iser_free_ib_conn_res``: QP, FR pool (its
        keys stop working), CM ID, CQ, every descriptor unmapped and freed."""
        self.disconnect()
        self.destroy_qp()
        if self.pool is not None:
            self.pool.destroy()
            self.pool = None
        self.cid.destroy()
        if self.cq is not None:
            self.cq.destroy()
            self.cq = None
        for ring in (self.rx, self.tx, self.ctrl):
            free_iu_ring(ring)
        self.rx, self.tx, self.ctrl = [], [], []
        self.free_tx, self.free_ctrl = [], []
        self.ctrl_busy.clear()
