"""The RDMA core's objects on their own: PD keys, MR registration rules,
the QP state machine and work-request validation (no transport)."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import pytest

from softrdma.dma.platform import Platform
from softrdma.dma.types import DMA_BIDIRECTIONAL, DmaBackend
from softrdma.memory.scatterlist import Scatterlist
from softrdma.time.sim import SimLoop
from softrdma.verbs.ah import AhAttr
from softrdma.verbs.device import IBK_LOCAL_DMA_LKEY, DeviceAttr, IbDevice
from softrdma.verbs.dma import ib_dma_map_sg, ib_uses_virt_dma
from softrdma.verbs.enums import (
    IbAccess,
    IbMrType,
    IbMtu,
    IbPdFlags,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbSendFlags,
    IbWrOpcode,
)
from softrdma.verbs.errors import PostError, VerbsError
from softrdma.verbs.mr import MrKeyError, MrState, ib_inc_rkey
from softrdma.verbs.qp import (
    QpAttr,
    QpCap,
    QpInitAttr,
    QueuePair,
    apply_qp_attr,
    connect_qp,
    ib_modify_qp_is_ok,
)
from softrdma.verbs.wr import RdmaWR, RecvWR, SendWR, Sge
from tests.conftest import make_host

M = IbQpAttrMask
S = IbQpState


@dataclass
class FakeQp:
    """The driver's side of a QP, as the verbs layer sees it."""

    state: IbQpState = IbQpState.RESET
    attr: QpAttr = field(default_factory=QpAttr)
    sq_outstanding: int = 0
    rq_outstanding: int = 0


class FakeDevice(IbDevice):
    """Records what the verbs layer asks of a driver."""

    def __init__(self, backend: DmaBackend = DmaBackend.DIRECT, reserved_lkey: bool = True) -> None:
        platform = Platform(make_host(), iommu=backend == DmaBackend.IOMMU)
        caps = IBK_LOCAL_DMA_LKEY if reserved_lkey else 0
        super().__init__(
            "fake0",
            platform.add_device("fake0", backend=backend),
            DeviceAttr(kernel_cap_flags=caps),
            ip=IPv4Address("10.0.0.1"),
            mac=b"\x02\x00\x0a\x00\x00\x01",
            local_dma_lkey=0x100 if reserved_lkey else 0,
            scheduler=SimLoop(),
        )
        self.calls: list[tuple[str, object]] = []

    def ops_create_qp(self, qp: QueuePair) -> FakeQp:
        self.calls.append(("create", qp))
        return FakeQp()

    def ops_modify_qp(self, qp: QueuePair, attr: QpAttr, mask: int) -> None:
        hw = qp.hw
        assert isinstance(hw, FakeQp)
        apply_qp_attr(hw.attr, attr, mask)
        hw.state = attr.qp_state
        self.calls.append(("modify", qp.state))

    def ops_post_send(self, qp: QueuePair, wrs: Sequence[SendWR]) -> None:
        assert isinstance(qp.hw, FakeQp)
        qp.hw.sq_outstanding += len(wrs)
        self.calls.append(("send", list(wrs)))

    def ops_post_recv(self, qp: QueuePair, wrs: Sequence[RecvWR]) -> None:
        assert isinstance(qp.hw, FakeQp)
        qp.hw.rq_outstanding += len(wrs)
        self.calls.append(("recv", list(wrs)))

    def ops_destroy_qp(self, qp: QueuePair) -> None:
        self.calls.append(("destroy", qp))

    def ops_unregister(self) -> None:
        pass


def rc_qp(dev: FakeDevice, **cap: int) -> QueuePair:
    pd = dev.alloc_pd()
    cq = dev.create_cq(16)
    return dev.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq, QpCap(**cap)))


def test_pd_local_dma_lkey_and_global_rkey() -> None:
    hw = FakeDevice()
    pd = hw.alloc_pd()
    assert pd.local_dma_lkey == 0x100 and pd.unsafe_global_rkey == 0
    unsafe = hw.alloc_pd(IbPdFlags.UNSAFE_GLOBAL_RKEY)
    assert unsafe.unsafe_global_rkey and unsafe.internal_mr is not None
    assert unsafe.internal_mr.type == IbMrType.DMA
    soft = FakeDevice(DmaBackend.VIRTUAL, reserved_lkey=False)
    assert ib_uses_virt_dma(soft) and not ib_uses_virt_dma(hw)
    spd = soft.alloc_pd()
    assert spd.internal_mr is not None and spd.local_dma_lkey == spd.internal_mr.lkey
    assert spd.internal_mr.access == IbAccess.LOCAL_WRITE
    mr = soft.alloc_mr(spd, 4)
    with pytest.raises(VerbsError) as err:
        spd.dealloc()
    assert err.value.errno == errno.EBUSY
    soft.dereg_mr(mr)
    spd.dealloc()


