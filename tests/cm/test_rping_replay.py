"""Linux's rping capture replayed against ``softrdma rping``, one side at a time.

``tests/data/captures/rping.pcap`` holds rdma-core 44's ``rping -C 3 -S 64``
between two Linux 6.1 ``rdma_rxe`` hosts (client 10.77.0.2, server
10.77.0.1, RoCE MTU 1024): the CM handshake on QP1 (REQ, REP, RTU, then
DREQ, DREP) and the RC traffic of three pings — per ping the client SENDs
its start buffer's ``rping_rdma_info``, the server RDMA-READs it and SENDs a
go-ahead, the client SENDs its sink's, the server RDMA-WRITEs the data back
and SENDs a go-ahead; every request acknowledged.

Each test puts one softrdma rping process (:class:`RpingProcess`) in the
place of one Linux host, on the in-process fabric (no latency, no faults),
and from a raw port with the other host's address
(:mod:`tests.rdma.helpers_device`) plays that host's frames of the capture
at it, whole Ethernet frames with a valid ICRC, in capture order, as a real
peer would: a frame the capture shows the softrdma side sending is
awaited (the simulation runs until it reaches the peer's port; no
simulated time need pass) and compared with Linux's; a frame of the peer is delivered
once everything before it in the capture has been seen, with what the peer
learned from softrdma put in: its comm ID, QPN and starting PSN (peer
packets' PSNs move by the difference), and for the server's RDMA READ and
WRITE the address and rkey the softrdma client advertised. Everything the
peer chose itself stays as captured: its comm ID, QPN, starting PSN, TIDs,
its buffers' addresses and rkeys, the ping data.

What softrdma sends must be what Linux sent, field by field:

* every CM MAD: the MAD header but the TID, which must stand in Linux's
  relations instead (REP and RTU carry the REQ's TID, DREP its DREQ's;
  one TID for all the active side's messages); every field of the CM
  message but the values random per connection (comm IDs, starting PSNs),
  those of the device (QPN, CA GUID: derived from the MAC, as Linux's) and
  the ``cma_hdr`` source port with the flow label it gives; the private
  data layout (the ``cma_hdr``'s version, IP version and addresses, the
  zeros rping leaves after it; REP, RTU, DREQ and DREP all zeros);
* each frame as it reaches the peer's port (decoded, ICRC checked): the
  addresses, rxe's IPv4 / UDP header fields, the UDP source ports (QP1's
  from its QPN, RC's from the REQ's flow label as rxe derives it); the BTH
  of every packet (opcode, flags, P_Key, AckReq, QPN and PSN after the
  adjustments above; QP1's PSNs count from 0, as rxe's), the DETH of the
  MADs;
* the sequence of RC opcodes; each client SEND's ``struct rping_rdma_info``
  (16 bytes, big-endian buf, rkey, size: size as Linux's, buf and rkey the
  softrdma client's own buffers), the server's go-aheads (16 zero bytes:
  neither rping fills the server's send buffer);
* the READ request's RETH (length 64, address and rkey the ones the client
  advertised) and the WRITE's RETH and its 64 payload bytes, the
  deterministic ping pattern, so the capture's bytes; the READ response's
  64 bytes;
* every AETH: ACK syndrome 0x1f (unlimited credits) and the MSN.

Differences from Linux that are expected: the softrdma client's REQ carries
its own ephemeral RDMA CM port (so its flow label and RC UDP source port
differ from Linux's, each derived from the other exactly as Linux derives
them); softrdma's rping registers its buffers with fast-registration MRs,
posting the ``IB_WR_REG_MR`` unsignaled in front of its first SEND — a local
work request that puts nothing on the wire and takes no PSN, which the
unchanged PSN sequence shows; the top half of the TIDs (the CM agent's
``hi_tid``: 2 on Linux, 1 here). Simulated time does not pass during the
replay (Linux took 324 ms from REQ to DREP), and nothing is sent after the
last frame.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from softrdma.cli.rping import RpingOptions, RpingProcess, RpingRdmaInfo, ping_pattern
from softrdma.cm.cma import RdmaCmState
from softrdma.cm.cma_hdr import CMA_HDR_SIZE, CmaHdr
from softrdma.cm.messages import (
    CmDrep,
    CmDreq,
    CmMessage,
    CmRep,
    CmReq,
    CmRtu,
    decode_cm_mad,
    encode_cm_mad,
)
from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.fabric.pcap import read_pcap
from softrdma.mad.header import MadHdr
from softrdma.time.sim import SimLoop
from softrdma.transport.opcodes import Opcode, opcode_info
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_MASK
from softrdma.transport.roce import RoceFrame, decode_roce_v2, encode_roce_v2, rdma_get_udp_sport
from tests.rdma.helpers_device import RawPort, attach_raw_port
from tests.rdma.nodes import make_device

CAPTURE = Path(__file__).resolve().parents[1] / "data" / "captures" / "rping.pcap"
CLIENT = IPv4Address("10.77.0.2")
SERVER = IPv4Address("10.77.0.1")
PORT = 7174
SIZE = 64
COUNT = 3
NETDEV_MTU = 1500
"""The captures' Ethernet MTU: RoCE path MTU 1024."""
GSI_SPORT = 0xD872
"""rxe's UDP source port for QP1: 0xC000 + the 14-bit ``hash_32`` of QPN 1."""
AETH_ACK = 0x1F
KINDS = ("cpu", "hw-iommu")
"""The CPU-copy device (rxe's model; it advertises kernel virtual
addresses) and a hardware HCA behind an IOMMU (IOVAs): the same wire."""


