"""softrdma's iSER initiator against LIO's ``ib_isert`` (Linux 6.1 on
``rdma_rxe``).

In the VM, ``targetcli`` (2.1.53) sets LIO up as its users do: a sparse
64 MiB ``fileio`` backstore, an iSCSI target ``IQN`` with it as LUN 0 of
``tpg1``, the default portal (0.0.0.0:3260) replaced by one on the VM's
address with ``enable_iser=true`` (``ib_isert`` then listens on the RDMA CM
at 10.77.0.1:3260, ``rdma res show cm_id``), demo mode
(``generate_node_acls=1``, ``demo_mode_write_protect=0``) and
``authentication=0``. On the host side (10.77.0.2, in the VM's namespace)
``iser_lio_host.py`` runs :class:`~softrdma.ulp.iser.IserInitiator` over
UDP, one process a run.

What LIO does, as the tests pin down:

* a login naming a target LIO does not have is refused with a Login
  Response of status 0x0301 (target error, "service unavailable"), not
  RFC 7143's 0x0203 "not found" — ``iscsi_target_locate_portal`` logs
  "Unable to locate Target IQN: … in Storage Node" — and the initiator
  raises :class:`~softrdma.ulp.iser.IserLoginRejected` with that status;
* the login keys it answers an ``ib_iser``-style offer with (the
  operational stage only, straight to full feature phase):
  ``RDMAExtensions=Yes``, ``InitialR2T=Yes``, ``ImmediateData=Yes``,
  ``FirstBurstLength=65536``, ``MaxBurstLength=262144``, the data segment
  lengths of the offer echoed;
* a NOP-Out ping's data is not echoed: ``isert_handle_nop_out`` ignores
  the payload, so the NOP-In answering it has none (RFC 7143 asks for the
  data back);
* LIO takes a session's negotiated parameters into effect only in
  ``iscsi_post_login_handler``, after the final Login Response has gone
  out: a Logout Request arriving before that is ignored ("Received logout
  request on connection that is not in logged in state"), and a SCSI
  command arriving before that meets zeroed ``conn_ops`` / ``sess_ops``
  (``DataPDUInOrder`` 0, ``MaxXmitDataSegmentLength`` 0) and spins
  ``iscsit_build_pdu_and_seq_lists`` forever — a soft lockup of the VM,
  reproduced several times with a command sent at once after the login.
  open-iscsi never meets it (its first command waits for iscsid and the
  SCSI scan); the host script waits ``LIO_POST_LOGIN_SETTLE`` after the
  login;
* its REP carries the iSER CM header ``0x80``, ``0xC0`` when the REQ
  refused Send with Invalidate, and then every response comes as a plain
  SEND and every key is invalidated locally.

The I/O test runs in three setups — the default (soft RoCE, Send with
Invalidate accepted), the IOMMU-backed device, and Send with Invalidate
refused — a fixed random workload: INQUIRY (``LIO-ORG``), READ CAPACITY,
a NOP-Out ping, writes of one block to 4 MiB one at a time and a batch in
flight together (immediate data, and LIO's RDMA READs past it), reads of
all of them and of random ranges (LIO's RDMA WRITEs), each compared with a
local copy of the disk, SYNCHRONIZE CACHE, logout. Then in the VM the
backing file must hash to that copy, and the host's pcap must show LIO's
RDMA READs and WRITEs carrying only STags the initiator handed out.

Every VM step and host run is bounded; the LIO configuration, ib_isert
and the D-Bus daemon targetcli needs are removed at the end of the module,
so the shared VM is left as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from softrdma.ulp.iscsi.proto import (
    IscsiLoginRequest,
    IscsiLoginResponse,
    IscsiLogoutResponse,
    IscsiScsiCommand,
    IscsiScsiResponse,
)
from softrdma.ulp.iscsi.text import decode_text
from softrdma.ulp.iser.proto import IserCmFlag, IserFlag
from tests.interop.host_process import run_host_script
from tests.interop.iser_wire import read_iser_pcap
from tests.interop.linuxvm import LinuxPeer
from tests.interop.lio_target import LioTarget

pytestmark = pytest.mark.interop

HOST_TIMEOUT = 600.0
"""Bound on one run of the host-side initiator (a workload takes seconds)."""
IQN = "iqn.2003-01.org.linux-iscsi.softrdma-peer.x8664:sn.5e7d0c1f2a3b"
DISK = "/var/tmp/softrdma-iser.img"
DISK_SIZE = 64 << 20
BLOCK = 512
EXPECTED_DMESG = r"eth0 speed is unknown"
"""What an I/O run may leave in the kernel log: rxe's note and nothing else
(at the default ``isert_debug_level`` ib_isert prints only its errors)."""


def host_initiator(peer: LinuxPeer, *args: str) -> tuple[int, dict[str, Any], str]:
    """Run ``iser_lio_host.py`` in the namespace: exit status, its JSON, stderr."""
    argv = ["--ip", peer.host_ip, "--dest", peer.vm_ip, *args]
    return run_host_script(peer, "tests.interop.iser_lio_host", argv, HOST_TIMEOUT)


@pytest.fixture(scope="module")
def lio(linux_peer: LinuxPeer) -> Iterator[LioTarget]:
    """ib_isert loaded, targetcli's D-Bus up, the target with its iSER
    portal listening; all of it removed afterwards."""
    peer = linux_peer
    lio = LioTarget(peer, "ib_isert", DISK, DISK_SIZE)
    tpg = f"/iscsi/{IQN}/tpg1"
    try:
        lio.load()
        out = lio.targetcli(
            *lio.backstore_commands(),
            f"/iscsi create {IQN}",
            f"{tpg}/luns create /backstores/fileio/softrdma",
            f"{tpg}/portals delete 0.0.0.0 3260",
            f"{tpg}/portals create {peer.vm_ip} 3260",
            f"{tpg}/portals/{peer.vm_ip}:3260 enable_iser boolean=true",
            f"{tpg} set attribute generate_node_acls=1 demo_mode_write_protect=0 "
            "authentication=0 cache_dynamic_acls=1",
        )
        assert "iSER enable now: True" in out, out
        np = f"/sys/kernel/config/target/iscsi/{IQN}/tpgt_1/np/{peer.vm_ip}:3260/iser"
        assert lio.vm(f"cat {np}", "portal").stdout.strip() == "1"
        listeners = lio.vm("rdma res show cm_id", "cm_id").stdout
        assert re.search(
            rf"state LISTEN .*comm \[ib_isert\] src-addr {re.escape(peer.vm_ip)}:3260\b",
            listeners,
        ), listeners
        yield lio
    finally:
        lio.remove(3260)


def test_lio_refuses_an_unknown_target_name_with_a_target_error(lio: LioTarget) -> None:
    """A login to an IQN LIO does not have: Login Response 0x0301, the
    connection closed, :class:`IserLoginRejected` with that status; the
    right IQN is admitted right after (demo mode, no ACL, no CHAP)."""
    peer = lio.peer
    wrong = IQN.replace("sn.5e7d", "sn.0000")
    mark = lio.mark("unknown target")
    status, out, err = host_initiator(peer, "--iqn", wrong, "--expect-reject")
    rejected = out.get("login_error", {})
    assert status == 0 and rejected.get("type") == "IserLoginRejected", (out, err)
    assert (rejected["status_class"], rejected["status_detail"]) == (3, 1), rejected
    log = lio.since(mark)
    assert f"Unable to locate Target IQN: {wrong} in Storage Node" in log, log
    assert "iSCSI Login negotiation failed." in log, log

    status, out, err = host_initiator(peer, "--iqn", IQN, "--expect-reject")
    assert status == 1 and "login" in out and "login_error" not in out, (out, err)
    values = out["login"]["values"]
    assert values["RDMAExtensions"] == "Yes" and values["TargetAlias"] == "LIO Target", values


SETUPS = {
    "default": (),
    "iommu": ("-d", "hca0"),
    "no-send-with-inv": ("--no-send-w-inv",),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_softrdma_initiator_reads_and_writes_lio_over_iser(
    lio: LioTarget, setup: str, tmp_path: Path
) -> None:
    peer = lio.peer
    lio.zero_disk()
    pcap = tmp_path / "initiator.pcap"
    mark = lio.mark(f"i/o {setup}")
    status, out, err = host_initiator(
        peer, "--iqn", IQN, "--pcap", str(pcap), "--seed", str(len(setup)), *SETUPS[setup]
    )
    if status != 0:
        pytest.fail(
            f"host initiator: exit {status}\n{json.dumps(out)[:3000]}\n--- stderr:\n"
            f"{err[-6000:]}\n--- dmesg:\n{lio.since(mark)[-8000:]}"
        )
    assert not out["mismatches"], out["mismatches"]
    assert all(r["ok"] for r in out["reads"]), out["reads"]

    # What LIO answered the login with.
    values = out["login"]["values"]
    assert values["RDMAExtensions"] == "Yes", values
    assert (values["InitialR2T"], values["ImmediateData"]) == ("Yes", "Yes"), values
    assert (values["FirstBurstLength"], values["MaxBurstLength"]) == ("65536", "262144"), values
    assert out["remote_inv"] is (setup != "no-send-with-inv"), out

    inq = out["inquiry"]
    assert (inq["peripheral_type"], inq["vendor"].strip()) == (0, "LIO-ORG"), inq
    assert out["capacity"] == [DISK_SIZE // BLOCK, BLOCK], out["capacity"]
    # ib_isert drops a NOP-Out's data ("FIXME: Add support for NOPOUT payload"
    # in isert_handle_nop_out): the NOP-In comes back empty.
    assert out["nop"] == "", out["nop"]

    # The backing file in the VM holds exactly what the initiator wrote.
    vm_sum = lio.vm(f"sync && sha256sum {DISK}", "backing file").stdout.split()[0]
    assert vm_sum == out["disk_sha256"]
    for w in out["writes"][:4]:
        extent = lio.vm(
            f"dd if={DISK} bs={BLOCK} skip={w['lba']} count={w['blocks']} status=none | sha256sum",
            "extent",
        ).stdout.split()[0]
        assert extent == w["final_sha256"], w

    # The wire, as the initiator saw it.
    wire = read_iser_pcap(pcap, peer.host_ip)
    offer = IserCmFlag.ZBVA_NOT_SUP
    if setup == "no-send-with-inv":
        offer |= IserCmFlag.SEND_W_INV_NOT_SUP
    assert [h.flags for h in wire.req_cm_hdrs] == [offer], wire.req_cm_hdrs
    assert [h.flags for h in wire.rep_cm_hdrs] == [offer], wire.rep_cm_hdrs
    req = wire.pdus("host", IscsiLoginRequest)
    rsp = wire.pdus("vm", IscsiLoginResponse)
    assert len(req) == len(rsp) == 1 and rsp[0].status_class == 0 and rsp[0].transit, rsp
    offered, answered = dict(decode_text(req[0].data)), dict(decode_text(rsp[0].data))
    for key in ("InitiatorRecvDataSegmentLength", "TargetRecvDataSegmentLength"):
        assert answered[key] == offered[key] == values[key], (key, offered, answered)
    assert len(wire.pdus("vm", IscsiLogoutResponse)) == 1
    cmds = [m for m in wire.messages if isinstance(m.pdu, IscsiScsiCommand)]
    stags = {f"vm {m.hdr.read_stag:#x}" for m in cmds if m.hdr.flags & IserFlag.RSV}
    stags |= {f"vm {m.hdr.write_stag:#x}" for m in cmds if m.hdr.flags & IserFlag.WSV}
    assert wire.rkeys and set(wire.rkeys) <= stags, (set(wire.rkeys) - stags, wire.opcodes)
    assert wire.opcodes["vm RC_RDMA_READ_REQUEST"] > 0, wire.opcodes
    assert wire.opcodes["vm RC_RDMA_WRITE_FIRST"] + wire.opcodes["vm RC_RDMA_WRITE_ONLY"] > 0
    responses = [m for m in wire.messages if isinstance(m.pdu, IscsiScsiResponse)]
    with_inv = [m for m in responses if m.invalidated is not None]
    if setup == "no-send-with-inv":
        assert not with_inv, with_inv[:3]
    else:
        assert with_inv and {f"vm {m.invalidated:#x}" for m in with_inv} <= stags
    stats = out["stats"]
    assert stats.get("remote_inv", 0) == len(with_inv), stats

    # The kernel: one login, nothing unexpected.
    log = lio.since(mark)
    unexpected = [ln for ln in log.splitlines()[1:] if not re.search(EXPECTED_DMESG, ln)]
    assert not unexpected, log
    t = out["timings"]
    print(
        f"\nLIO iSER {setup}: {out['bytes_written'] >> 10} KiB written, "
        f"{out['bytes_read'] >> 10} KiB read, {len(cmds)} commands, "
        f"{len(with_inv)} SEND_WITH_INV; " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
    )
