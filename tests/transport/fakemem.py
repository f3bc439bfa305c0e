"""A MemoryPort for engine tests: MRs over bytearrays with key, bounds,
access and validity checks, and counters the tests assert on.

Keys follow rxe: ``key >> 8`` is the MR index, the low byte the variant a
fast registration may change. An SGE's ``addr`` and a remote ``va`` are
iovas inside the MR (each MR gets its own 4 GiB window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from softrdma.memory.layout import BytesLike
from softrdma.transport.headers import NakCode
from softrdma.transport.memory_port import LocalAccessError, RemoteAccessError
from softrdma.verbs.enums import IbAccess, IbWcStatus
from softrdma.verbs.wr import BindMwWR, RegWR, Sge

ALL_REMOTE = IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ
ALL_ACCESS = ALL_REMOTE | IbAccess.REMOTE_ATOMIC
_LOCAL_WRITE = int(IbAccess.LOCAL_WRITE)


@dataclass
class FakeMr:
    index: int
    key: int
    iova: int
    buf: bytearray
    access: int
    valid: bool = True

    def sge(self, offset: int = 0, length: int | None = None) -> Sge:
        if length is None:
            length = len(self.buf) - offset
        return Sge(self.iova + offset, length, self.key)

    def contains(self, va: int, length: int) -> bool:
        return self.iova <= va and va + length <= self.iova + len(self.buf)

    def __getitem__(self, s: slice) -> bytes:
        return bytes(self.buf[s])


@dataclass
class FakeSgl:
    """:class:`~softrdma.transport.memory_port.LocalSgl` of the fake: every
    access walks and checks the SGEs again (what is kept is the list)."""

    mem: FakeMemory
    sges: tuple[Sge, ...]
    write: bool

    def gather(self, offset: int, length: int) -> BytesLike:
        return self.mem.gather(self.sges, offset, length)

    def scatter(self, offset: int, data: BytesLike) -> None:
        self.mem.scatter(self.sges, offset, data)

    def gather_bulk(self, offset: int, length: int) -> BytesLike | None:
        try:
            return self.mem.gather(self.sges, offset, length)
        except LocalAccessError:
            return None


@dataclass
class FakeRemoteMr:
    """:class:`~softrdma.transport.memory_port.RemoteMr` of the fake: each
    access stays in the checked range and checks the key again."""

    mem: FakeMemory
    rkey: int
    va: int
    length: int
    access: int

    def _mr(self, va: int, length: int) -> FakeMr:
        if va < self.va or va + length > self.va + self.length:
            raise RemoteAccessError(NakCode.REMOTE_ACCESS_ERR, "outside the checked range")
        return self.mem._check(self.rkey, va, length, self.access)

    def read(self, va: int, length: int) -> BytesLike:
        mr = self._mr(va, length)
        self.mem.remote_reads += 1
        start = va - mr.iova
        return bytes(memoryview(mr.buf)[start : start + length])

    def write(self, va: int, data: BytesLike) -> None:
        mv = memoryview(data).cast("B")
        mr = self._mr(va, len(mv))
        self.mem.remote_writes += 1
        start = va - mr.iova
        mr.buf[start : start + len(mv)] = mv

    def write_bulk(self, va: int, data: BytesLike) -> bool:
        try:
            self.write(va, data)
        except RemoteAccessError:
            return False
        return True

    def atomic(self, va: int, compare_swap: bool, compare: int, swap_add: int) -> int:
        if va & 7:
            raise RemoteAccessError(NakCode.INVALID_REQUEST, "misaligned atomic")
        mr = self._mr(va, 8)
        self.mem.atomic_count += 1
        start = va - mr.iova
        orig = int.from_bytes(mr.buf[start : start + 8], "little")
        if compare_swap:
            new = swap_add if orig == compare else orig
        else:
            new = (orig + swap_add) & ((1 << 64) - 1)
        mr.buf[start : start + 8] = new.to_bytes(8, "little")
        return orig


@dataclass
class FakeMemory:
    """One host's MR table (``rxe_mr.c`` lookup + ``mr_check_range``).

    ``sgl_maps`` and ``rkey_checks`` count the translations the engines ask
    for: one per work request / request, never one per packet."""

    mrs: dict[int, FakeMr] = field(default_factory=dict)
    atomic_count: int = 0
    remote_reads: int = 0
    remote_writes: int = 0
    sgl_maps: int = 0
    rkey_checks: int = 0
    invalidated: list[int] = field(default_factory=list)
    binds: list[BindMwWR] = field(default_factory=list)
    next_index: int = 1

    def reg(self, size: int, access: IbAccess = ALL_ACCESS, fill: bytes | None = None) -> FakeMr:
        index = self.next_index
        self.next_index += 1
        buf = bytearray(size) if fill is None else bytearray(fill)
        assert len(buf) == size
        mr = FakeMr(index, index << 8, index << 32, buf, int(access))
        self.mrs[index] = mr
        return mr

    def _lookup(self, key: int) -> FakeMr | None:
        mr = self.mrs.get(key >> 8)
        if mr is None or mr.key != key or not mr.valid:
            return None
        return mr

    def _walk(
        self, sges: Sequence[Sge], offset: int, length: int, write: bool
    ) -> list[tuple[FakeMr, int, int]]:
        """(mr, start in mr.buf, n) pieces for [offset, offset+length) of the list."""
        pieces = []
        total = 0
        for sge in sges:
            total += sge.length
        if offset + length > total:
            raise LocalAccessError(IbWcStatus.LOC_LEN_ERR, "past the end of the SGE list")
        pos = 0
        left = length
        for sge in sges:
            if left == 0:
                break
            end = pos + sge.length
            if end <= offset:
                pos = end
                continue
            mr = self._lookup(sge.lkey)
            if mr is None:
                raise LocalAccessError(IbWcStatus.LOC_PROT_ERR, f"bad lkey {sge.lkey:#x}")
            if write and not mr.access & _LOCAL_WRITE:
                raise LocalAccessError(IbWcStatus.LOC_PROT_ERR, "no LOCAL_WRITE")
            if not mr.contains(sge.addr, sge.length):
                raise LocalAccessError(IbWcStatus.LOC_PROT_ERR, "SGE outside its MR")
            skip = max(0, offset - pos)
            n = min(sge.length - skip, left)
            pieces.append((mr, sge.addr - mr.iova + skip, n))
            left -= n
            pos = end
        return pieces

    # -- MemoryPort -------------------------------------------------------------

    def gather(self, sges: Sequence[Sge], offset: int, length: int) -> BytesLike:
        pieces = self._walk(sges, offset, length, write=False)
        if len(pieces) == 1:
            mr, start, n = pieces[0]
            return bytes(memoryview(mr.buf)[start : start + n])
        return b"".join(bytes(mr.buf[s : s + n]) for mr, s, n in pieces)

    def scatter(self, sges: Sequence[Sge], offset: int, data: BytesLike) -> None:
        mv = memoryview(data).cast("B")
        pieces = self._walk(sges, offset, len(mv), write=True)
        pos = 0
        for mr, start, n in pieces:
            mr.buf[start : start + n] = mv[pos : pos + n]
            pos += n

    def map_sgl(self, sges: Sequence[Sge], write: bool) -> FakeSgl:
        self.sgl_maps += 1
        return FakeSgl(self, tuple(sges), write)

    def reg_mr(self, wr: RegWR) -> None:
        mr = self.mrs.get(wr.key >> 8)
        if mr is None:
            raise LocalAccessError(IbWcStatus.LOC_PROT_ERR, "no such MR")
        mr.key = wr.key
        mr.access = int(wr.access)
        mr.valid = True

    def local_invalidate(self, key: int) -> None:
        mr = self._lookup(key)
        if mr is None:
            raise LocalAccessError(IbWcStatus.LOC_PROT_ERR, f"LOCAL_INV of bad key {key:#x}")
        mr.valid = False
        self.invalidated.append(key)

    def bind_mw(self, wr: BindMwWR) -> None:
        # The engines' tests bind no windows; the devices' do (tests/rdma).
        self.binds.append(wr)
        raise LocalAccessError(IbWcStatus.MW_BIND_ERR, f"no MW {wr.mw_rkey:#x} here")

    def _check(self, rkey: int, va: int, length: int, access: int) -> FakeMr:
        """``lookup_mr`` + ``mr_check_range`` for a remote access."""
        mr = self._lookup(rkey)
        if mr is None:
            raise RemoteAccessError(NakCode.REMOTE_ACCESS_ERR, f"bad rkey {rkey:#x}")
        if int(access) & ~mr.access:
            raise RemoteAccessError(NakCode.REMOTE_ACCESS_ERR, "access not granted")
        if not mr.contains(va, length):
            raise RemoteAccessError(NakCode.REMOTE_ACCESS_ERR, "out of bounds")
        return mr

    def check_rkey(self, rkey: int, va: int, length: int, access: int) -> FakeRemoteMr:
        if length:
            self.rkey_checks += 1
            self._check(rkey, va, length, access)
        return FakeRemoteMr(self, rkey, va, length, int(access))

    def check_rkey_access(self, rkey: int, access: int) -> None:
        mr = self._lookup(rkey)
        if mr is None:
            raise RemoteAccessError(NakCode.REMOTE_ACCESS_ERR, f"bad rkey {rkey:#x}")
        if int(access) & ~mr.access:
            raise RemoteAccessError(NakCode.REMOTE_ACCESS_ERR, "access not granted")

    def write_once(self, rkey: int, va: int, data: BytesLike) -> None:
        self.check_rkey(rkey, va, len(data), IbAccess.REMOTE_WRITE).write(va, data)

    def remote_invalidate(self, rkey: int) -> None:
        mr = self._lookup(rkey)
        if mr is None:
            raise RemoteAccessError(NakCode.INVALID_REQUEST, f"invalidate of bad rkey {rkey:#x}")
        mr.valid = False
        self.invalidated.append(rkey)