def _swap32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "big"), "little")


# --------------------------------------------------------------------------- the capture


@dataclass(frozen=True)
class CapFrame:
    """One RoCEv2 frame of the capture (ICRC checked), its CM MAD decoded."""

    index: int
    frame: RoceFrame
    mad: tuple[MadHdr, CmMessage] | None

    @property
    def packet(self) -> Packet:
        return self.frame.packet

    @property
    def src(self) -> IPv4Address:
        return IPv4Address(self.frame.saddr)

    @property
    def dst(self) -> IPv4Address:
        return IPv4Address(self.frame.daddr)

    @property
    def requester(self) -> IPv4Address:
        """The host whose PSN space the frame's PSN is in (QP1 aside)."""
        return self.src if opcode_info(self.packet.bth.opcode).is_request else self.dst

    def __repr__(self) -> str:
        what = type(self.mad[1]).__name__ if self.mad else Opcode(self.packet.bth.opcode).name
        return f"capture #{self.index} {self.src}->{self.dst} {what} PSN {self.packet.bth.psn}"


@functools.cache
def capture() -> tuple[CapFrame, ...]:
    """The IPv4 / UDP 4791 frames of the capture (its IPv6 and ARP chatter left out)."""
    out: list[CapFrame] = []
    for rec in read_pcap(CAPTURE):
        data = bytes(rec.data)
        if data[12:14] != b"\x08\x00" or data[23] != 17:
            continue
        rf = decode_roce_v2(data)
        p = rf.packet
        mad = decode_cm_mad(bytes(p.payload)) if p.bth.dest_qp == 1 else None
        out.append(CapFrame(len(out), rf, mad))
    return tuple(out)


def cm_message(cls: type[CmMessage]) -> tuple[MadHdr, CmMessage]:
    """The capture's (only) CM message of type ``cls``."""
    (mad,) = [f.mad for f in capture() if f.mad is not None and isinstance(f.mad[1], cls)]
    return mad


def cap_req() -> CmReq:
    req = cm_message(CmReq)[1]
    assert isinstance(req, CmReq)
    return req


def cap_rep() -> CmRep:
    rep = cm_message(CmRep)[1]
    assert isinstance(rep, CmRep)
    return rep


