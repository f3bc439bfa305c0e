"""The SRP initiator (softrdma.ulp.srp.initiator, ib_srp's model) against
the scripted target of ``test_srp_initiator_target``: login and logout as
ib_srp does them, block I/O on every device pairing and registration mode,
the data descriptors it builds — whose addresses must be exactly what the
initiator's device produced with ``ib_dma_map_sg`` (bus addresses, bounce
slots, IOVAs or kernel virtual addresses) — immediate data, highmem pages,
LOCAL_INV versus remote invalidation, credits, and hostile IUs. Every test
ends by releasing both devices: the DMA-API debug checker must have
nothing to report and no mapping may be left.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from softrdma.dma.types import DmaDirection
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.memory.layout import PAGE_OFFSET, PAGE_SIZE
from softrdma.ulp.srp import (
    SRP_IMM_DATA_OFFSET,
    SrpAerReq,
    SrpCredReq,
    SrpDirectBuf,
    SrpImmBuf,
    SrpIndirectBuf,
    SrpLoginRejReason,
    SrpLoginRsp,
    SrpRsp,
)
from softrdma.ulp.srp.initiator import (
    ScsiCheckCondition,
    SrpBuffer,
    SrpConnectError,
    SrpInitiator,
    SrpLoginRejected,
    SrpMapError,
    SrpRequest,
    SrpState,
)
from softrdma.ulp.srp.initiator_scsi import cdb_read
from softrdma.verbs.dma import ib_uses_virt_dma
from softrdma.verbs.enums import IbWcStatus, IbWrOpcode
from softrdma.verbs.wr import RdmaWR, Sge
from tests.rdma.nodes import PAIRINGS, make_device
from tests.ulp.test_srp_initiator_target import (
    BLOCK,
    PRODUCT,
    REVISION,
    VENDOR,
    Disk,
    ScriptedTarget,
    SeenCmd,
    pattern,
)

ID_EXT = 0x505400FFFE770001
IOC_GUID = 0x505400FFFE770002
MODES: dict[str, dict[str, Any]] = {
    "fr": {},  # ib_srp's default on a device with fast registration
    "fr+global": {"register_always": False},
    "global": {"never_register": True},
}


@dataclass
class Rig:
    """An initiator host and a target host on one simulated fabric."""

    fabric: Fabric
    idev: RoceDevice
    tdev: RoceDevice
    target: ScriptedTarget
    ini: SrpInitiator
    extra_targets: list[ScriptedTarget] = field(default_factory=list)

    def cmds(self, opcode: int | None = None) -> list[SeenCmd]:
        return [s for s in self.target.cmds if opcode is None or s.cmd.cdb[0] == opcode]

    def settle(self) -> None:
        """Run the fabric dry, letting the initiator handle completions as
        they come (as its softirq would): a target that sends more IUs than
        the initiator has receives posted gets RNR NAKs until it does."""
        loop = self.fabric.loop
        for _ in range(10_000):
            self.ini.poll()
            if loop.idle:
                break
            loop.run(max_events=200)
        else:
            raise AssertionError("the fabric never went quiet")
        self.ini.poll()

    def close(self) -> None:
        """Close both sides, release both devices: nothing may be reported."""
        self.ini.close()
        for t in (self.target, *self.extra_targets):
            t.close(self.fabric)
        assert self.ini.stats.progress_errors == 0
        for t in (self.target, *self.extra_targets):
            assert not t.errors, t.errors
        for dev in (self.idev, self.tdev):
            dev.unregister()
            dev.dma_device.release()
            debug = dev.dma_device.platform.dma_debug
            assert debug is not None and not debug.reports, debug.reports


def rig(
    ikind: str = "hw-iommu",
    tkind: str = "hw-direct",
    *,
    target: dict[str, Any] | None = None,
    login: bool = True,
    seed: int = 1,
    **kw: Any,
) -> Rig:
    fabric = Fabric(seed=seed)
    idev = make_device(ikind, fabric, "10.0.0.1")
    tdev = make_device(tkind, fabric, "10.0.0.2")
    tgt = ScriptedTarget(tdev, **(target or {}))
    kw.setdefault("can_queue", 16)  # the test platforms' swiotlb pool is 2 MiB
    ini = SrpInitiator(idev, "10.0.0.2", id_ext=ID_EXT, ioc_guid=IOC_GUID, **kw)
    r = Rig(fabric, idev, tdev, tgt, ini)
    if login:
        ini.login()
    return r


@pytest.fixture
def basic() -> Iterator[Rig]:
    r = rig()
    yield r
    r.close()


# -- login and logout ----------------------------------------------------------------------


def test_login_request_is_ib_srps(basic: Rig) -> None:
    (req,) = basic.target.logins
    assert req.req_it_iu_len == 8260  # 68 + 8 KiB of immediate data, as Linux logs in
    assert req.req_buf_fmt == 0x6  # DIRECT | INDIRECT
    assert req.req_flags == 0x80  # SRP_MULTICHAN_SINGLE | SRP_IMMED_REQUESTED
    assert req.imm_data_offset == SRP_IMM_DATA_OFFSET == 68
    guid = basic.idev.query_gid(1, 0)[8:]
    assert guid == basic.idev.node_guid.to_bytes(8, "big")
    assert req.initiator_port_id == bytes(8) + guid  # initiator_ext 0 + the port GUID
    assert req.target_port_id == ID_EXT.to_bytes(8, "big") + IOC_GUID.to_bytes(8, "big")
    ini = basic.ini
    assert ini.connected and ini.state is SrpState.LIVE
    rsp = ini.login_rsp
    assert isinstance(rsp, SrpLoginRsp) and rsp.req_lim_delta == 16
    assert ini.req_lim == 16
    assert ini.max_ti_iu_len == 8260  # the target echoes req_it_iu_len
    assert ini.max_it_iu_len == 8260  # ours, within the target's 8276
    assert ini.imm_data_in_use
    assert ini.cmd_timeout >= 30.0


def test_logout_sends_i_logout_and_disconnects(basic: Rig) -> None:
    basic.ini.logout()
    assert len(basic.target.i_logouts) == 1
    basic.settle()
    assert not basic.target.conns[0].alive  # the target saw the DREQ
    assert basic.ini.state is SrpState.IDLE
    basic.ini.login()  # and can log in again
    assert basic.ini.read(0, 1) == pattern(0)
    assert len(basic.target.logins) == 2


def test_use_imm_data_off() -> None:
    r = rig(use_imm_data=False)
    (req,) = r.target.logins
    assert req.req_flags == 0 and req.imm_data_offset == 0
    assert req.req_it_iu_len == 48 + 16 + 20 + 12 * 16  # cmd_sg_entries descriptors
    r.ini.write(0, b"w" * BLOCK)
    assert isinstance(r.cmds(0x2A)[0].cmd.data_out, SrpDirectBuf)
    assert r.target.rdma_reads == 1
    r.close()


def test_target_without_immed_supp() -> None:
    r = rig(target={"imm_supp": False})
    assert r.target.logins[0].req_flags == 0x80
    assert not r.ini.imm_data_in_use
    r.ini.write(0, b"w" * BLOCK)
    assert not isinstance(r.cmds(0x2A)[0].cmd.data_out, SrpImmBuf)
    r.close()


def test_login_reject_is_typed() -> None:
    reason = SrpLoginRejReason.INSUFFICIENT_RESOURCES
    r = rig(target={"reject": reason}, login=False)
    with pytest.raises(SrpLoginRejected) as e:
        r.ini.login()
    assert e.value.reason == reason and e.value.cm_reason == 28  # IB_CM_REJ_CONSUMER_DEFINED
    assert e.value.errno == errno.ECONNRESET
    assert r.ini.state is SrpState.IDLE
    r.close()


def test_login_iu_too_large_is_rejected() -> None:
    r = rig(target={"max_it_iu_len": 4096}, login=False)
    with pytest.raises(SrpLoginRejected) as e:
        r.ini.login()
    assert e.value.reason == SrpLoginRejReason.REQ_IT_IU_LENGTH_TOO_LARGE
    r.close()


def test_login_to_a_port_nobody_listens_on() -> None:
    r = rig(login=False, port=5556)
    with pytest.raises(SrpConnectError) as e:
        r.ini.login()
    assert not isinstance(e.value, SrpLoginRejected)
    assert e.value.cm_reason == 8  # IB_CM_REJ_INVALID_SERVICE_ID
    r.close()


def test_login_to_an_unreachable_host() -> None:
    fabric = Fabric(seed=3)
    idev = make_device("cpu", fabric, "10.0.0.1")
    ini = SrpInitiator(idev, "10.0.0.9", can_queue=8)
    with pytest.raises(SrpConnectError) as e:
        ini.login()  # the CM REQ is resent 15 times: ~90 simulated seconds
    assert e.value.errno == errno.EHOSTUNREACH
    ini.close()
    idev.unregister()
    idev.dma_device.release()
    debug = idev.dma_device.platform.dma_debug
    assert debug is not None and not debug.reports, debug.reports


# -- block I/O on every pairing and registration mode ------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("ikind", "tkind"), PAIRINGS)
def test_block_io(ikind: str, tkind: str, mode: str) -> None:
    r = rig(ikind, tkind, **MODES[mode])
    ini = r.ini
    assert ini.use_fast_reg == (mode != "global")
    assert bool(ini.global_rkey) == (mode != "fr")
    inq = ini.inquiry()
    assert (inq.vendor, inq.product, inq.revision) == (VENDOR, PRODUCT, REVISION)
    assert (ini.capacity, ini.block_size) == (1 << 33, BLOCK)
    assert ini.read(10, 20) == pattern(10, 20)
    small = bytes(range(256)) * 4  # 2 blocks: immediate data
    big = bytes(i * 7 & 0xFF for i in range(40 * BLOCK))  # 20 KiB: RDMA READ by the target
    ini.write(5, small)
    ini.write(100, big)
    far = (1 << 33) - 16  # beyond 2 TiB: the 16-byte CDBs
    ini.write(far, b"Z" * 8 * BLOCK)
    ini.sync()
    assert ini.read(5, 2) == small
    assert ini.read(100, 40) == big
    assert ini.read(far - 8, 16) == pattern(far - 8, 8) + b"Z" * 8 * BLOCK
    assert r.target.disk.syncs == 1
    assert {s.cmd.cdb[0] for s in r.target.cmds} >= {0x12, 0x9E, 0x28, 0x2A, 0x88, 0x8A, 0x35}
    assert isinstance(r.cmds(0x2A)[0].cmd.data_out, SrpImmBuf)
    assert not isinstance(r.cmds(0x2A)[1].cmd.data_out, SrpImmBuf)
    st = ini.stats
    if mode == "fr":
        assert st.reg_mr >= st.commands - st.immediate - 1  # every data buffer registered
        assert st.local_inv == st.reg_mr
    if mode == "global":
        assert st.reg_mr == 0 and st.local_inv == 0
    r.close()


def test_read_capacity_falls_back_to_10() -> None:
    r = rig(target={"rc16": False, "disk": Disk(blocks=5000)})
    assert r.ini.read_capacity() == (5000, BLOCK)
    assert [s.cmd.cdb[0] for s in r.target.cmds] == [0x9E, 0x25]
    r.close()


def test_check_condition_is_typed(basic: Rig) -> None:
    with pytest.raises(ScsiCheckCondition) as e:
        basic.ini.execute(bytes([0xC7]) + bytes(9))
    assert (e.value.sense_key, e.value.asc, e.value.ascq) == (0x5, 0x20, 0)
    assert e.value.status == 2
    with pytest.raises(ScsiCheckCondition) as e:
        basic.ini.read((1 << 33) - 1, 2)  # past the end
    assert (e.value.sense_key, e.value.asc) == (0x5, 0x21)


def test_transfers_split_at_max_sectors_and_sg_tablesize() -> None:
    r = rig("cpu", "hw-iommu", max_sectors=64, sg_tablesize=64)
    data = bytes(i & 0xFF for i in range(300 * BLOCK))
    r.ini.write(7, data)  # 300 blocks in commands of max_sectors = 64 blocks
    lengths = [int.from_bytes(s.cmd.cdb[7:9], "big") for s in r.cmds(0x2A)]
    assert lengths == [64, 64, 64, 64, 44]
    assert r.ini.read(7, 300) == data
    r.close()
    r = rig("cpu", "hw-iommu")  # ib_srp's defaults: 12 S/G entries of a page each
    assert r.ini.max_transfer_blocks == 12 * PAGE_SIZE // BLOCK
    r.ini.read(0, 200)
    assert [int.from_bytes(s.cmd.cdb[7:9], "big") for s in r.cmds(0x28)] == [96, 96, 8]
    r.close()


def test_queue_depth_limited_async_io() -> None:
    r = rig("hw-swiotlb", "cpu", can_queue=8, target={"rsp_delay": 0.001, "req_lim": 64})
    ini = r.ini
    ios = [ini.submit_write(lba * 8, bytes([lba]) * 8 * BLOCK) for lba in range(40)]
    assert ini.outstanding <= 8 and ini.queued > 0
    assert ini.wait_io(ios)
    assert all(io.result() is None for io in ios)
    reads = [ini.submit_read(lba * 8, 8) for lba in range(40)]
    ini.wait_io(reads)
    assert [io.result() for io in reads] == [bytes([lba]) * 8 * BLOCK for lba in range(40)]
    assert r.target.max_outstanding == 8  # can_queue, with credits to spare
    r.close()


# -- the descriptors: exactly the device's DMA addresses -----------------------------------


def kind_of_address(r: Rig, buf: SrpBuffer, dma: int, index: int) -> None:
    """What a DMA address is, by device: a kernel virtual address (CPU-copy
    device; a kmap address for a highmem page), a bounce slot (swiotlb), an
    IOVA (IOMMU), or the bus address of the page (direct)."""
    dev = r.idev
    page = buf.pages[index]
    platform = dev.dma_device.platform
    if ib_uses_virt_dma(dev):
        if page.is_highmem:
            assert dev.host.pkmap.contains(dma)
        else:
            assert dma == PAGE_OFFSET + page.phys
    elif platform.iommu is not None:
        assert dma < 1 << 32 and dma != page.phys  # an IOVA below 4 GiB
    elif platform.swiotlb is not None and platform.swiotlb.force:
        assert platform.swiotlb.start <= dma < platform.swiotlb.end
    else:
        assert dma == page.phys + dev.dma_device.bus_offset


def submit_read(r: Rig, npages: int) -> tuple[SrpRequest, SrpBuffer, SeenCmd]:
    buf = SrpBuffer(r.idev.host, npages * PAGE_SIZE, highmem=r.ini.highmem)
    seen_before = len(r.target.cmds)
    req = r.ini.submit(cdb_read(64, npages * 8), buf, DmaDirection.FROM_DEVICE)
    assert r.ini.wait(req)
    req.result()
    assert buf.read() == pattern(64, npages * 8)
    return req, buf, r.target.cmds[seen_before]


@pytest.mark.parametrize("highmem", [True, False], ids=["highmem", "lowmem"])
@pytest.mark.parametrize("ikind", ["cpu", "hw-direct", "hw-swiotlb", "hw-iommu"])
def test_global_rkey_descriptors_are_the_dma_addresses(ikind: str, highmem: bool) -> None:
    r = rig(ikind, "hw-direct", never_register=True, highmem=highmem)
    req, buf, seen = submit_read(r, 3)
    rkey = r.ini.pd.unsafe_global_rkey
    segs = req.dma_segments
    desc = seen.cmd.data_in
    if len(segs) == 1:  # an IOMMU merged the three pages into one IOVA range
        assert desc == SrpDirectBuf(segs[0][0], rkey, segs[0][1])
    else:
        assert isinstance(desc, SrpIndirectBuf)
        assert list(desc.desc_list) == [SrpDirectBuf(a, rkey, n) for a, n in segs]
        assert desc.table_desc.key == rkey and desc.table_desc.len == 16 * len(segs)
        assert desc.len == 3 * PAGE_SIZE
        for i, (dma, _) in enumerate(segs):
            kind_of_address(r, buf, dma, i)
    assert seen.cmd.data_in_desc_cnt is None  # the count byte is the list length
    assert req.descriptor == desc
    if highmem:
        assert any(p.is_highmem for p in buf.pages)
        assert all(r.idev.host.pkmap.address_of(p.pfn) is None for p in buf.pages)
    buf.free()
    r.close()


@pytest.mark.parametrize("ikind", ["cpu", "hw-direct", "hw-swiotlb", "hw-iommu"])
def test_fast_registration_descriptor_is_the_mr(ikind: str) -> None:
    r = rig(ikind, "cpu")
    req, buf, seen = submit_read(r, 3)
    desc = seen.cmd.data_in
    assert isinstance(desc, SrpDirectBuf)  # one MR for the whole buffer
    (key,) = req.rkeys
    assert desc.key == key != r.ini.global_rkey == 0
    assert desc.va == req.dma_segments[0][0]  # ib_map_mr_sg: the iova is the first DMA address
    assert desc.len == 3 * PAGE_SIZE
    kind_of_address(r, buf, desc.va, 0)
    assert r.ini.stats.local_inv == r.ini.stats.reg_mr == 1
    # the key died with the command: the target cannot use it any more
    assert not try_rdma_write(r, desc)
    buf.free()
    r.close()


def try_rdma_write(r: Rig, desc: SrpDirectBuf) -> bool:
    """The target, misbehaving, writes 8 bytes to (va, key) on a QP of its
    own PD; whether the initiator's HCA let it."""
    conn = r.target.conns[-1]
    stage = SrpBuffer(r.tdev.host, 8)
    from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_unmap_sg

    ib_dma_map_sg(r.tdev, stage.sgl, DmaDirection.TO_DEVICE)
    ((dma, _),) = stage.sgl.dma_segments()
    status: list[IbWcStatus] = []
    wr_id = r.target._op(lambda wc: status.append(wc.status))
    conn.qp.post_send(
        RdmaWR(
            wr_id,
            IbWrOpcode.RDMA_WRITE,
            (Sge(dma, 8, r.target.pd.local_dma_lkey),),
            remote_addr=desc.va,
            rkey=desc.key,
        )
    )
    r.settle()
    ib_dma_unmap_sg(r.tdev, stage.sgl, DmaDirection.TO_DEVICE)
    stage.free()
    assert status, "the RDMA WRITE never completed"
    return status[0] == IbWcStatus.SUCCESS


