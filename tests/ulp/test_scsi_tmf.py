"""Task management and unit attentions with several initiators: abort one
of several outstanding commands, resets, independent per-nexus state, and
the SPC rules for which commands report a unit attention."""

from __future__ import annotations

from pathlib import Path

import pytest

from softrdma.ulp.scsi import (
    AdditionalSense,
    CommandState,
    Nexus,
    ScsiStatus,
    ScsiTarget,
    ScsiUsageError,
    SenseData,
    SenseKey,
    TmfResponse,
    TmFunction,
    encode_lun,
)
from tests.ulp.test_scsi_support import (
    TUR,
    A,
    B,
    assert_sense,
    good,
    inquiry,
    make_image,
    report_luns,
    request_sense,
    run,
    rw_cdb,
)

MiB = 1 << 20
C = Nexus("iqn.initiator-c", "port-2")


@pytest.fixture
def target(tmp_path: Path) -> ScsiTarget:
    t = ScsiTarget()
    t.add_lun(0, make_image(tmp_path / "lun0.img", 1 * MiB))
    t.add_lun(1, make_image(tmp_path / "lun1.img", 1 * MiB))
    for nexus in (A, B, C):
        t.add_nexus(nexus)
    return t


def unit_attention(result: object, code: AdditionalSense) -> None:
    assert_sense(result, SenseKey.UNIT_ATTENTION, code)  # type: ignore[arg-type]


RESET = AdditionalSense.BUS_DEVICE_RESET_FUNCTION_OCCURRED


def test_abort_one_of_several_outstanding(target: ScsiTarget, tmp_path: Path) -> None:
    plans = [target.setup(A, 0, rw_cdb(10, True, 8 * i, 8), tag=i) for i in range(4)]
    other = target.setup(B, 0, rw_cdb(10, False, 0, 1), tag=2)  # same tag, other nexus
    assert target.outstanding(A) == tuple(plans)
    result = target.abort_task(A, 0, 2)
    assert result.response is TmfResponse.FUNCTION_COMPLETE
    assert result.aborted == (plans[2],)
    assert plans[2].state is CommandState.ABORTED
    assert target.outstanding(A) == (plans[0], plans[1], plans[3])
    assert target.outstanding(B) == (other,)
    aborted = target.execute(plans[2], b"\xff" * 4096)  # the transport raced the abort
    assert (aborted.status, aborted.aborted, aborted.data_in) == (
        ScsiStatus.TASK_ABORTED,
        True,
        b"",
    )
    for plan in (plans[0], plans[1], plans[3]):
        good(target.execute(plan, b"\xff" * 4096))
    good(target.execute(other))
    image = (tmp_path / "lun0.img").read_bytes()
    assert image[:8192] == b"\xff" * 8192
    assert image[8192:12288] == bytes(4096)  # the aborted WRITE did nothing
    assert image[12288:16384] == b"\xff" * 4096


def test_abort_task_that_does_not_exist(target: ScsiTarget) -> None:
    plan = target.setup(A, 0, TUR, tag=5)
    assert target.abort_task(A, 0, 6).aborted == ()
    assert target.abort_task(A, 1, 5).aborted == ()  # right tag, wrong LUN
    assert target.abort_task(B, 0, 5).aborted == ()  # right tag, wrong nexus
    assert target.abort_task(A, 0, 6).response is TmfResponse.FUNCTION_COMPLETE
    assert target.abort_task(A, 7, 5).response is TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER
    assert plan.state is CommandState.PENDING
    good(target.execute(plan))
    assert target.abort_task(A, 0, 5).aborted == ()  # already completed


def test_lun_reset_unit_attention_exactly_once_and_not_on_inquiry(target: ScsiTarget) -> None:
    mine = target.setup(A, 0, TUR, tag=1)
    theirs = target.setup(B, 0, rw_cdb(10, False, 0, 1), tag=1)
    elsewhere = target.setup(B, 1, TUR, tag=2)
    result = target.lun_reset(A, 0)
    assert result.response is TmfResponse.FUNCTION_COMPLETE
    assert set(result.aborted) == {mine, theirs}
    assert elsewhere.state is CommandState.PENDING  # another LUN is untouched
    assert target.unit_attentions(B, 0) == (RESET,)
    # INQUIRY, REPORT LUNS do not report it and do not clear it
    good(run(target, inquiry(), nexus=B))
    good(run(target, inquiry(0x83), nexus=B))
    good(run(target, report_luns(), nexus=B))
    unit_attention(run(target, rw_cdb(10, False, 0, 1), nexus=B), RESET)
    good(run(target, rw_cdb(10, False, 0, 1), nexus=B))  # reported once
    good(run(target, TUR, nexus=A))  # not for the nexus that reset
    good(run(target, TUR, nexus=B, lun=1))  # not on another LUN
    unit_attention(run(target, TUR, nexus=C), RESET)  # every other nexus gets one
    good(run(target, TUR, nexus=C))


def test_unit_attention_checked_before_the_cdb(target: ScsiTarget) -> None:
    target.lun_reset(A, 0)
    unit_attention(run(target, bytes([0x42]) + bytes(9), nexus=B), RESET)  # unknown opcode
    assert_sense(
        run(target, bytes([0x42]) + bytes(9), nexus=B),
        SenseKey.ILLEGAL_REQUEST,
        AdditionalSense.INVALID_COMMAND_OPERATION_CODE,
    )


def test_request_sense_reports_and_clears_the_unit_attention(target: ScsiTarget) -> None:
    target.lun_reset(A, 0)
    data = good(run(target, request_sense(), nexus=B))
    sense = SenseData.decode(data)
    assert (sense.key, sense.additional_sense) == (SenseKey.UNIT_ATTENTION, RESET)
    assert SenseData.decode(good(run(target, request_sense(), nexus=B))).key is SenseKey.NO_SENSE
    good(run(target, TUR, nexus=B))


