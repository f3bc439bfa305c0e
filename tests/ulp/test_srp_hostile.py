"""Hostile peers of the real SRP initiator and the real SRP target.

1. A target that RDMA WRITEs outside the descriptors it was given — just
   before or just after the command's buffer, into another command's
   buffer, or through an older command's descriptor after that command
   completed — from the target's own host, on the channel's QP with the
   channel's PD. It is the real ``SrpTarget``: its channels are a subclass
   of the real ``SrpChannel`` whose only change is a hook in front of
   ``_handle_cmd`` (the module's ``SrpChannel`` name is replaced for the
   test, since ``SrpTarget._login`` builds its channels by that name); the
   login, descriptor parsing, ``rdma_rw`` data movement and responses are
   the target's own. What happens is decided on the initiator's host:

   * fast registration (ib_srp's default, any device kind): every buffer
     has its own MR whose key covers exactly that buffer and dies with the
     command, so every stray write is refused (``IB_WC_REM_ACCESS_ERR`` on
     the target's QP) and not a byte outside the command's buffer changes;
   * the unsafe global rkey behind an IOMMU: the key admits any address,
     but the IOMMU admits only what is mapped right now and only in the
     mapped direction, so writes beside the buffer, into a write command's
     (read-only) buffer or into a completed command's buffer fault in the
     IOMMU — while a write into another *read* command's buffer, mapped
     writable for that command, lands;
   * the unsafe global rkey on direct DMA (CPU-copy, direct or swiotlb
     HCA): every stray write lands — which is why the kernel calls the
     global rkey unsafe: with it a peer can write any memory of the host.

2. An initiator that does not follow the protocol, against the real target
   (what ``test_srp_target.py`` does not cover already): a bad immediate
   data offset and an undecodable login, more commands than credits (RNR
   NAKs at the RC layer, then every command served), malformed SRP_CMDs
   and unknown opcodes — while another initiator keeps being served.

Every test ends with the DMA-API debug checker of both hosts silent (the
reports the unsafe global rkey's stray writes cause are asserted and then
cleared) and no mapping left after logout.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import softrdma.ulp.srp.target as srpt
from softrdma.cm.cma import RdmaCmEventType, RdmaCmId, RdmaConnParam, RdmaEventChannel
from softrdma.dma.debug import DebugKind
from softrdma.dma.types import DMA_FROM_DEVICE, DMA_TO_DEVICE
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.memory.host import Host
from softrdma.memory.layout import PAGE_SIZE
from softrdma.memory.scatterlist import Scatterlist
from softrdma.ulp.iu import alloc_iu_ring, free_iu_ring
from softrdma.ulp.scsi import FileBackstore, ScsiStatus, ScsiTarget, SenseData
from softrdma.ulp.srp.initiator import SrpRequest
from softrdma.ulp.srp.initiator_map import SrpBuffer
from softrdma.ulp.srp.initiator_scsi import cdb_read, cdb_write
from softrdma.ulp.srp.proto import (
    SrpCmd,
    SrpDataBuf,
    SrpDirectBuf,
    SrpImmBuf,
    SrpIndirectBuf,
    SrpLoginRej,
    SrpLoginRejReason,
    SrpRsp,
    SrpTLogout,
)
from softrdma.ulp.srp.target import ChState, SrpChannel, SrpTarget
from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_unmap_sg
from softrdma.verbs.enums import IbQpType, IbSendFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.qp import QpCap, QpInitAttr
from softrdma.verbs.wr import RdmaWR, SendWR, Sge, WorkCompletion
from tests.rdma.nodes import Buffer, make_device
from tests.ulp.srp_rig import KINDS, MODES, SrpPair, make_pair
from tests.ulp.test_srp_target import INQUIRY, TARGET_IP, RawInitiator, read10, write10

E_READ_10, E_WRITE_10 = 0x28, 0x2A
MARK = b"\xa5stray RDMA WRITE\x5a"
"""What the hostile target writes: bytes found nowhere else on the
initiator's host."""
VICTIM_LBA = 8
OTHER_LBA = 40
OLD_LBA = 24
ORIGINAL = bytes((i * 13 + 7) & 0xFF for i in range(64 * 512))
"""Blocks 0..63 of the image."""


