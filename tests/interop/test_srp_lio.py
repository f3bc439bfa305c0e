"""softrdma's SRP initiator against LIO's ``ib_srpt`` (Linux 6.1 on
``rdma_rxe``).

In the VM, ``targetcli`` (2.1.53, with python3-rtslib-fb) sets LIO up: a
sparse 64 MiB ``fileio`` backstore, an ``srpt`` target on rxe0's port and
the backstore as its LUN 0; ``ib_srpt`` listens on the RDMA CM once
``discovery_auth/rdma_cm_port`` is set in configfs. On the host side
(10.77.0.2, in the VM's namespace) ``srp_lio_host.py`` runs
:class:`~softrdma.ulp.srp.initiator.SrpInitiator` over UDP, one process a
run.

What ib_srpt does with rxe, as the first test pins down:

* its port is named in configfs by the port's GID 0 —
  ``0xfe80000000000000505400fffe770001``, the link-local GID rxe derives from
  the NIC's MAC — or by the port GUID ``5054:00ff:fe77:0001``; targetcli
  knows only the first form, as ``ib.fe80000000000000505400fffe770001``;
  the RoCE GID of the IPv4 address (index 1) is no port name;
* the target port ID it accepts is ``srpt_service_guid`` twice (id_ext and
  ioc_guid), the node GUID ``505400fffe770001``; any other is rejected with
  ``UNABLE_ASSOCIATE_CHANNEL``;
* 6.1 has no ``rdma_cm_port`` module parameter; until the configfs attribute
  is set nothing listens and the RDMA CM rejects the REQ (reason 8, invalid
  service ID);
* on the GID-named port a login is admitted by an ACL named by the
  initiator port ID, ``0x`` + 32 hex digits (what targetcli's
  ``ib.<32 hex>`` becomes) or the 32 digits alone; with no matching ACL LIO
  rejects it with ``CHANNEL_LIMIT_REACHED`` (0x10006, "ret = -13" in dmesg),
  and an ACL named by the initiator's IP address does not match;
* on the GUID-named port the session of an RDMA CM login is named by an IP
  address, and it is the address the login arrived at (the target's own,
  10.77.0.1), not the initiator's.

The I/O test runs in five setups — fast registration (the default), fast
registration with 512 KiB commands on the IOMMU-backed device, the global
rkey (``never_register``), fast registration without immediate data, and
a queue of 200 commands, beyond the 128 credits LIO grants — a fixed random
workload: INQUIRY (``LIO-ORG``), READ CAPACITY, writes of one
block to 4 MiB, one at a time and a batch in flight together, reads of all
of them and of random ranges up to 8 MiB, each compared with a local copy
of the disk, SYNCHRONIZE CACHE and logout. Then in the VM the backing file
must hash to that copy, every write extent read from it with ``dd`` too;
the host's pcap must show the login, immediate data in the initiator's
SENDs exactly when LIO granted it, and LIO's RDMA READs and WRITEs carrying
only R_Keys the initiator handed out (the global rkey and nothing else
without registration). LIO logs "Not yet implemented: SRP_I_LOGOUT" for
the logout IU this initiator sends before disconnecting (ib_srp sends
none); it is harmless.

Every VM step and host run is bounded; the LIO configuration, the listener,
ib_srpt and the D-Bus daemon targetcli needs are removed at the end of the
module, so the shared VM is left as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.ulp.srp.proto import SrpLoginReqFlag
from tests.interop.host_process import run_host_script
from tests.interop.linuxvm import LinuxPeer
from tests.interop.lio_target import LioTarget
from tests.interop.srp_wire import SrpWire, read_srp_pcap

pytestmark = pytest.mark.interop

HOST_TIMEOUT = 600.0
"""Bound on one run of the host-side initiator (a workload takes seconds)."""
CM_PORT = 5555
DISK = "/var/tmp/softrdma-lio.img"
DISK_SIZE = 64 << 20
BLOCK = 512
SRPT = "/sys/kernel/config/target/srpt"
SRP_MAX_REQ_SIZE = 8276
"""ib_srpt's ``srp_max_req_size`` default: the ``max_it_iu_len`` it grants."""
SRPT_RQ_SIZE = 128
"""The credits an ib_srpt login grants."""
EXPECTED_DMESG = (
    r"ib_srpt Received SRP_LOGIN_REQ with i_port_id |ib_srpt Not yet implemented: SRP_I_LOGOUT$"
    r"|ib_srpt receiving failed for ioctx \S+ with status 5$|srpt_recv_done: \d+ callbacks "
    r"suppressed$|eth0 speed is unknown"
)
"""What an I/O run may leave in the kernel log: the login, LIO's note on
the SRP_I_LOGOUT this initiator sends (ib_srp sends none), the receives
flushed (IB_WC_WR_FLUSH_ERR) as the channel closes."""
IMM_SEND_MIN = 68 + BLOCK
"""The smallest SRP_CMD carrying immediate data (its data starts at byte
68); without immediate data an SRP_CMD is at most 48 + 20 + 16 × 12 bytes."""


