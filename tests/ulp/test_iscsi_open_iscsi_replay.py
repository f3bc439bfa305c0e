"""open-iscsi's own PDUs replayed through the iSCSI target machine.

``tests/data/captures/iser_open_iscsi.pcap`` is softrdma's iSER target
(``softrdma iser target``, captured on its side with ``--pcap``) serving
open-iscsi 2.1.8 with ``ib_iser`` (Linux 6.1, ``rdma_rxe``):

1. ``iscsiadm -m discovery -t st -p 10.77.0.2:3260 -I iser``: a Discovery
   session (whose Login Request, unlike a Normal one, carries no
   ``RDMAExtensions`` and declares ``MaxRecvDataSegmentLength=8192``), one
   Text Request ``SendTargets=All`` and its answer, then a DREQ (no
   Logout);
2. ``--login`` to the target, the SCSI scan sd does (INQUIRY and its VPD
   pages, REPORT LUNS, READ CAPACITY(16), MODE SENSE, ...), a 16 KiB
   O_DIRECT write (8 KiB of immediate data, the rest fetched by RDMA READ
   from the write STag), the 16 KiB read back (RDMA WRITE to the read
   STag), SYNCHRONIZE CACHE at the unmount, and ``--logout``.

The target machine fed the Linux side's PDUs (and the STags of their iSER
headers) must answer them exactly as the target did on the wire, given the
status the SCSI core reported and the StatSN each connection started at
(drawn at random, as LIO does): a regression test of the whole exchange
without the VM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from softrdma.ulp.iscsi.proto import (
    IscsiLoginRequest,
    IscsiLoginResponse,
    IscsiLogoutRequest,
    IscsiLogoutResponse,
    IscsiPdu,
    IscsiScsiCommand,
    IscsiScsiResponse,
    IscsiText,
    IscsiTextResponse,
)
from softrdma.ulp.iscsi.session import (
    ConnectionClosed,
    IscsiTargetConnection,
    IscsiTargetPortal,
    IscsiTargetState,
    LoginCompleted,
    LogoutRequested,
    RemoteBuffer,
    ScsiCommandReceived,
)
from softrdma.ulp.iscsi.text import decode_text
from softrdma.ulp.iser.proto import IserFlag, IserHdr
from tests.interop.iser_wire import IserMessage, read_iser_pcap

CAPTURE = Path(__file__).resolve().parents[1] / "data" / "captures" / "iser_open_iscsi.pcap"
TARGET_IP = "10.77.0.2"
IQN = "iqn.2003-01.org.linux-iscsi.vm.x8664:sn.1f7b3d5d87fa"
INITIATOR = "iqn.2005-03.org.open-iscsi:softrdma-peer"


@dataclass
class Connections:
    """The capture's two connections: (Linux's message, the target's
    answers to it) in order."""

    discovery: list[tuple[IserMessage, list[IscsiPdu]]]
    normal: list[tuple[IserMessage, list[IscsiPdu]]]


def connections() -> Connections:
    messages = read_iser_pcap(CAPTURE, TARGET_IP).messages
    logins = [i for i, m in enumerate(messages) if isinstance(m.pdu, IscsiLoginRequest)]
    assert len(logins) == 2, logins

    def exchanges(part: list[IserMessage]) -> list[tuple[IserMessage, list[IscsiPdu]]]:
        out: list[tuple[IserMessage, list[IscsiPdu]]] = []
        for m in part:
            if m.side == "vm":
                out.append((m, []))
            else:
                out[-1][1].append(m.pdu)
        return out

    return Connections(exchanges(messages[logins[0] : logins[1]]), exchanges(messages[logins[1] :]))


def portal() -> IscsiTargetPortal:
    """What ``softrdma iser target`` ran (IserTarget's portal)."""
    return IscsiTargetPortal([IQN], address=f"{TARGET_IP}:3260")


def first_statsn(answers: list[IscsiPdu]) -> int:
    (rsp,) = answers
    assert isinstance(rsp, IscsiLoginResponse)
    return rsp.statsn


def test_the_discovery_session_is_answered_as_on_the_wire() -> None:
    discover(portal())


def discover(lio: IscsiTargetPortal) -> None:
    """The discovery connection through ``lio``, checked."""
    ((login, login_rsp), (text, text_rsp)) = connections().discovery
    keys = dict(decode_text(login.pdu.data))
    assert keys["SessionType"] == "Discovery" and "RDMAExtensions" not in keys, keys
    assert keys["MaxRecvDataSegmentLength"] == "8192" and "TargetName" not in keys, keys

    tgt = lio.connection(initial_statsn=first_statsn(login_rsp))
    step = tgt.receive(login.pdu.encode())
    assert [p.encode() for p in step.pdus] == [p.encode() for p in login_rsp]
    (done,) = step.events
    assert isinstance(done, LoginCompleted) and done.session_type == "Discovery"
    assert done.initiator_name == INITIATOR and done.target_name is None
    assert not done.negotiated.rdma_extensions

    assert isinstance(text.pdu, IscsiText)
    step = tgt.receive(text.pdu.encode())
    assert [p.encode() for p in step.pdus] == [p.encode() for p in text_rsp]
    (rsp,) = step.pdus
    assert isinstance(rsp, IscsiTextResponse) and rsp.final
    assert decode_text(rsp.data) == [("TargetName", IQN), ("TargetAddress", f"{TARGET_IP}:3260,1")]
    # open-iscsi ends a discovery session with a DREQ, not a Logout.
    tgt.transport_closed("disconnected by the initiator")
    assert tgt.state is IscsiTargetState.FREE and not lio.sessions


def _remote(hdr: IserHdr) -> tuple[RemoteBuffer | None, RemoteBuffer | None]:
    read = RemoteBuffer(hdr.read_stag, hdr.read_va) if hdr.flags & IserFlag.RSV else None
    write = RemoteBuffer(hdr.write_stag, hdr.write_va) if hdr.flags & IserFlag.WSV else None
    return read, write


def test_the_normal_session_is_answered_as_on_the_wire() -> None:
    """Login, every command of the scan and the I/O, logout: each answer
    equal to the captured one. ib_isert (and this target) answers each
    command before it takes the next off the wire, so each is answered
    before the next is fed. The discovery session came first on the same
    portal: it had TSIH 1, this session has 2."""
    normal = connections().normal
    (login, login_rsp), *rest = normal
    lio = portal()
    discover(lio)
    tgt: IscsiTargetConnection = lio.connection(initial_statsn=first_statsn(login_rsp))
    step = tgt.receive(login.pdu.encode())
    assert [p.encode() for p in step.pdus] == [p.encode() for p in login_rsp]
    (done,) = step.events
    assert isinstance(done, LoginCompleted) and done.session_type == "Normal"
    assert done.target_name == IQN and done.negotiated.rdma_extensions and done.tsih == 2

    commands = writes = 0
    for msg, answers in rest:
        read_buf, write_buf = _remote(msg.hdr)
        step = tgt.receive(msg.pdu.encode(), read_buf=read_buf, write_buf=write_buf)
        if isinstance(msg.pdu, IscsiLogoutRequest):
            assert [p.encode() for p in step.pdus] == [p.encode() for p in answers]
            assert isinstance(answers[0], IscsiLogoutResponse)
            assert isinstance(step.events[0], LogoutRequested)
            assert isinstance(step.events[-1], ConnectionClosed)
            continue
        cmd = msg.pdu
        assert isinstance(cmd, IscsiScsiCommand)
        (ev,) = step.events
        assert isinstance(ev, ScsiCommandReceived) and step.pdus == []
        assert (ev.itt, ev.cdb, ev.expected_length) == (cmd.itt, cmd.cdb, cmd.data_length)
        assert (ev.read_buf, ev.write_buf) == (read_buf, write_buf)
        assert ev.immediate_data == cmd.data
        if cmd.write:
            writes += 1
            # 16 KiB: 8 KiB immediate, the rest at the write STag's VA.
            assert len(cmd.data) == 8192 and cmd.data_length == 16384 and write_buf is not None
        (want,) = answers
        assert isinstance(want, IscsiScsiResponse)
        rsp = tgt.respond(
            ev.itt,
            status=want.status,
            sense=want.sense,
            underflow=want.residual_count if want.underflow else 0,
            overflow=want.residual_count if want.overflow else 0,
        )
        assert rsp.encode() == want.encode(), (cmd, want, rsp)
        commands += 1
    assert (commands, writes) == (37, 1)
    assert tgt.state is IscsiTargetState.FREE and not lio.sessions
