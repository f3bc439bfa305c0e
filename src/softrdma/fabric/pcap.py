"""Classic libpcap capture files: streaming reader and writer.

Counterpart: libpcap's savefile format (``pcap_open_offline`` /
``pcap_next_ex``, ``pcap_dump_open`` / ``pcap_dump``; ``pcap-savefile(5)``),
as written by tcpdump and read by Wireshark. No kernel counterpart.

Reads both byte orders and both the microsecond (0xA1B2C3D4) and nanosecond
(0xA1B23C4D) magics; writes microsecond (default) or nanosecond files in
native little-endian order with ``LINKTYPE_ETHERNET``. Truncated or garbage
input raises :class:`PcapError`, never a bare ``struct.error``.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Self

from softrdma.errors import SoftRdmaError

__all__ = [
    "LINKTYPE_ETHERNET",
    "PCAP_MAGIC_NSEC",
    "PCAP_MAGIC_USEC",
    "PcapError",
    "PcapReader",
    "PcapRecord",
    "PcapWriter",
    "read_pcap",
    "write_pcap",
]

LINKTYPE_ETHERNET = 1
PCAP_MAGIC_USEC = 0xA1B2C3D4
PCAP_MAGIC_NSEC = 0xA1B23C4D
_PCAPNG_MAGIC = 0x0A0D0D0A
DEFAULT_SNAPLEN = 262144
"""libpcap MAXIMUM_SNAPLEN; also the largest record we accept without complaint."""

_GLOBAL_LE = struct.Struct("<IHHiIII")
_GLOBAL_BE = struct.Struct(">IHHiIII")
_REC_LE = struct.Struct("<IIII")
_REC_BE = struct.Struct(">IIII")

PathOrFile = str | os.PathLike[str] | BinaryIO


class Closing:
    """``with obj:`` closes ``obj`` at the end (readers, writers, taps, the
    fabric)."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PcapError(SoftRdmaError, ValueError):
    """The file is not a classic pcap file, or is truncated or corrupt."""


@dataclass(frozen=True, slots=True)
class PcapRecord:
    """One captured frame: timestamp in nanoseconds since the epoch, the
    captured bytes and the original length on the wire."""

    ts_ns: int
    data: bytes
    orig_len: int

    @property
    def timestamp(self) -> float:
        """Seconds since the epoch, as a float."""
        return self.ts_ns / 1e9


def _open(src: PathOrFile, write: bool) -> tuple[BinaryIO, bool]:
    """The file object, and whether we opened it (and so must close it)."""
    if isinstance(src, str | os.PathLike):
        return (open(src, "wb") if write else open(src, "rb")), True
    return src, False


class PcapReader(Closing):
    """Iterate over the records of a classic pcap file (``pcap_open_offline`` +
    ``pcap_next_ex``). Usable as a context manager; records are read lazily.

    Attributes after opening: ``byteorder`` (``"<"`` or ``">"``),
    ``nanosecond``, ``version`` (major, minor), ``snaplen``, ``linktype``.
    """

    def __init__(self, source: PathOrFile) -> None:
        self._f, self._owned = _open(source, write=False)
        try:
            hdr = self._f.read(_GLOBAL_LE.size)
            if len(hdr) < 4:
                raise PcapError("empty or truncated pcap file (no magic number)")
            (magic,) = struct.unpack_from("<I", hdr)
            if magic in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC):
                self.byteorder = "<"
                gst, self._rec = _GLOBAL_LE, _REC_LE
            else:
                (magic,) = struct.unpack_from(">I", hdr)
                if magic not in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC):
                    if magic == _PCAPNG_MAGIC:
                        raise PcapError("pcapng files are not supported, only classic pcap")
                    raise PcapError(f"not a pcap file (magic {hdr[:4].hex()})")
                self.byteorder = ">"
                gst, self._rec = _GLOBAL_BE, _REC_BE
            if len(hdr) < gst.size:
                raise PcapError(f"truncated pcap global header ({len(hdr)} of {gst.size} bytes)")
            _, major, minor, _, _, snaplen, linktype = gst.unpack(hdr)
            if major != 2:
                raise PcapError(f"unsupported pcap version {major}.{minor}")
        except BaseException:
            self.close()
            raise
        self.nanosecond = magic == PCAP_MAGIC_NSEC
        self.version = (major, minor)
        self.snaplen = snaplen
        self.linktype = linktype & 0x0FFFFFFF  # high bits carry FCS info
        self._limit = max(snaplen, DEFAULT_SNAPLEN)
        self._count = 0

    def __iter__(self) -> Iterator[PcapRecord]:
        rec, f, scale = self._rec, self._f, 1 if self.nanosecond else 1000
        while True:
            rh = f.read(rec.size)
            if not rh:
                return
            if len(rh) < rec.size:
                raise PcapError(f"record {self._count}: truncated record header")
            sec, frac, incl, orig = rec.unpack(rh)
            if incl > self._limit:
                raise PcapError(
                    f"record {self._count}: captured length {incl} exceeds {self._limit}"
                    " (corrupt file?)"
                )
            data = f.read(incl)
            if len(data) < incl:
                raise PcapError(
                    f"record {self._count}: truncated data ({len(data)} of {incl} bytes)"
                )
            self._count += 1
            yield PcapRecord(sec * 1_000_000_000 + frac * scale, data, orig)

    def close(self) -> None:
        """Close the file if this reader opened it."""
        if self._owned:
            self._f.close()