def eui64(mac: str) -> str:
    """The 16 hex digits of the EUI-64 a MAC gives (a GUID as rxe derives it)."""
    b = bytearray.fromhex(mac.replace(":", ""))
    b[0] ^= 0x02
    return (bytes(b[:3]) + b"\xff\xfe" + bytes(b[3:])).hex()


def guid_colons(guid: str) -> str:
    return ":".join(guid[i : i + 4] for i in range(0, 16, 4))


@dataclass
class Lio(LioTarget):
    """LIO in the VM, and the names ib_srpt gives rxe0's port."""

    node_guid: str  # 16 hex digits
    gid_port: str  # configfs name: 0x + 32 hex digits
    guid_port: str  # configfs name: 5054:00ff:fe77:0001
    initiator_port_id: str  # 0x + 32 hex digits, from the host end's MAC

    @property
    def wwn(self) -> str:
        """The target's name in targetcli."""
        return "ib." + self.gid_port[2:]

    def acl_path(self, name: str) -> str:
        """An ACL of the GID-named port."""
        return f"{SRPT}/{self.gid_port}/tpgt_1/acls/{name}"

    def has_acl(self, name: str) -> bool:
        return self.peer.run(["test", "-d", self.acl_path(name)], timeout=30).returncode == 0

    def allow(self) -> None:
        """The ACL for softrdma's initiator, created with targetcli as a user would."""
        if not self.has_acl(self.initiator_port_id):
            out = self.targetcli(f"/srpt/{self.wwn}/acls create ib.{self.initiator_port_id[2:]}")
            assert "Created Node ACL" in out, out
        assert self.has_acl(self.initiator_port_id)

    def disallow(self) -> None:
        """Remove that ACL (its mapped LUN first, as targetcli would)."""
        acl = self.acl_path(self.initiator_port_id)
        self.vm(
            f"for m in {acl}/lun_*; do [ -d $m ] || continue; "
            "find $m -maxdepth 1 -type l -exec rm {} +; rmdir $m; done; rmdir " + acl,
            "remove the ACL",
        )

    def set_cm_port(self, port: int) -> None:
        self.vm(f"echo {port} > {SRPT}/discovery_auth/rdma_cm_port", "rdma_cm_port")


def host_initiator(
    peer: LinuxPeer, *args: str, port_id: str, expect_reject: bool = False
) -> tuple[int, dict[str, Any], str]:
    """Run ``srp_lio_host.py`` in the namespace, logging in to the target
    port ID ``port_id`` (32 hex digits: id_ext, ioc_guid): exit status, its
    JSON, stderr."""
    argv = [
        "--ip", peer.host_ip, "--dest", peer.vm_ip, "--port", str(CM_PORT),
        "--id-ext", port_id[:16], "--ioc-guid", port_id[16:], *args,
    ]  # fmt: skip
    if expect_reject:
        argv.append("--expect-reject")
    return run_host_script(peer, "tests.interop.srp_lio_host", argv, HOST_TIMEOUT)


