"""Faults in the middle of an operation: a target mapping the IOMMU loses
between two packets of a WRITE or of a READ reply, a READ replayed after
its key was revoked, atomics whose target is out of reach. Each checks the
NAK on the wire, the completion status, both QP states and that no byte
moved outside memory the peer was granted (a hash of the rest of RAM).

Sources: rxe_resp.c (``check_rkey``, ``read_reply``: ``rxe_recheck_mr``
for a replayed READ, ``atomic_reply``, ``do_class_ac_error``), rxe_comp.c
(``check_psn`` / ``check_ack``), IBTA vol. 1 9.9.2.2 / 9.9.2.4.2 and
Table 59 (a NAK ends the requester's operation with the matching error;
the responder's QP goes to the error state)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from softrdma.dma.debug import DebugKind
from softrdma.dma.iommu import Iommu
from softrdma.dma.types import DMA_BIDIRECTIONAL
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric, FrameFilter
from softrdma.transport.headers import NakCode
from softrdma.transport.roce import decode_roce_v2
from softrdma.verbs.dma import ib_dma_unmap_sg
from softrdma.verbs.enums import (
    IbAccess,
    IbEventType,
    IbMtu,
    IbPdFlags,
    IbQpState,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.mr import ib_inc_rkey
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, RegWR, SendWR
from tests.rdma.helpers_device import (
    ALL_REMOTE,
    READ_RESPONSES,
    RW,
    SIG,
    nak_codes,
    port_stats,
    ram_digest_except,
    record,
    run_until,
    statuses,
)
from tests.rdma.nodes import Buffer, FrBuffer, Node, pair, ram_digest

MTU = 1024


def iommu_of(dev: RoceDevice) -> Iommu:
    iommu = dev.dma_device.platform.iommu
    assert iommu is not None
    return iommu


def pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


def flushed_receive(node: Node) -> None:
    """The responder's QP went to ERR: the receive posted before is flushed."""
    (wc,) = node.wait(1)
    assert (wc.wr_id, wc.status) == (0x5EC, IbWcStatus.WR_FLUSH_ERR)


# -- an RDMA WRITE whose target is unmapped between two of its packets -------------


@pytest.mark.parametrize("requester", ["cpu", "hw-direct"])
def test_iommu_unmaps_the_target_between_packets_of_a_write(requester: str) -> None:
    fabric, a, b = pair(
        requester, "hw-iommu", pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY, mtu=IbMtu.MTU_1024
    )
    events: list[IbEventType] = []
    b.dev.register_event_handler(lambda e: events.append(e.event))
    size, k = 64 * 1024, 20
    data = pattern(size)
    src, dst = Buffer(a.dev, size), Buffer(b.dev, size)
    src.fill(data)
    dst.fill(b"\xee" * size)
    b.qp.post_recv(RecvWR(0x5EC, (Buffer(b.dev, 64).sge(b.pd.local_dma_lkey),)))
    frames = record(fabric)
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_WRITE,
            (src.sge(a.pd.local_dma_lkey),),
            send_flags=SIG,
            remote_addr=dst.dma,
            rkey=b.pd.unsafe_global_rkey,
        )
    )
    rx = port_stats(fabric, b.dev)
    run_until(fabric, lambda: rx.rx_frames >= k)
    # The consumer unmaps the buffer while the peer is still writing into it.
    phys = b.host.virt_to_phys(dst.kva)
    outside = ram_digest_except(b.host, (phys, size))
    debug = b.dev.dma_device.platform.dma_debug
    with debug.capture() as reports:
        dst.unmap()
        (wc,) = a.wait(1)
    assert (wc.wr_id, wc.status) == (1, IbWcStatus.REM_ACCESS_ERR)
    assert nak_codes(frames) == [NakCode.REMOTE_ACCESS_ERR]
    assert a.qp.state == b.qp.state == IbQpState.ERR
    assert IbEventType.QP_ACCESS_ERR in events
    flushed_receive(b)
    # The IOMMU blocked the first packet after the unmap; nothing landed
    # after it and nothing anywhere else.
    (fault,) = iommu_of(b.dev).faults
    assert (fault.iova, fault.access) == (dst.dma + k * MTU, "write")
    assert ram_digest_except(b.host, (phys, size)) == outside
    landed = bytes(b.host.cpu_read(dst.kva, size))
    assert landed == data[: k * MTU] + b"\xee" * (size - k * MTU)
    assert {r.kind for r in reports} <= {DebugKind.DEVICE_ACCESS_UNMAPPED}
    assert all(
        r.dma_address is not None and dst.dma <= r.dma_address < dst.dma + size for r in reports
    )


