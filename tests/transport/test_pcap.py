"""softrdma.fabric.pcap: classic libpcap reader/writer."""

from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.utils import PcapReader as ScapyPcapReader
from scapy.utils import RawPcapReader

from softrdma.fabric.pcap import (
    LINKTYPE_ETHERNET,
    PCAP_MAGIC_NSEC,
    PCAP_MAGIC_USEC,
    PcapError,
    PcapReader,
    PcapRecord,
    PcapWriter,
    read_pcap,
    write_pcap,
)

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "captures"

records = st.lists(
    st.builds(
        lambda sec, us, data: PcapRecord(sec * 10**9 + us * 1000, data, len(data)),
        st.integers(0, 2**32 - 1),
        st.integers(0, 999_999),
        st.binary(max_size=200),
    ),
    max_size=10,
)


@given(records)
def test_roundtrip_usec(recs: list[PcapRecord]) -> None:
    buf = io.BytesIO()
    write_pcap(buf, recs)
    raw = buf.getvalue()
    assert struct.unpack_from("<I", raw)[0] == PCAP_MAGIC_USEC
    assert list(PcapReader(io.BytesIO(raw))) == recs


@given(records)
def test_roundtrip_nsec_and_big_endian(recs: list[PcapRecord]) -> None:
    buf = io.BytesIO()
    with PcapWriter(buf, nanosecond=True) as w:
        for r in recs:
            w.write_record(r)
    raw = buf.getvalue()
    reader = PcapReader(io.BytesIO(raw))
    assert reader.nanosecond and reader.byteorder == "<" and reader.version == (2, 4)
    assert list(reader) == recs
    # byte-swap every header field: a big-endian writer's file
    swapped = bytearray(struct.pack(">IHHiIII", *struct.unpack_from("<IHHiIII", raw)))
    off = 24
    while off < len(raw):
        fields = struct.unpack_from("<IIII", raw, off)
        swapped += struct.pack(">IIII", *fields) + raw[off + 16 : off + 16 + fields[2]]
        off += 16 + fields[2]
    rb = PcapReader(io.BytesIO(bytes(swapped)))
    assert rb.byteorder == ">" and rb.nanosecond
    assert list(rb) == recs


def test_scapy_reads_our_files(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    with PcapWriter(path) as w:
        w.write(b"\x02" * 60, ts_ns=1_700_000_000_123_456_000)
        w.write(b"\x03" * 70, ts_ns=1_700_000_001_000_001_000)
    got = list(RawPcapReader(str(path)))
    assert [d for d, _ in got] == [b"\x02" * 60, b"\x03" * 70]
    assert (got[0][1].sec, got[0][1].usec) == (1_700_000_000, 123_456)
    with ScapyPcapReader(str(path)) as sr:
        assert sr.linktype == LINKTYPE_ETHERNET


def test_snaplen_truncates(tmp_path: Path) -> None:
    path = tmp_path / "s.pcap"
    with PcapWriter(path, snaplen=10) as w:
        w.write(bytes(range(20)), ts_ns=0)
    (rec,) = read_pcap(path)
    assert rec.data == bytes(range(10)) and rec.orig_len == 20 and rec.timestamp == 0.0


def test_reads_captures_like_scapy() -> None:
    for p in sorted(CAPTURES.glob("*.pcap")):
        ours = list(read_pcap(p))
        with PcapReader(p) as r:
            snaplen, nano = r.snaplen, r.nanosecond
        theirs = list(RawPcapReader(str(p)))
        assert [r.data for r in ours] == [d for d, _ in theirs]
        # scapy's "usec" holds nanoseconds in a nanosecond capture
        scale = 1 if nano else 1000
        second = 10**9 if nano else 10**6
        assert [r.ts_ns // scale for r in ours] == [m.sec * second + m.usec for _, m in theirs]
        # and our writer reproduces the file byte for byte
        assert snaplen in (65536, 262144)  # tcpdump's defaults, old and new
        buf = io.BytesIO()
        write_pcap(buf, ours, snaplen=snaplen, nanosecond=nano)
        assert buf.getvalue() == p.read_bytes()


def _sample() -> bytes:
    buf = io.BytesIO()
    write_pcap(buf, [PcapRecord(10**9, b"abcdef", 6), PcapRecord(2 * 10**9, b"xyz", 3)])
    return buf.getvalue()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "empty"),
        (b"\xd4\xc3", "empty"),
        (b"GARBAGE!" * 4, "not a pcap"),
        (b"\x0a\x0d\x0d\x0a" + bytes(28), "pcapng"),
        (struct.pack("<I", PCAP_MAGIC_USEC) + bytes(8), "truncated pcap global header"),
        (struct.pack("<IHHiIII", PCAP_MAGIC_NSEC, 1, 0, 0, 0, 65535, 1), "version"),
    ],
)
def test_bad_headers(raw: bytes, match: str) -> None:
    with pytest.raises(PcapError, match=match):
        PcapReader(io.BytesIO(raw))


def test_truncated_records() -> None:
    raw = _sample()
    for cut in range(25, len(raw)):
        if cut in (24 + 16 + 6, len(raw)):
            continue  # record boundary: a valid shorter file
        with pytest.raises(PcapError, match="truncated"):
            list(PcapReader(io.BytesIO(raw[:cut])))
    assert len(list(PcapReader(io.BytesIO(raw[: 24 + 16 + 6])))) == 1


def test_absurd_record_length() -> None:
    raw = bytearray(_sample())
    raw[24 + 8 : 24 + 12] = struct.pack("<I", 1 << 30)
    with pytest.raises(PcapError, match="exceeds"):
        list(PcapReader(io.BytesIO(bytes(raw))))


@given(st.binary(max_size=100))
def test_fuzz_only_pcap_errors(tail: bytes) -> None:
    raw = _sample()[:24] + tail
    with contextlib.suppress(PcapError):
        list(PcapReader(io.BytesIO(raw)))


def test_writer_rejects_negative_time() -> None:
    with pytest.raises(PcapError):
        PcapWriter(io.BytesIO()).write(b"x", ts_ns=-(10**9))