@pytest.fixture(scope="module")
def lio(linux_peer: LinuxPeer) -> Iterator[Lio]:
    """ib_srpt loaded, targetcli's D-Bus up, a fileio backstore as LUN 0 of
    an srpt target on rxe0's port (no ACL, not listening yet); all of it
    removed afterwards."""
    peer = linux_peer
    node_guid = eui64(peer.vm_mac)
    lio = Lio(
        peer,
        "ib_srpt",
        DISK,
        DISK_SIZE,
        node_guid=node_guid,
        gid_port="0xfe80000000000000" + node_guid,
        guid_port=guid_colons(node_guid),
        initiator_port_id="0x" + "0" * 16 + eui64(peer.host_mac),
    )
    try:
        lio.load()
        lio.targetcli(
            *lio.backstore_commands(),
            f"/srpt create {lio.wwn}",
            f"/srpt/{lio.wwn}/luns create /backstores/fileio/softrdma",
        )
        lio.vm(f"test -d {SRPT}/{lio.gid_port}/tpgt_1/lun/lun_0", "LUN 0 in configfs")
        yield lio
    finally:
        lio.remove(
            CM_PORT,
            first=f"""
                echo 0 > {SRPT}/discovery_auth/rdma_cm_port
                G={SRPT}/{lio.guid_port}/tpgt_1
                if [ -d $G ]; then
                    echo 0 > $G/enable
                    for a in $G/acls/*; do [ -d "$a" ] && rmdir "$a"; done
                    rm -f $G/lun/lun_0/softrdma; rmdir $G/lun/lun_0 $G {SRPT}/{lio.guid_port}
                fi
            """,
            then=f"rmdir {SRPT} 2>/dev/null",
        )