# -- an RDMA READ whose source is unmapped while the reply is streaming ----------------


@dataclass
class ReadCase:
    """A READ of ``data`` from b's mapped buffer ``src`` into a's ``dst``."""

    fabric: Fabric
    a: Node
    b: Node
    src: Buffer
    dst: Buffer
    data: bytes
    frames: list[bytes]
    loss: FrameFilter | None


def _post_read(size: int, lose: Callable[[bytes], bool] | None = None) -> ReadCase:
    fabric, a, b = pair(
        "cpu",
        "hw-iommu",
        pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY,
        mtu=IbMtu.MTU_1024,
        timeout=10,
        retry_cnt=3,
    )
    data = pattern(size)
    src, dst = Buffer(b.dev, size), Buffer(a.dev, size)
    src.fill(data)
    dst.fill(b"\xee" * size)
    b.qp.post_recv(RecvWR(0x5EC, (Buffer(b.dev, 64).sge(b.pd.local_dma_lkey),)))
    frames = record(fabric)
    loss = None if lose is None else fabric.drop_when(lose)
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_READ,
            (dst.sge(a.pd.local_dma_lkey),),
            send_flags=SIG,
            remote_addr=src.dma,
            rkey=b.pd.unsafe_global_rkey,
        )
    )
    return ReadCase(fabric, a, b, src, dst, data, frames, loss)


def _read_fault_outcome(case: ReadCase, got: int) -> None:
    """What a READ whose source faulted after ``got`` response packets leaves:
    the requester's error, the first ``got`` MTUs of data and nothing else."""
    a, b, dst, data = case.a, case.b, case.dst, case.data
    size = len(data)
    b_ram = ram_digest(b.host)
    phys = a.host.virt_to_phys(dst.kva)
    a_outside = ram_digest_except(a.host, (phys, size))
    (wc,) = a.wait(1)
    assert NakCode.REMOTE_ACCESS_ERR in nak_codes(case.frames)
    assert b.qp.state == IbQpState.ERR
    flushed_receive(b)
    assert iommu_of(b.dev).faults[0].iova == case.src.dma + got * MTU
    assert ram_digest(b.host) == b_ram, "a READ never writes the responder's memory"
    assert ram_digest_except(a.host, (phys, size)) == a_outside
    landed = bytes(a.host.cpu_read(dst.kva, size))
    assert landed == data[: got * MTU] + b"\xee" * (size - got * MTU), "no stale or foreign data"
    assert (wc.wr_id, wc.status) == (1, IbWcStatus.REM_ACCESS_ERR)
    assert a.qp.state == IbQpState.ERR


def test_iommu_unmaps_the_source_in_the_middle_of_a_read_reply() -> None:
    size = 200 * MTU
    case = _post_read(size)
    tx = port_stats(case.fabric, case.b.dev)
    run_until(case.fabric, lambda: tx.tx_frames >= 1)
    sent = tx.tx_frames
    if sent >= size // MTU:
        pytest.skip("the responder built the whole reply at once: no moment to unmap")
    case.src.unmap()
    _read_fault_outcome(case, sent)


def _response_psn_at_least(n: int) -> Callable[[bytes], bool]:
    """Loses READ response packets from the ``n``-th on (PSNs counted from
    the first response seen)."""
    first: list[int] = []

    def lose(frame: bytes) -> bool:
        bth = decode_roce_v2(frame).packet.bth
        if bth.opcode not in READ_RESPONSES:
            return False
        if not first:
            first.append(bth.psn)
        return (bth.psn - first[0]) % (1 << 24) >= n

    return lose


