"""A small scripted SRP target for the initiator's tests (the real one,
ib_srpt's model, is written separately), and a few checks of the script
itself.

What it does, like ib_srpt at its core: listens on the RDMA CM; answers a
login request (decoded from the REQ's private data) with an
``SrpLoginRsp`` in the REP's private data — or an ``SrpLoginRej`` in a REJ;
posts receive IUs; decodes every SRP_CMD; for a read RDMA-WRITEs the data
through the descriptors it got (``rdma_rw_ctx_init`` per descriptor), for a
write takes the immediate data or RDMA-READs it through the descriptors;
then SENDs an ``SrpRsp`` (optionally SEND_WITH_INV of the command's first
key). It serves a sparse disk of known contents (INQUIRY, READ CAPACITY
(10)/(16), READ/WRITE (10)/(16), SYNCHRONIZE CACHE, TEST UNIT READY;
CHECK CONDITION otherwise), answers task management (ABORT TASK drops a
held command, LUN RESET all of a LUN's), and records what it saw: login
requests, commands with their descriptors, the most commands outstanding
at once, task management, CRED_RSP / AER_RSP / I_LOGOUT.

It runs on the device's scheduler only (CQ notifications and CM events
become ``call_soon`` callbacks), so it works with the initiator driving a
simulated loop and on a real-time progress thread alike.

Hostile knobs for the robustness tests: hold (never answer) chosen
commands, ignore task management, respond with a delay, grant odd
credits, and inject raw IUs (unknown tags, garbage, CRED_REQ, AER_REQ,
T_LOGOUT).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from softrdma.cm.cma import (
    RdmaCmEvent,
    RdmaCmEventType,
    RdmaCmId,
    RdmaConnParam,
    RdmaEventChannel,
)
from softrdma.dma.types import DmaDirection
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.ulp.iu import IuBuf, alloc_iu_ring, free_iu_ring
from softrdma.ulp.srp import (
    SRP_IMM_DATA_OFFSET,
    SrpAerRsp,
    SrpBufFmt,
    SrpCmd,
    SrpCredRsp,
    SrpDirectBuf,
    SrpError,
    SrpILogout,
    SrpImmBuf,
    SrpIndirectBuf,
    SrpLoginRej,
    SrpLoginRejReason,
    SrpLoginReq,
    SrpLoginRsp,
    SrpLoginRspFlag,
    SrpRsp,
    SrpTskMgmt,
    SrpTskMgmtFunc,
    decode_srp_iu,
)
from softrdma.ulp.srp.initiator_map import SrpBuffer
from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_unmap_sg
from softrdma.verbs.enums import IbQpType, IbSendFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.qp import IbSigType, QpCap, QpInitAttr, QueuePair
from softrdma.verbs.rw import rdma_rw_ctx_init
from softrdma.verbs.wr import RecvWR, SendWR, WorkCompletion
from tests.rdma.nodes import make_device

BLOCK = 512
VENDOR, PRODUCT, REVISION = "SOFTRDMA", "SCRIPTED DISK", "0001"


def pattern(lba: int, nblocks: int = 1) -> bytes:
    """The known contents of never-written blocks."""
    return b"".join((b"LBA%013d" % (lba + i)) * (BLOCK // 16) for i in range(nblocks))


@dataclass
class Disk:
    """A sparse disk that outlives a target (a restarted target serves it)."""

    blocks: int = 1 << 33  # 4 TiB: LBAs beyond 2 TiB need the 16-byte CDBs
    data: dict[int, bytes] = field(default_factory=dict)
    syncs: int = 0

    def read(self, lba: int, n: int) -> bytes:
        return b"".join(self.data.get(lba + i) or pattern(lba + i) for i in range(n))

    def write(self, lba: int, payload: bytes) -> None:
        for i in range(len(payload) // BLOCK):
            self.data[lba + i] = payload[i * BLOCK : (i + 1) * BLOCK]


def sense(key: int, asc: int, ascq: int = 0) -> bytes:
    """Fixed-format sense data."""
    return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])


class _CallbackChannel(RdmaEventChannel):
    """An event channel that schedules ``handler`` whenever an event is
    queued, as the kernel's RDMA CM calls the handler of ``rdma_create_id``
    (ib_srpt's ``srpt_rdma_cm_handler``)."""

    def __init__(self, dev: RoceDevice, handler: Callable[[], None]) -> None:
        super().__init__(dev.host)
        self._dev = dev
        self._handler = handler

    def _post(self, event: RdmaCmEvent) -> None:
        super()._post(event)
        self._dev.scheduler.call_soon(self._handler)


@dataclass(eq=False)
class SeenCmd:
    """A command as the target received it."""

    conn: Conn
    cmd: SrpCmd
    descs: list[SrpDirectBuf]
    table: list[SrpDirectBuf] | None = None
    answered: bool = False


@dataclass(eq=False)
class Conn:
    """One login: its QP, CQ, IUs."""

    cm_id: RdmaCmId
    qp: QueuePair
    login: SrpLoginReq
    rx: list[IuBuf]
    tx: list[IuBuf]
    free_tx: list[IuBuf]
    imm_offset: int
    max_ti_iu_len: int
    backlog: list[tuple[bytes, int | None]] = field(default_factory=list)
    alive: bool = True
    released: bool = False
    held: list[SeenCmd] = field(default_factory=list)


class ScriptedTarget:
    """An SRP target port on ``dev`` listening on ``port``."""

    def __init__(
        self,
        dev: RoceDevice,
        port: int = 5555,
        *,
        disk: Disk | None = None,
        req_lim: int = 16,
        delta: int = 1,
        imm_supp: bool = True,
        max_it_iu_len: int = 8276,
        reject: int | None = None,
        remote_invalidate: bool = False,
        fetch_ext_tables: bool = False,
        rsp_delay: float = 0.0,
        rc16: bool = True,
        answer_tm: bool = True,
        tm_response: Callable[[SrpTskMgmt], int] | None = None,
        hold: Callable[[SrpCmd], bool] | None = None,
    ) -> None:
        self.dev = dev
        self.disk = Disk() if disk is None else disk
        self.req_lim = req_lim
        self.delta = delta
        self.imm_supp = imm_supp
        self.max_it_iu_len = max_it_iu_len
        self.reject = reject
        self.remote_invalidate = remote_invalidate
        self.fetch_ext_tables = fetch_ext_tables
        self.rsp_delay = rsp_delay
        self.rc16 = rc16
        self.answer_tm = answer_tm
        self.tm_response = tm_response
        self.hold = hold
        # what it saw
        self.logins: list[SrpLoginReq] = []
        self.cmds: list[SeenCmd] = []
        self.tms: list[SrpTskMgmt] = []
        self.cred_rsps: list[SrpCredRsp] = []
        self.aer_rsps: list[SrpAerRsp] = []
        self.i_logouts: list[SrpILogout] = []
        self.malformed = 0
        self.errors: list[str] = []
        self.outstanding = 0
        self.max_outstanding = 0
        self.rdma_reads = 0
        self.rdma_writes = 0
        self.conns: list[Conn] = []
        self.pd = dev.alloc_pd()
        self.cq = dev.create_cq(4096, comp_handler=self._notify)
        self.cq.req_notify()
        self._ids = 0
        self._ops: dict[int, Callable[[WorkCompletion], None]] = {}
        self.channel = _CallbackChannel(dev, self._cm_events)
        self.listener = RdmaCmId(self.channel)
        self.listener.bind_addr(str(dev.ip), port)
        self.listener.listen()

    # -- CM ------------------------------------------------------------------------------

    def _cm_events(self) -> None:
        while len(self.channel):
            ev = self.channel.get_cm_event(0)
            try:
                self._cm_event(ev)
            except Exception as e:  # a script bug must show up in the test
                self.errors.append(f"cm {ev.event.name}: {e!r}")

    def _cm_event(self, ev: RdmaCmEvent) -> None:
        E = RdmaCmEventType
        if ev.event is E.CONNECT_REQUEST:
            assert ev.param is not None
            self._login(ev.id, ev.param)
        elif ev.event is E.DISCONNECTED:
            for conn in self.conns:
                if conn.cm_id is ev.id and conn.alive:
                    with contextlib.suppress(Exception):
                        conn.cm_id.disconnect()  # the DREP; the QP to ERR
                    self._drop(conn)

    def _login(self, cm_id: RdmaCmId, param: RdmaConnParam) -> None:
        """``srpt_rdma_cm_req_recv`` / ``srpt_cm_req_recv``."""
        req = SrpLoginReq.decode_rdma(param.private_data)
        self.logins.append(req)
        if self.reject is not None:
            cm_id.reject(SrpLoginRej(tag=req.tag, reason=self.reject).encode())
            return
        if req.req_it_iu_len > self.max_it_iu_len:
            reason = SrpLoginRejReason.REQ_IT_IU_LENGTH_TOO_LARGE
            cm_id.reject(SrpLoginRej(tag=req.tag, reason=reason).encode())
            return
        immed = bool(self.imm_supp and req.req_flags & 0x80)
        qp = cm_id.create_qp(
            self.pd,
            QpInitAttr(
                IbQpType.RC,
                self.cq,
                self.cq,
                QpCap(max_send_wr=2048, max_recv_wr=256, max_send_sge=16, max_recv_sge=1),
                sq_sig_type=IbSigType.REQ_WR,
            ),
        )
        # a forced-swiotlb test platform has a 2 MiB bounce pool: keep the rings small
        rx = alloc_iu_ring(self.dev, 48, self.max_it_iu_len, DmaDirection.FROM_DEVICE)
        tx = alloc_iu_ring(self.dev, 24, req.req_it_iu_len, DmaDirection.TO_DEVICE)
        conn = Conn(
            cm_id,
            qp,
            req,
            rx,
            tx,
            list(tx),
            req.imm_data_offset if immed else 0,
            req.req_it_iu_len,
        )
        self.conns.append(conn)
        for iu in rx:
            self._post_recv(conn, iu)
        rsp = SrpLoginRsp(
            tag=req.tag,
            req_lim_delta=self.req_lim,
            max_it_iu_len=self.max_it_iu_len,
            max_ti_iu_len=req.req_it_iu_len,
            buf_fmt=SrpBufFmt.DIRECT | SrpBufFmt.INDIRECT,
            rsp_flags=SrpLoginRspFlag.IMMED_SUPP if immed else 0,
        )
        cm_id.accept(
            RdmaConnParam(private_data=rsp.encode(), responder_resources=1, initiator_depth=4)
        )

    # -- completions --------------------------------------------------------------------------

    def _notify(self, cq: object) -> None:
        self.dev.scheduler.call_soon(self._poll)

    def _poll(self) -> None:
        while True:
            wcs = self.cq.poll(64) if len(self.cq) else []
            if not wcs:
                self.cq.req_notify()
                if not len(self.cq):
                    return
                continue
            for wc in wcs:
                handler = self._ops.pop(wc.wr_id, None)
                if handler is None:
                    if wc.status not in (IbWcStatus.SUCCESS, IbWcStatus.WR_FLUSH_ERR):
                        self.errors.append(f"unclaimed {wc}")
                    continue
                try:
                    handler(wc)
                except Exception as e:
                    self.errors.append(f"{wc}: {e!r}")

    def _op(self, fn: Callable[[WorkCompletion], None]) -> int:
        self._ids += 1
        self._ops[self._ids] = fn
        return self._ids

    def _post_recv(self, conn: Conn, iu: IuBuf) -> None:
        wr_id = self._op(lambda wc: self._recv(conn, iu, wc))
        conn.qp.post_recv(RecvWR(wr_id, (iu.sge(self.pd.local_dma_lkey),)))

    def _recv(self, conn: Conn, iu: IuBuf, wc: WorkCompletion) -> None:
        if wc.status != IbWcStatus.SUCCESS or not conn.alive:
            return
        data = iu.read(wc.byte_len)
        self._post_recv(conn, iu)
        try:
            msg = decode_srp_iu(data, conn.imm_offset or None)
        except SrpError:
            self.malformed += 1
            return
        if isinstance(msg, SrpCmd):
            self._cmd(conn, msg)
        elif isinstance(msg, SrpTskMgmt):
            self._tsk_mgmt(conn, msg)
        elif isinstance(msg, SrpCredRsp):
            self.cred_rsps.append(msg)
        elif isinstance(msg, SrpAerRsp):
            self.aer_rsps.append(msg)
        elif isinstance(msg, SrpILogout):
            self.i_logouts.append(msg)
        else:
            self.malformed += 1

    # -- sending ------------------------------------------------------------------------------

    def send_iu(self, conn: Conn, payload: bytes, invalidate: int | None = None) -> None:
        """SEND an IU (queued until a send IU is free)."""
        if not conn.alive:
            return
        if not conn.free_tx:
            conn.backlog.append((payload, invalidate))
            return
        iu = conn.free_tx.pop()
        iu.write(payload)

        def done(wc: WorkCompletion) -> None:
            conn.free_tx.append(iu)
            if conn.backlog and conn.alive:
                self.send_iu(conn, *conn.backlog.pop(0))

        wr_id = self._op(done)
        opcode = IbWrOpcode.SEND if invalidate is None else IbWrOpcode.SEND_WITH_INV
        conn.qp.post_send(
            SendWR(
                wr_id,
                opcode,
                (iu.sge(self.pd.local_dma_lkey, len(payload)),),
                IbSendFlags.SIGNALED,
                invalidate_rkey=invalidate or 0,
            )
        )

    def inject(self, payload: bytes, conn: Conn | None = None) -> None:
        """Send raw IU bytes on ``conn`` (the newest connection by default)."""
        self.send_iu(conn or self.conns[-1], payload)

    def respond(
        self,
        seen: SeenCmd,
        status: int = 0,
        sense_data: bytes = b"",
        data_in_res: int = 0,
        data_out_res: int = 0,
    ) -> None:
        """``srpt_build_cmd_rsp`` + send."""
        if seen.answered:
            return
        seen.answered = True
        rsp = SrpRsp(
            tag=seen.cmd.tag,
            req_lim_delta=self.delta,
            status=status,
            sense=sense_data,
            data_in_res_cnt=data_in_res,
            data_out_res_cnt=data_out_res,
        )
        key = None
        if self.remote_invalidate and seen.descs:
            key = seen.descs[0].key

        def send() -> None:
            self.outstanding -= 1  # until the response leaves, the command holds its credit
            self.send_iu(seen.conn, rsp.encode(), key)

        if self.rsp_delay:
            self.dev.scheduler.call_later(self.rsp_delay, send)
        else:
            send()

    # -- commands -----------------------------------------------------------------------------

    def _descs(self, seen: SeenCmd, desc: object, then: Callable[[], None]) -> None:
        """The descriptor list of a data buffer, fetching an external table
        with an RDMA READ when allowed (ib_srpt never does)."""
        if isinstance(desc, SrpDirectBuf):
            seen.descs = [desc]
            then()
        elif isinstance(desc, SrpIndirectBuf):
            if not desc.external:
                seen.descs = list(desc.desc_list)
                then()
            elif self.fetch_ext_tables:
                self._fetch_table(seen, desc, then)
            else:  # "received unsupported SRP_CMD request type"
                self.respond(seen, 2, sense(0x5, 0x24))
        else:
            then()

    def _fetch_table(self, seen: SeenCmd, desc: SrpIndirectBuf, then: Callable[[], None]) -> None:
        size = desc.table_desc.len
        buf = SrpBuffer(self.dev.host, size)
        ib_dma_map_sg(self.dev, buf.sgl, DmaDirection.FROM_DEVICE)
        t = desc.table_desc

        def done(wc: WorkCompletion) -> None:
            ib_dma_unmap_sg(self.dev, buf.sgl, DmaDirection.FROM_DEVICE)
            raw = buf.read()
            buf.free()
            if wc.status != IbWcStatus.SUCCESS:
                if seen.conn.alive:
                    self.errors.append(f"table fetch: {wc}")
                return
            seen.table = [
                SrpDirectBuf(*struct.unpack_from(">QII", raw, i)) for i in range(0, size, 16)
            ]
            seen.descs = list(seen.table)
            then()

        ctx = rdma_rw_ctx_init(seen.conn.qp, buf.sgl, t.va, t.key, DmaDirection.FROM_DEVICE)
        self.rdma_reads += ctx.nr_ops
        ctx.post(seen.conn.qp, self._op(done))

    def _cmd(self, conn: Conn, cmd: SrpCmd) -> None:
        seen = SeenCmd(conn, cmd, [])
        self.cmds.append(seen)
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        if self.hold is not None and self.hold(cmd):
            conn.held.append(seen)
            return
        if cmd.data_out is not None:
            self._descs(seen, cmd.data_out, lambda: self._execute(seen))
        else:
            self._descs(seen, cmd.data_in, lambda: self._execute(seen))

    def _execute(self, seen: SeenCmd) -> None:
        """The SCSI command, with its data moved through the descriptors."""
        cmd, disk = seen.cmd, self.disk
        cdb = cmd.cdb
        op = cdb[0]
        if op in (0x28, 0x88, 0x2A, 0x8A):
            if op in (0x28, 0x2A):
                lba, n = struct.unpack_from(">IxH", cdb, 2)
            else:
                lba, n = struct.unpack_from(">QI", cdb, 2)
            if lba + n > disk.blocks:
                self.respond(seen, 2, sense(0x5, 0x21))
            elif op in (0x28, 0x88):
                self._data_in(seen, disk.read(lba, n))
            else:
                self._data_out(seen, n * BLOCK, lambda data: disk.write(lba, data))
        elif op == 0x12:
            alloc = struct.unpack_from(">H", cdb, 3)[0]
            data = bytes([0, 0, 5, 2, 31, 0, 0, 0x02]) + VENDOR.ljust(8).encode()
            data += PRODUCT.ljust(16).encode() + REVISION.ljust(4).encode()
            self._data_in(seen, data[:alloc])
        elif op == 0x9E and cdb[1] & 0x1F == 0x10 and self.rc16:
            self._data_in(seen, struct.pack(">QI", disk.blocks - 1, BLOCK) + bytes(20))
        elif op == 0x25:
            self._data_in(seen, struct.pack(">II", min(disk.blocks - 1, 0xFFFF_FFFF), BLOCK))
        elif op == 0x35:
            disk.syncs += 1
            self.respond(seen)
        elif op == 0x00:
            self.respond(seen)
        else:
            self.respond(seen, 2, sense(0x5, 0x20))

    def _data_in(self, seen: SeenCmd, data: bytes) -> None:
        """RDMA WRITE ``data`` through the descriptors, then respond (the
        SEND after the WRITEs on one RC QP arrives after them)."""
        room = sum(d.len for d in seen.descs)
        data = data[:room]
        if not data:
            self.respond(seen, data_in_res=room)
            return
        buf = SrpBuffer(self.dev.host, len(data))
        buf.write(data)
        ib_dma_map_sg(self.dev, buf.sgl, DmaDirection.TO_DEVICE)
        qp = seen.conn.qp
        off = 0
        for d in seen.descs:
            n = min(d.len, len(data) - off)
            if n <= 0:
                break
            ctx = rdma_rw_ctx_init(
                qp, buf.sgl, d.va, d.key, DmaDirection.TO_DEVICE, sg_offset=off, length=n
            )
            self.rdma_writes += ctx.nr_ops
            last = off + n >= len(data)

            def done(wc: WorkCompletion) -> None:
                ib_dma_unmap_sg(self.dev, buf.sgl, DmaDirection.TO_DEVICE)
                buf.free()
                if wc.status != IbWcStatus.SUCCESS and seen.conn.alive:
                    self.errors.append(f"RDMA WRITE: {wc}")

            if last:
                ctx.post(qp, self._op(done))
            else:
                qp.post_send(list(ctx.wrs))
            off += n
        self.respond(seen, data_in_res=room - len(data))

    def _data_out(self, seen: SeenCmd, length: int, store: Callable[[bytes], None]) -> None:
        """Take the immediate data, or RDMA READ it, then store and respond."""
        cmd = seen.cmd
        if isinstance(cmd.data_out, SrpImmBuf):
            if seen.conn.imm_offset != SRP_IMM_DATA_OFFSET:
                self.errors.append("immediate data without IMMED_SUPP")
            store(bytes(cmd.imm_data[:length]))
            self.respond(seen)
            return
        total = sum(d.len for d in seen.descs)
        length = min(length, total)
        buf = SrpBuffer(self.dev.host, length)
        ib_dma_map_sg(self.dev, buf.sgl, DmaDirection.FROM_DEVICE)
        qp = seen.conn.qp
        off = 0
        for d in seen.descs:
            n = min(d.len, length - off)
            if n <= 0:
                break
            ctx = rdma_rw_ctx_init(
                qp, buf.sgl, d.va, d.key, DmaDirection.FROM_DEVICE, sg_offset=off, length=n
            )
            self.rdma_reads += ctx.nr_ops
            off += n
            last = off >= length

            def done(wc: WorkCompletion) -> None:
                ib_dma_unmap_sg(self.dev, buf.sgl, DmaDirection.FROM_DEVICE)
                data = buf.read()
                buf.free()
                if wc.status != IbWcStatus.SUCCESS:
                    if seen.conn.alive:
                        self.errors.append(f"RDMA READ: {wc}")
                    return
                store(data)
                self.respond(seen)

            if last:
                ctx.post(qp, self._op(done))
            else:
                qp.post_send(list(ctx.wrs))

    # -- task management --------------------------------------------------------------------

    def _tsk_mgmt(self, conn: Conn, tm: SrpTskMgmt) -> None:
        """``srpt_handle_tsk_mgmt``: ABORT TASK of a held command, LUN RESET
        of all of a LUN's; the response code in the 4th response-data byte."""
        self.tms.append(tm)
        if not self.answer_tm:
            return
        code = 0 if self.tm_response is None else self.tm_response(tm)
        if code:  # e.g. 4, FUNCTION REJECTED: nothing is aborted
            rsp = SrpRsp(tag=tm.tag, req_lim_delta=1, resp_data=bytes([0, 0, 0, code]))
            self.send_iu(conn, rsp.encode())
            return
        if tm.tsk_mgmt_func == SrpTskMgmtFunc.ABORT_TASK:
            victims = [s for s in conn.held if s.cmd.tag == tm.task_tag]
        elif tm.tsk_mgmt_func == SrpTskMgmtFunc.LUN_RESET:
            victims = [s for s in conn.held if s.cmd.lun == tm.lun]
        else:
            victims = []
        for s in victims:
            conn.held.remove(s)
            s.answered = True
            self.outstanding -= 1
        # the TM's credit and the aborted commands' (never answered)
        rsp = SrpRsp(tag=tm.tag, req_lim_delta=1 + len(victims), resp_data=bytes(4))
        self.send_iu(conn, rsp.encode())

    # -- life --------------------------------------------------------------------------------

    def _drop(self, conn: Conn) -> None:
        """The channel is gone: once its QP has flushed, free it
        (``srpt_release_channel``)."""
        conn.alive = False
        self.dev.scheduler.call_soon(self._release_conn, conn)

    def _release_conn(self, conn: Conn) -> None:
        if conn.released:
            return
        qp = conn.qp
        if not qp.destroyed and (qp.hw.sq_outstanding or qp.hw.rq_outstanding):
            self.dev.scheduler.call_later(0.001, self._release_conn, conn)
            return
        conn.released = True
        conn.cm_id.destroy()
        conn.cm_id.destroy_qp()
        free_iu_ring(conn.rx)
        free_iu_ring(conn.tx)

    def shutdown(self) -> None:
        """The target goes away: every connection disconnected (DREQ), the
        listener closed. Held commands are never answered."""
        with self.dev.lock:
            for conn in self.conns:
                if conn.alive:
                    with contextlib.suppress(Exception):
                        conn.cm_id.disconnect()
                    self._drop(conn)
            self.listener.destroy()

    def close(self, fabric: Fabric | None = None) -> None:
        """Free everything (QPs drained, IUs unmapped), so the device can be
        released with no mapping left."""
        with self.dev.lock:
            self._close(fabric)

    def _close(self, fabric: Fabric | None) -> None:
        for conn in self.conns:
            conn.alive = False
            with contextlib.suppress(Exception):
                conn.cm_id.disconnect()
        if fabric is not None:
            fabric.loop.run()
        self._poll()
        for conn in self.conns:
            if not conn.released:
                conn.released = True
                conn.cm_id.destroy()
                conn.cm_id.destroy_qp()
                free_iu_ring(conn.rx)
                free_iu_ring(conn.tx)
        self.conns = []
        self.listener.destroy()
        self.cq.destroy()
        self.pd.dealloc()


# -- checks of the script itself ----------------------------------------------------------


def test_pattern_is_per_block() -> None:
    assert len(pattern(7, 3)) == 3 * BLOCK
    assert pattern(7, 2)[BLOCK:] == pattern(8)
    disk = Disk(blocks=100)
    disk.write(3, b"x" * BLOCK)
    assert disk.read(2, 3) == pattern(2) + b"x" * BLOCK + pattern(4)


def test_target_listens_and_frees_everything() -> None:
    fabric = Fabric(seed=1)
    dev = make_device("hw-iommu", fabric, "10.0.0.2")
    target = ScriptedTarget(dev)
    target.close(fabric)
    dev.unregister()
    dev.dma_device.release()
    debug = dev.dma_device.platform.dma_debug
    assert debug is not None and not debug.reports, debug.reports