def test_the_capture_is_the_summarys() -> None:
    """What SUMMARY.md says of rping.pcap, and the values the replay builds on."""
    frames = capture()
    ops = Counter(Opcode(f.packet.bth.opcode).name for f in frames if f.mad is None)
    assert ops == {
        "RC_SEND_ONLY": 12, "RC_RDMA_WRITE_ONLY": 3, "RC_RDMA_READ_REQUEST": 3,
        "RC_RDMA_READ_RESPONSE_ONLY": 3, "RC_ACKNOWLEDGE": 15,
    }  # fmt: skip
    cm = [(type(f.mad[1]).__name__, f.src) for f in frames if f.mad is not None]
    assert cm == [("CmReq", CLIENT), ("CmRep", SERVER), ("CmRtu", CLIENT),
                  ("CmDreq", CLIENT), ("CmDrep", SERVER)]  # fmt: skip
    req, rep = cap_req(), cap_rep()
    assert (req.local_qpn, rep.local_qpn) == (0x11, 0x11)
    assert CmaHdr.decode(req.private_data) == CmaHdr(CLIENT, SERVER, 0xD400)
    assert req.primary_flow_label == (0xD400 * 31 + PORT) & 0xFFFFF
    assert {f.frame.sport for f in frames if f.mad is None} == {
        rdma_get_udp_sport(req.primary_flow_label, 0, 0)
    }
    assert {f.frame.sport for f in frames if f.mad is not None} == {GSI_SPORT}


# --------------------------------------------------------------------------- the replay


