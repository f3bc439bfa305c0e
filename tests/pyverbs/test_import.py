"""Sharing a context's objects through its command file:
``ibv_import_device`` from a duplicate of ``cmd_fd``, then ``ibv_import_pd``
/ ``_mr`` / ``_dm`` by handle and their ``unimport``."""

from __future__ import annotations

import errno
import os

import pytest

from tests.pyverbs.conftest import KINDS

DEVICES = [pytest.param(f"dev0:{k}", id=k) for k in KINDS]


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_imported_pd_and_mr_carry_traffic(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.cq import CQ
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import SGE, SendWR

    from tests.pyverbs import helpers as h

    owner = h.player(machine)
    ctx = Context(cmd_fd=os.dup(owner.ctx.cmd_fd))
    assert ctx.name == owner.ctx.name and ctx.cmd_fd != owner.ctx.cmd_fd
    pd = PD(ctx, handle=owner.pd.handle)
    mr = MR(pd, handle=owner.mr.handle, address=owner.mr.buf)
    assert (mr.lkey, mr.rkey, mr.length, mr.buf) == (
        owner.mr.lkey,
        owner.mr.rkey,
        owner.mr.length,
        owner.mr.buf,
    )
    # a QP of the imported context on the imported PD, the peer writes into
    # the imported MR and the owner sees the data
    cq = CQ(ctx, 16)
    attr = QPAttr(port_num=1)
    attr.qp_access_flags = h.ALL_ACCESS
    init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=QPCap(4, 4))
    imported = h.Player(ctx, pd, cq, mr, QP(pd, init, attr))
    peer = h.player(machine)
    h.connect(peer, imported)
    peer.mr.write(b"shared" * 10, 60)
    wr = SendWR(
        wr_id=7,
        opcode=e.IBV_WR_RDMA_WRITE,
        num_sge=1,
        sg=[SGE(peer.mr.buf, 60, peer.mr.lkey)],
        send_flags=e.IBV_SEND_SIGNALED,
    )
    wr.set_wr_rdma(mr.rkey, mr.buf)
    peer.qp.post_send(wr)
    (wc,) = peer.poll()
    assert wc.status == e.IBV_WC_SUCCESS
    assert owner.mr.read(60, 0) == b"shared" * 10
    assert mr.read(60, 0) == b"shared" * 10
    # unimporting leaves the objects with their owner
    imported.qp.close()
    mr.unimport()
    pd.unimport()
    pd.close()
    ctx.close()
    assert not owner.pd.closed and not owner.mr.closed
    owner.mr.write(b"still", 5)
    assert owner.mr.read(5, 0) == b"still"
    MR(owner.pd, 4096, e.IBV_ACCESS_LOCAL_WRITE).close()


@pytest.mark.parametrize("machine", DEVICES[:1], indirect=True)
def test_closing_an_imported_mr_deregisters_it(machine: str) -> None:
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD

    from tests.pyverbs import helpers as h

    owner = h.player(machine)
    with Context(cmd_fd=os.dup(owner.ctx.cmd_fd)) as ctx:
        pd = PD(ctx, handle=owner.pd.handle)
        mr = MR(pd, handle=owner.mr.handle)
        assert mr.buf == owner.mr.buf
        mr.close()
        assert owner.mr.closed  # one kernel object, destroyed for both
        pd.unimport()


@pytest.mark.parametrize("machine", DEVICES[:1], indirect=True)
def test_imported_device_memory(machine: str) -> None:
    from pyverbs.device import DM, AllocDmAttr, Context

    with Context(name=machine) as owner, DM(owner, AllocDmAttr(length=256)) as dm:
        with Context(cmd_fd=os.dup(owner.cmd_fd)) as ctx:
            imported = DM(ctx, handle=dm.handle)
            dm.copy_to_dm(0, b"\xab" * 64, 64)
            assert imported.copy_from_dm(0, 64) == b"\xab" * 64
            imported.unimport()
            assert imported.closed and not dm.closed
        assert dm.copy_from_dm(0, 4) == b"\xab" * 4


@pytest.mark.parametrize("machine", DEVICES[:1], indirect=True)
def test_bad_imports_are_refused(machine: str) -> None:
    from pyverbs.device import DM, Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError

    from tests.pyverbs import helpers as h

    def code(fn: object, *args: object, **kw: object) -> int:
        with pytest.raises(PyverbsRDMAError) as ex:
            fn(*args, **kw)  # type: ignore[operator]
        return int(ex.value.error_code)

    owner = h.player(machine)
    other = h.player(machine)  # another open of the device: another file
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        assert code(Context, cmd_fd=fd) == errno.EINVAL  # not a uverbs file
    finally:
        os.close(fd)
    closed = os.dup(owner.ctx.cmd_fd)
    os.close(closed)
    assert code(Context, cmd_fd=closed) == errno.EBADF
    with Context(cmd_fd=os.dup(owner.ctx.cmd_fd)) as ctx:
        # objects of another context's file, and unknown handles, are not found
        assert code(PD, ctx, handle=other.pd.handle) == errno.ENOENT
        assert code(DM, ctx, handle=0x1234) == errno.ENOENT
        pd = PD(ctx, handle=owner.pd.handle)
        second_pd = PD(owner.ctx)
        assert code(MR, pd, handle=other.mr.handle) == errno.ENOENT
        # an MR imported on a PD that is not its own
        mine = PD(ctx, handle=second_pd.handle)
        assert code(MR, mine, handle=owner.mr.handle) == errno.EINVAL
        # only imported objects can be unimported
        assert code(owner.pd.unimport) == errno.EINVAL
        assert code(owner.mr.unimport) == errno.EINVAL
        pd.unimport()
        mine.unimport()
    # a file whose contexts are all closed has nothing to import
    dup = os.dup(other.ctx.cmd_fd)
    other.ctx.close()
    try:
        assert code(Context, cmd_fd=dup) == errno.EINVAL
    finally:
        os.close(dup)
