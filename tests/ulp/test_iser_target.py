"""The iSER target (ib_isert + iscsi_target model) against a hand-built
initiator over the RDMA CM: iSCSI PDUs from the sans-IO
:class:`IscsiInitiatorConnection`, data buffers registered with fast
registration (as ib_iser) or the unsafe global rkey; login, SCSI reads by
RDMA WRITE + SEND_WITH_INV, writes by immediate data and RDMA READ, data
checked against the image file, malformed PDUs, several initiators, and
nothing left mapped."""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from softrdma.cm.cma import RdmaCmEventType, RdmaCmId, RdmaConnParam, RdmaEventChannel
from softrdma.dma.types import DMA_FROM_DEVICE, DMA_TO_DEVICE, DmaDirection
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.memory.layout import PAGE_SIZE, get_order
from softrdma.memory.page import Page
from softrdma.memory.scatterlist import Scatterlist
from softrdma.ulp.iscsi.negotiate import linux_iser_initiator
from softrdma.ulp.iscsi.proto import IscsiNopOut, IscsiPdu, IscsiRejectReason, IscsiTmfFunc
from softrdma.ulp.iscsi.session import (
    CommandCompleted,
    Event,
    IscsiInitiatorConnection,
    IscsiLoginError,
    LoggedOut,
    LoginCompleted,
    NopInReceived,
    TaskRejected,
    TextResponseReceived,
    TmfCompleted,
)
from softrdma.ulp.iscsi.text import decode_text
from softrdma.ulp.iser.proto import IserCmHdr, IserFlag, IserHdr, encode_iser_send
from softrdma.ulp.iser.target import IserTarget
from softrdma.ulp.iu import IuBuf, alloc_iu_ring, free_iu_ring
from softrdma.ulp.scsi import FileBackstore, ScsiStatus, ScsiTarget, SenseData
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_unmap_sg
from softrdma.verbs.enums import (
    IbAccess,
    IbPdFlags,
    IbQpType,
    IbSendFlags,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.mr import MemoryRegion, ib_inc_rkey
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import RecvWR, RegWR, SendWR, WorkCompletion
from tests.rdma.nodes import make_device

E = RdmaCmEventType
TARGET_IP = "10.0.0.1"
IQN = "iqn.2003-01.org.linux-iscsi.softrdma:disk"
RQ = 16  # receive descriptors per connection: small, for the swiotlb bounce pool


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])
READ_CAPACITY10 = bytes(10).replace(b"\0", b"\x25", 1)


