"""XRC through the pyverbs API on every device kind: an XRC domain opened by
file and shared between contexts, XRC SRQs with their own CQs, XRC RECV
(TGT) QPs with no PD, several XRC SEND (INI) QPs of other contexts
choosing the SRQ per work request; RDMA and atomics through the SRQ's PD;
a request for an SRQ of another domain failing on both sides."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.pyverbs.conftest import KINDS

DEVICES = [pytest.param(f"dev0:{k}", id=k) for k in KINDS]


@pytest.fixture
def xrc_file() -> Iterator[int]:
    with tempfile.NamedTemporaryFile() as f:
        fd = os.open(f.name, os.O_RDONLY)
        try:
            yield fd
        finally:
            os.close(fd)


class Target:
    """The receiving context: an XRCD of ``fd``, two XRC SRQs with a CQ
    each, one XRC RECV QP per sender, one MR in the SRQs' PD."""

    def __init__(self, dev: str, fd: int, n_tgt: int) -> None:
        import pyverbs.enums as e
        from pyverbs.cq import CQ
        from pyverbs.device import Context
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPAttr, QPInitAttrEx
        from pyverbs.srq import SRQ, SrqInitAttrEx
        from pyverbs.xrcd import XRCD, XRCDInitAttr

        from tests.pyverbs.helpers import ALL_ACCESS

        self.ctx = Context(name=dev)
        self.pd = PD(self.ctx)
        mask = e.IBV_XRCD_INIT_ATTR_FD | e.IBV_XRCD_INIT_ATTR_OFLAGS
        self.xrcd = XRCD(self.ctx, XRCDInitAttr(mask, os.O_CREAT, fd))
        self.cqs = [CQ(self.ctx, 64) for _ in range(2)]
        self.srqs = []
        for cq in self.cqs:
            a = SrqInitAttrEx(max_wr=32, max_sge=1)
            a.srq_type = e.IBV_SRQT_XRC
            a.pd, a.xrcd, a.cq = self.pd, self.xrcd, cq
            a.comp_mask = (
                e.IBV_SRQ_INIT_ATTR_TYPE
                | e.IBV_SRQ_INIT_ATTR_PD
                | e.IBV_SRQ_INIT_ATTR_CQ
                | e.IBV_SRQ_INIT_ATTR_XRCD
            )
            self.srqs.append(SRQ(self.ctx, a))
        self.mr = MR(self.pd, 64 * 1024, ALL_ACCESS)
        self.tgts = []
        for _ in range(n_tgt):
            init = QPInitAttrEx(
                qp_type=e.IBV_QPT_XRC_RECV, comp_mask=e.IBV_QP_INIT_ATTR_XRCD, xrcd=self.xrcd
            )
            attr = QPAttr(port_num=1)
            attr.qp_access_flags = ALL_ACCESS
            self.tgts.append(QP(self.ctx, init, attr))

    def post_slots(self, srq_i: int, first: int, n: int, size: int = 2048) -> None:
        from pyverbs.wr import SGE, RecvWR

        base = srq_i * 16 * size
        for i in range(n):
            sge = SGE(self.mr.buf + base + (first + i) * size, size, self.mr.lkey)
            self.srqs[srq_i].post_recv(RecvWR(wr_id=first + i, num_sge=1, sg=[sge]))


class Initiator:
    """A sending context with an XRC SEND QP aimed at one TGT QP."""

    def __init__(self, dev: str) -> None:
        import pyverbs.enums as e
        from pyverbs.cq import CQ
        from pyverbs.device import Context
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttrEx

        from tests.pyverbs.helpers import ALL_ACCESS

        self.ctx = Context(name=dev)
        self.pd = PD(self.ctx)
        self.cq = CQ(self.ctx, 64)
        self.mr = MR(self.pd, 16 * 1024, ALL_ACCESS)
        init = QPInitAttrEx(
            qp_type=e.IBV_QPT_XRC_SEND, sq_sig_all=1, comp_mask=e.IBV_QP_INIT_ATTR_PD,
            pd=self.pd, scq=self.cq, cap=QPCap(max_send_wr=16, max_recv_wr=0, max_recv_sge=0),
        )  # fmt: skip
        self.qp = QP(self.ctx, init, QPAttr(port_num=1))

    def send(self, wr_id: int, data: bytes, srqn: int, **kw: Any) -> None:
        import pyverbs.enums as e
        from pyverbs.wr import SGE, SendWR

        self.mr.write(data, len(data))
        rdma = kw.pop("rdma", None)
        wr = SendWR(wr_id=wr_id, opcode=kw.pop("opcode", e.IBV_WR_SEND), num_sge=1,
                    sg=[SGE(self.mr.buf, len(data), self.mr.lkey)], **kw)  # fmt: skip
        if rdma is not None:
            wr.set_wr_rdma(*rdma)
        wr.set_qp_type_xrc(srqn)
        self.qp.post_send(wr)


