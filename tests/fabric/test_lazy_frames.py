"""Lazy serialisation on the in-process fabric: a FabricLink hands the
receiver the frame object and builds bytes only when something looks at
them (a tap, a drop filter, a corruption fault, a bytes-only port)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import pytest

from softrdma.dma.platform import Platform
from softrdma.dma.types import DMA_BIDIRECTIONAL
from softrdma.drivers.roce import RoceDevice
from softrdma.drivers.rxe import SoftRoce
from softrdma.fabric import inproc, inproc_link
from softrdma.fabric.inproc import Fabric
from softrdma.fabric.pcap import PcapReader
from softrdma.memory.host import Host, MiB
from softrdma.transport.headers import Reth
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.roce import RoceFrame, decode_roce_v2, encode_roce_v2
from softrdma.verbs.dma import ib_dma_map_single
from softrdma.verbs.enums import IbMtu, IbPdFlags, IbQpType, IbSendFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.qp import QpCap, QpInitAttr, connect_qp
from softrdma.verbs.wr import RdmaWR, Sge

from .ports import make_port

MSG = 256 * 1024


@dataclass
class Recorder:
    """A LinkReceiver that keeps what it is given."""

    frames: list[RoceFrame] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def receive_roce(self, frame: RoceFrame) -> None:
        self.frames.append(frame)

    def receive_error(self, reason: str) -> None:
        self.errors.append(reason)


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the frames encoded by the fabric and its links, and fails on
    any decode of a frame the fabric carried."""
    count = [0]

    def counting(frame: RoceFrame) -> bytes:
        count[0] += 1
        return encode_roce_v2(frame)

    monkeypatch.setattr(inproc, "encode_roce_v2", counting)
    monkeypatch.setattr(inproc_link, "encode_roce_v2", counting)
    yield count


def _write_pair(fabric: Fabric, data: bytes) -> tuple[SoftRoce, SoftRoce, int, list[IbWcStatus]]:
    """Two SoftRoce devices; ``data`` written from the first to the second
    with one RDMA WRITE at MTU 4096. Returns both devices, the target
    buffer's DMA address and the completion statuses."""
    ends = []
    for ip in ("10.0.0.1", "10.0.0.2"):
        host = Host(8 * MiB, name=ip)
        dev = SoftRoce(Platform(host, swiotlb_size=None), fabric, ip, netdev_mtu=9000)
        pd = dev.alloc_pd(IbPdFlags.UNSAFE_GLOBAL_RKEY)
        cq = dev.create_cq(16)
        qp = dev.create_qp(pd, QpInitAttr(IbQpType.RC, cq, cq, QpCap(max_send_wr=8)))
        kva = host.kmalloc(len(data))
        dma = ib_dma_map_single(dev, kva, len(data), DMA_BIDIRECTIONAL)
        ends.append((dev, pd, cq, qp, kva, dma, host))
    (da, pda, cqa, qpa, kva_a, dma_a, ha), (db, pdb, _, qpb, _, dma_b, _) = ends
    for x, y in ((qpa, qpb), (qpb, qpa)):
        connect_qp(x, dest_qp_num=y.qp_num, dgid=y.device.query_gid(), path_mtu=IbMtu.MTU_4096)
    ha.cpu_write(kva_a, data)
    wr = RdmaWR(
        1,
        IbWrOpcode.RDMA_WRITE,
        (Sge(dma_a, len(data), pda.local_dma_lkey),),
        send_flags=IbSendFlags.SIGNALED,
        remote_addr=dma_b,
        rkey=pdb.unsafe_global_rkey,
    )
    qpa.post_send(wr)
    statuses: list[IbWcStatus] = []
    while not statuses:
        statuses = [wc.status for wc in cqa.poll(1)]
    return da, db, dma_b, statuses


def _read(dev: SoftRoce, dma: int, n: int) -> bytes:
    return bytes(dev.dma_device.dma_read(dma, n))


