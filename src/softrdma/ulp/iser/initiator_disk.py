"""The SCSI disk on an iSER session: what ``sd`` and the block layer do
with the commands the session carries.

Kernel counterparts: ``sd_setup_read_write_cmnd`` (READ / WRITE of at most
``max_sectors``: a block I/O split into several commands),
``sd_read_capacity``, ``scsi_execute_cmd`` (one command waited for:
INQUIRY, READ CAPACITY, SYNCHRONIZE CACHE). :class:`IserDisk` is a base of
:class:`~softrdma.ulp.iser.initiator.IserInitiator`, which supplies
:meth:`submit` (``iscsi_queuecommand``) and the waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from softrdma.ulp.iser.initiator_task import IserIo, IserRequest
from softrdma.ulp.sd_capacity import SdCapacity
from softrdma.ulp.srp.initiator_scsi import (
    Inquiry,
    cdb_inquiry,
    cdb_read,
    cdb_read_capacity_10,
    cdb_synchronize_cache,
    cdb_write,
    parse_inquiry,
    parse_read_capacity_10,
)

__all__ = ["IserDisk"]


class IserDisk(SdCapacity):
    """Block reads and writes, INQUIRY, READ CAPACITY and SYNCHRONIZE CACHE
    over :meth:`submit`."""

    max_transfer: int

    if TYPE_CHECKING:

        def submit(
            self,
            cdb: bytes,
            *,
            read_length: int = 0,
            write_data: bytes = b"",
            lun: int | None = None,
        ) -> IserRequest: ...
        def _wait_reqs(self, reqs: Sequence[IserRequest]) -> None: ...

    def execute(
        self, cdb: bytes, *, read_length: int = 0, write_data: bytes = b"", lun: int | None = None
    ) -> bytes:
        """Run one command to completion; its data in."""
        req = self.submit(cdb, read_length=read_length, write_data=write_data, lun=lun)
        self._wait_reqs([req])
        return req.result()

    def inquiry(self, lun: int | None = None) -> Inquiry:
        """Standard INQUIRY."""
        return parse_inquiry(self.execute(cdb_inquiry(36), read_length=36, lun=lun).ljust(36))

    def read_capacity(self, lun: int | None = None) -> tuple[int, int]:
        """``(blocks, block_size)`` by READ CAPACITY(10)."""
        blocks, size = parse_read_capacity_10(
            self.execute(cdb_read_capacity_10(), read_length=8, lun=lun)
        )
        self._keep_capacity(lun, blocks, size)
        return blocks, size

    def submit_read(self, lba: int, nblocks: int) -> IserIo:
        """Queue a read of ``nblocks`` from ``lba``."""
        size = self.block_size
        step = max(1, self.max_transfer // size)
        reqs = [
            self.submit(cdb_read(lba + i, n), read_length=n * size)
            for i in range(0, nblocks, step)
            for n in [min(step, nblocks - i)]
        ]
        return IserIo(reqs, False)

    def submit_write(self, lba: int, data: bytes | bytearray | memoryview) -> IserIo:
        """Queue a write of whole blocks at ``lba``."""
        size = self.block_size
        if not data or len(data) % size:
            raise ValueError(f"{len(data)} bytes is not a whole number of {size}-byte blocks")
        data = bytes(data)
        nblocks = len(data) // size
        step = max(1, self.max_transfer // size)
        reqs = [
            self.submit(cdb_write(lba + i, n), write_data=data[i * size : (i + n) * size])
            for i in range(0, nblocks, step)
            for n in [min(step, nblocks - i)]
        ]
        return IserIo(reqs, True)

    def read(self, lba: int, nblocks: int) -> bytes:
        io = self.submit_read(lba, nblocks)
        self._wait_reqs(io.requests)
        data = io.result()
        assert data is not None
        return data

    def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        io = self.submit_write(lba, data)
        self._wait_reqs(io.requests)
        io.result()

    def sync(self) -> None:
        """SYNCHRONIZE CACHE."""
        self.execute(cdb_synchronize_cache())
