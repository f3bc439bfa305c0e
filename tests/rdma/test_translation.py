"""Translation once per message: the local SGEs of a work request and the
remote (R_Key, va, length) of a request are looked up once and kept for
every packet (rxe keeps the checked MR in ``qp->resp.mr``; its
``copy_data`` and ``check_rkey`` look keys up again per packet), yet an MR
that is invalidated, deregistered or re-registered in the middle of a
message is refused from the next packet on, exactly as a fresh lookup per
packet would refuse it.

Sources: rxe_resp.c (``check_rkey``, ``qp->resp.mr``, ``write_data_in``,
``do_class_ac_error``), rxe_mr.c (``copy_data``, ``lookup_mr``,
``rxe_invalidate_mr``), IBTA vol. 1 9.9.2.4.2 (an access error NAKs; the
responder's QP goes to the error state)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from softrdma.drivers.qp_memory import QpMemory
from softrdma.drivers.roce import RoceDevice
from softrdma.transport.headers import NakCode
from softrdma.transport.memory_port import LocalAccessError
from softrdma.verbs.device import IBK_LOCAL_DMA_LKEY
from softrdma.verbs.enums import IbAccess, IbMtu, IbPdFlags, IbQpState, IbWcStatus, IbWrOpcode
from softrdma.verbs.mr import MemoryRegion, MrTable, ib_inc_rkey
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.wr import RdmaWR, RecvWR, RegWR, SendWR, Sge
from tests.rdma.helpers_device import (
    RW,
    SIG,
    nak_codes,
    port_stats,
    record,
    run_until,
    statuses,
)
from tests.rdma.nodes import Buffer, FrBuffer, Node, pair

MTU = 1024


def pattern(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@contextmanager
def counting_lookups(*devs: RoceDevice) -> Iterator[dict[str, Counter[str]]]:
    """Count ``lookup_mr`` calls per device, local (lkey) and remote (rkey)."""
    counts: dict[str, Counter[str]] = {}
    saved: list[tuple[MrTable, object]] = []
    for dev in devs:
        table = dev.mr_table
        count = counts.setdefault(str(dev.ip), Counter())
        real = table.lookup

        def lookup(
            key: int,
            pd: ProtectionDomain,
            access: int,
            remote: bool,
            real: Callable[..., MemoryRegion] = real,
            count: Counter[str] = count,
        ) -> MemoryRegion:
            count["remote" if remote else "local"] += 1
            return real(key, pd, access, remote)

        saved.append((table, real))
        table.lookup = lookup  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        for table, _ in saved:
            del table.lookup  # back to the class's method


# -- once per message ------------------------------------------------------------------


@pytest.mark.parametrize("kinds", [("cpu", "cpu"), ("hw-iommu", "cpu"), ("cpu", "hw-iommu")])
@pytest.mark.parametrize("opcode", [IbWrOpcode.RDMA_WRITE, IbWrOpcode.RDMA_READ])
def test_one_lookup_per_message(kinds: tuple[str, str], opcode: IbWrOpcode) -> None:
    """A 48-packet WRITE or READ between fast-registered MRs (page lists
    over vmalloc memory) looks up the requester's two lkeys once each and
    the responder's rkey once, and moves every byte."""
    _fabric, a, b = pair(*kinds, mtu=IbMtu.MTU_1024)
    size = 48 * MTU
    local = FrBuffer(a, size, RW)
    target = FrBuffer(b, size, RW)
    data = pattern(size)
    (local if opcode is IbWrOpcode.RDMA_WRITE else target).cpu_write(data)
    half = size // 2 + 100  # two SGEs, split inside a page
    sges = (
        Sge(local.iova, half, local.mr.lkey),
        Sge(local.iova + half, size - half, local.mr.lkey),
    )
    wr = RdmaWR(1, opcode, sges, send_flags=SIG, remote_addr=target.iova, rkey=target.rkey)
    with counting_lookups(a.dev, b.dev) as counts:
        a.qp.post_send(wr)
        assert statuses(a.wait(1)) == [(1, IbWcStatus.SUCCESS)]
    assert counts[str(a.dev.ip)] == Counter(local=2)
    assert counts[str(b.dev.ip)] == Counter(remote=1)
    assert (target if opcode is IbWrOpcode.RDMA_WRITE else local).cpu_read() == data