def test_indirect_descriptors_with_fast_registration() -> None:
    # MRs of two pages: a five-page buffer needs three, and the table a fourth
    r = rig("hw-direct", "hw-iommu", max_pages_per_mr=2, max_sectors=64)
    assert r.ini.mr_per_cmd == 1 + (64 + 1 + 15) // 16
    req, buf, seen = submit_read(r, 5)
    desc = seen.cmd.data_in
    assert isinstance(desc, SrpIndirectBuf)
    assert [d.len for d in desc.desc_list] == [2 * PAGE_SIZE, 2 * PAGE_SIZE, PAGE_SIZE]
    assert len(req.rkeys) == 4 and len(set(req.rkeys)) == 4
    assert [d.key for d in desc.desc_list] == list(req.rkeys[:3])
    assert desc.table_desc.key == req.rkeys[3]  # srp_map_idb
    assert desc.table_desc.len == 3 * 16 and desc.len == 5 * PAGE_SIZE
    segs = req.dma_segments
    assert [d.va for d in desc.desc_list] == [segs[0][0], segs[2][0], segs[4][0]]
    st = r.ini.stats
    assert st.reg_mr == st.local_inv == 4 and st.indirect == 1
    buf.free()
    r.close()


def test_sg_list_that_does_not_fit_the_command() -> None:
    r = rig("hw-direct", "cpu", never_register=True, cmd_sg_entries=2, sg_tablesize=4)
    assert r.ini.sg_tablesize == 2  # no MR pool and no external tables
    buf = SrpBuffer(r.idev.host, 3 * PAGE_SIZE)
    with pytest.raises(SrpMapError) as e:
        r.ini.execute(cdb_read(0, 24), buf, DmaDirection.FROM_DEVICE)
    assert e.value.errno == errno.EINVAL
    buf.free()
    r.close()