# -- the hostile target ----------------------------------------------------------------


class HostileTarget(SrpTarget):
    """The real target; :attr:`on_cmd` sees every SRP_CMD first and returns
    True to keep it (the target then neither executes nor answers it)."""

    on_cmd: Callable[[SrpChannel, SrpCmd], bool] | None = None


class HostileChannel(SrpChannel):
    """The real channel, with the target's hook in front of ``_handle_cmd``."""

    def _handle_cmd(self, cmd: SrpCmd) -> None:
        target = self.target
        hook = target.on_cmd if isinstance(target, HostileTarget) else None
        if hook is not None and hook(self, cmd):
            return
        super()._handle_cmd(cmd)


@pytest.fixture
def hostile_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels the real target makes for this test are HostileChannels."""
    monkeypatch.setattr(srpt, "SrpChannel", HostileChannel)


@dataclass
class StrayWrite:
    """An RDMA WRITE of :data:`MARK` to ``(va, key)`` that the target posts on
    a channel's QP from a buffer of its own host (mapped TO_DEVICE, lkey
    the channel PD's local DMA lkey), completing through the channel's
    completion handler."""

    ch: SrpChannel
    va: int
    key: int
    buf: SrpBuffer
    status: IbWcStatus | None = None

    @classmethod
    def post(cls, ch: SrpChannel, va: int, key: int) -> StrayWrite:
        buf = SrpBuffer(ch.dev.host, len(MARK))
        buf.write(MARK)
        assert ib_dma_map_sg(ch.dev, buf.sgl, DMA_TO_DEVICE)
        self = cls(ch, va, key, buf)
        sges = tuple(Sge(dma, n, ch.pd.local_dma_lkey) for dma, n in buf.sgl.dma_segments())
        wr_id = ch._wr_id(self._done)
        ch.qp.post_send([RdmaWR(wr_id, IbWrOpcode.RDMA_WRITE, sges, IbSendFlags.SIGNALED,
                                remote_addr=va, rkey=key)])  # fmt: skip
        return self

    def _done(self, wc: WorkCompletion) -> None:
        self.status = wc.status
        self.release()

    def release(self) -> None:
        if self.buf.pages:
            ib_dma_unmap_sg(self.ch.dev, self.buf.sgl, DMA_TO_DEVICE)
            self.buf.free()
            self.buf.pages = []


def lba_of(cmd: SrpCmd) -> int:
    return int(struct.unpack_from(">I", cmd.cdb, 2)[0])


def first_desc(desc: SrpDataBuf | None) -> SrpDirectBuf:
    """The first direct descriptor of a command's data descriptor."""
    if isinstance(desc, SrpDirectBuf):
        return desc
    assert isinstance(desc, SrpIndirectBuf) and desc.desc_list, desc
    return desc.desc_list[0]


CASES = ("before", "after", "other-read", "other-write", "completed")
"""Where the stray write goes: just before / just after the buffer of the
command it rides on (with that command's key); at the buffer of another
command in flight, a read or a write, which the target keeps unanswered
(with the key of the command it rides on); through a completed command's
own descriptor (its address and key)."""


