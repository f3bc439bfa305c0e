"""The iSER target: LIO's ``ib_isert`` (the RDMA transport) driving
``iscsi_target`` (the iSCSI connection and session logic, here the sans-IO
:class:`~softrdma.ulp.iscsi.session.IscsiTargetConnection`) over the shared
SCSI core :class:`~softrdma.ulp.scsi.ScsiTarget`.

Kernel counterparts: ``drivers/infiniband/ulp/isert/ib_isert.c`` —
``isert_cma_handler`` (RDMA CM events), ``isert_connect_request`` (a
connection: CQ, QP, receive and send descriptors, the iSER CM header of
the REQ), ``isert_rdma_accept`` (the REP's ``iser_cm_hdr``),
``isert_recv_done`` / ``isert_rx_opcode`` (one iSCSI PDU per SEND, with
the STags of the iSER header), ``isert_put_datain`` (RDMA WRITE of the read
data, the SCSI Response chained behind it), ``isert_get_dataout`` (RDMA
READ of the write data not sent as immediate data), ``isert_put_response``
(the SCSI Response, a SEND_WITH_INV of the initiator's STag when the
connection allows remote invalidation), ``isert_put_nopin``,
``isert_put_tm_rsp``, ``isert_put_logout_rsp`` + ``isert_wait_conn``
(logout: the response, then the disconnect), ``isert_free_conn``; and
``drivers/target/iscsi/iscsi_target.c`` for what the PDUs mean.

What LIO does on the wire, and this does too (tests/data/captures,
``iser_login.pcap``): REP private data ``80 00 00 00`` (0x40 added when the
initiator's REQ did not offer Send with Invalidate); every PDU one SEND
with the 28-byte iSER header (no STags from the target); responses to
commands without data and all other PDUs as plain SEND; reads RDMA-WRITTEN
to the read STag / VA, then the response as SEND_WITH_INV of that STag;
writes taken from immediate data and the rest RDMA-READ from the write
STag / VA (which points past the immediate data, as ``ib_iser`` sends it)
in requests of at most 128 KiB, the response then a SEND_WITH_INV of the
write STag.

Everything runs on the devices' schedulers: the RDMA CM hands events to
:meth:`IserTarget._cm_event`, the CQ's completion handler defers to
:class:`~softrdma.ulp.cq_work.CqWork` pass.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from softrdma.cm.cma import (
    RdmaCmError,
    RdmaCmEvent,
    RdmaCmId,
    RdmaConnParam,
)
from softrdma.dma.types import DMA_FROM_DEVICE, DMA_TO_DEVICE
from softrdma.memory.host import Host
from softrdma.ulp.cm_target import CmTargetPort, target_devices
from softrdma.ulp.cq_work import CqWork
from softrdma.ulp.databuf import DataBuf
from softrdma.ulp.iscsi.proto import ISCSI_HDR_LEN, IscsiPdu, IscsiTmfResponseCode
from softrdma.ulp.iscsi.session import (
    ConnectionClosed,
    ConnectionDropped,
    IscsiStep,
    IscsiTargetConnection,
    IscsiTargetNode,
    IscsiTargetPortal,
    IscsiTargetState,
    IscsiUsageError,
    LoginCompleted,
    LogoutRequested,
    PduDropped,
    PduRejected,
    RemoteBuffer,
    ScsiCommandReceived,
    SessionReinstated,
    TmfRequested,
)
from softrdma.ulp.iser.proto import (
    ISER_HDR_LEN,
    IserCmFlag,
    IserCmHdr,
    IserFlag,
    IserHdr,
    IserProtocolError,
    encode_iser_send,
)
from softrdma.ulp.iu import IuBuf, IuMapError, alloc_iu_ring, free_iu_ring
from softrdma.ulp.scsi import (
    AdditionalSense,
    CommandPlan,
    Direction,
    Nexus,
    ScsiResult,
    ScsiStatus,
    ScsiTarget,
    SenseData,
    SenseKey,
    TmfResponse,
    TmFunction,
)
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_unmap_sg
from softrdma.verbs.enums import IbQpType, IbSendFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import IbSigType, QpCap, QpInitAttr, QueuePair
from softrdma.verbs.rw import rdma_rw_ctx_init
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR, WorkCompletion

__all__ = [
    "ISERT_DEFAULT_PORT",
    "ISERT_MAX_RDMA_READ",
    "ISERT_QP_MAX_RECV_DTOS",
    "ISER_HEADERS_LEN",
    "ISER_RX_SIZE",
    "IserConn",
    "IserTarget",
]

log = logging.getLogger("softrdma.isert")

ISERT_DEFAULT_PORT = 3260
"""The iSCSI port LIO's iSER portal listens on (RDMA CM, TCP port space)."""
ISER_HEADERS_LEN = ISER_HDR_LEN + ISCSI_HDR_LEN
"""iSER header + BHS (``ISER_HEADERS_LEN``)."""
ISER_DEF_DATA_SEG = 8192
"""The largest data segment either side sends by default
(``ISCSI_DEF_MAX_RECV_SEG_LEN``; LIO answers TargetRecvDataSegmentLength=8192)."""
ISER_RX_SIZE = ISER_HEADERS_LEN + ISER_DEF_DATA_SEG
"""A receive descriptor (``ISER_RX_PAYLOAD_SIZE`` / ``ISER_RX_LOGIN_SIZE``):
headers plus an 8 KiB data segment (login text or immediate data)."""
ISER_TX_SIZE = ISER_HEADERS_LEN + ISER_DEF_DATA_SEG
"""A send descriptor: headers plus a data segment (login text, sense,
NOP-In echo, a rejected header)."""
ISERT_QP_MAX_RECV_DTOS = 128
"""Receive descriptors per connection (``ISERT_QP_MAX_RECV_DTOS``)."""
ISERT_MAX_RDMA_READ = 128 << 10
"""The largest RDMA READ request the target posts (what the capture shows)."""
_SQ_SIZE = 1024
_MAX_SGE = 16