def test_one_lookup_per_send_and_receive() -> None:
    """A 20-packet SEND: one lkey lookup at each end (the receive's SGE is
    translated by the first packet and kept)."""
    _fabric, a, b = pair("cpu", "hw-iommu", mtu=IbMtu.MTU_1024)
    size = 20 * MTU
    src = FrBuffer(a, size, RW)
    dst = FrBuffer(b, size, RW)
    data = pattern(size, 1)
    src.cpu_write(data)
    b.qp.post_recv(RecvWR(7, (Sge(dst.iova, size, dst.mr.lkey),)))
    with counting_lookups(a.dev, b.dev) as counts:
        a.qp.post_send(SendWR(1, IbWrOpcode.SEND, (Sge(src.iova, size, src.mr.lkey),), SIG))
        assert statuses(a.wait(1)) == [(1, IbWcStatus.SUCCESS)]
        assert statuses(b.wait(1)) == [(7, IbWcStatus.SUCCESS)]
    assert counts[str(a.dev.ip)] == Counter(local=1)
    assert counts[str(b.dev.ip)] == Counter(local=1)
    assert dst.cpu_read() == data


# -- the target MR revoked in the middle of a WRITE -------------------------------------


def _local_inv(b: Node, t: FrBuffer) -> None:
    b.qp.post_send(SendWR(0x10, IbWrOpcode.LOCAL_INV, send_flags=SIG, invalidate_rkey=t.rkey))


def _dereg(b: Node, t: FrBuffer) -> None:
    b.dev.dereg_mr(t.mr)


def _rereg(access: IbAccess, new_key: bool) -> Callable[[Node, FrBuffer], None]:
    """LOCAL_INV and REG_MR posted together: both run between two packets."""

    def revoke(b: Node, t: FrBuffer) -> None:
        key = ib_inc_rkey(t.rkey) if new_key else t.rkey
        b.qp.post_send(
            [
                SendWR(0x10, IbWrOpcode.LOCAL_INV, send_flags=SIG, invalidate_rkey=t.rkey),
                RegWR(0x11, IbWrOpcode.REG_MR, send_flags=SIG, mr=t.mr, key=key, access=access),
            ]
        )

    return revoke


REVOKE: dict[str, Callable[[Node, FrBuffer], None]] = {
    "local-inv": _local_inv,
    "dereg": _dereg,
    "re-keyed": _rereg(RW, new_key=True),
    "same-key-read-only": _rereg(IbAccess.LOCAL_WRITE | IbAccess.REMOTE_READ, new_key=False),
}


@pytest.mark.parametrize("kinds", [("cpu", "cpu"), ("hw-direct", "hw-iommu")])
@pytest.mark.parametrize("revoke", list(REVOKE))
def test_write_target_revoked_mid_message(kinds: tuple[str, str], revoke: str) -> None:
    """The responder's MR stops being what ``check_rkey`` accepted while a
    64-packet WRITE is landing: the next packet is NAKed with a remote
    access error, the requester completes with ``IB_WC_REM_ACCESS_ERR``,
    both QPs end in ERR, and not one byte lands after the revocation."""
    fabric, a, b = pair(*kinds, mtu=IbMtu.MTU_1024)
    size, k = 64 * MTU, 20
    target = FrBuffer(b, size, RW)
    target.cpu_write(b"\xee" * size)
    src = Buffer(a.dev, size)
    data = pattern(size, 2)
    src.fill(data)
    frames = record(fabric)
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_WRITE,
            (src.sge(a.pd.local_dma_lkey),),
            send_flags=SIG,
            remote_addr=target.iova,
            rkey=target.rkey,
        )
    )
    rx = port_stats(fabric, b.dev)
    run_until(fabric, lambda: rx.rx_frames >= k)
    REVOKE[revoke](b, target)
    (wc,) = a.wait(1)
    assert (wc.wr_id, wc.status) == (1, IbWcStatus.REM_ACCESS_ERR)
    assert nak_codes(frames) == [NakCode.REMOTE_ACCESS_ERR]
    assert a.qp.state == b.qp.state == IbQpState.ERR
    landed = target.cpu_read()
    got = next(i for i in range(0, size + 1, MTU) if landed[i:] == b"\xee" * (size - i))
    assert k * MTU <= got < size
    if revoke == "dereg":
        assert got == k * MTU  # synchronous: the very next packet is refused
    assert landed == data[:got] + b"\xee" * (size - got)