@dataclass
class Attack:
    """One stray write, in one session: its case, what it aims at, what
    became of it."""

    case: str
    aim: tuple[int, int | None] | None = None  # (va, key or None: the victim's key)
    held: tuple[SrpChannel, SrpCmd] | None = None
    stray: StrayWrite | None = None

    def on_cmd(self, ch: SrpChannel, cmd: SrpCmd) -> bool:
        if cmd.cdb[0] not in (E_READ_10, E_WRITE_10) or self.stray is not None:
            return False
        lba = lba_of(cmd)
        if lba == OTHER_LBA and self.case.startswith("other") and self.held is None:
            self.held = (ch, cmd)  # in flight, unanswered, until the test lets it go
            return True
        if lba != VICTIM_LBA:
            return False
        d = first_desc(cmd.data_in)
        if self.case == "before":
            va, key = d.va - len(MARK), d.key
        elif self.case == "after":
            va, key = d.va + d.len, d.key
        else:
            assert self.aim is not None
            va, aim_key = self.aim
            key = d.key if aim_key is None else aim_key
        self.stray = StrayWrite.post(ch, va, key)
        return False  # and then serve the command as the real target does

    def release_held(self) -> None:
        """Let the kept command go, if its channel is still up (otherwise the
        initiator sent it again on its new channel)."""
        if self.held is not None:
            ch, cmd = self.held
            self.held = None
            if ch.state is ChState.LIVE:
                SrpChannel._handle_cmd(ch, cmd)


@dataclass
class Outcome:
    status: IbWcStatus | None
    landed_at: list[int]
    iommu_faults: list[str]
    reports: list[DebugKind]
    reconnects: int
    guards_intact: bool
    expected_phys: int | None = None
    written: bytes | None = None  # other-write: what the disk got
    key: int = 0  # the rkey the stray write used


GUARD = b"\x3c" * PAGE_SIZE


def find_all(host: Host, needle: bytes) -> list[int]:
    """Every physical address of the host's memory where ``needle`` is."""
    ram = host.ram.obj  # the mmap behind the host's RAM: searched in place
    assert isinstance(ram, mmap.mmap)
    out, pos = [], ram.find(needle)
    while pos >= 0:
        out.append(pos)
        pos = ram.find(needle, pos + 1)
    return out


def run_attack(pair: SrpPair, case: str) -> Outcome:
    """One hostile session: the victim READ lives in a page between two
    guard pages; the target aims a stray write per ``case``; the commands
    must still complete with the right data (after a reconnect when the
    stray write broke the connection)."""
    ini, host, idev = pair.ini, pair.idev.host, pair.idev
    target = pair.target
    assert isinstance(target, HostileTarget)
    attack = Attack(case)
    target.on_cmd = attack.on_cmd
    ini.write(0, ORIGINAL)
    iommu = idev.dma_device.platform.iommu
    faults_before = len(iommu.faults) if iommu is not None else 0
    debug = idev.dma_device.platform.dma_debug
    assert debug is not None
    # The victim's page, with a guard page on each side.
    block = host.alloc_pages(2, owner="test-guarded")
    guards = (block.phys, block.phys + 2 * PAGE_SIZE)
    for g in guards:
        host.cpu_write_phys(g, GUARD)
    victim_phys = block.phys + PAGE_SIZE
    victim = Scatterlist.from_pages([(host.pfn_to_page(block.pfn + 1), 0, PAGE_SIZE)])
    other: SrpBuffer | None = None
    written: bytes | None = None
    other_req: SrpRequest | None = None
    expected_phys: int | None = None
    if case == "completed":
        # Two pages: behind an IOMMU its IOVA range (order 1) is not the
        # one the victim's page gets next (order 0).
        old = SrpBuffer(host, 2 * PAGE_SIZE)
        req = ini.execute(cdb_read(OLD_LBA, 16), old, DMA_FROM_DEVICE)
        assert old.read() == ORIGINAL[OLD_LBA * 512 : (OLD_LBA + 16) * 512]
        d = first_desc(req.descriptor)
        attack.aim = (d.va, d.key)
        expected_phys = old.pages[0].phys
        old.free()  # the block layer gives the pages back
    elif case.startswith("other"):
        other = SrpBuffer(host, 3 * PAGE_SIZE)
        if case == "other-write":
            other.write(b"W" * 3 * PAGE_SIZE)
            other_req = ini.submit(cdb_write(OTHER_LBA, 24), other, DMA_TO_DEVICE)
        else:
            other_req = ini.submit(cdb_read(OTHER_LBA, 24), other, DMA_FROM_DEVICE)
        assert ini.wait_for(lambda: attack.held is not None, 5.0)
        d = first_desc(other_req.descriptor)
        attack.aim = (d.va, None)
        expected_phys = other.pages[0].phys
    req = ini.submit(cdb_read(VICTIM_LBA, 8), victim, DMA_FROM_DEVICE)
    assert ini.wait_for(lambda: attack.stray is not None and attack.stray.status is not None, 5.0)
    stray = attack.stray
    assert stray is not None
    landed = find_all(host, MARK)
    reports = [r.kind for r in debug.reports]
    debug.clear()
    attack.release_held()
    reqs = [req] if other_req is None else [req, other_req]
    assert ini.wait(reqs, 120.0), reqs
    for r in reqs:
        r.result()
    assert (
        bytes(host.cpu_read_phys(victim_phys, PAGE_SIZE))
        == ORIGINAL[VICTIM_LBA * 512 : (VICTIM_LBA + 8) * 512]
    )
    if other is not None:
        if case == "other-read":
            assert other.read() == ORIGINAL[OTHER_LBA * 512 : (OTHER_LBA + 24) * 512]
        else:
            written = ini.read(OTHER_LBA, 24)  # what reached the disk
        other.free()
    guards_intact = all(bytes(host.ram[g : g + PAGE_SIZE]) == GUARD for g in guards)
    host.free_pages(block, 2)
    stray.release()  # (done at its completion already)
    faults = iommu.faults[faults_before:] if iommu is not None else []
    if case in ("before", "after"):
        expected_phys = victim_phys - len(MARK) if case == "before" else victim_phys + PAGE_SIZE
    return Outcome(
        stray.status,
        landed,
        [f.access for f in faults],
        reports,
        ini.stats.reconnects,
        guards_intact,
        expected_phys,
        written,
        stray.key,
    )