_TMF: dict[int, TmFunction] = {
    1: TmFunction.ABORT_TASK,
    2: TmFunction.ABORT_TASK_SET,
    3: TmFunction.CLEAR_ACA,
    4: TmFunction.CLEAR_TASK_SET,
    5: TmFunction.LOGICAL_UNIT_RESET,
}
_TMF_RSP: dict[TmfResponse, int] = {
    TmfResponse.FUNCTION_COMPLETE: IscsiTmfResponseCode.COMPLETE,
    TmfResponse.FUNCTION_SUCCEEDED: IscsiTmfResponseCode.COMPLETE,
    TmfResponse.FUNCTION_REJECTED: IscsiTmfResponseCode.REJECTED,
    TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER: IscsiTmfResponseCode.NO_LUN,
}


class ConnState(enum.Enum):
    """``enum iser_conn_state``."""

    CONNECTING = "connecting"
    UP = "up"
    CLOSING = "closing"
    RELEASED = "released"


@dataclass
class _Cmd:
    """``struct isert_cmd`` with its ``iscsit_cmd``: one command in flight."""

    itt: int
    ev: ScsiCommandReceived
    plan: CommandPlan | None = None
    buf: DataBuf | None = None
    inv_rkey: int = 0
    aborted: bool = False


@dataclass
class _Pending:
    data: bytes
    inv_rkey: int
    before: list[SendWR]
    cmd: _Cmd | None
    then: Callable[[], None] | None