@dataclass
class IoBuf:
    """An initiator data buffer: pages in a scatterlist, DMA-mapped per
    command and registered with fast registration (ib_iser's
    ``iser_reg_rdma_mem`` / ``iser_fast_reg_mr``), or named by the unsafe
    global rkey."""

    ini: Initiator
    size: int
    pages: list[tuple[Page, int]] = field(default_factory=list)
    sgl: Scatterlist = field(init=False)
    mr: MemoryRegion | None = None
    key: int = 0
    direction: DmaDirection | None = None

    def __post_init__(self) -> None:
        host = self.ini.dev.host
        entries = []
        left = self.size
        while left > 0:
            order = get_order(min(left, PAGE_SIZE << 4))
            page = host.alloc_pages(order, owner="test-iser")
            n = min(left, PAGE_SIZE << order)
            self.pages.append((page, order))
            entries.append((page, 0, n))
            left -= n
        self.sgl = Scatterlist.from_pages(entries)
        if self.ini.fr:
            self.mr = self.ini.dev.alloc_mr(self.ini.pd, self.size // PAGE_SIZE + 1)
            self.key = self.mr.rkey

    def fill(self, data: bytes) -> None:
        pos = 0
        for e in self.sgl:
            self.ini.dev.host.cpu_write_phys(
                e.phys, data[pos : pos + e.length].ljust(e.length, b"\0")
            )
            pos += e.length

    def read(self, length: int) -> bytes:
        data = b"".join(bytes(self.ini.dev.host.cpu_read_phys(e.phys, e.length)) for e in self.sgl)
        return data[:length]

    def map(self, direction: DmaDirection) -> tuple[int, int]:
        """Map for one command; the (STag, VA) to put in the iSER header."""
        dev = self.ini.dev
        assert ib_dma_map_sg(dev, self.sgl, direction)
        self.direction = direction
        if self.mr is None:
            return self.ini.pd.unsafe_global_rkey, self.sgl.dma_segments()[0][0]
        assert self.mr.map_sg(self.sgl) == len(self.sgl.dma_segments())
        self.key = ib_inc_rkey(self.key)
        access = IbAccess.LOCAL_WRITE
        access |= IbAccess.REMOTE_WRITE if direction is DMA_FROM_DEVICE else IbAccess.REMOTE_READ
        self.ini.qp.post_send([RegWR(900, IbWrOpcode.REG_MR, (), IbSendFlags(0), mr=self.mr,
                                     key=self.key, access=access)])  # fmt: skip
        return self.key, self.mr.iova

    def unmap(self, invalidated: int) -> None:
        """After the response: the target invalidated the key, or we do
        (LOCAL_INV); then unmap."""
        if self.mr is not None and invalidated != self.key:
            self.ini.qp.post_send([SendWR(901, IbWrOpcode.LOCAL_INV, (), IbSendFlags.SIGNALED,
                                          invalidate_rkey=self.key)])  # fmt: skip
            self.ini.wait_local(901)
        assert self.direction is not None
        ib_dma_unmap_sg(self.ini.dev, self.sgl, self.direction)
        self.direction = None

    def free(self) -> None:
        if self.mr is not None:
            self.ini.dev.dereg_mr(self.mr)
        for page, order in self.pages:
            self.ini.dev.host.free_pages(page, order)


@dataclass
class Initiator:
    """ib_iser's connection, by hand: RDMA CM with the iSER CM header, one
    SEND per PDU, a receive ring."""

    dev: RoceDevice
    ch: RdmaEventChannel
    cid: RdmaCmId
    pd: ProtectionDomain
    cq: CompletionQueue
    qp: QueuePair
    recv: list[IuBuf]
    send: list[IuBuf]
    fr: bool
    event: RdmaCmEventType
    rep: bytes
    conn: IscsiInitiatorConnection = field(init=False)
    last_inv: int = 0
    _early: list[WorkCompletion] = field(default_factory=list)
    _next_send: int = 0

    @classmethod
    def connect(
        cls, dev: RoceDevice, target: IserTarget, *, fr: bool = True, cm: bytes | None = None
    ) -> Initiator:
        ch = RdmaEventChannel(dev.host)
        cid = RdmaCmId(ch)
        cid.resolve_addr(TARGET_IP, target.port)
        ch.get_cm_event()
        cid.resolve_route()
        ch.get_cm_event()
        pd = dev.alloc_pd(IbPdFlags(0) if fr else IbPdFlags.UNSAFE_GLOBAL_RKEY)
        cq = dev.create_cq(256)
        cap = QpCap(max_send_wr=64, max_recv_wr=32, max_send_sge=4)
        qp = cid.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq, cap))
        recv = alloc_iu_ring(dev, 8, 28 + 48 + 8192, DMA_FROM_DEVICE)
        for i, iu in enumerate(recv):
            qp.post_recv(RecvWR(i, (iu.sge(pd.local_dma_lkey),)))
        send = alloc_iu_ring(dev, 4, 28 + 48 + 8192, DMA_TO_DEVICE)
        if cm is None:
            cm = IserCmHdr().encode()  # 80 00 00 00, as Linux
        cid.connect(RdmaConnParam(private_data=cm, rnr_retry_count=7))
        ev = ch.get_cm_event()
        self = cls(dev, ch, cid, pd, cq, qp, recv, send, fr, ev.event,
                   ev.param.private_data if ev.param else b"")  # fmt: skip
        self.conn = IscsiInitiatorConnection(
            linux_iser_initiator(f"iqn.2005-03.org.open-iscsi:{dev.host.name}", IQN)
        )
        return self

    def post(self, pdu: IscsiPdu | bytes, hdr: IserHdr | None = None) -> None:
        data = pdu if isinstance(pdu, bytes) else encode_iser_send(hdr or IserHdr(), pdu)
        iu = self.send[self._next_send % len(self.send)]
        self._next_send += 1
        iu.write(data)
        sge = iu.sge(self.pd.local_dma_lkey, len(data))
        self.qp.post_send([SendWR(1, IbWrOpcode.SEND, (sge,), IbSendFlags.SIGNALED)])

    def wait_local(self, wr_id: int) -> None:
        for _ in range(100):
            for wc in self.cq.poll(8):
                if wc.wr_id == wr_id and wc.opcode is not IbWcOpcode.RECV:
                    assert wc.status is IbWcStatus.SUCCESS, wc
                    return
                self._early.append(wc)
        raise AssertionError(f"no completion for {wr_id}")

    def raw_reply(self) -> bytes:
        """The next PDU the target sends (without its iSER header)."""
        for _ in range(200):
            wcs, self._early = self._early + self.cq.poll(8), []
            for i, wc in enumerate(wcs):
                if wc.opcode is IbWcOpcode.RECV:
                    self._early = wcs[i + 1 :]
                    assert wc.status is IbWcStatus.SUCCESS, wc
                    iu = self.recv[wc.wr_id]
                    data = iu.read(wc.byte_len)
                    self.qp.post_recv(RecvWR(wc.wr_id, (iu.sge(self.pd.local_dma_lkey),)))
                    hdr = IserHdr.decode(data)
                    assert hdr == IserHdr(), hdr  # the target names no STags
                    invalidated = wc.wc_flags & IbWcFlags.WITH_INVALIDATE
                    self.last_inv = wc.invalidate_rkey if invalidated else 0
                    return data[28:]
                assert wc.status is IbWcStatus.SUCCESS, wc
        raise AssertionError("no reply from the target")

    def reply(self) -> list[Event]:
        step = self.conn.receive(self.raw_reply())
        for pdu in step.pdus:
            self.post(pdu)
        return step.events

    def login(self) -> LoginCompleted:
        self.post(self.conn.login())
        events = self.reply()
        assert isinstance(events[0], LoginCompleted), events
        return events[0]

    def command(
        self,
        cdb: bytes,
        *,
        read: IoBuf | None = None,
        read_length: int = 0,
        write: bytes = b"",
        wbuf: IoBuf | None = None,
        lun: int = 0,
    ) -> CommandCompleted:
        """One SCSI command the way ib_iser sends it: RSV with the read
        buffer; immediate data, then WSV with the rest of the buffer."""
        pdu = self.conn.send_command(cdb, lun=lun, read_length=read_length, write_data=write)
        hdr = IserHdr()
        used: IoBuf | None = None
        if read is not None and read_length:
            stag, va = read.map(DMA_FROM_DEVICE)
            hdr = IserHdr(IserFlag.RSV, read_stag=stag, read_va=va)
            used = read
        elif write and len(pdu.data) < len(write):
            assert wbuf is not None
            wbuf.fill(write)
            stag, va = wbuf.map(DMA_TO_DEVICE)
            hdr = IserHdr(IserFlag.WSV, write_stag=stag, write_va=va + len(pdu.data))
            used = wbuf
        self.post(pdu, hdr)
        events = self.reply()
        if used is not None:
            used.unmap(self.last_inv)
        done = events[0]
        assert isinstance(done, CommandCompleted) and done.itt == pdu.itt, events
        return done

    def logout(self) -> None:
        self.post(self.conn.logout())
        events = self.reply()
        assert isinstance(events[0], LoggedOut) and events[0].response == 0
        assert self.ch.get_cm_event().event is E.DISCONNECTED
        self.close()

    def close(self) -> None:
        self.cid.destroy_qp()
        self.cid.destroy()
        free_iu_ring(self.recv)
        free_iu_ring(self.send)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return tmp_path / "disk.img"