def hostile_pair(tmp_path: Path, ikind: str, mode: str) -> SrpPair:
    return make_pair(tmp_path, ikind, "hw-direct", mode, target_cls=HostileTarget, highmem=False)


def unsafe(ikind: str, mode: str, case: str) -> bool:
    """Whether the stray write reaches the initiator's memory: only under
    the global rkey (a one-page buffer is one segment, so ``fr+global``
    describes it with the global rkey too), and behind an IOMMU only into
    a live mapping the device may write."""
    if mode == "fr":
        return False
    if mode == "fr+global" and case == "completed":
        # A two-page buffer is two DMA segments, fast-registered — except
        # behind an IOMMU, which maps it as one range: the global rkey,
        # and an IOMMU fault once it is unmapped.
        return False
    if ikind == "hw-iommu":
        return case == "other-read"
    return True


SAFE = [
    pytest.param(ikind, mode, case, id=f"{ikind}-{mode}-{case}")
    for ikind in KINDS
    for mode in MODES
    for case in CASES
    if not unsafe(ikind, mode, case)
]
UNSAFE = [
    pytest.param(ikind, mode, case, id=f"{ikind}-{mode}-{case}")
    for ikind in KINDS
    for mode in MODES
    for case in CASES
    if unsafe(ikind, mode, case)
]


@pytest.mark.usefixtures("hostile_channels")
@pytest.mark.parametrize(("ikind", "mode", "case"), SAFE)
def test_stray_write_is_refused(tmp_path: Path, ikind: str, mode: str, case: str) -> None:
    """Fast registration on any device, or an IOMMU in front of the global
    rkey: the target's write outside what the command granted fails on
    the target's QP with a remote access error, the initiator's memory
    outside the command's buffer does not change (the guard pages and
    every other byte: the stray bytes are nowhere on the host), the
    initiator reconnects and the commands complete with the right data."""
    pair = hostile_pair(tmp_path, ikind, mode)
    out = run_attack(pair, case)
    assert out.status is IbWcStatus.REM_ACCESS_ERR, out
    assert out.landed_at == [] and out.guards_intact, out
    assert out.reports == [], out  # nothing touched memory outside a live mapping
    if out.key != pair.ini.global_rkey:
        # An MR's bounds, or its dead key, refuse it before any DMA.
        assert out.iommu_faults == [], out
    else:
        assert ikind == "hw-iommu"
        assert out.iommu_faults == ["write"], out
    # the target's QP went to ERR, so did the initiator's: one reconnect
    assert out.reconnects == 1
    assert pair.target.stats["logins"] == 2
    if case == "other-write":
        assert out.written == b"W" * 3 * PAGE_SIZE
    pair.logout()
    pair.close()