def test_keys_index_and_byte() -> None:
    dev = FakeDevice()
    pd = dev.alloc_pd()
    a, b = dev.alloc_mr(pd, 8), dev.alloc_mr(pd, 8)
    assert a.lkey >> 8 != b.lkey >> 8 and a.lkey == a.rkey
    assert ib_inc_rkey(0x12FF) == 0x1200 and ib_inc_rkey(0x1234) == 0x1235


def test_map_mr_sg_builds_the_page_list_from_dma_segments() -> None:
    dev = FakeDevice(DmaBackend.DIRECT)
    host = dev.host
    pages = [host.alloc_pages(0) for _ in range(3)]
    sgl = Scatterlist.from_pages([(pages[0], 512, 3584), (pages[1], 0, 4096), (pages[2], 0, 100)])
    n = ib_dma_map_sg(dev, sgl, DMA_BIDIRECTIONAL)
    assert n == 3
    pd = dev.alloc_pd()
    mr = dev.alloc_mr(pd, 8)
    assert mr.map_sg(sgl, n) == n
    segs = sgl.dma_segments()
    assert mr.iova == segs[0][0] and mr.length == 3584 + 4096 + 100
    assert list(mr.dma_segments(mr.iova + 3584, 10)) == [(segs[1][0], 10)]
    assert list(mr.dma_segments(mr.iova + 3580, 8)) == [(segs[0][0] + 3580, 4), (segs[1][0], 4)]
    small = dev.alloc_mr(pd, 1)
    assert small.map_sg(sgl, n) == 1, "only the prefix that fits"
    gap = Scatterlist.from_pages([(pages[0], 0, 100), (pages[1], 0, 100)])
    ib_dma_map_sg(dev, gap, DMA_BIDIRECTIONAL)
    assert dev.alloc_mr(pd, 8).map_sg(gap) == 1, "a gap that is not page aligned ends the prefix"


def test_fast_registration_rules() -> None:
    dev = FakeDevice()
    pd, other = dev.alloc_pd(), dev.alloc_pd()
    mr = dev.alloc_mr(pd, 4)
    table = dev.mr_table
    assert mr.state == MrState.FREE
    with pytest.raises(MrKeyError, match="more than the key byte"):
        table.reg_fast_mr(pd, mr, mr.lkey + 0x100, IbAccess.LOCAL_WRITE)
    with pytest.raises(MrKeyError, match="another PD"):
        table.reg_fast_mr(other, mr, mr.lkey, IbAccess.LOCAL_WRITE)
    with pytest.raises(VerbsError, match="need LOCAL_WRITE"):
        table.reg_fast_mr(pd, mr, mr.lkey, IbAccess.REMOTE_WRITE)
    key = ib_inc_rkey(mr.rkey)
    table.reg_fast_mr(pd, mr, key, IbAccess.LOCAL_WRITE | IbAccess.REMOTE_READ)
    assert (mr.state, mr.rkey) == (MrState.VALID, key)
    assert table.lookup(key, pd, IbAccess.REMOTE_READ, remote=True) is mr
    for bad_key, bad_pd, access, msg in (
        (key - 1, pd, 0, "names no MR"),
        (key, other, 0, "another PD"),
        (key, pd, IbAccess.REMOTE_WRITE, "lacks"),
    ):
        with pytest.raises(MrKeyError, match=msg):
            table.lookup(bad_key, bad_pd, access, remote=True)
    with pytest.raises(MrKeyError, match="state valid"):
        table.reg_fast_mr(pd, mr, key, IbAccess.LOCAL_WRITE)
    table.invalidate(pd, key, remote=True)
    with pytest.raises(MrKeyError, match="free"):
        table.lookup(key, pd, IbAccess.REMOTE_READ, remote=True)