def test_write_target_reregistered_with_the_same_key_goes_on() -> None:
    """Invalidated and made valid again with the same key and access
    between two packets: a lookup per packet would accept the rest, and so
    does the MR kept for the message."""
    fabric, a, b = pair("cpu", "cpu", mtu=IbMtu.MTU_1024)
    size = 64 * MTU
    target = FrBuffer(b, size, RW)
    src = Buffer(a.dev, size)
    data = pattern(size, 3)
    src.fill(data)
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_WRITE,
            (src.sge(a.pd.local_dma_lkey),),
            send_flags=SIG,
            remote_addr=target.iova,
            rkey=target.rkey,
        )
    )
    rx = port_stats(fabric, b.dev)
    run_until(fabric, lambda: rx.rx_frames >= 20)
    _rereg(RW, new_key=False)(b, target)
    assert statuses(a.wait(1)) == [(1, IbWcStatus.SUCCESS)]
    assert statuses(b.wait(2)) == [(0x10, IbWcStatus.SUCCESS), (0x11, IbWcStatus.SUCCESS)]
    assert target.cpu_read() == data


# -- the requester's own MR revoked in the middle of a WRITE ----------------------------


@pytest.mark.parametrize("kind", ["cpu", "hw-iommu"])
def test_source_mr_deregistered_mid_message(kind: str) -> None:
    """The requester's source MR is deregistered while a 512-packet WRITE
    waits for ACKs to open its window: the next packet it builds fails its
    lkey (``IB_WC_LOC_PROT_ERR``), nothing after it is sent, and the QP
    goes to ERR."""
    fabric, a, b = pair(kind, "cpu", mtu=IbMtu.MTU_1024, pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    size = 512 * MTU
    src = FrBuffer(a, size, RW, vmalloc=False)
    data = pattern(size, 4)
    src.cpu_write(data)
    dst = Buffer(b.dev, size)
    dst.fill(bytes(size))
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_WRITE,
            (Sge(src.iova, size, src.mr.lkey),),
            send_flags=SIG,
            remote_addr=dst.dma,
            rkey=b.pd.unsafe_global_rkey,
        )
    )
    tx = port_stats(fabric, a.dev)
    run_until(fabric, lambda: tx.tx_frames >= 150)
    sent = tx.tx_frames
    a.dev.dereg_mr(src.mr)
    (wc,) = a.wait(1)
    assert (wc.wr_id, wc.status) == (1, IbWcStatus.LOC_PROT_ERR)
    assert a.qp.state == IbQpState.ERR
    fabric.loop.run(max_events=100_000)
    assert tx.tx_frames == sent  # not one packet after the revocation
    landed = dst.read()
    assert landed[: sent * MTU] == data[: sent * MTU]
    assert landed[sent * MTU :] == bytes(size - sent * MTU)


# -- the translated SGE list against a plain model --------------------------------------