@pytest.mark.usefixtures("hostile_channels")
@pytest.mark.parametrize(("ikind", "mode", "case"), UNSAFE)
def test_unsafe_global_rkey_lets_a_stray_write_land(
    tmp_path: Path, ikind: str, mode: str, case: str
) -> None:
    """Documents the kernel's point about the unsafe global rkey
    (``IB_PD_UNSAFE_GLOBAL_RKEY``, which ib_srp asks for with
    ``never_register``, and without ``register_always`` for single-segment
    buffers): the key gives the remote peer access to all of the host's
    memory, which is why the flag is called unsafe and the RDMA core warns
    whenever a PD enables it. On direct DMA the stray write lands wherever
    the target aims it: in the pages next to the buffer, in another
    command's buffer (even one mapped only for the device to read), in a
    completed command's page already given back to the allocator, or (on
    swiotlb) in the bounce buffer pool. Behind an IOMMU it lands only in a
    live, writable mapping: another read command's buffer. The DMA-API
    debug checker sees the device write outside every live mapping, or
    into a TO_DEVICE one. No error is reported on either side and the
    connection stays up."""
    pair = hostile_pair(tmp_path, ikind, mode)
    assert pair.ini.global_rkey
    out = run_attack(pair, case)
    assert out.status is IbWcStatus.SUCCESS, out
    assert len(out.landed_at) == 1, out
    (where,) = out.landed_at
    if ikind == "hw-swiotlb":
        # The address the target has is a bounce slot: the write lands in
        # the swiotlb pool, and whoever uses that slot next gets it.
        swiotlb = pair.idev.dma_device.platform.swiotlb
        assert swiotlb is not None and swiotlb.start <= where < swiotlb.end, out
        assert out.guards_intact
    else:
        assert where == out.expected_phys, out
        # before / after: in the guard pages next to the buffer
        assert out.guards_intact == (case not in ("before", "after"))
    expected_report = {
        "before": [DebugKind.DEVICE_ACCESS_UNMAPPED],
        "after": [DebugKind.DEVICE_ACCESS_UNMAPPED],
        "completed": [DebugKind.DEVICE_ACCESS_UNMAPPED],
        "other-write": [DebugKind.DEVICE_ACCESS_DIRECTION],
        "other-read": [],  # into a live FROM_DEVICE mapping: nothing to see
    }[case]
    assert out.reports == expected_report, out
    assert out.iommu_faults == [] and out.reconnects == 0
    if case == "other-write":
        # written into the write command's buffer before the target
        # fetched it: the disk got the stray bytes
        assert out.written == MARK + b"W" * (3 * PAGE_SIZE - len(MARK))
    pair.logout()
    pair.close()


# -- initiators that break the protocol, against the real target ------------------------


