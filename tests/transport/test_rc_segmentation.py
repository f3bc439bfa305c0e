"""Segmentation and every RC opcode, byte exact, at every MTU.

Two RC engines back to back (:class:`.engine_harness.Pair`).
"""

from __future__ import annotations

import pytest

from softrdma.transport.headers import AethType, NakCode
from softrdma.transport.opcodes import Opcode
from softrdma.transport.psn import psn_add
from softrdma.verbs.enums import IbWcFlags, IbWcOpcode, IbWcStatus
from softrdma.verbs.enums import IbWrOpcode as Op
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR

from .engine_harness import MTUS, QPN_B, Pair, naks, opnames, pattern, wc_ok


def sizes_for(mtu: int) -> list[int]:
    return [0, 1, mtu - 1, mtu, mtu + 1, 3 * mtu, 3 * mtu + 5]


@pytest.mark.parametrize("mtu", MTUS)
def test_rdma_write_segmentation_every_mtu(mtu: int) -> None:
    p = Pair(mtu=mtu, wire=True)
    sizes = sizes_for(mtu)
    src = p.mem_a.reg(sum(sizes), fill=pattern(sum(sizes)))
    dst = p.mem_b.reg(sum(sizes) + 64)
    off = 0
    for i, n in enumerate(sizes):
        p.post(
            RdmaWR(i, Op.RDMA_WRITE, (src.sge(off, n),), remote_addr=dst.iova + off, rkey=dst.key)
        )
        off += n
    p.run_until_completions(len(sizes))
    assert [wc.wr_id for wc in p.send_wcs()] == list(range(len(sizes)))
    for wc, n in zip(p.send_wcs(), sizes, strict=True):
        wc_ok(wc, IbWcOpcode.RDMA_WRITE)
        assert wc.byte_len == n
    assert dst[0 : sum(sizes)] == src[0 : sum(sizes)]
    assert dst[sum(sizes) :] == bytes(64)  # nothing past the end
    # Packets of each message: FIRST MIDDLE* LAST or ONLY, MTU-sized but the last.
    pkts = p.sent_a
    i = 0
    psn = p.pa.sq_psn
    for n in sizes:
        npkts = max(1, -(-n // mtu))
        msg = pkts[i : i + npkts]
        i += npkts
        names = opnames(msg)
        if npkts == 1:
            assert names == ["RDMA_WRITE_ONLY"]
        else:
            assert names == ["RDMA_WRITE_FIRST"] + ["RDMA_WRITE_MIDDLE"] * (npkts - 2) + [
                "RDMA_WRITE_LAST"
            ]
        assert [q.payload_len for q in msg[:-1]] == [mtu] * (npkts - 1)
        assert msg[-1].payload_len == n - (npkts - 1) * mtu
        assert msg[0].reth is not None and msg[0].reth.dma_len == n
        assert all(q.reth is None for q in msg[1:])
        assert msg[-1].bth.ack_req
        assert [q.bth.psn for q in msg] == [psn_add(psn, k) for k in range(npkts)]
        psn = psn_add(psn, npkts)
    assert i == len(pkts)


@pytest.mark.parametrize("mtu", MTUS)
def test_send_every_mtu_with_sg_lists(mtu: int) -> None:
    p = Pair(mtu=mtu)
    sizes = sizes_for(mtu)
    total = sum(sizes)
    src = p.mem_a.reg(total, fill=pattern(total, 2))
    bufs = []
    off = 0
    for i, n in enumerate(sizes):
        # Receive buffer in three pieces of two MRs; the send in two SGEs.
        r1, r2 = p.mem_b.reg(n // 3 + 1), p.mem_b.reg(n)
        bufs.append((r1, r2))
        p.post_recv(RecvWR(100 + i, (r1.sge(), r2.sge(0, n // 2), r2.sge(n // 2))))
        half = n // 2
        p.post(SendWR(i, Op.SEND, (src.sge(off, half), src.sge(off + half, n - half))))
        off += n
    p.run_until_completions(len(sizes), len(sizes))
    recvs = p.recv_wcs()
    assert [wc.wr_id for wc in recvs] == [100 + i for i in range(len(sizes))]
    off = 0
    for (r1, r2), wc, n in zip(bufs, recvs, sizes, strict=True):
        wc_ok(wc, IbWcOpcode.RECV)
        assert wc.byte_len == n and wc.qp_num == QPN_B
        assert not wc.wc_flags & (IbWcFlags.WITH_IMM | IbWcFlags.WITH_INVALIDATE)
        got = (r1[0 : len(r1.buf)] + r2[0:n])[:n]
        assert got == src[off : off + n]
        off += n
    for wc, n in zip(p.send_wcs(), sizes, strict=True):
        wc_ok(wc, IbWcOpcode.SEND)
        assert wc.byte_len == n


@pytest.mark.parametrize("mtu", MTUS)
def test_rdma_read_every_mtu(mtu: int) -> None:
    p = Pair(mtu=mtu, wire=True)
    sizes = sizes_for(mtu)
    total = sum(sizes)
    remote = p.mem_b.reg(total, fill=pattern(total, 3))
    local = p.mem_a.reg(total + 16)
    off = 0
    for i, n in enumerate(sizes):
        # Scatter into two SGEs.
        half = n // 3
        sg = (local.sge(off, half), local.sge(off + half, n - half))
        p.post(RdmaWR(i, Op.RDMA_READ, sg, remote_addr=remote.iova + off, rkey=remote.key))
        off += n
    p.run_until_completions(len(sizes))
    for wc, n in zip(p.send_wcs(), sizes, strict=True):
        wc_ok(wc, IbWcOpcode.RDMA_READ)
        assert wc.byte_len == n
    assert local[0:total] == remote[0:total]
    assert local[total:] == bytes(16)
    # A READ request reserves one PSN per response packet.
    reqs = [q for q in p.sent_a if q.bth.opcode == Opcode.RC_RDMA_READ_REQUEST]
    psn = p.pa.sq_psn
    for q, n in zip(reqs, sizes, strict=True):
        assert q.bth.psn == psn and q.bth.ack_req
        assert q.reth is not None and q.reth.dma_len == n
        psn = psn_add(psn, max(1, -(-n // mtu)))
    # Responses: AETH on FIRST / LAST / ONLY, none on MIDDLE; one PSN each.
    resps = p.sent_b
    assert all(
        (q.aeth is None) == (q.bth.opcode == Opcode.RC_RDMA_READ_RESPONSE_MIDDLE) for q in resps
    )
    assert len(resps) == sum(max(1, -(-n // mtu)) for n in sizes)
    full = (Opcode.RC_RDMA_READ_RESPONSE_FIRST, Opcode.RC_RDMA_READ_RESPONSE_MIDDLE)
    assert all(q.payload_len == mtu for q in resps if q.bth.opcode in full)


def test_send_and_write_with_immediate() -> None:
    p = Pair(mtu=256)
    src = p.mem_a.reg(1000, fill=pattern(1000))
    dst = p.mem_b.reg(1000)
    rbuf = p.mem_b.reg(1000)
    p.post_recv(RecvWR(1, (rbuf.sge(),)))
    p.post_recv(RecvWR(2, ()))  # WRITE_WITH_IMM needs a WQE, not a buffer
    p.post(SendWR(10, Op.SEND_WITH_IMM, (src.sge(0, 600),), imm_data=0xDEADBEEF))
    p.post(
        RdmaWR(
            11,
            Op.RDMA_WRITE_WITH_IMM,
            (src.sge(0, 700),),
            imm_data=0x1234,
            remote_addr=dst.iova + 5,
            rkey=dst.key,
        )
    )
    p.run_until_completions(2, 2)
    r1, r2 = p.recv_wcs()
    wc_ok(r1, IbWcOpcode.RECV)
    assert r1.wc_flags & IbWcFlags.WITH_IMM and r1.imm_data == 0xDEADBEEF and r1.byte_len == 600
    wc_ok(r2, IbWcOpcode.RECV_RDMA_WITH_IMM)
    # rxe: byte_len of RECV_RDMA_WITH_IMM is the RDMA length.
    assert r2.wc_flags & IbWcFlags.WITH_IMM and r2.imm_data == 0x1234 and r2.byte_len == 700
    assert rbuf[0:600] == src[0:600]
    assert dst[5:705] == src[0:700]
    s1, s2 = p.send_wcs()
    wc_ok(s1, IbWcOpcode.SEND)
    wc_ok(s2, IbWcOpcode.RDMA_WRITE)
    assert s1.wc_flags & IbWcFlags.WITH_IMM and s2.wc_flags & IbWcFlags.WITH_IMM
    # The immediate rides only on the last packet.
    names = opnames(p.sent_a)
    assert names == [
        "SEND_FIRST",
        "SEND_MIDDLE",
        "SEND_LAST_WITH_IMMEDIATE",
        "RDMA_WRITE_FIRST",
        "RDMA_WRITE_MIDDLE",
        "RDMA_WRITE_LAST_WITH_IMMEDIATE",
    ]


def test_send_with_invalidate() -> None:
    p = Pair()
    src = p.mem_a.reg(100, fill=pattern(100))
    victim = p.mem_b.reg(64)
    rbuf = p.mem_b.reg(100)
    p.post_recv(RecvWR(1, (rbuf.sge(),)))
    p.post(SendWR(5, Op.SEND_WITH_INV, (src.sge(),), invalidate_rkey=victim.key))
    p.run_until_completions(1, 1)
    (r,) = p.recv_wcs()
    wc_ok(r, IbWcOpcode.RECV)
    assert r.wc_flags & IbWcFlags.WITH_INVALIDATE and r.invalidate_rkey == victim.key
    assert not victim.valid and p.mem_b.invalidated == [victim.key]
    assert opnames(p.sent_a) == ["SEND_ONLY_WITH_INVALIDATE"]
    assert p.sent_a[0].ieth is not None and p.sent_a[0].ieth.inv_rkey == victim.key


def test_send_with_invalidate_bad_key_is_invalid_request() -> None:
    p = Pair()
    src = p.mem_a.reg(100)
    rbuf = p.mem_b.reg(100)
    p.post_recv(RecvWR(1, (rbuf.sge(),)))
    p.post(SendWR(5, Op.SEND_WITH_INV, (src.sge(),), invalidate_rkey=0x7777))
    p.run_until_completions(1, 1)
    assert p.send_wcs()[0].status is IbWcStatus.REM_INV_REQ_ERR
    assert p.recv_wcs()[0].status is IbWcStatus.REM_INV_REQ_ERR
    assert naks(p.sent_b) == [(AethType.NAK, NakCode.INVALID_REQUEST, p.pa.sq_psn)]


@pytest.mark.parametrize("mtu", (256, 4096))
def test_atomics(mtu: int) -> None:
    p = Pair(mtu=mtu, wire=True)
    target = p.mem_b.reg(32)
    target.buf[0:8] = (100).to_bytes(8, "little")
    target.buf[8:16] = (5).to_bytes(8, "little")
    res = [p.mem_a.reg(8) for _ in range(4)]
    p.post(
        AtomicWR(
            1,
            Op.ATOMIC_FETCH_AND_ADD,
            (res[0].sge(),),
            remote_addr=target.iova,
            rkey=target.key,
            compare_add=23,
        )
    )
    p.post(
        AtomicWR(
            2,
            Op.ATOMIC_CMP_AND_SWP,
            (res[1].sge(),),
            remote_addr=target.iova + 8,
            rkey=target.key,
            compare_add=5,
            swap=77,
        )
    )
    p.post(
        AtomicWR(
            3,
            Op.ATOMIC_CMP_AND_SWP,
            (res[2].sge(),),
            remote_addr=target.iova + 8,
            rkey=target.key,
            compare_add=5,
            swap=99,
        )
    )
    p.post(
        AtomicWR(
            4,
            Op.ATOMIC_FETCH_AND_ADD,
            (res[3].sge(),),
            remote_addr=target.iova,
            rkey=target.key,
            compare_add=(1 << 64) - 1,
        )
    )
    p.run_until_completions(4)
    ops = [wc.opcode for wc in p.send_wcs()]
    assert ops == [
        IbWcOpcode.FETCH_ADD,
        IbWcOpcode.COMP_SWAP,
        IbWcOpcode.COMP_SWAP,
        IbWcOpcode.FETCH_ADD,
    ]
    assert all(wc.status is IbWcStatus.SUCCESS and wc.byte_len == 8 for wc in p.send_wcs())
    origs = [int.from_bytes(r[0:8], "little") for r in res]
    assert origs == [100, 5, 77, 123]
    assert int.from_bytes(target[0:8], "little") == 122  # 123 + (2**64 - 1) wraps
    assert int.from_bytes(target[8:16], "little") == 77  # second CMP_SWP did not match
    assert p.mem_b.atomic_count == 4
    assert opnames(p.sent_b) == ["ATOMIC_ACKNOWLEDGE"] * 4
    # AtomicETH fields: swap / compare for CMP_SWP, the addend for FETCH_ADD.
    cs = p.sent_a[1].atmeth
    fa = p.sent_a[0].atmeth
    assert cs is not None and (cs.swap_add, cs.compare) == (77, 5)
    assert fa is not None and fa.swap_add == 23


def test_misaligned_atomic_is_invalid_request() -> None:
    p = Pair()
    target = p.mem_b.reg(32)
    r = p.mem_a.reg(8)
    p.post(
        AtomicWR(
            1,
            Op.ATOMIC_FETCH_AND_ADD,
            (r.sge(),),
            remote_addr=target.iova + 4,
            rkey=target.key,
            compare_add=1,
        )
    )
    p.run_until_completions(1)
    assert p.send_wcs()[0].status is IbWcStatus.REM_INV_REQ_ERR
    assert naks(p.sent_b) == [(AethType.NAK, NakCode.INVALID_REQUEST, p.pa.sq_psn)]
    assert target[0:32] == bytes(32) and p.mem_b.atomic_count == 0


def test_zero_length_operations_skip_key_checks() -> None:
    p = Pair()
    rbuf = p.mem_b.reg(8)
    p.post_recv(RecvWR(1, (rbuf.sge(),)))
    # C9-88: a zero-length READ / WRITE need not carry a valid R_Key.
    p.post(RdmaWR(1, Op.RDMA_WRITE, (), remote_addr=0, rkey=0xBAD))
    p.post(RdmaWR(2, Op.RDMA_READ, (), remote_addr=0, rkey=0xBAD))
    p.post(SendWR(3, Op.SEND, ()))
    p.run_until_completions(3, 1)
    assert [wc.status for wc in p.send_wcs()] == [IbWcStatus.SUCCESS] * 3
    assert p.recv_wcs()[0].byte_len == 0
    assert opnames(p.sent_b)[0:1] == ["ACKNOWLEDGE"]
    assert "RDMA_READ_RESPONSE_ONLY" in opnames(p.sent_b)