def test_lio_port_names_target_port_id_listening_and_acls(lio: Lio) -> None:
    """The naming facts of the module docstring, each shown on the wire:
    a REJ before the listener exists, SRP_LOGIN_REJ for a wrong target port
    ID and for a missing ACL, then logins admitted by each ACL form."""
    peer = lio.peer
    guid = lio.node_guid
    vm = lio.vm(
        "cat /sys/class/infiniband/rxe0/node_guid /sys/class/infiniband/rxe0/ports/1/gids/0 "
        f"/sys/module/ib_srpt/parameters/srpt_service_guid {SRPT}/discovery_auth/rdma_cm_port; "
        "modinfo -F parm ib_srpt",
        "ib_srpt facts",
    ).stdout.splitlines()
    assert vm[0] == guid_colons(guid), vm
    assert vm[1].replace(":", "") == lio.gid_port[2:], vm
    assert vm[2] == "0x" + guid and vm[3] == "0", vm
    assert not any(p.startswith("rdma_cm_port") for p in vm[4:]), vm  # configfs only, in 6.1

    # targetcli offers the GID-0 name only, and refuses the GUID form.
    info = lio.targetcli("/srpt info", "/srpt create " + lio.guid_port)
    assert f"Allowed WWNs list: {lio.wwn}" in info, info
    assert "WWN not valid as: ib" in info, info
    # configfs itself takes both forms, but not the IPv4 RoCE GID (index 1).
    names = (lio.guid_port, "0x00000000000000000000ffff" + IPv4Address(peer.vm_ip).packed.hex())
    script = "; ".join(
        f"if mkdir {SRPT}/{n} 2>/dev/null; then rmdir {SRPT}/{n}; echo {n} ok; "
        f"else echo {n} refused; fi"
        for n in names
    )
    assert lio.vm(script, "port names").stdout.split() == [names[0], "ok", names[1], "refused"]

    # Nothing listens until rdma_cm_port is set: the CM rejects (8, invalid service ID).
    status, out, err = host_initiator(peer, port_id=guid * 2, expect_reject=True)
    assert status == 0 and out["connect_error"]["cm_reason"] == 8, (out, err)
    assert out["initiator_port_id"] == lio.initiator_port_id, out
    lio.set_cm_port(CM_PORT)
    listeners = lio.vm("rdma res show cm_id", "cm_id").stdout
    assert re.search(rf"state LISTEN .*comm \[ib_srpt\] src-addr :::{CM_PORT}\b", listeners)

    # A wrong target port ID, then no ACL: SRP_LOGIN_REJ with the reason each.
    mark = lio.mark("wrong target port id")
    status, out, err = host_initiator(peer, port_id="1234" + guid[4:] + guid, expect_reject=True)
    assert status == 0 and out["rejected"]["name"] == "UNABLE_ASSOCIATE_CHANNEL", (out, err)
    assert out["rejected"]["cm_reason"] == 28, out  # CM REJ: consumer defined
    assert "invalid target port identifier" in lio.since(mark)

    mark = lio.mark("no acl")
    status, out, err = host_initiator(peer, port_id=guid * 2, expect_reject=True)
    assert status == 0 and out["rejected"]["name"] == "CHANNEL_LIMIT_REACHED", (out, err)
    assert out["rejected"]["reason"] == 0x10006, out
    log = lio.since(mark)
    i_port = ":".join(lio.initiator_port_id[i : i + 4] for i in range(2, 34, 4))
    assert f"Received SRP_LOGIN_REQ with i_port_id {i_port}, t_port_id " in log, log
    assert f"Rejected login for initiator {peer.vm_ip}: ret = -13" in log, log

    # An ACL named by the initiator's address does not admit it on this port.
    lio.vm(f"mkdir {lio.acl_path(peer.host_ip)}", "IP ACL")
    status, out, err = host_initiator(peer, port_id=guid * 2, expect_reject=True)
    lio.vm(f"rmdir {lio.acl_path(peer.host_ip)}", "IP ACL")
    assert status == 0 and out["rejected"]["name"] == "CHANNEL_LIMIT_REACHED", (out, err)

    # The 32 hex digits without 0x admit it ...
    lio.vm(f"mkdir {lio.acl_path(lio.initiator_port_id[2:])}", "bare ACL")
    status, out, err = host_initiator(peer, port_id=guid * 2, expect_reject=True)
    lio.vm(f"rmdir {lio.acl_path(lio.initiator_port_id[2:])}", "bare ACL")
    assert status == 1 and out["login"]["req_lim_delta"] == SRPT_RQ_SIZE, (out, err)

    # ... and so does targetcli's ACL: ib.<32 hex> becomes 0x<32 hex> in configfs.
    lio.allow()
    mark = lio.mark("acl")
    status, out, err = host_initiator(peer, port_id=guid * 2, expect_reject=True)
    assert status == 1 and "login" in out, (out, err)
    assert "Rejected" not in lio.since(mark)

    # The GUID-named port, with its own LUN and no ACL for the port ID: its
    # sessions are named by the address the login came *to*.
    g = f"{SRPT}/{lio.guid_port}/tpgt_1"
    lio.disallow()
    lio.vm(
        f"mkdir -p {g}/lun/lun_0 && "
        f"ln -s $(ls -d /sys/kernel/config/target/core/fileio_*/softrdma) "
        f"{g}/lun/lun_0/softrdma && echo 1 > {g}/enable",
        "GUID-named port",
    )
    try:
        admitted = {}
        for name in (peer.host_ip, peer.vm_ip):
            lio.vm(f"mkdir {g}/acls/{name}", "GUID port ACL")
            status, out, err = host_initiator(peer, port_id=guid * 2, expect_reject=True)
            lio.vm(f"rmdir {g}/acls/{name}", "GUID port ACL")
            admitted[name] = "login" in out
        assert admitted == {peer.host_ip: False, peer.vm_ip: True}, admitted
    finally:
        # Both names are one port (one "enabled" flag): taking the GUID-named
        # one away disables logins through the GID-named one as well, until
        # that is enabled again (its enable attribute only acts on a change).
        e = f"{SRPT}/{lio.gid_port}/tpgt_1/enable"
        lio.vm(
            f"echo 0 > {g}/enable; rm {g}/lun/lun_0/softrdma; rmdir {g}/lun/lun_0 {g} "
            f"{SRPT}/{lio.guid_port} && echo 0 > {e} && echo 1 > {e}",
            "remove the GUID-named port",
        )
    lio.allow()
    status, out, err = host_initiator(peer, port_id=guid * 2, expect_reject=True)
    assert status == 1 and "login" in out, (out, err)


