"""Completion timestamps of extended CQs
(``IBV_WC_EX_WITH_COMPLETION_TIMESTAMP`` / ``_WALLCLOCK``) and the device
clock behind them (``hca_core_clock``, ``ibv_query_rt_values_ex``)."""

from __future__ import annotations

import errno
import time

import pytest

from tests.pyverbs.conftest import KINDS

DEVICES = [pytest.param(f"dev0:{k}", id=k) for k in KINDS[:2]]
FREE_RUNNING = 1 << 7  # IBV_WC_EX_WITH_COMPLETION_TIMESTAMP
WALLCLOCK = 1 << 11  # IBV_WC_EX_WITH_COMPLETION_TIMESTAMP_WALLCLOCK


def _raw_clock(ctx: object) -> int:
    sec, nsec = ctx.query_rt_values_ex()  # type: ignore[attr-defined]
    assert 0 <= nsec < 1_000_000_000
    return int(sec) * 1_000_000_000 + int(nsec)


def _send_with_stamps(machine: str, send_flags: int, recv_flags: int) -> tuple[object, object]:
    """An RC SEND between two contexts whose QPs complete on extended CQs
    with the given timestamp flags; returns (sender, receiver) players with
    the CQEXs as ``cq``, their completion current (``start_poll`` done)."""
    import pyverbs.enums as e
    from pyverbs.cq import CQEX, CqInitAttrEx, PollCqAttr
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import SGE, RecvWR, SendWR

    from tests.pyverbs import helpers as h

    players = []
    for flags in (send_flags, recv_flags):
        p = h.player(machine)
        p.qp.close()
        cq = CQEX(p.ctx, CqInitAttrEx(cqe=16, wc_flags=e.IBV_WC_STANDARD_FLAGS | flags))
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=QPCap(4, 4))
        attr = QPAttr(port_num=1)
        attr.qp_access_flags = h.ALL_ACCESS
        players.append(h.Player(p.ctx, p.pd, cq, p.mr, QP(p.pd, init, attr)))
    a, b = players
    h.connect(a, b)
    b.qp.post_recv(RecvWR(wr_id=2, num_sge=1, sg=[SGE(b.mr.buf, 64, b.mr.lkey)]))
    a.mr.write(b"t" * 64, 64)
    a.qp.post_send(
        SendWR(
            wr_id=1,
            opcode=e.IBV_WR_SEND,
            num_sge=1,
            sg=[SGE(a.mr.buf, 64, a.mr.lkey)],
            send_flags=e.IBV_SEND_SIGNALED,
        )
    )
    for p in (b, a):
        for _ in range(50):
            if p.cq.start_poll(PollCqAttr()) == 0:  # type: ignore[attr-defined]
                break
        else:
            raise AssertionError("no completion")
        assert p.cq.status == e.IBV_WC_SUCCESS  # type: ignore[attr-defined]
    return a, b


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_device_reports_its_core_clock(machine: str) -> None:
    from pyverbs.device import Context

    with Context(name=machine) as ctx:
        attr = ctx.query_device_ex()
        assert attr.hca_core_clock == 1_000_000  # kHz: a 1 GHz clock
        assert attr.completion_timestamp_mask == (1 << 64) - 1
        first = _raw_clock(ctx)
        assert _raw_clock(ctx) >= first


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_free_running_stamps_follow_the_device_clock(machine: str) -> None:
    from pyverbs.device import Context

    with Context(name=machine) as probe:
        before = _raw_clock(probe)
        a, b = _send_with_stamps(machine, FREE_RUNNING, FREE_RUNNING)
        recv_ts = b.cq.read_timestamp()  # type: ignore[attr-defined]
        send_ts = a.cq.read_timestamp()  # type: ignore[attr-defined]
        after = _raw_clock(probe)
    # the SEND lands at the responder before its ACK completes the sender
    assert before <= recv_ts <= send_ts <= after
    assert recv_ts > 0