def test_qp_state_machine() -> None:
    dev = FakeDevice()
    qp = rc_qp(dev)
    with pytest.raises(VerbsError, match="requires"):
        qp.modify(QpAttr(qp_state=S.INIT), M.STATE)
    with pytest.raises(VerbsError, match="no transition RESET -> RTS"):
        qp.modify(QpAttr(qp_state=S.RTS), M.STATE)
    with pytest.raises(VerbsError, match="does not take"):
        qp.modify(
            QpAttr(qp_state=S.INIT), M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS | M.SQ_PSN
        )
    with pytest.raises(VerbsError, match="port_num"):
        qp.modify(
            QpAttr(qp_state=S.INIT, port_num=2), M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS
        )
    assert qp.state == S.RESET
    connect_qp(qp, dest_qp_num=0x22, dgid=dev.query_gid(1, 1), rq_psn=5, sq_psn=7)
    attr, _ = qp.query()
    assert (qp.state, attr.sq_psn, attr.path_mtu) == (S.RTS, 7, IbMtu.MTU_1024)
    assert [c[1] for c in dev.calls if c[0] == "modify"] == [S.INIT, S.RTR, S.RTS]
    qp.modify(QpAttr(qp_state=S.SQD), M.STATE)
    qp.modify(QpAttr(qp_state=S.RTS, min_rnr_timer=3), M.STATE | M.MIN_RNR_TIMER)
    qp.modify(QpAttr(qp_state=S.ERR), M.STATE)
    with pytest.raises(VerbsError):
        qp.modify(QpAttr(qp_state=S.RTS), M.STATE)
    qp.modify(QpAttr(qp_state=S.RESET), M.STATE)
    assert ib_modify_qp_is_ok(S.SQE, S.RTS, IbQpType.RC, M.STATE) is not None
    assert ib_modify_qp_is_ok(S.SQE, S.RTS, IbQpType.UD, M.STATE) is None
    assert ib_modify_qp_is_ok(S.INIT, S.RTR, IbQpType.UD, M.STATE) is None


def test_post_validation_and_bad_wr() -> None:
    """What the verbs layer checks of every WR (the driver checks what is
    specific to the opcode: see tests/rdma/test_post_validation.py)."""
    dev = FakeDevice()
    qp = rc_qp(dev, max_send_wr=2, max_send_sge=1, max_inline_data=16, max_recv_wr=1)
    sge = Sge(0x1000, 8, 0x100)
    with pytest.raises(PostError, match="RESET"):
        qp.post_send(SendWR(1, IbWrOpcode.SEND, sg_list=(sge,)))
    with pytest.raises(PostError, match="RESET"):
        qp.post_recv(RecvWR(1, (sge,)))
    connect_qp(qp, dest_qp_num=0x22, dgid=dev.query_gid())
    bad_cases = [
        (SendWR(2, IbWrOpcode.SEND, sg_list=(sge, sge)), "max_send_sge"),
        (
            SendWR(6, IbWrOpcode.SEND, sg_list=(Sge(0, 32, 0),), send_flags=IbSendFlags.INLINE),
            "max_inline_data",
        ),
        (SendWR(7, IbWrOpcode.SEND, sg_list=(Sge(0, 1 << 32, 0),)), "SGE length"),
    ]
    for wr, msg in bad_cases:
        with pytest.raises(PostError, match=msg) as err:
            qp.post_send(wr)
        assert err.value.bad_wr is wr and err.value.errno == errno.EINVAL
    good, also_good, overflow = (
        SendWR(7, IbWrOpcode.SEND, sg_list=(sge,)),
        RdmaWR(8, IbWrOpcode.RDMA_READ, (sge,)),
        SendWR(9, IbWrOpcode.SEND),
    )
    with pytest.raises(PostError, match="send queue full") as err:
        qp.post_send([good, also_good, overflow])
    assert err.value.bad_wr is overflow and err.value.errno == errno.ENOMEM
    assert dev.calls[-1] == ("send", [good, also_good]), "the WRs before bad_wr are posted"
    assert qp.hw.sq_outstanding == 2
    with pytest.raises(VerbsError):
        AhAttr(dgid=b"short")


def test_create_qp_limits_and_cq_checks() -> None:
    dev = FakeDevice()
    pd = dev.alloc_pd()
    cq = dev.create_cq(4)
    with pytest.raises(VerbsError, match="max_send_sge"):
        dev.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq, QpCap(max_send_sge=1000)))
    with pytest.raises(VerbsError, match="cqe"):
        dev.create_cq(0)
    qp = dev.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq))
    with pytest.raises(VerbsError):
        cq.destroy()
    qp.destroy()
    cq.destroy()
    assert dev.qp_by_num(qp.qp_num) is None