@pytest.mark.parametrize("mode", ["global", "fr"])
def test_external_descriptor_table(mode: str) -> None:
    kw: dict[str, Any] = {"never_register": True} if mode == "global" else {"max_pages_per_mr": 1}
    r = rig(
        "hw-direct",
        "hw-swiotlb",
        cmd_sg_entries=2,
        sg_tablesize=8,
        allow_ext_sg=True,
        max_sectors=64,
        target={"fetch_ext_tables": True},
        **kw,
    )
    req, buf, seen = submit_read(r, 5)
    desc = seen.cmd.data_in
    assert isinstance(desc, SrpIndirectBuf) and desc.external
    assert len(desc.desc_list) == 2 and desc.table_count == 5
    assert seen.table is not None and seen.table[:2] == list(desc.desc_list)
    if mode == "global":
        assert seen.table == [SrpDirectBuf(a, r.ini.global_rkey, n) for a, n in req.dma_segments]
    else:  # six MRs: a page each, and the table's, read-only to the target
        assert len(req.rkeys) == 6 and desc.table_desc.key == req.rkeys[-1]
    assert r.ini.stats.external_tables == 1
    buf.free()
    r.close()


# -- immediate data ------------------------------------------------------------------------


@pytest.mark.parametrize("ikind", ["cpu", "hw-swiotlb", "hw-iommu"])
def test_immediate_data_as_ib_srp_sends_it(ikind: str) -> None:
    r = rig(ikind, "hw-direct")
    ini = r.ini
    assert ini.block_size == BLOCK  # READ CAPACITY first (a registered data-in buffer)
    before = ini.stats.reg_mr
    two_pages = bytes(i % 251 for i in range(2 * PAGE_SIZE))  # 68 + 8192 = max_it_iu_len
    ini.write(0, two_pages)
    ini.write(50, b"q" * BLOCK)
    ini.write(80, b"t" * 3 * PAGE_SIZE)  # too big: the target RDMA READs it
    first, second, third = r.cmds(0x2A)
    for seen, data in ((first, two_pages), (second, b"q" * BLOCK)):
        assert seen.cmd.data_out == SrpImmBuf(len(data))
        assert seen.cmd.imm_data == data
        assert seen.cmd.imm_gap == b""  # the gap up to offset 68 is zero here
    assert isinstance(third.cmd.data_out, SrpDirectBuf | SrpIndirectBuf)
    assert r.target.rdma_reads >= 1 and ini.stats.immediate == 2
    assert r.target.disk.read(0, 16) == two_pages
    assert ini.stats.reg_mr == before + 1  # only the third write was registered
    r.close()