# --------------------------------------------------------------------------- I/O


@dataclass
class LioRdma:
    """What LIO's RDMA in softrdma's pcap of one run shows."""

    target_rkeys: set[int] = field(default_factory=set)
    lio_first_rdma: str = ""


def read_wire(path: Path, host_ip: str) -> tuple[SrpWire, LioRdma]:
    """The logins and opcodes (``"initiator SRP_CMD with immediate data"``
    counted too), and the keys of LIO's RDMA."""
    rdma = LioRdma()

    def on_packet(wire: SrpWire, side: str, op: Opcode, p: Packet) -> None:
        if side == "initiator" and (
            op is Opcode.RC_SEND_FIRST
            or (op is Opcode.RC_SEND_ONLY and len(bytes(p.payload)) >= IMM_SEND_MIN)
        ):
            wire.opcodes["initiator SRP_CMD with immediate data"] += 1
        if side == "lio" and p.reth is not None:
            if p.reth.dma_len == 0 and op is Opcode.RC_RDMA_WRITE_ONLY:
                # srpt_zerolength_write: no data, no key.
                wire.opcodes["lio zero-length RDMA WRITE"] += 1
                what = "zero-length WRITE"
            else:
                rdma.target_rkeys.add(p.reth.rkey)
                what = op.name
            rdma.lio_first_rdma = rdma.lio_first_rdma or what

    return read_srp_pcap(path, host_ip, ("initiator", "lio"), on_packet), rdma


@dataclass(frozen=True)
class Setup:
    args: tuple[str, ...]
    fast_reg: bool
    imm: bool
    transfer_kib: int
    out_of_credits: bool = False