@dataclass
class Served:
    """The real target on an IOMMU HCA and a well-behaved bystander
    initiator logged in to it, which must keep being served."""

    fabric: Fabric
    tdev: RoceDevice
    target: SrpTarget
    backstore: FileBackstore
    bystander: RawInitiator
    devices: list[RoceDevice]
    buffers: list[Buffer]

    def initiator(self, ip: str, kind: str = "cpu", **fields: object) -> RawInitiator:
        dev = make_device(kind, self.fabric, ip)
        self.devices.append(dev)
        return RawInitiator.login(dev, self.target, **fields)

    def buffer(self, dev: RoceDevice, size: int) -> Buffer:
        buf = Buffer(dev, size)
        self.buffers.append(buf)
        return buf

    def bystander_served(self, tag: int) -> None:
        buf = self.buffer(self.bystander.dev, 512)
        rsp = self.bystander.command(tag, INQUIRY, data_in=self.bystander.desc(buf, 36))
        assert rsp.status == ScsiStatus.GOOD and buf.read(16)[8:16] == b"SOFTRDMA"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    fabric = Fabric(seed=11)
    tdev = make_device("hw-iommu", fabric, TARGET_IP)
    backstore = FileBackstore(tmp_path / "disk.img", 512, size=1 << 20, create=True)
    backstore.pwrite(0, ORIGINAL)
    core = ScsiTarget()
    core.add_lun(0, backstore)
    target = SrpTarget(tdev.host, core, addr=TARGET_IP, rq_size=4)
    bdev = make_device("hw-swiotlb", fabric, "10.0.0.9")
    s = Served(fabric, tdev, target, backstore, RawInitiator.login(bdev, target), [bdev], [])
    assert s.bystander.login_event is RdmaCmEventType.ESTABLISHED
    yield s
    # The bystander was served to the end, and logs out; then nothing of
    # any session may stay mapped, and no device has anything to report.
    s.bystander_served(0xB7)
    s.bystander.logout()
    s.fabric.loop.run()
    assert not target.channels, target.channels
    for buf in s.buffers:
        buf.unmap()
    target.close()
    backstore.close()
    for dev in (tdev, *s.devices):
        debug = dev.dma_device.platform.dma_debug
        assert debug is not None
        live = [e for e in debug.live_mappings(dev.dma_device) if "/mad/" not in e.location]
        assert live == [], live
        dev.unregister()
        dev.dma_device.release()
        assert not debug.reports, [str(r) for r in debug.reports]


def close_raw(ini: RawInitiator) -> None:
    """Let go of an initiator the target disconnected (its DREQ answered)."""
    ini.cid.destroy_qp()
    ini.cid.destroy()
    free_iu_ring(ini.recv)
    free_iu_ring(ini.send)


@pytest.mark.parametrize(
    "offset",
    [47, 0, 8261],  # inside the SRP_CMD header; none; beyond the IU it asks for (8260)
    ids=["offset-47", "offset-0", "offset-past-the-iu"],
)
def test_login_with_a_bad_immediate_data_offset_is_rejected(served: Served, offset: int) -> None:
    """(``test_srp_target.py`` has the IU lengths, the port ID and the
    buffer formats.) Immediate data asked for at an offset that is not
    after the SRP_CMD header and inside the IU: SRP_LOGIN_REJ, no channel."""
    ini = served.initiator("10.0.0.2", imm_data_offset=offset)
    assert ini.login_event is RdmaCmEventType.REJECTED
    rej = SrpLoginRej.decode(ini.login_data)
    assert rej.reason == SrpLoginRejReason.INSUFFICIENT_RESOURCES and rej.tag == 7
    assert served.target.stats["login_rejects"] == 1 and len(served.target.channels) == 1
    close_raw(ini)
    served.bystander_served(1)


@pytest.mark.parametrize(
    ("private_data", "reason"),
    [
        (bytes([7] * 56), SrpLoginRejReason.UNABLE_ESTABLISH_CHANNEL),  # byte 11 is no login
        (b"", SrpLoginRejReason.REQ_IT_IU_LENGTH_TOO_LARGE),
        (bytes(30), SrpLoginRejReason.REQ_IT_IU_LENGTH_TOO_LARGE),
    ],
    ids=["not-a-login", "empty", "short"],
)
def test_undecodable_login_is_rejected(
    served: Served, private_data: bytes, reason: SrpLoginRejReason
) -> None:
    """A CM REQ whose private data is not an SRP_LOGIN_REQ (the opcode byte
    wrong): SRP_LOGIN_REJ, unable to establish a channel. Private data
    shorter than a login arrives zero-padded (the REQ's private data field
    has a fixed size), so it reads as a login with an IU length of 0: IU
    length rejected."""
    dev = make_device("cpu", served.fabric, "10.0.0.2")
    served.devices.append(dev)
    ch = RdmaEventChannel(dev.host)
    cid = RdmaCmId(ch)
    cid.resolve_addr(TARGET_IP, served.target.port)
    ch.get_cm_event()
    cid.resolve_route()
    ch.get_cm_event()
    pd = dev.alloc_pd()
    cq = dev.create_cq(16)
    cid.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq, QpCap(max_send_wr=4, max_recv_wr=4)))
    cid.connect(RdmaConnParam(private_data=private_data))
    ev = ch.get_cm_event()
    assert ev.event is RdmaCmEventType.REJECTED
    assert ev.param is not None
    rej = SrpLoginRej.decode(ev.param.private_data)
    assert rej.reason == reason
    assert served.target.stats["login_rejects"] == 1
    cid.destroy_qp()
    cid.destroy()
    served.bystander_served(1)


