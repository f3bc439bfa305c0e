"""The SRP initiator when the target misbehaves or goes away: commands it
never answers (ABORT TASK, then LUN RESET, then a reconnect — the SCSI
error handler's escalation through ib_srp's hooks), a target that leaves
(DREQ, SRP_T_LOGOUT, a network outage) and comes back (unacknowledged
writes sent again, acknowledged ones kept), ``fast_io_fail_tmo``, late
responses and credit abuse. Through all of it the target must never keep
access to a buffer the initiator has handed back, and no DMA mapping may
be left behind.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator

import pytest

from softrdma.ulp.srp import (
    SrpCmd,
    SrpCredReq,
    SrpDirectBuf,
    SrpRsp,
    SrpTLogout,
    SrpTskMgmt,
    SrpTskMgmtFunc,
)
from softrdma.ulp.srp.initiator import (
    BlockIo,
    SrpCommandTimeout,
    SrpState,
    SrpTransportError,
)
from softrdma.verbs.enums import IbQpState
from tests.ulp.test_srp_initiator import MODES, Rig, rig, try_rdma_write
from tests.ulp.test_srp_initiator_target import BLOCK, Disk, ScriptedTarget, pattern


def lba_of(cmd: SrpCmd) -> int:
    cdb = cmd.cdb
    if cdb[0] in (0x28, 0x2A):
        return int(struct.unpack_from(">I", cdb, 2)[0])
    return int(struct.unpack_from(">Q", cdb, 2)[0])


def holding(op: int, lbas: set[int], once: bool = False) -> Callable[[SrpCmd], bool]:
    """A ``hold`` knob: keep commands of opcode ``op`` to ``lbas`` unanswered
    (only their first transmission with ``once``)."""
    seen: set[int] = set()

    def hold(cmd: SrpCmd) -> bool:
        lba = lba_of(cmd) if cmd.cdb[0] in (0x28, 0x2A, 0x88, 0x8A) else -1
        if cmd.cdb[0] != op or lba not in lbas:
            return False
        if once and lba in seen:
            return False
        seen.add(lba)
        return True

    return hold


def now(r: Rig) -> float:
    return r.fabric.loop.time()


# -- the error handler --------------------------------------------------------------------


@pytest.mark.parametrize(("ikind", "mode"), [("hw-iommu", "fr"), ("cpu", "global")])
def test_unanswered_command_is_aborted(ikind: str, mode: str) -> None:
    hold = holding(0x28, {77}, once=True)
    r = rig(ikind, "hw-direct", cmd_timeout=5.0, target={"hold": hold}, **MODES[mode])
    ini = r.ini
    assert ini.block_size == BLOCK
    start = now(r)
    held, other = ini.submit_read(77, 8), ini.submit_read(5, 8)
    assert ini.wait_io([held, other])
    assert other.result() == pattern(5, 8)
    with pytest.raises(SrpCommandTimeout) as e:
        held.result()
    assert e.value.recovery == "abort-task" and e.value.tm_status == 0
    assert now(r) - start >= 5.0
    (tm,) = r.target.tms
    (seen,) = [s for s in r.target.cmds if s.cmd.cdb[0] == 0x28 and lba_of(s.cmd) == 77]
    assert tm.tsk_mgmt_func == SrpTskMgmtFunc.ABORT_TASK and tm.task_tag == seen.cmd.tag
    assert tm.tag & 0x8000_0000  # SRP_TAG_TSK_MGMT
    assert ini.stats.aborts == 1 and ini.connected
    assert ini.read(77, 1) == pattern(77)  # and the port works on
    if mode == "fr":  # the aborted command's key is dead
        desc = seen.cmd.data_in
        assert isinstance(desc, SrpDirectBuf)
        assert ini.stats.local_inv == ini.stats.reg_mr
        assert not try_rdma_write(r, desc)
    r.close()


def test_rejected_abort_escalates_to_lun_reset() -> None:
    def tm_response(tm: SrpTskMgmt) -> int:
        return 4 if tm.tsk_mgmt_func == SrpTskMgmtFunc.ABORT_TASK else 0  # FUNCTION REJECTED

    hold = holding(0x28, {77, 90}, once=True)
    r = rig("hw-swiotlb", "cpu", cmd_timeout=5.0, target={"hold": hold, "tm_response": tm_response})
    ini = r.ini
    assert ini.block_size == BLOCK
    held = ini.submit_read(77, 1)
    slow = ini.submit_read(90, 1, timeout=100.0)  # held once, not timed out
    assert ini.wait_io([held, slow])
    with pytest.raises(SrpCommandTimeout) as e:
        held.result()
    assert e.value.recovery == "lun-reset"
    funcs = [tm.tsk_mgmt_func for tm in r.target.tms]
    assert funcs == [SrpTskMgmtFunc.ABORT_TASK, SrpTskMgmtFunc.LUN_RESET]
    assert slow.result() == pattern(90)  # the LUN reset aborted it at the target: sent again
    assert slow.requests[0].transmissions == 2 and ini.stats.lun_resets == 1
    r.close()


def test_unanswered_task_management_ends_in_a_reconnect() -> None:
    hold = holding(0x28, {77, 90}, once=True)
    r = rig("hw-iommu", "hw-swiotlb", cmd_timeout=5.0, target={"hold": hold, "answer_tm": False})
    ini = r.ini
    assert ini.block_size == BLOCK
    held = ini.submit_read(77, 8)
    slow = ini.submit_read(90, 8, timeout=1000.0)
    assert ini.wait_io([held, slow])
    with pytest.raises(SrpCommandTimeout) as e:
        held.result()
    assert e.value.recovery == "reconnect"
    funcs = [tm.tsk_mgmt_func for tm in r.target.tms]
    assert funcs == [SrpTskMgmtFunc.ABORT_TASK, SrpTskMgmtFunc.LUN_RESET]
    assert len(r.target.logins) == 2 and ini.stats.reconnects == 1
    assert slow.result() == pattern(90, 8)
    assert slow.requests[0].transmissions == 2
    assert not r.target.conns[0].alive and r.target.conns[1].alive
    r.close()


def test_late_response_to_an_aborted_command_is_dropped() -> None:
    r = rig("cpu", "hw-iommu", cmd_timeout=5.0, target={"hold": holding(0x28, {77})})
    ini = r.ini
    assert ini.block_size == BLOCK
    held = ini.submit_read(77, 1)
    ini.wait_io(held)
    assert isinstance(held.error, SrpCommandTimeout)
    (seen,) = [s for s in r.target.cmds if s.cmd.cdb[0] == 0x28]
    seen.answered = False
    r.target.respond(seen)  # a target answering a task it said it aborted
    r.settle()
    assert ini.stats.unknown_tag == 1 and ini.stats.progress_errors == 0
    assert ini.read(1, 1) == pattern(1)
    r.close()


# -- the target goes away --------------------------------------------------------------------


@pytest.mark.parametrize(("ikind", "tkind"), [("cpu", "hw-iommu"), ("hw-swiotlb", "hw-direct")])
def test_reconnect_resubmits_unacknowledged_writes(ikind: str, tkind: str) -> None:
    disk = Disk()
    lbas = {1000 + 8 * i for i in range(5)}
    r = rig(ikind, tkind, target={"disk": disk, "hold": holding(0x2A, lbas)}, use_imm_data=False)
    ini = r.ini
    acked = {8 * i: bytes([0xA0 + i]) * 8 * BLOCK for i in range(4)}
    for lba, data in acked.items():
        ini.write(lba, data)  # acknowledged
    unacked = {lba: bytes([lba & 0xFF]) * 8 * BLOCK for lba in sorted(lbas)}
    ios = [ini.submit_write(lba, data) for lba, data in unacked.items()]
    assert ini.wait_for(lambda: sum(len(c.held) for c in r.target.conns) == 5, 1.0)
    r.target.shutdown()  # the target goes away: DREQ, never answering the five
    assert ini.wait_for(lambda: ini.state is SrpState.LOST, 1.0)
    assert ini.lost_reason == "target disconnected"
    assert not any(io.done for io in ios)
    late = ini.submit_read(0, 8)  # queued while the port is blocked
    restarted = ScriptedTarget(r.tdev, disk=disk)  # the same disk behind a new target
    r.extra_targets.append(restarted)
    ini.reconnect()
    assert ini.wait_io([*ios, late])
    assert all(io.result() is None for io in ios)
    assert late.result() == acked[0]
    for lba, data in {**acked, **unacked}.items():
        assert disk.read(lba, 8) == data
    assert ini.stats.resubmitted == 5 and ini.stats.reconnects == 1
    assert len([s for s in restarted.cmds if s.cmd.cdb[0] == 0x2A]) == 5
    assert all(io.requests[0].transmissions == 2 for io in ios)
    r.close()


def test_automatic_reconnect_after_a_network_outage() -> None:
    disk = Disk()
    r = rig(
        "hw-iommu",
        "cpu",
        target={"disk": disk},
        reconnect_delay=10.0,
        fast_io_fail_tmo=None,
        use_imm_data=False,
    )
    ini = r.ini
    assert ini.block_size == BLOCK
    r.fabric.set_faults(drop=1.0)
    start = now(r)
    r.fabric.loop.call_later(40.0, lambda: r.fabric.set_faults(drop=0.0))
    io = ini.submit_write(64, b"n" * 8 * BLOCK)
    assert ini.wait_io(io)
    io.result()
    assert disk.read(64, 8) == b"n" * 8 * BLOCK
    assert ini.stats.wc_errors == 1 and ini.stats.reconnects >= 1
    assert ini.lost_reason == "SEND completed with IB_WC_RETRY_EXC_ERR"
    assert ini.state is SrpState.LIVE and now(r) - start >= 40.0
    r.close()


def test_fast_io_fail_then_manual_reconnect() -> None:
    disk = Disk()
    r = rig(
        "hw-direct",
        "hw-iommu",
        target={"disk": disk, "hold": holding(0x2A, {8})},
        reconnect_delay=5.0,
        fast_io_fail_tmo=15.0,
    )
    ini = r.ini
    assert ini.block_size == BLOCK
    io = ini.submit_write(8, b"f" * BLOCK)
    assert ini.wait_for(lambda: bool(r.target.conns[0].held), 1.0)
    r.target.shutdown()  # gone for good: the reconnect attempts are refused
    start = now(r)
    assert ini.wait_io(io)
    with pytest.raises(SrpTransportError):
        io.result()
    assert ini.state is SrpState.FAILFAST and now(r) - start >= 15.0
    assert ini.stats.reconnects >= 2  # at 5 and 10 seconds
    refused = ini.submit_read(0, 1)
    assert refused.done and isinstance(refused.error, SrpTransportError)
    r.extra_targets.append(ScriptedTarget(r.tdev, disk=disk))
    ini.reconnect()
    ini.write(8, b"g" * BLOCK)
    assert ini.read(8, 1) == b"g" * BLOCK
    r.close()


def test_target_logout_blocks_the_port_until_reconnect(basic_rig: Rig) -> None:
    r = basic_rig
    ini = r.ini
    r.target.inject(SrpTLogout(reason=0x2).encode())
    assert ini.wait_for(lambda: ini.state is SrpState.LOST, 1.0)
    assert ini.stats.t_logout == 1
    assert ini.lost_reason.startswith("target logout")
    io = ini.submit_read(3, 1)
    assert not io.done
    ini.reconnect()
    assert ini.wait_io(io) and io.result() == pattern(3)
    old = r.target.conns[0]
    assert old.qp.state is IbQpState.ERR or not old.alive


def test_close_with_outstanding_commands_leaks_nothing() -> None:
    r = rig("hw-iommu", "hw-swiotlb", target={"hold": holding(0x28, {5, 6})})
    ini = r.ini
    assert ini.block_size == BLOCK
    ios: list[BlockIo] = [ini.submit_read(5, 8), ini.submit_read(6, 8)]
    assert ini.wait_for(lambda: sum(len(c.held) for c in r.target.conns) == 2, 1.0)
    r.close()  # closes the initiator with both outstanding
    assert all(io.done and isinstance(io.error, SrpTransportError) for io in ios)


# -- credit abuse -------------------------------------------------------------------------


def test_credits_taken_away_and_given_back(basic_rig: Rig) -> None:
    r = basic_rig
    ini = r.ini
    assert ini.block_size == BLOCK
    r.target.inject(SrpRsp(tag=0x8000_1234, req_lim_delta=-100).encode())
    r.settle()
    assert ini.req_lim == 0 and ini.stats.credit_violations == 1
    io = ini.submit_read(1, 1)
    r.settle()
    assert not io.done and ini.queued == 1  # no credit: it waits
    r.target.inject(SrpCredReq(tag=5, req_lim_delta=4).encode())
    assert ini.wait_io(io) and io.result() == pattern(1)
    assert r.target.cred_rsps[0].tag == 5


@pytest.fixture
def basic_rig() -> Iterator[Rig]:
    r = rig()
    yield r
    r.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_ius_never_break_the_progress_path(seed: int) -> None:
    """Hundreds of IUs of random bytes under every opcode but SRP_T_LOGOUT
    (which ends the channel): counted and dropped or answered, never raised."""
    rng = random.Random(seed)
    r = rig("cpu", "hw-iommu")
    ini = r.ini
    opcodes = [0x00, 0x01, 0x02, 0x03, 0x41, 0x42, 0x81, 0x82, 0xC0, 0xC1, 0xC2, 0x55]
    for _ in range(200):
        body = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 4, 16, 35, 36, 52, 80])))
        r.target.inject(bytes([rng.choice(opcodes)]) + body)
        if rng.random() < 0.1:
            r.settle()
    r.settle()
    st = ini.stats
    assert st.progress_errors == 0 and ini.connected
    assert st.malformed_iu + st.unexpected_iu + st.unknown_tag + st.late_tsk_mgmt > 0
    r.target.inject(SrpCredReq(tag=1, req_lim_delta=16).encode())  # whatever the noise took
    assert ini.read(11, 2) == pattern(11, 2)
    r.close()
