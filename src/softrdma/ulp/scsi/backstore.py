"""Backstores: where a logical unit's blocks live.

Kernel counterparts: LIO's backend interface (``struct target_backend_ops``)
and its ``fileio`` backend (``drivers/target/target_core_file.c``), which
serves a LUN from a file with ``vfs_iter_read`` / ``vfs_iter_write`` and
flushes it with ``vfs_fsync_range`` for SYNCHRONIZE CACHE and FUA writes.
"""

from __future__ import annotations

import errno
import os
from types import TracebackType
from typing import Protocol, runtime_checkable

from softrdma.ulp.scsi.sense import ScsiUsageError

__all__ = ["BLOCK_SIZES", "Backstore", "FileBackstore"]

#: The logical block sizes a backstore may have.
BLOCK_SIZES = (512, 4096)


@runtime_checkable
class Backstore(Protocol):
    """What the target core needs of a backstore (LIO's
    ``target_backend_ops``: ``get_blocks``, ``get_block_size``, the
    read / write / flush execution hooks).

    The core validates every offset and length against ``num_blocks``
    before calling :meth:`pread` or :meth:`pwrite`; I/O failures are
    reported as :class:`OSError` and become MEDIUM ERROR sense.
    """

    @property
    def block_size(self) -> int:
        """Logical block size in bytes (512 or 4096)."""
        ...

    @property
    def num_blocks(self) -> int:
        """Capacity in logical blocks."""
        ...

    @property
    def read_only(self) -> bool:
        """Writes are refused with DATA PROTECT / WRITE PROTECTED."""
        ...

    @property
    def write_cache(self) -> bool:
        """Writes may sit in a volatile cache until :meth:`flush` (the
        caching mode page's WCE bit)."""
        ...

    @property
    def identity(self) -> bytes:
        """Stable bytes naming the storage, from which the unit serial
        number and the NAA identifier are derived."""
        ...

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at byte ``offset``."""
        ...

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        """Write all of ``data`` at byte ``offset``."""
        ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...


class FileBackstore:
    """A logical unit stored in a file (LIO's ``fileio`` backstore,
    ``fd_configure_device`` / ``fd_execute_rw`` / ``fd_execute_sync_cache``).

    ``path`` is an existing image (or block device) unless ``create`` is
    set, in which case a missing file is created. ``size`` is the capacity
    in bytes (a multiple of ``block_size``); a file shorter than ``size`` is
    extended — sparsely, with ``ftruncate`` — only when ``create`` is set,
    and never truncated. Without ``size`` the capacity is the file's size
    rounded down to whole blocks.

    Writes go to the file with ``os.pwrite`` before a command completes and
    are durable after :meth:`flush` (``os.fsync``); with
    ``write_cache=False`` every write is followed by a flush (write-through,
    WCE reported clear). ``read_only`` opens the file read-only and makes
    the LUN write-protected.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        block_size: int = 512,
        *,
        size: int | None = None,
        create: bool = False,
        read_only: bool = False,
        write_cache: bool = True,
    ) -> None:
        if block_size not in BLOCK_SIZES:
            raise ScsiUsageError(f"block size {block_size}: one of {BLOCK_SIZES}")
        if size is not None and (size <= 0 or size % block_size):
            raise ScsiUsageError(f"size {size}: a positive multiple of {block_size}")
        if create and read_only:
            raise ScsiUsageError("a read-only backstore cannot create its image")
        self.path = os.fspath(path)
        self._block_size = block_size
        self._read_only = read_only
        self._write_cache = write_cache
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        self._fd = os.open(self.path, flags, 0o644)
        try:
            length = os.lseek(self._fd, 0, os.SEEK_END)
            if size is not None and length < size:
                if not create:
                    raise ScsiUsageError(
                        f"{self.path}: {length} bytes, shorter than size {size} (create=False)"
                    )
                os.ftruncate(self._fd, size)
                length = size
            capacity = size if size is not None else length
            self._num_blocks = capacity // block_size
            if self._num_blocks == 0:
                raise ScsiUsageError(f"{self.path}: smaller than one {block_size}-byte block")
        except BaseException:
            os.close(self._fd)
            raise
        self._identity = os.fsencode(os.path.realpath(self.path))

    # --- the Backstore protocol -----------------------------------------------------------

    @property
    def block_size(self) -> int:
        """Logical block size in bytes (``fd_get_blocks``'s divisor)."""
        return self._block_size

    @property
    def num_blocks(self) -> int:
        """Capacity in logical blocks (``fd_get_blocks`` + 1)."""
        return self._num_blocks

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self._num_blocks * self._block_size

    @property
    def read_only(self) -> bool:
        """Opened read-only: the LUN is write-protected."""
        return self._read_only

    @property
    def write_cache(self) -> bool:
        """Writes are cached until :meth:`flush` (LIO's ``emulate_write_cache``)."""
        return self._write_cache

    @property
    def identity(self) -> bytes:
        """The image's resolved path: stable across runs and targets."""
        return self._identity

    @property
    def closed(self) -> bool:
        """:meth:`close` was called."""
        return self._fd < 0

    def _check(self, offset: int, length: int) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, f"{self.path}: backstore is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ScsiUsageError(
                f"{self.path}: bytes {offset}..{offset + length} outside 0..{self.size}"
            )
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (``os.pread``, repeated on a short
        read; the file ending early is an I/O error)."""
        fd = self._check(offset, length)
        data = os.pread(fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        done = len(data)
        while done < length:
            more = os.pread(fd, length - done, offset + done)
            if not more:
                raise OSError(errno.EIO, f"{self.path}: image ends at byte {offset + done}")
            parts.append(more)
            done += len(more)
        return b"".join(parts)

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` (``os.pwrite`` until all is written;
        flushed at once when the write cache is off)."""
        view = memoryview(data).cast("B")
        fd = self._check(offset, len(view))
        if self._read_only:
            raise OSError(errno.EROFS, f"{self.path}: read-only backstore")
        done = 0
        while done < len(view):
            n = os.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"{self.path}: pwrite wrote nothing")
            done += n
        if not self._write_cache:
            os.fsync(fd)

    def flush(self) -> None:
        """Make completed writes durable (``os.fsync``; LIO: ``vfs_fsync_range``)."""
        if self._fd < 0:
            raise OSError(errno.EBADF, f"{self.path}: backstore is closed")
        os.fsync(self._fd)

    # --- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the image (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> FileBackstore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self._read_only else "rw"
        return (
            f"FileBackstore({self.path!r}, {self._num_blocks} x {self._block_size} B, {mode}, "
            f"write_cache={self._write_cache})"
        )