@dataclass
class Replay:
    """One softrdma rping process in the place of one host of the capture,
    and the other host's frames played at it."""

    role: str
    """``"server"`` or ``"client"``: which of Linux's rpings softrdma replaces."""
    kind: str
    fabric: Fabric = field(init=False)
    dev: RoceDevice = field(init=False)
    port: RawPort = field(init=False)
    """The peer's port on the fabric: what reaches it is what softrdma sent."""
    proc: RpingProcess = field(init=False)
    out: io.StringIO = field(default_factory=io.StringIO)
    err: io.StringIO = field(default_factory=io.StringIO)
    pairs: list[tuple[CapFrame, RoceFrame]] = field(default_factory=list)
    """Each frame of Linux's that softrdma replaces, with what softrdma sent
    (decoded from the wire, ICRC checked)."""
    delivered: list[tuple[CapFrame, RoceFrame]] = field(default_factory=list)
    """Each frame of the peer, as played."""
    # what the peer learned from softrdma
    ours_comm_id: int = 0
    ours_qpn: int = 0
    ours_tids: dict[type[CmMessage], int] = field(default_factory=dict)
    ours_req: CmReq | None = None
    psn_start: dict[IPv4Address, int] = field(default_factory=dict)
    """The first request PSN of each host (client: the REP's starting PSN,
    server: the REQ's)."""
    advertised: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    """The client's buffers: (buf, rkey) in the capture -> softrdma's."""

    def __post_init__(self) -> None:
        # no latency, no serialization delay: the peer answers at once
        self.fabric = Fabric(latency=0.0, link_rate=0.0)
        self.dev = make_device(self.kind, self.fabric, str(self.ours), netdev_mtu=NETDEV_MTU)
        self.port = attach_raw_port(self.fabric, str(self.peer))
        if self.role == "server":
            opts = RpingOptions(server=True, addr=str(SERVER), size=SIZE, verbose=True)
        else:
            opts = RpingOptions(server=False, addr=str(SERVER), source=str(CLIENT), size=SIZE,
                                count=COUNT, verbose=True, validate=True)  # fmt: skip
        self.proc = RpingProcess(opts, self.dev, self.out, self.err, record=True)
        req, rep = cap_req(), cap_rep()
        # what the peer chose stays as captured
        if self.role == "server":
            self.psn_start[SERVER] = req.starting_psn
        else:
            self.psn_start[CLIENT] = rep.starting_psn

    @property
    def ours(self) -> IPv4Address:
        return SERVER if self.role == "server" else CLIENT

    @property
    def peer(self) -> IPv4Address:
        return CLIENT if self.role == "server" else SERVER

    @property
    def loop(self) -> SimLoop:
        return self.fabric.loop

    @property
    def sent(self) -> list[bytes]:
        """Every frame softrdma sent, as it reached the peer's port."""
        return self.port.received

    # -- running ----------------------------------------------------------------------

    def drive(self, until: Callable[[], bool], what: str, limit: float = 1.0) -> None:
        """Run the process and the device until ``until()``; fail after
        ``limit`` simulated seconds (less than any retransmission timeout,
        so nothing is ever sent twice)."""
        loop = self.loop
        deadline = loop.time() + limit
        while not until():
            if self.proc.step():
                continue
            left = deadline - loop.time()
            ok = left > 0 and loop.run_until(lambda: until() or self.proc.ready(), timeout=left)
            if not ok and not until():
                raise AssertionError(
                    f"softrdma never {what}; sent {len(self.sent)} frames "
                    f"(the replay saw {len(self.pairs)})\n"
                    f"stdout {self.out.getvalue()!r}\nstderr {self.err.getvalue()!r}"
                )

    def _sent_more_than(self, n: int) -> bool:
        return len(self.sent) > n

    def settle(self) -> None:
        """Let the process run whatever it can without time passing."""
        while self.proc.step() or self.loop.run(until=self.loop.time()):
            pass

    def run(self) -> Replay:
        start = self.loop.time()
        self.settle()
        if self.role == "server":
            listener = self.proc.cb.cm_id
            assert listener is not None and listener.state is RdmaCmState.LISTEN
        for cf in capture():
            if cf.src == self.ours:
                n = len(self.pairs)
                self.drive(
                    functools.partial(self._sent_more_than, n), f"sent the counterpart of {cf}"
                )
                t = decode_roce_v2(self.sent[n])
                self.pairs.append((cf, t))
                self.learn(cf, t)
            else:
                rf = self.adapt(cf)
                self.delivered.append((cf, rf))
                self.fabric.transmit(self.port, encode_roce_v2(rf))
        self.drive(lambda: self.proc.done, "ended")
        assert self.loop.time() == start, "simulated time passed"
        # nothing more goes on the wire: no retransmission, no stray MAD
        self.loop.run(until=self.loop.time() + 60.0)
        extra = [decode_roce_v2(f).packet for f in self.sent[len(self.pairs) :]]
        assert not extra, extra
        return self

    # -- the peer ---------------------------------------------------------------------

    def learn(self, cf: CapFrame, t: RoceFrame) -> None:
        """What a peer takes from what softrdma sent."""
        p = t.packet
        if p.bth.dest_qp == 1:
            hdr, msg = decode_cm_mad(bytes(p.payload))
            self.ours_tids[type(msg)] = hdr.tid
            if isinstance(msg, CmReq):
                self.ours_req = msg
                self.ours_comm_id, self.ours_qpn = msg.local_comm_id, msg.local_qpn
                self.psn_start[SERVER] = msg.starting_psn
            elif isinstance(msg, CmRep):
                self.ours_comm_id, self.ours_qpn = msg.local_comm_id, msg.local_qpn
                self.psn_start[CLIENT] = msg.starting_psn
        elif self.role == "client" and p.bth.opcode == Opcode.RC_SEND_ONLY:
            theirs = RpingRdmaInfo.unpack(bytes(cf.packet.payload))
            mine = RpingRdmaInfo.unpack(bytes(p.payload))
            self.advertised[(theirs.buf, theirs.rkey)] = (mine.buf, mine.rkey)

    def rc_sport(self) -> int:
        """The RC UDP source port both hosts use: from the REQ's flow label."""
        req = self.ours_req if self.ours_req is not None else cap_req()
        return rdma_get_udp_sport(req.primary_flow_label, 0, 0)

    def map_psn(self, cf: CapFrame) -> int:
        """The capture's PSN moved into the connection's PSN space."""
        requester = cf.requester
        cap_start = (cap_rep() if requester == CLIENT else cap_req()).starting_psn
        return (cf.packet.bth.psn - cap_start + self.psn_start[requester]) & PSN_MASK

    def adapt(self, cf: CapFrame) -> RoceFrame:
        """A frame of the peer, with what it learned from softrdma put in."""
        p = cf.packet
        if cf.mad is not None:
            hdr, msg = cf.mad
            if isinstance(msg, CmRtu | CmDreq | CmDrep | CmRep):
                msg = dataclasses.replace(msg, remote_comm_id=self.ours_comm_id)
            if isinstance(msg, CmDreq):
                msg = dataclasses.replace(msg, remote_qpn=self.ours_qpn)
            if isinstance(msg, CmRep):  # the answer to softrdma's REQ carries its TID
                hdr = dataclasses.replace(hdr, tid=self.ours_tids[CmReq])
            elif isinstance(msg, CmDrep):
                hdr = dataclasses.replace(hdr, tid=self.ours_tids[CmDreq])
            packet = dataclasses.replace(p, payload=encode_cm_mad(hdr, msg))
            return self.frame(cf, packet, cf.frame.sport)
        bth = p.bth._replace(dest_qp=self.ours_qpn, psn=self.map_psn(cf))
        reth = p.reth
        if reth is not None:  # the server's READ / WRITE: the buffer softrdma advertised
            buf, rkey = self.advertised[(reth.va, reth.rkey)]
            reth = reth._replace(va=buf, rkey=rkey)
        packet = dataclasses.replace(p, bth=bth, reth=reth)
        return self.frame(cf, packet, self.rc_sport())

    def frame(self, cf: CapFrame, packet: Packet, sport: int) -> RoceFrame:
        """The captured frame around ``packet``, between the fabric's MACs
        (the IPv4 header, IP ID included, as captured; a new ICRC)."""
        mac = self.fabric.lookup_mac(self.ours)
        assert mac is not None
        return dataclasses.replace(
            cf.frame, packet=packet, sport=sport, eth_src=self.port.mac, eth_dst=mac
        )