@pytest.mark.parametrize("machine", DEVICES, indirect=True)
def test_wallclock_stamps_are_the_device_clock_in_real_time(machine: str) -> None:
    lo = time.time_ns()
    a, b = _send_with_stamps(machine, FREE_RUNNING | WALLCLOCK, FREE_RUNNING | WALLCLOCK)
    hi = time.time_ns()
    offsets = set()
    for p in (a, b):
        wall = p.cq.read_completion_wallclock_ns()  # type: ignore[attr-defined]
        ticks = p.cq.read_timestamp()  # type: ignore[attr-defined]
        # a 1 GHz clock: ns and ticks differ by the clock's fixed offset
        offsets.add(wall - ticks)
        # simulated time runs behind real time, never ahead of it by much
        assert lo - 60 * 10**9 < wall < hi + 60 * 10**9
    assert len(offsets) == 1


@pytest.mark.parametrize("machine", DEVICES[:1], indirect=True)
def test_stamps_need_their_flag(machine: str) -> None:
    from pyverbs.pyverbs_error import PyverbsUserError

    a, b = _send_with_stamps(machine, WALLCLOCK, 0)
    with pytest.raises(PyverbsUserError):
        a.cq.read_timestamp()  # type: ignore[attr-defined]
    assert a.cq.read_completion_wallclock_ns() > 0  # type: ignore[attr-defined]
    with pytest.raises(PyverbsUserError):
        b.cq.read_completion_wallclock_ns()  # type: ignore[attr-defined]
    b.cq.end_poll()  # type: ignore[attr-defined]
    with pytest.raises(PyverbsUserError):
        b.cq.read_timestamp()  # type: ignore[attr-defined]


@pytest.mark.parametrize("machine", DEVICES[:1], indirect=True)
def test_unsupported_values_are_refused(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.cq import CQEX, CqInitAttrEx
    from pyverbs.device import Context
    from pyverbs.pyverbs_error import PyverbsRDMAError

    with Context(name=machine) as ctx:
        with pytest.raises(PyverbsRDMAError) as ex:
            ctx.query_rt_values_ex(comp_mask=0x2)
        assert ex.value.error_code == errno.EOPNOTSUPP
        with pytest.raises(PyverbsRDMAError) as ex:
            CQEX(ctx, CqInitAttrEx(wc_flags=FREE_RUNNING | e.IBV_WC_EX_WITH_CVLAN))
        assert ex.value.error_code == errno.EOPNOTSUPP


@pytest.mark.parametrize("machine", DEVICES[:1], indirect=True)
def test_only_timestamping_cqs_read_the_clock(machine: str) -> None:
    import pyverbs.enums as e
    from pyverbs.cq import CQ, CQEX, CqInitAttrEx
    from pyverbs.device import Context

    from softrdma.verbs.enums import IbWcOpcode, IbWcStatus
    from softrdma.verbs.wr import WorkCompletion

    with Context(name=machine) as ctx:
        plain = CQ(ctx, 4)
        standard = CQEX(ctx, CqInitAttrEx(cqe=4, wc_flags=e.IBV_WC_STANDARD_FLAGS))
        stamping = CQEX(ctx, CqInitAttrEx(cqe=4, wc_flags=FREE_RUNNING))
        assert not plain.cq.timestamping and not standard.cq.timestamping
        assert stamping.cq.timestamping
        dev = ctx.device
        # let the device clock run a little, so a stamp is not 0 by chance
        with dev.lock:
            fired: list[bool] = []
            dev.scheduler.call_later(0.001, fired.append, True)
            dev.scheduler.progress(lambda: bool(fired))
        for cq in (plain, standard, stamping):
            with dev.lock:
                cq.cq.push(WorkCompletion(1, IbWcStatus.SUCCESS, IbWcOpcode.SEND, 1))
                now = dev.scheduler.time()
            (wc,) = cq.cq.poll(1)
            assert now > 0.0
            assert wc.timestamp == (now if cq is stamping else 0.0)