def _target(fabric: Fabric, kind: str, image: Path) -> tuple[IserTarget, RoceDevice]:
    tdev = make_device(kind, fabric, TARGET_IP)
    core = ScsiTarget()
    core.add_lun(0, FileBackstore(image, 512, size=8 << 20, create=True))
    return IserTarget(tdev.host, core, [IQN], addr=TARGET_IP, rq_size=RQ, seed=1), tdev


def _teardown(fabric: Fabric, target: IserTarget, tdev: RoceDevice) -> None:
    fabric.loop.run()
    assert not target.conns
    target.close()
    tdev.unregister()
    tdev.dma_device.release()
    debug = tdev.dma_device.platform.dma_debug
    assert debug is not None and not debug.reports, debug.reports


@pytest.mark.parametrize(
    ("tkind", "ikind"), [("hw-iommu", "cpu"), ("cpu", "hw-iommu"), ("hw-swiotlb", "hw-direct")]
)
def test_login_io_and_logout(tkind: str, ikind: str, image: Path) -> None:
    fabric = Fabric(seed=3)
    target, tdev = _target(fabric, tkind, image)
    ini = Initiator.connect(make_device(ikind, fabric, "10.0.0.2"), target)
    assert ini.event is E.ESTABLISHED and ini.rep[:4] == bytes([0x80, 0, 0, 0])
    done = ini.login()
    assert done.negotiated.rdma_extensions and done.target_name == IQN
    buf = IoBuf(ini, 256 << 10)
    # INQUIRY and READ CAPACITY, RDMA-WRITTEN, the response invalidating the key.
    r = ini.command(INQUIRY, read=buf, read_length=96)
    assert r.status == ScsiStatus.GOOD and buf.read(16)[8:16] == b"SOFTRDMA"
    assert ini.last_inv == buf.key
    r = ini.command(READ_CAPACITY10, read=buf, read_length=8)
    assert r.status == ScsiStatus.GOOD
    assert struct.unpack(">II", buf.read(8)) == ((8 << 20) // 512 - 1, 512)
    # A 4 KiB write as immediate data only: a plain SEND answers.
    block = bytes(range(256)) * 16
    assert ini.command(write10(8, 8), write=block).status == ScsiStatus.GOOD
    assert ini.last_inv == 0
    # 200 KiB: 8 KiB immediate, the rest by RDMA READs of at most 128 KiB.
    big = bytes((i * 7) & 0xFF for i in range(200 << 10))
    reads = target.stats["rdma_reads"]
    r = ini.command(write10(100, 400), write=big, wbuf=buf)
    assert r.status == ScsiStatus.GOOD and ini.last_inv == buf.key
    assert target.stats["rdma_reads"] - reads >= 2
    data = image.read_bytes()
    assert data[8 * 512 : 16 * 512] == block and data[100 * 512 : 500 * 512] == big
    # Read them back.
    assert ini.command(read10(8, 8), read=buf, read_length=4096).status == ScsiStatus.GOOD
    assert buf.read(4096) == block
    r = ini.command(read10(100, 400), read=buf, read_length=200 << 10)
    assert r.status == ScsiStatus.GOOD and buf.read(200 << 10) == big
    # NOP-Out ping.
    nop = ini.conn.nop_out(b"ping")
    ini.post(nop)
    assert ini.reply() == [NopInReceived(nop.itt, b"ping")]
    ini.logout()
    buf.free()
    assert target.stats["logins"] == 1 and target.stats["logouts"] == 1
    _teardown(fabric, target, tdev)


def test_no_cm_header_means_zero_flags(image: Path) -> None:
    """An initiator that sends no iSER CM header (the REQ's private data is
    zero padding after the cma_hdr): flags 0, so remote invalidation is on,
    as LIO reads it."""
    fabric = Fabric(seed=4)
    target, tdev = _target(fabric, "hw-swiotlb", image)
    ini = Initiator.connect(make_device("cpu", fabric, "10.0.0.2"), target, cm=b"")
    assert ini.event is E.ESTABLISHED and ini.rep[:4] == bytes([0x80, 0, 0, 0])
    ini.login()
    buf = IoBuf(ini, 16 << 10)
    assert ini.command(INQUIRY, read=buf, read_length=36).status == ScsiStatus.GOOD
    assert ini.last_inv == buf.key
    ini.logout()
    buf.free()
    _teardown(fabric, target, tdev)


def test_send_w_inv_not_sup_and_global_rkey_mean_plain_sends(image: Path) -> None:
    """An initiator that refuses Send with Invalidate (0x40) gets plain
    SENDs (REP 0xC0, as LIO answers), and may name its buffers by the
    unsafe global rkey."""
    fabric = Fabric(seed=4)
    target, tdev = _target(fabric, "hw-iommu", image)
    ini = Initiator.connect(
        make_device("cpu", fabric, "10.0.0.2"), target, fr=False, cm=bytes([0xC0, 0, 0, 0])
    )
    assert ini.event is E.ESTABLISHED and ini.rep[:4] == bytes([0xC0, 0, 0, 0])
    ini.login()
    buf = IoBuf(ini, 64 << 10)
    payload = b"\x5a" * (40 << 10)
    assert ini.command(write10(0, 80), write=payload, wbuf=buf).status == ScsiStatus.GOOD
    assert ini.last_inv == 0
    assert ini.command(read10(0, 80), read=buf, read_length=40 << 10).status == 0
    assert ini.last_inv == 0 and buf.read(40 << 10) == payload
    assert target.stats["send_with_inv"] == 0
    ini.logout()
    buf.free()
    _teardown(fabric, target, tdev)


def test_scsi_errors_tmf_and_bad_pdus(image: Path) -> None:
    fabric = Fabric(seed=5)
    target, tdev = _target(fabric, "hw-iommu", image)
    ini = Initiator.connect(make_device("cpu", fabric, "10.0.0.2"), target)
    other = Initiator.connect(make_device("hw-swiotlb", fabric, "10.0.0.3"), target)
    ini.login()
    other.login()
    buf = IoBuf(ini, 8192)
    r = ini.command(read10(1 << 20, 1), read=buf, read_length=512)  # past the end
    assert r.status == ScsiStatus.CHECK_CONDITION and SenseData.decode(r.sense).asc == 0x21
    r = ini.command(bytes([0xEE]) + bytes(9))
    assert SenseData.decode(r.sense).asc == 0x20
    # Task management: ABORT TASK of nothing, LUN RESET.
    ini.post(ini.conn.task_management(IscsiTmfFunc.ABORT_TASK, rtt=0x1234))
    ev = ini.reply()[0]
    assert isinstance(ev, TmfCompleted) and ev.response == 1  # no such task
    ini.post(ini.conn.task_management(IscsiTmfFunc.LOGICAL_UNIT_RESET))
    ev = ini.reply()[0]
    assert isinstance(ev, TmfCompleted) and ev.response == 0
    # After the reset, a unit attention is reported once.
    r = ini.command(read10(0, 1), read=buf, read_length=512)
    assert r.status in (ScsiStatus.GOOD, ScsiStatus.CHECK_CONDITION)
    # An unknown opcode: Reject "command not supported", the session lives on.
    bad = bytearray(ini.conn.nop_out().encode())
    bad[0] = 0x40 | 0x1F
    ini.post(IserHdr().encode() + bytes(bad))
    ev = ini.reply()[0]
    assert isinstance(ev, TaskRejected) and ev.reason == IscsiRejectReason.CMD_NOT_SUPPORTED
    assert ini.command(INQUIRY, read=buf, read_length=36).status == ScsiStatus.GOOD
    assert target.stats["rejects"] == 1
    # A SEND that is not even an iSER header: the connection is dropped,
    # the other initiator does not notice.
    ini.post(b"\x99" * 12)
    assert ini.ch.get_cm_event().event is E.DISCONNECTED
    ini.close()
    buf.free()
    obuf = IoBuf(other, 4096)
    assert other.command(INQUIRY, read=obuf, read_length=36).status == ScsiStatus.GOOD
    other.logout()
    obuf.free()
    _teardown(fabric, target, tdev)


def test_hostile_rkey_loses_only_its_connection(image: Path) -> None:
    """A write STag the initiator's device does not know: the RDMA READ is
    NAKed, the connection closes, nothing is written."""
    fabric = Fabric(seed=6)
    target, tdev = _target(fabric, "hw-iommu", image)
    bad = Initiator.connect(make_device("hw-iommu", fabric, "10.0.0.2"), target)
    good = Initiator.connect(make_device("cpu", fabric, "10.0.0.3"), target)
    bad.login()
    good.login()
    pdu = bad.conn.send_command(write10(0, 32), write_data=b"\x11" * 16384)
    bad.post(pdu, IserHdr(IserFlag.WSV, write_stag=0x1234, write_va=0xDEAD0000))
    assert bad.ch.get_cm_event().event is E.DISCONNECTED
    bad.close()
    assert target.stats["rdma_errors"] == 1
    assert image.read_bytes()[:16384] == bytes(16384)
    buf = IoBuf(good, 4096)
    assert good.command(read10(0, 8), read=buf, read_length=4096).status == ScsiStatus.GOOD
    good.logout()
    buf.free()
    _teardown(fabric, target, tdev)


def test_two_initiators_interleaved(image: Path) -> None:
    fabric = Fabric(seed=7)
    target, tdev = _target(fabric, "cpu", image)
    inis = [
        Initiator.connect(make_device(k, fabric, f"10.0.0.{i + 2}"), target)
        for i, k in enumerate(("hw-iommu", "hw-swiotlb"))
    ]
    for ini in inis:
        ini.login()
    assert len(target.portal.sessions) == 2
    bufs = [IoBuf(ini, 32 << 10) for ini in inis]
    for n in range(4):
        for i, (ini, buf) in enumerate(zip(inis, bufs, strict=True)):
            data = bytes([n * 2 + i + 1]) * (16 << 10)
            lba = (n * 2 + i) * 64
            assert ini.command(write10(lba, 32), write=data, wbuf=buf).status == 0
            assert ini.command(read10(lba, 32), read=buf, read_length=16 << 10).status == 0
            assert buf.read(16 << 10) == data
    for ini, buf in zip(inis, bufs, strict=True):
        ini.logout()
        buf.free()
    assert not target.portal.sessions
    _teardown(fabric, target, tdev)


def test_refused_login_and_garbage_before_login(image: Path) -> None:
    """A login to an unknown target gets its Login Response (0x0301, as
    LIO answers it), then the target disconnects; a PDU that is not a Login
    Request before login drops the connection without an answer."""
    fabric = Fabric(seed=8)
    target, tdev = _target(fabric, "hw-iommu", image)
    ini = Initiator.connect(make_device("cpu", fabric, "10.0.0.2"), target)
    ini.conn = IscsiInitiatorConnection(
        linux_iser_initiator("iqn.2005-03.org.open-iscsi:x", "iqn.2003-01.org.example:none")
    )
    ini.post(ini.conn.login())
    with pytest.raises(IscsiLoginError) as refused:
        ini.reply()
    assert (refused.value.status_class, refused.value.status_detail) == (3, 1)
    assert ini.ch.get_cm_event().event is E.DISCONNECTED
    ini.close()
    other = Initiator.connect(make_device("hw-iommu", fabric, "10.0.0.3"), target)
    other.post(IscsiNopOut(immediate=True, itt=1))
    assert other.ch.get_cm_event().event is E.DISCONNECTED
    other.close()
    assert target.stats["dropped_connections"] == 1 and not target.portal.sessions
    _teardown(fabric, target, tdev)


def test_bad_commands_get_reject_or_check_condition(image: Path) -> None:
    """A SCSI Command breaking iscsit_setup_scsi_cmd's rules (R and W both)
    gets Reject "invalid PDU field", and its CmdSN is used up; a write whose
    data is neither all immediate nor offered by WSV gets CHECK CONDITION."""
    fabric = Fabric(seed=9)
    target, tdev = _target(fabric, "cpu", image)
    ini = Initiator.connect(make_device("hw-direct", fabric, "10.0.0.2"), target)
    ini.login()
    pdu = ini.conn.send_command(read10(0, 1), read_length=512)
    bad = dataclasses.replace(pdu, write=True)
    ini.post(bad)
    ev = ini.reply()[0]
    assert isinstance(ev, TaskRejected) and ev.reason == IscsiRejectReason.BOOKMARK_INVALID
    # 16 KiB to write, 8 KiB immediate, no WSV: nothing to fetch the rest from.
    pdu = ini.conn.send_command(write10(0, 32), write_data=b"\x22" * 16384)
    ini.post(pdu)
    done = ini.reply()[0]
    assert isinstance(done, CommandCompleted) and done.status == ScsiStatus.CHECK_CONDITION
    assert image.read_bytes()[:16384] == bytes(16384)
    buf = IoBuf(ini, 4096)
    assert ini.command(INQUIRY, read=buf, read_length=36).status == ScsiStatus.GOOD
    ini.logout()
    buf.free()
    debug = ini.dev.dma_device.platform.dma_debug
    assert debug is not None and not debug.reports, debug.reports
    _teardown(fabric, target, tdev)


def test_session_reinstatement_closes_the_old_connection(image: Path) -> None:
    """The same initiator name and ISID log in again: the old session is
    reinstated away and its RDMA connection closed (DREQ)."""
    fabric = Fabric(seed=10)
    target, tdev = _target(fabric, "hw-iommu", image)
    dev = make_device("cpu", fabric, "10.0.0.2")
    first = Initiator.connect(dev, target)
    first.login()
    second = Initiator.connect(dev, target)
    second.login()
    assert first.ch.get_cm_event().event is E.DISCONNECTED
    first.close()
    fabric.loop.run()
    assert len(target.conns) == 1 and len(target.portal.sessions) == 1
    buf = IoBuf(second, 4096)
    assert second.command(INQUIRY, read=buf, read_length=36).status == ScsiStatus.GOOD
    second.logout()
    buf.free()
    _teardown(fabric, target, tdev)


def test_discovery_session_send_targets(image: Path) -> None:
    fabric = Fabric(seed=11)
    target, tdev = _target(fabric, "hw-iommu", image)
    ini = Initiator.connect(make_device("cpu", fabric, "10.0.0.2"), target)
    ini.conn = IscsiInitiatorConnection(
        linux_iser_initiator("iqn.2005-03.org.open-iscsi:d", "", session_type="Discovery")
    )
    req = ini.conn.login()
    assert "TargetName" not in dict(decode_text(req.data))  # as open-iscsi
    ini.post(req)
    done = ini.reply()[0]
    assert isinstance(done, LoginCompleted) and done.session_type == "Discovery"
    ini.post(ini.conn.text([("SendTargets", "All")]))
    ev = ini.reply()[0]
    assert isinstance(ev, TextResponseReceived)
    assert ("TargetName", IQN) in ev.pairs
    ini.logout()
    _teardown(fabric, target, tdev)


def test_abort_task_of_a_command_moving_data(image: Path) -> None:
    """ABORT TASK arrives while the target RDMA-READs a write's data: the
    TMF answers FUNCTION COMPLETE, the command gets no response and its
    data is not written."""
    fabric = Fabric(seed=12)
    target, tdev = _target(fabric, "hw-iommu", image)
    ini = Initiator.connect(make_device("cpu", fabric, "10.0.0.2"), target)
    ini.login()
    buf = IoBuf(ini, 256 << 10)
    data = b"\x33" * (256 << 10)
    buf.fill(data)
    pdu = ini.conn.send_command(write10(0, 512), write_data=data)
    stag, va = buf.map(DMA_TO_DEVICE)
    ini.post(pdu, IserHdr(IserFlag.WSV, write_stag=stag, write_va=va + len(pdu.data)))
    ini.post(ini.conn.task_management(IscsiTmfFunc.ABORT_TASK, rtt=pdu.itt, refcmdsn=pdu.cmdsn))
    events = ini.reply()
    if isinstance(events[0], CommandCompleted):
        pytest.skip("the write finished before the ABORT TASK arrived")
    assert isinstance(events[0], TmfCompleted) and events[0].response == 0, events
    fabric.loop.run()
    assert target.stats["aborted"] == 1 and not target.conns[0].cmds
    assert image.read_bytes()[: 256 << 10] == bytes(256 << 10)
    buf.unmap(0)
    ini.post(ini.conn.nop_out())
    assert isinstance(ini.reply()[0], NopInReceived)
    ini.cid.disconnect()
    assert ini.ch.get_cm_event().event is E.DISCONNECTED
    ini.close()
    buf.free()
    _teardown(fabric, target, tdev)


def test_a_send_larger_than_the_receive_descriptor_ends_the_connection(image: Path) -> None:
    """More than TargetRecvDataSegmentLength in one SEND does not fit the
    target's receive descriptor: the RC layer fails it, the target closes
    that connection."""
    fabric = Fabric(seed=13)
    target, tdev = _target(fabric, "hw-iommu", image)
    ini = Initiator.connect(make_device("cpu", fabric, "10.0.0.2"), target)
    ini.login()
    big = IuBuf(ini.dev, 28 + 48 + 12288, DMA_TO_DEVICE)
    pdu = ini.conn.send_command(write10(0, 24), write_length=12288)
    data = encode_iser_send(IserHdr(), dataclasses.replace(pdu, data=b"\x44" * 12288))
    big.write(data)
    sge = big.sge(ini.pd.local_dma_lkey, len(data))
    ini.qp.post_send([SendWR(7, IbWrOpcode.SEND, (sge,), IbSendFlags.SIGNALED)])
    assert ini.ch.get_cm_event().event is E.DISCONNECTED
    ini.close()
    big.free()
    assert target.stats["rdma_errors"] == 1
    assert image.read_bytes()[:12288] == bytes(12288)
    _teardown(fabric, target, tdev)