SETUPS = {
    "fast-reg": Setup((), True, True, 48),
    "fast-reg-512k-hca": Setup(("--sg-tablesize", "256", "-d", "hca0"), True, True, 512),
    "never-register": Setup(("--never-register",), False, True, 48),
    "fast-reg-no-imm": Setup(("--no-imm",), True, False, 48),
    # More commands in flight than LIO's 128 credits: the batch waits for them.
    "fast-reg-queue-200": Setup(("--can-queue", "200"), True, True, 48, out_of_credits=True),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_softrdma_initiator_reads_and_writes_a_lio_fileio_lun(
    lio: Lio, setup: str, tmp_path: Path
) -> None:
    peer = lio.peer
    s = SETUPS[setup]
    lio.allow()
    lio.set_cm_port(CM_PORT)
    lio.zero_disk()
    pcap = tmp_path / "initiator.pcap"
    mark = lio.mark(f"io {setup}")
    seed = list(SETUPS).index(setup) + 1
    status, out, err = host_initiator(
        peer, *s.args, "--seed", str(seed), "--pcap", str(pcap), port_id=lio.node_guid * 2
    )
    log = lio.since(mark)
    why = f"{json.dumps(out)[-4000:]}\n{err[-3000:]}\n--- dmesg:\n{log[-3000:]}"
    assert status == 0, why

    # The login: LIO's terms; immediate data exactly when asked for.
    login = out["login"]
    assert login["req_lim_delta"] == SRPT_RQ_SIZE, why
    assert login["max_it_iu_len"] == SRP_MAX_REQ_SIZE, why
    assert login["max_ti_iu_len"] == out["req_it_iu_len"], why  # ib_srpt echoes the request
    assert login["immed_supp"] == int(s.imm) and out["imm_data_in_use"] is s.imm, why
    assert out["inquiry"]["vendor"] == "LIO-ORG", why
    assert out["inquiry"]["peripheral_type"] == 0, why
    assert out["capacity"] == [DISK_SIZE // BLOCK, BLOCK], why
    assert out["max_transfer_blocks"] * BLOCK == s.transfer_kib << 10, why

    # The data: every read equal to the local copy; the registration mode used.
    assert not out["mismatches"] and all(r["ok"] for r in out["reads"]), why
    stats = out["stats"]
    assert stats["completed"] == stats["commands"] and stats["wc_errors"] == 0, why
    assert max(w["blocks"] for w in out["writes"]) * BLOCK == 4 << 20, why
    assert max(r["blocks"] for r in out["reads"]) * BLOCK == 8 << 20, why
    assert (stats["immediate"] > 0) is s.imm, why
    assert (stats["zero_req_lim"] > 0) is s.out_of_credits, why
    assert stats["credit_violations"] == 0, why
    if s.fast_reg:
        assert out["use_fast_reg"] and out["global_rkey"] == 0, why
        assert stats["reg_mr"] > 0 and stats["local_inv"] == stats["reg_mr"], why
    else:
        assert not out["use_fast_reg"] and out["global_rkey"] != 0, why
        assert stats["reg_mr"] == 0 and stats["indirect"] > 0, why
        assert out["keys"] == [out["global_rkey"]], why

    # In the VM: the backing file is the local copy, and so is every extent
    # written (as the later of overlapping writes left it).
    digest = lio.vm(f"sha256sum {DISK}", "hash the backstore").stdout.split()[0]
    assert digest == out["disk_sha256"], why
    script = "; ".join(
        f"dd if={DISK} bs={BLOCK} skip={w['lba']} count={w['blocks']} status=none | sha256sum"
        for w in out["writes"]
    )
    sums = [line.split()[0] for line in lio.vm(script, "hash the extents").stdout.splitlines()]
    assert sums == [w["final_sha256"] for w in out["writes"]], why

    # On the wire: the login, immediate data, LIO's RDMA with our keys only.
    wire, rdma = read_wire(pcap, peer.host_ip)
    assert len(wire.logins) == len(wire.responses) == 1, wire
    req = wire.logins[0]
    assert "0x" + req.initiator_port_id.hex() == lio.initiator_port_id, req
    assert req.target_port_id.hex() == lio.node_guid * 2, req
    assert bool(req.req_flags & SrpLoginReqFlag.IMMED_REQUESTED) is s.imm, req
    assert wire.responses[0].max_it_iu_len == SRP_MAX_REQ_SIZE, wire.responses
    assert (wire.opcodes["initiator SRP_CMD with immediate data"] > 0) is s.imm, wire.opcodes
    assert wire.opcodes["lio RC_RDMA_READ_REQUEST"] > 0, wire.opcodes
    assert wire.opcodes["lio RC_RDMA_WRITE_FIRST"] + wire.opcodes["lio RC_RDMA_WRITE_ONLY"] > 0
    assert rdma.target_rkeys and rdma.target_rkeys <= set(out["keys"]), (rdma.target_rkeys, why)
    # ib_srpt's first RDMA on a new channel is a zero-length WRITE (rkey 0),
    # whose completion tells it the QP is live.
    assert rdma.lio_first_rdma == "zero-length WRITE", rdma

    # The kernel: one login, and nothing else to say but the logout IU
    # (when it arrives before the DREQ) and the receives flushed at the end.
    assert log.count("Received SRP_LOGIN_REQ") == 1, log
    unexpected = [line for line in log.splitlines()[1:] if not re.search(EXPECTED_DMESG, line)]
    assert not unexpected, log
    t = out["timings"]
    print(
        f"\nLIO {setup}: {out['bytes_written'] >> 10} KiB written, "
        f"{out['bytes_read'] >> 10} KiB read, {stats['commands']} commands "
        f"({stats['immediate']} immediate, {stats['direct']} direct, "
        f"{stats['indirect']} indirect, {stats['reg_mr']} MRs); "
        + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
    )
