"""The SRP target (ib_srpt model) against a raw initiator that builds its IUs
by hand: logins accepted and rejected as ib_srpt decides, commands with
immediate data, direct and indirect descriptors, the errors SRP and SCSI
specify, task management, hostile initiators, several at once, and nothing
leaked."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from softrdma.cm.cma import RdmaCmEventType, RdmaCmId, RdmaConnParam, RdmaEventChannel
from softrdma.dma.types import DMA_FROM_DEVICE, DMA_TO_DEVICE
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.ulp.iu import IuBuf, alloc_iu_ring, free_iu_ring
from softrdma.ulp.scsi import FileBackstore, ScsiStatus, ScsiTarget, SenseData
from softrdma.ulp.srp.proto import (
    SrpCmd,
    SrpDataBuf,
    SrpDirectBuf,
    SrpImmBuf,
    SrpIndirectBuf,
    SrpIu,
    SrpLoginRej,
    SrpLoginRejReason,
    SrpLoginReq,
    SrpLoginRsp,
    SrpLoginRspFlag,
    SrpRsp,
    SrpTLogout,
    SrpTskMgmt,
    SrpTskMgmtFunc,
    decode_srp_iu,
)
from softrdma.ulp.srp.target import SrpTarget
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.enums import IbPdFlags, IbQpType, IbSendFlags, IbWcOpcode, IbWrOpcode
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import RecvWR, SendWR
from tests.rdma.nodes import Buffer, make_device

E = RdmaCmEventType
IMM_OFFSET = 68
TARGET_IP = "10.0.0.1"


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])


@dataclass
class RawInitiator:
    """An initiator that logs in and sends hand-built IUs, one at a time,
    over the RDMA CM, with the unsafe global rkey for its buffers."""

    dev: RoceDevice
    ch: RdmaEventChannel
    cid: RdmaCmId
    pd: ProtectionDomain
    cq: CompletionQueue
    qp: QueuePair
    recv: list[IuBuf]
    send: list[IuBuf]
    login_event: RdmaCmEventType = E.ESTABLISHED
    login_data: bytes = b""

    @classmethod
    def login(cls, dev: RoceDevice, target: SrpTarget, **fields: object) -> RawInitiator:
        ch = RdmaEventChannel(dev.host)
        cid = RdmaCmId(ch)
        cid.resolve_addr(TARGET_IP, target.port)
        ch.get_cm_event()
        cid.resolve_route()
        ch.get_cm_event()
        pd = dev.alloc_pd(IbPdFlags.UNSAFE_GLOBAL_RKEY)
        cq = dev.create_cq(256)
        qp = cid.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq, QpCap(max_send_wr=64,
                                                                     max_recv_wr=64)))  # fmt: skip
        recv = alloc_iu_ring(dev, 16, 256, DMA_FROM_DEVICE)
        for i, iu in enumerate(recv):
            qp.post_recv(RecvWR(i, (iu.sge(pd.local_dma_lkey),)))
        send = alloc_iu_ring(dev, 1, 8260, DMA_TO_DEVICE)
        req = SrpLoginReq(
            tag=7,
            req_it_iu_len=8260,
            req_flags=0x80,
            imm_data_offset=IMM_OFFSET,
            initiator_port_id=bytes(8) + dev.node_guid.to_bytes(8, "big"),
            target_port_id=target.target_port_id,
        )
        req = dataclasses.replace(req, **fields)  # type: ignore[arg-type]
        cid.connect(RdmaConnParam(private_data=req.encode_rdma()))
        ev = ch.get_cm_event()
        self = cls(dev, ch, cid, pd, cq, qp, recv, send, ev.event,
                   ev.param.private_data if ev.param else b"")  # fmt: skip
        return self

    def post(self, iu: bytes) -> None:
        self.send[0].write(iu)
        sge = self.send[0].sge(self.pd.local_dma_lkey, len(iu))
        self.qp.post_send(SendWR(1, IbWrOpcode.SEND, (sge,), IbSendFlags.SIGNALED))

    def reply(self) -> SrpIu:
        """The next IU the target sends (reposting its buffer)."""
        for _ in range(100):
            for wc in self.cq.poll(4):
                if wc.opcode is IbWcOpcode.RECV:
                    iu = self.recv[wc.wr_id]
                    data = iu.read(wc.byte_len)
                    self.qp.post_recv(RecvWR(wc.wr_id, (iu.sge(self.pd.local_dma_lkey),)))
                    return decode_srp_iu(data)
        raise AssertionError("no reply from the target")

    def command(
        self,
        tag: int,
        cdb: bytes,
        *,
        data_in: SrpDataBuf | None = None,
        data_out: SrpDataBuf | None = None,
        imm: bytes = b"",
        lun: int = 0,
    ) -> SrpRsp:
        cmd = SrpCmd(
            tag=tag,
            lun=lun,
            cdb=cdb.ljust(16, b"\0"),
            data_in=data_in,
            data_out=SrpImmBuf(len(imm)) if imm else data_out,
            imm_data=imm,
        )
        self.post(cmd.encode(imm_data_offset=IMM_OFFSET) if imm else cmd.encode())
        rsp = self.reply()
        assert isinstance(rsp, SrpRsp) and rsp.tag == tag, rsp
        return rsp

    def desc(self, buf: Buffer, length: int | None = None, offset: int = 0) -> SrpDirectBuf:
        return SrpDirectBuf(buf.dma + offset, self.pd.unsafe_global_rkey,
                            buf.size - offset if length is None else length)  # fmt: skip

    def logout(self) -> None:
        self.cid.disconnect()
        assert self.ch.get_cm_event().event is E.DISCONNECTED
        self.cid.destroy_qp()
        self.cid.destroy()
        free_iu_ring(self.recv)
        free_iu_ring(self.send)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Fabric, SrpTarget, RoceDevice, Path]]:
    fabric = Fabric(seed=5)
    tdev = make_device("hw-iommu", fabric, TARGET_IP)
    image = tmp_path / "disk.img"
    core = ScsiTarget()
    core.add_lun(0, FileBackstore(image, 512, size=8 << 20, create=True))
    target = SrpTarget(tdev.host, core, addr=TARGET_IP)
    yield fabric, target, tdev, image


def test_login_io_and_logout_leave_nothing_behind(
    setup: tuple[Fabric, SrpTarget, RoceDevice, Path],
) -> None:
    fabric, target, tdev, image = setup
    ini = RawInitiator.login(make_device("cpu", fabric, "10.0.0.2"), target)
    assert ini.login_event is E.ESTABLISHED
    rsp = SrpLoginRsp.decode(ini.login_data)
    assert rsp.tag == 7 and rsp.req_lim_delta == 128 and rsp.max_it_iu_len == 8276
    assert rsp.max_ti_iu_len == 8260 and rsp.rsp_flags & SrpLoginRspFlag.IMMED_SUPP
    buf = Buffer(ini.dev, 65536)
    # INQUIRY by RDMA WRITE into the initiator's buffer.
    r = ini.command(1, INQUIRY, data_in=ini.desc(buf, 96))
    assert r.status == ScsiStatus.GOOD and r.req_lim_delta == 1
    assert buf.read(16)[8:16] == b"SOFTRDMA"
    # A write as immediate data, one fetched by RDMA READ, and reads back.
    block = bytes(range(256)) * 16
    assert ini.command(2, write10(8, 8), imm=block).status == ScsiStatus.GOOD
    buf.fill(b"\x07" * 8192)
    r = ini.command(3, write10(100, 16), data_out=ini.desc(buf, 8192))
    assert r.status == ScsiStatus.GOOD
    assert ini.command(4, read10(8, 8), data_in=ini.desc(buf, 4096)).status == ScsiStatus.GOOD
    assert buf.read(4096) == block
    data = image.read_bytes()
    assert data[8 * 512 : 16 * 512] == block and data[100 * 512 : 116 * 512] == b"\x07" * 8192
    assert target.stats["rdma_reads"] == 1 and target.stats["rdma_writes"] == 2
    ini.logout()
    fabric.loop.run()
    assert not target.channels
    target.close()
    tdev.unregister()
    tdev.dma_device.release()
    debug = tdev.dma_device.platform.dma_debug
    assert debug is not None and not debug.reports, debug.reports


def test_indirect_descriptors_scatter_and_gather(
    setup: tuple[Fabric, SrpTarget, RoceDevice, Path],
) -> None:
    fabric, target, _, _ = setup
    ini = RawInitiator.login(make_device("hw-swiotlb", fabric, "10.0.0.2"), target)
    a, b = Buffer(ini.dev, 4096), Buffer(ini.dev, 4096)
    a.fill(b"A" * 4096)
    b.fill(b"B" * 2048)
    descs = (ini.desc(a, 4096), ini.desc(b, 2048))
    table = SrpDirectBuf(0x1000, 0, 16 * len(descs))  # the table lives nowhere: all in the IU
    out = SrpIndirectBuf(table, 6144, descs)
    assert ini.command(1, write10(0, 12), data_out=out).status == ScsiStatus.GOOD
    c, d = Buffer(ini.dev, 4096), Buffer(ini.dev, 4096)
    into = SrpIndirectBuf(table, 6144, (ini.desc(c, 2048), ini.desc(d, 4096)))
    assert ini.command(2, read10(0, 12), data_in=into).status == ScsiStatus.GOOD
    assert c.read(2048) + d.read(4096) == b"A" * 4096 + b"B" * 2048
    # A table the IU does not carry whole is not fetched (as ib_srpt).
    ext = SrpIndirectBuf(SrpDirectBuf(0x1000, 0, 48), 6144, descs)
    r = ini.command(3, read10(0, 12), data_in=ext)
    sense = SenseData.decode(r.sense)
    assert r.status == ScsiStatus.CHECK_CONDITION and (sense.asc, sense.ascq) == (0x0E, 0x03)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"req_it_iu_len": 9000}, SrpLoginRejReason.REQ_IT_IU_LENGTH_TOO_LARGE),
        ({"req_it_iu_len": 60}, SrpLoginRejReason.REQ_IT_IU_LENGTH_TOO_LARGE),
        ({"target_port_id": bytes(16)}, SrpLoginRejReason.UNABLE_ASSOCIATE_CHANNEL),
        ({"req_buf_fmt": 0}, SrpLoginRejReason.UNSUPPORTED_DESCRIPTOR_FMT),
    ],
)
def test_bad_logins_are_rejected_with_the_srp_reason(
    setup: tuple[Fabric, SrpTarget, RoceDevice, Path],
    fields: dict[str, object],
    reason: SrpLoginRejReason,
) -> None:
    fabric, target, _, _ = setup
    ini = RawInitiator.login(make_device("cpu", fabric, "10.0.0.2"), target, **fields)
    assert ini.login_event is E.REJECTED
    rej = SrpLoginRej.decode(ini.login_data)
    assert rej.reason == reason and rej.tag == 7
    assert target.stats["login_rejects"] == 1 and not target.channels


def test_acl_and_single_channel_logins(setup: tuple[Fabric, SrpTarget, RoceDevice, Path]) -> None:
    fabric, target, _, _ = setup
    dev = make_device("cpu", fabric, "10.0.0.2")
    first = RawInitiator.login(dev, target)
    assert first.login_event is E.ESTABLISHED and len(target.channels) == 1
    # The same initiator port logs in again (SRP_MULTICHAN_SINGLE): the old
    # channel is terminated, and the response says so.
    second = RawInitiator.login(dev, target)
    rsp = SrpLoginRsp.decode(second.login_data)
    assert rsp.rsp_flags & SrpLoginRspFlag.MULTICHAN_TERMINATED
    assert first.ch.get_cm_event().event is E.DISCONNECTED
    fabric.loop.run()
    assert len(target.channels) == 1
    target.acl = {b"\x01" * 16}
    other = RawInitiator.login(make_device("cpu", fabric, "10.0.0.3"), target)
    assert other.login_event is E.REJECTED
    assert SrpLoginRej.decode(other.login_data).reason == SrpLoginRejReason.CHANNEL_LIMIT_REACHED


def test_scsi_errors_and_task_management(setup: tuple[Fabric, SrpTarget, RoceDevice, Path]) -> None:
    fabric, target, _, _ = setup
    ini = RawInitiator.login(make_device("cpu", fabric, "10.0.0.2"), target)
    buf = Buffer(ini.dev, 8192)
    r = ini.command(1, read10(1 << 20, 1), data_in=ini.desc(buf, 512))  # past the end
    sense = SenseData.decode(r.sense)
    assert r.status == ScsiStatus.CHECK_CONDITION and sense.asc == 0x21
    r = ini.command(2, bytes([0xEE]) + bytes(9))  # no such opcode
    assert SenseData.decode(r.sense).asc == 0x20
    r = ini.command(3, INQUIRY, data_in=ini.desc(buf, 36), lun=5)  # INQUIRY of no LUN: a PQ of 3
    assert r.status == ScsiStatus.GOOD and buf.read(1)[0] >> 5 == 3
    # A READ into a smaller buffer than the CDB asks: residual overflow.
    r = ini.command(4, read10(0, 4), data_in=ini.desc(buf, 1024))
    assert r.status == ScsiStatus.GOOD and r.data_in_res_cnt == -1024
    # Task management: ABORT TASK of nothing, LUN RESET.
    for tag, func in ((5, SrpTskMgmtFunc.ABORT_TASK), (6, SrpTskMgmtFunc.LUN_RESET)):
        ini.post(SrpTskMgmt(tag=tag, lun=0, tsk_mgmt_func=func, task_tag=99).encode())
        rsp = ini.reply()
        assert isinstance(rsp, SrpRsp) and rsp.tag == tag and rsp.resp_data == bytes(4)
    ini.post(SrpTskMgmt(tag=7, lun=0, tsk_mgmt_func=0x77).encode())
    rsp = ini.reply()
    assert isinstance(rsp, SrpRsp) and rsp.resp_data == bytes([0, 0, 0, 4])  # not supported


def test_malformed_and_unknown_ius(setup: tuple[Fabric, SrpTarget, RoceDevice, Path]) -> None:
    fabric, target, _, _ = setup
    ini = RawInitiator.login(make_device("cpu", fabric, "10.0.0.2"), target)
    bystander = RawInitiator.login(make_device("hw-iommu", fabric, "10.0.0.3"), target)
    # An SRP_CMD whose descriptor counts do not fit its length: CHECK CONDITION.
    bad = bytearray(SrpCmd(tag=42, cdb=INQUIRY.ljust(16, b"\0")).encode())
    bad[5], bad[7] = 0x01, 0x05  # data-in: 5 direct descriptors that are not there
    ini.post(bytes(bad))
    rsp = ini.reply()
    assert isinstance(rsp, SrpRsp) and rsp.tag == 42
    assert (SenseData.decode(rsp.sense).asc, SenseData.decode(rsp.sense).ascq) == (0x0E, 0x03)
    # An IU no initiator may send: SRP_T_LOGOUT (invalid IU type), then gone.
    ini.post(SrpLoginRsp(tag=9).encode())
    logout = ini.reply()
    assert isinstance(logout, SrpTLogout) and logout.reason == 2
    assert ini.ch.get_cm_event().event is E.DISCONNECTED
    assert target.stats["bad_iu"] == 2
    # The other initiator never noticed.
    buf = Buffer(bystander.dev, 512)
    assert bystander.command(1, INQUIRY, data_in=bystander.desc(buf, 36)).status == 0


def test_a_hostile_initiator_loses_only_its_own_channel(
    setup: tuple[Fabric, SrpTarget, RoceDevice, Path],
) -> None:
    """A descriptor with a key the initiator's device does not know: the
    target's RDMA READ is NAKed, the channel closes, nothing is written."""
    fabric, target, _, image = setup
    bad = RawInitiator.login(make_device("hw-iommu", fabric, "10.0.0.2"), target)
    good = RawInitiator.login(make_device("cpu", fabric, "10.0.0.3"), target)
    bad.post(SrpCmd(tag=1, cdb=write10(0, 8).ljust(16, b"\0"),
                    data_out=SrpDirectBuf(0xDEAD0000, 0x1234, 4096)).encode())  # fmt: skip
    assert bad.ch.get_cm_event().event is E.DISCONNECTED
    assert target.stats["rdma_errors"] == 1
    assert image.read_bytes()[:4096] == bytes(4096)
    buf = Buffer(good.dev, 4096)
    assert good.command(1, read10(0, 8), data_in=good.desc(buf)).status == ScsiStatus.GOOD