def test_each_nexus_has_its_own_state(target: ScsiTarget) -> None:
    target.lun_reset(A, 1)
    target.lun_reset(B, 0)
    assert target.unit_attentions(A, 0) == (RESET,)
    assert target.unit_attentions(A, 1) == ()
    assert target.unit_attentions(B, 1) == (RESET,)
    assert target.unit_attentions(C, 0) == target.unit_attentions(C, 1) == (RESET,)
    target.lun_reset(B, 0)  # the same condition is not queued twice
    assert target.unit_attentions(C, 0) == (RESET,)
    unit_attention(run(target, TUR, nexus=A), RESET)
    good(run(target, TUR, nexus=A))
    assert target.unit_attentions(C, 0) == (RESET,)  # A's command did not touch C's


def test_a_new_nexus_after_the_reset_has_no_unit_attention(target: ScsiTarget) -> None:
    target.lun_reset(A, 0)
    good(run(target, TUR, nexus=Nexus("late")))


def test_task_management_dispatch_and_tmf_luns(target: ScsiTarget) -> None:
    plan = target.setup(A, 1, TUR, tag=3)
    lun1 = encode_lun(1)
    query = target.task_management(A, TmFunction.QUERY_TASK, lun1, tag=3)
    assert query.response is TmfResponse.FUNCTION_SUCCEEDED
    assert target.query_task(A, 1, 4).response is TmfResponse.FUNCTION_COMPLETE
    assert target.task_management(A, TmFunction.ABORT_TASK, lun1, tag=3).aborted == (plan,)
    assert target.query_task(A, 1, 3).response is TmfResponse.FUNCTION_COMPLETE
    assert (
        target.task_management(A, TmFunction.CLEAR_ACA, 0).response is TmfResponse.FUNCTION_REJECTED
    )
    for function in (
        TmFunction.ABORT_TASK_SET,
        TmFunction.CLEAR_TASK_SET,
        TmFunction.LOGICAL_UNIT_RESET,
        TmFunction.CLEAR_ACA,
    ):
        assert (
            target.task_management(A, function, 9).response
            is TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER
        )
    assert target.query_task(A, 9, 1).response is TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER
    with pytest.raises(ScsiUsageError):
        target.task_management(A, TmFunction.ABORT_TASK, 0)


def test_abort_task_set_is_per_nexus(target: ScsiTarget) -> None:
    a1 = target.setup(A, 0, TUR, tag=1)
    a2 = target.setup(A, 0, TUR)
    a_other_lun = target.setup(A, 1, TUR, tag=2)
    b1 = target.setup(B, 0, TUR, tag=1)
    result = target.task_management(A, TmFunction.ABORT_TASK_SET, 0)
    assert set(result.aborted) == {a1, a2}
    assert target.outstanding(A) == (a_other_lun,)
    assert target.outstanding(B) == (b1,)
    assert target.unit_attentions(B, 0) == ()


def test_clear_task_set_tells_the_initiators_that_lost_commands(target: ScsiTarget) -> None:
    target.setup(A, 0, TUR, tag=1)
    b1 = target.setup(B, 0, TUR, tag=1)
    result = target.clear_task_set(A, 0)
    assert b1 in result.aborted and len(result.aborted) == 2
    unit_attention(run(target, TUR, nexus=B), AdditionalSense.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)
    good(run(target, TUR, nexus=C))  # C lost nothing
    good(run(target, TUR, nexus=A))


def test_i_t_nexus_reset(target: ScsiTarget) -> None:
    plans = [target.setup(A, lun, TUR) for lun in (0, 1)]
    result = target.task_management(A, TmFunction.I_T_NEXUS_RESET)
    assert set(result.aborted) == set(plans)
    for lun in (0, 1):
        unit_attention(run(target, TUR, lun=lun), AdditionalSense.I_T_NEXUS_LOSS_OCCURRED)
    good(run(target, TUR, nexus=B))


def test_lun_changes_raise_reported_luns_data_has_changed(
    target: ScsiTarget, tmp_path: Path
) -> None:
    target.add_lun(2, make_image(tmp_path / "lun2.img", 1 * MiB))
    changed = AdditionalSense.REPORTED_LUNS_DATA_HAS_CHANGED
    assert target.unit_attentions(A, 0) == target.unit_attentions(A, 1) == (changed,)
    assert target.unit_attentions(A, 2) == ()
    good(run(target, report_luns(), nexus=A, lun=2))  # REPORT LUNS clears it everywhere
    assert target.unit_attentions(A, 0) == target.unit_attentions(A, 1) == ()
    unit_attention(run(target, TUR, nexus=B), changed)
    plan = target.setup(C, 2, TUR)
    target.remove_lun(2)
    assert plan.state is CommandState.ABORTED
    assert_sense(
        run(target, TUR, nexus=C, lun=2),
        SenseKey.ILLEGAL_REQUEST,
        AdditionalSense.LOGICAL_UNIT_NOT_SUPPORTED,
    )
    assert sorted(target.luns) == [0, 1]


def test_remove_nexus_aborts_its_commands(target: ScsiTarget) -> None:
    plan = target.setup(B, 0, rw_cdb(10, True, 0, 1))
    assert target.remove_nexus(B) == (plan,)
    assert plan.state is CommandState.ABORTED
    assert B not in target.nexuses
    assert target.remove_nexus(B) == ()
    target.lun_reset(A, 0)
    assert B not in target.nexuses  # a forgotten nexus gets no unit attention