@functools.cache
def replay(role: str, kind: str) -> Replay:
    return Replay(role, kind).run()


ROLES = ("server", "client")
CASES = [(role, kind) for role in ROLES for kind in KINDS]
IDS = [f"{role}-{kind}" for role, kind in CASES]


# --------------------------------------------------------------------------- the checks


@pytest.mark.parametrize(("role", "kind"), CASES, ids=IDS)
def test_rping_runs_as_against_linux(role: str, kind: str) -> None:
    """The replay goes through: every frame softrdma had to send it sent,
    nothing else, and the process printed what rping prints."""
    r = replay(role, kind)
    assert r.proc.status == 0, r.err.getvalue()
    pings = [ping_pattern(i, 65 + i, SIZE) for i in range(COUNT)]
    lines = [p[:-1].decode() for p in pings]
    if role == "server":
        assert r.out.getvalue() == "".join(f"server ping data: {x}\n" for x in lines)
        assert r.err.getvalue() == "server DISCONNECT EVENT...\nwait for RDMA_READ_ADV state 10\n"
        assert r.proc.cb.data == pings  # what the READs brought
    else:
        assert r.out.getvalue() == "".join(f"ping data: {x}\n" for x in lines)
        assert r.err.getvalue() == "client DISCONNECT EVENT...\n"
        assert r.proc.cb.data == pings  # what the WRITEs left in the sink
    assert len(r.pairs) == sum(f.src == r.ours for f in capture())


@pytest.mark.parametrize(("role", "kind"), CASES, ids=IDS)
def test_opcodes_addresses_and_ports(role: str, kind: str) -> None:
    """The sequence of opcodes is Linux's; each frame goes to the peer in an
    IPv4 / UDP header like rxe's, from QP1's source port or from the one the
    REQ's flow label gives."""
    r = replay(role, kind)
    assert [t.packet.bth.opcode for _, t in r.pairs] == [cf.packet.bth.opcode for cf, _ in r.pairs]
    for cf, t in r.pairs:
        assert (t.saddr, t.daddr) == (r.ours.packed, r.peer.packed)
        # rxe's IPv4 and UDP: TOS 0, TTL 64, DF, no UDP checksum, no VLAN
        assert (t.tos, t.ttl, t.df, t.udp_checksum, t.vlan_tci, t.dport) == (
            cf.frame.tos, cf.frame.ttl, cf.frame.df, cf.frame.udp_checksum, None, 4791
        ), cf  # fmt: skip
        assert t.sport == (GSI_SPORT if cf.mad is not None else r.rc_sport()), cf
    if role == "server":  # the peer's REQ carries Linux's flow label: Linux's port exactly
        assert {t.sport for cf, t in r.pairs if cf.mad is None} == {
            cf.frame.sport for cf, _ in r.pairs if cf.mad is None
        }


