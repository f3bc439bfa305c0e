"""Bad input gives the errors rdma-core gives: ``PyverbsRDMAError`` with
the errno of the failed verb (``EOPNOTSUPP`` for what softrdma lacks),
``PyverbsUserError`` for misuse pyverbs itself catches."""

from __future__ import annotations

import errno

import pytest

from tests.pyverbs.conftest import KINDS


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_device_and_port_queries(machine: str) -> None:
    import pyverbs.device as d
    import pyverbs.enums as e
    from pyverbs.pyverbs_error import PyverbsRDMAError

    (dev,) = d.get_device_list()
    assert dev.name == machine.encode()
    with d.Context(name=machine) as ctx:
        attr = ctx.query_device()
        assert attr.phys_port_cnt == 1 and attr.max_qp > 0 and attr.atomic_caps == e.IBV_ATOMIC_HCA
        port = ctx.query_port(1)
        assert port.state == e.IBV_PORT_ACTIVE and port.link_layer == e.IBV_LINK_LAYER_ETHERNET
        assert port.active_mtu == e.IBV_MTU_1024 and port.gid_tbl_len == 1024  # rxe's table
        assert ctx.query_gid(1, 0).gid == "0000:0000:0000:0000:0000:ffff:7f00:0001"
        assert ctx.query_gid_type(1, 0) == e.IBV_GID_TYPE_SYSFS_ROCE_V2
        # the rest of the table is empty: zero GIDs for the old API, ENODATA for _ex
        assert ctx.query_gid(1, 1023).gid == "0000:0000:0000:0000:0000:0000:0000:0000"
        assert ctx.query_gid_type(1, 5) == e.IBV_GID_TYPE_SYSFS_IB_ROCE_V1
        with pytest.raises(PyverbsRDMAError) as ex:
            ctx.query_gid_ex(1, 1)
        assert ex.value.error_code == errno.ENODATA
        assert [g.gid_index for g in ctx.query_gid_table(1024)] == [0]
        for call in (lambda: ctx.query_port(2), lambda: ctx.query_gid(1, 1024)):
            with pytest.raises(PyverbsRDMAError) as ex:
                call()
            assert ex.value.error_code == errno.EINVAL
    with pytest.raises(PyverbsRDMAError) as ex:
        d.Context(name="nosuchdev")
    assert ex.value.error_code == errno.ENODEV


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_mr_errors(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import MR, MW
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError

    with Context(name=machine) as ctx, PD(ctx) as pd:
        for access, err in (
            (e.IBV_ACCESS_REMOTE_WRITE, errno.EINVAL),  # remote write needs local write
            (e.IBV_ACCESS_REMOTE_ATOMIC, errno.EINVAL),
            (1 << 15, errno.EINVAL),
        ):
            with pytest.raises(PyverbsRDMAError, match="Failed to register a MR") as ex:
                MR(pd, 4096, access)
            assert ex.value.error_code == err
        with pytest.raises(PyverbsRDMAError):
            MR(pd, 0, e.IBV_ACCESS_LOCAL_WRITE)
        # optional hints are accepted and ignored
        MR(pd, 64, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_RELAXED_ORDERING).close()
        mr = MR(pd, 64, e.IBV_ACCESS_LOCAL_WRITE)
        with pytest.raises(PyverbsUserError):
            mr.read(65, 0)
        with pytest.raises(PyverbsUserError):
            mr.write(b"x" * 10, 10, 60)
        with pytest.raises(PyverbsRDMAError) as ex:
            mr.rereg(0x40)
        assert ex.value.error_code == errno.EINVAL
        with pytest.raises(PyverbsRDMAError) as ex:
            MW(pd, 3)  # neither type 1 nor type 2
        assert ex.value.error_code == errno.EINVAL
        pd.close()
        assert mr.closed  # closing the PD closed its MR first
        mr.close()  # and closing again is harmless


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_qp_errors(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.srq import SRQ, SrqAttr, SrqInitAttr
    from pyverbs.wr import SGE, SendWR

    from tests.pyverbs import helpers as h

    a = h.player(machine)
    with pytest.raises(PyverbsRDMAError) as ex:
        QP(a.pd, QPInitAttr(qp_type=e.IBV_QPT_RAW_PACKET, scq=a.cq, rcq=a.cq))
    assert ex.value.error_code == errno.EOPNOTSUPP
    with pytest.raises(PyverbsRDMAError) as ex:
        QP(
            a.pd,
            QPInitAttr(qp_type=e.IBV_QPT_RC, scq=a.cq, rcq=a.cq, cap=QPCap(max_send_wr=1 << 30)),
        )
    assert ex.value.error_code == errno.EINVAL
    with pytest.raises(PyverbsRDMAError) as ex:
        SRQ(a.pd, SrqInitAttr(SrqAttr(max_wr=1 << 30)))
    assert ex.value.error_code == errno.EINVAL
    # the QP is in INIT: posting a send is refused, a bad transition too
    with pytest.raises(PyverbsRDMAError, match="Failed to post send") as ex:
        a.qp.post_send(SendWR(num_sge=1, sg=[SGE(a.mr.buf, 8, a.mr.lkey)]))
    assert ex.value.error_code == errno.EINVAL
    with pytest.raises(PyverbsRDMAError, match="Failed to modify QP") as ex:
        a.qp.modify(QPAttr(qp_state=e.IBV_QPS_RTS), e.IBV_QP_STATE)
    assert ex.value.error_code == errno.EINVAL
    # an RC AV without a GRH is refused on a RoCE port
    attr = QPAttr()
    attr.dest_qp_num = 0x99
    with pytest.raises(PyverbsRDMAError) as ex:
        a.qp.to_rtr(attr)
    assert ex.value.error_code == errno.EINVAL
    assert a.qp.qp_state == e.IBV_QPS_INIT
    a.ctx.close()
    assert a.qp.closed and a.mr.closed and a.cq.closed and a.pd.closed


@pytest.mark.parametrize("machine", [f"dev0:{k}" for k in KINDS[:2]], indirect=True)
def test_remote_access_error_completes_in_error(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
    from pyverbs.wr import SGE, SendWR

    from tests.pyverbs import helpers as h

    a = h.player(machine)
    b = h.player(machine, access=e.IBV_ACCESS_LOCAL_WRITE)  # no remote write
    h.connect(a, b)
    w = SendWR(wr_id=9, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[SGE(a.mr.buf, 8, a.mr.lkey)])
    w.set_wr_rdma(b.mr.rkey, b.mr.buf)
    a.qp.post_send(w)
    (wc,) = a.poll()
    assert (wc.wr_id, wc.status) == (9, e.IBV_WC_REM_ACCESS_ERR)
    assert a.qp.qp_state == e.IBV_QPS_ERR
    # the responder's QP took an access error: its context hears of it
    event = b.ctx.get_async_event()
    assert event.event_type == e.IBV_EVENT_QP_ACCESS_ERR and event.event.qp is b.qp.qp
    event.ack()
    with pytest.raises(PyverbsUserError):
        event.ack()
    # the requester's QP went to ERR: softrdma reports it fatal to a's context
    event = a.ctx.get_async_event()
    assert event.event_type == e.IBV_EVENT_QP_FATAL and event.event.qp is a.qp.qp
    with pytest.raises(PyverbsRDMAError) as ex:
        a.ctx.get_async_event()  # nothing more: an error, not a hang
    assert ex.value.error_code == errno.ETIMEDOUT
    a.ctx.close()
    b.ctx.close()


def test_bad_device_configuration(pyverbs_on_path: None) -> None:
    from pyverbs.pyverbs_error import PyverbsUserError

    from pyverbs import _softrdma as sim

    assert sim.parse_devices("a:cpu, b:iommu,c") == [
        sim.DeviceSpec("a", "cpu"),
        sim.DeviceSpec("b", "iommu"),
        sim.DeviceSpec("c", "cpu"),
    ]
    for bad in ("a:gpu", "a,a", "1x:cpu"):
        with pytest.raises(PyverbsUserError):
            sim.parse_devices(bad)


def test_enums_in_both_spellings_have_verbs_h_values(pyverbs_on_path: None) -> None:
    import pyverbs.cm_enums as ce
    import pyverbs.enums as e
    import pyverbs.libibverbs_enums as le
    import pyverbs.librdmacm_enums as lce

    assert int(e.IBV_ACCESS_LOCAL_WRITE) == int(le.ibv_access_flags.IBV_ACCESS_LOCAL_WRITE) == 1
    assert e.IBV_ACCESS_RELAXED_ORDERING == 1 << 20
    assert int(e.IBV_WR_RDMA_READ) == int(le.ibv_wr_opcode.IBV_WR_RDMA_READ) == 4
    assert e.IBV_WC_RECV == 128 and e.IBV_WC_REM_ACCESS_ERR == 10
    assert e.IBV_QPT_UD == 4 and e.IBV_QPS_ERR == 6 and e.IBV_MTU_4096 == 5
    assert e.IBV_QP_DEST_QPN == 1 << 20 and e.IBV_SEND_INLINE == 8
    assert int(ce.RDMA_PS_TCP) == int(lce.rdma_port_space.RDMA_PS_TCP) == 0x106
    flat = {n for n in dir(e) if n.startswith("IBV_")}
    grouped = {m.name for c in vars(le).values() if isinstance(c, type) for m in c}  # type: ignore[attr-defined]
    assert grouped <= flat


def test_vendor_stand_ins_refuse(pyverbs_on_path: None) -> None:
    from pyverbs.providers.efa import efadv
    from pyverbs.providers.mlx5.mlx5dv import Mlx5Context, Mlx5DVContextAttr, Mlx5QP
    from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError

    with pytest.raises(PyverbsUserError, match="not an MLX5 device"):
        Mlx5Context(Mlx5DVContextAttr(), name="rxe0")
    with pytest.raises(PyverbsRDMAError) as ex:
        Mlx5QP.query_lag_port(None)
    assert ex.value.error_code == errno.EOPNOTSUPP
    with pytest.raises(PyverbsRDMAError) as ex:
        efadv.EfaContext(name="rxe0")
    assert ex.value.error_code == errno.EOPNOTSUPP