class IserConn:
    """``struct isert_conn`` with its ``iscsit_conn``: one RDMA connection,
    its QP, CQ, descriptors, and the iSCSI connection machine."""

    def __init__(
        self, target: IserTarget, cm_id: RdmaCmId, pd: ProtectionDomain, snd_w_inv: bool
    ) -> None:
        assert cm_id.device is not None
        self.target = target
        self.cm_id = cm_id
        self.dev: IbDevice = cm_id.device
        self.pd = pd
        self.snd_w_inv = snd_w_inv
        self.state = ConnState.CONNECTING
        self.stats: Counter[str] = target.stats
        self.conn: IscsiTargetConnection = target.portal.connection()
        self.nexus: Nexus | None = None
        self.cmds: dict[int, _Cmd] = {}
        self._pending: list[_Pending] = []
        rq = target.rq_size
        self.work = CqWork(self.dev, rq + _SQ_SIZE, on_unclaimed=self._unclaimed)
        self.cq: CompletionQueue = self.work.cq
        cap = QpCap(max_send_wr=_SQ_SIZE, max_recv_wr=rq, max_send_sge=_MAX_SGE, max_recv_sge=1)
        self.qp: QueuePair = cm_id.create_qp(
            pd, QpInitAttr(IbQpType.RC, self.cq, self.cq, cap, sq_sig_type=IbSigType.REQ_WR)
        )
        self.recv_ring: list[IuBuf] = []
        self.send_ring: list[IuBuf] = []
        try:
            self.recv_ring = alloc_iu_ring(self.dev, rq, target.rx_size, DMA_FROM_DEVICE)
            self.send_ring = alloc_iu_ring(self.dev, target.tx_count, ISER_TX_SIZE, DMA_TO_DEVICE)
        except IuMapError:
            free_iu_ring(self.recv_ring)
            cm_id.destroy_qp()
            self.work.destroy()
            raise
        self._free_send = list(self.send_ring)
        for iu in self.recv_ring:
            self._post_recv(iu)
        self.cq.req_notify()

    def __repr__(self) -> str:
        return f"IserConn({self.state.value}, {self.conn!r})"

    # -- work requests and completions --------------------------------------------

    def _wr_id(self, done: Callable[[WorkCompletion], None]) -> int:
        return self.work.wr_id(done)

    def _post_recv(self, iu: IuBuf) -> None:
        wr_id = self._wr_id(lambda wc: self._recv_done(iu, wc))
        self.qp.post_recv(RecvWR(wr_id, (iu.sge(self.pd.local_dma_lkey),)))

    def _unclaimed(self, wc: WorkCompletion) -> None:
        """An unsignaled WR's error completion closes the connection
        (``isert_print_wc`` + ``iscsit_cause_connection_reinstatement``)."""
        if wc.status not in (IbWcStatus.SUCCESS, IbWcStatus.WR_FLUSH_ERR):
            self._rdma_error(f"{wc.opcode.name}: {wc.status.name}")

    def _rdma_error(self, why: str) -> None:
        if self.state in (ConnState.CONNECTING, ConnState.UP):
            log.warning("%r: %s", self, why)
            self.stats["rdma_errors"] += 1
            self.close()

    # -- receiving PDUs ------------------------------------------------------------

    def _recv_done(self, iu: IuBuf, wc: WorkCompletion) -> None:
        """``isert_recv_done``: the iSER header's STags go with the PDU to
        the iSCSI machine (``isert_rx_opcode``)."""
        if wc.status is not IbWcStatus.SUCCESS:
            if wc.status is not IbWcStatus.WR_FLUSH_ERR:
                self._rdma_error(f"receive: {wc.status.name}")
            return
        data = iu.read(wc.byte_len)
        if self.state in (ConnState.CONNECTING, ConnState.UP):
            self._post_recv(iu)
        self.stats["pdus_received"] += 1
        try:
            hdr = IserHdr.decode(data)
        except IserProtocolError as e:
            self.stats["bad_iser_header"] += 1
            log.warning("%r: %s", self, e)
            self.close()
            return
        read_buf = RemoteBuffer(hdr.read_stag, hdr.read_va) if hdr.flags & IserFlag.RSV else None
        write_buf = RemoteBuffer(hdr.write_stag, hdr.write_va) if hdr.flags & IserFlag.WSV else None
        step = self.conn.receive(data[ISER_HDR_LEN:], read_buf=read_buf, write_buf=write_buf)
        self._handle_step(step)

    def _handle_step(self, step: IscsiStep) -> None:
        """Send the machine's PDUs in order, then act on its events."""
        ending: str | None = None
        observer = self.target.observer
        for ev in step.events:
            if observer is not None:
                observer(self, ev)
            if isinstance(ev, ConnectionClosed | ConnectionDropped):
                ending = ev.why
            if isinstance(ev, ConnectionDropped):
                self.stats["dropped_connections"] += 1
        for i, pdu in enumerate(step.pdus):
            last = i == len(step.pdus) - 1
            then = self.close if ending is not None and last else None
            self._send_pdu(pdu, then=then)
        for ev in step.events:
            if isinstance(ev, LoginCompleted):
                self._logged_in(ev)
            elif isinstance(ev, ScsiCommandReceived):
                self._handle_cmd(ev)
            elif isinstance(ev, TmfRequested):
                self._handle_tmf(ev)
            elif isinstance(ev, SessionReinstated):
                self.target._reinstated(ev.old_connections)
            elif isinstance(ev, LogoutRequested):
                self.stats["logouts"] += 1
                for itt in ev.outstanding:
                    cmd = self.cmds.get(itt)
                    if cmd is not None:
                        cmd.aborted = True
            elif isinstance(ev, PduRejected):
                self.stats["rejects"] += 1
                log.info("%r: rejected a PDU: %s", self, ev.why)
            elif isinstance(ev, PduDropped):
                self.stats["dropped"] += 1
        if ending is not None:
            log.info("%r: connection ends: %s", self, ending)
            if not step.pdus:
                self.close()

    def _logged_in(self, ev: LoginCompleted) -> None:
        """``iscsi_post_login_handler``: the session joins the SCSI core."""
        self.stats["logins"] += 1
        if ev.session_type == "Normal":
            self.nexus = Nexus(f"{ev.initiator_name},i,0x{ev.isid:012x}",
                               f"{ev.target_name},t,0x{self.target.portal.tpgt:04x}")  # fmt: skip
            self.target.scsi.add_nexus(self.nexus)

    # -- SCSI commands ------------------------------------------------------------

    def _handle_cmd(self, ev: ScsiCommandReceived) -> None:
        """``isert_handle_scsi_cmd`` + ``iscsit_setup_scsi_cmd``: set up in
        the core, then move the data."""
        self.stats["commands"] += 1
        assert self.nexus is not None
        cmd = _Cmd(ev.itt, ev)
        if self.snd_w_inv:
            if ev.read_buf is not None:
                cmd.inv_rkey = ev.read_buf.stag
            elif ev.write_buf is not None:
                cmd.inv_rkey = ev.write_buf.stag
        self.cmds[ev.itt] = cmd
        plan = self.target.scsi.setup(
            self.nexus, ev.lun, ev.cdb, tag=ev.itt, expected_length=ev.expected_length
        )
        cmd.plan = plan
        if plan.result is not None:
            self._respond(cmd, self.target.scsi.execute(plan))
            return
        if plan.direction is Direction.DATA_OUT:
            need = plan.transfer_length
            imm = ev.immediate_data
            if len(imm) >= need:
                self._execute(cmd, imm[:need])
            elif ev.write_buf is None:
                self._check(cmd, AdditionalSense.INVALID_FIELD_IN_COMMAND_IU)
            else:
                self._get_dataout(cmd, ev.write_buf, need - len(imm))
        elif plan.direction is Direction.DATA_IN:
            self._put_datain(cmd)
        else:
            self._execute(cmd, None)

    def _get_dataout(self, cmd: _Cmd, remote: RemoteBuffer, length: int) -> None:
        """``isert_get_dataout``: RDMA READ what was not immediate data from
        the write STag / VA, at most 128 KiB per READ request."""
        buf = DataBuf.alloc(self.dev.host, length, "isert")
        cmd.buf = buf
        if not ib_dma_map_sg(self.dev, buf.sgl, DMA_FROM_DEVICE):
            self._busy(cmd)
            return
        buf.direction = DMA_FROM_DEVICE
        wrs: list[SendWR] = []
        try:
            for off in range(0, length, ISERT_MAX_RDMA_READ):
                take = min(ISERT_MAX_RDMA_READ, length - off)
                ctx = rdma_rw_ctx_init(self.qp, buf.sgl, remote.va + off, remote.stag,
                                       DMA_FROM_DEVICE, sg_offset=off, length=take)  # fmt: skip
                wrs.extend(ctx.wrs)
        except VerbsError as e:
            self._fail(cmd, f"rdma_rw_ctx_init: {e}")
            return
        last = wrs[-1]
        assert isinstance(last, RdmaWR)
        wr_id = self._wr_id(lambda wc: self._dataout_done(cmd, wc))
        wrs[-1] = RdmaWR(wr_id, last.opcode, last.sg_list, IbSendFlags.SIGNALED,
                         remote_addr=last.remote_addr, rkey=last.rkey)  # fmt: skip
        self.stats["rdma_reads"] += len(wrs)
        self._post(wrs, cmd)

    def _dataout_done(self, cmd: _Cmd, wc: WorkCompletion) -> None:
        """``isert_rdma_read_done``: the data is here; execute."""
        buf = cmd.buf
        assert buf is not None
        self._unmap(buf)
        if wc.status is not IbWcStatus.SUCCESS:
            self._fail(cmd, f"RDMA READ failed: {wc.status.name}")
            return
        if cmd.aborted or self.state is not ConnState.UP:
            self._finish(cmd)
            return
        self._execute(cmd, cmd.ev.immediate_data + buf.read())

    def _execute(self, cmd: _Cmd, data_out: bytes | None) -> None:
        assert cmd.plan is not None
        self._respond(cmd, self.target.scsi.execute(cmd.plan, data_out))

    def _put_datain(self, cmd: _Cmd) -> None:
        """``isert_put_datain``: execute, RDMA WRITE the data to the read
        STag / VA, the SCSI Response chained behind."""
        assert cmd.plan is not None
        result = self.target.scsi.execute(cmd.plan)
        data = result.data_in[: cmd.ev.expected_length]
        remote = cmd.ev.read_buf
        if not data:
            self._respond(cmd, result)
            return
        if remote is None:
            self._check(cmd, AdditionalSense.INVALID_FIELD_IN_COMMAND_IU)
            return
        buf = DataBuf.alloc(self.dev.host, len(data), "isert")
        cmd.buf = buf
        buf.write(data)
        if not ib_dma_map_sg(self.dev, buf.sgl, DMA_TO_DEVICE):
            self._busy(cmd)
            return
        buf.direction = DMA_TO_DEVICE
        try:
            ctx = rdma_rw_ctx_init(self.qp, buf.sgl, remote.va, remote.stag, DMA_TO_DEVICE)
        except VerbsError as e:
            self._fail(cmd, f"rdma_rw_ctx_init: {e}")
            return
        self.stats["rdma_writes"] += len(ctx.wrs)
        self._respond(cmd, result, before=list(ctx.wrs))

    def _respond(self, cmd: _Cmd, result: ScsiResult, before: list[SendWR] | None = None) -> None:
        """``isert_put_response``: the SCSI Response, a SEND_WITH_INV of the
        initiator's STag when it gave one and allows remote invalidation."""
        if cmd.aborted:
            self._finish(cmd)
            return
        try:
            pdu = self.conn.respond(
                cmd.itt,
                status=int(result.status),
                sense=result.sense,
                underflow=result.underflow,
                overflow=result.overflow,
            )
        except IscsiUsageError:  # the task is gone (logout, aborted)
            self._finish(cmd)
            return
        self._send_pdu(pdu, inv_rkey=cmd.inv_rkey, before=before, cmd=cmd)

    def _check(self, cmd: _Cmd, code: AdditionalSense) -> None:
        if cmd.plan is not None:
            self.target.scsi.release(cmd.plan)
        sense = SenseData.of(SenseKey.ILLEGAL_REQUEST, code).encode()
        self._respond(cmd, ScsiResult(ScsiStatus.CHECK_CONDITION, sense=sense))

    def _busy(self, cmd: _Cmd) -> None:
        """No mapping space for the data buffer now: BUSY, the initiator
        retries (``target_send_busy``)."""
        self.stats["busy"] += 1
        if cmd.plan is not None:
            self.target.scsi.release(cmd.plan)
        self._release_buf(cmd)
        self._respond(cmd, ScsiResult(ScsiStatus.BUSY))

    def _fail(self, cmd: _Cmd, why: str) -> None:
        """The data could not move: the command and the connection end."""
        if cmd.plan is not None:
            self.target.scsi.release(cmd.plan)
        self._finish(cmd)
        self._rdma_error(f"command {cmd.itt:#x}: {why}")

    # -- task management -----------------------------------------------------------

    def _handle_tmf(self, ev: TmfRequested) -> None:
        """``iscsit_handle_task_mgt_cmd`` → the core's task management;
        ``isert_put_tm_rsp``."""
        self.stats["task_management"] += 1
        function = _TMF.get(ev.function)
        aborted: list[int] = []
        if function is None or self.nexus is None:
            code = int(IscsiTmfResponseCode.NOT_SUPPORTED)
        else:
            tag = ev.rtt if function is TmFunction.ABORT_TASK else None
            result = self.target.scsi.task_management(self.nexus, function, ev.lun, tag=tag)
            code = int(_TMF_RSP[result.response])
            if function is TmFunction.ABORT_TASK and not result.aborted:
                code = int(IscsiTmfResponseCode.NO_TASK)
            for plan in result.aborted:
                self.stats["aborted"] += 1
                cmd = self.cmds.get(plan.tag) if isinstance(plan.tag, int) else None
                if cmd is not None:
                    cmd.aborted = True
                    aborted.append(cmd.itt)
                    if cmd.buf is None:
                        self._finish(cmd)
        try:
            pdu = self.conn.respond_tmf(ev.itt, code, aborted=aborted)
        except IscsiUsageError:
            return
        self._send_pdu(pdu)

    # -- sending -------------------------------------------------------------------

    def _post(self, wrs: list[SendWR], cmd: _Cmd | None) -> None:
        try:
            self.qp.post_send(wrs)
        except VerbsError as e:
            if cmd is not None:
                self._fail(cmd, f"post_send: {e}")
            else:
                self._rdma_error(f"post_send: {e}")

    def _send_pdu(
        self,
        pdu: IscsiPdu,
        *,
        inv_rkey: int = 0,
        before: list[SendWR] | None = None,
        cmd: _Cmd | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """``isert_init_send_wr`` + ``isert_post_response``: one SEND (or
        SEND_WITH_INV) with the iSER header; queued while every send
        descriptor is in flight."""
        if self.state is ConnState.RELEASED:
            return
        data = encode_iser_send(IserHdr(), pdu)
        self.stats["pdus_sent"] += 1
        item = _Pending(data, inv_rkey, list(before or []), cmd, then)
        if not self._free_send or self._pending:
            self._pending.append(item)
            return
        self._post_pending(item)

    def _post_pending(self, item: _Pending) -> None:
        iu = self._free_send.pop()
        if len(item.data) > iu.size:
            self._free_send.append(iu)
            self._rdma_error(f"a {len(item.data)}-byte PDU does not fit a send descriptor")
            return
        iu.write(item.data)
        wr_id = self._wr_id(lambda wc: self._send_done(iu, item, wc))
        sge = (iu.sge(self.pd.local_dma_lkey, len(item.data)),)
        if item.inv_rkey:
            self.stats["send_with_inv"] += 1
            send = SendWR(wr_id, IbWrOpcode.SEND_WITH_INV, sge, IbSendFlags.SIGNALED,
                          invalidate_rkey=item.inv_rkey)  # fmt: skip
        else:
            send = SendWR(wr_id, IbWrOpcode.SEND, sge, IbSendFlags.SIGNALED)
        self._post([*item.before, send], item.cmd)

    def _send_done(self, iu: IuBuf, item: _Pending, wc: WorkCompletion) -> None:
        """``isert_send_done``: the descriptor and the command's buffer are
        free again."""
        self._free_send.append(iu)
        if item.cmd is not None:
            self._finish(item.cmd)
        if wc.status is not IbWcStatus.SUCCESS:
            if wc.status is not IbWcStatus.WR_FLUSH_ERR:
                self._rdma_error(f"send: {wc.status.name}")
            return
        if item.then is not None:
            item.then()
        while self._pending and self._free_send and self.state is not ConnState.RELEASED:
            self._post_pending(self._pending.pop(0))

    def _unmap(self, buf: DataBuf) -> None:
        if buf.direction is not None:
            ib_dma_unmap_sg(self.dev, buf.sgl, buf.direction)
            buf.direction = None

    def _release_buf(self, cmd: _Cmd) -> None:
        if cmd.buf is not None:
            self._unmap(cmd.buf)
            cmd.buf.free()
            cmd.buf = None

    def _finish(self, cmd: _Cmd) -> None:
        self._release_buf(cmd)
        self.cmds.pop(cmd.itt, None)

    # -- the connection ------------------------------------------------------------

    @property
    def disconnecting(self) -> bool:
        """This side has sent its DREQ (``ISER_CONN_TERMINATING``)."""
        return self.state is ConnState.CLOSING

    def established(self) -> None:
        """``isert_connected_handler``."""
        if self.state is ConnState.CONNECTING:
            self.state = ConnState.UP

    def close(self) -> None:
        """``isert_conn_terminate``: DREQ; resources go on DISCONNECTED."""
        if self.state in (ConnState.CLOSING, ConnState.RELEASED):
            return
        self.state = ConnState.CLOSING
        try:
            self.cm_id.disconnect()
        except RdmaCmError:
            self.release()

    def release(self) -> None:
        """``isert_free_conn`` + ``iscsit_close_connection``: the session
        leaves the core, every buffer is unmapped and freed."""
        if self.state is ConnState.RELEASED:
            return
        self.state = ConnState.RELEASED
        if self.conn.state is not IscsiTargetState.FREE:
            self.conn.transport_closed()
        if self.nexus is not None:
            for _ in self.target.scsi.remove_nexus(self.nexus):
                self.stats["aborted"] += 1
        self.cm_id.destroy_qp()
        for cmd in list(self.cmds.values()):
            self._finish(cmd)
        self._pending.clear()
        self.work.destroy()
        free_iu_ring(self.recv_ring)
        free_iu_ring(self.send_ring)
        self.cm_id.destroy()
        self.target._forget(self)


class IserTarget(CmTargetPort[IserConn]):
    """An iSER network portal of LIO (``ib_isert`` under ``iscsi_target``)
    on a host's RDMA devices: listens on the RDMA CM at ``addr:port`` and
    serves ``scsi`` under the iSCSI target names ``targets`` (or a ready
    ``portal``) to every initiator that logs in.

    ``rq_size`` receive descriptors per connection (the CmdSN window is
    kept within it), ``max_recv_data_segment`` the data segment a receive
    descriptor holds (TargetRecvDataSegmentLength, 8 KiB as LIO).
    ``observer(conn, event)`` sees every event of every connection's iSCSI
    machine (``LoginCompleted``, ``LoginFailed``, ``LogoutRequested``,
    ``ConnectionClosed``, ...) before the target acts on it, on the
    progress path holding the device's lock: a tool's log."""

    def __init__(
        self,
        host: Host,
        scsi: ScsiTarget,
        targets: Iterable[IscsiTargetNode | str] = ("iqn.2003-01.org.linux-iscsi.softrdma:disk",),
        *,
        addr: str | IPv4Address = "0.0.0.0",
        port: int = ISERT_DEFAULT_PORT,
        portal: IscsiTargetPortal | None = None,
        rq_size: int = ISERT_QP_MAX_RECV_DTOS,
        max_recv_data_segment: int = ISER_DEF_DATA_SEG,
        seed: int | None = None,
        observer: Callable[[IserConn, object], None] | None = None,
    ) -> None:
        target_devices(host)
        self.host = host
        self.scsi = scsi
        self.rq_size = rq_size
        self.rx_size = ISER_HEADERS_LEN + max_recv_data_segment
        self.tx_count = rq_size + 4
        if portal is None:
            portal = IscsiTargetPortal(
                targets,
                address=f"{addr}:{port}",
                cmdsn_depth=max(1, min(64, rq_size - 4)),
                seed=seed,
            )
        self.portal = portal
        self.observer = observer
        self.stats: Counter[str] = Counter()
        """``connects``, ``logins``, ``logouts``, ``commands``,
        ``rdma_reads`` / ``rdma_writes`` (work requests), ``send_with_inv``,
        ``rejects``, ``dropped``, ``dropped_connections``, ``rdma_errors``,
        ``task_management``, ``aborted``, ``busy``, ``bad_iser_header``."""
        super().__init__(host, addr, port)

    @property
    def conns(self) -> list[IserConn]:
        """The connections, logged in or not yet."""
        return self._conns

    def __repr__(self) -> str:
        return f"IserTarget(port {self.port}, {len(self.conns)} connections)"

    def close(self) -> None:
        """Disconnect every initiator and stop listening
        (``isert_free_np``)."""
        super().close()

    def _reinstated(self, old: tuple[IscsiTargetConnection, ...]) -> None:
        for c in list(self.conns):
            if c.conn in old:
                c.close()

    def _connect_request(self, ev: RdmaCmEvent) -> None:
        """``isert_connect_request`` + ``isert_rdma_accept``: the REQ's iSER
        CM header (or none) decides remote invalidation; the REP carries
        ours."""
        cm_id = ev.id
        private = ev.param.private_data if ev.param else b""
        snd_w_inv = False
        if private:
            try:
                hdr = IserCmHdr.decode(private)
            except IserProtocolError:
                self.stats["connect_rejects"] += 1
                cm_id.reject()
                cm_id.destroy()
                return
            snd_w_inv = not hdr.flags & IserCmFlag.SEND_W_INV_NOT_SUP
        assert cm_id.device is not None
        try:
            c = IserConn(self, cm_id, self._pd(cm_id.device), snd_w_inv)
        except (VerbsError, RdmaCmError, IuMapError) as e:
            log.warning("cannot set up a connection: %s", e)
            self.stats["connect_rejects"] += 1
            cm_id.reject()
            cm_id.destroy()
            return
        self.conns.append(c)
        self.stats["connects"] += 1
        flags = IserCmFlag.ZBVA_NOT_SUP
        if not snd_w_inv:
            flags |= IserCmFlag.SEND_W_INV_NOT_SUP
        cm_id.accept(RdmaConnParam(private_data=IserCmHdr(flags).encode(), responder_resources=4,
                                   initiator_depth=4, flow_control=1, rnr_retry_count=7))  # fmt: skip
