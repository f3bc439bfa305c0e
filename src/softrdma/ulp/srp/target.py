"""The SRP target: LIO's ``ib_srpt`` — SRP logins over the RDMA CM, one RDMA
channel per login, SCSI commands handed to a target core, data moved only
by RDMA READ (SCSI writes) and RDMA WRITE (SCSI reads) through the
descriptors the initiator sent, or taken from the immediate data of its
SRP_CMD.

Kernel counterpart: ``drivers/infiniband/ulp/srpt/ib_srpt.c`` —
``srpt_cm_req_recv`` (login: the request in the RDMA CM REQ's private data,
the response in the REP's, a rejection in the REJ's), ``srpt_create_ch_ib``
(the channel's CQ and QP), ``srpt_alloc_ioctx_ring`` (receive IUs of
``srp_max_req_size``, send IUs of ``srp_max_rsp_size``), ``srpt_handle_new_iu``
(dispatch by opcode), ``srpt_get_desc_tbl`` (direct, indirect and immediate
data descriptors; external descriptor tables are not fetched),
``srpt_alloc_rw_ctxs`` (one ``rdma_rw_ctx`` per descriptor),
``srpt_build_cmd_rsp`` / ``srpt_build_tskmgmt_rsp``, ``srpt_close_ch``.

Everything runs on the devices' schedulers holding their lock: the RDMA CM
hands events to :meth:`SrpTarget._cm_event` (an in-kernel consumer's event
handler), a CQ's completion handler defers to a pass of the channel's :class:`~softrdma.ulp.cq_work.CqWork`
(the kernel's completion work). So the same target serves an in-process
fabric driven by its initiators' polling, and a real network from the
progress thread while its process sleeps.

Credits: the login grants ``rq_size`` (``SRPT_RQ_SIZE``), and every
response returns one (``req_lim_delta`` 1, as the captures show). The
receive ring has exactly that many buffers: an initiator that ignores its
credits meets RNR NAKs at the RC layer until a buffer is free again.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
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
from softrdma.ulp.srp.proto import (
    SrpAerRsp,
    SrpBufFmt,
    SrpCmd,
    SrpCredRsp,
    SrpDataBuf,
    SrpDirectBuf,
    SrpError,
    SrpILogout,
    SrpImmBuf,
    SrpIndirectBuf,
    SrpLoginRej,
    SrpLoginRejReason,
    SrpLoginReq,
    SrpLoginReqFlag,
    SrpLoginRsp,
    SrpLoginRspFlag,
    SrpRsp,
    SrpTLogout,
    SrpTskMgmt,
    SrpTskMgmtFunc,
    decode_srp_iu,
)
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_unmap_sg
from softrdma.verbs.enums import IbQpType, IbSendFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import IbSigType, QpCap, QpInitAttr, QueuePair
from softrdma.verbs.rw import RdmaRwCtx, rdma_rw_ctx_init
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR, WorkCompletion

__all__ = [
    "SRPT_DEFAULT_PORT",
    "SRPT_RQ_SIZE",
    "SRP_MAX_REQ_SIZE",
    "SRP_MAX_RSP_SIZE",
    "SrpChannel",
    "SrpTarget",
]

log = logging.getLogger("softrdma.srpt")

SRPT_DEFAULT_PORT = 5555
"""The RDMA CM port ``ib_srpt`` listens on when configured for RDMA CM."""
SRPT_RQ_SIZE = 128
"""Credits a login grants and receive IUs per channel (``SRPT_RQ_SIZE``)."""
SRP_MAX_REQ_SIZE = 8276
"""``srp_max_req_size``: the largest IU an initiator may send (8 KiB of
immediate data plus the SRP_CMD around it) — LIO's default, as the captures
show in ``max_it_iu_len``."""
SRP_MAX_RSP_SIZE = 256
"""``srp_max_rsp_size``: a response IU (36 bytes + 4 + up to 96 of sense)."""
SRPT_SQ_SIZE = 4096
"""``srpt_sq_size``: send-queue entries (responses and RDMA operations)."""
_MAX_SGE = 16

# SRP task management response codes (srp.h SRP_TSK_MGMT_*).
_TMF_CODE = {
    TmfResponse.FUNCTION_COMPLETE: 0x00,
    TmfResponse.FUNCTION_SUCCEEDED: 0x00,
    TmfResponse.FUNCTION_REJECTED: 0x04,
    TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER: 0x09,
}
_TMF: dict[int, TmFunction] = {
    SrpTskMgmtFunc.ABORT_TASK: TmFunction.ABORT_TASK,
    SrpTskMgmtFunc.ABORT_TASK_SET: TmFunction.ABORT_TASK_SET,
    SrpTskMgmtFunc.CLEAR_TASK_SET: TmFunction.CLEAR_TASK_SET,
    SrpTskMgmtFunc.LUN_RESET: TmFunction.LOGICAL_UNIT_RESET,
    SrpTskMgmtFunc.CLEAR_ACA: TmFunction.CLEAR_ACA,
}
_T_LOGOUT_INVALID_IU = 2
"""SRP_T_LOGOUT reason: an information unit with an invalid type code."""


class ChState(enum.Enum):
    """``enum rdma_ch_state``."""

    CONNECTING = "connecting"
    LIVE = "live"
    DISCONNECTING = "disconnecting"
    RELEASED = "released"


@dataclass
class _Cmd:
    """``struct srpt_send_ioctx``: one command in flight."""

    tag: int
    plan: CommandPlan | None = None
    buf: DataBuf | None = None
    data_out: bytes | None = None
    expected: int = 0


class SrpChannel:
    """``struct srpt_rdma_ch``: one logged-in initiator — its RDMA CM ID,
    QP, CQ, IU rings and commands in flight."""

    def __init__(
        self,
        target: SrpTarget,
        cm_id: RdmaCmId,
        login: SrpLoginReq,
        pd: ProtectionDomain,
    ) -> None:
        assert cm_id.device is not None
        self.target = target
        self.cm_id = cm_id
        self.dev: IbDevice = cm_id.device
        self.pd = pd
        self.login = login
        self.state = ChState.CONNECTING
        self.nexus = Nexus(login.initiator_port_id, login.target_port_id)
        self.initiator_port_id = login.initiator_port_id
        self.imm_data = bool(login.req_flags & SrpLoginReqFlag.IMMED_REQUESTED)
        self.imm_data_offset = login.imm_data_offset if self.imm_data else 0
        self.req_size = login.req_it_iu_len
        self.stats: Counter[str] = target.stats
        self.cmds: dict[int, _Cmd] = {}
        rq = target.rq_size
        self.work = CqWork(self.dev, rq + SRPT_SQ_SIZE)
        self.cq: CompletionQueue = self.work.cq
        cap = QpCap(max_send_wr=SRPT_SQ_SIZE, max_recv_wr=rq, max_send_sge=_MAX_SGE, max_recv_sge=1)
        self.qp: QueuePair = cm_id.create_qp(
            pd, QpInitAttr(IbQpType.RC, self.cq, self.cq, cap, sq_sig_type=IbSigType.REQ_WR)
        )
        self.recv_ring: list[IuBuf] = []
        self.send_ring: list[IuBuf] = []
        try:
            self.recv_ring = alloc_iu_ring(self.dev, rq, self.req_size, DMA_FROM_DEVICE)
            self.send_ring = alloc_iu_ring(self.dev, rq, SRP_MAX_RSP_SIZE, DMA_TO_DEVICE)
        except IuMapError:
            # srpt_create_ch_ib's error path: nothing of the channel stays.
            free_iu_ring(self.recv_ring)
            cm_id.destroy_qp()
            self.work.destroy()
            raise
        self._free_send = list(self.send_ring)
        # Send IUs promised to the IUs received and not answered yet, and the
        # IUs waiting for one (``ch->cmd_wait_list``): their receive buffers
        # are not posted again until they are handled.
        self._reserved = 0
        self._wait_list: list[tuple[IuBuf, bytes]] = []
        for iu in self.recv_ring:
            self._post_recv(iu)
        self.cq.req_notify()
        target.scsi.add_nexus(self.nexus)

    def __repr__(self) -> str:
        return f"SrpChannel({self.initiator_port_id.hex()}, {self.state.value})"

    # -- work requests and completions ----------------------------------------------

    def _wr_id(self, done: Callable[[WorkCompletion], None]) -> int:
        return self.work.wr_id(done)

    def _post_recv(self, iu: IuBuf) -> None:
        wr_id = self._wr_id(lambda wc: self._recv_done(iu, wc))
        self.qp.post_recv(RecvWR(wr_id, (iu.sge(self.pd.local_dma_lkey),)))

    # -- receiving IUs ----------------------------------------------------------------

    def _recv_done(self, iu: IuBuf, wc: WorkCompletion) -> None:
        """``srpt_recv_done`` + ``srpt_handle_new_iu``."""
        if wc.status is not IbWcStatus.SUCCESS:
            if wc.status is not IbWcStatus.WR_FLUSH_ERR:
                self.stats["recv_errors"] += 1
            return
        data = iu.read(wc.byte_len)
        self.stats["iu_received"] += 1
        if self._reserved >= len(self._free_send):
            # No send IU for its answer (an initiator beyond its credits):
            # the IU waits and its receive buffer stays taken, so the receive
            # queue runs dry and the RC layer answers RNR NAK
            # (srpt_handle_new_iu's cmd_wait_list).
            self.stats["iu_waiting"] += 1
            self._wait_list.append((iu, data))
            return
        self._handle_new_iu(iu, data)

    def _process_wait_list(self) -> None:
        """``srpt_process_wait_list``: a send IU is free again."""
        while self._wait_list and self._reserved < len(self._free_send):
            if self.state is not ChState.LIVE and self.state is not ChState.CONNECTING:
                self._wait_list.clear()
                return
            iu, data = self._wait_list.pop(0)
            self._handle_new_iu(iu, data)

    def _handle_new_iu(self, iu: IuBuf, data: bytes) -> None:
        """``srpt_handle_new_iu``: the IU has a send IU for its answer; its
        receive buffer is posted again (the credit comes back with the answer)."""
        self._reserved += 1
        if self.state is ChState.LIVE or self.state is ChState.CONNECTING:
            self._post_recv(iu)
        try:
            unit = decode_srp_iu(data, self.imm_data_offset or None)
        except SrpError as e:
            self._bad_iu(data, str(e))
            return
        if isinstance(unit, SrpCmd):
            self._handle_cmd(unit)
        elif isinstance(unit, SrpTskMgmt):
            self._handle_tsk_mgmt(unit)
        elif isinstance(unit, SrpILogout):
            self._reserved -= 1  # not answered
            log.info("%r: initiator logout", self)
            self.stats["logouts"] += 1
            self.close()
        elif isinstance(unit, SrpCredRsp | SrpAerRsp):
            self._reserved -= 1  # acknowledgements of requests this target does not send
        else:
            self._bad_iu(data, f"unexpected {type(unit).__name__} from an initiator")

    def _bad_iu(self, data: bytes, why: str) -> None:
        """A malformed IU: an SRP_CMD with a readable tag gets CHECK
        CONDITION / INVALID FIELD IN COMMAND INFORMATION UNIT; anything else
        ends the channel with SRP_T_LOGOUT (invalid IU type), as SRP asks."""
        self.stats["bad_iu"] += 1
        log.warning("%r: %s", self, why)
        if len(data) >= 16 and data[0] == 0x02:  # an SRP_CMD we cannot parse
            tag = int.from_bytes(data[8:16], "little")
            sense = SenseData.of(
                SenseKey.ILLEGAL_REQUEST, AdditionalSense.INVALID_FIELD_IN_COMMAND_IU
            )
            self._respond(SrpRsp(tag=tag, req_lim_delta=1, status=ScsiStatus.CHECK_CONDITION,
                                 sense=sense.encode()))  # fmt: skip
            return
        tag = int.from_bytes(data[8:16], "little") if len(data) >= 16 else 0
        # Disconnect once the SRP_T_LOGOUT has left (a disconnect now would
        # flush it off the send queue).
        logout = SrpTLogout(tag=tag, reason=_T_LOGOUT_INVALID_IU)
        self._send_iu(logout.encode(), None, then=self.close)

    # -- SCSI commands ------------------------------------------------------------------

    def _descriptors(self, desc: SrpDataBuf | None) -> tuple[SrpDirectBuf, ...] | None:
        """``srpt_get_desc_tbl``: the direct descriptors to move data
        through; None for an external table (not fetched, as ib_srpt)."""
        if desc is None or isinstance(desc, SrpImmBuf):
            return ()
        if isinstance(desc, SrpDirectBuf):
            return (desc,)
        assert isinstance(desc, SrpIndirectBuf)
        if desc.external:
            return None
        return desc.desc_list

    def _handle_cmd(self, cmd: SrpCmd) -> None:
        """``srpt_handle_cmd``: set the command up in the core, fetch its
        data (immediate, or RDMA READ), execute, answer."""
        self.stats["commands"] += 1
        if cmd.tag in self.cmds:
            self._respond_check(
                cmd.tag, AdditionalSense.OVERLAPPED_COMMANDS_ATTEMPTED, SenseKey.ABORTED_COMMAND
            )
            return
        out = self._descriptors(cmd.data_out)
        into = self._descriptors(cmd.data_in)
        if out is None or into is None:
            self.stats["external_tables"] += 1
            self._respond_check(cmd.tag, AdditionalSense.INVALID_FIELD_IN_COMMAND_IU)
            return
        imm = isinstance(cmd.data_out, SrpImmBuf)
        if imm and not self.imm_data:
            self._respond_check(cmd.tag, AdditionalSense.INVALID_FIELD_IN_COMMAND_IU)
            return
        out_len = len(cmd.imm_data) if imm else sum(d.len for d in out)
        in_len = sum(d.len for d in into)
        expected = out_len or in_len
        state = _Cmd(cmd.tag, expected=expected)
        plan = self.target.scsi.setup(
            self.nexus, cmd.lun, cmd.cdb + cmd.add_cdb, tag=cmd.tag, expected_length=expected
        )
        state.plan = plan
        self.cmds[cmd.tag] = state
        if plan.result is not None:  # failed at setup: no data moves
            self._complete(state, self.target.scsi.execute(plan))
            return
        if plan.direction is Direction.DATA_OUT:
            if out_len < plan.transfer_length or (imm and out_len != plan.transfer_length):
                self._respond_check(cmd.tag, AdditionalSense.INVALID_FIELD_IN_COMMAND_IU)
                self.target.scsi.release(plan)
                del self.cmds[cmd.tag]
                return
            if imm:
                self._execute(state, cmd.imm_data)
            else:
                self._fetch(state, out, plan.transfer_length)
        else:
            self._execute_in(state, into)

    def _fetch(self, state: _Cmd, descs: tuple[SrpDirectBuf, ...], length: int) -> None:
        """``srpt_rdma_read``: RDMA READ the write data from the initiator's
        descriptors into a data buffer, then execute."""
        buf = DataBuf.alloc(self.dev.host, length, "srpt")
        state.buf = buf
        if not ib_dma_map_sg(self.dev, buf.sgl, DMA_FROM_DEVICE):
            self._busy(state)
            return
        buf.direction = DMA_FROM_DEVICE
        wrs: list[SendWR] = []
        offset = 0
        for desc in descs:
            take = min(desc.len, length - offset)
            if take <= 0:
                break
            ctx = rdma_rw_ctx_init(self.qp, buf.sgl, desc.va, desc.key, DMA_FROM_DEVICE,
                                   sg_offset=offset, length=take)  # fmt: skip
            wrs.extend(ctx.wrs)
            offset += take
        wr_id = self._wr_id(lambda wc: self._fetched(state, wc))
        last = wrs[-1]
        assert isinstance(last, RdmaWR)
        wrs[-1] = RdmaWR(wr_id, last.opcode, last.sg_list, IbSendFlags.SIGNALED,
                         remote_addr=last.remote_addr, rkey=last.rkey)  # fmt: skip
        self.stats["rdma_reads"] += len(wrs)
        self._post(wrs, state)

    def _fetched(self, state: _Cmd, wc: WorkCompletion) -> None:
        """``srpt_rdma_read_done``."""
        buf = state.buf
        assert buf is not None and state.plan is not None
        self._unmap(buf)
        if wc.status is not IbWcStatus.SUCCESS:
            self._fail(state, f"RDMA READ failed: {wc.status.name}")
            return
        self._execute(state, buf.read())

    def _execute(self, state: _Cmd, data_out: bytes | None) -> None:
        assert state.plan is not None
        result = self.target.scsi.execute(state.plan, data_out)
        self._complete(state, result)

    def _execute_in(self, state: _Cmd, descs: tuple[SrpDirectBuf, ...]) -> None:
        """Execute, then RDMA WRITE the data-in through the descriptors with
        the response chained behind (``srpt_queue_response``)."""
        assert state.plan is not None
        result = self.target.scsi.execute(state.plan)
        data = result.data_in[: sum(d.len for d in descs)]
        if not data:
            self._complete(state, result)
            return
        buf = DataBuf.alloc(self.dev.host, len(data), "srpt")
        state.buf = buf
        buf.write(data)
        if not ib_dma_map_sg(self.dev, buf.sgl, DMA_TO_DEVICE):
            self._busy(state)
            return
        buf.direction = DMA_TO_DEVICE
        wrs: list[SendWR] = []
        offset = 0
        for desc in descs:
            take = min(desc.len, len(data) - offset)
            if take <= 0:
                break
            ctx: RdmaRwCtx = rdma_rw_ctx_init(
                self.qp, buf.sgl, desc.va, desc.key, DMA_TO_DEVICE, sg_offset=offset, length=take
            )
            wrs.extend(ctx.wrs)
            offset += take
        self.stats["rdma_writes"] += len(wrs)
        self._complete(state, result, before=wrs)

    def _complete(
        self, state: _Cmd, result: ScsiResult, before: list[SendWR] | None = None
    ) -> None:
        """``srpt_build_cmd_rsp``: status, sense and residuals; one credit back."""
        plan = state.plan
        under, over = result.underflow, result.overflow
        residual = under - over
        out = plan is not None and plan.direction is Direction.DATA_OUT
        rsp = SrpRsp(
            tag=state.tag,
            req_lim_delta=1,
            status=int(result.status),
            data_out_res_cnt=residual if out else 0,
            data_in_res_cnt=0 if out else residual,
            sense=result.sense,
        )
        self._respond(rsp, state, before)

    def _respond_check(
        self,
        tag: int,
        code: AdditionalSense,
        key: SenseKey = SenseKey.ILLEGAL_REQUEST,
    ) -> None:
        sense = SenseData.of(key, code).encode()
        self._respond(SrpRsp(tag=tag, req_lim_delta=1, status=ScsiStatus.CHECK_CONDITION,
                             sense=sense))  # fmt: skip

    def _busy(self, state: _Cmd) -> None:
        """The data buffer could not be mapped (the device's mapping space —
        swiotlb slots, IOVAs — is used up for now): answer BUSY so the
        initiator sends the command again, as ``srpt_handle_cmd`` does with
        ``target_send_busy``; the channel stays up."""
        log.debug("%r: command %#x: cannot map a data buffer, answering BUSY", self, state.tag)
        self.stats["busy"] += 1
        if state.plan is not None:
            self.target.scsi.release(state.plan)
        self._finish(state)
        self._respond(SrpRsp(tag=state.tag, req_lim_delta=1, status=ScsiStatus.BUSY))

    def _fail(self, state: _Cmd, why: str) -> None:
        """The data could not move: the command ends, the channel too (an
        RDMA error has put the QP in error; ib_srpt closes the channel)."""
        log.warning("%r: command %#x: %s", self, state.tag, why)
        self.stats["rdma_errors"] += 1
        if state.plan is not None:
            self.target.scsi.release(state.plan)
        self._finish(state)
        self.close()

    # -- task management ---------------------------------------------------------------

    def _handle_tsk_mgmt(self, tmf: SrpTskMgmt) -> None:
        """``srpt_handle_tsk_mgmt``: the core runs the function; the response
        carries its SRP code in 4 bytes of response data."""
        self.stats["task_management"] += 1
        function = _TMF.get(tmf.tsk_mgmt_func)
        if function is None:
            code = 0x04  # SRP_TSK_MGMT_FUNC_NOT_SUPP
        else:
            result = self.target.scsi.task_management(
                self.nexus, function, tmf.lun, tag=tmf.task_tag
            )
            code = _TMF_CODE[result.response]
            for plan in result.aborted:
                self.stats["aborted"] += 1
                state = self.cmds.get(plan.tag) if isinstance(plan.tag, int) else None
                if state is not None and state.buf is None:
                    # Not moving data: answer it now (TASK ABORTED).
                    self._execute(state, None)
        self._respond(SrpRsp(tag=tmf.tag, req_lim_delta=1, resp_data=bytes([0, 0, 0, code])))

    # -- sending ----------------------------------------------------------------------

    def _post(self, wrs: list[SendWR], state: _Cmd | None) -> None:
        try:
            self.qp.post_send(wrs)
        except VerbsError as e:
            if state is not None:
                self._fail(state, f"post_send: {e}")

    def _respond(
        self, rsp: SrpRsp, state: _Cmd | None = None, before: list[SendWR] | None = None
    ) -> None:
        self._send_iu(rsp.encode(), state, before)

    def _send_iu(
        self,
        data: bytes,
        state: _Cmd | None,
        before: list[SendWR] | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        if self.state is ChState.RELEASED:
            return
        if not self._free_send:
            self.stats["no_send_iu"] += 1
            self.close()
            return
        iu = self._free_send.pop()
        self._reserved = max(0, self._reserved - 1)
        iu.write(data)
        wr_id = self._wr_id(lambda wc: self._sent(iu, state, wc, then))
        send = SendWR(wr_id, IbWrOpcode.SEND, (iu.sge(self.pd.local_dma_lkey, len(data)),),
                      IbSendFlags.SIGNALED)  # fmt: skip
        self.stats["responses"] += 1
        self._post([*(before or []), send], state)

    def _sent(
        self,
        iu: IuBuf,
        state: _Cmd | None,
        wc: WorkCompletion,
        then: Callable[[], None] | None,
    ) -> None:
        """``srpt_send_done``: the response (and the RDMA WRITEs before it)
        went out; the data buffer and the send IU are free again."""
        self._free_send.append(iu)
        if wc.status is not IbWcStatus.SUCCESS and wc.status is not IbWcStatus.WR_FLUSH_ERR:
            self.stats["send_errors"] += 1
        if state is not None:
            if state.buf is not None:
                self._unmap(state.buf)
            self._finish(state)
        if then is not None:
            then()
        self._process_wait_list()

    def _unmap(self, buf: DataBuf) -> None:
        if buf.direction is not None:
            ib_dma_unmap_sg(self.dev, buf.sgl, buf.direction)
            buf.direction = None

    def _finish(self, state: _Cmd) -> None:
        if state.buf is not None:
            self._unmap(state.buf)
            state.buf.free()
            state.buf = None
        self.cmds.pop(state.tag, None)

    # -- the connection --------------------------------------------------------------

    @property
    def disconnecting(self) -> bool:
        """This side has sent its DREQ (``CH_DISCONNECTING``)."""
        return self.state is ChState.DISCONNECTING

    def established(self) -> None:
        """``srpt_cm_rtu_recv``: the channel is live; a zero-length RDMA
        WRITE checks the QP reaches the peer (``srpt_zerolength_write``)."""
        if self.state is ChState.CONNECTING:
            self.state = ChState.LIVE
            wr_id = self._wr_id(lambda wc: None)
            self._post([RdmaWR(wr_id, IbWrOpcode.RDMA_WRITE, (), IbSendFlags.SIGNALED)], None)
            log.info("%r: logged in", self)
            self.stats["logins"] += 1

    def close(self) -> None:
        """``srpt_close_ch``: disconnect; resources go when the CM says it is
        over (:meth:`release`)."""
        if self.state in (ChState.DISCONNECTING, ChState.RELEASED):
            return
        self.state = ChState.DISCONNECTING
        try:
            self.cm_id.disconnect()
        except RdmaCmError:
            self.release()

    def release(self) -> None:
        """``srpt_release_channel``: the nexus leaves the core (its commands
        are aborted), the QP goes, every buffer is unmapped and freed."""
        if self.state is ChState.RELEASED:
            return
        self.state = ChState.RELEASED
        for plan in self.target.scsi.remove_nexus(self.nexus):
            self.stats["aborted"] += 1
            del plan
        self.cm_id.destroy_qp()
        for state in list(self.cmds.values()):
            self._finish(state)
        self.work.destroy()
        free_iu_ring(self.recv_ring)
        free_iu_ring(self.send_ring)
        self.cm_id.destroy()
        self.target._forget(self)


@dataclass
class _Login:
    """A login decision: the response, or the reason to reject."""

    reject: SrpLoginRejReason | None = None
    flags: int = 0
    why: str = ""
    terminated: list[SrpChannel] = field(default_factory=list)


class SrpTarget(CmTargetPort[SrpChannel]):
    """An ``ib_srpt`` target port on a host's RDMA devices: listens on the
    RDMA CM at ``addr:port`` and serves ``scsi`` to every initiator that
    logs in with the right target port ID (``id_ext`` + ``ioc_guid``,
    both the first device's node GUID by default, as ``srpt_service_guid``)
    and, when ``acl`` is given, an initiator port ID in it."""

    def __init__(
        self,
        host: Host,
        scsi: ScsiTarget,
        *,
        addr: str | IPv4Address = "0.0.0.0",
        port: int = SRPT_DEFAULT_PORT,
        id_ext: int | None = None,
        ioc_guid: int | None = None,
        acl: set[bytes] | None = None,
        rq_size: int = SRPT_RQ_SIZE,
        max_req_size: int = SRP_MAX_REQ_SIZE,
    ) -> None:
        guid = target_devices(host)[0].node_guid
        self.host = host
        self.scsi = scsi
        self.id_ext = guid if id_ext is None else id_ext
        self.ioc_guid = guid if ioc_guid is None else ioc_guid
        self.acl = acl
        self.rq_size = rq_size
        self.max_req_size = max_req_size
        self.stats: Counter[str] = Counter()
        """``logins``, ``logouts``, ``login_rejects``, ``commands``,
        ``responses``, ``rdma_reads`` / ``rdma_writes`` (work requests),
        ``task_management``, ``aborted``, ``bad_iu``, ``external_tables``,
        ``rdma_errors``, ``busy`` (data buffers it could not map), ..."""
        super().__init__(host, addr, port)

    @property
    def channels(self) -> list[SrpChannel]:
        """The channels, logged in or being disconnected."""
        return self._conns

    def __repr__(self) -> str:
        return f"SrpTarget(port {self.port}, {len(self.channels)} channels)"

    @property
    def target_port_id(self) -> bytes:
        """``id_ext`` then ``ioc_guid``, as the login must name them."""
        return self.id_ext.to_bytes(8, "big") + self.ioc_guid.to_bytes(8, "big")

    def add_target_line(self, addr: str) -> str:
        """The ``add_target`` line a Linux ``ib_srp`` initiator writes to log
        in (``/sys/class/infiniband_srp/srp-<dev>-<port>/add_target``)."""
        return f"id_ext={self.id_ext:016x},ioc_guid={self.ioc_guid:016x},dest={addr}:{self.port}"

    def close(self) -> None:
        """Log every initiator out (a DREQ each) and stop listening."""
        super().close()

    def _connect_request(self, ev: RdmaCmEvent) -> None:
        """``srpt_rdma_cm_req_recv``: a login."""
        self._login(ev)

    def _check_login(self, req: SrpLoginReq) -> _Login:
        """``srpt_cm_req_recv``'s checks, in its order."""
        if not 64 <= req.req_it_iu_len <= self.max_req_size:
            return _Login(SrpLoginRejReason.REQ_IT_IU_LENGTH_TOO_LARGE,
                          why=f"it_iu_len {req.req_it_iu_len} outside 64..{self.max_req_size}")  # fmt: skip
        if not req.req_buf_fmt & (SrpBufFmt.DIRECT | SrpBufFmt.INDIRECT):
            return _Login(SrpLoginRejReason.UNSUPPORTED_DESCRIPTOR_FMT, why="no buffer format")
        if req.target_port_id != self.target_port_id:
            return _Login(SrpLoginRejReason.UNABLE_ASSOCIATE_CHANNEL,
                          why="an invalid target port identifier")  # fmt: skip
        if self.acl is not None and req.initiator_port_id not in self.acl:
            return _Login(SrpLoginRejReason.CHANNEL_LIMIT_REACHED,
                          why="no ACL for the initiator")  # fmt: skip
        if req.req_flags & SrpLoginReqFlag.IMMED_REQUESTED and not (
            req.imm_data_offset >= 48 and req.imm_data_offset <= req.req_it_iu_len
        ):
            return _Login(SrpLoginRejReason.INSUFFICIENT_RESOURCES, why="bad immediate data offset")
        decision = _Login(flags=int(SrpLoginRspFlag.MULTICHAN_MAINTAINED))
        if not req.req_flags & SrpLoginReqFlag.MULTICHAN_MULTI:
            # SRP_MULTICHAN_SINGLE: this login replaces the initiator's others.
            decision.terminated = [
                c for c in self.channels if c.initiator_port_id == req.initiator_port_id
            ]
            decision.flags = int(SrpLoginRspFlag.MULTICHAN_TERMINATED) if decision.terminated else 0
        return decision

    def _login(self, ev: RdmaCmEvent) -> None:
        cm_id = ev.id
        param = ev.param
        try:
            req = SrpLoginReq.decode_rdma(param.private_data if param else b"")
        except SrpError as e:
            self._reject(cm_id, 0, SrpLoginRejReason.UNABLE_ESTABLISH_CHANNEL, f"bad login: {e}")
            return
        decision = self._check_login(req)
        if decision.reject is not None:
            self._reject(cm_id, req.tag, decision.reject, decision.why)
            return
        for old in decision.terminated:
            old.close()
        assert cm_id.device is not None
        try:
            ch = SrpChannel(self, cm_id, req, self._pd(cm_id.device))
        except (VerbsError, RdmaCmError, IuMapError) as e:
            self._reject(cm_id, req.tag, SrpLoginRejReason.INSUFFICIENT_RESOURCES, str(e))
            return
        self.channels.append(ch)
        flags = decision.flags
        if ch.imm_data:
            flags |= SrpLoginRspFlag.IMMED_SUPP
        rsp = SrpLoginRsp(
            tag=req.tag,
            req_lim_delta=self.rq_size,
            max_it_iu_len=self.max_req_size,
            max_ti_iu_len=req.req_it_iu_len,
            buf_fmt=SrpBufFmt.DIRECT | SrpBufFmt.INDIRECT,
            rsp_flags=flags,
        )
        cm_id.accept(RdmaConnParam(private_data=rsp.encode(), responder_resources=4,
                                   initiator_depth=4, flow_control=1, rnr_retry_count=7))  # fmt: skip

    def _reject(self, cm_id: RdmaCmId, tag: int, reason: SrpLoginRejReason, why: str) -> None:
        log.info("rejected SRP_LOGIN_REQ: %s", why)
        self.stats["login_rejects"] += 1
        rej = SrpLoginRej(tag=tag, reason=reason)
        cm_id.reject(rej.encode())
        cm_id.destroy()