def _expected_cm(r: Replay, cf: CapFrame, ours: CmMessage) -> CmMessage:
    """Linux's message with the values that are softrdma's own put in."""
    assert cf.mad is not None
    theirs = cf.mad[1]
    own: dict[str, object] = {"local_comm_id": r.ours_comm_id}
    if isinstance(theirs, CmReq | CmRep):
        assert isinstance(ours, CmReq | CmRep)
        own |= {
            "starting_psn": ours.starting_psn,
            "local_qpn": r.ours_qpn,
            "local_ca_guid": r.dev.node_guid,
        }
    if isinstance(theirs, CmReq):
        assert isinstance(ours, CmReq)
        hdr = CmaHdr.decode(ours.private_data)
        cap_hdr = CmaHdr.decode(theirs.private_data)
        assert hdr == dataclasses.replace(cap_hdr, src_port=hdr.src_port)
        assert ours.private_data[CMA_HDR_SIZE:] == theirs.private_data[CMA_HDR_SIZE:] == bytes(56)
        own |= {
            "primary_flow_label": (hdr.src_port * 31 + PORT) & 0xFFFFF,
            "private_data": ours.private_data,
        }
    return dataclasses.replace(theirs, **own)  # type: ignore[arg-type]


@pytest.mark.parametrize(("role", "kind"), CASES, ids=IDS)
def test_cm_messages_are_linuxs(role: str, kind: str) -> None:
    """Every CM MAD softrdma sent against Linux's, field by field."""
    r = replay(role, kind)
    mads = [(cf, t) for cf, t in r.pairs if cf.mad is not None]
    assert [type(cf.mad[1]) for cf, _ in mads if cf.mad] == (
        [CmRep, CmDrep] if role == "server" else [CmReq, CmRtu, CmDreq]
    )
    for cf, t in mads:
        assert cf.mad is not None
        cap_hdr, _ = cf.mad
        hdr, ours = decode_cm_mad(bytes(t.packet.payload))
        assert hdr == dataclasses.replace(cap_hdr, tid=hdr.tid), cf
        assert ours == _expected_cm(r, cf, ours), cf
        # UD on QP1: BTH (AckReq included, as rxe sets it on UD too) and DETH
        # as Linux's; QP1's PSNs count from 0, as rxe's.
        assert t.packet.bth == cf.packet.bth, cf
        assert t.packet.deth == cf.packet.deth
    tids = r.ours_tids
    if role == "server":  # answering the peer: its REQ's and DREQ's TIDs, Linux's exactly
        assert tids[CmRep] == cm_message(CmReq)[0].tid
        assert tids[CmDrep] == cm_message(CmDreq)[0].tid
    else:  # cm.c's TID: the agent's hi_tid over the comm ID, byte-swapped on x86
        cap_tid = cm_message(CmReq)[0].tid
        assert cap_tid & 0xFFFF_FFFF == _swap32(cap_req().local_comm_id)
        assert {cf.mad[0].tid for cf, _ in mads if cf.mad} == {cap_tid}
        assert tids[CmReq] == tids[CmRtu] == tids[CmDreq]
        assert tids[CmReq] & 0xFFFF_FFFF == _swap32(r.ours_comm_id)
        # The top half is the CM agent's hi_tid, which follows the order the
        # port's MAD agents registered in: 2 on Linux, 1 here.
        assert (cap_tid >> 32, tids[CmReq] >> 32) == (2, 1)