def test_iommu_unmaps_the_source_before_a_partial_read_is_retried() -> None:
    """The tail of the reply is lost; before the requester asks again for
    the rest (a READ at the first missing PSN), the responder's buffer is
    unmapped: the responder replays the READ from memory it can no longer
    reach and NAKs."""
    size, got = 32 * MTU, 8
    case = _post_read(size, lose=_response_psn_at_least(got))
    tx = port_stats(case.fabric, case.b.dev)
    run_until(case.fabric, lambda: tx.tx_frames >= size // MTU)
    assert case.loss is not None and case.loss.dropped == size // MTU - got
    case.loss.remove()
    case.src.unmap()
    _read_fault_outcome(case, got)


# -- a READ replayed after the responder revoked its key -------------------------------


def _post_ok(node: Node, wr: SendWR) -> None:
    node.qp.post_send(wr)
    assert statuses(node.wait(1)) == [(wr.wr_id, IbWcStatus.SUCCESS)]


def _local_inv(b: Node, t: FrBuffer) -> None:
    _post_ok(b, SendWR(0x10, IbWrOpcode.LOCAL_INV, send_flags=SIG, invalidate_rkey=t.rkey))


def _dereg(b: Node, t: FrBuffer) -> None:
    b.dev.dereg_mr(t.mr)


def _rekey(b: Node, t: FrBuffer) -> None:
    _local_inv(b, t)
    key = ib_inc_rkey(t.rkey)
    _post_ok(b, RegWR(0x11, IbWrOpcode.REG_MR, send_flags=SIG, mr=t.mr, key=key, access=RW))


REVOKE: dict[str, Callable[[Node, FrBuffer], None]] = {
    "local-inv": _local_inv,
    "dereg": _dereg,
    "re-keyed": _rekey,
}


@pytest.mark.parametrize("revoke", list(REVOKE))
@pytest.mark.parametrize(
    "lost",
    [
        "whole-reply",
        "tail",
    ],
)
def test_replayed_read_after_the_key_is_revoked(revoke: str, lost: str) -> None:
    """The READ's response is lost (all of it, or its tail); before the
    requester retries, the responder invalidates, deregisters or re-keys the
    MR. The retried READ is a duplicate the responder answers from its saved
    resource, but only after checking the key again (rxe_resp.c
    ``rxe_recheck_mr``): it NAKs, and the requester gets
    ``IB_WC_REM_ACCESS_ERR`` and no data from after the revocation."""
    fabric, a, b = pair("hw-iommu", "cpu", mtu=IbMtu.MTU_1024, timeout=10, retry_cnt=3)
    size, got = 8 * MTU, 0 if lost == "whole-reply" else 3
    target = FrBuffer(b, size, RW)
    target.cpu_write(pattern(size))
    dst = Buffer(a.dev, size)
    dst.fill(bytes(size))
    frames = record(fabric)
    loss = fabric.drop_when(_response_psn_at_least(got))
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_READ,
            (dst.sge(a.pd.local_dma_lkey),),
            send_flags=SIG,
            remote_addr=target.iova,
            rkey=target.rkey,
        )
    )
    run_until(fabric, lambda: loss.dropped == size // MTU - got)
    loss.remove()
    REVOKE[revoke](b, target)
    (wc,) = a.wait(1)
    assert nak_codes(frames) == [NakCode.REMOTE_ACCESS_ERR]
    assert b.qp.state == IbQpState.ERR
    assert dst.read() == pattern(size)[: got * MTU] + bytes(size - got * MTU)
    assert (wc.wr_id, wc.status) == (1, IbWcStatus.REM_ACCESS_ERR)
    assert a.qp.state == IbQpState.ERR


# -- atomics whose target is out of reach -------------------------------------------------


@dataclass
class AtomicTarget:
    addr: int
    rkey: int
    word: Callable[[], int]  # the target's 8 bytes, read back by the CPU


def _fr_target(b: Node, access: IbAccess, offset: int = 0) -> AtomicTarget:
    t = FrBuffer(b, 8192, access, vmalloc=False)
    t.cpu_write(struct.pack("<Q", 41) * 1024)
    here = offset & ~7 if offset < 8192 else 0

    def word() -> int:
        return int(struct.unpack("<Q", t.cpu_read(8, here))[0])

    return AtomicTarget(t.iova + offset, t.rkey, word)


def _unmapped_target(b: Node) -> AtomicTarget:
    """A valid MR whose pages the consumer unmapped (``ib_dma_unmap_sg``)
    behind the HCA's back: the IOMMU blocks the access."""
    t = FrBuffer(b, 8192, ALL_REMOTE, vmalloc=False)
    t.cpu_write(struct.pack("<Q", 41))
    ib_dma_unmap_sg(b.dev, t.sgl, DMA_BIDIRECTIONAL)

    def word() -> int:
        return int(struct.unpack("<Q", b.host.cpu_read(t.kva, 8))[0])

    return AtomicTarget(t.iova, t.rkey, word)


def _global_rkey_target(b: Node) -> AtomicTarget:
    """``IB_PD_UNSAFE_GLOBAL_RKEY`` grants remote read and write, not
    atomics (``__ib_alloc_pd``)."""
    buf = Buffer(b.dev, 4096)
    buf.fill(struct.pack("<Q", 41))

    def word() -> int:
        return int(struct.unpack("<Q", buf.read(8))[0])

    return AtomicTarget(buf.dma, b.pd.unsafe_global_rkey, word)


AtomicFault = tuple[Callable[[Node], AtomicTarget], NakCode, IbWcStatus, IbEventType]
_ACCESS = (NakCode.REMOTE_ACCESS_ERR, IbWcStatus.REM_ACCESS_ERR, IbEventType.QP_ACCESS_ERR)
_INVALID = (NakCode.INVALID_REQUEST, IbWcStatus.REM_INV_REQ_ERR, IbEventType.QP_REQ_ERR)

# case -> (target, NAK code, requester's status, responder's affiliated event)
ATOMIC_FAULTS: dict[str, AtomicFault] = {
    "iommu-unmapped": (_unmapped_target, *_ACCESS),
    "mr-without-remote-atomic": (lambda b: _fr_target(b, RW), *_ACCESS),
    "past-the-end": (lambda b: _fr_target(b, ALL_REMOTE, 8192), *_ACCESS),
    "global-rkey": (_global_rkey_target, *_ACCESS),
    # rxe_resp.c RESPST_ERR_MISALIGNED_ATOMIC: class C, NAK invalid request
    "misaligned": (lambda b: _fr_target(b, ALL_REMOTE, 4), *_INVALID),
    # rxe_resp.c check_qp_attr_access -> RESPST_ERR_UNSUPPORTED_OPCODE: class C
    "qp-without-remote-atomic": (lambda b: _fr_target(b, ALL_REMOTE), *_INVALID),
}


@pytest.mark.parametrize(
    "op", [IbWrOpcode.ATOMIC_CMP_AND_SWP, IbWrOpcode.ATOMIC_FETCH_AND_ADD], ids=lambda o: o.name
)
@pytest.mark.parametrize("case", list(ATOMIC_FAULTS))
def test_faulted_atomic_never_returns_or_changes_a_value(case: str, op: IbWrOpcode) -> None:
    make, nak, status, event = ATOMIC_FAULTS[case]
    qp_access = RW if case == "qp-without-remote-atomic" else ALL_REMOTE
    fabric, a, b = pair("cpu", "hw-iommu", pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY, access=qp_access)
    events: list[IbEventType] = []
    b.dev.register_event_handler(lambda e: events.append(e.event))
    target = make(b)
    result = Buffer(a.dev, 64)
    result.fill(b"\xcc" * 64)
    b_ram = ram_digest(b.host)
    frames = record(fabric)
    a.qp.post_send(
        AtomicWR(
            1,
            op,
            (result.sge(a.pd.local_dma_lkey, 8, 8),),
            send_flags=SIG,
            remote_addr=target.addr,
            rkey=target.rkey,
            compare_add=41,
            swap=0xDEAD,
        )
    )
    (wc,) = a.wait(1)
    assert (wc.wr_id, wc.status) == (1, status)
    assert nak_codes(frames) == [nak]
    assert a.qp.state == b.qp.state == IbQpState.ERR
    assert event in events
    assert result.read() == b"\xcc" * 64, "no original value comes back from a faulted atomic"
    assert ram_digest(b.host) == b_ram, "the target memory is unchanged"
    assert target.word() == 41
    if case == "iommu-unmapped":
        assert [f.iova for f in iommu_of(b.dev).faults] == [target.addr]