def _connect(t: Target, inis: list[Initiator]) -> None:
    from tests.pyverbs.helpers import ALL_ACCESS, rc_to_rts

    for tgt, ini in zip(t.tgts, inis, strict=True):
        rc_to_rts(tgt, t.ctx, ini.qp.qp_num, ALL_ACCESS)
        rc_to_rts(ini.qp, ini.ctx, tgt.qp_num, 0)


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_initiators_of_two_contexts_share_the_target_srqs(machine: str, xrc_file: int) -> None:
    import pyverbs.enums as e

    from tests.pyverbs.helpers import poll_cq

    t = Target(machine, xrc_file, 2)
    inis = [Initiator(machine), Initiator(machine)]
    _connect(t, inis)
    assert t.ctx.query_device().device_cap_flags & e.IBV_DEVICE_XRC
    t.post_slots(0, 0, 4)
    t.post_slots(1, 0, 4)
    srqns = [s.get_srq_num() for s in t.srqs]
    sent: list[tuple[int, int, bytes]] = []  # (srq, sender, data)
    for n in range(8):
        ini_i, srq_i = n % 2, (n // 2) % 2
        data = bytes([0x30 + n]) * (1500 if n % 3 == 0 else 40)  # 2 packets or 1
        inis[ini_i].send(n, data, srqns[srq_i])
        (wc,) = poll_cq(inis[ini_i].cq)
        assert (wc.status, wc.wr_id, wc.opcode) == (e.IBV_WC_SUCCESS, n, e.IBV_WC_SEND)
        (rwc,) = poll_cq(t.cqs[srq_i])  # the SRQ's own CQ
        assert rwc.status == e.IBV_WC_SUCCESS and rwc.opcode == e.IBV_WC_RECV
        assert rwc.qp_num == t.tgts[ini_i].qp_num and rwc.byte_len == len(data)
        slot = sum(1 for s, _, _ in sent if s == srq_i)
        assert rwc.wr_id == slot
        assert t.mr.read(len(data), srq_i * 16 * 2048 + slot * 2048) == data
        sent.append((srq_i, ini_i, data))
    for cq in t.cqs:
        assert cq.poll(1) == (0, [])
    for ctx in (t.ctx, *(i.ctx for i in inis)):
        ctx.close()


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_rdma_and_atomics_reach_the_srq_pd(machine: str, xrc_file: int) -> None:
    import pyverbs.enums as e

    from tests.pyverbs.helpers import poll_cq

    t = Target(machine, xrc_file, 1)
    (ini,) = inis = [Initiator(machine)]
    _connect(t, inis)
    srqn = t.srqs[1].get_srq_num()
    data = bytes(range(256)) * 12  # 3 KiB: 3 packets
    ini.send(1, data, srqn, opcode=e.IBV_WR_RDMA_WRITE, rdma=(t.mr.rkey, t.mr.buf))
    (wc,) = poll_cq(ini.cq)
    assert wc.status == e.IBV_WC_SUCCESS
    assert t.mr.read(len(data), 0) == data

    from pyverbs.wr import SGE, SendWR

    wr = SendWR(wr_id=2, opcode=e.IBV_WR_RDMA_READ, num_sge=1,
                sg=[SGE(ini.mr.buf + 8192, 2900, ini.mr.lkey)])  # fmt: skip
    wr.set_wr_rdma(t.mr.rkey, t.mr.buf + 100)
    wr.set_qp_type_xrc(srqn)
    ini.qp.post_send(wr)
    (wc,) = poll_cq(ini.cq)
    assert (wc.status, wc.opcode) == (e.IBV_WC_SUCCESS, e.IBV_WC_RDMA_READ)
    assert ini.mr.read(2900, 8192) == data[100:3000]

    t.mr.write((41).to_bytes(8, "little"), 8, 4096)
    wr = SendWR(wr_id=3, opcode=e.IBV_WR_ATOMIC_FETCH_AND_ADD, num_sge=1,
                sg=[SGE(ini.mr.buf, 8, ini.mr.lkey)])  # fmt: skip
    wr.set_wr_atomic(t.mr.rkey, t.mr.buf + 4096, 1)
    wr.set_qp_type_xrc(srqn)
    ini.qp.post_send(wr)
    (wc,) = poll_cq(ini.cq)
    assert wc.status == e.IBV_WC_SUCCESS
    assert int.from_bytes(ini.mr.read(8, 0), "little") == 41
    assert int.from_bytes(t.mr.read(8, 4096), "little") == 42
    assert all(cq.poll(1) == (0, []) for cq in t.cqs)  # no receive consumed
    for ctx in (t.ctx, ini.ctx):
        ctx.close()


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_srq_of_another_domain_fails_both_sides(machine: str, xrc_file: int) -> None:
    import pyverbs.enums as e
    from pyverbs.srq import SRQ, SrqInitAttrEx
    from pyverbs.xrcd import XRCD, XRCDInitAttr

    from tests.pyverbs.helpers import poll_cq

    t = Target(machine, xrc_file, 1)
    (ini,) = inis = [Initiator(machine)]
    _connect(t, inis)
    other = XRCD(t.ctx, XRCDInitAttr(e.IBV_XRCD_INIT_ATTR_OFLAGS, os.O_CREAT))
    a = SrqInitAttrEx(max_wr=4, max_sge=1)
    a.srq_type, a.pd, a.xrcd, a.cq = e.IBV_SRQT_XRC, t.pd, other, t.cqs[0]
    a.comp_mask = (
        e.IBV_SRQ_INIT_ATTR_TYPE
        | e.IBV_SRQ_INIT_ATTR_PD
        | e.IBV_SRQ_INIT_ATTR_CQ
        | e.IBV_SRQ_INIT_ATTR_XRCD
    )
    foreign = SRQ(t.ctx, a)
    t.post_slots(0, 0, 1)
    ini.send(1, b"not yours", foreign.get_srq_num())
    (wc,) = poll_cq(ini.cq)
    assert wc.status == e.IBV_WC_REM_ACCESS_ERR
    ev = t.ctx.get_async_event()
    assert ev.event_type == e.IBV_EVENT_QP_ACCESS_ERR
    ev.ack()
    assert t.tgts[0].qp_state == e.IBV_QPS_ERR
    assert all(cq.poll(1) == (0, []) for cq in t.cqs)
    for ctx in (t.ctx, ini.ctx):
        ctx.close()


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_xrcd_is_shared_by_file_with_open_semantics(machine: str, xrc_file: int) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.qp import QP, QPInitAttrEx
    from pyverbs.xrcd import XRCD, XRCDInitAttr

    mask = e.IBV_XRCD_INIT_ATTR_FD | e.IBV_XRCD_INIT_ATTR_OFLAGS
    c1, c2 = Context(name=machine), Context(name=machine)
    x1 = XRCD(c1, XRCDInitAttr(mask, os.O_CREAT, xrc_file))
    x2 = XRCD(c2, XRCDInitAttr(mask, 0, xrc_file))  # exists: no O_CREAT needed
    assert x1.xrcd is x2.xrcd
    with pytest.raises(PyverbsRDMAError) as ex:
        XRCD(c2, XRCDInitAttr(mask, os.O_CREAT | os.O_EXCL, xrc_file))
    assert ex.value.error_code == errno.EINVAL
    with tempfile.NamedTemporaryFile() as f:
        fd = os.open(f.name, os.O_RDONLY)
        try:
            with pytest.raises(PyverbsRDMAError) as ex:
                XRCD(c1, XRCDInitAttr(mask, 0, fd))  # none yet, no O_CREAT
            assert ex.value.error_code == errno.EINVAL
        finally:
            os.close(fd)
    with pytest.raises(PyverbsRDMAError) as ex:
        XRCD(c1, XRCDInitAttr(mask, os.O_CREAT, 10_000))
    assert ex.value.error_code == errno.EBADF
    # A TGT QP of the domain, created through the second context: the domain
    # outlives the first opener's close.
    tgt = QP(c2, QPInitAttrEx(qp_type=e.IBV_QPT_XRC_RECV, comp_mask=e.IBV_QP_INIT_ATTR_XRCD,
                              xrcd=x2))  # fmt: skip
    x1.close()
    assert not _dead(x2) and x2.xrcd.usecnt == 1
    # An XRC RECV QP needs an XRCD, and has no send queue.
    with pytest.raises(PyverbsRDMAError) as ex:
        QP(c2, QPInitAttrEx(qp_type=e.IBV_QPT_XRC_RECV, comp_mask=e.IBV_QP_INIT_ATTR_XRCD))
    assert ex.value.error_code == errno.EINVAL
    with pytest.raises(PyverbsRDMAError) as ex:
        tgt.post_send(_send_wr())
    assert ex.value.error_code == errno.EINVAL
    pd = PD(c2)
    x2.close()  # closes the TGT QP first
    assert tgt.closed and _dead(x2)
    pd.close()
    c1.close()
    c2.close()


def _dead(xrcd: Any) -> bool:
    return bool(xrcd.xrcd.deallocated)


def _send_wr() -> Any:
    import pyverbs.enums as e
    from pyverbs.wr import SendWR

    return SendWR(wr_id=1, opcode=e.IBV_WR_SEND)