# -- invalidation ------------------------------------------------------------------------


@pytest.mark.parametrize("remote", [False, True], ids=["local-inv", "send-with-inv"])
def test_local_inv_or_remote_invalidation(remote: bool) -> None:
    r = rig("hw-iommu", "cpu", target={"remote_invalidate": remote}, use_imm_data=False)
    ini = r.ini
    ini.read_capacity()
    ini.stats.reg_mr = ini.stats.local_inv = ini.stats.remote_inv = 0
    for i in range(6):
        ini.write(i * 8, bytes([i]) * 8 * BLOCK)
        assert ini.read(i * 8, 8) == bytes([i]) * 8 * BLOCK
    st = ini.stats
    assert st.reg_mr == 12
    if remote:
        assert (st.remote_inv, st.local_inv, st.bad_remote_inv) == (12, 0, 0)
    else:
        assert (st.remote_inv, st.local_inv) == (0, 12)
    last = r.target.cmds[-1].descs[0]
    assert not try_rdma_write(r, last)
    r.close()


# -- credits -------------------------------------------------------------------------------


def test_credits_never_exceeded_and_replenished() -> None:
    r = rig("cpu", "hw-iommu", target={"req_lim": 4, "rsp_delay": 0.01})
    ini = r.ini
    reqs = [ini.submit_read(i, 1) for i in range(20)]
    assert ini.outstanding == 3  # four credits, one kept for task management
    ini.wait_io(reqs)
    assert r.target.max_outstanding == 3
    assert ini.stats.zero_req_lim > 0 and ini.req_lim == 4
    # the target grants more: SRP_CRED_REQ, answered with SRP_CRED_RSP
    r.target.inject(SrpCredReq(tag=0x77, req_lim_delta=8).encode())
    assert ini.wait_for(lambda: bool(r.target.cred_rsps), 1.0)
    assert r.target.cred_rsps[0].tag == 0x77 and ini.req_lim == 12
    r.target.max_outstanding = 0
    reqs = [ini.submit_read(i, 1) for i in range(20)]
    ini.wait_io(reqs)
    assert r.target.max_outstanding == 11
    assert ini.stats.cred_req == 1 and ini.stats.credit_violations == 0
    r.close()