class PcapWriter(Closing):
    """Write a classic pcap file (``pcap_dump_open`` + ``pcap_dump``), little-endian,
    microsecond timestamps unless ``nanosecond``. Frames longer than
    ``snaplen`` are truncated (their ``orig_len`` keeps the full length)."""

    def __init__(
        self,
        dest: PathOrFile,
        *,
        linktype: int = LINKTYPE_ETHERNET,
        snaplen: int = DEFAULT_SNAPLEN,
        nanosecond: bool = False,
    ) -> None:
        self._f, self._owned = _open(dest, write=True)
        self.nanosecond = nanosecond
        self.snaplen = snaplen
        magic = PCAP_MAGIC_NSEC if nanosecond else PCAP_MAGIC_USEC
        self._f.write(_GLOBAL_LE.pack(magic, 2, 4, 0, 0, snaplen, linktype))

    def write(self, data: bytes | bytearray | memoryview, ts_ns: int | None = None) -> None:
        """Append one frame; ``ts_ns`` defaults to the current time."""
        if ts_ns is None:
            ts_ns = time.time_ns()
        sec, ns = divmod(ts_ns, 1_000_000_000)
        frac = ns if self.nanosecond else ns // 1000
        raw = bytes(data)
        orig = len(raw)
        raw = raw[: self.snaplen]
        try:
            hdr = _REC_LE.pack(sec, frac, len(raw), orig)
        except struct.error as e:
            raise PcapError(f"cannot write record with timestamp {ts_ns} ns: {e}") from None
        self._f.write(hdr)
        self._f.write(raw)

    def write_record(self, record: PcapRecord) -> None:
        """Append a :class:`PcapRecord` (its ``orig_len`` is kept)."""
        sec, ns = divmod(record.ts_ns, 1_000_000_000)
        frac = ns if self.nanosecond else ns // 1000
        raw = record.data[: self.snaplen]
        try:
            hdr = _REC_LE.pack(sec, frac, len(raw), max(record.orig_len, len(raw)))
        except struct.error as e:
            raise PcapError(f"cannot write {record!r}: {e}") from None
        self._f.write(hdr)
        self._f.write(raw)

    def flush(self) -> None:
        """Flush buffered output."""
        self._f.flush()

    def close(self) -> None:
        """Flush, and close the file if this writer opened it."""
        self._f.flush()
        if self._owned:
            self._f.close()


def read_pcap(source: PathOrFile) -> Iterator[PcapRecord]:
    """Yield every record of a pcap file (the file is closed at the end)."""
    with PcapReader(source) as r:
        yield from r


def write_pcap(
    dest: PathOrFile,
    records: Iterable[PcapRecord],
    *,
    linktype: int = LINKTYPE_ETHERNET,
    snaplen: int = DEFAULT_SNAPLEN,
    nanosecond: bool = False,
) -> None:
    """Write ``records`` to a new pcap file."""
    with PcapWriter(dest, linktype=linktype, snaplen=snaplen, nanosecond=nanosecond) as w:
        for r in records:
            w.write_record(r)