def test_more_commands_than_credits_meet_rnr_naks_then_complete(served: Served) -> None:
    """The target grants 4 credits (``rq_size``) and has 4 receive IUs; an
    initiator that ignores ``req_lim`` sends 16 commands at once. The SENDs
    the target has no receive for are answered with RNR NAKs at the RC
    layer (counted on both devices); the initiator's QP retries them (the
    target's REP asks for rnr_retry 7, infinite), and as the target
    reposts its receives every command is served — nothing is lost,
    nothing crashes, the bystander is served in the middle of it."""
    ini = served.initiator("10.0.0.2")
    rsp_login = ini.login_data
    assert rsp_login and served.target.rq_size == 4
    n = 16
    buf = served.buffer(ini.dev, n * 512)
    ring = alloc_iu_ring(ini.dev, n, 64, DMA_TO_DEVICE)
    for i, iu in enumerate(ring):
        cmd = SrpCmd(tag=0x100 + i, cdb=read10(i, 1), data_in=ini.desc(buf, 512, i * 512))
        data = cmd.encode()
        iu.write(data)
        ini.qp.post_send(SendWR(0x1000 + i, IbWrOpcode.SEND, (iu.sge(ini.pd.local_dma_lkey, len(data)),),
                                IbSendFlags.SIGNALED))  # fmt: skip
    served.bystander_served(2)
    replies = [ini.reply() for _ in range(n)]
    assert sorted(r.tag for r in replies if isinstance(r, SrpRsp)) == list(range(0x100, 0x100 + n))
    assert all(isinstance(r, SrpRsp) and r.status == ScsiStatus.GOOD for r in replies)
    assert buf.read() == ORIGINAL[: n * 512]
    assert served.tdev.stats["send_rnr_err"] > 0  # the target's responder sent RNR NAKs
    assert ini.dev.stats["rcvd_rnr_err"] > 0  # the initiator's requester got them
    assert served.target.stats["iu_waiting"] > 0  # IUs that waited for a send IU
    assert served.target.stats["commands"] == n + 1  # and the bystander's
    assert served.target.stats["recv_errors"] == 0
    free_iu_ring(ring)
    ini.logout()


def _cmd_bytes(**kw: object) -> bytes:
    return SrpCmd(tag=0x42, cdb=INQUIRY.ljust(16, b"\0"), **kw).encode()  # type: ignore[arg-type]


