"""The fabric's pcap tap: round trips through PcapReader, and tshark decodes it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from softrdma.fabric.inproc import Fabric, Faults
from softrdma.fabric.pcap import LINKTYPE_ETHERNET, PcapReader, PcapWriter, read_pcap
from softrdma.transport.opcodes import Opcode
from softrdma.transport.roce import decode_roce_v2
from tests.tshark import bth_fields, needs_tshark

from .ports import make_frame, make_port


def test_fabric_tap_records_every_frame_as_transmitted(tmp_path: Path) -> None:
    path = tmp_path / "fabric.pcap"
    fabric = Fabric(seed=7)
    a = make_port(fabric, "10.0.0.1")
    b = make_port(fabric, "10.0.0.2")
    tap = fabric.tap(path)
    fabric.set_faults(a, b, corrupt=1.0)
    fabric.drop_when(lambda f: decode_roce_v2(f).packet.bth.psn == 2)
    sent: list[tuple[int, bytes]] = []
    for psn in range(5):
        f = make_frame(a, b, psn=psn, payload=bytes(psn * 10))
        sent.append((round(fabric.loop.now * 1e9), f))
        fabric.transmit(a, f)
        fabric.loop.run(until=fabric.loop.now + 1.5e-6)
    f = make_frame(b, "10.9.9.9", psn=99)  # unroutable: still on b's wire
    sent.append((round(fabric.loop.now * 1e9), f))
    fabric.transmit(b, f)
    fabric.loop.run()
    assert tap.frames == 6 and fabric.taps == [tap]
    tap.close()
    assert tap.closed and fabric.taps == []
    tap.close()  # idempotent
    with PcapReader(path) as r:
        assert r.nanosecond and r.linktype == LINKTYPE_ETHERNET
        recs = list(r)
    # intact (the tap sits before the faults), dropped and unroutable ones included
    assert [(x.ts_ns, x.data) for x in recs] == sent
    assert [x.orig_len for x in recs] == [len(f) for _, f in sent]
    assert [x.ts_ns for x in recs] == [0, 1500, 3000, 4500, 6000, 7500]
    assert len(b.received) == 4
    assert all(f not in {s for _, s in sent} for f in b.frames)  # they were corrupted


def test_port_tap_sees_its_tx_and_rx_and_closes_on_detach(tmp_path: Path) -> None:
    path = tmp_path / "b.pcap"
    fabric = Fabric(link_rate=0, latency=2e-6)
    a = make_port(fabric, "10.0.0.1")
    b = make_port(fabric, "10.0.0.2")
    c = make_port(fabric, "10.0.0.3")
    tap = fabric.tap(path, port=b, epoch_ns=1_700_000_000 * 10**9)
    fabric.set_faults(a, b, duplicate=1.0)
    fabric.transmit(a, make_frame(a, b, psn=1))  # rx twice
    fabric.transmit(a, make_frame(a, c, psn=2))  # not b's
    fabric.transmit(b, make_frame(b, c, psn=3))  # tx
    fabric.loop.run()
    assert fabric.taps == [tap]
    fabric.detach(b)
    assert tap.closed and fabric.taps == []
    recs = list(read_pcap(path))
    got = [(r.ts_ns - 1_700_000_000 * 10**9, decode_roce_v2(r.data).packet.bth.psn) for r in recs]
    assert got == [(0, 3), (2000, 1), (2000, 1)]
    assert recs[0].timestamp == pytest.approx(1_700_000_000.0)


def test_tap_to_a_caller_writer_is_only_flushed(tmp_path: Path) -> None:
    buf = io.BytesIO()
    writer = PcapWriter(buf)  # microsecond resolution, the caller's choice
    with Fabric() as fabric:
        a = make_port(fabric, "10.0.0.1")
        b = make_port(fabric, "10.0.0.2")
        t1 = fabric.tap(writer)
        t2 = fabric.tap(tmp_path / "a.pcap", port=a)
        fabric.loop.run(until=0.25)
        fabric.transmit(a, make_frame(a, b, psn=4))
        fabric.loop.run()
    assert t1.closed and t2.closed  # the fabric's context manager closed them
    assert not buf.closed
    writer.write(b"after", ts_ns=10**9)  # still the caller's to use
    recs = list(PcapReader(io.BytesIO(buf.getvalue())))
    assert [r.ts_ns for r in recs] == [250_000_000, 10**9]
    assert len(list(read_pcap(tmp_path / "a.pcap"))) == 1
    # nothing more is captured after close
    fabric.transmit(a, make_frame(a, b, psn=5))
    fabric.loop.run()
    assert len(list(read_pcap(tmp_path / "a.pcap"))) == 1


@needs_tshark
def test_tshark_decodes_tapped_frames_as_infiniband(tmp_path: Path) -> None:
    path = tmp_path / "roce.pcap"
    fabric = Fabric(seed=1, faults=Faults(duplicate=0.5))
    a = make_port(fabric, "192.168.1.10")
    b = make_port(fabric, "192.168.1.20")
    v6a = make_port(fabric, "fd00::10")
    v6b = make_port(fabric, "fd00::20")
    expect: list[tuple[int, int, int]] = []
    with fabric.tap(path):
        for i, (src, dst, op, qp, psn, vlan) in enumerate(
            [
                (a, b, Opcode.RC_SEND_ONLY, 0x000011, 0, None),
                (b, a, Opcode.RC_ACKNOWLEDGE, 0x000012, 0, None),
                (a, b, Opcode.RC_SEND_FIRST, 0xABCDEF, 0xFFFFFF, 100),
                (a, b, Opcode.RC_SEND_LAST, 0xABCDEF, 0, 100),
                (v6a, v6b, Opcode.RC_SEND_ONLY, 0x000123, 12345, None),
                (a, b, Opcode.UD_SEND_ONLY, 0x000001, 7, None),
            ]
        ):
            payload = b"" if op == Opcode.RC_ACKNOWLEDGE else b"p" * 4 * i
            frame = make_frame(src, dst, psn, payload, opcode=op, dest_qp=qp, vlan=vlan)
            fabric.transmit(src, frame)
            expect.append((int(op), qp, psn))
            fabric.loop.run()
        fabric.transmit(a, make_frame(a, b, 9, b"", dest_qp=0x42, vlan=100))
        expect.append((int(Opcode.RC_SEND_ONLY), 0x42, 9))
        fabric.loop.run()
    got = bth_fields(path, "opcode", "destqp", "psn")
    assert got == expect