@pytest.mark.parametrize(("role", "kind"), CASES, ids=IDS)
def test_rc_packets_are_linuxs(role: str, kind: str) -> None:
    """Every RC packet softrdma sent against Linux's: BTH (QPN and PSN in
    the connection's spaces), RETH, AETH and payload — the client's
    ``rping_rdma_info`` with its own buffers in it."""
    r = replay(role, kind)
    rc = [(cf, t) for cf, t in r.pairs if cf.mad is None]
    assert rc
    peer_qpn = (cap_req() if role == "server" else cap_rep()).local_qpn
    for cf, t in rc:
        theirs, ours = cf.packet, t.packet
        assert ours.bth == theirs.bth._replace(dest_qp=peer_qpn, psn=r.map_psn(cf)), cf
        assert ours.reth == theirs.reth, cf  # the server's: the peer's buffers, as captured
        assert ours.aeth == theirs.aeth, cf  # syndrome and MSN
        assert (ours.deth, ours.immdt, ours.ieth, ours.atmeth, ours.atmack) == (None,) * 5
        if role == "client" and ours.bth.opcode == Opcode.RC_SEND_ONLY:
            info, cap_info = (
                RpingRdmaInfo.unpack(bytes(ours.payload)),
                RpingRdmaInfo.unpack(bytes(theirs.payload)),
            )
            assert len(ours.payload) == len(theirs.payload) == 16
            assert info.size == cap_info.size == SIZE
        else:
            assert bytes(ours.payload) == bytes(theirs.payload), cf
    assert {t.packet.aeth.syndrome for _, t in rc if t.packet.aeth} == {AETH_ACK}
    # softrdma's rping posts its REG_MRs unsignaled in front of the first SEND
    # (rping registers with ibv_reg_mr instead): local work requests, which
    # put nothing on the wire and take no PSN — the first request carries the
    # starting PSN the CM exchanged, as Linux's did.
    first = next(t for cf, t in rc if opcode_info(t.packet.bth.opcode).is_request)
    assert first.packet.bth.psn == r.psn_start[r.ours]


def test_server_reads_and_writes_the_advertised_buffers() -> None:
    """softrdma's server: READs 64 bytes at the (buf, rkey) the Linux client
    advertised, WRITEs the 64 bytes of the ping there, go-aheads of zeros."""
    r = replay("server", "cpu")
    infos = [RpingRdmaInfo.unpack(bytes(rf.packet.payload)) for cf, rf in r.delivered
             if rf.packet.bth.opcode == Opcode.RC_SEND_ONLY]  # fmt: skip
    start, sink = infos[0], infos[1]
    assert infos == [start, sink] * COUNT and start.size == sink.size == SIZE
    ops = [t.packet for _, t in r.pairs if t.packet.bth.dest_qp != 1]
    reads = [p for p in ops if p.bth.opcode == Opcode.RC_RDMA_READ_REQUEST]
    writes = [p for p in ops if p.bth.opcode == Opcode.RC_RDMA_WRITE_ONLY]
    sends = [p for p in ops if p.bth.opcode == Opcode.RC_SEND_ONLY]
    assert [(p.reth.va, p.reth.rkey, p.reth.dma_len) for p in reads if p.reth] == [
        (start.buf, start.rkey, SIZE)] * COUNT  # fmt: skip
    assert [(p.reth.va, p.reth.rkey, p.reth.dma_len) for p in writes if p.reth] == [
        (sink.buf, sink.rkey, SIZE)] * COUNT  # fmt: skip
    assert [bytes(p.payload) for p in writes] == [ping_pattern(i, 65 + i, SIZE) for i in range(3)]
    assert [bytes(p.payload) for p in sends] == [bytes(16)] * 2 * COUNT


@pytest.mark.parametrize("kind", KINDS)
def test_client_advertises_its_own_buffers(kind: str) -> None:
    """softrdma's client: each SEND is a ``rping_rdma_info`` for its start
    buffer, then its sink — their DMA addresses (the kernel address on the
    CPU-copy device, an IOVA behind the IOMMU) and fast-registration keys."""
    r = replay("client", kind)
    sends = [RpingRdmaInfo.unpack(bytes(t.packet.payload)) for cf, t in r.pairs
             if t.packet.bth.opcode == Opcode.RC_SEND_ONLY]  # fmt: skip
    assert sends == r.proc.cb.sent
    start_kva, start_dma = r.proc.cb.addresses["start_buf"]
    sink_kva, sink_dma = r.proc.cb.addresses["rdma_buf"]
    assert [(i.buf, i.size) for i in sends] == [(start_dma, SIZE), (sink_dma, SIZE)] * COUNT
    assert len({i.rkey for i in sends}) == 2
    if kind == "cpu":
        assert (start_dma, sink_dma) == (start_kva, sink_kva)
    else:
        assert start_dma < 1 << 32 and sink_dma < 1 << 32
    # the server's READ and WRITE the peer played named them, and the client saw its data back
    reths = [(rf.packet.reth.va, rf.packet.reth.rkey) for _, rf in r.delivered if rf.packet.reth]
    assert reths == [(s.buf, s.rkey) for s in sends]