def test_no_tap_no_encoding(encodes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    decodes = [0]

    def counting_decode(frame: bytes) -> RoceFrame:
        decodes[0] += 1
        return decode_roce_v2(frame)

    monkeypatch.setattr(inproc_link, "decode_roce_v2", counting_decode)
    fabric = Fabric(link_rate=0)
    data = bytes(range(256)) * (MSG // 256)
    _a, b, dma_b, statuses = _write_pair(fabric, data)
    assert statuses == [IbWcStatus.SUCCESS]
    assert _read(b, dma_b, MSG) == data
    assert fabric.stats.sent == fabric.stats.delivered > MSG // 4096
    assert encodes[0] == 0 and decodes[0] == 0


def test_tap_frames_are_real_and_byte_exact(encodes: list[int]) -> None:
    """With a tap every frame is built once, and it is exactly the encoding
    of the object the receiver got."""
    fabric = Fabric(link_rate=0)
    out = io.BytesIO()
    tap = fabric.tap(out)
    data = bytes(range(251)) * (MSG // 251 + 1)
    data = data[:MSG]
    _a, b, dma_b, statuses = _write_pair(fabric, data)
    assert statuses == [IbWcStatus.SUCCESS] and _read(b, dma_b, MSG) == data
    tap.writer.flush()
    recs = list(PcapReader(io.BytesIO(out.getvalue())))
    assert len(recs) == fabric.stats.sent == encodes[0]
    payload = b"".join(bytes(decode_roce_v2(r.data).packet.payload) for r in recs)
    assert payload == data  # ICRCs check, and the bytes are the data
    assert fabric.stats.as_dict()["delivered"] == len(recs)


def test_lengths_and_ids_match_the_encoding() -> None:
    """The length the link declares for the link-rate clock and the port
    counters is the encoded one; IP IDs count per destination."""
    fabric = Fabric(latency=0, link_rate=8e9)  # 1 ns per byte
    rec = Recorder()
    link = fabric.open_link("10.0.0.1", Recorder(), mtu=4200)
    peer = fabric.open_link("10.0.0.2", rec, mtu=4200)
    att = fabric.attachment(link)
    pkts = [
        Packet.build(Opcode.RC_SEND_ONLY, dest_qp=5, psn=1, payload=b"x" * n)
        for n in (0, 1, 7, 4096)
    ] + [
        Packet.build(
            Opcode.RC_RDMA_WRITE_ONLY, dest_qp=5, psn=2, payload=b"y" * 9, reth=Reth(1, 2, 9)
        )
    ]
    total = 0
    for p in pkts:
        t0 = att.tx_free
        link.transmit(p, IPv4Address("10.0.0.2").packed, 0xC000)
        n = round((att.tx_free - max(t0, fabric.loop.now)) * 1e9)
        assert n == len(encode_roce_v2(rec_frame(p, len(rec.frames))))
        total += n
    fabric.loop.run()
    assert att.stats.tx_bytes == total == fabric.attachment(peer).stats.rx_bytes
    assert [f.ip_id for f in rec.frames] == list(range(len(pkts)))
    assert [f.packet for f in rec.frames] == pkts


def rec_frame(p: Packet, ip_id: int) -> RoceFrame:
    return RoceFrame(
        p,
        IPv4Address("10.0.0.1").packed,
        IPv4Address("10.0.0.2").packed,
        0xC000,
        eth_dst=b"\x02\x00\x0a\x00\x00\x02",
        eth_src=b"\x02\x00\x0a\x00\x00\x01",
        ip_id=ip_id,
    )


def test_payload_is_taken_at_transmit() -> None:
    """A payload that views sender memory is copied when transmitted: a
    later write to that memory does not reach the receiver."""
    fabric = Fabric(latency=5e-6)
    rec = Recorder()
    link = fabric.open_link("10.0.0.1", Recorder())
    fabric.open_link("10.0.0.2", rec)
    mem = bytearray(b"before!!")
    sent = Packet.build(Opcode.RC_SEND_ONLY, dest_qp=3, psn=0, payload=memoryview(mem))
    link.transmit(sent, IPv4Address("10.0.0.2").packed, 0xC001)
    mem[:] = b"after!!!"
    fabric.loop.run()
    (got,) = rec.frames
    assert bytes(got.packet.payload) == b"before!!"
    assert got.packet is not sent  # the receiver has a packet of its own


def test_duplicates_deliver_the_same_intact_frame() -> None:
    fabric = Fabric(seed=3)
    rec = Recorder()
    link = fabric.open_link("10.0.0.1", Recorder())
    fabric.open_link("10.0.0.2", rec)
    fabric.set_faults(duplicate=1.0)
    p = Packet.build(Opcode.RC_SEND_ONLY, dest_qp=3, psn=7, payload=b"abcd")
    link.transmit(p, IPv4Address("10.0.0.2").packed, 0xC001)
    fabric.loop.run()
    assert len(rec.frames) == 2 and rec.frames[0] is rec.frames[1]
    assert rec.frames[0].packet == p and fabric.stats.duplicated == 1


def test_bytes_only_ports_get_the_encoding(encodes: list[int]) -> None:
    """A port without a frame-object receiver (a raw FabricPort) gets the
    frame's bytes, duplicates included."""
    fabric = Fabric(seed=1)
    link = fabric.open_link("10.0.0.1", Recorder())
    raw = make_port(fabric, "10.0.0.2")
    fabric.set_faults(duplicate=1.0)
    p = Packet.build(Opcode.RC_SEND_ONLY, dest_qp=3, psn=7, payload=b"abcd")
    link.transmit(p, IPv4Address("10.0.0.2").packed, 0xC001)
    fabric.loop.run()
    assert len(raw.frames) == 2 and raw.frames[0] == raw.frames[1]
    assert decode_roce_v2(raw.frames[0]).packet == p
    assert encodes[0] == 1


def test_corruption_is_real_and_counted(encodes: list[int]) -> None:
    fabric = Fabric(seed=5)
    rec = Recorder()
    link = fabric.open_link("10.0.0.1", Recorder())
    fabric.open_link("10.0.0.2", rec)
    fabric.set_faults(corrupt=1.0)
    for psn in range(20):
        p = Packet.build(Opcode.RC_SEND_ONLY, dest_qp=3, psn=psn, payload=bytes(64))
        link.transmit(p, IPv4Address("10.0.0.2").packed, 0xC001)
    fabric.loop.run()
    assert rec.frames == [] and len(rec.errors) == 20 == fabric.stats.corrupted
    assert encodes[0] == 20


def _lossy_run(seed: int, tap: bool) -> tuple[object, ...]:
    fabric = Fabric(seed=seed)
    fabric.set_faults(drop=0.05, duplicate=0.05, reorder=0.05, corrupt=0.05)
    if tap:
        fabric.tap(io.BytesIO())
    data = bytes(range(256)) * (64 * 1024 // 256)
    a, b, dma_b, statuses = _write_pair(fabric, data)
    assert _read(b, dma_b, len(data)) == data
    return (
        statuses,
        fabric.stats.as_dict(),
        dict(a.stats),
        dict(b.stats),
        fabric.loop.now,
    )


@pytest.mark.parametrize("seed", [1, 2])
def test_same_seed_same_result_on_both_paths(seed: int) -> None:
    """Faults draw the same numbers whether or not frames are encoded: a run
    with a tap (every frame built) and one without match exactly."""
    lazy = _lossy_run(seed, tap=False)
    assert lazy == _lossy_run(seed, tap=True)
    assert lazy == _lossy_run(seed, tap=False)


def _eager(fabric: Fabric, src: inproc.PortAttachment, rf: RoceFrame, n: int) -> float:
    """The path before lazy serialisation: encode at transmit, deliver
    bytes, decode at the receiver."""
    frame = encode_roce_v2(rf)
    assert len(frame) == n
    return fabric._xmit(src, frame)


def _captured_run(seed: int) -> tuple[bytes, tuple[object, ...]]:
    fabric = Fabric(seed=seed)
    fabric.set_faults(drop=0.03, duplicate=0.03, reorder=0.03, corrupt=0.03)
    out = io.BytesIO()
    tap = fabric.tap(out)
    data = bytes(range(256)) * (64 * 1024 // 256)
    a, b, dma_b, statuses = _write_pair(fabric, data)
    assert _read(b, dma_b, len(data)) == data
    tap.writer.flush()
    return out.getvalue(), (statuses, fabric.stats.as_dict(), dict(a.stats), dict(b.stats))


def test_capture_and_outcome_match_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frame objects with a tap and faults give the same pcap, byte for
    byte, and the same counters as encoding every frame at transmit and
    decoding it at the receiver."""
    lazy = _captured_run(11)
    monkeypatch.setattr(Fabric, "_xmit_roce", _eager)
    eager = _captured_run(11)
    assert lazy[0] == eager[0] and lazy[1] == eager[1]


def test_devices_do_not_change_what_they_receive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every frame is delivered twice (duplicate=1.0) as the same object: the
    receiving device must leave it as it was, packet and payload included."""
    seen: list[tuple[RoceFrame, bytes]] = []
    original = RoceDevice.receive_roce

    def recording(self: RoceDevice, rf: RoceFrame) -> None:
        seen.append((rf, encode_roce_v2(rf)))
        original(self, rf)

    monkeypatch.setattr(RoceDevice, "receive_roce", recording)
    fabric = Fabric(seed=4)
    fabric.set_faults(duplicate=1.0)
    data = bytes(range(256)) * (32 * 1024 // 256)
    _a, b, dma_b, statuses = _write_pair(fabric, data)
    assert statuses == [IbWcStatus.SUCCESS] and _read(b, dma_b, len(data)) == data
    fabric.loop.run()  # the last duplicates too
    assert len(seen) == fabric.stats.delivered == 2 * fabric.stats.sent > 0
    assert all(encode_roce_v2(rf) == wire for rf, wire in seen)


def test_transmit_roce_from_a_port_attachment() -> None:
    """The public entry point: a frame object from any attached port, to a
    frame-object receiver and to a bytes-only port."""
    fabric = Fabric()
    src = make_port(fabric, "10.0.0.1")
    rec = Recorder()
    fabric.open_link("10.0.0.2", rec)
    raw = make_port(fabric, "10.0.0.3")
    att = fabric.attachment(src)
    p = Packet.build(Opcode.RC_SEND_ONLY, dest_qp=3, psn=1, payload=b"xyz!")
    for dst in ("10.0.0.2", "10.0.0.3"):
        rf = RoceFrame.build(p, "10.0.0.1", dst, 0xC000, eth_src=src.mac)
        att.transmit_roce(rf, len(encode_roce_v2(rf)))
    fabric.loop.run()
    assert [f.packet for f in rec.frames] == [p]
    assert [decode_roce_v2(f).packet for f in raw.frames] == [p]
    assert fabric.stats.delivered == 2