def _malformed() -> dict[str, bytes]:
    inquiry = _cmd_bytes(data_in=SrpDirectBuf(0x1000, 0x1234, 36))
    bad_in_fmt = bytearray(inquiry)
    bad_in_fmt[5] = 0x03  # data-in "immediate": no such thing
    reserved_fmt = bytearray(inquiry)
    reserved_fmt[5] = 0x70  # data-out format 7: reserved
    too_many = bytearray(
        _cmd_bytes(
            data_in=SrpIndirectBuf(
                SrpDirectBuf(0, 0, 32), 1024, (SrpDirectBuf(0x1000, 1, 512),) * 2
            )
        )
    )
    too_many[7] = 200  # 200 descriptors announced, 2 carried
    imm_beyond = bytearray(
        SrpCmd(
            tag=0x42, cdb=write10(0, 8).ljust(16, b"\0"), data_out=SrpImmBuf(64), imm_data=bytes(64)
        ).encode(imm_data_offset=68)
    )
    imm_beyond[48:52] = (4096).to_bytes(4, "big")  # the imm buffer claims 4 KiB
    add_cdb_beyond = bytearray(inquiry)
    add_cdb_beyond[31] = 0xFC  # 252 bytes of additional CDB that are not there
    return {
        "short-iu": inquiry[:24],
        "data-in-format-immediate": bytes(bad_in_fmt),
        "reserved-format": bytes(reserved_fmt),
        "too-many-descriptors": bytes(too_many),
        "immediate-data-beyond-the-iu": bytes(imm_beyond),
        "add-cdb-beyond-the-iu": bytes(add_cdb_beyond),
    }


MALFORMED = _malformed()


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_srp_cmd_gets_check_condition(served: Served, name: str) -> None:
    """An SRP_CMD the target cannot parse but whose tag it can read: an
    SRP_RSP for that tag with CHECK CONDITION, ILLEGAL REQUEST / INVALID
    FIELD IN COMMAND INFORMATION UNIT (0x0E/0x03); the channel stays up and
    serves the next command; the bystander never notices."""
    ini = served.initiator("10.0.0.2")
    ini.post(MALFORMED[name])
    rsp = ini.reply()
    assert isinstance(rsp, SrpRsp) and rsp.tag == 0x42, rsp
    sense = SenseData.decode(rsp.sense)
    assert rsp.status == ScsiStatus.CHECK_CONDITION and (sense.key, sense.asc, sense.ascq) == (
        0x5,
        0x0E,
        0x03,
    )
    assert rsp.req_lim_delta == 1  # the credit comes back
    assert served.target.stats["bad_iu"] == 1
    buf = served.buffer(ini.dev, 4096)
    assert ini.command(2, read10(3, 8), data_in=ini.desc(buf)).status == ScsiStatus.GOOD
    assert buf.read() == ORIGINAL[3 * 512 : 11 * 512]
    served.bystander_served(3)
    ini.logout()


def test_immediate_data_without_asking_for_it_gets_check_condition(served: Served) -> None:
    """A login without SRP_IMMED_REQUESTED, then a write with immediate data."""
    ini = served.initiator("10.0.0.2", req_flags=0, imm_data_offset=0)
    cmd = SrpCmd(tag=5, cdb=write10(0, 1).ljust(16, b"\0"), data_out=SrpImmBuf(512),
                 imm_data=b"x" * 512)  # fmt: skip
    ini.post(cmd.encode())
    rsp = ini.reply()
    assert isinstance(rsp, SrpRsp) and rsp.tag == 5 and rsp.status == ScsiStatus.CHECK_CONDITION
    assert served.backstore.pread(0, 512) == ORIGINAL[:512]
    ini.logout()


@pytest.mark.parametrize(
    "iu",
    [bytes([0x55]) + bytes(35), bytes([0x02, 0, 0]), bytes([0xC1]) + bytes(3)],
    ids=["unknown-opcode", "srp-cmd-without-a-tag", "truncated-srp-rsp"],
)
def test_unusable_iu_ends_the_channel_with_t_logout(served: Served, iu: bytes) -> None:
    """An IU of an unknown type, or one too short to carry a tag: the
    target sends SRP_T_LOGOUT (invalid IU type) and then disconnects; only
    that initiator's channel goes."""
    ini = served.initiator("10.0.0.2")
    ini.post(iu)
    logout = ini.reply()
    assert isinstance(logout, SrpTLogout) and logout.reason == 2
    assert ini.ch.get_cm_event().event is RdmaCmEventType.DISCONNECTED
    close_raw(ini)
    served.fabric.loop.run()
    assert len(served.target.channels) == 1 and served.target.stats["bad_iu"] == 1
    served.bystander_served(4)