@pytest.mark.parametrize("kind", ["cpu", "hw-iommu"])
def test_sgl_cursor_matches_the_bytes(kind: str) -> None:
    """A :class:`~softrdma.drivers.qp_memory.LocalSgl` over SGEs of two
    fast-registered MRs, the reserved-or-DMA lkey and empty SGEs, read and
    written at random offsets, forwards and rewinding (a retry), gives the
    bytes a plain concatenation of the SGEs gives, and looks each lkey up
    once."""
    _fabric, a, _b = pair(kind, "cpu")
    rng = random.Random(5)
    fr1 = FrBuffer(a, 5 * 4096, RW)
    fr2 = FrBuffer(a, 3 * 4096, RW)
    plain = Buffer(a.dev, 8192)
    fr1.cpu_write(pattern(fr1.size, 6))
    fr2.cpu_write(pattern(fr2.size, 7))
    plain.fill(pattern(plain.size, 8))
    sges = (
        Sge(fr1.iova + 100, 9000, fr1.mr.lkey),
        Sge(plain.dma, 0, a.pd.local_dma_lkey),
        Sge(plain.dma + 7, 5000, a.pd.local_dma_lkey),
        Sge(fr2.iova + 4000, 8000, fr2.mr.lkey),
        Sge(fr1.iova + 16000, 1, fr1.mr.lkey),
    )
    model = bytearray(
        fr1.cpu_read(9000, 100)
        + plain.read(5000, 7)
        + fr2.cpu_read(8000, 4000)
        + fr1.cpu_read(1, 16000)
    )
    mem = QpMemory(a.dev, a.qp)
    with counting_lookups(a.dev) as counts:
        reader = mem.map_sgl(sges, False)
        writer = mem.map_sgl(sges, True)
        total = len(model)
        offsets = list(range(0, total, 1000)) + [rng.randrange(total) for _ in range(40)]
        for off in offsets:
            n = min(rng.randrange(1, 3000), total - off)
            assert bytes(reader.gather(off, n)) == model[off : off + n]
            new = rng.randbytes(n)
            writer.scatter(off, new)
            model[off : off + n] = new
        assert bytes(reader.gather(0, total)) == model
    # Each non-empty SGE once per list (fr1's two SGEs once each); the
    # reserved lkey, where the device has one, needs no lookup.
    reserved = bool(a.dev.attrs.kernel_cap_flags & IBK_LOCAL_DMA_LKEY)
    assert counts[str(a.dev.ip)] == Counter(local=2 * (3 if reserved else 4))
    with pytest.raises(LocalAccessError) as err:
        reader.gather(total - 10, 11)
    assert err.value.status is IbWcStatus.LOC_LEN_ERR
    # A deregistered MR fails the next access that reaches it, not others.
    a.dev.dereg_mr(fr2.mr)
    assert bytes(reader.gather(0, 100)) == model[:100]
    with pytest.raises(LocalAccessError) as err:
        reader.gather(14000, 10)
    assert err.value.status is IbWcStatus.LOC_PROT_ERR


@pytest.mark.parametrize("kind", ["cpu", "hw-direct"])
def test_source_sge_running_off_reachable_memory_fails_at_its_packet(kind: str) -> None:
    """An SGE of the local DMA lkey whose last two of five pages the device
    cannot reach (past a vmalloc area for the CPU-copy device, past the end
    of RAM for direct DMA): reachability is probed ahead in windows, but a
    window that fails decides nothing, so the twelve packets of the
    reachable pages go out and the thirteenth fails with
    ``IB_WC_LOC_PROT_ERR``, as with a probe per packet."""
    fabric, a, b = pair(kind, "cpu", mtu=IbMtu.MTU_1024, pd_flags=IbPdFlags.UNSAFE_GLOBAL_RKEY)
    host = a.host
    addr: int
    if kind == "cpu":
        addr = host.vmalloc(3 * 4096)  # a guard page follows
    else:
        addr = a.dev.dma_device.bus_offset + host.mem_size - 3 * 4096
    dst = Buffer(b.dev, 8 * 4096)
    a.qp.post_send(
        RdmaWR(
            1,
            IbWrOpcode.RDMA_WRITE,
            (Sge(addr, 5 * 4096, a.pd.local_dma_lkey),),
            send_flags=SIG,
            remote_addr=dst.dma,
            rkey=b.pd.unsafe_global_rkey,
        )
    )
    assert statuses(a.wait(1)) == [(1, IbWcStatus.LOC_PROT_ERR)]
    fabric.loop.run(max_events=100_000)
    assert port_stats(fabric, a.dev).tx_frames == 12
