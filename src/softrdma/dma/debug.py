"""The DMA-API debug checker (``kernel/dma/debug.c``, CONFIG_DMA_API_DEBUG).

Every device that asks for it has its live mappings tracked: streaming
single / page / scatter-gather mappings and coherent allocations. Misuse is
reported as a :class:`DmaDebugReport` carrying the kernel's message text,
the fields involved and the caller's location (the first frame outside the
DMA API). Reports are collected on the platform's checker; ``strict()``
turns any report into a :class:`DmaDebugError` at the faulty call, and
``capture()`` collects the reports of a block.

Beyond what the kernel can see, the model also checks the device side:
an access to a DMA address outside every live mapping, or against a
mapping's direction, is reported too.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

from softrdma.dma.errors import DmaDebugError
from softrdma.dma.types import DMA_MAPPING_ERROR, DmaDirection, MapType

if TYPE_CHECKING:
    from softrdma.dma.device import Device
    from softrdma.memory.scatterlist import Scatterlist, ScatterlistEntry

log = logging.getLogger("softrdma.dma.debug")

_API_MODULES: set[str] = {"softrdma.dma"}


def register_api_module(prefix: str) -> None:
    """Treat frames of modules under ``prefix`` as DMA-API plumbing, so
    reports name the caller of a wrapper (``ib_dma_map_single``'s caller)
    rather than the wrapper."""
    _API_MODULES.add(prefix)


def caller_location() -> str:
    """``file:line in function`` of the first frame outside the DMA API."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not any(module == p or module.startswith(p + ".") for p in _API_MODULES):
            code = frame.f_code
            return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back
    return "<unknown>"


class DebugKind(enum.Enum):
    """What a report is about; values are short stable identifiers."""

    UNMAP_INVALID_ADDRESS = "unmap-invalid-address"
    UNMAP_NOT_MAPPED = "unmap-not-mapped"
    UNMAP_SIZE_MISMATCH = "unmap-size-mismatch"
    UNMAP_WRONG_FUNCTION = "unmap-wrong-function"
    UNMAP_CPU_ADDRESS_MISMATCH = "unmap-cpu-address-mismatch"
    UNMAP_SG_COUNT_MISMATCH = "unmap-sg-count-mismatch"
    UNMAP_DIRECTION_MISMATCH = "unmap-direction-mismatch"
    MAP_ERROR_NOT_CHECKED = "map-error-not-checked"
    MAP_VMALLOC_AREA = "map-vmalloc-area"
    MAP_INVALID_AREA = "map-invalid-area"
    SYNC_NOT_MAPPED = "sync-not-mapped"
    SYNC_OUT_OF_RANGE = "sync-out-of-range"
    SYNC_DIRECTION_MISMATCH = "sync-direction-mismatch"
    SYNC_READ_ONLY_FOR_CPU = "sync-read-only-for-cpu"
    SYNC_WRITE_ONLY_TO_DEVICE = "sync-write-only-to-device"
    SYNC_SG_COUNT_MISMATCH = "sync-sg-count-mismatch"
    SG_SEGMENT_TOO_LONG = "sg-segment-too-long"
    SG_SEGMENT_ACROSS_BOUNDARY = "sg-segment-across-boundary"
    LEAK = "leak"
    DEVICE_ACCESS_UNMAPPED = "device-access-unmapped"
    DEVICE_ACCESS_DIRECTION = "device-access-direction"
    POOL_BUSY = "pool-busy"


@dataclass(frozen=True)
class DmaDebugReport:
    """One report: the kernel-style ``message`` and its fields."""

    kind: DebugKind
    device: str
    driver: str
    message: str
    location: str
    dma_address: int | None = None
    size: int | None = None
    map_size: int | None = None
    direction: DmaDirection | None = None
    map_direction: DmaDirection | None = None
    map_type: MapType | None = None
    unmap_type: MapType | None = None
    mapped_at: str | None = None
    count: int | None = None
    leaks: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        return self.message


@dataclass(slots=True)
class DebugEntry:
    """``struct dma_debug_entry``: one tracked mapping."""

    type: MapType
    dma: int
    size: int
    direction: DmaDirection
    location: str
    kva: int | None = None
    sg_call_ents: int = 0
    sg_mapped_ents: int = 0
    map_err_checked: bool | None = None  # None: not applicable

    @property
    def end(self) -> int:
        return self.dma + self.size


@dataclass
class _DeviceEntries:
    by_addr: dict[int, list[DebugEntry]] = field(default_factory=dict)
    starts: list[int] = field(default_factory=list)  # sorted, parallel to spans
    spans: list[DebugEntry] = field(default_factory=list)

    def add(self, e: DebugEntry) -> None:
        self.by_addr.setdefault(e.dma, []).append(e)
        i = bisect.bisect_right(self.starts, e.dma)
        self.starts.insert(i, e.dma)
        self.spans.insert(i, e)

    def remove(self, e: DebugEntry) -> None:
        bucket = self.by_addr[e.dma]
        bucket.remove(e)
        if not bucket:
            del self.by_addr[e.dma]
        i = bisect.bisect_left(self.starts, e.dma)
        while self.spans[i] is not e:
            i += 1
        del self.starts[i]
        del self.spans[i]

    def containing(self, addr: int) -> DebugEntry | None:
        """A live entry with ``dma <= addr < end`` (bucket_find_contain)."""
        i = bisect.bisect_right(self.starts, addr) - 1
        while i >= 0:
            e = self.spans[i]
            if e.dma <= addr < e.end:
                return e
            i -= 1
        return None

    def __len__(self) -> int:
        return len(self.spans)


def _fmt(addr: int) -> str:
    return f"0x{addr:016x}"


class DmaDebug:
    """The checker of one platform (the kernel keeps one for the machine)."""

    def __init__(self) -> None:
        self.reports: list[DmaDebugReport] = []
        self._devices: dict[int, _DeviceEntries] = {}
        self._strict = 0
        self._captures: list[list[DmaDebugReport]] = []

    # -- reports -----------------------------------------------------------

    def report(self, dev: Device | None, kind: DebugKind, text: str, **fields: object) -> None:
        """Record a report with the kernel's ``DMA-API: <driver> <dev>: <text>``."""
        device = dev.name if dev is not None else "-"
        driver = dev.driver if dev is not None else "-"
        rep = DmaDebugReport(
            kind=kind,
            device=device,
            driver=driver,
            message=f"DMA-API: {driver} {device}: {text}",
            location=caller_location(),
            **fields,  # type: ignore[arg-type]
        )
        self.reports.append(rep)
        for captured in self._captures:
            captured.append(rep)
        log.warning("%s (at %s)", rep.message, rep.location)
        if self._strict:
            raise DmaDebugError(rep)

    @contextlib.contextmanager
    def strict(self) -> Iterator[None]:
        """Within the block, any report raises :class:`DmaDebugError`."""
        self._strict += 1
        try:
            yield
        finally:
            self._strict -= 1

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[DmaDebugReport]]:
        """Collect the reports made within the block."""
        captured: list[DmaDebugReport] = []
        self._captures.append(captured)
        try:
            yield captured
        finally:
            self._captures.remove(captured)

    def clear(self) -> None:
        self.reports.clear()

    # -- bookkeeping -------------------------------------------------------

    def _entries(self, dev: Device) -> _DeviceEntries:
        entries = self._devices.get(id(dev))
        if entries is None:
            entries = self._devices[id(dev)] = _DeviceEntries()
        return entries

    def live_mappings(self, dev: Device) -> list[DebugEntry]:
        """The device's tracked mappings, by DMA address."""
        return list(self._entries(dev).spans)

    # -- map side ----------------------------------------------------------

    def check_map_single(self, dev: Device, kva: int, size: int) -> None:
        """``debug_dma_map_single``: the buffer must be in the direct map."""
        host = dev.host
        if host.is_vmalloc_addr(kva):
            self.report(
                dev,
                DebugKind.MAP_VMALLOC_AREA,
                f"device driver maps memory from vmalloc area [addr={kva:#x}] [len={size}]",
                size=size,
            )
        elif not host.virt_addr_valid(kva) or not host.virt_addr_valid(kva + max(size, 1) - 1):
            self.report(
                dev,
                DebugKind.MAP_INVALID_AREA,
                f"device driver maps memory from invalid area [addr={kva:#x}] [len={size}]",
                size=size,
            )

    def add_mapping(
        self,
        dev: Device,
        mtype: MapType,
        dma: int,
        size: int,
        direction: DmaDirection,
        kva: int | None = None,
    ) -> None:
        """``debug_dma_map_page`` / ``debug_dma_alloc_coherent``: track a
        mapping that succeeded."""
        if dma == DMA_MAPPING_ERROR:
            return
        checked = False if mtype in (MapType.SINGLE, MapType.PAGE) else None
        self._entries(dev).add(
            DebugEntry(
                mtype, dma, size, direction, caller_location(), kva=kva, map_err_checked=checked
            )
        )

    def mapping_error(self, dev: Device, dma: int) -> None:
        """``debug_dma_mapping_error``: mark the mapping as checked."""
        for e in self._entries(dev).by_addr.get(dma, ()):
            if e.map_err_checked is False:
                e.map_err_checked = True
                return

    def map_sg(
        self, dev: Device, sgl: Scatterlist, nents: int, mapped: int, direction: DmaDirection
    ) -> None:
        """``debug_dma_map_sg``: one entry per DMA segment, plus the
        segment-length and boundary checks of CONFIG_DMA_API_DEBUG_SG."""
        if not mapped:
            return
        where = caller_location()
        entries = self._entries(dev)
        for s in sgl.entries[:mapped]:
            assert s.dma_address is not None
            start, length = s.dma_address, s.dma_length
            if length > dev.max_seg_size:
                self.report(
                    dev,
                    DebugKind.SG_SEGMENT_TOO_LONG,
                    f"mapping sg segment longer than device claims to support "
                    f"[len={length}] [max={dev.max_seg_size}]",
                    dma_address=start,
                    size=length,
                )
            boundary = dev.seg_boundary_mask
            if (start | boundary) != ((start + length - 1) | boundary):
                self.report(
                    dev,
                    DebugKind.SG_SEGMENT_ACROSS_BOUNDARY,
                    f"mapping sg segment across boundary [start={_fmt(start)}] "
                    f"[end={_fmt(start + length - 1)}] [boundary={_fmt(boundary)}]",
                    dma_address=start,
                    size=length,
                )
            entries.add(
                DebugEntry(
                    MapType.SG,
                    start,
                    length,
                    direction,
                    where,
                    sg_call_ents=nents,
                    sg_mapped_ents=mapped,
                )
            )

    # -- unmap side --------------------------------------------------------

    def unmap(
        self,
        dev: Device,
        mtype: MapType,
        dma: int,
        size: int,
        direction: DmaDirection,
        kva: int | None = None,
        sg_call_ents: int = 0,
    ) -> None:
        """``check_unmap``: the unmap must match a live mapping exactly."""
        entries = self._entries(dev)
        bucket = entries.by_addr.get(dma)
        if not bucket:
            if dma == DMA_MAPPING_ERROR:
                self.report(
                    dev,
                    DebugKind.UNMAP_INVALID_ADDRESS,
                    "device driver tries to free an invalid DMA memory address",
                    dma_address=dma,
                )
            else:
                self.report(
                    dev,
                    DebugKind.UNMAP_NOT_MAPPED,
                    f"device driver tries to free DMA memory it has not allocated "
                    f"[device address={_fmt(dma)}] [size={size} bytes]",
                    dma_address=dma,
                    size=size,
                    unmap_type=mtype,
                )
            return

        def score(e: DebugEntry) -> int:
            return (
                (e.size == size)
                + (e.type == mtype)
                + (e.direction == direction)
                + (e.sg_call_ents == sg_call_ents)
            )

        e = max(bucket, key=score)
        entries.remove(e)
        common = {
            "dma_address": dma,
            "map_size": e.size,
            "size": size,
            "map_type": e.type,
            "unmap_type": mtype,
            "mapped_at": e.location,
            "map_direction": e.direction,
            "direction": direction,
        }
        if e.size != size:
            self.report(
                dev,
                DebugKind.UNMAP_SIZE_MISMATCH,
                f"device driver frees DMA memory with different size "
                f"[device address={_fmt(dma)}] [map size={e.size} bytes] "
                f"[unmap size={size} bytes]",
                **common,
            )
        if e.type != mtype and {e.type, mtype} != {MapType.SINGLE, MapType.PAGE}:
            # The kernel tracks single and page mappings alike.
            self.report(
                dev,
                DebugKind.UNMAP_WRONG_FUNCTION,
                f"device driver frees DMA memory with wrong function "
                f"[device address={_fmt(dma)}] [size={e.size} bytes] "
                f"[mapped as {e.type.value}] [unmapped as {mtype.value}]",
                **common,
            )
        if e.type == MapType.COHERENT and kva is not None and e.kva != kva:
            self.report(
                dev,
                DebugKind.UNMAP_CPU_ADDRESS_MISMATCH,
                f"device driver frees DMA memory with different CPU address "
                f"[device address={_fmt(dma)}] [size={e.size} bytes] "
                f"[cpu alloc address={_fmt(e.kva or 0)}] [cpu free address={_fmt(kva)}]",
                **common,
            )
        if e.type == MapType.SG and mtype == MapType.SG and e.sg_call_ents != sg_call_ents:
            self.report(
                dev,
                DebugKind.UNMAP_SG_COUNT_MISMATCH,
                f"device driver frees DMA sg list with different entry count "
                f"[map count={e.sg_call_ents}] [unmap count={sg_call_ents}]",
                count=sg_call_ents,
                **common,
            )
        if e.direction != direction:
            self.report(
                dev,
                DebugKind.UNMAP_DIRECTION_MISMATCH,
                f"device driver frees DMA memory with different direction "
                f"[device address={_fmt(dma)}] [size={e.size} bytes] "
                f"[mapped with {e.direction.kernel_name}] "
                f"[unmapped with {direction.kernel_name}]",
                **common,
            )
        if e.map_err_checked is False:
            self.report(
                dev,
                DebugKind.MAP_ERROR_NOT_CHECKED,
                f"device driver failed to check map error"
                f"[device address={_fmt(dma)}] [size={e.size} bytes] "
                f"[mapped as {e.type.value}]",
                **common,
            )

    def _mapped_segments(
        self, dev: Device, sgl: Scatterlist, nents: int
    ) -> Iterator[ScatterlistEntry]:
        """The DMA segments of an sg call: the kernel walks the caller's
        ``nents`` entries and stops at the count the mapping produced
        (``get_nr_mapped_entries``)."""
        mapped = None
        for i, s in enumerate(sgl.entries[:nents]):
            if s.dma_address is None:
                return
            if mapped is None:
                first = self._entries(dev).by_addr.get(s.dma_address)
                mapped = first[0].sg_mapped_ents if first else nents
            if i >= mapped:
                return
            yield s

    def unmap_sg(self, dev: Device, sgl: Scatterlist, nents: int, direction: DmaDirection) -> None:
        """``debug_dma_unmap_sg``: check each mapped segment."""
        for s in self._mapped_segments(dev, sgl, nents):
            assert s.dma_address is not None
            self.unmap(dev, MapType.SG, s.dma_address, s.dma_length, direction, sg_call_ents=nents)

    # -- sync --------------------------------------------------------------

    def sync(
        self,
        dev: Device,
        dma: int,
        size: int,
        direction: DmaDirection,
        to_cpu: bool,
        sg_call_ents: int = 0,
    ) -> None:
        """``check_sync``: the range must lie in one live mapping whose
        direction allows the sync."""
        e = self._entries(dev).containing(dma)
        if e is None:
            self.report(
                dev,
                DebugKind.SYNC_NOT_MAPPED,
                f"device driver tries to sync DMA memory it has not allocated "
                f"[device address={_fmt(dma)}] [size={size} bytes]",
                dma_address=dma,
                size=size,
                direction=direction,
            )
            return
        common = {
            "dma_address": e.dma,
            "size": size,
            "map_size": e.size,
            "direction": direction,
            "map_direction": e.direction,
            "mapped_at": e.location,
        }
        reach = dma - e.dma + size
        if reach > e.size:
            self.report(
                dev,
                DebugKind.SYNC_OUT_OF_RANGE,
                f"device driver syncs DMA memory outside allocated range "
                f"[device address={_fmt(e.dma)}] [allocation size={e.size} bytes] "
                f"[sync offset+size={reach}]",
                **common,
            )
        if e.direction == DmaDirection.BIDIRECTIONAL:
            return
        mapped_with = (
            f"[mapped with {e.direction.kernel_name}] [synced with {direction.kernel_name}]"
        )
        if direction != e.direction:
            self.report(
                dev,
                DebugKind.SYNC_DIRECTION_MISMATCH,
                f"device driver syncs DMA memory with different direction "
                f"[device address={_fmt(e.dma)}] [size={e.size} bytes] {mapped_with}",
                **common,
            )
        if (
            to_cpu
            and e.direction != DmaDirection.FROM_DEVICE
            and direction != DmaDirection.TO_DEVICE
        ):
            self.report(
                dev,
                DebugKind.SYNC_READ_ONLY_FOR_CPU,
                f"device driver syncs device read-only DMA memory for cpu "
                f"[device address={_fmt(e.dma)}] [size={e.size} bytes] {mapped_with}",
                **common,
            )
        if (
            not to_cpu
            and e.direction != DmaDirection.TO_DEVICE
            and direction != DmaDirection.FROM_DEVICE
        ):
            self.report(
                dev,
                DebugKind.SYNC_WRITE_ONLY_TO_DEVICE,
                f"device driver syncs device write-only DMA memory to device "
                f"[device address={_fmt(e.dma)}] [size={e.size} bytes] {mapped_with}",
                **common,
            )
        if sg_call_ents and e.type == MapType.SG and e.sg_call_ents != sg_call_ents:
            self.report(
                dev,
                DebugKind.SYNC_SG_COUNT_MISMATCH,
                f"device driver syncs DMA sg list with different entry count "
                f"[map count={e.sg_call_ents}] [sync count={sg_call_ents}]",
                count=sg_call_ents,
                **common,
            )

    def sync_sg(
        self, dev: Device, sgl: Scatterlist, nents: int, direction: DmaDirection, to_cpu: bool
    ) -> None:
        """``debug_dma_sync_sg_for_cpu`` / ``_for_device``."""
        for s in self._mapped_segments(dev, sgl, nents):
            assert s.dma_address is not None
            self.sync(dev, s.dma_address, s.dma_length, direction, to_cpu, sg_call_ents=nents)

    # -- the device side and teardown --------------------------------------

    def device_access(self, dev: Device, dma: int, length: int, write: bool) -> None:
        """A device access must fall inside live mappings that allow it."""
        entries = self._entries(dev)
        pos, end = dma, dma + length
        while pos < end:
            e = entries.containing(pos)
            access = "write" if write else "read"
            if e is None:
                self.report(
                    dev,
                    DebugKind.DEVICE_ACCESS_UNMAPPED,
                    f"device {access}s DMA memory outside every live mapping "
                    f"[device address={_fmt(pos)}] [size={end - pos} bytes]",
                    dma_address=pos,
                    size=end - pos,
                )
                return
            allowed = e.direction.device_may_write if write else e.direction.device_may_read
            if not allowed:
                self.report(
                    dev,
                    DebugKind.DEVICE_ACCESS_DIRECTION,
                    f"device {access}s DMA memory mapped with {e.direction.kernel_name} "
                    f"[device address={_fmt(pos)}] [size={min(end, e.end) - pos} bytes]",
                    dma_address=pos,
                    size=length,
                    map_direction=e.direction,
                    mapped_at=e.location,
                )
                return
            pos = e.end

    def release(self, dev: Device) -> None:
        """``dma_debug_device_change`` at unbind: report what is still mapped."""
        entries = self._devices.pop(id(dev), None)
        if not entries:
            return
        first = entries.spans[0]
        where = Counter(e.location for e in entries.spans)
        self.report(
            dev,
            DebugKind.LEAK,
            f"device driver has pending DMA allocations while released from device "
            f"[count={len(entries)}]\nOne of leaked entries details: "
            f"[device address={_fmt(first.dma)}] [size={first.size} bytes] "
            f"[mapped with {first.direction.kernel_name}] [mapped as {first.type.value}]",
            count=len(entries),
            dma_address=first.dma,
            size=first.size,
            map_direction=first.direction,
            map_type=first.type,
            mapped_at=first.location,
            leaks=tuple(where.most_common()),
        )