def test_aer_is_answered(basic: Rig) -> None:
    sense = bytes([0x70, 0, 6, 0, 0, 0, 0, 10]) + bytes(4) + bytes([0x2A, 0x09]) + bytes(4)
    basic.target.inject(SrpAerReq(tag=0x99, lun=0, sense=sense, req_lim_delta=2).encode())
    assert basic.ini.wait_for(lambda: bool(basic.target.aer_rsps), 1.0)
    assert basic.target.aer_rsps[0].tag == 0x99
    assert basic.ini.aer_events == [(0, sense)] and basic.ini.req_lim == 18


def test_bad_ius_are_counted_and_dropped(basic: Rig) -> None:
    t, ini = basic.target, basic.ini
    t.inject(SrpRsp(tag=0xDEAD, req_lim_delta=1).encode())  # no such command
    t.inject(b"\xc1\x00\x00")  # a truncated SRP_RSP
    t.inject(SrpLoginRsp().encode())  # not an IU a channel carries
    t.inject(SrpRsp(tag=0x8000_0005).encode())  # a task management response nobody awaits
    basic.settle()
    st = ini.stats
    assert (st.unknown_tag, st.malformed_iu, st.unexpected_iu, st.late_tsk_mgmt) == (1, 1, 1, 1)
    assert ini.req_lim == 17  # the unknown tag's credit is taken, as ib_srp does
    assert ini.read(3, 1) == pattern(3) and ini.connected


# -- real time ----------------------------------------------------------------------------


def test_over_udp_on_real_time() -> None:
    from softrdma.fabric.udp import UdpNetwork
    from tests.fabric.netaddr import loopback_addresses

    ips = loopback_addresses(2)
    nets = [UdpNetwork(), UdpNetwork()]
    idev = make_device("cpu", nets[0], ips[0], netdev_mtu=None)
    tdev = make_device("hw-iommu", nets[1], ips[1], netdev_mtu=None)
    try:
        target = ScriptedTarget(tdev)
        ini = SrpInitiator(idev, ips[1], can_queue=8, cmd_timeout=10.0)
        ini.login(timeout=10.0)
        data = bytes(i & 0xFF for i in range(24 * BLOCK))
        ini.write(9, data)
        assert ini.read(9, 24) == data
        assert ini.inquiry().vendor == VENDOR
        ini.close()
        target.close()
        assert not target.errors, target.errors
    finally:
        for dev in (idev, tdev):
            dev.unregister()
        for net in nets:
            net.close()
    for dev in (idev, tdev):
        dev.dma_device.release()
        debug = dev.dma_device.platform.dma_debug
        assert debug is not None and not debug.reports, debug.reports
