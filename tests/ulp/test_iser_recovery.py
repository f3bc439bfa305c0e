"""Error handling and session recovery of the iSER initiator (libiscsi at
ErrorRecoveryLevel 0 with open-iscsi's iscsid): a target restarted with
writes in flight (the session is reinstated with the same ISID and the
unanswered writes are sent again), a target that stops answering
commands (ABORT TASK, then LOGICAL UNIT RESET, then session recovery,
then a typed failure after ``replacement_timeout``), an aborted command
sent again, retries running out, a network that goes silent (the NOP-Out
ping times out) and comes back, a target killed and restarted as a
process over UDP; and after each, no DMA mapping of the session left and
the DMA-API debug checker silent."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from softrdma.cm.cma import RdmaCmEvent
from softrdma.fabric.inproc import Fabric
from softrdma.ulp.iscsi.proto import IscsiTmfFunc
from softrdma.ulp.iscsi.session import ScsiCommandReceived, TmfRequested
from softrdma.ulp.iser import (
    IserCommandTimeout,
    IserConn,
    IserInitiator,
    IserState,
    IserTarget,
    IserTransportError,
)
from softrdma.ulp.scsi import ScsiStatus
from softrdma.ulp.srp.initiator_errors import ScsiStatusError
from softrdma.ulp.srp.initiator_scsi import cdb_read
from tests.fabric.netaddr import loopback_addresses
from tests.rdma.nodes import make_device
from tests.test_iser_cli import target_process
from tests.ulp.srp_rig import (
    TARGET_IP,
    Op,
    Reference,
    check_image,
    mappings_since,
    run_batch,
)
from tests.ulp.test_iser_integrity import BS, IQN, IserPair, make_iser_pair, udp_device

FAST: dict[str, Any] = {
    "cmd_timeout": 2.0,
    "abort_timeout": 1.0,
    "lu_reset_timeout": 1.0,
    "replacement_timeout": 20.0,
    "noop_out_interval": 1.0,
    "noop_out_timeout": 1.0,
    "reopen_delay": 1.0,
}
"""Short timers (simulated seconds) so that each escalation step shows."""


def restart_target(pair: IserPair) -> None:
    """Stop the target (every connection gets a DREQ) and start a new one
    on the same host serving the same LUNs: what a target daemon restart
    looks like to the initiator."""
    pair.target.close()
    pair.target = IserTarget(pair.tdev.host, pair.core, [IQN], addr=TARGET_IP, rq_size=16, seed=9)


@pytest.mark.parametrize(("tkind", "ikind"), [("hw-iommu", "cpu"), ("cpu", "hw-swiotlb")])
def test_a_restarted_target_loses_no_write(tmp_path: Path, tkind: str, ikind: str) -> None:
    """The target goes away while writes are on the wire and a new one
    serves the same image: the initiator logs in again after
    DefaultTime2Wait with its ISID (the new target gives a new TSIH),
    sends the writes it had no response for again, and every write —
    acknowledged before the restart or after — is in the image."""
    pair = make_iser_pair(tmp_path, ikind, tkind, seed=5, **FAST)
    ini = pair.ini
    acked = {lba: bytes([lba & 0xFF | 1]) * 16 * BS for lba in range(0, 320, 64)}
    for lba, data in acked.items():
        ini.write(lba, data)
    inflight = {lba: bytes([0x80 | (lba & 0x7F)]) * 24 * BS for lba in range(1000, 1600, 100)}
    ios = [ini.submit_write(lba, data) for lba, data in inflight.items()]
    restart_target(pair)  # before the fabric carries the writes: none is answered
    assert ini.wait_io(ios, timeout=60.0)
    assert all(io.result() is None for io in ios)
    st_ = ini.stats
    assert st_["conn_failures"] == 1 and st_["reinstatements"] == 1 and st_["retried"] >= 1
    assert len(ini.tsih_history) == 2 and ini.state is IserState.LOGGED_IN
    for lba, data in {**acked, **inflight}.items():
        assert ini.read(lba, len(data) // BS) == data
    pair.logout()
    image = pair.image.read_bytes()
    for lba, data in {**acked, **inflight}.items():
        assert image[lba * BS : lba * BS + len(data)] == data
    pair.close()


def silence(monkeypatch: pytest.MonkeyPatch, *, tmf: str = "core", every: bool = True) -> list[int]:
    """Make the target ignore SCSI commands (every one, or only the first;
    the SCSI core never sees them). Task management: ``"core"`` as the
    target does it (the core does not know an ignored command: ABORT TASK
    answers "task does not exist"), ``"complete"`` ABORT TASK answered
    "function complete" for the ignored command (a target that had it
    queued), ``"none"`` unanswered. Returns the ITTs ignored."""
    ignored: list[int] = []
    handle_cmd, handle_tmf = IserConn._handle_cmd, IserConn._handle_tmf

    def cmd(self: IserConn, ev: ScsiCommandReceived) -> None:
        if every or not ignored:
            ignored.append(ev.itt)
            return
        handle_cmd(self, ev)

    def tm(self: IserConn, ev: TmfRequested) -> None:
        if tmf == "complete" and ev.function == IscsiTmfFunc.ABORT_TASK and ev.rtt in ignored:
            self._send_pdu(self.conn.respond_tmf(ev.itt, aborted=[ev.rtt]))
        elif tmf != "none":
            handle_tmf(self, ev)

    monkeypatch.setattr(IserConn, "_handle_cmd", cmd)
    monkeypatch.setattr(IserConn, "_handle_tmf", tm)
    return ignored


@pytest.mark.parametrize("answer", ["complete", "core"])
def test_an_unanswered_command_is_taken_back_and_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """The target drops one READ on the floor: after ``cmd_timeout`` the
    initiator sends ABORT TASK. Answered "function complete", the command
    is taken back; answered "task does not exist" while it is still
    outstanding (libiscsi's ``TMF_NOT_FOUND``), the error handler goes on
    to LOGICAL UNIT RESET, which takes it back. Either way the key is
    invalidated locally, the ITT freed, and the command goes out again
    with a fresh registration: the read returns the data."""
    pair = make_iser_pair(tmp_path, "hw-iommu", "hw-direct", seed=6, **FAST)
    ini = pair.ini
    ini.write(40, b"\x42" * 8 * BS)
    ignored = silence(monkeypatch, tmf=answer, every=False)
    assert ini.read(40, 8) == b"\x42" * 8 * BS
    st_ = ini.stats
    assert len(ignored) == 1 and st_["timeouts"] == 1 and st_["tmf_abort_task"] == 1
    assert st_["retried"] == 1 and st_["conn_failures"] == 0
    if answer == "complete":
        assert st_["aborted"] == 1 and st_["tmf_logical_unit_reset"] == 0
    else:
        assert st_["aborted"] == 0 and st_["lun_resets"] == 1
    assert not ini.conn.outstanding
    pair.logout()
    pair.close()


def test_retries_run_out_with_a_typed_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target that never answers a command (and knows none: ABORT TASK
    finds no task, LOGICAL UNIT RESET takes it back): each try times out
    and is taken back, and after ``retries`` the command fails with
    IserCommandTimeout (ETIMEDOUT) naming the recovery; the session stays
    up."""
    pair = make_iser_pair(tmp_path, "cpu", "hw-iommu", seed=8, retries=2, **FAST)
    silence(monkeypatch)
    req = pair.ini.submit(cdb_read(0, 8), read_length=8 * BS)
    assert pair.ini.wait_for(lambda: req.done, 60.0)
    with pytest.raises(IserCommandTimeout) as e:
        req.result()
    assert e.value.recovery == "lun-reset" and e.value.errno == 110
    assert pair.ini.stats["tmf_abort_task"] == 3 and pair.ini.stats["lun_resets"] == 3
    assert pair.ini.stats["retried"] == 2
    assert pair.ini.state is IserState.LOGGED_IN
    monkeypatch.undo()
    assert pair.ini.read(0, 8) == bytes(8 * BS)
    pair.logout()
    pair.close()


def test_a_silent_target_escalates_then_fails_after_replacement_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commands and TMFs unanswered: the command times out, ABORT TASK
    times out, LOGICAL UNIT RESET times out, the connection is torn down
    and the initiator tries to log in again — which the target now
    refuses — every ``reopen_delay``; after ``replacement_timeout`` the
    queued commands, and any submitted later, fail with
    IserTransportError. Nothing of the session stays mapped."""
    pair = make_iser_pair(tmp_path, "hw-swiotlb", "cpu", seed=10, **FAST)
    ini = pair.ini
    silence(monkeypatch, tmf="none")
    refused: list[int] = []

    def refuse(self: IserTarget, ev: RdmaCmEvent) -> None:
        refused.append(1)
        ev.id.reject()
        ev.id.destroy()

    monkeypatch.setattr(IserTarget, "_connect_request", refuse)
    ios = [ini.submit_read(8 * i, 8) for i in range(3)] + [ini.submit_write(64, b"\1" * BS)]
    start = ini.dev.scheduler.time()
    assert ini.wait_io(ios, 120.0)
    elapsed = ini.dev.scheduler.time() - start
    for io in ios:
        with pytest.raises(IserTransportError):
            io.result()
    st_ = ini.stats
    assert st_["timeouts"] >= 1 and st_["tmf_abort_task"] == 1
    assert st_["tmf_logical_unit_reset"] == 1 and st_["conn_failures"] == 1
    assert st_["reopen_failures"] >= 5 and refused and st_["reinstatements"] == 0
    # cmd_timeout + abort + LU reset, then replacement_timeout
    assert 2.0 + 1.0 + 1.0 + 20.0 <= elapsed < 2.0 + 1.0 + 1.0 + 20.0 + 2.0
    assert ini.state is IserState.RECOVERY_FAILED
    with pytest.raises(IserTransportError):
        ini.read(0, 1)
    ini.close()
    pair.fabric.loop.run()
    assert mappings_since(pair.idev, pair.baseline[0]) == Counter()
    assert mappings_since(pair.tdev, pair.baseline[1]) == Counter()
    monkeypatch.undo()
    pair.close()


def test_a_silent_network_fails_the_ping_and_the_session_comes_back(tmp_path: Path) -> None:
    """Every frame lost for a while: the NOP-Out ping gets no NOP-In within
    ``noop_out_timeout``, the connection is failed, reopen attempts fail
    while the network is down; once it is back the session is reinstated
    and the reads queued meanwhile complete."""
    pair = make_iser_pair(tmp_path, "hw-direct", "hw-iommu", seed=11, login_timeout=3.0, **FAST)
    ini = pair.ini
    ini.write(0, b"\x33" * 4 * BS)
    pair.fabric.set_faults(drop=1.0)
    pair.fabric.loop.call_later(12.0, lambda: pair.fabric.set_faults(drop=0.0))
    ios = [ini.submit_read(0, 4), ini.submit_read(100, 4)]
    assert ini.wait_io(ios, 60.0)
    assert ios[0].result() == b"\x33" * 4 * BS and ios[1].result() == bytes(4 * BS)
    st_ = ini.stats
    assert st_["conn_failures"] == 1 and st_["reinstatements"] == 1, st_
    assert st_["ping_timeouts"] + st_["wc_errors"] >= 1 and st_["reopen_failures"] >= 1
    pair.logout()
    pair.close()


# -- a target process killed and restarted ------------------------------------------------


def test_a_killed_target_process_is_restarted_and_io_completes(tmp_path: Path) -> None:
    """``softrdma iser target`` killed with SIGKILL (no DREQ, no logout)
    with writes on the wire over UDP, and started again on the same image,
    address and IQN: the initiator notices (the RC retries run out or the
    NOP-Out ping times out), reinstates the session with the new process
    and completes every write; the image, once the target stops, holds
    every write."""
    ip_t, ip_i = loopback_addresses(2)
    image = tmp_path / "disk.img"
    args = [str(image), "--ip", ip_t, "--create-size", "1M"]
    ref = Reference.zeros(1 << 20, BS)
    knobs: dict[str, Any] = {"noop_out_interval": 1.0, "noop_out_timeout": 1.0, "reopen_delay": 0.5}
    with udp_device(ip_i, 0.0, 1) as (dev, _):
        with target_process(_mkdir(tmp_path / "first"), *args) as first:
            ini = IserInitiator(dev, ip_t, target_name=first.iqn, can_queue=8, timeout=120.0,
                                **knobs)  # fmt: skip
            ini.login()
            run_batch(ini, ref, [Op(i % 2 == 0, i * 64, 32, i) for i in range(8)])
            writes = [Op(True, 1024 + i * 100, 48, 50 + i) for i in range(8)]
            ios = [ini.submit_write(op.lba, op.data(BS)) for op in writes]
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
        try:
            with target_process(_mkdir(tmp_path / "second"), *args) as second:
                assert ini.wait_io(ios, 120.0)
                assert all(io.result() is None for io in ios)
                for op in writes:
                    ref.data[ref.span(op)] = op.data(BS)
                run_batch(ini, ref, [Op(False, op.lba, op.nblocks) for op in writes], 120.0)
                st_ = ini.stats
                assert st_["conn_failures"] >= 1 and st_["reinstatements"] >= 1, st_
                ini.sync()
                ini.logout()
                assert second.stop() == 0, second.stderr()
        finally:
            ini.close()
    dev.dma_device.release()
    debug = dev.dma_device.platform.dma_debug
    assert debug is not None and not debug.reports
    check_image(image, ref)


def _mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


@pytest.mark.parametrize(
    "bad",
    [
        {"cmd_timeout": 0.0},
        {"abort_timeout": -1.0},
        {"lu_reset_timeout": 0.0},
        {"replacement_timeout": 0.0},
        {"reopen_delay": 0.0},
        {"login_timeout": -5.0},
        {"retries": -1},
        {"noop_out_interval": -1.0},
        {"noop_out_interval": 5.0, "noop_out_timeout": 0.0},
        {"can_queue": 0},
    ],
)
def test_bad_recovery_knobs_are_refused(bad: dict[str, Any]) -> None:
    """Knobs no recovery can run with are refused at construction, before
    anything is allocated."""
    dev = make_device("cpu", Fabric(seed=1), "10.0.0.2")
    with pytest.raises(ValueError):
        IserInitiator(dev, TARGET_IP, **bad)
    dev.unregister()


def answer_busy(monkeypatch: pytest.MonkeyPatch, times: int | None) -> list[int]:
    """The target answers the next ``times`` SCSI commands (every one with
    None) BUSY without looking at them; the ITTs so answered."""
    busy: list[int] = []
    handle_cmd = IserConn._handle_cmd

    def cmd(self: IserConn, ev: ScsiCommandReceived) -> None:
        if times is None or len(busy) < times:
            busy.append(ev.itt)
            self._send_pdu(self.conn.respond(ev.itt, status=ScsiStatus.BUSY))
            return
        handle_cmd(self, ev)

    monkeypatch.setattr(IserConn, "_handle_cmd", cmd)
    return busy


def test_busy_is_retried_without_using_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BUSY answers (the midlayer's ADD_TO_MLQUEUE) send the command again
    after a short hold, without using its retries: three BUSYs with
    ``retries=1`` still end in the data; the key of each BUSY try is
    invalidated locally (the target named no key to invalidate)."""
    pair = make_iser_pair(tmp_path, "hw-iommu", "cpu", seed=12, retries=1, **FAST)
    ini = pair.ini
    ini.write(8, b"\x17" * 8 * BS)
    inv = ini.stats["local_inv"]
    busy = answer_busy(monkeypatch, 3)
    assert ini.read(8, 8) == b"\x17" * 8 * BS
    assert len(busy) == 3 and ini.stats["busy_retries"] == 3
    assert ini.stats["local_inv"] - inv == 3 and ini.stats["retried"] == 0
    pair.logout()
    pair.close()


def test_busy_forever_fails_after_the_midlayers_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target that answers BUSY forever: the command is sent again until
    ``(retries + 1) * cmd_timeout`` has passed since it was queued, then
    fails with the BUSY status (``scsi_softirq_done``'s "timing out
    command"); the session stays up."""
    pair = make_iser_pair(tmp_path, "cpu", "hw-direct", seed=13, retries=1, **FAST)
    ini = pair.ini
    answer_busy(monkeypatch, None)
    start = ini.dev.scheduler.time()
    with pytest.raises(ScsiStatusError) as e:
        ini.read(0, 8)
    assert e.value.status == ScsiStatus.BUSY
    assert (1 + 1) * FAST["cmd_timeout"] <= ini.dev.scheduler.time() - start < 6.0
    assert ini.stats["busy_retries"] > 10 and ini.state is IserState.LOGGED_IN
    monkeypatch.undo()
    assert ini.read(0, 8) == bytes(8 * BS)
    pair.logout()
    pair.close()
